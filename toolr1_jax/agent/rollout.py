"""Code-agent episodes over the engine and the sandbox, many at once (DESIGN sections 3, 4, 7).

One asyncio loop drives everything. The engine runs in one worker thread (JAX releases the GIL),
one decode chunk per call; between chunks the loop reads the slots that stopped at `</code>`, sends
their code to the sandbox as tasks on the loop, and queues the observation of every finished run as
a token delta for that slot. Slots whose episode waits on a tool simply sit out the chunks, so a
slow tool never delays anyone else's decoding. Episodes beyond the slot count wait in a queue.
On an engine with more slots than decode rows (`engine.decode_rows` in the config), a waiting
episode keeps its cache in its slot without taking a decode row: give it a slot per concurrent
episode and the rows the device batches well, and decoding goes on while tools run.

Token-in/token-out: an episode's tokens are the prompt, then each turn exactly as sampled, then each
observation's delta exactly as appended; nothing is re-rendered.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from toolr1_jax import engine as engine_lib
from toolr1_jax.agent import parse, prompt
from toolr1_jax.data import types as data_types

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """How episodes run; the trainer maps `config.agent` onto this.

    max_total_tokens bounds a whole episode (prompt included) and must fit the engine's max_len.
    A turn that reaches max_new_tokens_per_turn ends the episode ("max_tokens"): with the stop
    at `</code>`, a turn that long is runaway text, not a step.
    """

    system_prompt_template: str = prompt.DEFAULT_SYSTEM_PROMPT_TEMPLATE
    task_template: str = prompt.DEFAULT_TASK_TEMPLATE
    format_error_observation: str = parse.FORMAT_ERROR_OBSERVATION
    max_turns: int = 8
    max_total_tokens: int = 8192
    max_new_tokens_per_turn: int = 1024
    observation_max_chars: int = 4000
    episode_timeout_s: float = 600.0
    stop_strings: tuple[str, ...] = ("</code>",)
    observation_role: str = "user"
    accept_text_answer: bool = True  # a "FINAL ANSWER: x" line without code ends the episode
    decode_chunk_steps: int = 16  # decode steps per engine call: stop-handling latency vs overhead
    # The baseline (config agent.lockstep; bench_rollout.py): every turn waits until all live
    # episodes' tools are done.
    lockstep: bool = False

    def __post_init__(self):
        for name in ("max_turns", "max_total_tokens", "max_new_tokens_per_turn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AgentConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.decode_chunk_steps, int) or self.decode_chunk_steps < 1:
            raise ValueError(
                f"AgentConfig.decode_chunk_steps must be an integer >= 1, "
                f"got {self.decode_chunk_steps!r}"
            )
        if self.observation_max_chars < 100:
            raise ValueError(
                "AgentConfig.observation_max_chars must be >= 100 (the sandbox's minimum), "
                f"got {self.observation_max_chars}"
            )
        if not self.episode_timeout_s > 0:
            raise ValueError(
                f"AgentConfig.episode_timeout_s must be > 0, got {self.episode_timeout_s!r}"
            )
        if isinstance(self.stop_strings, str) or not all(
            isinstance(s, str) and s for s in self.stop_strings
        ):
            raise ValueError(
                "AgentConfig.stop_strings must be a tuple of non-empty strings, "
                f"got {self.stop_strings!r}"
            )
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        # Fail at config time, not in the middle of a rollout.
        prompt.render_task(self.task_template, "q")
        prompt.render_system_prompt(self.system_prompt_template, (), ())


@dataclasses.dataclass(frozen=True)
class GroupRequest:
    """Run `num_episodes` fresh episodes of `example`; they form group `group_id`."""

    example: data_types.Example
    num_episodes: int
    group_id: int

    def __post_init__(self):
        if not isinstance(self.num_episodes, int) or self.num_episodes < 0:
            raise ValueError(
                f"GroupRequest {self.example.task_id}: num_episodes must be an integer >= 0, "
                f"got {self.num_episodes!r}"
            )


@dataclasses.dataclass(frozen=True)
class Group:
    """The fresh episodes of one request, in episode order, handed on once all have ended."""

    group_id: int
    example: data_types.Example
    trajectories: tuple[data_types.Trajectory, ...]


@dataclasses.dataclass(frozen=True)
class RolloutStats:
    """Where the time went, for logging. `engine_s` is prefill + decode on the engine thread;
    `engine_idle_s` is wall time when no episode could decode because all waited on tools."""

    wall_s: float
    engine_s: float
    engine_idle_s: float
    sandbox_s: float  # summed over runs: time from sending code to getting its result
    num_engine_calls: int
    num_episodes: int
    num_turns: int
    num_code_runs: int
    num_format_errors: int
    num_sampled_tokens: int
    num_appended_tokens: int
    statuses: dict[str, int]

    @classmethod
    def merge(cls, all_stats: Sequence[RolloutStats]) -> RolloutStats:
        """One step's statistics over all processes: counts add up; hosts run side by side, so
        wall-clock spans are the slowest host's (the sandbox time is a sum over runs already)."""
        merged = {}
        for f in dataclasses.fields(cls):
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
        return cls(**merged)


def _episode_seed(base: int, group_id: int, index: int) -> int:
    # Episodes of one group share a prompt; distinct seeds make them distinct samples.
    return int(np.random.SeedSequence([base, group_id & 0xFFFFFFFF, index]).generate_state(1)[0])


class _GroupState:
    def __init__(self, request: GroupRequest, prompt_ids: list[int]):
        self.request = request
        self.prompt_ids = prompt_ids
        self.trajectories: list[data_types.Trajectory | None] = [None] * request.num_episodes
        self.remaining = request.num_episodes


class _Episode:
    """Mutable host state of one episode (the frozen `Trajectory` is built when it ends).

    `phase` is where it stands: "queued" (no slot yet), "decoding" (in the engine), "tool" (its
    code runs; the slot keeps its cache), "ready" (an observation delta waits to be appended to
    its slot), "done".
    """

    def __init__(self, group: _GroupState, index: int, sampling: engine_lib.SamplingParams):
        self.group = group
        self.index = index
        self.sampling = sampling  # per-turn budget filled in before each add/append
        self.tokens: list[int] = list(group.prompt_ids)
        self.loss_mask: list[int] = [0] * len(self.tokens)
        self.logprobs: list[float] = [0.0] * len(self.tokens)
        self.turns: list[data_types.Turn] = []
        self.slot: int | None = None
        self.session = None
        self.deadline = math.inf
        self.ran_code = False
        self.pending: list[int] | None = None  # observation delta waiting to be appended
        self.phase = "queued"


async def rollout(
    requests: Sequence[GroupRequest | tuple],
    *,
    engine: engine_lib.Engine,
    tokenizer,
    pool,
    config: AgentConfig,
    sampling: engine_lib.SamplingParams,
    policy_version: int,
    on_group: Callable[[Group], Any],
) -> RolloutStats:
    """Runs every requested episode and hands each group to `on_group` as soon as it completes.

    Args:
      requests: `GroupRequest`s or `(example, num_episodes, group_id)` tuples.
      engine: an idle `Engine`; its slot count bounds how many episodes are live at once.
      tokenizer: `models.tokenizer.Tokenizer` (chat template, turn deltas).
      pool: a started `SandboxPool`; its tools and authorized imports are what the prompt shows.
      config: `AgentConfig`.
      sampling: temperature, top-p, top-k and base seed; each episode gets its own seed,
        `max_new_tokens` is set per turn, and the stop strings are `config.stop_strings`, matched
        on text by the engine (`stop_token_ids` are kept, with the tokenizer's end-of-turn ids
        added). An engine built without `detokenize` gets the tokenizer's `decode`, the one
        that turns are parsed with.
      policy_version: stored in every trajectory (the queue's staleness checks use it).
      on_group: called on the event loop with each complete `Group`. If it returns an awaitable,
        that runs as a task (rewards can be judged while other groups still decode) and is
        awaited before `rollout` returns.

    An episode ends with status "answered" (final_answer ran, or a "FINAL ANSWER:" line),
    "max_turns", "max_tokens" (a turn hit its budget, or the episode its total), "timeout" (wall
    time since it got a slot), "sandbox_error" (the sandbox itself failed), or "parse_error"
    (ran out of turns without ever producing code). An episode cut by its time limit while
    decoding keeps the tokens of its completed turns.
    """
    requests = [r if isinstance(r, GroupRequest) else GroupRequest(*r) for r in requests]
    ids = [r.group_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError(f"group ids must be unique within a rollout, got {ids}")
    if config.max_total_tokens > engine.max_len:
        raise ValueError(
            f"AgentConfig.max_total_tokens ({config.max_total_tokens}) exceeds the engine's "
            f"max_len ({engine.max_len}); an episode could not fit its slot."
        )
    if engine.num_free_slots != engine.num_slots:
        raise RuntimeError("rollout needs an idle engine, but some of its slots are live")
    run = _Rollout(engine, tokenizer, pool, config, sampling, policy_version, on_group)
    return await run.run(requests)


class _Rollout:
    def __init__(self, engine, tokenizer, pool, config, sampling, policy_version, on_group):
        self.engine = engine
        self.tokenizer = tokenizer
        self.pool = pool
        self.config = config
        self.policy_version = policy_version
        self.on_group = on_group
        self.system_prompt = prompt.render_system_prompt(
            config.system_prompt_template, pool.tools, pool.authorized_imports
        )
        stop_ids = tuple(dict.fromkeys((*sampling.stop_token_ids, *tokenizer.eos_token_ids)))
        self.end_of_turn_ids = frozenset(tokenizer.eos_token_ids)
        # Stop strings are matched on the text the turn is parsed from, however the model
        # happened to tokenize them, and any number of them fit.
        if engine.detokenize is None:
            engine.detokenize = tokenizer.decode
        self.base_sampling = dataclasses.replace(
            sampling, stop_token_ids=stop_ids, stop_strings=config.stop_strings
        )
        self.by_slot: dict[int, _Episode] = {}  # the episode holding each engine slot
        self.releases: list[int] = []
        self.num_unfinished = 0
        self.tool_tasks: set[asyncio.Task] = set()
        self.close_tasks: set[asyncio.Task] = set()
        self.group_tasks: set[asyncio.Task] = set()
        self.wake = asyncio.Event()
        self.held_slots: set[int] = set()  # engine slots this rollout has added and not released
        self.episodes: list[_Episode] = []
        self.error: BaseException | None = None  # raised by a tool task, re-raised by the driver
        self.counts = collections.Counter()
        self.times = collections.Counter()

    # -- the driver -------------------------------------------------------------------------------

    async def run(self, requests: list[GroupRequest]) -> RolloutStats:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        groups = []
        for r in requests:
            task = prompt.render_task(
                self.config.task_template, r.example.question, r.example.files
            )
            prompt_ids = list(
                self.tokenizer.prompt_ids(prompt.build_messages(self.system_prompt, task))
            )
            groups.append(_GroupState(r, prompt_ids))
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        try:
            for g in groups:
                if g.remaining == 0:
                    self._hand_on(g)
                for i in range(g.request.num_episodes):
                    seed = _episode_seed(self.base_sampling.seed, g.request.group_id, i)
                    ep = _Episode(g, i, dataclasses.replace(self.base_sampling, seed=seed))
                    self.episodes.append(ep)
                    self.num_unfinished += 1
                    if len(ep.tokens) >= self.config.max_total_tokens:
                        self._finish(ep, "max_tokens")  # the prompt alone fills the budget
            while self.num_unfinished:
                await self._iteration(loop, executor)
                if self.error is not None:
                    raise self.error
            if self.group_tasks:
                await asyncio.gather(*self.group_tasks)
        finally:
            for t in self.tool_tasks:
                t.cancel()
            await asyncio.gather(*self.tool_tasks, return_exceptions=True)
            held = sorted(self.held_slots)
            await loop.run_in_executor(executor, self._engine_call, held, [], [], False)
            executor.shutdown(wait=True)
            for ep in self.episodes:  # only after an error are there unfinished episodes
                if ep.phase != "done" and ep.session is not None:
                    self.close_tasks.add(asyncio.create_task(ep.session.close()))
            for r in await asyncio.gather(*self.close_tasks, return_exceptions=True):
                if isinstance(r, BaseException):
                    _log.warning("a sandbox session failed to close: %r", r)
        c, t = self.counts, self.times
        return RolloutStats(
            wall_s=time.perf_counter() - start,
            engine_s=t["engine"],
            engine_idle_s=t["idle"],
            sandbox_s=t["sandbox"],
            num_engine_calls=c["engine_calls"],
            num_episodes=sum(g.request.num_episodes for g in groups),
            num_turns=c["turns"],
            num_code_runs=c["code_runs"],
            num_format_errors=c["format_errors"],
            num_sampled_tokens=c["sampled_tokens"],
            num_appended_tokens=c["appended_tokens"],
            statuses={k[7:]: v for k, v in c.items() if k.startswith("status_")},
        )

    async def _iteration(self, loop, executor) -> None:
        decoding = any(ep.phase == "decoding" for ep in self.by_slot.values())
        barrier = not self.config.lockstep or (not decoding and not self.tool_tasks)
        appends, adds = [], []
        if barrier:
            free = self.engine.num_slots - len(self.by_slot)
            for ep in self.episodes:  # in request order: the first queued get the free slots
                if ep.phase == "ready":
                    appends.append((ep, ep.pending, self._turn_sampling(ep, len(ep.pending))))
                elif ep.phase == "queued" and len(adds) < free:
                    ep.deadline = time.perf_counter() + self.config.episode_timeout_s
                    adds.append((ep, ep.tokens, self._turn_sampling(ep, 0)))
        for ep, delta, _ in appends:
            self._commit_delta(ep, delta)
            ep.phase = "decoding"
        for ep, _, _ in adds:
            ep.phase = "decoding"
        if not (appends or adds or decoding):
            # Nothing can decode: every live episode waits on a tool. Sleep until one is back.
            t0 = time.perf_counter()
            self.wake.clear()
            await self.wake.wait()
            self.times["idle"] += time.perf_counter() - t0
            return
        releases, self.releases = self.releases, []
        t0 = time.perf_counter()
        slots, outputs = await loop.run_in_executor(
            executor,
            self._engine_call,
            releases,
            [(ep.slot, delta, sp) for ep, delta, sp in appends],
            [(tokens, sp) for _, tokens, sp in adds],
        )
        self.times["engine"] += time.perf_counter() - t0
        self.counts["engine_calls"] += 1
        self.held_slots.difference_update(releases)
        for (ep, _, _), slot in zip(adds, slots, strict=True):
            ep.slot = slot
            self.held_slots.add(slot)
            self.by_slot[slot] = ep
        for out in outputs:
            self._on_turn(self.by_slot[out.slot], out)
        now = time.perf_counter()
        for ep in list(self.by_slot.values()):
            if ep.phase == "decoding" and now > ep.deadline:
                self._finish(ep, "timeout")

    def _engine_call(self, releases, appends, adds, decode=True):
        """Runs on the engine thread: every engine call happens here, one at a time."""
        for slot in releases:
            self.engine.release(slot)
        for slot, tokens, sp in appends:
            self.engine.append(slot, tokens, sp)
        slots = [self.engine.add(tokens, sp) for tokens, sp in adds]
        if not decode:
            return slots, []
        return slots, self.engine.step(self.config.decode_chunk_steps)

    def _turn_sampling(self, ep: _Episode, num_new: int) -> engine_lib.SamplingParams:
        room = self.config.max_total_tokens - len(ep.tokens) - num_new
        budget = min(self.config.max_new_tokens_per_turn, room)
        return dataclasses.replace(ep.sampling, max_new_tokens=budget)

    def _commit_delta(self, ep: _Episode, delta: list[int]) -> None:
        ep.tokens += delta
        ep.loss_mask += [0] * len(delta)
        ep.logprobs += [0.0] * len(delta)
        ep.pending = None
        self.counts["appended_tokens"] += len(delta)

    # -- one turn ---------------------------------------------------------------------------------

    def _on_turn(self, ep: _Episode, out: engine_lib.SlotOutput) -> None:
        generated = out.tokens.tolist()
        ep.tokens += generated
        ep.loss_mask += [1] * len(generated)
        ep.logprobs += out.logprobs.astype(np.float32).tolist()
        self.counts["turns"] += 1
        self.counts["sampled_tokens"] += len(generated)
        # The text without the end-of-turn id the model may have closed with.
        n = len(generated)
        while n and generated[n - 1] in self.end_of_turn_ids:
            n -= 1
        text = self.tokenizer.decode(generated[:n])
        parsed = parse.parse_turn(text, accept_text_answer=self.config.accept_text_answer)
        if out.finish_reason == "length":
            ep.turns.append(data_types.Turn(text, parsed.code, "", None))
            self._finish(ep, "max_tokens")
        elif parsed.code is not None:
            ep.ran_code = True
            ep.phase = "tool"
            self.counts["code_runs"] += 1
            task = asyncio.create_task(self._run_code(ep, text, parsed.code))
            self.tool_tasks.add(task)
            task.add_done_callback(self._tool_done)
        elif parsed.text_answer is not None:
            ep.turns.append(data_types.Turn(text, None, "", None))
            self._finish(ep, "answered", final_answer=parsed.text_answer)
        else:
            self.counts["format_errors"] += 1
            self._observe(ep, text, None, "parse_error", self.config.format_error_observation, 0.0)

    def _tool_done(self, task: asyncio.Task) -> None:
        self.tool_tasks.discard(task)
        self.wake.set()
        if not task.cancelled() and task.exception() is not None and self.error is None:
            # A bug (or an on_group error) in a tool task must not hang the rollout.
            self.error = task.exception()

    async def _run_code(self, ep: _Episode, text: str, code: str) -> None:
        t0 = time.perf_counter()
        try:
            remaining = ep.deadline - t0
            result = await asyncio.wait_for(self._exec(ep, code), max(remaining, 0.0))
        except asyncio.TimeoutError:
            ep.turns.append(data_types.Turn(text, code, "", "timeout", time.perf_counter() - t0))
            self._finish(ep, "timeout")
            return
        except Exception as e:  # the sandbox itself failed, not the program
            ep.turns.append(data_types.Turn(text, code, "", "crashed", time.perf_counter() - t0))
            _log.warning(
                "sandbox failure in episode %s/%d: %r",
                ep.group.request.example.task_id,
                ep.index,
                e,
            )
            self._finish(ep, "sandbox_error")
            return
        finally:
            self.times["sandbox"] += time.perf_counter() - t0
        if result.final_answer is not None:
            ep.turns.append(data_types.Turn(text, code, "", result.status, result.duration_s))
            self._finish(ep, "answered", final_answer=result.final_answer)
            return
        body = result.observation(self.config.observation_max_chars)
        self._observe(ep, text, code, result.status, body, result.duration_s)

    async def _exec(self, ep: _Episode, code: str):
        if ep.session is None:
            ep.session = await self.pool.open(files=dict(ep.group.request.example.files))
        return await ep.session.run(code)

    def _observe(self, ep, text, code, exec_status, body, duration_s) -> None:
        """Ends the turn with an observation, unless a limit ends the episode first."""
        if len(ep.turns) + 1 >= self.config.max_turns:
            ep.turns.append(data_types.Turn(text, code, "", exec_status, duration_s))
            self._finish(ep, "max_turns" if ep.ran_code else "parse_error")
            return
        observation = prompt.render_observation(body)
        delta = self._delta(ep, observation)
        # Room for the delta plus at least one sampled token.
        if len(ep.tokens) + len(delta) >= self.config.max_total_tokens:
            ep.turns.append(data_types.Turn(text, code, "", exec_status, duration_s))
            self._finish(ep, "max_tokens")
            return
        ep.turns.append(data_types.Turn(text, code, observation, exec_status, duration_s))
        ep.pending = delta
        ep.phase = "ready"  # its slot waited with its cache; the delta is appended there
        self.wake.set()

    def _delta(self, ep: _Episode, observation: str) -> list[int]:
        delta = list(self.tokenizer.turn_delta_ids(self.config.observation_role, observation))
        # The delta opens by closing the assistant turn; if the model closed it itself (it
        # stopped on an end-of-turn id), those closing tokens are already in the sequence.
        if ep.tokens and ep.tokens[-1] in self.end_of_turn_ids:
            for k in range(min(len(delta), len(ep.tokens)), 0, -1):
                if ep.tokens[-k:] == delta[:k]:
                    return delta[k:]
        return delta

    # -- the end ----------------------------------------------------------------------------------

    def _finish(self, ep: _Episode, status: str, final_answer: str | None = None):
        if ep.phase == "done":
            return
        ep.phase = "done"
        self.num_unfinished -= 1
        self.counts["status_" + status] += 1
        if ep.slot is not None:
            self.releases.append(ep.slot)
            del self.by_slot[ep.slot]
            ep.slot = None
        if ep.session is not None:
            self.close_tasks.add(asyncio.create_task(ep.session.close()))
        g = ep.group
        g.trajectories[ep.index] = data_types.Trajectory(
            task_id=g.request.example.task_id,
            group_id=g.request.group_id,
            tokens=np.asarray(ep.tokens, np.int32),
            loss_mask=np.asarray(ep.loss_mask, np.int32),
            behaviour_logprobs=np.asarray(ep.logprobs, np.float32),
            prompt_len=len(g.prompt_ids),
            policy_version=self.policy_version,
            turns=tuple(ep.turns),
            final_answer=final_answer,
            status=status,
        )
        g.remaining -= 1
        if g.remaining == 0:
            self._hand_on(g)
        self.wake.set()

    def _hand_on(self, g: _GroupState) -> None:
        group = Group(g.request.group_id, g.request.example, tuple(g.trajectories))
        result = self.on_group(group)
        if inspect.isawaitable(result):
            self.group_tasks.add(asyncio.ensure_future(result))
