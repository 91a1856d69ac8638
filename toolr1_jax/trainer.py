"""`train(config, workdir)`: the Tool-R1 GRPO loop, readable top to bottom.

One step: choose questions (queue priorities) -> roll out each question's group (fresh episodes
plus replays from the dynamic sample queue) -> judge as groups finish -> update the queue ->
advantages -> one sharded GRPO update -> metrics, checkpoint, evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import pickle
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

TRUNCATED_STATUSES = ("max_turns", "max_tokens", "timeout")


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------


_PATH_KEYS = (
    ("model", "init_from"),
    ("model", "tokenizer"),
    ("data", "data_dir"),
    ("data", "manual_dir"),
    ("data", "eval_manual_dir"),
    ("ckpt", "resume_from"),
)


def expand_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with `~` expanded in every path key."""
    config = ml_collections.ConfigDict(config.to_dict())
    for group, key in _PATH_KEYS:
        value = config[group][key]
        if value:
            config[group][key] = os.path.expanduser(value)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that need no work done: fails before any model, data or sandbox is touched."""
    m = config.mesh
    try:
        sharding.make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as e:
        raise build.ConfigError(
            f"mesh.data={m.data}, mesh.fsdp={m.fsdp}, mesh.tensor={m.tensor}: {e}"
        ) from None
    if config.model.init_from and not os.path.isfile(
        os.path.join(config.model.init_from, "config.json")
    ):
        preset = config.model.preset
        repo = config.model.hf_repo
        hint = (
            f" Download it first, e.g. `huggingface-cli download {repo} --local-dir "
            f"{config.model.init_from}` (preset {preset!r})."
            if repo
            else ""
        )
        raise build.ConfigError(
            f"model.init_from={config.model.init_from!r} is not a Hugging Face model directory "
            f"(no config.json).{hint}"
        )
    if config.model.tokenizer and not os.path.isdir(config.model.tokenizer):
        raise build.ConfigError(f"model.tokenizer={config.model.tokenizer!r} is not a directory.")
    if (
        not config.model.init_from
        and not config.model.tokenizer
        and config.data.name != "synthetic"
    ):
        raise build.ConfigError(
            "Set model.init_from (a local Hugging Face checkpoint) or model.tokenizer: only "
            "the synthetic suite can train its own tokenizer for a from-scratch model."
        )
    for key in ("num_train", "num_eval"):
        if getattr(config.data, key) < 0:
            raise build.ConfigError(f"data.{key} must be >= 0, got {getattr(config.data, key)}.")
    g = config.grpo
    for key in ("questions_per_step", "group_size", "updates_per_batch"):
        if getattr(g, key) < 1:
            raise build.ConfigError(f"grpo.{key} must be >= 1, got {getattr(g, key)}.")
    if g.questions_per_step % jax.process_count():
        raise build.ConfigError(
            f"grpo.questions_per_step={g.questions_per_step} must be a multiple of the number "
            f"of processes ({jax.process_count()}): each rolls out an equal share."
        )
    batch = g.questions_per_step * g.group_size
    if batch % config.optim.num_microbatches:
        raise build.ConfigError(
            f"optim.num_microbatches={config.optim.num_microbatches} must divide the batch "
            f"grpo.questions_per_step * grpo.group_size = {batch}."
        )
    if config.agent.max_total_tokens > config.engine.max_len:
        raise build.ConfigError(
            f"agent.max_total_tokens={config.agent.max_total_tokens} exceeds "
            f"engine.max_len={config.engine.max_len}."
        )
    if config.queue.enabled and config.queue.max_replay >= g.group_size:
        raise build.ConfigError(
            f"queue.max_replay={config.queue.max_replay} must be below grpo.group_size="
            f"{g.group_size}: every group needs at least one fresh episode."
        )
    try:
        build.optimizer(config, config.total_steps)
    except ValueError as e:
        raise build.ConfigError(f"optim.* / total_steps: {e}") from None
    build.dtype(config)
    build.levels(config)
    build.agent_config(config)
    build.loss_config(config)
    build.reward_config(config)
    if config.reward.judge not in ("rule", "openai", "local"):
        raise build.ConfigError(
            f"reward.judge must be rule, openai or local, got {config.reward.judge!r}."
        )


def _tokenizer(config, workdir: pathlib.Path, train_examples, tools) -> tokenizer_lib.Tokenizer:
    path = config.model.tokenizer or config.model.init_from
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


class _CompileCounter:
    """Counts XLA compilations, so a step that recompiled shows up in the metrics."""

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
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def summarize_accuracy(workdir: pathlib.Path) -> dict[str, float]:
    """Eval accuracy before training, after SFT (step 0) and at the last eval, from the metrics
    file; draws `accuracy.png` (eval accuracy against step) beside it."""
    points, summary = {}, {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "eval_init/accuracy" in d:
            summary["untrained"] = d["eval_init/accuracy"]
        if "eval/accuracy" in d:
            points[d["step"]] = d["eval/accuracy"]
    if not points:
        return summary
    if 0 in points:
        summary["start"] = points[0]
    summary["final"] = points[max(points)]

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = sorted(points)
    ax.plot(steps, [points[k] for k in steps], marker="o", label="policy (step 0 = after SFT)")
    if "untrained" in summary:
        ax.axhline(summary["untrained"], color="gray", linestyle="--", label="untrained")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(workdir / "accuracy.png", dpi=100)
    plt.close(fig)
    return summary


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def make_batch(groups, *, num_rows: int, length: int, scale: bool, drop_truncated: bool):
    """Scored groups -> a fixed-shape `update.Batch` of host arrays.

    Rows of dropped groups and padding rows have an all-zero loss mask. Fixed shapes keep the
    update program compiled once.
    """
    tokens = np.zeros((num_rows, length), np.int32)
    attn = np.zeros((num_rows, length), bool)
    loss_mask = np.zeros((num_rows, length), np.float32)
    behaviour = np.zeros((num_rows, length), np.float32)
    advantages = np.zeros((num_rows,), np.float32)
    row = 0
    for trajs in groups:
        rewards = np.array([t.reward for t in trajs], np.float32)
        adv = np.asarray(grpo.group_advantages(jnp.asarray(rewards), len(trajs), scale=scale))
        for t, a in zip(trajs, adv, strict=True):
            n = min(len(t.tokens), length)
            tokens[row, :n] = t.tokens[:n]
            attn[row, :n] = True
            if not (drop_truncated and t.status in TRUNCATED_STATUSES):
                loss_mask[row, :n] = t.loss_mask[:n]
            behaviour[row, :n] = t.behaviour_logprobs[:n]
            advantages[row] = a
            row += 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (num_rows, length))
    batch = update.Batch(
        tokens=tokens,
        positions=np.ascontiguousarray(positions),
        attn_mask=attn,
        loss_mask=loss_mask,
        behaviour_logprobs=behaviour,
        advantages=advantages,
    )
    return batch


def _place(batch: update.Batch, mesh) -> update.Batch:
    """The global batch, built identically on every process, sharded over the batch axes; each
    process fills only the rows of its own devices (one process: a plain `device_put`)."""
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(update.BATCH_AXES))
    return jax.tree.map(lambda x: _from_host(x, spec), batch)


def _from_host(x, spec: jax.sharding.NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])


def _on_mesh(tree, mesh):
    """Leaves not yet on `mesh` (host values, single-device arrays) replicated over it.

    Every process holds the same value of such a leaf (the RNG key, the optimizer's step count,
    the host-replicated queue), so each can fill its devices' copies; as global arrays they can
    be checkpointed and passed to programs on the mesh from every process alike.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh:
            return x
        return _from_host(x, replicated)

    return jax.tree.map(put, tree)


# ---------------------------------------------------------------------------------------------
# Multi-host: every process rolls out its share of the step's questions on its own devices, then
# all processes exchange the scored groups, so the queue, the statistics and the batch are the
# same everywhere and the update is the single-process one.
# ---------------------------------------------------------------------------------------------


def _allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in process order.

    Scored groups are ragged host records (token arrays, turns, judge verdicts), so they travel
    pickled, as byte arrays padded to a power of two (few distinct shapes, few compiles). The
    bytes come only from this job's own processes.
    """
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    width = max(4096, 1 << int(sizes.max() - 1).bit_length())
    padded = np.zeros(width, np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))  # [processes, width]
    return [pickle.loads(rows[p, : sizes[p]].tobytes()) for p in range(jax.process_count())]


def _merge_stats(all_stats: list[rollout.RolloutStats]) -> rollout.RolloutStats:
    """One step's rollout statistics over all processes: counts add up; hosts run side by side,
    so wall-clock spans are the slowest host's (the sandbox time is a sum over runs already)."""
    merged = {}
    for f in dataclasses.fields(rollout.RolloutStats):
        values = [getattr(s, f.name) for s in all_stats]
        if f.name == "statuses":
            total: dict[str, int] = {}
            for v in values:
                for k, n in v.items():
                    total[k] = total.get(k, 0) + n
            merged[f.name] = total
        elif f.name in ("wall_s", "engine_s", "engine_idle_s"):
            merged[f.name] = max(values)
        else:
            merged[f.name] = sum(values)
    return rollout.RolloutStats(**merged)


class _EngineParams:
    """The trainer's params, copied onto this process's devices for its own engine.

    The engine runs on a mesh of this process's devices shaped like the training mesh (its
    'tensor' and 'fsdp' sizes where they fit, the rest 'data'). One program reshards the params
    onto a mesh with a copy of that local mesh per process; each process then takes its own
    shards, which form the params on its local mesh. With one process the engine shares the
    training mesh and the params as they are.
    """

    def __init__(self, params, mesh):
        self.num_processes = jax.process_count()
        if self.num_processes == 1:
            return
        n = jax.local_device_count()
        tensor = math.gcd(mesh.shape["tensor"], n)
        fsdp = math.gcd(mesh.shape["fsdp"], n // tensor)
        shape = (n // (tensor * fsdp), fsdp, tensor)
        per_process = [
            sorted((d for d in mesh.devices.flat if d.process_index == p), key=lambda d: d.id)
            for p in range(self.num_processes)
        ]
        grid = np.array(per_process, dtype=object).reshape((self.num_processes, *shape))
        auto = jax.sharding.AxisType.Auto
        replicas = jax.sharding.Mesh(grid, ("replica", *sharding.MESH_AXES), axis_types=(auto,) * 4)
        self.local_mesh = jax.sharding.Mesh(
            grid[jax.process_index()], sharding.MESH_AXES, axis_types=(auto,) * 3
        )
        self._local = sharding.param_shardings(params, self.local_mesh)
        self._replicas = jax.tree.map(
            lambda s: jax.sharding.NamedSharding(replicas, s.spec), self._local
        )
        self._reshard = jax.jit(lambda p: p, out_shardings=self._replicas)

    def __call__(self, params):
        if self.num_processes == 1:
            return params
        spread = self._reshard(params)

        def local(x, spec):
            shards = [s.data for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape, spec, shards)

        return jax.tree.map(local, spread, self._local)


# ---------------------------------------------------------------------------------------------
# The training function
# ---------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains the policy; returns the last step's metrics. Resumes from `workdir` if it holds a
    checkpoint, else from `ckpt.resume_from`, else from `model.init_from`, else from scratch."""
    config = expand_paths(config)
    validate(config)
    return asyncio.run(_train(config, pathlib.Path(workdir).expanduser().absolute()))


async def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, float]:
    # ----------------------------------------------------------------------------------------
    # Setup: mesh, logging.
    # ----------------------------------------------------------------------------------------
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = _Writer(workdir, is_main)
    g = config.grpo
    num_local_questions = g.questions_per_step // jax.process_count()

    # ----------------------------------------------------------------------------------------
    # Data: every process reads every training question and chooses the step's questions the
    # same way (one seeded order, one queue); each then rolls out its own slice of them.
    # ----------------------------------------------------------------------------------------
    # Processes sharing a data_dir must not prepare a dataset at once: process 0 prepares it
    # (when needed) before the others read it.
    if not is_main:
        sharding.sync_processes("data_prepared")
    train_examples = build.examples(config, config.data.train_split)
    eval_examples = build.examples(config, config.data.eval_split, for_eval=True)
    if is_main:
        sharding.sync_processes("data_prepared")
    if config.data.num_eval > 0:
        eval_examples = eval_examples[: config.data.num_eval]
    # GRPO's questions: the first data.num_train training examples (all when 0). A small pool is
    # revisited, which is where the queue's replay and learnability ordering act. SFT
    # demonstrations and the tokenizer draw on the whole split.
    questions = train_examples[: config.data.num_train or None]
    data_iter = pipeline.ExampleIterator(questions, seed=config.seed)
    index_of = {e.task_id: i for i, e in enumerate(questions)}
    tools = build.tools(config)

    # ----------------------------------------------------------------------------------------
    # Model, optimizer, queue; resume order: workdir > ckpt.resume_from > init_from > scratch.
    # ----------------------------------------------------------------------------------------
    tokenizer = _tokenizer(config, workdir, train_examples, tools)
    dtype = build.dtype(config)
    model_config = build.model_config(config, tokenizer.eos_token_ids)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise build.ConfigError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_config.vocab_size} (model.vocab_size / config.json)."
        )
    if config.model.init_from:
        model, _ = params_lib.load_pretrained(config.model.init_from, dtype=dtype, mesh=mesh)
    else:
        model = model_lib.Transformer(model_config, rngs=nnx.Rngs(config.seed), dtype=dtype)
        model = sharding.shard_model(model, mesh)
    graphdef, params = nnx.split(model)
    optimizer = build.optimizer(config, config.total_steps)
    opt_state = _on_mesh(optimizer.init(params), mesh)
    ref_params = jax.tree.map(jnp.copy, params) if g.beta > 0 else None
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
    rng = jax.random.key(config.seed)
    step, counters = 0, {"fresh_episodes": 0, "replayed_episodes": 0, "tokens": 0}

    ckpt = checkpoint.Checkpointer(
        str(workdir / "checkpoints"),
        max_to_keep=config.ckpt.max_to_keep,
        keep_steps=(0,) if config.sft.enabled and config.ckpt.keep_sft else (),
    )

    def ckpt_state():
        # Global arrays only: every process saves and restores its devices' part.
        return {
            "params": params,
            "opt_state": opt_state,
            "queue": _on_mesh(queue.state, mesh),
            "rng": _on_mesh(jax.random.key_data(rng), mesh),
        }

    def meta_state():
        return {
            "step": step,
            "data": data_iter.get_state(),
            "queue": queue.host_state(),
            "counters": counters,
        }

    restored = ckpt.restore_latest(ckpt_state())
    source = "workdir"
    if restored is None and config.ckpt.resume_from:
        restored = checkpoint.restore_from(config.ckpt.resume_from, ckpt_state())
        source = config.ckpt.resume_from
    if restored is not None:
        step, state, meta = restored
        params, opt_state = state["params"], state["opt_state"]
        queue.state = state["queue"] if jax.process_count() == 1 else jax.device_get(state["queue"])
        rng = jax.random.wrap_key_data(jax.device_get(state["rng"]))
        queue.load_host_state(meta["queue"])
        data_iter.set_state(meta["data"])
        counters = meta["counters"]
        log.info("Resumed from %s at step %d.", source, step)
    elif config.model.init_from:
        log.info("Starting from %s.", config.model.init_from)
    else:
        log.info("Starting from scratch (%s).", config.model.preset)
    if step >= config.total_steps:
        log.warning(
            "The checkpoint in %s is at step %d >= total_steps=%d: nothing to train. Raise "
            "total_steps to continue this run.",
            source,
            step,
            config.total_steps,
        )

    engine_params = _EngineParams(params, mesh)
    engine = engine_lib.Engine(
        nnx.merge(graphdef, engine_params(params)),
        num_slots=config.engine.num_slots,
        max_len=config.engine.max_len,
    )
    engine.warmup()  # compile every engine program now: steps after the first compile nothing
    train_step = update.make_train_step(
        graphdef,
        optimizer,
        build.loss_config(config),
        num_microbatches=config.optim.num_microbatches,
        mesh=mesh,
    )
    logprob_fn = update.make_logprob_fn(
        graphdef,
        build.loss_config(config),
        num_microbatches=config.optim.num_microbatches,
        mesh=mesh,
    )
    agent_config = build.agent_config(config)
    judge = build.judge(config)
    eval_judge = build.judge(config, for_eval=True)
    reward_config = build.reward_config(config)
    num_rows = g.questions_per_step * g.group_size
    first_local = jax.process_index() * num_local_questions

    # ----------------------------------------------------------------------------------------
    # The loop.
    # ----------------------------------------------------------------------------------------
    bar = tqdm.tqdm(
        total=config.total_steps,
        initial=step,
        desc="train",
        disable=not (is_main and config.log.progress_bar and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    metrics: dict[str, float] = {}
    compiles = _CompileCounter()

    async def evaluate(at_step: int, prefix: str) -> dict[str, float]:
        """Greedy episodes on the eval split, each process running its share; logged under
        `prefix/` and written to `prefix/step_N/`."""
        result = await evaluation.evaluate(
            eval_examples,
            engine=engine,
            tokenizer=tokenizer,
            pool=pool,
            tools=tools,
            agent_config=agent_config,
            sampling=build.sampling(config, seed=config.seed, for_eval=True),
            num_samples=config.log.num_eval_samples,
            judge=eval_judge,
            progress=False,
            policy_version=at_step,
            shard=(jax.process_index(), jax.process_count()),
        )
        if jax.process_count() > 1:
            log.info(
                "Evaluated %d of the %d questions on this process.",
                len(result.records) // result.num_samples,
                len(eval_examples),
            )
            result = evaluation.merge_shards(_allgather_objects(result))
        eval_metrics = {f"{prefix}/{k}": v for k, v in result.metrics.items()}
        writer.write(at_step, eval_metrics)
        if is_main:
            evaluation.write_outputs(result, str(workdir / prefix / f"step_{at_step}"))
        return eval_metrics

    async with build.sandbox_pool(config, tools) as pool:
        # --------------------------------------------------------------------------------------
        # Cold-start SFT on reference solutions (fresh runs only; a checkpoint at step 0 keeps a
        # resume from repeating it).
        # --------------------------------------------------------------------------------------
        if config.sft.enabled and restored is None:
            if config.log.eval_every_steps:
                await evaluate(0, "eval_init")
            t0 = time.perf_counter()
            demo_examples = [e for e in train_examples if e.metadata.get("solution")]
            demo_examples = demo_examples[: config.sft.num_demos]
            demos, skipped = await sft.demonstrations(
                demo_examples, tokenizer=tokenizer, pool=pool, agent_config=agent_config
            )
            if not demos:
                raise build.ConfigError(
                    f"sft.enabled: no usable demonstration among {len(demo_examples)} training "
                    f"examples (skipped: {skipped}); the dataset needs reference solutions."
                )
            sft_optimizer = update.make_optimizer(
                lr=config.sft.lr,
                warmup_steps=config.sft.warmup_steps,
                total_steps=config.sft.num_steps + 1,
                weight_decay=config.optim.weight_decay,
                max_grad_norm=config.optim.max_grad_norm,
            )
            params, _, history = sft.run_sft(
                demos,
                graphdef=graphdef,
                state=params,
                optimizer=sft_optimizer,
                opt_state=sft_optimizer.init(params),
                num_steps=config.sft.num_steps,
                batch_size=config.sft.batch_size,
                # Pad to the longest demonstration (not the episode budget): one compile, less
                # padding.
                max_len=min(
                    config.agent.max_total_tokens,
                    -(-max(len(d.tokens) for d in demos) // 64) * 64,
                ),
                seed=config.seed,
                mesh=mesh,
                num_microbatches=config.optim.num_microbatches,
            )
            engine.set_params(engine_params(params))
            opt_state = _on_mesh(optimizer.init(params), mesh)
            writer.write(
                0,
                {
                    "sft/loss_first": history[0]["loss"],
                    "sft/loss_last": history[-1]["loss"],
                    "sft/num_demos": float(len(demos)),
                    "sft/time_s": time.perf_counter() - t0,
                },
            )
            log.info(
                "SFT: %d steps on %d demonstrations (skipped %s), loss %.3f -> %.3f.",
                config.sft.num_steps,
                len(demos),
                skipped,
                history[0]["loss"],
                history[-1]["loss"],
            )
            if config.log.eval_every_steps:
                metrics.update(await evaluate(0, "eval"))
            ckpt.save(0, ckpt_state(), meta_state())

        while step < config.total_steps:
            t_step = time.perf_counter()
            compiles_before = compiles.count
            policy_version = step

            # Questions: with the queue, untried ones come from the data iterator in shuffled
            # order and tried ones are re-selected by learnability p(1 - p); without it, plain
            # passes over the data. Every process chooses the same questions and plans; this
            # one rolls out its slice. Group ids are positions in the step, so an episode's seed
            # (from its group id) does not depend on which process runs it.
            if config.queue.enabled:
                untried = (index_of[e.task_id] for e in data_iter)
                chosen = queue.select_questions(g.questions_per_step, untried=untried)
            else:
                chosen = [index_of[next(data_iter).task_id] for _ in range(g.questions_per_step)]
            plans = [queue.plan(i, g.group_size, policy_version) for i in chosen]
            requests = [
                rollout.GroupRequest(questions[chosen[gid]], plans[gid].num_fresh, gid)
                for gid in range(first_local, first_local + num_local_questions)
            ]

            # Rollout; each group is judged as soon as all its episodes have ended.
            scored: dict[int, Any] = {}
            t_judge = 0.0

            async def on_group(group: rollout.Group, plans=plans, scored=scored) -> None:
                nonlocal t_judge
                t0 = time.perf_counter()
                trajs = tuple(group.trajectories) + tuple(plans[group.group_id].replays)
                scored[group.group_id] = await reward_lib.score_group(
                    trajs,
                    question=group.example.question,
                    reference=group.example.answer,
                    judge=judge,
                    config=reward_config,
                )
                t_judge += time.perf_counter() - t0

            sampling = build.sampling(config, seed=(config.seed * 1_000_003 + step) % 2**32)
            stats = await rollout.rollout(
                requests,
                engine=engine,
                tokenizer=tokenizer,
                pool=pool,
                config=agent_config,
                sampling=sampling,
                policy_version=policy_version,
                on_group=on_group,
            )

            # Every process's scored groups and statistics, so that all update the same queue.
            gathered = _allgather_objects((scored, stats, t_judge))
            scored = {gid: result for part in gathered for gid, result in part[0].items()}
            stats = _merge_stats([part[1] for part in gathered])
            t_judge = max(part[2] for part in gathered)

            # Queue: record outcomes, cache good trajectories, restore signal in flat groups.
            groups, num_dropped, num_flat = [], 0, 0
            for gid, i in enumerate(chosen):
                result = scored[gid]
                if isinstance(result, reward_lib.DroppedGroup):
                    log.warning("Dropping group of %s: %s", result.task_id, result.reason)
                    num_dropped += 1
                    continue
                trajs = list(result)
                fresh = [t for t in trajs if not t.replayed]
                queue.update_stats(i, [t.reward_components.get("answer", 0.0) for t in fresh])
                queue.insert(i, fresh, policy_version)
                if len({t.reward for t in trajs}) == 1:
                    if config.queue.enabled and config.queue.restore_zero_variance:
                        trajs = queue.restore_signal(i, trajs, policy_version)
                    num_flat += len({t.reward for t in trajs}) == 1
                groups.append(trajs)

            # Update.
            t_update = time.perf_counter()
            batch = make_batch(
                groups,
                num_rows=num_rows,
                length=config.agent.max_total_tokens,
                scale=g.scale_advantages,
                drop_truncated=g.drop_truncated,
            )
            if g.updates_per_batch > 1:
                # Several optimizer steps per rollout batch: pi_prox is the policy before the
                # first of them, computed once (a single step uses its own stop-gradient logp).
                batch = batch.replace(prox_logprobs=np.zeros_like(batch.behaviour_logprobs))
                batch = _place(batch, mesh)
                batch = batch.replace(prox_logprobs=logprob_fn(params, batch))
            else:
                batch = _place(batch, mesh)
            for _ in range(g.updates_per_batch):
                params, opt_state, update_metrics = train_step(params, opt_state, batch, ref_params)
            engine.set_params(engine_params(params))
            update_metrics = {k: float(v) for k, v in jax.device_get(update_metrics).items()}
            t_update = time.perf_counter() - t_update
            step += 1

            # Metrics.
            all_trajs = [t for trajs in groups for t in trajs]
            fresh_trajs = [t for t in all_trajs if not t.replayed]
            rewards = np.array([t.reward for t in all_trajs] or [0.0])
            answers = np.array([t.reward_components.get("answer", 0.0) for t in fresh_trajs] or [0])
            counters["fresh_episodes"] += stats.num_episodes
            counters["replayed_episodes"] += len(all_trajs) - len(fresh_trajs)
            counters["tokens"] += stats.num_sampled_tokens
            wall = time.perf_counter() - t_step
            metrics = {
                "reward/mean": float(rewards.mean()),
                "reward/std": float(rewards.std()),
                "reward/accuracy": float((answers >= 1.0).mean()),
                "groups/zero_variance_share": num_flat / max(len(groups), 1),
                "groups/dropped": float(num_dropped),
                "agent/turns_per_episode": stats.num_turns / max(stats.num_episodes, 1),
                "agent/code_runs_per_episode": stats.num_code_runs / max(stats.num_episodes, 1),
                "agent/parse_error_rate": stats.num_format_errors / max(stats.num_turns, 1),
                "agent/answered_rate": stats.statuses.get("answered", 0)
                / max(stats.num_episodes, 1),
                "samples/fresh_total": float(counters["fresh_episodes"]),
                "samples/replayed_total": float(counters["replayed_episodes"]),
                "throughput/sampled_tokens_per_s": stats.num_sampled_tokens
                / max(stats.wall_s, 1e-9),
                "compiles": float(compiles.count - compiles_before),
                "time/step_s": wall,
                "time/rollout_s": stats.wall_s,
                "time/engine_s": stats.engine_s,
                "time/engine_idle_s": stats.engine_idle_s,
                "time/sandbox_s": stats.sandbox_s,
                "time/judge_s": t_judge,
                "time/update_s": t_update,
                **{f"update/{k}": v for k, v in update_metrics.items()},
            }
            if step % config.log.every_steps == 0 or step == config.total_steps:
                writer.write(step, metrics)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}"
            )

            # Checkpoint.
            if step % config.ckpt.every_steps == 0 or step == config.total_steps:
                ckpt.save(step, ckpt_state(), meta_state())

            # Evaluation.
            if config.log.eval_every_steps and (
                step % config.log.eval_every_steps == 0 or step == config.total_steps
            ):
                metrics.update(await evaluate(step, "eval"))
    bar.close()
    compiles.close()
    ckpt.close()
    writer.close()

    # ----------------------------------------------------------------------------------------
    # Export: a Hugging Face directory (weights, config, tokenizer) transformers loads as is.
    # ----------------------------------------------------------------------------------------
    if config.ckpt.export_hf:
        # Every process takes part (sharded params are gathered collectively); process 0 writes.
        export_dir = workdir / "export"
        params_lib.save_pretrained(nnx.merge(graphdef, params), model_config, str(export_dir))
        if is_main:
            tokenizer.hf.save_pretrained(str(export_dir))
            log.info("Exported the policy to %s.", export_dir)
    if is_main:
        summary = summarize_accuracy(workdir)
        if summary:
            text = ", ".join(f"{k} {v:.3f}" for k, v in summary.items())
            print(f"Held-out accuracy: {text} (plot: {workdir / 'accuracy.png'})", flush=True)
    with contextlib.suppress(Exception):
        await judge.aclose()
    return metrics
