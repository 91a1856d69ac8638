"""The one jitted update step: micro-batched forward and loss, accumulated gradients, optax step.

GRPO (`LossConfig`) and cold-start SFT (`SFT_LOSS`) plug their per-micro-batch loss into the same
step builder; `make_batch` turns trajectories into the fixed-shape `Batch` both read.

    graphdef, state = nnx.split(model)          # every variable must be an nnx.Param
    optimizer = make_optimizer(...)
    opt_state = optimizer.init(state)
    step = make_train_step(graphdef, optimizer, loss, num_microbatches=4, mesh=mesh)
    state, opt_state, metrics = step(state, opt_state, batch, ref_state)
`state` and `opt_state` are donated; keep no other reference to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from toolr1_jax import grpo
from toolr1_jax.data import types as data_types

BATCH_AXES = ("data", "fsdp")

# Episode statuses that mean a limit cut the episode short (`drop_truncated` masks them out).
TRUNCATED_STATUSES = ("max_turns", "max_tokens", "timeout")

# The metrics whose non-finite value stops a run (see `check_finite`).
GUARDED_METRICS = ("loss", "grad_norm")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    is_cap: float = 2.0  # C in min(pi_prox / pi_behaviour, C)
    beta: float = 0.0  # KL to the frozen reference; 0 disables it
    kl_estimator: str = "k3"
    aggregation: str = "token_mean"
    temperature: float = 1.0  # the sampler's; logits are divided by it before log-softmax

    def __post_init__(self):
        if self.aggregation not in grpo.AGGREGATIONS:
            raise ValueError(
                f"Unknown aggregation {self.aggregation!r}; expected one of {grpo.AGGREGATIONS}."
            )
        if self.kl_estimator not in grpo.KL_ESTIMATORS:
            raise ValueError(
                f"Unknown kl_estimator {self.kl_estimator!r}; expected one of "
                f"{grpo.KL_ESTIMATORS} (k1 is not offered: its per-token estimate is noise)."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if self.clip_low < 0 or self.clip_high < 0 or self.is_cap <= 0 or self.beta < 0:
            raise ValueError(
                "Need clip_low >= 0, clip_high >= 0, is_cap > 0 and beta >= 0; got "
                f"{self.clip_low}, {self.clip_high}, {self.is_cap}, {self.beta}."
            )

    # The statistic of each token's distribution the forward returns next to the log-probs.
    stat = "entropy"

    def micro_loss(self, logp, entropy, mb: Batch, ref_logp):
        """GRPO on one micro-batch: `(loss_sum, denominator, metrics)`, see `grpo.grpo_loss`."""
        # One optimizer step per rollout batch: the params have not moved since the rollout
        # batch was formed, so the current log-probs (stop-gradient) are pi_prox exactly.
        prox = jax.lax.stop_gradient(logp) if mb.prox_logprobs is None else mb.prox_logprobs
        return grpo.grpo_loss(
            logp,
            prox,
            mb.behaviour_logprobs,
            ref_logp,
            mb.advantages,
            mb.loss_mask * mb.attn_mask,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            is_cap=self.is_cap,
            beta=self.beta,
            kl_estimator=self.kl_estimator,
            aggregation=self.aggregation,
            entropy=entropy,
            segment_ids=mb.segment_ids,
        )

    def combine(self, stacked, denominator):
        del denominator  # GRPO's metrics are token means per micro-batch
        return combine_metrics(stacked)


@dataclasses.dataclass(frozen=True)
class SFTLoss:
    """Cold-start SFT: the mean negative log-likelihood of the loss-mask tokens. Metrics: loss,
    token_accuracy (argmax hits), num_tokens, grad_norm."""

    temperature: float = 1.0
    beta: float = 0.0  # no reference model
    stat = "argmax_hit"

    def micro_loss(self, logp, hit, mb: Batch, ref_logp):
        del ref_logp
        mask = (mb.loss_mask * mb.attn_mask).astype(jnp.float32)
        mask = mask.at[:, 0].set(0.0)  # position 0 has no prediction, whatever its mask says
        count = jnp.sum(mask)
        # Sums, divided once over the whole batch by `combine`: exact token counts, no means of
        # means.
        return -jnp.sum(logp * mask), count, {"hits": jnp.sum(hit * mask), "num_tokens": count}

    def combine(self, stacked, denominator):
        return {
            "token_accuracy": stacked["hits"].sum() / denominator,
            "num_tokens": stacked["num_tokens"].sum(),
        }


SFT_LOSS = SFTLoss()


@struct.dataclass
class Batch:
    """One update batch. Per-token arrays are [B, L] and indexed by token position.

    `prox_logprobs`: log-probs under the policy at the start of the update phase. Leave it None
    when each rollout batch gets one optimizer step: the params then do not change before the
    step's gradient, so the current log-probs (stop-gradient) are exactly pi_prox and no second
    forward pass is needed. For several optimizer steps per rollout batch, compute it once with
    `make_logprob_fn` before the first step.
    """

    tokens: jax.Array  # [B, L] int32
    positions: jax.Array  # [B, L] int32
    attn_mask: jax.Array  # [B, L] bool, real (non-padding) tokens
    loss_mask: jax.Array  # [B, L], 1 where the policy sampled the token
    behaviour_logprobs: jax.Array  # [B, L] float32, the sampler's log-probs (0 elsewhere)
    advantages: jax.Array  # [B] or [B, L] float32
    prox_logprobs: jax.Array | None = None  # [B, L] float32
    # [B, L] int32 when rows pack several sequences (`make_batch(pack=True)`): 1, 2, ... per
    # sequence, 0 for padding. None: one sequence per row.
    segment_ids: jax.Array | None = None


def _decays(v: nnx.Variable) -> bool:
    # Decay the matrices that touch the model dim; norms, biases (no 'embed' axis) are exempt.
    return v.ndim >= 2 and "embed" in v.get_metadata().get("logical_axes", ())


def weight_decay_mask(params):
    return jax.tree.map(
        lambda v: v.replace(value=_decays(v)),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float,
    max_grad_norm: float,
    b1: float = 0.9,
    b2: float = 0.999,
    *,
    end_lr_ratio: float = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with linear warmup and cosine decay to `end_lr_ratio*lr`,
    on float32 master weights when the params are low-precision (`float32_master_weights`).

    The default `end_lr_ratio=1.0` holds `lr` after warmup (the usual RL fine-tuning schedule).
    Weight decay applies only to matrices with an 'embed' logical axis.
    """
    if lr <= 0 or warmup_steps < 0 or total_steps <= warmup_steps or max_grad_norm <= 0:
        raise ValueError(
            "Need lr > 0, 0 <= warmup_steps < total_steps and max_grad_norm > 0; got "
            f"lr={lr}, warmup_steps={warmup_steps}, total_steps={total_steps}, "
            f"max_grad_norm={max_grad_norm}."
        )
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=lr * end_lr_ratio,
    )
    return float32_master_weights(
        optax.chain(
            optax.clip_by_global_norm(max_grad_norm),
            optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask),
        )
    )


class MasterWeightsState(NamedTuple):
    master: Any  # float32 copy of the params
    inner: optax.OptState  # the wrapped optimizer's state, built on `master`


def float32_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to a float32 copy of low-precision (e.g. bfloat16) params.

    Adam moves a weight by about the learning rate (1e-6 in RL fine-tuning), far below
    bfloat16's resolution (a 0.02 weight's neighbours are 1e-4 away): added to bfloat16 params
    directly, nearly every step rounds away and the model does not train. So the optimizer
    state keeps float32 master weights (and float32 moments), steps those, and returns for each
    param the update that lands it on its master value rounded to the param's dtype. With
    float32 params the wrapper adds nothing: the state is `inner`'s own.
    """

    def init(params):
        if all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)):
            return inner.init(params)
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterWeightsState(master, inner.init(master))

    def update(updates, state, params=None):
        if not isinstance(state, MasterWeightsState):
            return inner.update(updates, state, params)
        if params is None:
            raise ValueError("float32_master_weights needs the params in update().")
        updates = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        steps, inner_state = inner.update(updates, state.inner, state.master)
        master = optax.apply_updates(state.master, steps)
        # In float32, p + (rounded - p) is exactly `rounded` (both are bfloat16 values), so
        # optax.apply_updates leaves each param equal to its master value in the param's dtype.
        to_master = jax.tree.map(
            lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32),
            master,
            params,
        )
        return to_master, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def _microbatches(batch: Batch, num_microbatches: int, mesh) -> Batch:
    """[B, ...] -> [M, B/M, ...]; micro-batch j holds rows j, j + M, j + 2M, ...

    Strided rather than contiguous so that every micro-batch keeps rows on every data shard.
    """

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"Batch size {x.shape[0]} is not divisible by num_microbatches {num_microbatches}."
            )
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        x = x.swapaxes(0, 1)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
        return x

    return jax.tree.map(split, batch)


def combine_metrics(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-micro-batch metrics [M] -> one value each: token-weighted means, min, max, sum."""
    n = stacked["num_tokens"]
    total = n.sum()
    out = {}
    for k, v in stacked.items():
        if k == "num_tokens":
            out[k] = total
        elif k in grpo.MIN_METRICS or k in grpo.MAX_METRICS:
            # Over the micro-batches with tokens; over none at all it is reported as 0, not +-inf.
            if k in grpo.MIN_METRICS:
                extreme = jnp.where(n > 0, v, jnp.inf).min()
            else:
                extreme = jnp.where(n > 0, v, -jnp.inf).max()
            out[k] = jnp.where(total > 0, extreme, 0.0)
        else:
            out[k] = (v * n).sum() / jnp.maximum(total, 1.0)
    return out


def _make_grads(graphdef, loss, num_microbatches: int, mesh, chunk_size: int):
    """(state, batch, ref_state) -> (mean-loss gradients [float32], metrics), and the log-prob
    function `(state, micro-batch, stat) -> logp` it uses."""

    def logprobs(state, mb, stat):
        model = nnx.merge(graphdef, state)
        return grpo.sequence_logprobs(
            model,
            mb.tokens,
            mb.positions,
            mb.attn_mask if mb.segment_ids is None else mb.segment_ids,
            loss.temperature,
            chunk_size=chunk_size,
            stat=stat,
        )

    def micro_loss(state, mb, ref_state):
        logp, stat = logprobs(state, mb, loss.stat)
        ref = None
        if ref_state is not None:
            ref = jax.lax.stop_gradient(logprobs(ref_state, mb, None))
        loss_sum, denominator, metrics = loss.micro_loss(logp, stat, mb, ref)
        return loss_sum, (denominator, metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads_and_metrics(state, batch: Batch, ref_state):
        if loss.beta > 0 and ref_state is None:
            raise ValueError("LossConfig.beta > 0 needs ref_state (the frozen reference params).")
        mbs = _microbatches(batch, num_microbatches, mesh)

        def body(carry, mb):
            acc, loss_acc, den_acc = carry
            (loss_sum, (den, metrics)), g = grad_fn(state, mb, ref_state)
            # Accumulate un-normalised sums in float32; divide once by the global denominator.
            acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
            return (acc, loss_acc + loss_sum, den_acc + den), metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (acc, loss_sum, den), stacked = _loop_over_microbatches(body, init, mbs, num_microbatches)
        # A batch without loss tokens: zero loss and zero gradient, not NaN.
        den = jnp.where(den > 0, den, 1.0)
        grads = jax.tree.map(lambda g: g / den, acc)
        metrics = loss.combine(stacked, den)
        metrics["loss"] = loss_sum / den
        metrics["grad_norm"] = optax.tree.norm(grads)
        return grads, metrics

    return grads_and_metrics, logprobs


def _loop_over_microbatches(body, init, mbs, num_microbatches: int):
    """`jax.lax.scan(body, init, mbs)` over the micro-batches that hold a real token.

    Micro-batches of padding only are skipped, so a batch whose rows were packed into the first
    micro-batches (`make_batch(pack=True, ...)`) costs what its tokens need; their metrics stay
    zero, and `combine_metrics` counts them as micro-batches without tokens.

    The loop boundary is what keeps the update's memory at one micro-batch's activations: XLA
    removes a loop of one trip, and in the flat program that leaves, the optimizer's global-norm
    clipping let XLA:CPU keep every layer's recomputed activations alive at once (15 GiB of
    temporaries for a SmolLM2-size B8 x 1024 step, against 1.6 GiB with two micro-batches). The
    trip count, read from the batch, is not a constant, so the loop stays.
    """
    mask = mbs.attn_mask
    active = jnp.any(mask, axis=tuple(range(1, mask.ndim)))  # [M]
    order = jnp.argsort(~active, stable=True)  # the active micro-batches first, in order
    first = jax.tree.map(lambda x: x[0], mbs)
    _, metrics_shape = jax.eval_shape(body, init, first)
    stacked = jax.tree.map(
        lambda s: jnp.zeros((num_microbatches, *s.shape), s.dtype), metrics_shape
    )

    def step(i, carry):
        acc, stacked = carry
        j = order[i]
        mb = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), mbs)
        acc, metrics = body(acc, mb)
        stacked = jax.tree.map(
            lambda s, m: jax.lax.dynamic_update_index_in_dim(s, m, j, axis=0), stacked, metrics
        )
        return acc, stacked

    return jax.lax.fori_loop(0, active.sum(), step, (init, stacked))


def _replicated_unless_named(tree, mesh):
    """Each leaf's current sharding, or replicated on `mesh` when it is not already on a mesh."""

    def pick(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return s
        return NamedSharding(mesh, P())

    return jax.tree.map(pick, tree)


class _Jitted:
    """jit for `fn(state, opt_state, batch, ref_state)`; `opt_state` may be None.

    Without a mesh: plain jit. With one: the batch is laid out over ('data', 'fsdp') on its
    leading dim, leaves of the state not yet on the mesh are replicated, and
    `out_shardings_fn(state_shardings, opt_shardings)` gives the output shardings, so the
    returned state keeps its layout, donation reuses the buffers and steady-state calls never
    recompile. `num_compilations` reads jit's own caches (nothing counts inside traced code).
    """

    def __init__(self, fn, mesh, out_shardings_fn, *, donate_argnums=()):
        self._fn, self._mesh, self._out = fn, mesh, out_shardings_fn
        self._donate = donate_argnums
        # One program per (reference given, prox given): they differ in their inputs.
        self._compiled = {}
        if mesh is None:
            self._compiled[None] = jax.jit(fn, donate_argnums=donate_argnums)

    @property
    def num_compilations(self) -> int:
        return sum(f._cache_size() for f in self._compiled.values())

    def _prepare(self, state, opt_state, batch, ref_state):
        """The jitted function for these arguments, and the arguments laid out on the mesh."""
        mesh = self._mesh
        if mesh is None:
            return self._compiled[None], (state, opt_state, batch, ref_state)
        state_s = _replicated_unless_named(state, mesh)
        opt_s = _replicated_unless_named(opt_state, mesh)
        state, opt_state = jax.device_put((state, opt_state), (state_s, opt_s))
        batch = jax.device_put(batch, NamedSharding(mesh, P(BATCH_AXES)))
        if ref_state is not None:
            ref_state = jax.device_put(ref_state, _replicated_unless_named(ref_state, mesh))
        key = (ref_state is None, batch.prox_logprobs is None)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                self._fn, donate_argnums=self._donate, out_shardings=self._out(state_s, opt_s)
            )
        return self._compiled[key], (state, opt_state, batch, ref_state)

    def _mesh_context(self):
        return contextlib.nullcontext() if self._mesh is None else jax.set_mesh(self._mesh)

    def __call__(self, state, opt_state, batch, ref_state):
        fn, args = self._prepare(state, opt_state, batch, ref_state)
        with self._mesh_context():
            return fn(*args)

    def lower(self, state, opt_state, batch, ref_state):
        """jit's `Lowered` for these arguments (`.compile().memory_analysis()` gives the
        program's memory); nothing runs and nothing is donated."""
        fn, args = self._prepare(state, opt_state, batch, ref_state)
        with self._mesh_context():
            return fn.lower(*args)


def make_grad_fn(
    graphdef,
    loss: LossConfig | SFTLoss,
    *,
    num_microbatches: int = 1,
    mesh=None,
    chunk_size: int = 256,
) -> Callable:
    """Jitted `(state, batch, ref_state=None) -> (grads, metrics)`; grads of the mean loss.

    The gradient half of `make_train_step`, for diagnostics and tests.
    """
    grads_and_metrics, _ = _make_grads(graphdef, loss, num_microbatches, mesh, chunk_size)
    jitted = _Jitted(
        lambda state, _, batch, ref: grads_and_metrics(state, batch, ref),
        mesh,
        lambda state_s, _: (state_s, None),
    )

    def grad_fn(state, batch, ref_state=None):
        return jitted(state, None, batch, ref_state)

    return grad_fn


def make_logprob_fn(
    graphdef,
    loss: LossConfig | SFTLoss,
    *,
    num_microbatches: int = 1,
    mesh=None,
    chunk_size: int = 256,
) -> Callable:
    """Jitted `(state, batch) -> logp [B, L]` (no gradient), e.g. for `Batch.prox_logprobs`."""
    _, logprobs = _make_grads(graphdef, loss, num_microbatches, mesh, chunk_size)

    def fn(state, _, batch, ref_state):
        mbs = _microbatches(batch, num_microbatches, mesh)
        lp = jax.lax.map(lambda mb: logprobs(state, mb, None), mbs)  # [M, B/M, L]
        return lp.swapaxes(0, 1).reshape(batch.tokens.shape)

    out = None if mesh is None else NamedSharding(mesh, P(BATCH_AXES))
    jitted = _Jitted(fn, mesh, lambda *_: out)
    return lambda state, batch: jitted(state, None, batch, None)


class TrainStep:
    """`step(state, opt_state, batch, ref_state=None) -> (state, opt_state, metrics)`; see
    `make_train_step`."""

    def __init__(self, jitted: _Jitted):
        self._jitted = jitted

    def __call__(self, state, opt_state, batch, ref_state=None):
        return self._jitted(state, opt_state, batch, ref_state)

    def lower(self, state, opt_state, batch, ref_state=None):
        """The step lowered for these arguments, e.g. for its compiled memory analysis."""
        return self._jitted.lower(state, opt_state, batch, ref_state)

    @property
    def num_compilations(self) -> int:
        """Programs compiled so far: tests and benchmarks check steady state adds none."""
        return self._jitted.num_compilations


def make_train_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    loss: LossConfig | SFTLoss,
    *,
    num_microbatches: int = 1,
    mesh=None,
    chunk_size: int = 256,
) -> TrainStep:
    """The one update step, for GRPO (`loss` a `LossConfig`) and SFT (`SFT_LOSS`).

    One optimizer update per call; gradients are accumulated over `num_microbatches` strided
    slices of the batch (B must divide by it) and divided once by the global denominator, so
    the result equals the full-batch update. `state` and `opt_state` are donated. With a `mesh`,
    the batch's leading dim is sharded over ('data', 'fsdp') and params keep their shardings.
    `ref_state` (same graphdef, frozen) is needed when `loss.beta > 0`; its KL metric is
    reported whenever it is given.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be positive, got {num_microbatches}.")
    grads_and_metrics, _ = _make_grads(graphdef, loss, num_microbatches, mesh, chunk_size)

    def step(state, opt_state, batch, ref_state):
        grads, metrics = grads_and_metrics(state, batch, ref_state)
        # Updates in float32 (on float32 master weights for low-precision params);
        # optax.apply_updates casts back to each param's dtype.
        updates, opt_state = optimizer.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        return state, opt_state, metrics

    # Donating the params and the optimizer state lets XLA update them in place: no second copy
    # of either in device memory. The caller must drop its references to the inputs.
    return TrainStep(
        _Jitted(step, mesh, lambda state_s, opt_s: (state_s, opt_s, None), donate_argnums=(0, 1))
    )


# ---------------------------------------------------------------------------------------------
# Batches and the guard on their results
# ---------------------------------------------------------------------------------------------


def make_batch(
    trajectories: Sequence[data_types.Trajectory],
    *,
    batch_size: int,
    max_len: int,
    advantages: Sequence[float] | None = None,
    drop_truncated: bool = False,
    pack: bool = False,
    num_microbatches: int = 1,
) -> Batch:
    """Right-pads trajectories into a host `Batch` [batch_size, max_len].

    Padding rows and positions have `attn_mask` False and `loss_mask` 0, so a fixed shape (one
    compiled step) costs nothing in the loss. `advantages` gives each trajectory's (zeros when
    None: SFT reads none); with `drop_truncated` the rows of episodes a limit cut short
    (`TRUNCATED_STATUSES`) keep their tokens but lose their loss mask.

    One trajectory per row, in order; or with `pack`, as many per row as fit (first fit, longest
    first), each its own segment (`segment_ids`; positions restart at 0, advantages per token),
    and the used rows placed so that they fill the update's first micro-batches: micro-batch j
    of `num_microbatches` holds rows j, j + M, ... (`_microbatches`), and the step skips those
    that hold padding only. Episodes under half the budget need about half the rows; episodes
    over it cannot share one. Attention never crosses segments, so the loss and gradients are
    those of the unpacked batch (`grpo_loss`'s per-sequence aggregations read the segments).
    """
    if len(trajectories) > batch_size:
        raise ValueError(f"{len(trajectories)} trajectories do not fit batch_size {batch_size}.")
    for t in trajectories:
        if len(t.tokens) > max_len:
            raise ValueError(
                f"Trajectory {t.task_id} has {len(t.tokens)} tokens, more than max_len {max_len}; "
                "raise max_len (or filter demonstrations by AgentConfig.max_total_tokens)."
            )
    adv = np.zeros((len(trajectories),), np.float32)
    if advantages is not None:
        adv[:] = advantages
    if pack:
        if batch_size % num_microbatches:
            raise ValueError(f"batch_size {batch_size} is not divisible by {num_microbatches}.")
        # bins[i]: the trajectory indices of packed row i
        bins = _first_fit([len(t.tokens) for t in trajectories], max_len)
        rows_per_mb = batch_size // num_microbatches
        row_of = [(i % rows_per_mb) * num_microbatches + i // rows_per_mb for i in range(len(bins))]
    else:
        bins = [[i] for i in range(len(trajectories))]
        row_of = list(range(len(trajectories)))
    tokens = np.zeros((batch_size, max_len), np.int32)
    positions = np.zeros((batch_size, max_len), np.int32)
    segments = np.zeros((batch_size, max_len), np.int32)
    loss_mask = np.zeros((batch_size, max_len), np.float32)
    behaviour = np.zeros((batch_size, max_len), np.float32)
    adv_tokens = np.zeros((batch_size, max_len), np.float32)
    for members, row in zip(bins, row_of, strict=True):
        start = 0
        for segment, i in enumerate(members, start=1):
            t = trajectories[i]
            span = slice(start, start + len(t.tokens))
            tokens[row, span] = t.tokens
            positions[row, span] = np.arange(len(t.tokens))
            segments[row, span] = segment
            if not (drop_truncated and t.status in TRUNCATED_STATUSES):
                loss_mask[row, span] = t.loss_mask
            # A sequence's first token has no prediction (none is sampled: it is the prompt's).
            loss_mask[row, start] = 0.0
            behaviour[row, span] = t.behaviour_logprobs
            adv_tokens[row, span] = adv[i]
            start = span.stop
    if not pack:  # the layout the unpacked step has always read
        positions[:] = np.arange(max_len, dtype=np.int32)
        row_adv = np.zeros((batch_size,), np.float32)
        row_adv[: len(trajectories)] = adv
    return Batch(
        tokens=tokens,
        positions=positions,
        attn_mask=segments > 0,
        loss_mask=loss_mask,
        behaviour_logprobs=behaviour,
        advantages=adv_tokens if pack else row_adv,
        segment_ids=segments if pack else None,
    )


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing: bins of indices into `lengths`, each summing to at most
    `capacity`; ties keep their order, so the packing is the same on every process."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, room in enumerate(free) if lengths[i] <= room), None)
        if b is None:
            bins.append([])
            free.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm that is NaN or infinite: the run stops rather than save it."""


def check_finite(metrics: dict[str, float], *, where: str, last_good: str) -> None:
    """Raises `NonFiniteError` when a `GUARDED_METRICS` value of a step's host metrics is not
    finite, naming `where` (e.g. "GRPO step 7") and `last_good` (the checkpoint to go back to).
    """
    for key in GUARDED_METRICS:
        if key in metrics and not math.isfinite(metrics[key]):
            raise NonFiniteError(
                f"{where}: {key} is {metrics[key]}; the run stops before anything non-finite is "
                f"saved. Last good checkpoint: {last_good}."
            )
