"""Multi-turn cost: continuing a slot's cache vs re-prefilling the whole history every turn.

Each of `--episodes` episodes runs 8 turns; a turn appends 64 observation tokens (none on turn
1, which prefills the prompt) and generates 64 tokens greedily. With continuation a turn costs
the same however long the history is; re-prefilling pays for the whole history every turn.
Prints per-turn times of both, each mode's model FLOP/s over the matmul throughput measured in
this process (at M = the episodes, decode's batch), and, last, time(turn 8) / time(turn 1) for
each. Default size: SmolLM2-135M's dimensions (random weights); `--preset=tiny` for a small model.

  python benchmarks/bench_multiturn.py
  python benchmarks/bench_multiturn.py --preset=tiny --episodes=16
"""

import argparse
import os
import time

import common  # benchmarks/common.py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolr1_jax import engine as engine_lib
from toolr1_jax.models import model as model_lib


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--episodes", type=int, default=8, help="episodes run side by side (slots)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--observation_tokens", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest is reported")
    return common.resolve_model_args(p.parse_args())


def run_episodes(engine, prompts, observations, sampling, continuation: bool):
    """Runs all episodes turn by turn; returns per-turn seconds and every episode's tokens."""
    histories = [list(p) for p in prompts]
    slots = [None] * len(prompts)
    turn_s = []
    for turn in range(len(observations[0]) + 1):
        t0 = time.perf_counter()
        for i, history in enumerate(histories):
            if turn == 0:
                slots[i] = engine.add(history, sampling)
                continue
            obs = observations[i][turn - 1]
            history += obs
            if continuation:
                engine.append(slots[i], obs)
            else:
                engine.release(slots[i])
                slots[i] = engine.add(history, sampling)
        pending = {slot: i for i, slot in enumerate(slots)}
        while pending:
            for out in engine.step(sampling.max_new_tokens):
                histories[pending.pop(out.slot)] += out.tokens.tolist()
        turn_s.append(time.perf_counter() - t0)
    for slot in slots:
        engine.release(slot)
    return turn_s, histories


def main():
    args = parse_args()
    config = common.model_config(args)
    model = model_lib.Transformer(config, rngs=nnx.Rngs(0), dtype=jnp.float32)
    per_turn = args.observation_tokens + args.new_tokens
    max_len = args.prompt_tokens + args.turns * per_turn
    engine = engine_lib.Engine(model, num_slots=args.episodes, max_len=max_len)
    engine.warmup()
    sampling = engine_lib.SamplingParams(max_new_tokens=args.new_tokens)

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, args.vocab, (args.episodes, args.prompt_tokens)).tolist()
    # Turn 1 prefills the prompt; turns 2..8 each append an observation first.
    observations = rng.integers(
        1, args.vocab, (args.episodes, args.turns - 1, args.observation_tokens)
    ).tolist()

    modes = {"continuation": True, "re-prefill": False}
    for continuation in modes.values():
        run_episodes(engine, prompts, observations, sampling, continuation)  # compiles
    compilations = engine.num_compilations
    # Modes alternate within each repeat and each turn keeps its fastest time, so load from other
    # processes on a shared machine skews neither mode nor any one turn.
    runs = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, continuation in modes.items():
            runs[name].append(run_episodes(engine, prompts, observations, sampling, continuation))
    assert engine.num_compilations == compilations, "the timed runs recompiled"
    results = {name: (np.min([r[0] for r in rs], axis=0), rs[0][1]) for name, rs in runs.items()}

    same = results["continuation"][1] == results["re-prefill"][1]
    print(f"{common.describe(args)}; load {os.getloadavg()[0]:.1f}")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.episodes} episodes x "
        f"{args.turns} turns, prompt {args.prompt_tokens}, +{args.observation_tokens} observation "
        f"and {args.new_tokens} generated tokens per turn, max_len {max_len}"
    )
    print(f"identical tokens with continuation and re-prefill: {same}")
    print("turn  " + "".join(f"{k:>8}" for k in range(1, args.turns + 1)) + "   (seconds)")
    for name, (turn_s, _) in results.items():
        print(f"{name:<12}" + "".join(f"{s:8.3f}" for s in turn_s))
    # Tokens each mode runs through the model: continuation writes each turn's new tokens once;
    # re-prefill writes the whole history again every turn.
    e, prompt, per_turn_tokens = args.episodes, args.prompt_tokens, per_turn
    history = [prompt + k * per_turn_tokens for k in range(args.turns)]
    tokens = {
        "continuation": e * (prompt + args.turns * per_turn_tokens - args.observation_tokens),
        "re-prefill": e * (sum(history) + args.turns * args.new_tokens),
    }
    peak = common.matmul_flops_per_s(e, args.hidden, args.intermediate)
    print(
        f"matmul [{e}x{args.hidden}]x[{args.hidden}x{args.intermediate}]: {peak / 1e9:.0f} GFLOP/s"
    )
    for name, (turn_s, _) in results.items():
        flops = common.matmul_flops(args, tokens[name]) / sum(turn_s)
        print(f"{name:<12} {flops / 1e9:.1f} model GFLOP/s = {flops / peak:.2f} of the matmul rate")
    print(f"--- ratios: time(turn {args.turns}) / time(turn 1) ---")
    for name, (turn_s, _) in results.items():
        print(f"{name:<12} {turn_s[-1] / turn_s[0]:.2f}")


if __name__ == "__main__":
    main()
