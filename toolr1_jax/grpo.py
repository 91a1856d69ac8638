"""GRPO math as pure `jnp` functions: group advantages, token log-probs, the clipped loss.

Alignment used everywhere here: per-token arrays are indexed by token position, like
`Trajectory.loss_mask` and `Trajectory.behaviour_logprobs`. `logp[:, t]` is the log-prob of
`tokens[:, t]` given `tokens[:, :t]`; position 0 has no prediction and holds 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k2", "k3")

# Metric names by how micro-batch values combine: token-weighted mean, min, or max.
MIN_METRICS = ("ratio_min",)
MAX_METRICS = ("ratio_max", "is_weight_max")


def group_advantages(rewards, group_size: int, *, scale: bool = True, eps: float = 1e-6):
    """Per-group baseline: rewards [B] with groups of `group_size` contiguous rows -> [B] float32.

    `(r - mean) / (std + eps)` with the population std of the group, or `r - mean` when
    `scale=False` (Dr. GRPO).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {rewards.shape}.")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"The number of rewards ({rewards.shape[0]}) must be a positive multiple of "
            f"group_size ({group_size})."
        )
    r = rewards.reshape(-1, group_size)  # [B/G, G]
    centred = r - r.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (r.std(axis=1, keepdims=True) + eps)
    return centred.reshape(-1)


def _check_temperature(temperature):
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")


# The per-position statistic `_next_token_stats` returns next to the log-probs (no gradient).
STATS = (None, "entropy", "argmax_hit")


def _chunk_stats(head_fn: Callable, stat: str | None, w, xc, tc, temperature):
    """(log-probs, statistic, log-normalisers) [B, C] and the probabilities [B, C, V] of one
    chunk; see `_next_token_stats`. Callers that drop the probabilities leave XLA to remove them."""
    logits = head_fn(w, xc).astype(jnp.float32) / temperature  # [B, C, V]
    # One exp pass serves the normaliser, the entropy and the probabilities.
    top = logits.max(axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = e.sum(axis=-1)
    logz = top[..., 0] + jnp.log(total)
    probs = e / total[..., None]
    # A one-hot product rather than a gather: it stays local when V is sharded over 'tensor'.
    # (Multiplying rather than selecting: XLA:CPU materialised the select's [B, C, V] zeros.)
    hit = jnp.arange(logits.shape[-1]) == tc[..., None]
    target_logit = jnp.sum(logits * hit, axis=-1)  # exact: one term times 1, the rest times 0
    lp = target_logit - logz
    if stat == "entropy":
        return lp, logz - jnp.sum(e * logits, axis=-1) / total, logz, probs
    if stat == "argmax_hit":  # the target has the largest logit (1.0) or not (0.0)
        return lp, (target_logit >= top[..., 0]).astype(jnp.float32), logz, probs
    return lp, jnp.zeros_like(lp), logz, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunk_logprobs(head_fn: Callable, stat: str | None, keep: bool, w, xc, tc, temperature):
    lp, ent, _, _ = _chunk_stats(head_fn, stat, w, xc, tc, temperature)
    return lp, ent


def _chunk_logprobs_fwd(head_fn, stat, keep, w, xc, tc, temperature):
    lp, ent, logz, probs = _chunk_stats(head_fn, stat, w, xc, tc, temperature)
    # Either the probabilities are kept for the backward ([B, C, V] floats per chunk), or only
    # the log-normaliser, and the backward recomputes the logits (one more head matmul).
    kept = probs if keep else logz
    return (lp, ent), (w, xc, tc, temperature, kept)


def _chunk_logprobs_bwd(head_fn, stat, keep, res, cts):
    w, xc, tc, temperature, kept = res
    g = cts[0]  # The statistic is a metric: its cotangent is dropped (stop-gradient).
    # With the probabilities kept, the head's output is unused and XLA drops its matmul: only
    # the two gradient matmuls run.
    logits, head_vjp = jax.vjp(head_fn, w, xc)
    # d log p(target) / d z = onehot(target) - softmax(z), with z = logits / temperature.
    p = kept if keep else jnp.exp(logits.astype(jnp.float32) / temperature - kept[..., None])
    hit = jnp.arange(p.shape[-1]) == tc[..., None]
    dz = (hit - p) * (g / temperature)[..., None]
    dw, dx = head_vjp(dz.astype(logits.dtype))
    # The temperature is the sampler's, a constant here: no gradient flows to it.
    return dw, dx, None, jnp.zeros_like(temperature)


_chunk_logprobs.defvjp(_chunk_logprobs_fwd, _chunk_logprobs_bwd)


def _next_token_stats(
    head_fn: Callable, w, x, tokens, temperature, chunk_size: int, stat, keep_probs: bool = False
):
    """Log-probs of `tokens` at their own positions from inputs x [B, T, ...], and a statistic
    of each position's distribution (`stat` in STATS; zeros for None), both [B, T] float32.

    `head_fn(w, x_chunk) -> logits [B, C, V]` runs on one chunk of C positions at a time, and
    the hand-written backward recomputes each chunk's logits, so neither pass holds [B, T, V]
    whole; with `keep_probs` the forward keeps every chunk's probabilities for the backward
    instead ([B, T, V] float32 held, one head matmul fewer). The fused gradient (onehot -
    softmax) also skips the elementwise passes that autodiff of max/exp/log/select would add on
    [B, C, V].
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if stat not in STATS:
        raise ValueError(f"Unknown statistic {stat!r}; expected one of {STATS}.")
    _check_temperature(temperature)
    b, t = tokens.shape
    if x.shape[:2] != (b, t):
        raise ValueError(f"Inputs {x.shape} and tokens {tokens.shape} disagree on [B, T].")
    # Row t of x predicts token t + 1; the last row predicts nothing (target 0, dropped below).
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    # As many chunks as chunk_size asks for, evened out so the padding is under one per chunk.
    n = -(-t // chunk_size)
    c = -(-t // n)
    pad = n * c - t
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    xs = x.reshape(b, n, c, *x.shape[2:]).swapaxes(0, 1)  # [n, B, C, ...]
    ts = targets.reshape(b, n, c).swapaxes(0, 1)  # [n, B, C]
    temperature = jnp.asarray(temperature, jnp.float32)

    def chunk(args):
        xc, tc = args
        return _chunk_logprobs(head_fn, stat, keep_probs, w, xc, tc, temperature)

    lp, ent = jax.lax.map(chunk, (xs, ts))  # [n, B, C] each

    def align(v):
        v = v.swapaxes(0, 1).reshape(b, n * c)[:, : t - 1]
        return jnp.pad(v, ((0, 0), (1, 0)))

    return align(lp), align(ent)


def _identity_head(_, logits):
    return logits


@jax.custom_vjp
def _matmul_head(w, hidden):
    # 2-D, as in the model: XLA:CPU's weight gradient of a 3-D einsum is slow.
    return (hidden.reshape(-1, hidden.shape[-1]) @ w).reshape(*hidden.shape[:-1], w.shape[-1])


def _matmul_head_fwd(w, hidden):
    return _matmul_head(w, hidden), (w, hidden)


def _matmul_head_bwd(res, g):
    """The LM head's gradients. For the weight's, `x.T @ g` with the transpose left to XLA:CPU
    folds it into the dot, which ran at half the matmul rate at V = 49k ([2048 x 576]^T x
    [2048 x 49152]: 73 vs 150 GFLOP/s); the transpose made a buffer of its own (the barrier
    keeps XLA from folding it back) costs little at [rows, D]."""
    w, hidden = res
    x = hidden.reshape(-1, hidden.shape[-1])
    g = g.reshape(-1, g.shape[-1])
    dw = jax.lax.optimization_barrier(x.T) @ g
    return dw.astype(w.dtype), (g @ w.T).reshape(hidden.shape).astype(hidden.dtype)


_matmul_head.defvjp(_matmul_head_fwd, _matmul_head_bwd)


def token_logprobs(logits, tokens, temperature, *, chunk_size: int = 256):
    """float32 log-softmax(logits / temperature) at the sampled tokens: [B, T, V], [B, T] -> [B, T].

    Output is aligned to token positions (`out[:, t] = log p(tokens[t] | tokens[:t])`, out[:, 0]
    = 0). The float32 softmax is formed `chunk_size` positions at a time.
    """
    logits = jnp.asarray(logits)
    lp, _ = _next_token_stats(_identity_head, (), logits, tokens, temperature, chunk_size, None)
    return lp


def sequence_logprobs(
    model,
    tokens,
    positions,
    attn_mask,
    temperature,
    *,
    chunk_size: int = 256,
    stat: str | None = None,
):
    """Token log-probs [B, T] of a batch under an NNX `Transformer`, same alignment as above.

    Runs the trunk once and the LM head per chunk of `chunk_size` positions. With a `stat`
    returns `(logp, values)`, a stop-gradient statistic of the distribution each token was
    drawn from: "entropy", or "argmax_hit" (1.0 where the token is the most likely one).
    A gradient through the head follows the model's `remat`: "none" keeps the probabilities
    ([B, T, V] float32) rather than recompute the logits in the backward.
    """
    hidden, _ = model.hidden_states(tokens, positions, attn_mask=attn_mask)  # [B, T, D]
    keep = model.remat == "none"
    lp, values = _next_token_stats(
        _matmul_head, model.head_weight(), hidden, tokens, temperature, chunk_size, stat, keep
    )
    return lp if stat is None else (lp, values)


def kl_penalty(log_ref_ratio, estimator: str):
    """Per-token estimate of KL(pi_theta || pi_ref) from `log_ref_ratio = ref_logp - logp` of
    sampled tokens; k1 is deliberately absent."""
    d = log_ref_ratio
    if estimator == "k3":
        return jnp.expm1(d) - d  # exp(d) - 1 - d without the cancellation of exp(d) - 1
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    raise ValueError(f"Unknown kl_estimator {estimator!r}; expected one of {KL_ESTIMATORS}.")


def grpo_loss(
    logp,
    prox_logp,
    behaviour_logp,
    ref_logp,
    advantages,
    mask,
    *,
    clip_low: float,
    clip_high: float,
    is_cap: float,
    beta: float,
    kl_estimator: str,
    aggregation: str,
    entropy=None,
    segment_ids=None,
):
    """Decoupled clipped GRPO objective: returns `(loss_sum, denominator, metrics)`.

    Per token, with `r = exp(logp - prox_logp)` and `w = min(exp(prox_logp - behaviour_logp),
    is_cap)` held constant:
        w * max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) + beta * KL
    The loss is `loss_sum / denominator`; both are returned so that gradient accumulation sums
    each over micro-batches and divides once. Aggregations:
      token_mean:               sum over tokens / number of tokens
      seq_mean_token_mean:      sum over sequences of (token mean) / number of sequences
      seq_mean_token_sum_norm:  sum over sequences of (token sum / T) / number of sequences,
                                T the padded length (Dr. GRPO's constant normaliser)
    Sequences without loss tokens do not count. All per-token arrays are [B, T]; `advantages`
    is [B] (one per sequence) or [B, T]; `ref_logp` may be None when `beta == 0`. With
    `segment_ids` [B, T] (int, 0 padding) a row packs several sequences and the "sequences"
    above are its segments; None means one per row.
    Metrics are token means over the masked tokens, except `*_min`/`*_max`, and `num_tokens`.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}.")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator {kl_estimator!r}; expected one of {KL_ESTIMATORS}.")
    if beta < 0 or clip_low < 0 or clip_high < 0 or is_cap <= 0:
        raise ValueError(
            f"Need beta >= 0, clip_low >= 0, clip_high >= 0 and is_cap > 0; got beta={beta}, "
            f"clip_low={clip_low}, clip_high={clip_high}, is_cap={is_cap}."
        )
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs reference log-probs (ref_logp is None).")
    named = {"prox_logp": prox_logp, "behaviour_logp": behaviour_logp, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    if entropy is not None:
        named["entropy"] = entropy
    for name, v in named.items():
        if v.shape != logp.shape:
            raise ValueError(f"{name} has shape {v.shape}, expected logp's shape {logp.shape}.")
    if logp.ndim != 2:
        raise ValueError(f"Per-token inputs must be [B, T], got {logp.shape}.")
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.shape == logp.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [B] or [B, T], got {advantages.shape}.")

    f32 = jnp.float32
    logp = logp.astype(f32)
    prox_logp = jax.lax.stop_gradient(prox_logp.astype(f32))
    behaviour_logp = behaviour_logp.astype(f32)
    mask = mask.astype(f32)

    # Masked positions (prompt, observations, padding) may hold arbitrary log-probs: a reference
    # model or a stale pi_prox can put a log-difference above ~88 there, where float32 exp
    # overflows and the mask's 0 x inf turns the loss and its gradient NaN. Every
    # log-difference is therefore zeroed outside the mask *before* it is exponentiated; `where`
    # also sends zero gradient to the branch it does not take.
    valid = mask > 0
    ratio = jnp.exp(jnp.where(valid, logp - prox_logp, 0.0))
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(-advantages * ratio, -advantages * clipped)
    log_w = jnp.where(valid, prox_logp - behaviour_logp, 0.0)
    is_weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), is_cap))
    per_token = is_weight * pg
    kl = None
    if ref_logp is not None:
        ref_logp = jax.lax.stop_gradient(ref_logp.astype(f32))
        kl = kl_penalty(jnp.where(valid, ref_logp - logp, 0.0), kl_estimator)
        if beta > 0:
            per_token = per_token + beta * kl

    if segment_ids is None:
        tokens_per_seq = mask.sum(axis=-1)  # [B]
        seq_sums = (per_token * mask).sum(axis=-1)
    else:  # one sum per (row, segment): ids row * (T + 1) + segment are distinct
        b, t = mask.shape
        ids = (jnp.arange(b)[:, None] * (t + 1) + segment_ids).reshape(-1)
        tokens_per_seq = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=b * (t + 1))
        seq_sums = jax.ops.segment_sum(
            (per_token * mask).reshape(-1), ids, num_segments=b * (t + 1)
        )
    num_seqs = (tokens_per_seq > 0).sum().astype(f32)
    if aggregation == "token_mean":
        loss_sum, denominator = seq_sums.sum(), tokens_per_seq.sum()
    elif aggregation == "seq_mean_token_mean":
        loss_sum, denominator = (seq_sums / jnp.maximum(tokens_per_seq, 1.0)).sum(), num_seqs
    else:
        loss_sum, denominator = seq_sums.sum() / logp.shape[-1], num_seqs

    num_tokens = tokens_per_seq.sum()
    n = jnp.maximum(num_tokens, 1.0)

    def mean(v):
        return jax.lax.stop_gradient((v * mask).sum() / n)

    ratio_sg = jax.lax.stop_gradient(ratio)
    metrics = {
        "num_tokens": num_tokens,
        # Tokens whose gradient the clip removed: the pessimistic branch is the clipped one.
        "clip_frac_low": mean(((ratio_sg < 1.0 - clip_low) & (advantages < 0)).astype(f32)),
        "clip_frac_high": mean(((ratio_sg > 1.0 + clip_high) & (advantages > 0)).astype(f32)),
        "ratio_mean": mean(ratio_sg),
        "ratio_min": jnp.min(jnp.where(valid, ratio_sg, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(valid, ratio_sg, -jnp.inf)),
        "is_weight_mean": mean(is_weight),
        "is_weight_max": jnp.max(jnp.where(valid, is_weight, -jnp.inf)),
        "is_capped_frac": mean((jnp.exp(log_w) > is_cap).astype(f32)),
        # Sampler-vs-trainer mismatch: mean |log pi_prox - log pi_behaviour| over sampled tokens.
        "logp_gap": mean(jnp.abs(log_w)),
        "pg_loss": mean(pg),
    }
    if kl is not None:
        metrics["kl"] = mean(kl)
    if entropy is not None:
        metrics["entropy"] = mean(entropy.astype(f32))
    return loss_sum, denominator, metrics
