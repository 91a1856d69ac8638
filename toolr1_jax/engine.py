"""Rollout engine: jitted prefill and decode over a slot-based KV cache (continuous batching).

The engine owns a fixed number of slots over one contiguous cache `[L, slots, max_len, K, H]`.
The host adds a sequence to a free slot, lets the device decode active slots in chunks, reads
what stopped slots generated (tokens, log-probs, finish reason), appends observations to stopped
slots without re-reading their history, and releases slots. `generate` is a batch call on top.

A program computes at most `decode_rows` slots at once (all of them by default). With fewer rows
than slots, each decode chunk gathers the state of the rows it runs and scatters it back, so a
slot whose sequence waits (its episode's tool is running) keeps its cache without taking a row,
and resumes with an append of the observation alone.

Each slot keeps its newest token *pending*: sampled (or given) but not yet in the cache. Decode
feeds the pending token and samples the next one; prefill writes a prompt minus its last token,
and an append writes the pending token plus the observation minus its last token. So positions
are always `cache length`, and every sampling step goes through the one decode program.

The engine compiles a fixed set of programs, whatever the prompts: prefill of one fixed-length
chunk for one slot, the same for `decode_rows` slots at once (not when there is one row), a copy
of one chunk of cache positions between slots, and decode; prefill and decode have one program
per entry of `decode_lens`, and prefill one more that reads no cache (a prompt's first chunk).
Longer writes run chunk after chunk, each attending to what earlier chunks wrote. Prefill and
decode programs attend over a prefix of the cache only (256, 512, ... positions, then max_len),
and each call runs the smallest that holds what its rows read, so it costs what the live
sequences need, not what the whole cache could hold. `warmup` compiles all of them up front.

Prompts queued together share their common prefixes: each is prefilled once and copied into the
other slots that start with it (`_plan_prefills`), so a GRPO step's prefill costs about one
prompt per question instead of one per episode. Stop strings are matched on decoded text at
chunk boundaries, and a slot that overshot is cut and rewound (`step`); the host mirror of the
cache lengths is exact, and every prefill starts from it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from toolr1_jax import sharding as sharding_lib
from toolr1_jax.models import model as model_lib

_NOT_FINISHED, _FINISH_STOP, _FINISH_LENGTH = 0, 1, 2
_FINISH_NAMES = {_FINISH_STOP: "stop", _FINISH_LENGTH: "length"}
_PAD_ID = -1  # pads stop-id and stop-sequence tables; never equals a real token id
# A prefill batch with at most decode_rows / this many jobs runs them one by one through the
# one-slot program: the batched program costs decode_rows rows however few of them are real.
_ONE_BY_ONE_SHARE = 4


# ----------------------------------------------------------------------------------------------
# Host records
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Generation stops on any
    id in `stop_token_ids` or when the generated tokens end with one of `stop_sequences`
    (finish reason "stop"), or after `max_new_tokens` (finish reason "length"). Token-id stops
    act inside a decode chunk. `stop_strings` are matched on text, at chunk boundaries, by the
    engine's detokenizer: a string stops generation however it is tokenized in context, and any
    number of them fit (see `Engine.step` for what is kept). The random stream
    of a sequence depends only on `seed` and token positions, so two sequences that share a seed
    and a prompt sample the same tokens.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        # Accept lists from callers but store tuples so the record stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(
            self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences)
        )
        if isinstance(self.stop_strings, str):  # one string would be read as its characters
            raise ValueError(
                f"stop_strings must be a sequence of strings, got the string {self.stop_strings!r}."
            )
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}.")
        if not isinstance(self.max_new_tokens, int | np.integer) or self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}."
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.top_k, int | np.integer) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}.")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}.")
        for s in self.stop_sequences:
            if not s:
                raise ValueError("stop_sequences must not contain an empty sequence.")
            if any(t < 0 for t in s):
                raise ValueError(f"stop sequence token ids must be >= 0, got {s}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}.")


@dataclasses.dataclass(frozen=True)
class Completion:
    """What `generate` returns for one prompt."""

    tokens: np.ndarray  # [n] int32, stop tokens included (see `Engine.step` for stop strings)
    logprobs: np.ndarray  # [n] float32
    finish_reason: str  # "stop" or "length"


@dataclasses.dataclass(frozen=True)
class SlotOutput:
    """What a slot generated since its last add/append, returned by `Engine.step` when it stops."""

    slot: int
    tokens: np.ndarray  # [n] int32, stop tokens included (see `Engine.step` for stop strings)
    logprobs: np.ndarray  # [n] float32
    finish_reason: str  # "stop" or "length"


class _Status(enum.Enum):
    FREE = enum.auto()
    DECODING = enum.auto()  # prefill queued or decoding on the device
    STOPPED = enum.auto()  # live, waiting for append or release


@dataclasses.dataclass(frozen=True)
class _PendingPrefill:
    slot: int
    tokens: tuple[int, ...]  # written into the cache at positions start, start + 1, ...
    next_token: int  # becomes the pending token
    start: int  # the slot's cache length before the write: 0 for `add`, the host mirror's else
    sampling: SamplingParams
    is_prompt: bool  # `add` (may share a prefix with other prompts), not `append`


@dataclasses.dataclass(frozen=True)
class _Copy:
    """Cache entries [0, num_tokens) of slot `donor` become those of `slot`, which is armed."""

    donor: int
    slot: int
    num_tokens: int
    next_token: int
    sampling: SamplingParams


# ----------------------------------------------------------------------------------------------
# Device state
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class SlotSampling:
    """Per-slot sampling settings as fixed-shape arrays, so any mix shares one program."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32
    max_new_tokens: jax.Array  # [B] int32
    seed: jax.Array  # [B] uint32
    stop_ids: jax.Array  # [B, E] int32, padded with -1
    stop_seqs: jax.Array  # [B, M, W] int32, right-aligned, left-padded with -1


@struct.dataclass
class EngineState:
    """Everything the jitted programs read and write; donated on every call."""

    cache: model_lib.KVCache  # lengths [B] = tokens in the cache (the pending one excluded)
    next_token: jax.Array  # [B] int32, the pending token
    active: jax.Array  # [B] bool, still decoding
    finish_reason: jax.Array  # [B] int32
    num_generated: jax.Array  # [B] int32, since the last add/append
    gen_tokens: jax.Array  # [B, S] int32
    gen_logprobs: jax.Array  # [B, S] float32
    sampling: SlotSampling


def sample_tokens(logits, temperature, top_k, top_p, keys):
    """Samples one token per row and returns (tokens [B] int32, logprobs [B] float32).

    logits [B, V]; temperature, top_k, top_p [B]; keys [B] typed PRNG keys. Rows with temperature
    0 take the argmax. Log-probs come from the full-vocabulary log-softmax of logits / temperature
    (temperature 1 for greedy rows), before top-k/top-p, which is what the trainer recomputes.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]  # [B, V]

    def truncate(scaled):
        # top-k first, then top-p over the renormalised top-k set (the order HF and vLLM use).
        desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        in_k = jnp.arange(vocab)[None, :] < k[:, None]
        probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # top_p = 1 keeps everything even when float cumsums reach 1 early.
        keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
        num_keep = jnp.maximum(keep.sum(axis=-1), 1)
        threshold = jnp.take_along_axis(desc, (num_keep - 1)[:, None], axis=-1)  # [B, 1]
        return jnp.where(scaled >= threshold, scaled, -jnp.inf)

    def draw(scaled):
        # The full-vocab sort is the costly part; skip it when no sampled row filters.
        needs_filter = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))
        filtered = jax.lax.cond(needs_filter, truncate, lambda x: x, scaled)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    # Random bits cost as much as a small model's step on CPU: skip them for all-greedy batches.
    sampled = jax.lax.cond(
        jnp.all(greedy), lambda x: jnp.zeros(x.shape[:1], jnp.int32), draw, scaled
    )
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
    # log_softmax at one index, without materialising the [B, V] log-softmax.
    picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, picked - jax.nn.logsumexp(scaled, axis=-1)


def _slot_keys(seed, position):
    """A key per slot from its own seed and the position of the token being sampled."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed, position)


# ----------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------


class Engine:
    """Slot-based rollout engine over an NNX `Transformer`.

    Host API (synchronous, single-threaded): `add`, `append`, `step`, `release`,
    `num_free_slots`, `set_params`, `warmup`, and `generate` on top of them. Prefills queued by
    `add` and `append` run at the start of the next `step`, in chunks of `prefill_chunk` tokens
    (capped at max_len).

    `num_slots` is how many sequences the cache holds; `decode_rows` (default: num_slots) is how
    many of them one program computes. Slots beyond the rows cost cache memory only: a stopped
    slot waiting for its append takes no row. When more slots decode than there are rows, each
    chunk runs those with the fewest turns (add, then one per append) and, among equals, the
    earliest armed: a sequence held back by a slow tool catches up first, which shortens the
    rollout's slowest episode.
    """

    def __init__(
        self,
        model: model_lib.Transformer,
        *,
        num_slots: int,
        max_len: int,
        max_stop_ids: int = 8,
        max_stop_sequences: int = 4,
        max_stop_len: int = 16,
        prefill_chunk: int = 256,
        decode_rows: int | None = None,
        detokenize: Callable[[Sequence[int]], str] | None = None,
        share_prefixes: bool = True,
        min_decode_len: int = 256,
    ):
        decode_rows = num_slots if decode_rows is None else decode_rows
        for name, value in (
            ("num_slots", num_slots),
            ("max_len", max_len),
            ("prefill_chunk", prefill_chunk),
            ("decode_rows", decode_rows),
            ("max_stop_ids", max_stop_ids),
            ("max_stop_sequences", max_stop_sequences),
            ("max_stop_len", max_stop_len),
            ("min_decode_len", min_decode_len),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if decode_rows > num_slots:
            raise ValueError(f"decode_rows ({decode_rows}) must be <= num_slots ({num_slots}).")
        if max_len < 2:
            raise ValueError("max_len must be >= 2 (a prompt token and a generated one).")
        self.config = model.config
        self.num_slots = num_slots
        self.decode_rows = decode_rows
        self.max_len = max_len
        self.max_stop_ids = max_stop_ids
        self.max_stop_sequences = max_stop_sequences
        self.max_stop_len = max_stop_len
        self.prefill_chunk = min(prefill_chunk, max_len)
        # Cache prefixes a prefill or decode program attends over: powers of two from
        # min_decode_len, then max_len. Each call runs the smallest that holds every position it
        # touches.
        self.decode_lens = _decode_lens(min_decode_len, max_len)
        # Token ids -> text, for `SamplingParams.stop_strings` (e.g. a tokenizer's `decode`).
        self.detokenize = detokenize
        self.share_prefixes = share_prefixes
        self._graphdef, self._params = nnx.split(model)
        state = self._init_state(model.dtype)
        # Fixed state shardings in and out of every program: left to propagation, they could
        # change between calls and trigger recompiles.
        self._state_shardings = self._shardings_for(state)
        self._state = jax.device_put(state, self._state_shardings)
        self._prefill_fn = jax.jit(
            self._prefill_impl,
            donate_argnums=(1,),
            static_argnums=(8,),  # kv_len: one program per (width, 0 or entry of decode_lens)
            out_shardings=self._state_shardings,
        )
        self._decode_fn = jax.jit(
            self._decode_impl,
            donate_argnums=(1,),
            static_argnums=(5,),  # kv_len: one program per entry of decode_lens
            out_shardings=self._state_shardings,
        )
        self._copy_fn = jax.jit(
            self._copy_impl, donate_argnums=(0,), out_shardings=self._state_shardings
        )

        self._status = [_Status.FREE] * num_slots
        self._sampling: list[SamplingParams | None] = [None] * num_slots
        self._lengths = np.zeros(num_slots, np.int64)  # host mirror of the cache lengths
        self._last_token = np.zeros(num_slots, np.int64)  # host mirror of the pending token
        # Generated tokens whose text has been searched for stop strings, per slot.
        self._num_checked = np.zeros(num_slots, np.int64)
        self._queued: dict[int, _PendingPrefill] = {}
        # Row priority: fewest turns first, then the earliest armed (add/append).
        self._turns = np.zeros(num_slots, np.int64)
        self._armed_at = np.zeros(num_slots, np.int64)
        self._num_armed = 0

    # -- public host API ------------------------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return sum(s is _Status.FREE for s in self._status)

    @property
    def num_compilations(self) -> int:
        """Programs compiled so far, read from jit's caches (the traced code has no side
        effects): after `warmup`, 1 + 3 x len(decode_lens) (1 + 2 x len(decode_lens) with one
        row: prefill per width and decode, per length bucket, and the copy), and never more."""
        return (
            self._prefill_fn._cache_size()
            + self._decode_fn._cache_size()
            + self._copy_fn._cache_size()
        )

    @property
    def params(self) -> nnx.State:
        return self._params

    def set_params(self, state: nnx.State) -> None:
        """Uses `state` (same structure as `nnx.split(model)[1]`) from now on.

        Arrays already on the engine's devices are used as they are (no copy); others are moved.
        """
        old_leaves, old_tree = jax.tree.flatten(self._params)
        new_leaves, new_tree = jax.tree.flatten(state)
        if old_tree != new_tree:
            raise ValueError(
                f"set_params: the new state ({len(new_leaves)} arrays) does not have the "
                f"structure of the engine's model ({len(old_leaves)} arrays); pass the state "
                "of the same model class and config, e.g. `nnx.split(model)[1]`."
            )
        for old, new in zip(old_leaves, new_leaves, strict=True):
            if old.shape != new.shape or old.dtype != new.dtype:
                raise ValueError(
                    f"set_params: a parameter of shape {old.shape} {old.dtype} was given as "
                    f"{new.shape} {new.dtype}."
                )
        moved = [
            new
            if isinstance(new, jax.Array) and new.sharding == old.sharding
            else jax.device_put(new, old.sharding)
            for old, new in zip(old_leaves, new_leaves, strict=True)
        ]
        self._params = jax.tree.unflatten(new_tree, moved)

    def warmup(self) -> None:
        """Compiles every program the engine runs, so that no later call compiles.

        Runs each once on padding rows that change no slot; safe at any time.
        """
        for width in sorted({1, self.decode_rows}):
            for kv_len in (0, *self.decode_lens):
                self._state = self._prefill_fn(*self._prefill_args([], 0, width, kv_len))
        self._state = self._copy_fn(*self._copy_args([], 0))
        decoding = np.array([s is _Status.DECODING for s in self._status])
        # Zero steps: decode only applies what `step` would (released slots stop).
        rows = self._rows_to_decode(decoding)
        for kv_len in self.decode_lens:
            self._state = self._decode_fn(
                self._params, self._state, rows, decoding, np.int32(0), kv_len
            )

    def add(self, tokens: Sequence[int], sampling: SamplingParams) -> int:
        """Puts a prompt in a free slot and returns the slot id; it decodes from the next step."""
        tokens = self._check_tokens(tokens, "prompt")
        if not tokens:
            raise ValueError("add: the prompt is empty.")
        if len(tokens) >= self.max_len:
            raise ValueError(
                f"add: the prompt has {len(tokens)} tokens; a slot holds max_len={self.max_len} "
                "tokens including at least one generated."
            )
        self._check_sampling(sampling)
        free = [i for i, s in enumerate(self._status) if s is _Status.FREE]
        if not free:
            raise RuntimeError(f"add: all {self.num_slots} slots are in use; release one first.")
        slot = free[0]
        self._queued[slot] = _PendingPrefill(
            slot, tokens[:-1], tokens[-1], 0, sampling, is_prompt=True
        )
        self._turns[slot] = 0
        self._arm(slot, sampling)
        return slot

    def append(
        self, slot: int, tokens: Sequence[int], sampling: SamplingParams | None = None
    ) -> None:
        """Appends tokens (an observation) to a stopped slot, which then decodes again.

        The slot gets a fresh `max_new_tokens` budget; `sampling` replaces its settings if given.
        """
        self._check_slot(slot, "append")
        if self._status[slot] is not _Status.STOPPED:
            raise ValueError(
                f"append: slot {slot} is still decoding; append only after step() returned it."
            )
        tokens = self._check_tokens(tokens, "appended tokens")
        total = int(self._lengths[slot]) + 1 + len(tokens)  # cache + pending + new
        if total >= self.max_len:
            raise ValueError(
                f"append: slot {slot} holds {int(self._lengths[slot]) + 1} tokens; appending "
                f"{len(tokens)} more and generating one would exceed max_len={self.max_len}."
            )
        if sampling is None:
            sampling = self._sampling[slot]
        self._check_sampling(sampling)
        seq = (int(self._last_token[slot]), *tokens)
        start = int(self._lengths[slot])  # exact, also after a cut at a stop string
        self._queued[slot] = _PendingPrefill(
            slot, seq[:-1], seq[-1], start, sampling, is_prompt=False
        )
        self._arm(slot, sampling)

    def release(self, slot: int) -> None:
        """Frees a live slot (stopped or still decoding)."""
        self._check_slot(slot, "release")
        self._queued.pop(slot, None)
        self._status[slot] = _Status.FREE
        self._sampling[slot] = None

    def step(self, max_steps: int) -> list[SlotOutput]:
        """Runs queued prefills, then up to `max_steps` decode steps over up to `decode_rows`
        decoding slots (see the class docstring for which).

        Returns the slots that stopped in this chunk; they stay live until `release`.

        Stop strings are searched for after the chunk, in the text of each slot's tokens since
        its last add/append. A slot whose text contains one stops there even if the device
        decoded on: its output keeps the tokens up to and including the first one whose text
        completes a stop string (that token's text may run past the string: a token ">\n"
        completes "</code>"), with finish reason "stop", and its cache is rewound to match, so a
        later `append` continues right after the kept tokens, exactly as a fresh prefill of that
        history would. What the device decoded past the cut (at most one chunk) is discarded.
        """
        if not isinstance(max_steps, int | np.integer) or max_steps < 1:
            raise ValueError(f"step: max_steps must be an integer >= 1, got {max_steps!r}.")
        self._run_prefills()
        decoding = np.array([s is _Status.DECODING for s in self._status])
        if not decoding.any():
            return []
        rows = self._rows_to_decode(decoding)
        # Every position this chunk reads or writes lies below the longest decoding row's cache
        # length plus max_steps (step i reads [0, length + i) and writes at length + i).
        chosen = rows[rows < self.num_slots]
        longest = int(self._lengths[chosen[decoding[chosen]]].max())
        kv_len = self._kv_len(longest + max_steps)
        self._state = self._decode_fn(
            self._params, self._state, rows, decoding, np.int32(max_steps), kv_len
        )
        active, finish, num_gen, lengths = jax.device_get(
            (
                self._state.active,
                self._state.finish_reason,
                self._state.num_generated,
                self._state.cache.lengths,
            )
        )
        # Only slots that decoded are read back: a slot cut at a stop string keeps a stale
        # device length until its next prefill, which starts from this (exact) mirror.
        self._lengths[decoding] = lengths[decoding]
        stopped = set(np.flatnonzero(decoding & ~active).tolist())
        to_search = [
            slot
            for slot in np.flatnonzero(decoding).tolist()
            if self._sampling[slot].stop_strings and num_gen[slot] > self._num_checked[slot]
        ]
        if not stopped and not to_search:
            return []
        # Whole arrays: a slice would be a program of its own, compiled per shape.
        gen_tokens, gen_logprobs = jax.device_get(
            (self._state.gen_tokens, self._state.gen_logprobs)
        )
        cuts = {}  # slot -> tokens kept, for slots whose text holds a stop string
        for slot in to_search:
            n = int(num_gen[slot])
            kept = self._text_stop(
                gen_tokens[slot, :n].tolist(),
                self._sampling[slot].stop_strings,
                int(self._num_checked[slot]),
            )
            self._num_checked[slot] = n
            if kept is not None:
                cuts[slot] = kept
        outputs = []
        for slot in sorted(stopped | cuts.keys()):
            n = int(num_gen[slot])
            kept = cuts.get(slot, n)
            # The cache holds every generated token but the last (pending) one: a cut drops
            # n - kept of them, and the last kept token becomes the pending one. The device
            # stops decoding the slot at the next chunk (`allowed` is False for it).
            self._lengths[slot] -= n - kept
            self._last_token[slot] = gen_tokens[slot, kept - 1]
            self._status[slot] = _Status.STOPPED
            reason = "stop" if slot in cuts else _FINISH_NAMES[int(finish[slot])]
            outputs.append(
                SlotOutput(
                    slot=slot,
                    tokens=gen_tokens[slot, :kept].copy(),
                    logprobs=gen_logprobs[slot, :kept].copy(),
                    finish_reason=reason,
                )
            )
        return outputs

    def _text_stop(self, tokens: list[int], stops: tuple[str, ...], num_clean: int) -> int | None:
        """How many of `tokens` to keep when their text contains a stop string, else None.

        The answer is the shortest prefix whose text contains one; the first `num_clean` tokens
        are known not to (searched at an earlier chunk). Text only grows as tokens are added,
        so a binary search over prefix lengths finds it in a few detokenizations.
        """
        if not any(s in self.detokenize(tokens) for s in stops):
            return None
        lo, hi = num_clean + 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.detokenize(tokens[:mid]) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
        *,
        chunk_steps: int = 32,
    ) -> list[Completion]:
        """One completion per prompt, refilling freed slots when there are more prompts than slots.

        `sampling` is one `SamplingParams` for all prompts or one per prompt (pass distinct
        seeds to draw distinct samples for repeated prompts). Needs an idle engine.
        """
        if self.num_free_slots != self.num_slots:
            raise RuntimeError("generate: needs an idle engine, but some slots are live.")
        if isinstance(sampling, SamplingParams):
            per_prompt = [sampling] * len(prompts)
        else:
            per_prompt = list(sampling)
            if len(per_prompt) != len(prompts):
                raise ValueError(
                    f"generate: got {len(per_prompt)} SamplingParams for {len(prompts)} prompts."
                )
        # Check everything first so a bad prompt fails before any work starts.
        for i, (prompt, params) in enumerate(zip(prompts, per_prompt, strict=True)):
            tokens = self._check_tokens(prompt, f"prompt {i}")
            if not tokens or len(tokens) >= self.max_len:
                raise ValueError(
                    f"generate: prompt {i} has {len(tokens)} tokens; prompts need 1 to "
                    f"max_len - 1 = {self.max_len - 1} tokens."
                )
            self._check_sampling(params)

        results: list[Completion | None] = [None] * len(prompts)
        todo = collections.deque(range(len(prompts)))
        owner: dict[int, int] = {}  # slot -> prompt index
        try:
            while todo or owner:
                while todo and self.num_free_slots:
                    i = todo.popleft()
                    owner[self.add(prompts[i], per_prompt[i])] = i
                for out in self.step(chunk_steps):
                    results[owner.pop(out.slot)] = Completion(
                        out.tokens, out.logprobs, out.finish_reason
                    )
                    self.release(out.slot)
        finally:
            for slot in owner:
                self.release(slot)
        return results

    def _arm(self, slot: int, sampling: SamplingParams) -> None:
        self._status[slot] = _Status.DECODING
        self._sampling[slot] = sampling
        self._num_checked[slot] = 0
        self._num_armed += 1
        self._armed_at[slot] = self._num_armed
        self._turns[slot] += 1

    def _rows_to_decode(self, decoding: np.ndarray) -> np.ndarray:
        """Slot ids [decode_rows] for the next decode chunk, padded with num_slots (no slot)."""
        if self.decode_rows == self.num_slots:
            return np.arange(self.num_slots, dtype=np.int32)
        waiting = np.flatnonzero(decoding)
        order = np.lexsort((self._armed_at[waiting], self._turns[waiting]))
        chosen = waiting[order[: self.decode_rows]]
        rows = np.full((self.decode_rows,), self.num_slots, np.int32)
        rows[: len(chosen)] = chosen
        return rows

    # -- validation -----------------------------------------------------------------------------

    def _check_slot(self, slot, what: str) -> None:
        if not isinstance(slot, int | np.integer) or not 0 <= slot < self.num_slots:
            raise ValueError(f"{what}: no slot {slot!r}; slots are 0..{self.num_slots - 1}.")
        if self._status[slot] is _Status.FREE:
            raise ValueError(f"{what}: slot {slot} is free (never added or already released).")

    def _check_tokens(self, tokens, what: str) -> tuple[int, ...]:
        tokens = tuple(int(t) for t in tokens)
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"{what}: token ids {bad[:5]} are outside the vocabulary "
                f"[0, {self.config.vocab_size})."
            )
        return tokens

    def _check_sampling(self, sampling) -> None:
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(sampling).__name__}.")
        if len(sampling.stop_token_ids) > self.max_stop_ids:
            raise ValueError(
                f"{len(sampling.stop_token_ids)} stop_token_ids given; this engine holds at most "
                f"max_stop_ids={self.max_stop_ids}."
            )
        if len(sampling.stop_sequences) > self.max_stop_sequences:
            raise ValueError(
                f"{len(sampling.stop_sequences)} stop_sequences given; this engine holds at most "
                f"max_stop_sequences={self.max_stop_sequences}."
            )
        if sampling.stop_strings and self.detokenize is None:
            raise ValueError(
                "stop_strings are matched on text, and this engine has no detokenizer: build it "
                "with Engine(..., detokenize=tokenizer.decode)."
            )
        longest = max((len(s) for s in sampling.stop_sequences), default=0)
        if longest > self.max_stop_len:
            raise ValueError(
                f"a stop sequence has {longest} tokens; this engine holds at most "
                f"max_stop_len={self.max_stop_len}."
            )

    # -- host -> device -------------------------------------------------------------------------

    def _init_state(self, dtype) -> EngineState:
        b, s = self.num_slots, self.max_len
        sampling = SlotSampling(
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32),
            max_new_tokens=jnp.ones((b,), jnp.int32),
            seed=jnp.zeros((b,), jnp.uint32),
            stop_ids=jnp.full((b, self.max_stop_ids), _PAD_ID, jnp.int32),
            stop_seqs=jnp.full((b, self.max_stop_sequences, self.max_stop_len), _PAD_ID, jnp.int32),
        )
        return EngineState(
            cache=model_lib.KVCache.init(self.config, b, s, dtype),
            next_token=jnp.zeros((b,), jnp.int32),
            active=jnp.zeros((b,), jnp.bool_),
            finish_reason=jnp.zeros((b,), jnp.int32),
            num_generated=jnp.zeros((b,), jnp.int32),
            gen_tokens=jnp.zeros((b, s), jnp.int32),
            gen_logprobs=jnp.zeros((b, s), jnp.float32),
            sampling=sampling,
        )

    def _shardings_for(self, state: EngineState):
        """Shardings for the engine state on the devices that hold the model's parameters.

        On a mesh, the cache splits its slots like a batch and its kv heads like the attention
        weights (`toolr1_jax.sharding` rules); the small per-slot arrays split their slots too.
        """
        leaf = jax.tree.leaves(self._params)[0]
        mesh = getattr(leaf.sharding, "mesh", None)
        if not isinstance(mesh, jax.sharding.Mesh):
            device = next(iter(leaf.sharding.device_set))
            return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), state)

        def named(axes, x):
            spec = sharding_lib.logical_to_spec(axes, x.shape, mesh)
            return jax.sharding.NamedSharding(mesh, spec)

        def per_slot(x):
            return named(("batch",) + (None,) * (x.ndim - 1), x)

        kv_axes = (None, "batch", "kv_heads", "length", "head_dim")
        shardings = jax.tree.map(per_slot, state)
        return shardings.replace(
            cache=model_lib.KVCache(
                k=named(kv_axes, state.cache.k),
                v=named(kv_axes, state.cache.v),
                lengths=per_slot(state.cache.lengths),
            )
        )

    def _sampling_rows(self, rows: Sequence[SamplingParams | None]) -> SlotSampling:
        """Host arrays for `rows`; None rows (batch padding) get neutral values."""
        p = len(rows)
        out = SlotSampling(
            temperature=np.zeros((p,), np.float32),
            top_k=np.zeros((p,), np.int32),
            top_p=np.ones((p,), np.float32),
            max_new_tokens=np.ones((p,), np.int32),
            seed=np.zeros((p,), np.uint32),
            stop_ids=np.full((p, self.max_stop_ids), _PAD_ID, np.int32),
            stop_seqs=np.full((p, self.max_stop_sequences, self.max_stop_len), _PAD_ID, np.int32),
        )
        for i, sp in enumerate(rows):
            if sp is None:
                continue
            out.temperature[i] = sp.temperature
            out.top_k[i] = sp.top_k
            out.top_p[i] = sp.top_p
            out.max_new_tokens[i] = sp.max_new_tokens
            out.seed[i] = sp.seed
            out.stop_ids[i, : len(sp.stop_token_ids)] = sp.stop_token_ids
            for j, seq in enumerate(sp.stop_sequences):
                out.stop_seqs[i, j, self.max_stop_len - len(seq) :] = seq
        return out

    def _run_prefills(self) -> None:
        """Writes every queued job, sharing prompt prefixes (`_plan_prefills`) level by level."""
        jobs = list(self._queued.values())
        self._queued.clear()
        for job in jobs:
            self._last_token[job.slot] = job.next_token
            self._lengths[job.slot] = job.start + len(job.tokens)
        for copies, writes in self._plan_prefills(jobs):
            self._run_copies(copies)
            self._run_writes(writes)

    def _plan_prefills(self, jobs: list[_PendingPrefill]):
        """Levels of work, `[(copies, writes), ...]`; a level copies only from slots that
        earlier levels completed.

        Every episode of a GRPO step shares the system prompt, and the G episodes of a group
        share the whole prompt, so a step's prefill would repeat the same work about G times.
        Prompts (`add`s) are deduplicated first: equal prompts copy everything from one of them,
        their leader. The leaders are then sorted, so prompts with a long common prefix are
        neighbours; a leader whose common prefix with the first prompt of its run saves at least
        one prefill chunk copies that prefix and writes only the rest (so the minimum shared
        length is what makes a copy pay: up to a chunk). Appends never share.
        """
        if not self.share_prefixes:
            return [([], jobs)]
        chunk = self.prefill_chunk
        levels: list[tuple[list[_Copy], list[_PendingPrefill]]] = [([], []), ([], []), ([], [])]
        leaders: dict[tuple[int, ...], _PendingPrefill] = {}
        followers: list[tuple[_PendingPrefill, _PendingPrefill]] = []
        for job in jobs:
            if not job.is_prompt:
                levels[0][1].append(job)
                continue
            key = (*job.tokens, job.next_token)
            if key in leaders:
                followers.append((leaders[key], job))
            else:
                leaders[key] = job

        level_of: dict[int, int] = {}
        root = None
        for job in sorted(leaders.values(), key=lambda j: (j.tokens, j.next_token)):
            n = len(job.tokens)
            shared = 0 if root is None else _common_prefix_len(root.tokens, job.tokens)
            if shared and -(-(n - shared) // chunk) < -(-n // chunk):
                rest = dataclasses.replace(job, tokens=job.tokens[shared:], start=shared)
                levels[1][0].append(
                    _Copy(root.slot, job.slot, shared, job.next_token, job.sampling)
                )
                if rest.tokens:  # else the copy armed it
                    levels[1][1].append(rest)
                level_of[job.slot] = 1
            else:
                root = job
                levels[0][1].append(job)
                level_of[job.slot] = 0
        for leader, job in followers:
            copy = _Copy(leader.slot, job.slot, len(job.tokens), job.next_token, job.sampling)
            levels[level_of[leader.slot] + 1][0].append(copy)
        return [level for level in levels if level[0] or level[1]]

    def _run_writes(self, jobs: list[_PendingPrefill]) -> None:
        """Prefills `jobs` in rounds: round r writes chunk r of each job that has one."""
        chunk = self.prefill_chunk
        num_chunks = {job.slot: max(1, -(-len(job.tokens) // chunk)) for job in jobs}
        width = self.decode_rows
        for r in range(max(num_chunks.values(), default=0)):
            todo = [job for job in jobs if num_chunks[job.slot] > r]
            for batch in (todo[i : i + width] for i in range(0, len(todo), width)):
                if len(batch) == 1 or _ONE_BY_ONE_SHARE * len(batch) <= width:
                    for job in batch:
                        self._state = self._prefill_fn(*self._prefill_args([job], r, 1, None))
                else:
                    self._state = self._prefill_fn(*self._prefill_args(batch, r, width, None))

    def _run_copies(self, copies: list[_Copy]) -> None:
        """Runs `copies`, `decode_rows` at a time, one prefill chunk of positions per call."""
        chunk = self.prefill_chunk
        num_chunks = {c.slot: max(1, -(-c.num_tokens // chunk)) for c in copies}
        width = self.decode_rows
        for r in range(max(num_chunks.values(), default=0)):
            todo = [c for c in copies if num_chunks[c.slot] > r]
            for i in range(0, len(todo), width):
                self._state = self._copy_fn(*self._copy_args(todo[i : i + width], r))

    def _kv_len(self, needed: int) -> int:
        """The smallest entry of `decode_lens` that holds `needed` cache positions."""
        return next(n for n in self.decode_lens if n >= min(needed, self.max_len))

    def _prefill_args(
        self, jobs: Sequence[_PendingPrefill], chunk_index: int, width: int, kv_len: int | None
    ):
        """Arguments of the prefill program for chunk `chunk_index` of `jobs` in `width` rows.

        With width num_slots, row i is slot i; otherwise jobs fill the first rows. Padding rows
        point past the last slot: their gathers read zeros and their writes drop. `kv_len` None
        picks what the chunk reads: the smallest length bucket that holds every row's entries
        before the chunk, or 0 when every row starts empty (a prompt's first chunk).
        """
        chunk = self.prefill_chunk
        slot_ids = np.full((width,), self.num_slots, np.int32)
        tokens = np.zeros((width, chunk), np.int32)
        start = np.zeros((width,), np.int32)
        num_tokens = np.zeros((width,), np.int32)
        next_token = np.zeros((width,), np.int32)
        rows: list[SamplingParams | None] = [None] * width
        for i, job in enumerate(jobs):
            row = job.slot if width == self.num_slots else i
            piece = job.tokens[chunk_index * chunk : (chunk_index + 1) * chunk]
            slot_ids[row] = job.slot
            tokens[row, : len(piece)] = piece
            # From the host mirror, which is exact: the device's length is stale after a cut.
            start[row] = job.start + chunk_index * chunk
            num_tokens[row] = len(piece)
            next_token[row] = job.next_token
            rows[row] = job.sampling
        sampling = self._sampling_rows(rows)
        if kv_len is None:
            before = int(start.max())
            kv_len = self._kv_len(before) if before else 0
        return (
            self._params,
            self._state,
            slot_ids,
            tokens,
            start,
            num_tokens,
            next_token,
            sampling,
            kv_len,
        )

    def _copy_args(self, copies: Sequence[_Copy], chunk_index: int):
        """Arguments of the copy program for positions [chunk_index * prefill_chunk, ...) of
        `copies` in `decode_rows` rows; padding rows point past the last slot."""
        width, chunk = self.decode_rows, self.prefill_chunk
        donors = np.full((width,), self.num_slots, np.int32)
        slot_ids = np.full((width,), self.num_slots, np.int32)
        num_tokens = np.zeros((width,), np.int32)
        lengths = np.zeros((width,), np.int32)
        next_token = np.zeros((width,), np.int32)
        rows: list[SamplingParams | None] = [None] * width
        for i, c in enumerate(copies):
            donors[i], slot_ids[i] = c.donor, c.slot
            num_tokens[i] = min(max(c.num_tokens - chunk_index * chunk, 0), chunk)
            lengths[i] = c.num_tokens
            next_token[i] = c.next_token
            rows[i] = c.sampling
        offset = np.int32(chunk_index * chunk)
        sampling = self._sampling_rows(rows)
        return (self._state, donors, slot_ids, offset, num_tokens, lengths, next_token, sampling)

    # -- jitted programs ------------------------------------------------------------------------

    def _prefill_impl(
        self,
        params,
        state: EngineState,
        slot_ids,
        tokens,
        start,
        num_tokens,
        next_token,
        sampling,
        kv_len: int,
    ) -> EngineState:
        """Writes tokens [P, T] at cache positions `start` [P] of slots [P] and arms them.

        Arming (pending token, sampling settings, budget) is the same for every chunk of a job,
        so each chunk applies it. A chunk attends to the slot's entries before `start`, read from
        the first `kv_len` cache positions only (a length bucket, as in decode; 0 when every row
        starts empty): a prompt's chunk then costs what came before it, not what the cache could
        hold, and with fewer rows than slots only that prefix of each row is gathered.
        """
        model = nnx.merge(self._graphdef, params)
        cache = state.cache
        p, t = tokens.shape
        positions = start[:, None] + jnp.arange(t)[None, :]  # [P, T]
        mask = jnp.arange(t)[None, :] < num_tokens[:, None]  # padding rows and tokens write nothing
        # Only the cache is needed; hidden states skip the LM head.
        if p == self.num_slots:
            # Row i is slot i (or padding): the model writes the engine's cache in place.
            past = model_lib.KVCache(k=cache.k, v=cache.v, lengths=start, kv_len=kv_len)
            _, new = model.hidden_states(tokens, positions, past, mask)
            k, v = new.k, new.v
        else:

            def rows(x):
                return x[:, :, :, :kv_len].at[:, slot_ids].get(mode="fill", fill_value=0)

            past = model_lib.KVCache(k=rows(cache.k), v=rows(cache.v), lengths=start)
            _, new_k, new_v = model.hidden_states_and_kv(tokens, positions, past, mask)
            # Write the chunk's keys and values [L, P, T, K, H] into the slots' rows; the
            # indexed view of the cache ([L, B, K, S, H]) is [P, T, L, K, H].
            write_idx = jnp.where(mask, positions, self.max_len)  # [P, T]
            dst = (slice(None), slot_ids[:, None], slice(None), write_idx)

            def write(x, new):
                return x.at[dst].set(jnp.transpose(new, (1, 2, 0, 3, 4)), mode="drop")

            k, v = write(cache.k, new_k), write(cache.v, new_v)
        cache = model_lib.KVCache(
            k=k, v=v, lengths=cache.lengths.at[slot_ids].set(start + num_tokens, mode="drop")
        )
        return _arm_slots(state.replace(cache=cache), slot_ids, next_token, sampling)

    def _copy_impl(
        self,
        state: EngineState,
        donors,
        slot_ids,
        offset,
        num_tokens,
        lengths,
        next_token,
        sampling,
    ) -> EngineState:
        """Copies cache entries [offset, offset + num_tokens) of slots `donors` [C] to slots
        `slot_ids` [C], sets their lengths to `lengths` [C] and arms them.

        A shared prefix is prefilled once, into the donor, and copied into every slot that starts
        with it: moving a chunk's keys and values costs a small fraction of computing them. One
        prefill chunk of positions per call keeps the shapes fixed and the temporaries small.
        """
        cache = state.cache
        idx = offset + jnp.arange(self.prefill_chunk)  # [W]
        valid = jnp.arange(self.prefill_chunk)[None, :] < num_tokens[:, None]  # [C, W]
        src = (slice(None), donors[:, None], slice(None), idx[None, :])
        dst = (
            slice(None),
            slot_ids[:, None],
            slice(None),
            jnp.where(valid, idx[None, :], self.max_len),
        )

        def copy(x):  # [L, B, K, S, H]; both indexed views are [C, W, L, K, H]
            return x.at[dst].set(x.at[src].get(mode="fill", fill_value=0), mode="drop")

        cache = model_lib.KVCache(
            k=copy(cache.k),
            v=copy(cache.v),
            lengths=cache.lengths.at[slot_ids].set(lengths, mode="drop"),
        )
        return _arm_slots(state.replace(cache=cache), slot_ids, next_token, sampling)

    def _decode_impl(
        self, params, state: EngineState, rows, allowed, max_steps, kv_len: int
    ) -> EngineState:
        """Decodes the active slots among `rows` up to `max_steps` steps.

        `rows` [decode_rows] are slot ids (num_slots pads); `allowed` [B] is the host's view of
        which slots decode, and deactivates released slots. Attention reads only the first
        `kv_len` cache positions (static): the host picks it so that every position the chunk
        reads or writes for a decoding row lies below it. Rows that do not decode may hold
        longer caches; what they compute is discarded and they write nothing.
        """
        model = nnx.merge(self._graphdef, params)
        state = state.replace(active=state.active & allowed)
        if rows.shape[0] == self.num_slots:
            # Every slot has its row: the model writes the engine's cache in place.
            cache = state.cache.replace(kv_len=kv_len)
            decoded = self._decode_loop(model, state.replace(cache=cache), max_steps)
            return decoded.replace(cache=decoded.cache.replace(kv_len=None))
        # One gather and one scatter of the rows' state per chunk, not per step, and of their
        # first kv_len cache positions only (all that the chunk touches).
        decoded = self._decode_loop(model, _take_rows(state, rows, kv_len), max_steps)
        return _put_rows(state, rows, decoded)

    def _decode_loop(self, model, state: EngineState, max_steps) -> EngineState:
        """Decodes every active row up to `max_steps` steps; stops early when all have finished."""
        b, s = state.gen_tokens.shape
        sp = state.sampling
        rows = jnp.arange(b)
        window = self.max_stop_len
        has_seq = jnp.any(sp.stop_seqs != _PAD_ID, axis=-1)  # [B, M]

        def one_step(carry):
            i, st = carry
            active = st.active
            logits, cache = model(
                st.next_token[:, None], st.cache.lengths[:, None], st.cache, active[:, None]
            )
            # The sampled token sits at position lengths + 1 (after the pending one).
            keys = _slot_keys(sp.seed, st.cache.lengths + 1)
            tokens, logprobs = sample_tokens(logits[:, 0], sp.temperature, sp.top_k, sp.top_p, keys)
            write = jnp.where(active, st.num_generated, s)  # out of range for inactive: dropped
            gen_tokens = st.gen_tokens.at[rows, write].set(tokens, mode="drop")
            gen_logprobs = st.gen_logprobs.at[rows, write].set(logprobs, mode="drop")
            num_generated = st.num_generated + active.astype(jnp.int32)

            # Stop sequences match the tail of what was generated since the last add/append, so
            # one that straddles two decode chunks is still found.
            idx = num_generated[:, None] - window + jnp.arange(window)[None, :]  # [B, W]
            tail = jnp.take_along_axis(gen_tokens, jnp.clip(idx, 0, s - 1), axis=1)
            tail = jnp.where(idx >= 0, tail, _PAD_ID - 1)
            seq_hit = jnp.all(
                (sp.stop_seqs == _PAD_ID) | (sp.stop_seqs == tail[:, None, :]), axis=-1
            )
            stop = jnp.any(seq_hit & has_seq, axis=-1)
            stop |= jnp.any(tokens[:, None] == sp.stop_ids, axis=-1)
            # A sequence (cache + pending token) never exceeds max_len: "length" when it is full.
            length = (num_generated >= sp.max_new_tokens) | (cache.lengths + 1 >= s)
            reason = jnp.where(stop, _FINISH_STOP, jnp.where(length, _FINISH_LENGTH, 0))
            done = active & (reason != _NOT_FINISHED)
            st = st.replace(
                cache=cache,
                next_token=jnp.where(active, tokens, st.next_token),
                active=active & ~done,
                finish_reason=jnp.where(done, reason, st.finish_reason),
                num_generated=num_generated,
                gen_tokens=gen_tokens,
                gen_logprobs=gen_logprobs,
            )
            return i + 1, st

        def keep_going(carry):
            i, st = carry
            return (i < max_steps) & jnp.any(st.active)

        _, state = jax.lax.while_loop(keep_going, one_step, (jnp.int32(0), state))
        return state


def _decode_lens(min_decode_len: int, max_len: int) -> tuple[int, ...]:
    """min_decode_len, doubled while below max_len, then max_len: a decode chunk attends over at
    most twice the positions it needs (or min_decode_len), and a cache of C positions costs
    about log2(C / min_decode_len) + 1 decode programs."""
    lens = []
    n = min_decode_len
    while n < max_len:
        lens.append(n)
        n *= 2
    return (*lens, max_len)


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _arm_slots(state: EngineState, slot_ids, next_token, sampling: SlotSampling) -> EngineState:
    """`state` with slots `slot_ids` set to decode from `next_token` with `sampling`; ids past
    the last slot (padding) change nothing."""

    def put(x, value):
        return x.at[slot_ids].set(value, mode="drop")

    return state.replace(
        next_token=put(state.next_token, next_token),
        active=put(state.active, True),
        finish_reason=put(state.finish_reason, _NOT_FINISHED),
        num_generated=put(state.num_generated, 0),
        sampling=jax.tree.map(put, state.sampling, sampling),
    )


def _take_rows(state: EngineState, rows, kv_len: int) -> EngineState:
    """The state of slots `rows`, with the first `kv_len` positions of their caches; ids past
    the last slot read zeros (inactive padding rows)."""

    def take(x, axis=0):
        return jnp.take(x, rows, axis=axis, mode="fill", fill_value=0)

    cache = state.cache
    return EngineState(
        cache=model_lib.KVCache(
            k=take(cache.k[:, :, :, :kv_len], 1),
            v=take(cache.v[:, :, :, :kv_len], 1),
            lengths=take(cache.lengths),
        ),
        next_token=take(state.next_token),
        active=take(state.active),
        finish_reason=take(state.finish_reason),
        num_generated=take(state.num_generated),
        gen_tokens=take(state.gen_tokens),
        gen_logprobs=take(state.gen_logprobs),
        sampling=jax.tree.map(take, state.sampling),
    )


def _put_rows(state: EngineState, rows, decoded: EngineState) -> EngineState:
    """`state` with slots `rows` set from `decoded`, whose caches may be a prefix of positions;
    padding rows write nothing. Decoding never changes the sampling settings, so they are not
    written back."""

    def put(x, y, axis=0):
        return x.at[(slice(None),) * axis + (rows,)].set(y, mode="drop")

    cache, new = state.cache, decoded.cache
    kv_len = new.max_len
    return state.replace(
        cache=model_lib.KVCache(
            k=cache.k.at[:, rows, :, :kv_len].set(new.k, mode="drop"),
            v=cache.v.at[:, rows, :, :kv_len].set(new.v, mode="drop"),
            lengths=put(cache.lengths, new.lengths),
        ),
        next_token=put(state.next_token, decoded.next_token),
        active=put(state.active, decoded.active),
        finish_reason=put(state.finish_reason, decoded.finish_reason),
        num_generated=put(state.num_generated, decoded.num_generated),
        gen_tokens=put(state.gen_tokens, decoded.gen_tokens),
        gen_logprobs=put(state.gen_logprobs, decoded.gen_logprobs),
    )
