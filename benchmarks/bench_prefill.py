"""Prefill of one GRPO step: shared-prefix prefill vs every episode prefilled on its own.

A step of `--questions` questions x `--group` episodes, each episode's prompt the SmolLM2 demo's
(configs/common.py SMOLLM2_SYSTEM_PROMPT and SMOLLM2_TASK_TEMPLATE with the demo's tools and
imports, rendered by toolr1_jax.agent.prompt and tokenized by the real SmolLM2 tokenizer). All
prompts are added to an idle engine at once, as the rollout does, and the queued prefill runs:
with `share_prefixes`, equal prompts are prefilled once and the system prompt is shared across
questions (copied); without, every slot prefills its whole prompt. Random weights at SmolLM2's
dimensions. Prints the wall time of each (best of `--repeats`), the ratio, and the FLOP/s of the
rows each computed against the matmul throughput measured in the same process.

  python benchmarks/bench_prefill.py                    # 8 x 8 episodes, SmolLM2 size
  python benchmarks/bench_prefill.py --preset=tiny      # quick
  python benchmarks/bench_prefill.py --slots=16         # the demo's slot count: adds in 4 waves
"""

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/

import common  # benchmarks/common.py

from configs import common as config_common
from configs import demo
from toolr1_jax import build
from toolr1_jax import engine as engine_lib
from toolr1_jax.agent import prompt
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import tokenizer as tokenizer_lib

# Level-1-style questions of varied length (the synthetic suite's kinds: arithmetic, a search,
# a table); only their tokens matter here.
QUESTIONS = (
    "What is 17 * 23 + 4?",
    "How many days are there between 2021-03-04 and 2021-11-19?",
    "Search for the founding year of the Verdan Observatory and add 12 to it.",
    "In sales.csv, which region has the highest total of the amount column?",
    "What is the median of 3, 9, 4, 15, 8 and 21?",
    "Which of the search results about Lake Orrin names the deepest point, and how deep is it?",
    "Count the rows of inventory.xlsx whose quantity is below 10.",
    "What is the sum of the squares of the first twelve positive integers?",
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="episodes per question")
    p.add_argument("--slots", type=int, default=0, help="engine slots (0: one per episode)")
    p.add_argument("--max_len", type=int, default=1024, help="the demo's agent.max_total_tokens")
    p.add_argument("--prefill_chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs; the fastest is reported")
    common.add_dtype_arg(p)
    return common.resolve_model_args(p.parse_args())


def demo_prompts(tok, num_questions: int) -> list[list[int]]:
    """The demo's opening prompt for each question (configs/demo.py:smollm2)."""
    config = demo.get_config("smollm2")
    system = prompt.render_system_prompt(
        config_common.SMOLLM2_SYSTEM_PROMPT, build.tools(config), config.sandbox.authorized_imports
    )
    out = []
    for i in range(num_questions):
        question = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (#{i})")
        task = prompt.render_task(config_common.SMOLLM2_TASK_TEMPLATE, question)
        out.append(tok.prompt_ids(prompt.build_messages(system, task)))
    return out


def build_model(args) -> model_lib.Transformer:
    config = common.model_config(args)
    return model_lib.Transformer(config, rngs=nnx.Rngs(0), dtype=common.DTYPES[args.dtype])


def time_step_prefill(engine, prompts, repeats):
    """(best wall seconds, prefill rows computed) for prefilling `prompts` in waves of the
    engine's slot count, as a rollout adds its first episodes."""
    rows = []
    prefill = engine._prefill_fn

    def counting(*a):
        rows.append(len(a[2]))  # slot_ids [P]: the rows this call computes
        return prefill(*a)

    engine._prefill_fn = counting
    sampling = engine_lib.SamplingParams(max_new_tokens=1)
    best = float("inf")
    for _ in range(repeats):
        rows.clear()
        seconds = 0.0
        for start in range(0, len(prompts), engine.num_slots):
            slots = [engine.add(p, sampling) for p in prompts[start : start + engine.num_slots]]
            t0 = time.perf_counter()
            engine._run_prefills()  # the queued prefill, as the next `step` would start with
            jax.block_until_ready(engine._state)
            seconds += time.perf_counter() - t0
            for slot in slots:
                engine.release(slot)
        best = min(best, seconds)
    engine._prefill_fn = prefill
    return best, sum(rows)


def main():
    args = parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; {common.describe(args)}"
    )
    tok = tokenizer_lib.load_tokenizer("smollm2-135m-instruct")
    # A smaller vocabulary (--preset=tiny) folds the ids; equal prefixes stay equal.
    questions = [[t % args.vocab for t in p] for p in demo_prompts(tok, args.questions)]
    prompts = [p for p in questions for _ in range(args.group)]
    lengths = sorted(len(p) for p in questions)
    system_len = min(
        next(i for i, (a, b) in enumerate(zip(p, questions[0], strict=False)) if a != b)
        for p in questions[1:]
    )
    print(
        f"{args.questions} questions x {args.group} episodes; prompts {lengths[0]}-{lengths[-1]} "
        f"tokens, {system_len} shared by all; prefill chunk {args.prefill_chunk}"
    )
    model = build_model(args)
    slots = args.slots or len(prompts)
    # Prefill computes the layers only (no LM head): 2 FLOPs per layer weight per row token.
    graphdef, state = nnx.split(model)
    del graphdef
    layer_params = sum(x.size for x in jax.tree.leaves(state)) - args.vocab * args.hidden * (
        1 if args.tied else 2
    )
    matmul = common.matmul_flops_per_s(2048, args.hidden, args.intermediate, model.dtype)

    results = {}
    for share in (False, True):
        engine = engine_lib.Engine(
            model,
            num_slots=slots,
            max_len=args.max_len,
            prefill_chunk=args.prefill_chunk,
            share_prefixes=share,
        )
        engine.warmup()
        jax.block_until_ready(engine._state)  # warmup's runs are asynchronous: not in the timing
        seconds, rows = time_step_prefill(engine, prompts, args.repeats)
        flops = 2.0 * layer_params * rows * engine.prefill_chunk
        results[share] = seconds
        name = "shared prefixes" if share else "per episode    "
        print(
            f"{name}: {seconds:7.2f} s, {rows:4d} rows of {engine.prefill_chunk} tokens computed, "
            f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / matmul:.0%} of the "
            f"measured matmul throughput ({matmul / 1e9:.0f} GFLOP/s, [2048x{args.hidden}]x"
            f"[{args.hidden}x{args.intermediate}] {args.dtype})"
        )
        del engine
    real = sum(len(p) - 1 for p in prompts)
    print(
        f"per-episode prefill tokens: {real}; effective rate shared "
        f"{real / results[True]:.0f} tok/s, per episode {real / results[False]:.0f} tok/s"
    )
    print(f"prefill wall time, per episode / shared: {results[False] / results[True]:.2f}x")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
