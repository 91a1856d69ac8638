"""`train(config, workdir)`: the Tool-R1 GRPO loop, readable top to bottom (DESIGN section 3).

`_setup` builds the run's fixed parts (`_Parts`) and the state the loop changes (`_State`, all
of which a checkpoint holds); the loop body is one training step: choose questions -> roll out
and score -> queue -> batch and update -> metrics, checkpoint, evaluation. Each phase is a
function below the loop, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from toolr1_jax import buffer, build, checkpoint, evaluation, grpo, sandbox, sft, sharding, update
from toolr1_jax import engine as engine_lib
from toolr1_jax.agent import prompt, rollout
from toolr1_jax.data import pipeline
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import params as params_lib
from toolr1_jax.models import tokenizer as tokenizer_lib
from toolr1_jax.rewards import reward as reward_lib

log = logging.getLogger(__name__)

# The architecture and tokenizer files of `model.init_from` (no weights), kept with the run so
# that a resume reads nothing from init_from (which may be gone, or 15 GB away).
_MODEL_FILES_DIR = "model_files"


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the policy; returns the last step's metrics. Resumes from `workdir` if it holds a
    checkpoint, else from `ckpt.resume_from`, else starts from `model.init_from` or scratch."""
    config = build.expand_paths(config)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    build.validate(config, resuming=_has_checkpoint(workdir) or bool(config.ckpt.resume_from))
    return asyncio.run(_train(config, workdir))


async def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, float]:
    parts, state = _setup(config, workdir)
    metrics: dict[str, float] = {}
    try:
        async with build.sandbox_pool(config, parts.tools) as pool:
            parts.pool = pool
            if config.sft.enabled and state.step == 0 and not parts.resumed:
                metrics = await _cold_start(parts, state)

            # ------------------------------------------------------------------------------
            # The loop: one GRPO step per iteration (DESIGN section 3).
            # ------------------------------------------------------------------------------
            while state.step < config.total_steps:
                t_step, compiles_before = time.perf_counter(), parts.compiles.count
                chosen, plans = _choose_questions(parts, state)
                scored, stats, judge_s = await _roll_out_and_score(parts, state, chosen, plans)
                groups, group_counts = _update_queue(parts, state, chosen, scored)
                update_metrics, update_s = _update(parts, state, groups)
                state.step += 1
                metrics = {
                    **_step_metrics(state, groups, stats, group_counts, update_metrics),
                    **state.queue.summary(),  # reads the queue's device arrays: a host sync
                    "compiles": float(parts.compiles.count - compiles_before),
                    "time/step_s": time.perf_counter() - t_step,
                    "time/judge_s": judge_s,
                    "time/update_s": update_s,
                }
                _log_step(parts, state, metrics)
                _save_rollouts(parts, state, groups)
                if _due(state.step, config.ckpt.every_steps, config.total_steps):
                    parts.ckpt.save(state.step, *state.checkpoint(parts.mesh))
                if _due(state.step, config.log.eval_every_steps, config.total_steps):
                    metrics.update(await _evaluate(parts, state.step, "eval"))
    finally:
        # Also on an error: pending checkpoint saves finish, so the last good one is on disk.
        parts.close()
    _export(parts, state)
    with contextlib.suppress(Exception):
        await parts.judge.aclose()
    return metrics


# ---------------------------------------------------------------------------------------------
# What the loop reads (fixed) and what it changes (checkpointed)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Parts:
    """Everything built once by `_setup`; the loop never rebinds these."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    is_main: bool
    resumed: bool
    writer: _Writer
    ckpt: checkpoint.Checkpointer
    compiles: _CompileCounter
    bar: tqdm.tqdm
    tokenizer: tokenizer_lib.Tokenizer
    model_config: model_lib.ModelConfig
    graphdef: Any
    sft_demos: list  # the cold start's demonstrations (not among `questions`)
    questions: list  # GRPO's questions; the queue indexes them
    index_of: dict[str, int]
    eval_examples: list
    tools: list
    engine: engine_lib.Engine
    engine_params: sharding.LocalParams
    train_step: update.TrainStep
    logprob_fn: Any
    agent_config: rollout.AgentConfig
    reward_config: reward_lib.RewardConfig
    judge: Any
    eval_judge: Any
    local_groups: range  # the step's group ids this process rolls out
    pool: Any = None  # the sandbox pool, open while the loop runs

    def close(self) -> None:
        self.bar.close()
        self.compiles.close()
        self.ckpt.close()
        self.writer.close()


@dataclasses.dataclass
class _State:
    """What the loop changes. A checkpoint holds all of it, so a resumed run continues exactly."""

    step: int
    params: Any  # donated to every update: only this reference may be kept
    opt_state: Any
    rng: jax.Array
    queue: buffer.SampleQueue
    data: pipeline.ExampleIterator
    counters: dict[str, int]
    # The frozen reference policy when grpo.beta > 0 (the starting params), else None. It is
    # checkpointed: a resumed run reads nothing from model.init_from.
    ref_params: Any = None

    def checkpoint(self, mesh) -> tuple[dict, dict]:
        """(global arrays, JSON host state): every process saves its devices' part. Saves are
        asynchronous, but `Checkpointer.save` copies the arrays before it returns, so the next
        update may donate the params and optimizer state."""
        arrays = {
            "params": self.params,
            "opt_state": self.opt_state,
            "queue": sharding.on_mesh(self.queue.state, mesh),
            "rng": sharding.on_mesh(jax.random.key_data(self.rng), mesh),
        }
        if self.ref_params is not None:
            arrays["ref_params"] = self.ref_params
        meta = {
            "step": self.step,
            "data": self.data.get_state(),
            "queue": self.queue.host_state(),
            "counters": self.counters,
        }
        return arrays, meta

    def restore(self, step: int, arrays: dict, meta: dict) -> None:
        self.step = step
        self.params, self.opt_state = arrays["params"], arrays["opt_state"]
        # One process keeps the queue on the mesh; several keep a host copy each.
        q = arrays["queue"]
        self.queue.state = q if jax.process_count() == 1 else jax.device_get(q)
        self.rng = jax.random.wrap_key_data(jax.device_get(arrays["rng"]))
        self.queue.load_host_state(meta["queue"])
        self.data.set_state(meta["data"])
        self.counters = meta["counters"]
        if self.ref_params is not None:
            self.ref_params = arrays["ref_params"]


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def _setup(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[_Parts, _State]:
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    g = config.grpo

    # Data: every process reads every question and chooses each step's questions the same way
    # (one seeded order, one queue); each then rolls out its own slice of them. Processes
    # sharing a data_dir must not prepare a dataset at once: process 0 prepares it first.
    if not is_main:
        sharding.sync_processes("data_prepared")
    train_examples = build.examples(config, config.data.train_split)
    eval_examples = build.examples(config, config.data.eval_split, for_eval=True)
    if is_main:
        sharding.sync_processes("data_prepared")
    eval_examples = eval_examples[: config.data.num_eval or None]
    # GRPO's questions: the first data.num_train training examples of data.grpo_levels (all
    # when 0 / empty), less the cold start's demonstrations (GRPO is not handed questions whose
    # solutions SFT showed). A small pool is revisited, which is where the queue's replay and
    # learnability ordering act. The tokenizer draws on the whole split.
    sft_demos = (
        sft.demo_examples(train_examples, config.sft.levels, config.sft.num_demos)
        if config.sft.enabled
        else []
    )
    shown = {e.task_id for e in sft_demos}
    grpo_levels = set(config.data.grpo_levels)
    questions = [
        e
        for e in train_examples
        if (not grpo_levels or e.level in grpo_levels) and e.task_id not in shown
    ]
    questions = questions[: config.data.num_train or None]
    if len(questions) < g.questions_per_step:
        raise build.ConfigError(
            f"GRPO has {len(questions)} questions (data.num_train={config.data.num_train}, "
            f"data.grpo_levels={config.data.grpo_levels}, less {len(shown)} SFT "
            f"demonstrations) but a step asks grpo.questions_per_step={g.questions_per_step}."
        )
    tools = build.tools(config)

    # Resume order (the first that exists wins; a later source is not read at all):
    #   1. the newest good checkpoint in workdir/checkpoints (this run, interrupted);
    #   2. ckpt.resume_from (another run's checkpoint);
    #   3. model.init_from (Hugging Face weights);
    #   4. a fresh model of the config's architecture (seeded).
    # The architecture and tokenizer come from the run's own copy of init_from's small files
    # when it has one, so 1 and 2 read nothing from init_from.
    ckpt = checkpoint.Checkpointer(
        str(workdir / "checkpoints"),
        max_to_keep=config.ckpt.max_to_keep,
        keep_steps=(0,) if config.sft.enabled and config.ckpt.keep_sft else (),
    )
    resuming = _has_checkpoint(workdir) or bool(config.ckpt.resume_from)
    model_dir = _model_files(config, workdir, resuming)
    tokenizer = _tokenizer(config, workdir, model_dir, train_examples, tools)
    model_config = (
        params_lib.read_config(model_dir)
        if model_dir
        else build.model_config(config, tokenizer.eos_token_ids)
    )
    if tokenizer.vocab_size > model_config.vocab_size:
        raise build.ConfigError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_config.vocab_size} (model.vocab_size / config.json)."
        )
    dtype = build.dtype(config)
    if config.model.init_from and not resuming:
        model, _ = params_lib.load_pretrained(config.model.init_from, dtype=dtype, mesh=mesh)
    else:  # from scratch, or the shapes a checkpoint restores into
        model = model_lib.Transformer(model_config, rngs=nnx.Rngs(config.seed), dtype=dtype)
        model = sharding.shard_model(model, mesh)
    model.remat = config.optim.remat
    graphdef, params = nnx.split(model)
    optimizer = build.optimizer(config, config.total_steps)
    # One process keeps the queue sharded over the mesh; several keep a full copy each (the
    # queue reads its rows back on the host), updated identically from the gathered groups.
    # The same capacity either way, so checkpoints move between the two.
    data_size = mesh.shape["data"]
    queue = buffer.SampleQueue(
        num_questions=len(questions),
        per_question=config.queue.per_question,
        max_len=config.agent.max_total_tokens,
        threshold=config.queue.threshold,
        max_replay=config.queue.max_replay if config.queue.enabled else 0,
        max_staleness=config.queue.max_staleness,
        capacity=-(-len(questions) * config.queue.per_question // data_size) * data_size,
        seed=config.seed,
        mesh=mesh if jax.process_count() == 1 else None,
    )
    state = _State(
        step=0,
        params=params,
        opt_state=sharding.on_mesh(optimizer.init(params), mesh),
        rng=jax.random.key(config.seed),
        queue=queue,
        data=pipeline.ExampleIterator(questions, seed=config.seed),
        counters={"fresh_episodes": 0, "replayed_episodes": 0, "tokens": 0},
        ref_params=jax.tree.map(jnp.copy, params) if g.beta > 0 else None,
    )
    resumed = _restore(config, ckpt, state, mesh)
    if not resumed:
        log.info("Starting from %s.", config.model.init_from or f"scratch ({config.model.preset})")

    engine_params = sharding.LocalParams(state.params, mesh)
    engine = engine_lib.Engine(
        nnx.merge(graphdef, engine_params(state.params)),
        num_slots=config.engine.num_slots,
        max_len=config.engine.max_len,
        decode_rows=config.engine.decode_rows or None,
    )
    # Compile every engine and queue program now: steps after the first compile nothing.
    engine.warmup()
    state.queue.warmup()
    loss = build.loss_config(config)
    m = config.optim.num_microbatches
    num_local = g.questions_per_step // jax.process_count()
    parts = _Parts(
        config=config,
        workdir=workdir,
        mesh=mesh,
        is_main=is_main,
        resumed=resumed,
        writer=_Writer(workdir, is_main),
        ckpt=ckpt,
        compiles=_CompileCounter(),
        bar=tqdm.tqdm(
            total=config.total_steps,
            initial=state.step,
            desc="train",
            disable=not (is_main and config.log.progress_bar and sys.stderr.isatty()),
            dynamic_ncols=True,
        ),
        tokenizer=tokenizer,
        model_config=model_config,
        graphdef=graphdef,
        sft_demos=sft_demos,
        questions=questions,
        index_of={e.task_id: i for i, e in enumerate(questions)},
        eval_examples=eval_examples,
        tools=tools,
        engine=engine,
        engine_params=engine_params,
        train_step=update.make_train_step(graphdef, optimizer, loss, num_microbatches=m, mesh=mesh),
        logprob_fn=update.make_logprob_fn(graphdef, loss, num_microbatches=m, mesh=mesh),
        agent_config=build.agent_config(config),
        reward_config=build.reward_config(config),
        judge=build.judge(config),
        eval_judge=build.judge(config, for_eval=True),
        local_groups=range(jax.process_index() * num_local, (jax.process_index() + 1) * num_local),
    )
    return parts, state


def _has_checkpoint(workdir: pathlib.Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _restore(config, ckpt: checkpoint.Checkpointer, state: _State, mesh) -> bool:
    """Steps 1 and 2 of the resume order; True when one of them restored `state`."""
    like, _ = state.checkpoint(mesh)
    restored, source = ckpt.restore_latest(like), "workdir"
    if restored is None and config.ckpt.resume_from:
        source = config.ckpt.resume_from
        if checkpoint.step_of(source) == 0:
            # Another run's GRPO start (its cold-start SFT result): nothing of a GRPO run exists
            # yet but the weights, so this run takes those and starts its own seed, question
            # order and queue (GRPO variants of one SFT: other seeds, pools, queue settings).
            _, state.params = checkpoint.restore_params_from(source, like["params"])
            if state.ref_params is not None:
                state.ref_params = jax.tree.map(jnp.copy, state.params)
            log.info("Starting GRPO from the weights of %s (step 0).", source)
            return True
        restored = checkpoint.restore_from(source, like)
    if restored is None:
        return False
    state.restore(*restored)
    log.info("Resumed from %s at step %d.", source, state.step)
    if state.step >= config.total_steps:
        log.warning(
            "The checkpoint in %s is at step %d >= total_steps=%d: nothing to train. Raise "
            "total_steps to continue this run.",
            source,
            state.step,
            config.total_steps,
        )
    return True


def _model_files(config, workdir: pathlib.Path, resuming: bool) -> pathlib.Path | None:
    """Where the architecture (config.json) and, by default, the tokenizer come from: the run's
    copy of `model.init_from`'s small files (made on a fresh start), or None for a model built
    from the config."""
    if not config.model.init_from:
        return None
    copy = workdir / _MODEL_FILES_DIR
    if resuming and (copy / "config.json").is_file():
        return copy
    source = pathlib.Path(config.model.init_from)
    if source.is_dir() and jax.process_index() == 0:
        tmp = workdir / f"{_MODEL_FILES_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in source.iterdir():
            # Everything but the weights: config, tokenizer, chat template, generation config.
            if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf", ".pt", ".pth"):
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(copy, ignore_errors=True)
        tmp.rename(copy)  # a crash never leaves a half copy under the final name
    sharding.sync_processes("model_files")
    return copy if (copy / "config.json").is_file() else source


def _tokenizer(config, workdir, model_dir, train_examples, tools) -> tokenizer_lib.Tokenizer:
    path = config.model.tokenizer or model_dir
    if path:
        return tokenizer_lib.load_tokenizer(path)
    # A from-scratch model on the synthetic suite: a tokenizer trained on the suite, saved with
    # the run so that resumes and exports use the very same one.
    path = workdir / "tokenizer"
    if not (path / "tokenizer.json").is_file() and jax.process_index() == 0:
        # Everything the policy will read and write: prompts, questions, demonstrations. The
        # system prompt opens every episode, so it is weighted like the questions together.
        agent_config = build.agent_config(config)
        system = prompt.render_system_prompt(
            agent_config.system_prompt_template,
            tools,
            build.authorized_imports(config) or sandbox.DEFAULT_AUTHORIZED_IMPORTS,
        )
        texts = [system, agent_config.format_error_observation] * max(1, len(train_examples) // 4)
        for e in train_examples:
            texts.append(e.question)
            texts.extend(e.metadata.get("thoughts", ()))
            texts.extend(e.metadata.get("solution", ()))
        tokenizer_lib.train_chatml_tokenizer(texts, config.model.vocab_size, path)
    sharding.sync_processes("tokenizer")
    return tokenizer_lib.load_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Cold-start SFT (fresh runs only: its checkpoint at step 0 keeps a resume from repeating it)
# ---------------------------------------------------------------------------------------------


async def _cold_start(parts: _Parts, state: _State) -> dict[str, float]:
    config = parts.config
    metrics: dict[str, float] = {}
    if config.log.eval_every_steps:
        await _evaluate(parts, 0, "eval_init")
    # Demonstrations may come from other levels than GRPO's questions (e.g. level 1 only, to
    # teach the turn format without handing GRPO's harder tasks their solutions).
    # `state.params` is donated to the SFT steps; only the result is kept.
    state.params, sft_metrics = await sft.cold_start(
        parts.sft_demos,
        build.sft_config(config),
        tokenizer=parts.tokenizer,
        pool=parts.pool,
        agent_config=parts.agent_config,
        graphdef=parts.graphdef,
        state=state.params,
        mesh=parts.mesh,
    )
    parts.engine.set_params(parts.engine_params(state.params))
    # GRPO starts with a fresh optimizer state for the fine-tuned params.
    optimizer_init = build.optimizer(config, config.total_steps).init
    state.opt_state = sharding.on_mesh(optimizer_init(state.params), parts.mesh)
    parts.writer.write(0, sft_metrics)
    if config.log.eval_every_steps:
        metrics = await _evaluate(parts, 0, "eval")
    parts.ckpt.save(0, *state.checkpoint(parts.mesh))
    return metrics


# ---------------------------------------------------------------------------------------------
# The phases of one step, in loop order
# ---------------------------------------------------------------------------------------------


def _choose_questions(parts: _Parts, state: _State) -> tuple[list[int], list[buffer.Plan]]:
    """The step's questions and, per question, its replays and number of fresh episodes.

    With the queue, untried questions come from the data iterator in shuffled order and tried
    ones are re-selected by learnability p(1 - p); without it, plain passes over the data.
    Every process chooses the same questions and plans.
    """
    g, index_of = parts.config.grpo, parts.index_of
    if parts.config.queue.enabled:
        untried = (index_of[e.task_id] for e in state.data)
        chosen = state.queue.select_questions(g.questions_per_step, untried=untried)
    else:
        chosen = [index_of[next(state.data).task_id] for _ in range(g.questions_per_step)]
    return chosen, [state.queue.plan(i, g.group_size, state.step) for i in chosen]


async def _roll_out_and_score(parts: _Parts, state: _State, chosen, plans):
    """This process's groups rolled out, each judged as soon as all its episodes have ended,
    then every process's results: `(scored groups by group id, stats, judge seconds)`.

    Group ids are positions in the step, so an episode's seed (from its group id) does not
    depend on which process runs it.
    """
    config = parts.config
    requests = [
        rollout.GroupRequest(parts.questions[chosen[gid]], plans[gid].num_fresh, gid)
        for gid in parts.local_groups
    ]
    scored: dict[int, Any] = {}
    judge_s = 0.0

    async def on_group(group: rollout.Group) -> None:
        nonlocal judge_s
        t0 = time.perf_counter()
        trajs = tuple(group.trajectories) + tuple(plans[group.group_id].replays)
        scored[group.group_id] = await reward_lib.score_group(
            trajs,
            question=group.example.question,
            reference=group.example.answer,
            judge=parts.judge,
            config=parts.reward_config,
        )
        judge_s += time.perf_counter() - t0

    stats = await rollout.rollout(
        requests,
        engine=parts.engine,
        tokenizer=parts.tokenizer,
        pool=parts.pool,
        config=parts.agent_config,
        sampling=build.sampling(config, seed=(config.seed * 1_000_003 + state.step) % 2**32),
        policy_version=state.step,
        on_group=on_group,
    )
    # Every process's scored groups and statistics, so that all update the same queue.
    gathered = sharding.allgather_objects((scored, stats, judge_s))
    scored = {gid: result for part in gathered for gid, result in part[0].items()}
    stats = rollout.RolloutStats.merge([part[1] for part in gathered])
    return scored, stats, max(part[2] for part in gathered)


def _update_queue(parts: _Parts, state: _State, chosen, scored) -> tuple[list[list], dict]:
    """Records outcomes, caches good fresh trajectories, restores signal in flat groups; returns
    the groups to learn from and how many were dropped (judge failures) or flat."""
    config, queue = parts.config, state.queue
    groups, counts = [], {"dropped": 0, "flat": 0}
    for gid, i in enumerate(chosen):
        result = scored[gid]
        if isinstance(result, reward_lib.DroppedGroup):
            log.warning("Dropping group of %s: %s", result.task_id, result.reason)
            counts["dropped"] += 1
            continue
        trajs = list(result)
        fresh = [t for t in trajs if not t.replayed]
        queue.update_stats(i, [t.reward_components.get("answer", 0.0) for t in fresh])
        queue.insert(i, fresh, state.step)
        if len({t.reward for t in trajs}) == 1:
            if config.queue.enabled and config.queue.restore_zero_variance:
                trajs = queue.restore_signal(i, trajs, state.step)
            counts["flat"] += len({t.reward for t in trajs}) == 1
        groups.append(trajs)
    return groups, counts


def _update(parts: _Parts, state: _State, groups) -> tuple[dict[str, float], float]:
    """Advantages, one fixed-shape batch of packed episodes, `grpo.updates_per_batch` optimizer
    steps; the engine then samples from the new params. Stops the run on a non-finite loss or
    gradient norm."""
    t0 = time.perf_counter()
    g = parts.config.grpo
    trajs = [t for group in groups for t in group]
    advantages = [
        a
        for group in groups
        for a in np.asarray(
            grpo.group_advantages([t.reward for t in group], len(group), scale=g.scale_advantages)
        )
    ]
    batch = update.make_batch(
        trajs,
        batch_size=g.questions_per_step * g.group_size,
        max_len=parts.config.agent.max_total_tokens,
        advantages=advantages,
        drop_truncated=g.drop_truncated,
        # Several episodes to a row: the step skips the micro-batches packing leaves empty.
        pack=True,
        num_microbatches=parts.config.optim.num_microbatches,
    )
    # The batch, built identically on every process, as a global array sharded over the batch
    # axes: each process fills only its own devices' rows.
    spec = jax.sharding.NamedSharding(parts.mesh, jax.sharding.PartitionSpec(update.BATCH_AXES))
    if g.updates_per_batch > 1:
        # Several optimizer steps per rollout batch: pi_prox is the policy before the first of
        # them, computed once (a single step uses its own stop-gradient log-probs).
        batch = batch.replace(prox_logprobs=np.zeros_like(batch.behaviour_logprobs))
        batch = jax.tree.map(lambda x: sharding.from_host(x, spec), batch)
        batch = batch.replace(prox_logprobs=parts.logprob_fn(state.params, batch))
    else:
        batch = jax.tree.map(lambda x: sharding.from_host(x, spec), batch)
    for _ in range(g.updates_per_batch):
        # Params and optimizer state are donated: the old buffers are reused in place.
        state.params, state.opt_state, metrics = parts.train_step(
            state.params, state.opt_state, batch, state.ref_params
        )
    # Host-device sync point: the step's metrics come back, and with them the update is done.
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    update.check_finite(
        metrics, where=f"GRPO step {state.step + 1}", last_good=_last_checkpoint(parts)
    )
    parts.engine.set_params(parts.engine_params(state.params))
    return metrics, time.perf_counter() - t0


def _last_checkpoint(parts: _Parts) -> str:
    parts.ckpt.wait()  # a save still in flight counts once it is on disk
    steps = parts.ckpt.all_steps()
    return f"{parts.ckpt.directory}/{steps[-1]}" if steps else "none (no checkpoint yet)"


def _step_metrics(state: _State, groups, stats, group_counts, update_metrics) -> dict:
    """The step's rewards, agent behaviour, sample counts and rollout times."""
    all_trajs = [t for trajs in groups for t in trajs]
    fresh = [t for t in all_trajs if not t.replayed]
    rewards = np.array([t.reward for t in all_trajs] or [0.0])
    answers = np.array([t.reward_components.get("answer", 0.0) for t in fresh] or [0])
    c = state.counters
    c["fresh_episodes"] += stats.num_episodes
    c["replayed_episodes"] += len(all_trajs) - len(fresh)
    c["tokens"] += stats.num_sampled_tokens
    episodes, turns = max(stats.num_episodes, 1), max(stats.num_turns, 1)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "reward/accuracy": float((answers >= 1.0).mean()),
        "groups/zero_variance_share": group_counts["flat"] / max(len(groups), 1),
        "groups/dropped": float(group_counts["dropped"]),
        "agent/turns_per_episode": stats.num_turns / episodes,
        "agent/code_runs_per_episode": stats.num_code_runs / episodes,
        "agent/parse_error_rate": stats.num_format_errors / turns,
        "agent/answered_rate": stats.statuses.get("answered", 0) / episodes,
        "samples/fresh": float(len(fresh)),
        "samples/replayed": float(len(all_trajs) - len(fresh)),
        "samples/fresh_total": float(c["fresh_episodes"]),
        "samples/replayed_total": float(c["replayed_episodes"]),
        "throughput/sampled_tokens_per_s": stats.num_sampled_tokens / max(stats.wall_s, 1e-9),
        "time/rollout_s": stats.wall_s,
        "time/engine_s": stats.engine_s,
        "time/engine_idle_s": stats.engine_idle_s,
        "time/sandbox_s": stats.sandbox_s,
        **{f"update/{k}": v for k, v in update_metrics.items()},
    }


def _log_step(parts: _Parts, state: _State, metrics: dict[str, float]) -> None:
    """Metrics to TensorBoard and JSONL, a progress bar on a TTY, and one log line, so that a
    run without a terminal shows its progress too."""
    config = parts.config
    parts.bar.update(1)
    parts.bar.set_postfix(
        reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}"
    )
    if not _due(state.step, config.log.every_steps, config.total_steps):
        return
    parts.writer.write(state.step, metrics)
    if parts.is_main:
        log.info(
            "step %d/%d: reward %.3f, accuracy %.2f, loss %.4f, queue %d entries, "
            "episodes %d fresh + %d replayed, %.1fs (rollout %.1fs, judge %.1fs, update %.1fs)",
            state.step,
            config.total_steps,
            metrics["reward/mean"],
            metrics["reward/accuracy"],
            metrics["update/loss"],
            metrics["queue/entries"],
            metrics["samples/fresh"],
            metrics["samples/replayed"],
            metrics["time/step_s"],
            metrics["time/rollout_s"],
            metrics["time/judge_s"],
            metrics["time/update_s"],
        )


def _save_rollouts(parts: _Parts, state: _State, groups) -> None:
    """The step's episodes, as the update saw them, to `rollouts/step_N.jsonl`: what the policy
    wrote, what it earned and whether the queue replayed it."""
    if not (parts.config.log.save_rollouts and parts.is_main):
        return
    lines = []
    for trajs in groups:
        for t in trajs:
            example = parts.questions[parts.index_of[t.task_id]]
            line = {"step": state.step, **evaluation.episode_json(t, example)}
            line.update(reward=t.reward, reward_components=t.reward_components, replayed=t.replayed)
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    path = parts.workdir / "rollouts" / f"step_{state.step}.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")


def _due(step: int, every: int, last: int) -> bool:
    """Every `every` steps and at the last step; never when `every` is 0."""
    return bool(every) and (step % every == 0 or step == last)


async def _evaluate(parts: _Parts, at_step: int, prefix: str) -> dict[str, float]:
    """Greedy episodes on the eval split, each process running its share; logged under
    `prefix/` and written to `prefix/step_N/`."""
    config = parts.config
    t0 = time.perf_counter()
    log.info(
        "%s at step %d: %d held-out questions x %d sample(s)...",
        prefix,
        at_step,
        len(parts.eval_examples),
        config.log.num_eval_samples,
    )
    result = await evaluation.evaluate(
        parts.eval_examples,
        engine=parts.engine,
        tokenizer=parts.tokenizer,
        pool=parts.pool,
        tools=parts.tools,
        agent_config=parts.agent_config,
        sampling=build.sampling(config, seed=config.seed, for_eval=True),
        num_samples=config.log.num_eval_samples,
        judge=parts.eval_judge,
        progress=False,
        policy_version=at_step,
        shard=(jax.process_index(), jax.process_count()),
    )
    if jax.process_count() > 1:
        log.info(
            "Evaluated %d of the %d questions on this process.",
            len(result.records) // result.num_samples,
            len(parts.eval_examples),
        )
        result = evaluation.merge_shards(sharding.allgather_objects(result))
    eval_metrics = {f"{prefix}/{k}": v for k, v in result.metrics.items()}
    if config.data.grpo_levels and not evaluation.answers_hidden(parts.eval_examples):
        # The levels GRPO trains on, together: the demo's headline number.
        rs = [r for r in result.records if r.example.level in set(config.data.grpo_levels)]
        eval_metrics[f"{prefix}/accuracy/grpo_levels"] = sum(r.correct for r in rs) / max(
            len(rs), 1
        )
    parts.writer.write(at_step, eval_metrics)
    if "accuracy" in result.metrics:  # not when the split's answers are hidden
        by_level = sorted(k for k in eval_metrics if k.startswith(f"{prefix}/accuracy/level_"))
        log.info(
            "%s at step %d: accuracy %.3f (%s), %.0f s.",
            prefix,
            at_step,
            result.metrics["accuracy"],
            ", ".join(f"{k.rsplit('/', 1)[1]} {eval_metrics[k]:.3f}" for k in by_level),
            time.perf_counter() - t0,
        )
    if parts.is_main:
        evaluation.write_outputs(result, str(parts.workdir / prefix / f"step_{at_step}"))
    return eval_metrics


# ---------------------------------------------------------------------------------------------
# After the loop
# ---------------------------------------------------------------------------------------------


def _export(parts: _Parts, state: _State) -> None:
    """A Hugging Face directory (weights, config, tokenizer) transformers loads as is, and the
    held-out accuracy summary with its plot."""
    workdir = parts.workdir
    if parts.config.ckpt.export_hf:
        # Every process takes part (sharded params are gathered collectively); process 0 writes.
        export_dir = workdir / "export"
        model = nnx.merge(parts.graphdef, state.params)
        params_lib.save_pretrained(model, parts.model_config, str(export_dir))
        if parts.is_main:
            parts.tokenizer.hf.save_pretrained(str(export_dir))
            log.info("Exported the policy to %s.", export_dir)
    if parts.is_main:
        levels = tuple(parts.config.data.grpo_levels)
        summary = evaluation.summarize_accuracy(
            workdir, "accuracy/grpo_levels" if levels else "accuracy"
        )
        if summary:
            text = ", ".join(f"{k} {v:.3f}" for k, v in summary.items())
            where = f" on levels {', '.join(map(str, levels))}" if levels else ""
            print(f"Held-out accuracy: {text}{where} (plot: {workdir / 'accuracy.png'})")
            if levels:  # and every other level, which training must not lose
                for level in sorted({e.level for e in parts.eval_examples} - set(levels)):
                    other = evaluation.summarize_accuracy(
                        workdir, f"accuracy/level_{level}", plot=False
                    )
                    text = ", ".join(f"{k} {v:.3f}" for k, v in other.items())
                    print(f"Held-out accuracy on level {level}: {text}")
            sys.stdout.flush()


class _CompileCounter:
    """Counts every XLA compilation in the process (the one compile counter), so a step that
    recompiled shows up in the metrics."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_s: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


class _Writer:
    """Metrics to TensorBoard event files and a JSONL file (process 0 only)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        import tensorboardX

        self._tb = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
        self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            # TensorBoard's tag names have no '@' (pass@k); the JSONL keeps the names as they are.
            self._tb.add_scalar(k.replace("@", "_at_"), v, step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
