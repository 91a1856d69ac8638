"""The policy: a decoder-only transformer in Flax NNX (Qwen2/2.5, Qwen3, Llama 3.x).

Shape letters, used in names and einsums across the project:
  B batch, T query length, S kv length (cache slots), L layers, N query heads, K kv heads,
  G query heads per kv head (N // K), H head dim, D model dim, F mlp dim, V vocab.

Functional signature: `model(tokens, positions, cache=None, attn_mask=None) -> (logits, cache)`.
The KV cache is an explicit pytree (`KVCache`) passed in and returned, never hidden state, so the
engine can prefill and decode each slot independently under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
# What a gradient through the model recomputes instead of storing: see `_remat_block`.
REMAT_POLICIES = ("block", "dots", "none")

# Finite, so a query row whose keys are all masked (left padding) gives uniform weights, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Up to this many rows, a tied LM head computes vocab-major logits: see `Transformer.logits`.
_VOCAB_MAJOR_MAX_ROWS = 32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters; `from_hf` reads a transformers config (object or dict)."""

    model_type: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10000.0
    # Llama 3 scaling as a tuple of (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5
    qk_norm: bool = False  # Qwen3
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {self.model_type!r}; supported model types are "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Builds a config from a transformers `PretrainedConfig` or its `to_dict()`."""
        c = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {model_type!r} in config.json; supported model types "
                f"are {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        # transformers >= 5 keeps RoPE settings in `rope_parameters`; older files use
        # `rope_theta` and `rope_scaling`.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"Unsupported RoPE type {rope_type!r}; supported: 'default', 'llama3'."
            )
        rope_scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor")
            rope_scaling = tuple((k, float(rope[k])) for k in keys) + (
                ("original_max_position_embeddings", int(rope["original_max_position_embeddings"])),
            )
        eos = c.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        num_heads = c["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@struct.dataclass
class KVCache:
    """Per-sequence KV cache. Row b holds `lengths[b]` valid entries at indices [0, lengths[b]).

    `kv_len` (static; None = `max_len`) bounds what attention reads: only the first `kv_len`
    positions, while new entries are still written into the full cache. The caller promises that
    every row's cached entries (`lengths`) fit in that prefix; the new tokens attend to each
    other directly, not through the cache. 0 reads nothing: every row starts empty. It lets a
    step cost what the live sequences need instead of what the whole cache holds (the engine
    compiles one program per length bucket); a field of the cache rather than an argument, so
    models that wrap `Transformer` pass it through without knowing about it.
    """

    # Head-major: each (row, kv head)'s keys are one contiguous [S, H] block for decode's
    # attention to read. At SmolLM2's size, the 30 layers' decode attention of B16 rows over 384
    # positions, timed alone on a 2-core CPU: 32-44 ms in a [B, S, K, H] layout, 20 ms in this.
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    lengths: jax.Array  # [B] int32
    kv_len: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def read_len(self) -> int:
        """How many leading positions attention reads."""
        return self.max_len if self.kv_len is None else min(self.kv_len, self.max_len)


def _param(rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], dtype, std=0.02) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str | None, dtype):
        self.scale = _ones((dim,), (axis_name,), dtype)
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 and cast back before the scale, as the reference implementations do.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2], with Llama 3 frequency scaling when configured."""
    h = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if config.rope_scaling is None:
        return inv_freq
    s = dict(config.rope_scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept; the band between is interpolated.
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


def _dense(x, w, num_in: int = 1):
    """Contracts the last `num_in` dims of x with the first `num_in` dims of w, as a 2-D matmul.

    Flattening [B, T] first matters on XLA:CPU: the weight gradient of a 3-D einsum contracts
    over two token dims, and XLA lowered it with a transposed, unvectorised elementwise fusion
    that cost more than the matmul; the 2-D form gets a plain transpose. Same values either way.
    """
    lead = x.shape[: x.ndim - num_in]
    k = math.prod(w.shape[:num_in])
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *w.shape[num_in:])


def apply_rope(x, positions, inv_freq):
    """Rotary embedding in the half-split convention. x: [B, T, n, H]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        self.wq_dnh = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype)
        self.wk_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.wv_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.wo_nhd = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype)
        if config.qkv_bias:
            self.bq_nh = _zeros((n, h), ("heads", "head_dim"), dtype)
            self.bk_kh = _zeros((k, h), ("kv_heads", "head_dim"), dtype)
            self.bv_kh = _zeros((k, h), ("kv_heads", "head_dim"), dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, "head_dim", dtype)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, "head_dim", dtype)

    def __call__(self, x, positions, inv_freq, mask, past=None):
        """Attention output [B, T, D] and the new tokens' keys and values [B, T, K, H].

        x: [B, T, D]; mask [B, T, T] says which new tokens each new token sees (causal: none sees
        a later one). `past`, if given, is (keys [B, K, S, H], values, mask [B, 1 or T, S]):
        cached entries attended to jointly with the new tokens (one softmax over both), read but
        never written here.
        """
        cfg = self.config
        q = _dense(x, self.wq_dnh[...])  # [B, T, N, H]
        k = _dense(x, self.wk_dkh[...])  # [B, T, K, H]
        v = _dense(x, self.wv_dkh[...])
        if cfg.qkv_bias:
            q, k, v = q + self.bq_nh[...], k + self.bk_kh[...], v + self.bv_kh[...]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if past is not None:
            # The new keys are attended in the cache's dtype, as if read back from it.
            k, v = k.astype(past[0].dtype), v.astype(past[1].dtype)

        b, t = q.shape[:2]
        g = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim)  # [B, T, K, G, H]

        if past is None:
            out = _causal_attention(q, k, v, mask, cfg.head_dim)
            out = out.reshape(b, t, cfg.num_heads, cfg.head_dim)
            return _dense(out, self.wo_nhd[...], num_in=2), k, v
        if t == 1:
            out = _attend_one_token(q, k, v, past, cfg.head_dim)
            return _dense(out, self.wo_nhd[...], num_in=2), k, v
        scores = _scores(q, k, mask, cfg.head_dim)  # [B, K, G, T, T]
        past_k, past_v, past_mask = past
        s = past_k.shape[2]
        # One softmax over cached and new keys; the cache is only read, so XLA never has to
        # copy it to keep a read after an in-place write correct.
        past_scores = _scores(q, past_k, past_mask, cfg.head_dim, keys_layout="bksh")
        joint = jnp.concatenate([past_scores, scores], axis=-1)
        probs = jax.nn.softmax(joint, axis=-1).astype(v.dtype)  # [B, K, G, T, S + T]
        out = jnp.einsum("bkgts,bksh->btkgh", probs[..., :s], past_v)
        out = out + jnp.einsum("bkgts,bskh->btkgh", probs[..., s:], v)
        out = out.reshape(b, t, cfg.num_heads, cfg.head_dim)
        return _dense(out, self.wo_nhd[...], num_in=2), k, v


# Query-block length of the causal self-attention without a cache (training, scoring).
_CAUSAL_BLOCK = 128


def _scores(q, keys, keys_mask, head_dim: int, keys_layout: str = "bskh"):
    """Masked attention scores [B, K, G, T, S] in float32. q [B, T, K, G, H]; keys [B, S, K, H]
    (or [B, K, S, H], the cache's layout, with keys_layout="bksh"); keys_mask [B, T or 1, S]."""
    spec = f"btkgh,{keys_layout}->bkgts"
    scores = jnp.einsum(spec, q, keys, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim)
    return jnp.where(keys_mask[:, None, None, :, :], scores, _MASK_VALUE)


def _causal_attention(q, k, v, mask, head_dim: int):
    """Self-attention of T new tokens with no cache, in query blocks: [B, T, K, G, H].

    q [B, T, K, G, H]; k, v [B, T, K, H]; mask [B, T, T] must be causal (callers build it as
    causal & padding, or causal alone where padding queries are never read). The queries of
    block [i, j) see no key at or after j, so each block scores keys [0, j) only: the upper
    triangle's tiles are never computed, nor is their part of the mask select materialised (10
    of 16 tiles at T = 512). The skipped keys are all masked, so the softmax is the same; only
    rows with every key masked (left padding) spread their uniform weights over fewer keys, and
    nothing reads those rows. At SmolLM2's size (B4 x 512, one layer, float32, 2-core CPU) the
    forward went from 95 to 43 ms and its gradient from 203 to 114 ms.
    """
    t = q.shape[1]
    outs = []
    for start in range(0, t, _CAUSAL_BLOCK):
        end = min(start + _CAUSAL_BLOCK, t)
        scores = _scores(q[:, start:end], k[:, :end], mask[:, start:end, :end], head_dim)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bskh->btkgh", probs, v[:, :end]))
    return jnp.concatenate(outs, axis=1)


def _attend_one_token(q, k, v, past, head_dim: int):
    """Attention of one new token per row over its cached entries and itself: [B, 1, N, H].

    q [B, 1, K, G, H]; k, v [B, 1, K, H]; past as in `Attention.__call__` (cache layout
    [B, K, S, H]). Decode's shapes get their own formulation: as batched dots over (B, K),
    XLA:CPU ran B x K tiny matmuls, which cost more than the rest of the step. Elementwise
    products reduced over the head dim (scores) and over the cache positions (output) read each
    head's contiguous [S, H] block once (XLA:CPU first copies the layer's slice of the cache out
    of the [L, ...] array; a cache array per layer, without the copies, measured no faster at
    SmolLM2's size). One softmax over cached and new keys, taken as its max, exponentials and
    sum over the two parts (no [S + 1] concatenation to copy).
    """
    past_k, past_v, past_mask = past
    b, _, nk, g, h = q.shape
    q1 = q[:, 0].astype(jnp.float32)  # [B, K, G, H]
    scale = 1 / math.sqrt(head_dim)
    past_scores = jnp.sum(q1[:, :, :, None, :] * past_k[:, :, None].astype(jnp.float32), axis=-1)
    past_scores = past_scores * scale  # [B, K, G, S]
    past_scores = jnp.where(past_mask[:, :, None, :], past_scores, _MASK_VALUE)
    new_scores = jnp.sum(q1 * k[:, 0, :, None, :].astype(jnp.float32), axis=-1) * scale  # [B,K,G]
    top = jnp.maximum(past_scores.max(axis=-1), new_scores)
    past_e = jnp.exp(past_scores - top[..., None])
    new_e = jnp.exp(new_scores - top)
    total = past_e.sum(axis=-1) + new_e
    past_w = (past_e / total[..., None]).astype(v.dtype)
    new_w = (new_e / total).astype(v.dtype)
    out = jnp.sum(past_w[..., None] * past_v[:, :, None], axis=3)  # [B, K, G, H]
    out = out + new_w[..., None] * v[:, 0, :, None, :]
    return out.reshape(b, 1, nk * g, h)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.w_gate_df = _param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.w_up_df = _param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.w_down_fd = _param(rngs, (f, d), ("mlp", "embed"), dtype)

    def __call__(self, x):
        gate = _dense(x, self.w_gate_df[...])
        up = _dense(x, self.w_up_df[...])
        return _dense(jax.nn.silu(gate) * up, self.w_down_fd[...])


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype)
        self.attn = Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, inv_freq, mask, past=None):
        """Block output [B, T, D] and the new tokens' keys and values [B, T, K, H]."""
        attn, k, v = self.attn(self.attn_norm(x), positions, inv_freq, mask, past)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), k, v


def _remat_block(layer: Block, x, positions, inv_freq, mask, remat: str):
    """A block whose activations are (partly) recomputed in the backward pass, per `remat`.

    "block" keeps only the block's input [B, T, D] per layer. Otherwise the backward holds every
    layer's attention scores and probabilities ([B, K, G, T, T] float32 each): at SmolLM2's size,
    a B8 x 1024-token update needed 40 GB of temporaries. The price is a second forward through
    each block. "dots" also keeps the outputs of the block's matmuls (projections and MLP; at
    SmolLM2's size ~0.56 MB per token), so the recomputation is only the cheap elementwise work and
    attention; "none" keeps everything. Forward-only calls (prefill, evaluation) are unaffected,
    as remat changes nothing without a gradient. On XLA:CPU this needs the memory-aware scheduler
    (toolr1_jax/__init__.py): the default one runs every block's recomputation at once and keeps
    them all alive.
    """
    graphdef, state = nnx.split(layer)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, positions, inv_freq, mask)[0]

    if remat == "none":
        return run(state, x)
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    return jax.checkpoint(run, policy=policy)(state, x)


class Transformer(nnx.Module):
    """Decoder-only LM. Parameters are created in `dtype`, which is also the compute dtype.

    `remat` (one of REMAT_POLICIES, a static attribute: set it before `nnx.split`) says what a
    gradient through the model stores and what it recomputes; see `_remat_block`. "block" is the
    least memory; "dots" trades ~0.56 MB per token at SmolLM2's size for a faster backward.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.remat = "block"
        self.embed_vd = _param(
            rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype
        )
        self.layers = nnx.List([Block(config, dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype)
        if not config.tie_word_embeddings:
            self.lm_head_dv = _param(
                rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype
            )

    def __call__(self, tokens, positions, cache: KVCache | None = None, attn_mask=None):
        """Logits [B, T, V] (compute dtype) and the updated cache.

        Without a cache: causal attention over the T tokens; `attn_mask` [B, T] marks real tokens
        (padding, left or right, is masked out as keys), or holds int segment ids for rows that
        pack several sequences: 0 padding, and a token sees only earlier tokens of its own
        segment (positions then restart at each segment's start).
        With a cache: row b's T new tokens are written at cache indices `lengths[b] + t` and
        attend to everything before them; `attn_mask` [B, T] marks which new tokens are real (they
        must be a prefix of the row: right padding). Only real tokens are written, so a row whose
        mask is all False leaves its cache untouched, and the returned lengths advance by the
        count of real tokens.
        """
        hidden, cache = self.hidden_states(tokens, positions, cache, attn_mask)
        return self.logits(hidden), cache

    def logits(self, hidden):
        """LM head: hidden [..., D] -> logits [..., V]. Split out so losses can chunk over T."""
        rows = math.prod(hidden.shape[:-1])
        if self.config.tie_word_embeddings and rows <= _VOCAB_MAJOR_MAX_ROWS:
            # Few rows (decode): the embedding [V, D] times the rows, vocab-major [V, rows], then
            # transposed. XLA:CPU streams a weight stored [out, in] faster at few rows; the
            # barrier keeps the algebraic simplifier from folding the transpose back into the
            # dot. At SmolLM2's size on a 2-core CPU, the head and a row-wise sampler: 14.2 ->
            # 10.4 ms at 16 rows, 21.3 -> 16.6 at 32, even at 64, slower at 256.
            flat = hidden.reshape(rows, hidden.shape[-1])
            logits_vr = jax.lax.optimization_barrier(self.embed_vd[...] @ flat.T)
            return logits_vr.T.reshape(*hidden.shape[:-1], -1)
        return _dense(hidden, self.head_weight())

    def head_weight(self):
        """The LM head as a [D, V] matrix (the transposed embedding when tied), for losses that
        apply the head themselves."""
        return self.embed_vd[...].T if self.config.tie_word_embeddings else self.lm_head_dv[...]

    def hidden_states(self, tokens, positions, cache: KVCache | None = None, attn_mask=None):
        """Final-normed hidden states [B, T, D] and the updated cache."""
        if cache is None:
            b, t = tokens.shape
            if attn_mask is None:
                attn_mask = jnp.ones((b, t), jnp.bool_)
            seg = attn_mask.astype(jnp.int32)  # a bool mask is one segment per row
            causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
            # Real keys of the query's own segment; padding queries (nothing reads them) see
            # every real key before them, as with a plain padding mask.
            same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
            mask = causal[None] & same & (seg[:, None, :] > 0)  # [B, T, T]
            x = jnp.take(self.embed_vd[...], tokens, axis=0)  # [B, T, D]
            inv_freq = rope_inv_freq(self.config)
            for layer in self.layers:
                x = _remat_block(layer, x, positions, inv_freq, mask, self.remat)
            return self.final_norm(x), None

        hidden, k, v = self.hidden_states_and_kv(tokens, positions, cache, attn_mask)
        # The write must follow every read of the cache, or XLA copies the whole cache to keep
        # the reads correct. The last layer's reads feed only the hidden states, so tie k/v to
        # them with a data dependence (XLA keeps x * 0 for floats; an optimization_barrier does
        # not order anything on CPU). Untied, decode copied the cache twice per step.
        tie = (hidden[0, 0, 0] * 0).astype(k.dtype)
        k, v = k + tie, v + tie
        return hidden, _write_kv(cache, k, v, attn_mask)

    def hidden_states_and_kv(self, tokens, positions, cache: KVCache, attn_mask=None):
        """Hidden states [B, T, D] and the new tokens' keys and values [L, B, T, K, H].

        Row b's new tokens attend to its `lengths[b]` cached entries (none when the cache's
        `read_len` is 0: plain causal attention) and causally to each other; the cache is only
        read. `hidden_states` writes the keys and values into the cache; callers that keep a
        larger cache (the engine's prefill) store them there instead.
        """
        b, t = tokens.shape
        x = jnp.take(self.embed_vd[...], tokens, axis=0)  # [B, T, D]
        inv_freq = rope_inv_freq(self.config)
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t))
        s = cache.read_len
        past_mask = (jnp.arange(s)[None, :] < cache.lengths[:, None])[:, None, :]  # [B, 1, S]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            past = (cache.k[i, :, :, :s], cache.v[i, :, :, :s], past_mask) if s else None
            x, k, v = layer(x, positions, inv_freq, causal, past)
            new_k.append(k.astype(cache.k.dtype))
            new_v.append(v.astype(cache.v.dtype))
        return self.final_norm(x), jnp.stack(new_k), jnp.stack(new_v)


def _write_kv(cache: KVCache, k, v, attn_mask=None) -> KVCache:
    """Writes new keys and values [L, B, T, K, H] at cache indices `lengths[b] + t`.

    `attn_mask` [B, T] marks real tokens (a prefix of each row); only those are written, and the
    lengths advance by their count. Indices past the cache end are dropped; the engine rejects
    sequences that would need them before it gets here.
    """
    b, t = k.shape[1:3]
    if attn_mask is None:
        attn_mask = jnp.ones((b, t), jnp.bool_)
    attn_mask = attn_mask.astype(jnp.bool_)
    write_idx = jnp.where(attn_mask, cache.lengths[:, None] + jnp.arange(t)[None, :], cache.max_len)
    rows = jnp.arange(b)[:, None]
    # One scatter per array for all layers, after every read of the cache. The index arrays
    # (rows [B, 1], write_idx [B, T]) are split by a slice, so the indexed view is [B, T, L, K, H].
    at = (slice(None), rows, slice(None), write_idx)

    def update(x):  # [L, B, T, K, H] -> [B, T, L, K, H]
        return jnp.transpose(x, (1, 2, 0, 3, 4)).astype(cache.k.dtype)

    return cache.replace(
        k=cache.k.at[at].set(update(k), mode="drop"),
        v=cache.v.at[at].set(update(v), mode="drop"),
        lengths=cache.lengths + attn_mask.sum(axis=-1).astype(jnp.int32),
    )
