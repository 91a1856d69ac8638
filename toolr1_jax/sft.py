"""Cold-start SFT: demonstrations played from reference solutions, and the masked-NLL update.

`demonstrations` runs each example's reference solution through a real sandbox session as the
assistant's turns and tokenizes the episode exactly as `agent.rollout` would; `run_sft` fits the
policy to the assistant tokens of those episodes with `update`'s step and SFT loss, and
`cold_start` is the trainer's stage that does both before GRPO starts.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from toolr1_jax import update
from toolr1_jax.agent import parse, prompt
from toolr1_jax.agent import rollout as rollout_lib
from toolr1_jax.data import types as data_types
from toolr1_jax.rewards import gaia_scorer

_log = logging.getLogger(__name__)

# The closing tag of the turn format the system prompt teaches; the engine stops on it.
CODE_CLOSE = "</code>"

# Why `demonstrations` left an example out (the keys of its returned counts).
SKIP_REASONS = (
    "no_solution",  # no metadata["solution"] (e.g. GAIA tasks)
    "format",  # thoughts do not match the turns, or a turn would not parse back to its code
    "too_many_turns",  # more turns than AgentConfig.max_turns allows
    "exec_error",  # a turn's code failed in the sandbox
    "wrong_answer",  # no final_answer, one before the last turn, or not the stored answer
    "too_long",  # a turn or the episode exceeds the agent's token budgets
)


def format_turn(thought: str, code: str) -> str:
    """One assistant turn in the format the system prompt shows (and the engine stops on)."""
    return f"Thought: {thought}\n<code>\n{code}\n{CODE_CLOSE}"


@dataclasses.dataclass(frozen=True)
class _Skip:
    reason: str
    detail: str


async def demonstrations(
    examples: Sequence[data_types.Example],
    *,
    tokenizer,
    pool,
    agent_config: rollout_lib.AgentConfig,
    max_open_sessions: int | None = None,
) -> tuple[list[data_types.Trajectory], dict[str, int]]:
    """Plays each example's reference solution as an episode; returns `(demos, skipped)`.

    The assistant's turns are `format_turn(thought, code)` for the example's
    `metadata["thoughts"]` and `metadata["solution"]`; each turn's code runs in one sandbox
    session of `pool` (with the example's files), so the observations are the real ones. Tokens
    are what a rollout holds for the same conversation: the prompt ids, each turn's ids, each
    observation's delta; `loss_mask` is 1 on the turns' ids only and `behaviour_logprobs` are 0.
    `skipped` counts the examples left out by reason (see `SKIP_REASONS`); `group_id` is the
    example's index in `examples`.

    Args:
      examples: tasks; those without a reference solution are skipped.
      tokenizer: `models.tokenizer.Tokenizer`.
      pool: a started `SandboxPool`; its tools and imports are what the system prompt shows.
      agent_config: the `AgentConfig` the policy will run under (prompt templates, observation
        size, max_turns, token budgets); demonstrations that would not fit it are skipped.
      max_open_sessions: sandbox sessions open at once (default: the pool's `num_workers`).
    """
    if CODE_CLOSE not in agent_config.stop_strings:
        raise ValueError(
            f"demonstrations write turns in the <code>...{CODE_CLOSE} format, but "
            f"AgentConfig.stop_strings {agent_config.stop_strings} does not include "
            f"{CODE_CLOSE!r}: the engine would not stop where the demonstrated turns end."
        )
    limit = pool.num_workers if max_open_sessions is None else max_open_sessions
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_open_sessions must be an integer >= 1, got {limit!r}")
    system_prompt = prompt.render_system_prompt(
        agent_config.system_prompt_template, pool.tools, pool.authorized_imports
    )
    sessions = asyncio.Semaphore(limit)

    async def one(index, example):
        turns = _turn_texts(example, agent_config)
        if isinstance(turns, _Skip):
            return turns
        async with sessions:
            return await _play(index, example, turns, system_prompt, tokenizer, pool, agent_config)

    results = await asyncio.gather(*(one(i, e) for i, e in enumerate(examples)))
    demos = [r for r in results if isinstance(r, data_types.Trajectory)]
    skipped = collections.Counter()
    for example, r in zip(examples, results, strict=True):
        if isinstance(r, _Skip):
            skipped[r.reason] += 1
            if r.reason != "no_solution":
                _log.info("no demonstration of %s (%s): %s", example.task_id, r.reason, r.detail)
    return demos, dict(skipped)


def _turn_texts(example, config) -> list[tuple[str, str]] | _Skip:
    """(turn text, code the rollout would run) per turn, or why there is no demonstration."""
    solution = example.metadata.get("solution")
    if not solution:
        return _Skip("no_solution", "")
    thoughts = example.metadata.get("thoughts")
    if thoughts is None or len(thoughts) != len(solution):
        return _Skip("format", f"{len(solution)} solution turns but thoughts {thoughts!r}")
    if len(solution) > config.max_turns:
        return _Skip("too_many_turns", f"{len(solution)} turns > max_turns {config.max_turns}")
    turns = []
    for thought, code in zip(thoughts, solution, strict=True):
        text = format_turn(thought, code)
        # The engine stops at the first stop string, so one inside the turn would cut it there.
        body = text[: -len(CODE_CLOSE)]
        if any(s in body for s in config.stop_strings):
            return _Skip("format", f"a stop string occurs inside the turn {text!r}")
        parsed = parse.parse_turn(text, accept_text_answer=config.accept_text_answer)
        if parsed.code is None:
            return _Skip("format", f"the turn {text!r} parses to no code")
        turns.append((text, parsed.code))
    return turns


async def _play(index, example, turns, system_prompt, tokenizer, pool, config):
    """One episode with scripted turns; the bookkeeping mirrors `rollout._Rollout`."""
    task = prompt.render_task(config.task_template, example.question, example.files)
    tokens = list(tokenizer.prompt_ids(prompt.build_messages(system_prompt, task)))
    prompt_len = len(tokens)
    loss_mask = [0] * prompt_len
    if prompt_len >= config.max_total_tokens:
        return _Skip("too_long", f"the prompt has {prompt_len} tokens")
    records = []
    final_answer = None
    session = await pool.open(files=dict(example.files))
    try:
        for k, (text, code) in enumerate(turns):
            ids = tokenizer.encode(text)
            # The sampling budget a rollout gives this turn; a longer turn ends in "max_tokens".
            budget = min(config.max_new_tokens_per_turn, config.max_total_tokens - len(tokens))
            if len(ids) > budget:
                return _Skip("too_long", f"turn {k} has {len(ids)} tokens, budget {budget}")
            tokens += ids
            loss_mask += [1] * len(ids)
            result = await session.run(code)
            if result.status != "ok":
                return _Skip("exec_error", f"turn {k}: {result.status}: {result.error}")
            last = k == len(turns) - 1
            if result.final_answer is not None or last:
                if not last or not gaia_scorer.question_scorer(result.final_answer, example.answer):
                    return _Skip(
                        "wrong_answer",
                        f"turn {k}/{len(turns)} answered {result.final_answer!r}, "
                        f"expected {example.answer!r}",
                    )
                records.append(data_types.Turn(text, code, "", "ok", result.duration_s))
                final_answer = result.final_answer
                break
            observation = prompt.render_observation(
                result.observation(config.observation_max_chars)
            )
            delta = tokenizer.turn_delta_ids(config.observation_role, observation)
            # A rollout needs room for the delta plus at least one sampled token.
            if len(tokens) + len(delta) >= config.max_total_tokens:
                return _Skip("too_long", f"the observation after turn {k} fills the budget")
            tokens += delta
            loss_mask += [0] * len(delta)
            records.append(data_types.Turn(text, code, observation, "ok", result.duration_s))
    finally:
        await session.close()
    return data_types.Trajectory(
        task_id=example.task_id,
        group_id=index,
        tokens=np.asarray(tokens, np.int32),
        loss_mask=np.asarray(loss_mask, np.int32),
        behaviour_logprobs=np.zeros(len(tokens), np.float32),
        prompt_len=prompt_len,
        policy_version=0,
        turns=tuple(records),
        final_answer=final_answer,
        status="answered",
    )


# ---------------------------------------------------------------------------------------------
# The driver: `update`'s one step builder with its SFT loss
# ---------------------------------------------------------------------------------------------


def _shuffled(n: int, seed: int) -> Iterator[int]:
    """Indices 0..n-1 in a fresh seeded permutation per epoch, endlessly."""
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.permutation(n).tolist()


def run_sft(
    demos: Sequence[data_types.Trajectory],
    *,
    graphdef,
    state,
    optimizer: optax.GradientTransformation,
    opt_state,
    num_steps: int,
    batch_size: int,
    max_len: int,
    seed: int,
    mesh=None,
    num_microbatches: int = 1,
    chunk_size: int = 256,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[nnx.State, optax.OptState, list[dict[str, float]]]:
    """Runs `num_steps` SFT updates on `demos`; returns `(state, opt_state, metrics_history)`.

    Batches take `batch_size` demonstrations at a time from a seeded shuffle (reshuffled each
    epoch; a batch may repeat one when there are fewer demonstrations than rows), padded to
    `[batch_size, max_len]` so the step compiles once. `state` and `opt_state` are donated.
    Each step's metrics (see `update.SFTLoss`, plus `step_s`, its wall time with the metrics on
    the host) go to the history and to `on_metrics(step, metrics)`; a non-finite loss or
    gradient norm raises `update.NonFiniteError`. Every process of a multi-host run must pass
    the same demonstrations and seed.
    """
    if not demos:
        raise ValueError("run_sft needs at least one demonstration.")
    longest = max(demos, key=lambda t: len(t.tokens))
    if len(longest.tokens) > max_len:
        raise ValueError(
            f"Demonstration {longest.task_id} has {len(longest.tokens)} tokens, more than "
            f"max_len {max_len}."
        )
    if not any(t.loss_mask.any() for t in demos):
        raise ValueError("No demonstration has a loss token (loss_mask is 0 everywhere).")
    step_fn = update.make_train_step(
        graphdef,
        optimizer,
        update.SFT_LOSS,
        num_microbatches=num_microbatches,
        mesh=mesh,
        chunk_size=chunk_size,
    )
    order = _shuffled(len(demos), seed)
    history = []
    for step in range(num_steps):
        rows = [demos[next(order)] for _ in range(batch_size)]
        batch = update.make_batch(rows, batch_size=batch_size, max_len=max_len)
        t0 = time.perf_counter()
        state, opt_state, metrics = step_fn(state, opt_state, batch)
        # Host-device sync: the step's metrics come back (and with them the step is done).
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["step_s"] = time.perf_counter() - t0
        update.check_finite(metrics, where=f"SFT step {step}", last_good="none (SFT runs first)")
        history.append(metrics)
        if on_metrics is not None:
            on_metrics(step, metrics)
    return state, opt_state, history


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The cold-start stage's settings (`build.sft_config`)."""

    num_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    num_microbatches: int
    seed: int


def make_optimizer(config: SFTConfig) -> optax.GradientTransformation:
    """The stage's own optimizer (GRPO starts with a fresh one)."""
    return update.make_optimizer(
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        total_steps=config.num_steps + 1,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )


def demo_examples(
    examples: Sequence[data_types.Example], levels: Sequence[int], num_demos: int
) -> list[data_types.Example]:
    """The examples whose reference solutions the cold start plays: the first `num_demos` that
    have one, of `levels` (every level when empty). The trainer keeps them out of GRPO's
    questions."""
    levels = set(levels)
    return [
        e for e in examples if e.metadata.get("solution") and (not levels or e.level in levels)
    ][:num_demos]


async def cold_start(
    chosen: Sequence[data_types.Example],
    config: SFTConfig,
    *,
    tokenizer,
    pool,
    agent_config: rollout_lib.AgentConfig,
    graphdef,
    state,
    mesh,
) -> tuple[nnx.State, dict[str, float]]:
    """The trainer's SFT stage: plays the reference solutions of `chosen` (`demo_examples`),
    fits the policy to them with a fresh optimizer, and returns the new params (`state` is
    donated) with the stage's metrics (`sft/*`)."""
    t0 = time.perf_counter()
    demos, skipped = await demonstrations(
        chosen, tokenizer=tokenizer, pool=pool, agent_config=agent_config
    )
    if not demos:
        raise ValueError(
            f"sft.enabled: no usable demonstration among {len(chosen)} training examples "
            f"(skipped: {skipped}); the dataset needs reference solutions."
        )
    optimizer = make_optimizer(config)
    state, _, history = run_sft(
        demos,
        graphdef=graphdef,
        state=state,
        optimizer=optimizer,
        opt_state=optimizer.init(state),
        num_steps=config.num_steps,
        batch_size=config.batch_size,
        # Pad to the longest demonstration rounded up to 64 (not the episode budget): one
        # compile, less padding.
        max_len=min(
            agent_config.max_total_tokens, -(-max(len(d.tokens) for d in demos) // 64) * 64
        ),
        seed=config.seed,
        mesh=mesh,
        num_microbatches=config.num_microbatches,
        on_metrics=lambda step, m: _log.info(
            "SFT step %d/%d: loss %.3f, %.1f s.", step + 1, config.num_steps, m["loss"], m["step_s"]
        ),
    )
    _log.info(
        "SFT: %d steps on %d demonstrations (skipped %s), loss %.3f -> %.3f.",
        config.num_steps,
        len(demos),
        skipped,
        history[0]["loss"],
        history[-1]["loss"],
    )
    metrics = {
        "sft/loss_first": history[0]["loss"],
        "sft/loss_last": history[-1]["loss"],
        "sft/num_demos": float(len(demos)),
        "sft/time_s": time.perf_counter() - t0,
    }
    return state, metrics
