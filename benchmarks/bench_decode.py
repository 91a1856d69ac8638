"""Decode throughput: the engine vs transformers' `generate` on the same weights, side by side.

A tiny random Qwen2-style model is built with transformers, saved, and loaded into the JAX
`Transformer` with `load_pretrained`; both generate greedily from the same prompts and must emit
identical tokens. Prints tokens/s of each, the ratio, and the fraction of the memory-bandwidth
roofline the engine's decode loop reaches (bandwidth measured on this machine).

  python benchmarks/bench_decode.py                  # batch 16, prompt 64, 128 new tokens
  python benchmarks/bench_decode.py --hidden=512 --layers=8
  python benchmarks/bench_decode.py --batch=8 --max_len=2048   # long cache, few tokens
"""

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from toolr1_jax import engine as engine_lib
from toolr1_jax.models import params as params_lib


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument(
        "--max_len", type=int, default=0, help="engine cache length (0: prompt + new tokens)"
    )
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest is reported")
    return p.parse_args()


def build_models(args, workdir):
    config = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.max_len, args.prompt_tokens + args.new_tokens),
        # Peaked logits, so float differences between the two frameworks never flip an argmax.
        initializer_range=0.2,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(workdir)
    model, _ = params_lib.load_pretrained(workdir, dtype=jnp.float32)
    return hf, model


def best_of(repeats, fn):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def measure_bandwidth_bytes_per_s() -> float:
    """Sustained read bandwidth of a jitted reduction over 256 MiB (what decode mostly does)."""
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    seconds, _ = best_of(5, lambda: total(x).block_until_ready())
    return x.nbytes / seconds


def main():
    args = parse_args()
    b, p, n = args.batch, args.prompt_tokens, args.new_tokens
    print(
        f"machine: {os.cpu_count()} CPUs; jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as workdir:
        hf, model = build_models(args, workdir)
    prompts = np.random.default_rng(0).integers(1, args.vocab, size=(b, p)).tolist()

    # transformers: one short warm-up run, then the timed runs.
    def hf_generate(max_new):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor(prompts),
                attention_mask=torch.ones(b, p, dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
            )
        return out[:, p:].numpy()

    hf_generate(4)
    hf_s, hf_tokens = best_of(args.repeats, lambda: hf_generate(n))

    # Engine: a warm-up call compiles prefill and decode; timed calls run no compilation.
    engine = engine_lib.Engine(model, num_slots=b, max_len=max(args.max_len, p + n))
    sampling = engine_lib.SamplingParams(max_new_tokens=n)

    def engine_generate():
        completions = engine.generate(prompts, sampling, chunk_steps=n)
        return np.stack([c.tokens for c in completions])

    engine_generate()
    compilations = engine.num_compilations
    engine_s, engine_tokens = best_of(args.repeats, engine_generate)

    # Decode loop alone (prefill and the first step excluded), for the roofline.
    def decode_only():
        slots = [engine.add(prompt, sampling) for prompt in prompts]
        engine.step(1)
        t0 = time.perf_counter()
        outs = engine.step(n - 1)
        seconds = time.perf_counter() - t0
        assert len(outs) == b
        for slot in slots:
            engine.release(slot)
        return seconds

    decode_s = min(decode_only() for _ in range(args.repeats))
    assert engine.num_compilations == compilations, "the timed runs recompiled"

    identical = np.array_equal(hf_tokens, engine_tokens)
    if not identical:
        raise SystemExit("engine and transformers greedy tokens differ; timings are not comparable")

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.params))
    cfg = engine.config
    # K and V of one token in every layer.
    slot_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    # Ideal traffic per step: every weight once plus the valid part of every slot's cache.
    mean_len = p + n / 2
    ideal_bytes = param_bytes + b * mean_len * slot_bytes_per_token
    # What this engine reads: the whole cache, since attention runs over all max_len positions.
    actual_bytes = param_bytes + b * engine.max_len * slot_bytes_per_token
    bandwidth = measure_bandwidth_bytes_per_s()
    step_s = decode_s / (n - 1)

    total = b * n
    print(
        f"model: {param_bytes / 2**20:.1f} MiB float32 params, vocab {args.vocab}, "
        f"D={args.hidden}, L={args.layers}; batch {b}, prompt {p}, {n} new tokens, "
        f"max_len {engine.max_len}"
    )
    print(f"identical greedy tokens: {identical}; engine compilations: {compilations}")
    print(f"transformers generate: {hf_s:8.3f} s  {total / hf_s:10.1f} tokens/s")
    print(f"engine generate:       {engine_s:8.3f} s  {total / engine_s:10.1f} tokens/s")
    print(
        f"engine decode loop:    {decode_s:8.3f} s  {b * (n - 1) / decode_s:10.1f} tokens/s "
        f"({step_s * 1e3:.2f} ms/step)"
    )
    print(f"measured memory bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(
        f"bytes/step: ideal {ideal_bytes / 2**20:.1f} MiB, "
        f"engine reads {actual_bytes / 2**20:.1f} MiB"
    )
    print("--- ratios ---")
    print(f"engine / transformers tokens/s: {hf_s / engine_s:.2f}x")
    print(f"roofline fraction (ideal bytes):  {ideal_bytes / step_s / bandwidth:.3f}")
    print(f"roofline fraction (bytes read):   {actual_bytes / step_s / bandwidth:.3f}")


if __name__ == "__main__":
    main()
