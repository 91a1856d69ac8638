"""What the benchmarks share: model size presets and the machine limits they report against.

Every benchmark defaults to SmolLM2-135M's dimensions (`--preset=smollm2`); `--preset=tiny`
keeps the small model the earlier figures used, for quick runs. Explicit size flags
(`--hidden`, `--layers`, ...) override the preset. Utilisation is always against limits
measured in the same process, on the same machine, in the same dtype:

  matmul_flops_per_s(m, k, n)   jitted float32 [m, k] x [k, n] (the compute roofline)
  bandwidth_bytes_per_s()       jitted float32 sum over 256 MiB (the memory roofline)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from toolr1_jax.models import model as model_lib

# Qwen2-style field names (the benchmarks build their random models with transformers).
PRESETS = {
    # SmolLM2-135M-Instruct: llama, tied embeddings, 9 query / 3 kv heads of 64.
    "smollm2": dict(
        vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, tied=True
    ),
    "tiny": dict(
        vocab=8192, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, tied=False
    ),
}
_SIZE_FLAGS = ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--preset` plus one override flag per dimension (default: the preset's value)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    for name in _SIZE_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")


def resolve_model_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the size flags left unset from the preset; adds `args.tied`."""
    preset = PRESETS[args.preset]
    for name in _SIZE_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.tied = preset["tied"]
    return args


def describe(args: argparse.Namespace) -> str:
    return (
        f"{args.preset} preset: L={args.layers}, D={args.hidden}, F={args.intermediate}, "
        f"V={args.vocab}, heads {args.heads}/{args.kv_heads}"
        + (", tied embeddings" if args.tied else "")
    )


def model_config(args: argparse.Namespace, vocab_size: int | None = None) -> model_lib.ModelConfig:
    """The JAX model config the size flags describe (Llama: SmolLM2's architecture);
    `vocab_size` overrides the flags' vocabulary."""
    return model_lib.ModelConfig(
        model_type="llama",
        vocab_size=args.vocab if vocab_size is None else vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        tie_word_embeddings=args.tied,
    )


def num_params(args: argparse.Namespace) -> int:
    """Parameter count of the Qwen2/Llama-style model the size flags describe (no biases)."""
    d, f, v = args.hidden, args.intermediate, args.vocab
    head_dim = d // args.heads
    attn = d * head_dim * (2 * args.heads + 2 * args.kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    embed = v * d * (1 if args.tied else 2)
    return args.layers * per_layer + embed + d


def matmul_flops(args: argparse.Namespace, tokens: int) -> float:
    """Forward matmul FLOPs for `tokens` tokens, attention scores excluded: 2 x params per token,
    the input embedding (a gather) excluded."""
    return 2.0 * (num_params(args) - args.vocab * args.hidden * (0 if args.tied else 1)) * tokens


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops_per_s(m: int, k: int, n: int, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one jitted [m, k] x [k, n] matmul."""
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    seconds = _best_seconds(lambda: f(a, b).block_until_ready(), repeats)
    return 2.0 * m * k * n / seconds


def bandwidth_bytes_per_s(repeats: int = 5) -> float:
    """Sustained read bandwidth of a jitted float32 reduction over 256 MiB."""
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / _best_seconds(lambda: total(x).block_until_ready(), repeats)
