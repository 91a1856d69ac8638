"""Decode throughput: the engine vs transformers' `generate` on the same weights, side by side.

A random Llama-style model of SmolLM2-135M's size (tied embeddings; `--preset=tiny` for the small
one) is built with transformers, saved, and loaded into the JAX `Transformer` with
`load_pretrained`; both generate greedily from the same prompts and must emit identical tokens
(a row may differ only from a float near-tie on, checked against transformers' logits).
For each batch size: tokens/s of both end to end (prefill included), the engine's decode loop
alone, and its utilisation against limits measured in this process: bytes/s over the measured
memory bandwidth, and model FLOP/s over the measured matmul throughput at the decode's M (the
batch). Floors measured the same way: the model's matmuls alone (every weight read once, in
layer order) at the decode's rows plus the live cache at the measured bandwidth, and at the
prefill's tokens; the printed bound is the end-to-end ratio an engine running at those floors
would reach. With `--compare_max_len`, the decode loop also runs on a second engine whose
cache has that many positions, interleaved with the first, and the ratio of the two step times
is printed (decode attends only over the cache prefix the live rows need, so it should be
near 1).

  python benchmarks/bench_decode.py                         # B16, prompt 256, 128 new tokens
  python benchmarks/bench_decode.py --batch=16,32
  python benchmarks/bench_decode.py --max_len=4096 --compare_max_len=512 --skip_hf
  python benchmarks/bench_decode.py --preset=tiny
  python benchmarks/bench_decode.py --preset=qwen2.5-0.5b --dtype=bfloat16 --skip_hf  # GPU
"""

import argparse
import os
import sys
import tempfile
import time

import common  # benchmarks/common.py
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from toolr1_jax import engine as engine_lib
from toolr1_jax.models import params as params_lib


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--batch", default="16", help="comma-separated batch sizes, e.g. 16,32")
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument(
        "--max_len", type=int, default=0, help="engine cache length (0: prompt + new tokens)"
    )
    p.add_argument(
        "--compare_max_len", type=int, default=0, help="also time decode with this cache length"
    )
    p.add_argument(
        "--min_decode_len",
        type=int,
        default=256,
        help="smallest decode bucket (set it to --max_len to attend over the whole cache)",
    )
    p.add_argument("--skip_hf", action="store_true", help="engine only (no transformers run)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest is reported")
    common.add_dtype_arg(p)
    args = common.resolve_model_args(p.parse_args())
    if args.dtype != "float32" and not args.skip_hf:
        p.error("transformers runs in float32 here (its tokens must match): use --skip_hf")
    return args


def build_models(args, workdir):
    config = common.hf_config(
        args,
        max(args.max_len, args.compare_max_len, args.prompt_tokens + args.new_tokens),
        # Peaked logits, so float differences between the two frameworks never flip an argmax.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(workdir)
    model, _ = params_lib.load_pretrained(workdir, dtype=common.DTYPES[args.dtype])
    return hf, model


def best_of(repeats, fn):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def hf_generate(hf, prompts, max_new):
    b, p = len(prompts), len(prompts[0])
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(b, p, dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
        )
    return out[:, p:].numpy()


# Float32 rounding may order two nearly equal logits differently in the two frameworks; a greedy
# run then continues from another token. Differences are accepted only where transformers' own
# logits put the engine's token within this distance of its top one.
NEAR_TIE = 1e-3


def near_ties(hf, prompts, hf_tokens, engine_tokens):
    """[(row, step, logit gap)] for each row whose tokens differ; exits if any is not a near-tie
    (a real mismatch, so the timings are not comparable)."""
    ties = []
    for row in np.nonzero((hf_tokens != engine_tokens).any(axis=1))[0]:
        step = int(np.argmax(hf_tokens[row] != engine_tokens[row]))
        seq = torch.tensor([list(prompts[row]) + hf_tokens[row, :step].tolist()])
        with torch.no_grad():
            logits = hf(seq).logits[0, -1]
        gap = float(logits.max() - logits[int(engine_tokens[row, step])])
        if gap > NEAR_TIE:
            raise SystemExit(
                f"engine and transformers greedy tokens differ at row {row}, step {step} by a "
                f"logit gap of {gap:.3g}; timings not comparable"
            )
        ties.append((int(row), step, gap))
    return ties


def decode_seconds(engine, prompts, sampling, n):
    """Seconds of n - 1 decode steps of every prompt at once (prefill and first step excluded)."""
    slots = [engine.add(prompt, sampling) for prompt in prompts]
    engine.step(1)
    t0 = time.perf_counter()
    outs = engine.step(n - 1)
    seconds = time.perf_counter() - t0
    assert len(outs) == len(prompts)
    for slot in slots:
        engine.release(slot)
    return seconds


def matmul_floor_seconds(model, rows: int, head: bool) -> float:
    """Best time of the model's weight matmuls alone for `rows` tokens: each layer's
    projections and MLP in order (and the LM head if `head`), joined by adds only, every weight
    read once from memory. A forward over `rows` tokens cannot beat it with XLA's dots on these
    weights as stored; attention, norms, RoPE and the cache come on top."""
    graphdef, state = nnx.split(model)
    d = model.config.hidden_size

    @jax.jit
    def chain(state, x):
        m = nnx.merge(graphdef, state)
        for layer in m.layers:
            a, mlp = layer.attn, layer.mlp
            q = x @ a.wq_dnh[...].reshape(d, -1)
            k = x @ a.wk_dkh[...].reshape(d, -1)
            v = x @ a.wv_dkh[...].reshape(d, -1)
            x = x + q @ a.wo_nhd[...].reshape(-1, d) + k[:, :1] + v[:, :1]
            gate = x @ mlp.w_gate_df[...]
            x = x + (gate * (x @ mlp.w_up_df[...])) @ mlp.w_down_fd[...]
        return m.logits(x).sum() if head else x.sum()

    x = jnp.asarray(np.random.default_rng(0).normal(size=(rows, d)) * 0.1, model.dtype)
    chain(state, x).block_until_ready()  # compiles
    seconds, _ = best_of(3, lambda: chain(state, x).block_until_ready())
    return seconds


def run_batch(args, hf, model, b, bandwidth):
    p, n = args.prompt_tokens, args.new_tokens
    prompts = np.random.default_rng(b).integers(1, args.vocab, size=(b, p)).tolist()
    max_len = max(args.max_len, p + n)
    engine = engine_lib.Engine(
        model, num_slots=b, max_len=max_len, min_decode_len=args.min_decode_len
    )
    engine.warmup()
    compilations = engine.num_compilations
    other = None
    if args.compare_max_len:
        other = engine_lib.Engine(
            model,
            num_slots=b,
            max_len=max(args.compare_max_len, p + n),
            min_decode_len=args.min_decode_len,
        )
        other.warmup()
    sampling = engine_lib.SamplingParams(max_new_tokens=n)

    def engine_generate():
        completions = engine.generate(prompts, sampling, chunk_steps=n)
        return np.stack([c.tokens for c in completions])

    # Engine and transformers alternate, so load from other processes skews neither.
    engine_times, hf_times = [], []
    engine_tokens = hf_tokens = None
    if not args.skip_hf:
        hf_generate(hf, prompts[:2], 4)  # warm-up
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        engine_tokens = engine_generate()
        engine_times.append(time.perf_counter() - t0)
        if not args.skip_hf:
            t0 = time.perf_counter()
            hf_tokens = hf_generate(hf, prompts, n)
            hf_times.append(time.perf_counter() - t0)
    decode_times, other_times = [], []
    for _ in range(args.repeats):
        decode_times.append(decode_seconds(engine, prompts, sampling, n))
        if other is not None:
            other_times.append(decode_seconds(other, prompts, sampling, n))
    assert engine.num_compilations == compilations, "the timed runs recompiled"

    total = b * n
    step_s = min(decode_times) / (n - 1)
    # The program each timed decode chunk ran (what `step` picks): reads of the cache prefix.
    kv_len = next(x for x in engine.decode_lens if x >= min(p + n - 1, engine.max_len))
    cfg = engine.config
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.params))
    itemsize = jnp.dtype(model.dtype).itemsize
    token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # K, V, layers
    # Ideal traffic per step: every weight once plus the valid part of every row's cache.
    live_cache_bytes = b * (p + n / 2) * token_bytes  # the rows' mean cache over the run
    ideal_bytes = param_bytes + live_cache_bytes
    read_bytes = param_bytes + b * kv_len * token_bytes
    step_flops = common.matmul_flops(args, b)
    matmul_peak = common.matmul_flops_per_s(b, args.hidden, args.intermediate, model.dtype)

    print(f"--- batch {b}: prompt {p}, {n} new tokens, cache {engine.max_len} positions ---")
    print(f"engine compilations: {compilations} (decode programs for {engine.decode_lens})")
    engine_s = min(engine_times)
    print(f"engine generate:       {engine_s:8.3f} s  {total / engine_s:9.1f} tokens/s")
    if not args.skip_hf:
        hf_s = min(hf_times)
        print(f"transformers generate: {hf_s:8.3f} s  {total / hf_s:9.1f} tokens/s")
        ties = near_ties(hf, prompts, hf_tokens, engine_tokens)
        print(f"identical greedy tokens: {not ties}")
        for row, step, gap in ties:
            print(
                f"  row {row} differs from step {step}: the engine's token's logit is {gap:.1e} "
                f"below transformers' top logit there (a float near-tie)"
            )
    print(
        f"engine decode loop:    {step_s * 1e3:8.2f} ms/step  {b / step_s:9.1f} tokens/s "
        f"(attends over {kv_len} positions)"
    )
    print(
        f"bytes/step: ideal {ideal_bytes / 2**20:.0f} MiB, read {read_bytes / 2**20:.0f} MiB; "
        f"model FLOPs/step {step_flops / 1e9:.2f} G; matmul [{b}x{args.hidden}]x"
        f"[{args.hidden}x{args.intermediate}] {matmul_peak / 1e9:.0f} GFLOP/s"
    )
    # Floors on this machine: the matmuls alone at their measured speed, plus (decode) the live
    # cache read at the measured bandwidth. Prefill (b x (p - 1) tokens, no LM head) and n
    # decode steps at their floors bound what any engine with XLA's dots could reach.
    decode_floor = matmul_floor_seconds(model, b, head=True) + live_cache_bytes / bandwidth
    prefill_floor = matmul_floor_seconds(model, b * (p - 1), head=False)
    print(
        f"floors: decode step {decode_floor * 1e3:.1f} ms (matmuls alone + the live cache at "
        f"the measured bandwidth), prefill {prefill_floor:.2f} s (matmuls alone); end to end "
        f"{prefill_floor + n * decode_floor:.2f} s"
    )
    ratios = {}
    if not args.skip_hf:
        ratios["engine / transformers tokens/s (end to end)"] = hf_s / engine_s
        ratios["  bound: the same if prefill and decode ran at their floors"] = hf_s / (
            prefill_floor + n * decode_floor
        )
    ratios["decode step at its floor (floor / measured)"] = decode_floor / step_s
    ratios["decode bandwidth use (ideal bytes / s / measured)"] = ideal_bytes / step_s / bandwidth
    ratios["decode bandwidth use (bytes read / s / measured)"] = read_bytes / step_s / bandwidth
    ratios[f"decode compute use (FLOP/s / matmul FLOP/s at M={b})"] = (
        step_flops / step_s / matmul_peak
    )
    if other is not None:
        other_step_s = min(other_times) / (n - 1)
        print(
            f"decode loop with a {other.max_len}-position cache: {other_step_s * 1e3:.2f} ms/step"
        )
        ratios[f"decode step, cache {engine.max_len} / cache {other.max_len}"] = (
            step_s / other_step_s
        )
    return ratios


def main():
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # runs take minutes: show each result as it comes
    batches = [int(x) for x in args.batch.split(",")]
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads"
    )
    print(common.describe(args))
    with tempfile.TemporaryDirectory() as workdir:
        hf, model = build_models(args, workdir)
    bandwidth = common.bandwidth_bytes_per_s()
    print(f"measured memory bandwidth: {bandwidth / 1e9:.1f} GB/s")
    results = {b: run_batch(args, hf, model, b, bandwidth) for b in batches}
    print(f"--- ratios (load {os.getloadavg()[0]:.1f}) ---")
    for b, ratios in results.items():
        for name, value in ratios.items():
            print(f"B{b} {name}: {value:.2f}")


if __name__ == "__main__":
    main()
