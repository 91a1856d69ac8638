"""GRPO update on packed vs padded batches: the same episodes, one per row or several to a row.

A GRPO step's batch holds `--episodes` episodes in rows of `--max_len` tokens (the demo: 16
episodes of SmolLM2, `agent.max_total_tokens` 1024, two micro-batches). Padded, every episode
costs a whole row; packed (`update.make_batch(pack=True)`, what the trainer does), episodes share
rows and the step skips the micro-batches left empty. Episode lengths come from a run's
`trajectories.jsonl` (`num_tokens` of each episode; e.g. the demo's evaluation after SFT) or,
without one, from a lognormal around `--mean_tokens`. Prints both steps' times, the share of
real tokens in each layout, and the speed-up last. Same model and loss as `bench_update.py`;
JAX only (the PyTorch comparison is bench_update's, at full rows).

  python benchmarks/bench_pack.py --lengths_from=/tmp/toolr1_demo/eval/step_0/trajectories.jsonl
  python benchmarks/bench_pack.py --mean_tokens=300 --preset=tiny
"""

import argparse
import json
import statistics
import time

import bench_update  # benchmarks/bench_update.py: the loss and optimizer settings
import common  # benchmarks/common.py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolr1_jax import update
from toolr1_jax.data import types as data_types
from toolr1_jax.models import model as model_lib


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=16, help="questions x group size")
    p.add_argument("--max_len", type=int, default=1024, help="agent.max_total_tokens")
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--lengths_from", default="", help="a trajectories.jsonl to take lengths from")
    p.add_argument("--mean_tokens", type=int, default=500, help="without --lengths_from")
    p.add_argument("--remat", default="dots", choices=model_lib.REMAT_POLICIES)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each")
    common.add_model_args(p)
    return common.resolve_model_args(p.parse_args())


def episode_lengths(args, rng) -> list[int]:
    if args.lengths_from:
        with open(args.lengths_from) as f:
            seen = [json.loads(line)["num_tokens"] for line in f if line.strip()]
        return [min(int(n), args.max_len) for n in rng.choice(seen, args.episodes)]
    drawn = rng.lognormal(np.log(args.mean_tokens), 0.3, args.episodes)
    return [int(np.clip(n, 16, args.max_len)) for n in drawn]


def trajectories(lengths, vocab, rng):
    out = []
    for i, n in enumerate(lengths):
        prompt = min(n // 2, 370)
        sampled = (np.arange(n) >= prompt).astype(np.int32)
        out.append(
            data_types.Trajectory(
                task_id=f"q{i // 4}",
                group_id=i // 4,
                tokens=rng.integers(1, vocab, n).astype(np.int32),
                loss_mask=sampled,
                behaviour_logprobs=(-rng.uniform(0.5, 9.0, n) * sampled).astype(np.float32),
                prompt_len=prompt,
                policy_version=0,
                turns=(),
                final_answer=None,
                status="answered",
                reward=float(i % 2),
            )
        )
    return out


def main():
    args = parse_args()
    rng = np.random.default_rng(0)
    lengths = episode_lengths(args, rng)
    trajs = trajectories(lengths, args.vocab, rng)
    advantages = rng.normal(size=len(trajs)).astype(np.float32)
    kwargs = dict(batch_size=args.episodes, max_len=args.max_len, advantages=advantages)
    batches = {
        "padded": update.make_batch(trajs, **kwargs),
        "packed": update.make_batch(trajs, **kwargs, pack=True, num_microbatches=args.microbatches),
    }
    print(
        f"model: {common.describe(args)}; {args.episodes} episodes of {min(lengths)}-"
        f"{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}) in rows of {args.max_len}, "
        f"{args.microbatches} micro-batches, remat {args.remat}"
    )
    model = model_lib.Transformer(common.model_config(args), rngs=nnx.Rngs(0))
    model.remat = args.remat
    graphdef, state = nnx.split(model)
    optimizer = update.make_optimizer(
        bench_update.LR,
        bench_update.WARMUP_STEPS,
        bench_update.TOTAL_STEPS,
        bench_update.WEIGHT_DECAY,
        bench_update.MAX_GRAD_NORM,
        end_lr_ratio=1.0,
    )
    step = update.make_train_step(
        graphdef, optimizer, bench_update.LOSS, num_microbatches=args.microbatches
    )
    opt_state = optimizer.init(state)
    batches = {k: jax.tree.map(jnp.asarray, b) for k, b in batches.items()}
    for batch in batches.values():  # the first call compiles (one program for both layouts)
        state, opt_state, _ = step(state, opt_state, batch)
    times = {name: [] for name in batches}
    for _ in range(args.repeats):  # interleaved: both see the same background load
        for name, batch in batches.items():
            t0 = time.perf_counter()
            state, opt_state, m = step(state, opt_state, batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t0)
    rows_per_mb = args.episodes // args.microbatches
    for name, batch in batches.items():
        used = np.asarray(batch.attn_mask).any(1).reshape(rows_per_mb, args.microbatches)
        run = int(used.any(0).sum())  # micro-batches with a real token
        real = np.asarray(batch.attn_mask).sum() / (run * rows_per_mb * args.max_len)
        print(
            f"{name}: median {statistics.median(times[name]):.2f} s/step; {run} of "
            f"{args.microbatches} micro-batches run ({int(used.sum())} rows used), real tokens "
            f"{real:.0%} of the positions they compute"
        )
    print("--- ratios ---")
    speedup = statistics.median(times["padded"]) / statistics.median(times["packed"])
    print(f"packed over padded: {speedup:.2f}x faster")


if __name__ == "__main__":
    main()
