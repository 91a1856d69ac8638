"""The dynamic sample queue (DESIGN section 9): cached good trajectories and question priorities.

Device side (`QueueState`, pure jitted functions): a pool of `capacity` fixed-shape slots holding
tokens, loss mask, behaviour log-probs, reward, policy version and question, sharded over the
'data' mesh axis. Host side (`SampleQueue`): per-question statistics, slot metadata (task id,
turns, answer) and the calls the trainer makes between rollouts:

    queue.select_questions(n, untried=...)            -> question indices
    plan = queue.plan(question, group_size, version)   -> Plan(num_fresh, replays)
    ... roll out plan.num_fresh episodes, score them together with plan.replays ...
    queue.update_stats(question, fresh_scores)         # scores in [0, 1], fresh episodes only
    queue.insert(question, fresh_trajectories, version)
    group = queue.restore_signal(question, group, version)   # when the group's rewards are flat

Checkpoint `queue.state` (a pytree of arrays) with the params and `queue.host_state()` (JSON) with
the run's metadata; restore with `queue.state = ...` and `queue.load_host_state(...)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from toolr1_jax.data import types as data_types

_INT_MAX = np.iinfo(np.int32).max


@struct.dataclass
class QueueState:
    """Slot i is empty when `question[i] == -1`. Rows are [N, L] with N = capacity."""

    tokens: jax.Array  # [N, L] int32
    loss_mask: jax.Array  # [N, L] bool
    behaviour_logprobs: jax.Array  # [N, L] float32
    length: jax.Array  # [N] int32, valid prefix of each row
    prompt_len: jax.Array  # [N] int32
    question: jax.Array  # [N] int32, -1 for an empty slot
    reward: jax.Array  # [N] float32
    version: jax.Array  # [N] int32, policy version that sampled the trajectory
    seq: jax.Array  # [N] int32, insertion counter: breaks ties in age
    next_seq: jax.Array  # [] int32

    @classmethod
    def empty(cls, capacity: int, max_len: int) -> QueueState:
        n, length = capacity, max_len
        return cls(
            tokens=np.zeros((n, length), np.int32),
            loss_mask=np.zeros((n, length), bool),
            behaviour_logprobs=np.zeros((n, length), np.float32),
            length=np.zeros((n,), np.int32),
            prompt_len=np.zeros((n,), np.int32),
            question=np.full((n,), -1, np.int32),
            reward=np.zeros((n,), np.float32),
            version=np.zeros((n,), np.int32),
            seq=np.zeros((n,), np.int32),
            next_seq=np.zeros((), np.int32),
        )


def _worst(candidates, reward, version, seq):
    """Index of the candidate to evict first: lowest reward, then oldest version, then seq."""
    low = jnp.where(candidates, reward, jnp.inf).min()
    candidates = candidates & (reward == low)
    oldest = jnp.where(candidates, version, _INT_MAX).min()
    candidates = candidates & (version == oldest)
    return jnp.argmin(jnp.where(candidates, seq, _INT_MAX))


def insert(state: QueueState, question, rows: QueueState, valid, threshold, per_question):
    """Offers rows[j] (valid[j]) for `question` in order; returns (state, slot per row or -1).

    A row is admitted when its reward >= threshold. It takes a free slot while its question
    holds fewer than `per_question` entries; otherwise it replaces the question's worst entry,
    and when the whole pool is full, the pool's worst entry (worst: lowest reward, then oldest)
    -- in both cases only if it is at least as good (reward, then version) as what it replaces.
    """

    def one(j, carry):
        st, slots = carry
        reward, version = rows.reward[j], rows.version[j]
        occupied = st.question >= 0
        mine = st.question == question
        full = mine.sum() >= per_question
        pool = jnp.where(full, mine, occupied)
        victim = _worst(pool, st.reward, st.version, st.seq)
        has_free = ~occupied.all()
        use_free = ~full & has_free
        beats = (reward > st.reward[victim]) | (
            (reward == st.reward[victim]) & (version >= st.version[victim])
        )
        slot = jnp.where(use_free, jnp.argmin(occupied), victim)
        do = valid[j] & (reward >= threshold) & (use_free | (pool.any() & beats))
        idx = jnp.where(do, slot, st.question.shape[0])  # out of range: dropped
        row = jax.tree.map(lambda x: x[j] if x.ndim else x, rows)
        st = jax.tree.map(
            lambda s, r: s.at[idx].set(r, mode="drop") if s.ndim else s,
            st,
            row.replace(question=jnp.asarray(question, jnp.int32), seq=st.next_seq),
        )
        st = st.replace(next_seq=st.next_seq + do.astype(jnp.int32))
        return st, slots.at[j].set(jnp.where(do, slot, -1))

    slots = jnp.full(valid.shape, -1, jnp.int32)
    return jax.lax.fori_loop(0, valid.shape[0], one, (state, slots))


def expire(state: QueueState, policy_version, max_staleness):
    """Frees slots whose trajectory is more than `max_staleness` policy versions old."""
    stale = (state.question >= 0) & (policy_version - state.version > max_staleness)
    return state.replace(question=jnp.where(stale, -1, state.question))


def sample(state: QueueState, question, key, num: int, avoid_reward):
    """Up to `num` distinct random slots of `question`: (slots [num], ok [num]), best first.

    Entries whose reward equals `avoid_reward` are not candidates (NaN avoids none).
    """
    candidates = (state.question == question) & (state.reward != avoid_reward)
    scores = jnp.where(candidates, jax.random.gumbel(key, candidates.shape), -jnp.inf)
    top, slots = jax.lax.top_k(scores, num)
    return slots, top > -jnp.inf


def gather(state: QueueState, slots) -> QueueState:
    return jax.tree.map(lambda x: x[slots] if x.ndim else x, state)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a group of `num_fresh + len(replays)` episodes for one question is made of."""

    num_fresh: int
    replays: tuple[data_types.Trajectory, ...]


def _meta(t: data_types.Trajectory) -> dict:
    return {
        "task_id": t.task_id,
        "group_id": t.group_id,
        "turns": [dataclasses.asdict(turn) for turn in t.turns],
        "final_answer": t.final_answer,
        "status": t.status,
        "reward_components": dict(t.reward_components),
    }


class SampleQueue:
    """Host handle on the queue: statistics, priorities, and the jitted device operations.

    Args:
      num_questions: questions are indices in [0, num_questions).
      per_question: K, trajectories kept per question.
      max_len: L, longest trajectory (tokens) that can be cached; longer ones are skipped.
      threshold: minimum reward for a trajectory to be cached.
      max_replay: cached trajectories a group may reuse (0 disables replay).
      max_staleness: cached trajectories older than this many policy versions expire.
      capacity: slots in the pool (default num_questions * per_question, so only the
        per-question limit evicts); rounded up to a multiple of the mesh's 'data' size.
      success_ema: weight of the newest group in a question's running success rate.
      seed: host RNG for question choice and replay sampling (checkpointed in host_state).
      mesh: shard the slots over its 'data' axis.
    """

    def __init__(
        self,
        *,
        num_questions: int,
        per_question: int,
        max_len: int,
        threshold: float,
        max_replay: int,
        max_staleness: int,
        capacity: int | None = None,
        success_ema: float = 0.5,
        seed: int = 0,
        mesh=None,
    ):
        if num_questions < 1 or per_question < 1 or max_len < 1:
            raise ValueError(
                "num_questions, per_question and max_len must be positive; got "
                f"{num_questions}, {per_question}, {max_len}."
            )
        if max_replay < 0 or max_staleness < 0:
            raise ValueError(
                f"max_replay ({max_replay}) and max_staleness ({max_staleness}) must be >= 0."
            )
        if not 0 < success_ema <= 1:
            raise ValueError(f"success_ema must be in (0, 1], got {success_ema}.")
        capacity = num_questions * per_question if capacity is None else capacity
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}.")
        shards = 1 if mesh is None else mesh.shape["data"]
        capacity = -(-capacity // shards) * shards
        self.num_questions = num_questions
        self.per_question = per_question
        self.max_len = max_len
        self.threshold = float(threshold)
        self.max_replay = max_replay
        self.max_staleness = max_staleness
        self.capacity = capacity
        self.success_ema = success_ema
        self.mesh = mesh

        empty = QueueState.empty(capacity, max_len)
        if mesh is None:
            self._sharding = None
            self._insert = jax.jit(insert, donate_argnums=0)
            self._expire = jax.jit(expire, donate_argnums=0)
        else:
            rows = NamedSharding(mesh, P("data"))
            self._sharding = jax.tree.map(
                lambda x: rows if x.ndim else NamedSharding(mesh, P()), empty
            )
            self._insert = jax.jit(insert, donate_argnums=0, out_shardings=(self._sharding, None))
            self._expire = jax.jit(expire, donate_argnums=0, out_shardings=self._sharding)
        self._sample = jax.jit(sample, static_argnums=(3,))
        self._gather = jax.jit(gather)
        # Fixed shapes, so that the queue's programs are a fixed set (`warmup` compiles them):
        # inserts take `per_question` rows a call, draws are `max(max_replay, 1)` slots wide.
        self._insert_width = per_question
        self._num_draws = max(max_replay, 1)
        self._state = self._place(empty)

        self.attempts = np.zeros(num_questions, np.int64)
        self.success_rate = np.zeros(num_questions, np.float64)
        self.slot_meta: dict[int, dict] = {}
        self.num_too_long = 0
        self._rng = np.random.default_rng(seed)

    # -- State and checkpoints ------------------------------------------------------------------

    def _place(self, state: QueueState) -> QueueState:
        if self._sharding is None:
            return jax.device_put(state)
        return jax.device_put(state, self._sharding)

    @property
    def state(self) -> QueueState:
        return self._state

    @state.setter
    def state(self, value: QueueState):
        want = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), self._state)
        got = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), value)
        if want != got:
            raise ValueError(
                "Queue state does not fit this queue (capacity, max_len or dtypes differ): "
                f"expected {want}, got {got}."
            )
        self._state = self._place(value)

    def host_state(self) -> dict:
        """JSON-serialisable host side: statistics, slot metadata, RNG, counters."""
        return {
            "attempts": self.attempts.tolist(),
            "success_rate": self.success_rate.tolist(),
            "slot_meta": {str(k): v for k, v in self.slot_meta.items()},
            "num_too_long": self.num_too_long,
            "rng": self._rng.bit_generator.state,
        }

    def load_host_state(self, host: dict) -> None:
        if len(host["attempts"]) != self.num_questions:
            raise ValueError(
                f"Checkpointed queue has {len(host['attempts'])} questions; this queue has "
                f"{self.num_questions}."
            )
        self.attempts = np.asarray(host["attempts"], np.int64)
        self.success_rate = np.asarray(host["success_rate"], np.float64)
        self.slot_meta = {int(k): v for k, v in host["slot_meta"].items()}
        self.num_too_long = int(host["num_too_long"])
        self._rng.bit_generator.state = host["rng"]

    def state_dict(self) -> dict:
        return {"arrays": self.state, "host": self.host_state()}

    def load_state_dict(self, d: dict) -> None:
        self.state = d["arrays"]
        self.load_host_state(d["host"])

    # -- Question choice ------------------------------------------------------------------------

    def learnability(self) -> np.ndarray:
        """p(1 - p) of each question's running success rate (0 for untried ones)."""
        p = self.success_rate
        return np.where(self.attempts > 0, p * (1 - p), 0.0)

    def select_questions(self, n: int, untried: Iterable[int] | None = None) -> list[int]:
        """`n` distinct questions: untried ones first, then tried ones by learnability.

        Untried questions come in the order of `untried` (e.g. question indices read from the
        shuffled data iterator; tried ones it yields are skipped) or, without it, at random.
        Tried questions are drawn without replacement with probability proportional to
        p(1 - p); solved (p = 1) and hopeless (p = 0) ones are taken only when nothing else
        is left.
        """
        if not 0 < n <= self.num_questions:
            raise ValueError(f"Cannot select {n} of {self.num_questions} questions.")
        chosen: list[int] = []
        fresh = set(np.flatnonzero(self.attempts == 0).tolist())
        if untried is not None and fresh:
            for pulled, q in enumerate(untried, start=1):
                q = int(q)
                if q in fresh and q not in chosen:
                    chosen.append(q)
                # One pass over the data visits every question; stop once we have enough or
                # the iterator has gone round without yielding the remaining untried ones.
                if len(chosen) == min(n, len(fresh)) or pulled >= 2 * self.num_questions:
                    break
        rest = sorted(fresh.difference(chosen))
        self._rng.shuffle(rest)
        chosen += rest[: n - len(chosen)]
        if len(chosen) < n:
            tried = np.flatnonzero(self.attempts > 0)
            priority = self.learnability()[tried]
            # Gumbel top-k: sampling without replacement, proportional to priority.
            keys = np.log(np.maximum(priority, 1e-300)) + self._rng.gumbel(size=tried.shape)
            keys = np.where(priority > 0, keys, -np.inf)
            tie = self._rng.random(tried.shape)  # random order among the zero-priority ones
            order = np.lexsort((-tie, -keys))
            chosen += tried[order][: n - len(chosen)].tolist()
        return chosen

    def update_stats(self, question: int, scores: Sequence[float]) -> None:
        """Records a group's fresh outcomes (scores in [0, 1], e.g. the judge's answer score)."""
        self._check_question(question)
        scores = np.asarray(scores, np.float64)
        if scores.size == 0:
            return
        if np.any((scores < 0) | (scores > 1)):
            raise ValueError(f"Scores must lie in [0, 1] (success per episode), got {scores}.")
        mean = scores.mean()
        if self.attempts[question] == 0:
            self.success_rate[question] = mean
        else:
            a = self.success_ema
            self.success_rate[question] = (1 - a) * self.success_rate[question] + a * mean
        self.attempts[question] += scores.size

    # -- Trajectories ---------------------------------------------------------------------------

    def _check_question(self, question: int) -> None:
        if not 0 <= question < self.num_questions:
            raise ValueError(f"Question {question} is out of range [0, {self.num_questions}).")

    def expire(self, policy_version: int) -> None:
        self._state = self._expire(
            self._state, np.int32(policy_version), np.int32(self.max_staleness)
        )

    def _key(self):
        return jax.random.key(int(self._rng.integers(2**31)))

    def warmup(self) -> None:
        """Compiles every program the queue runs (on a throwaway state), so that the first
        insert or replay of a run compiles nothing."""
        empty = QueueState.empty(self.capacity, self.max_len)
        rows = QueueState.empty(self._insert_width, self.max_len)
        valid = np.zeros(self._insert_width, bool)
        scratch = self._expire(self._place(empty), np.int32(0), np.int32(self.max_staleness))
        scratch, _ = self._insert(scratch, np.int32(0), rows, valid, np.float32(0), np.int32(1))
        slots, _ = self._sample(
            scratch, np.int32(0), jax.random.key(0), self._num_draws, np.float32(np.nan)
        )
        jax.block_until_ready(self._gather(scratch, np.asarray(slots)))

    def _draw(self, question: int, avoid_reward: float = np.nan):
        """`(slots, ok)`: `_num_draws` random slots of `question`, best first (host arrays)."""
        slots, ok = self._sample(
            self._state, np.int32(question), self._key(), self._num_draws, np.float32(avoid_reward)
        )
        return np.asarray(slots), np.asarray(ok)

    def _replays(self, slots, ok, num: int) -> list[data_types.Trajectory]:
        """The cached trajectories in the first `num` of `slots` that are `ok`."""
        ok = ok.copy()
        ok[num:] = False
        if not ok.any():
            return []
        rows = jax.device_get(self._gather(self._state, slots))  # all of them: one shape
        out = []
        for j, slot in zip(np.flatnonzero(ok).tolist(), slots[ok].tolist(), strict=True):
            n = int(rows.length[j])
            meta = self.slot_meta[slot]
            out.append(
                data_types.Trajectory(
                    task_id=meta["task_id"],
                    group_id=meta["group_id"],
                    tokens=rows.tokens[j, :n].copy(),
                    loss_mask=rows.loss_mask[j, :n].astype(np.int32),
                    behaviour_logprobs=rows.behaviour_logprobs[j, :n].copy(),
                    prompt_len=int(rows.prompt_len[j]),
                    policy_version=int(rows.version[j]),
                    turns=tuple(data_types.Turn(**t) for t in meta["turns"]),
                    final_answer=meta["final_answer"],
                    status=meta["status"],
                    reward=float(rows.reward[j]),
                    reward_components=dict(meta["reward_components"]),
                    replayed=True,
                )
            )
        return out

    def plan(self, question: int, group_size: int, policy_version: int) -> Plan:
        """How many fresh episodes to sample, and which cached ones to replay (at most
        `max_replay`, always leaving at least one fresh episode)."""
        self._check_question(question)
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}.")
        num = min(self.max_replay, group_size - 1)
        if num == 0:
            return Plan(group_size, ())
        self.expire(policy_version)
        replays = self._replays(*self._draw(question), num)
        return Plan(group_size - len(replays), tuple(replays))

    def insert(
        self,
        question: int,
        trajectories: Sequence[data_types.Trajectory],
        policy_version: int,
    ) -> int:
        """Offers scored fresh trajectories; returns how many were cached.

        Replayed ones are skipped (they are already cached); so are trajectories longer than
        max_len (counted in `num_too_long`). Expires stale entries first.
        """
        self._check_question(question)
        self.expire(policy_version)
        offered = []
        for t in trajectories:
            if t.reward is None:
                raise ValueError(f"Trajectory {t.task_id}/{t.group_id} has no reward yet.")
            if t.replayed or t.reward < self.threshold:
                continue
            if len(t.tokens) > self.max_len:
                self.num_too_long += 1
                continue
            offered.append(t)
        # Rows go in, in order, `_insert_width` a call (padded): one program for any count.
        width, cached = self._insert_width, 0
        for start in range(0, len(offered), width):
            chunk = offered[start : start + width]
            rows = QueueState.empty(width, self.max_len)
            for j, t in enumerate(chunk):
                n = len(t.tokens)
                rows.tokens[j, :n] = t.tokens
                rows.loss_mask[j, :n] = np.asarray(t.loss_mask) > 0
                rows.behaviour_logprobs[j, :n] = t.behaviour_logprobs
                rows.length[j] = n
                rows.prompt_len[j] = t.prompt_len
                rows.reward[j] = t.reward
                rows.version[j] = t.policy_version
            self._state, slots = self._insert(
                self._state,
                np.int32(question),
                rows,
                np.arange(width) < len(chunk),
                np.float32(self.threshold),
                np.int32(self.per_question),
            )
            slots = np.asarray(slots)
            for j, t in enumerate(chunk):
                if slots[j] >= 0:
                    self.slot_meta[int(slots[j])] = _meta(t)
            cached += int((slots >= 0).sum())
        return cached

    def restore_signal(
        self,
        question: int,
        trajectories: Sequence[data_types.Trajectory],
        policy_version: int,
    ) -> list[data_types.Trajectory]:
        """For a group whose rewards are all equal, swaps its last fresh episode for a cached
        trajectory of the question with a different reward, so the group has signal again.

        Returns the group unchanged when its rewards differ, it has no fresh episode, or the
        queue holds no such trajectory.
        """
        self._check_question(question)
        group = list(trajectories)
        rewards = {t.reward for t in group}
        fresh = [i for i, t in enumerate(group) if not t.replayed]
        if len(rewards) != 1 or not fresh or None in rewards:
            return group
        self.expire(policy_version)
        replays = self._replays(*self._draw(question, avoid_reward=rewards.pop()), 1)
        if replays:
            i = fresh[-1]
            group[i] = dataclasses.replace(replays[0], group_id=group[i].group_id)
        return group

    def summary(self) -> dict[str, float]:
        """Scalars for logging."""
        question = np.asarray(self._state.question)
        tried = self.attempts > 0
        return {
            "queue/entries": float((question >= 0).sum()),
            "queue/questions_cached": float(np.unique(question[question >= 0]).size),
            "queue/questions_tried_frac": float(tried.mean()),
            "queue/success_rate_mean": float(self.success_rate[tried].mean())
            if tried.any()
            else 0.0,
            "queue/learnability_mean": float(self.learnability()[tried].mean())
            if tried.any()
            else 0.0,
            "queue/too_long_total": float(self.num_too_long),
        }
