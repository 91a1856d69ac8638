"""What the benchmarks share: model size presets and the machine limits they report against.

Every benchmark defaults to SmolLM2-135M's dimensions (`--preset=smollm2`); `--preset=tiny`
keeps the small model the earlier figures used, for quick runs. Explicit size flags
(`--hidden`, `--layers`, ...) override the preset. Utilisation is always against limits
measured in the same process, on the same machine, in the same dtype:

  matmul_flops_per_s(m, k, n)   jitted [m, k] x [k, n] in the model's dtype (the compute roofline)
  bandwidth_bytes_per_s()       jitted float32 sum over 256 MiB, 4 GiB on an accelerator
                                (the memory roofline)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from toolr1_jax.models import model as model_lib

# Sizes of real models (the benchmarks build random ones). The Qwen2.5 sizes are for the GPU
# check (benchmarks/gpu_check.sh); the field names are the size flags'.
PRESETS = {
    # SmolLM2-135M-Instruct: llama, tied embeddings, 9 query / 3 kv heads of 64.
    "smollm2": dict(
        model_type="llama",
        vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, tied=True,
    ),
    "tiny": dict(
        model_type="llama",
        vocab=8192, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, tied=False,
    ),
    # Qwen2.5-0.5B and -1.5B: qwen2 (biases on q, k and v), tied embeddings, 2 kv heads.
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab=151936, hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, tied=True,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        vocab=151936, hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, tied=True,
    ),
}  # fmt: skip
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
    args.model_type = preset["model_type"]
    return args


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """`--dtype`: the JAX model's parameter and compute dtype (the limits are measured in it)."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def describe(args: argparse.Namespace) -> str:
    return (
        f"{args.preset} preset ({args.model_type}): L={args.layers}, D={args.hidden}, "
        f"F={args.intermediate}, V={args.vocab}, heads {args.heads}/{args.kv_heads}"
        + (", tied embeddings" if args.tied else "")
    )


def model_config(args: argparse.Namespace, vocab_size: int | None = None) -> model_lib.ModelConfig:
    """The JAX model config the size flags describe; `vocab_size` overrides the flags'
    vocabulary."""
    return model_lib.ModelConfig(
        model_type=args.model_type,
        vocab_size=args.vocab if vocab_size is None else vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        tie_word_embeddings=args.tied,
        qkv_bias=args.model_type == "qwen2",
    )


def hf_config(args: argparse.Namespace, max_positions: int, **overrides):
    """The transformers config of the same model, for benchmarks that build it with
    transformers and load it into JAX; `overrides` are extra config fields."""
    import transformers  # only the benchmarks that compare with it pay for the import

    cls = transformers.Qwen2Config if args.model_type == "qwen2" else transformers.LlamaConfig
    return cls(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=args.tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **overrides,
    )


def num_params(args: argparse.Namespace) -> int:
    """Parameter count of the Qwen2/Llama-style model the size flags describe (biases, a few
    thousand, left out)."""
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
    """Best seconds per call of `fn` (which returns arrays without waiting for them). On an
    accelerator a small program's one call would time its launch: each timing there is of a run
    of calls, divided."""
    calls = 1 if jax.default_backend() == "cpu" else 20
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def matmul_flops_per_s(m: int, k: int, n: int, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one jitted [m, k] x [k, n] matmul in `dtype`."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), dtype)
    b = jax.random.normal(kb, (k, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return 2.0 * m * k * n / _best_seconds(lambda: f(a, b), repeats)


def bandwidth_bytes_per_s(repeats: int = 5) -> float:
    """Sustained read bandwidth of a jitted float32 reduction: over 256 MiB on the CPU, 4 GiB on
    an accelerator (whose caches hold tens of MiB)."""
    mib = 256 if jax.default_backend() == "cpu" else 4096
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / _best_seconds(lambda: total(x), repeats)
