"""Rollout wall time with slow tools: asynchronous rollout vs the lock-step baseline.

Usage: python benchmarks/bench_rollout.py [--episodes 64] [--turns 4] [--tool_s 0.5]
           [--slots 64] [--decode_rows 16] [--tool_spread 1.5] [--repeats 3] [--preset tiny]

Every episode makes `turns` tool calls that sleep (a stand-in for web latency), through the real
engine (a random model at SmolLM2-135M's dimensions, `--preset=tiny` for a small one, forced to
a scripted conversation) and the real sandbox. The engine holds
`slots` sequences in its cache and decodes `decode_rows` of them at once. Rows:
  pure decode   the asynchronous rollout with tools that return at once: decode-bound time D
  lock-step     every turn waits until all live episodes' tools are done
  async         asynchronous (the default): an episode waiting on its tool keeps its cache slot
                but takes no decode row, so the others decode meanwhile
  ..., R slots  the same on a reference engine with a row per slot (slots = decode_rows, the
                layout before decode rows existed): the same decode width, less cache, and
                episodes beyond the slots queue for one
Each latency setting runs every row back to back on the same episodes, `repeats` times;
medians are printed. Tools sleep `tool_s` on every call, then (with --tool_spread > 0)
a heavy-tailed lognormal latency of mean `tool_s` drawn once per (episode, turn), the same for
every row. Overlap efficiency = ideal / measured, ideal = max(D, longest single episode's tool
time).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py)

from tests import helpers  # noqa: E402
from toolr1_jax import engine as engine_lib  # noqa: E402
from toolr1_jax.agent import parse, prompt, rollout  # noqa: E402
from toolr1_jax.data import types  # noqa: E402
from toolr1_jax.models import model as model_lib  # noqa: E402
from toolr1_jax.models import tokenizer as tokenizer_lib  # noqa: E402
from toolr1_jax.sandbox import pool as pool_lib  # noqa: E402
from toolr1_jax.tools import registry  # noqa: E402

# Each episode's sandbox holds this attachment with the episode's id; its queries carry the id, so
# the tool knows whose call it serves while the conversation's tokens stay the same for all.
_ID_FILE = "id"


class ScriptedModel(nnx.Module):
    """A random transformer whose logits are pushed toward `script[position + 1]`."""

    def __init__(self, inner: model_lib.Transformer, script: np.ndarray):
        self.inner = inner
        self.config = inner.config
        self.dtype = inner.dtype
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))

    def hidden_states(self, tokens, positions, cache=None, attn_mask=None):
        return self.inner.hidden_states(tokens, positions, cache, attn_mask)

    def __call__(self, tokens, positions, cache=None, attn_mask=None):
        logits, cache = self.inner(tokens, positions, cache, attn_mask)
        script = self.script[...]
        target = script[jnp.clip(positions + 1, 0, script.shape[0] - 1)]
        return logits + 1e4 * jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype), cache


@dataclasses.dataclass
class _Latency:
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # query -> sleep


def _web_tool(latency: _Latency):
    async def web(query: str) -> str:
        """Looks `query` up on the web and returns the page text."""
        await asyncio.sleep(latency.seconds.get(query, 0.0))
        return "page text"

    return registry.make_tool(web, host=True)


def _turns(num_turns: int) -> list[str]:
    # The first turn reads the episode's id; later turns reuse the variable.
    turns = [
        f"Thought: look up part {k}.\n<code>\nr{k} = web(me + '{k}')\nprint(r{k})\n</code>"
        for k in range(num_turns)
    ]
    turns[0] = turns[0].replace("<code>\n", f"<code>\nme = open('{_ID_FILE}').read()\n")
    turns[-1] = f"Thought: answer.\n<code>\nfinal_answer(web(me + '{num_turns - 1}'))\n</code>"
    return turns


def _latencies(args, spread: float) -> dict[str, float]:
    """Sleep per query (episode id, then turn): tool_s, or lognormal draws of mean tool_s."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((args.episodes, args.turns))
    seconds = args.tool_s * np.exp(spread * z - spread**2 / 2)
    return {
        f"{i}-{k}": float(seconds[i, k]) for i in range(args.episodes) for k in range(args.turns)
    }


async def _script(pool, tokenizer, config, turns) -> list[int]:
    """The conversation's ids, with observations from running the turns in a real session."""
    system = prompt.render_system_prompt(
        config.system_prompt_template, pool.tools, pool.authorized_imports
    )
    task = prompt.render_task(config.task_template, "Q?", [_ID_FILE])
    messages = prompt.build_messages(system, task)
    session = await pool.open(files={_ID_FILE: b"-"})
    try:
        for i, text in enumerate(turns):
            messages.append({"role": "assistant", "content": text})
            result = await session.run(parse.extract_code(text))
            if i < len(turns) - 1:
                body = result.observation(config.observation_max_chars)
                messages.append({"role": "user", "content": prompt.render_observation(body)})
    finally:
        await session.close()
    return tokenizer.encode(tokenizer.render(messages, add_generation_prompt=False))


async def main(args) -> None:
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench_rollout_")
    tokenizer = tokenizer_lib.load_tokenizer(helpers.make_chatml_tokenizer_dir(tmp))
    latency = _Latency()
    config = rollout.AgentConfig(
        system_prompt_template="Solve the task with Python.\n{tools}",
        max_turns=args.turns + 1,
        max_total_tokens=args.max_len,
        max_new_tokens_per_turn=128,
        observation_max_chars=500,
        decode_chunk_steps=args.chunk,
    )
    examples = [
        types.Example(f"bench{i}", "Q?", "x", 1, files={_ID_FILE: f"{i}-".encode()})
        for i in range(args.episodes)
    ]
    turns = _turns(args.turns)
    # The script's ids come from a small test tokenizer; the model keeps the preset's vocabulary
    # (ids beyond the tokenizer's are never the scripted argmax), so the LM head costs what it
    # costs at that size.
    model_config = common.model_config(args, vocab_size=max(args.vocab, tokenizer.vocab_size))
    async with pool_lib.SandboxPool(
        args.episodes, 30.0, 512, preload=(), tools=[_web_tool(latency)]
    ) as pool:
        script = await _script(pool, tokenizer, config, turns)
        if len(script) > args.max_len:
            raise SystemExit(f"the scripted episode has {len(script)} tokens > --max_len")
        inner = model_lib.Transformer(model_config, rngs=nnx.Rngs(0))
        padded = np.zeros((args.max_len + 1,), np.int32)
        padded[: len(script)] = script
        engine = engine_lib.Engine(
            ScriptedModel(inner, padded),
            num_slots=args.slots,
            max_len=args.max_len,
            decode_rows=args.decode_rows,
            prefill_chunk=args.prefill_chunk,
        )
        engine.warmup()
        reference = engine_lib.Engine(
            ScriptedModel(inner, padded),
            num_slots=engine.decode_rows,
            max_len=args.max_len,
            prefill_chunk=args.prefill_chunk,
        )
        reference.warmup()
        sampling = engine_lib.SamplingParams(max_new_tokens=1)

        async def timed(seconds, engine=engine, **overrides):
            latency.seconds = seconds
            compiles = engine.num_compilations
            groups = []
            cfg = dataclasses.replace(config, **overrides)
            stats = await rollout.rollout(
                [(ex, 1, i) for i, ex in enumerate(examples)],
                engine=engine,
                tokenizer=tokenizer,
                pool=pool,
                config=cfg,
                sampling=sampling,
                policy_version=0,
                on_group=groups.append,
            )
            trajs = [t for g in groups for t in g.trajectories]
            assert len(trajs) == args.episodes
            assert all(t.status == "answered" and len(t.turns) == args.turns for t in trajs)
            assert all(t.tokens.tolist() == script[: len(t.tokens)] for t in trajs)
            assert engine.num_compilations == compiles
            slots = f"{engine.num_slots} slots, {engine.decode_rows} rows"
            print(f"  {slots}, {overrides}: {stats.wall_s:.2f} s, {stats.num_engine_calls} calls")
            return stats

        ref = f", {reference.num_slots} slots"
        modes = {
            "lock-step": dict(lockstep=True),
            "async": dict(lockstep=False),
            "lock-step" + ref: dict(lockstep=True, engine=reference),
            "async" + ref: dict(lockstep=False, engine=reference),
        }
        await timed({})  # warm caches and the sandbox
        await timed({}, engine=reference)
        runs = {"pure decode": [await timed({}) for _ in range(args.repeats)]}
        settings = {f"tools {args.tool_s} s": _latencies(args, 0.0)}
        if args.tool_spread > 0:
            settings[f"lognormal mean {args.tool_s} s, sigma {args.tool_spread}"] = _latencies(
                args, args.tool_spread
            )
        for setting, seconds in settings.items():
            for _ in range(args.repeats):
                for name, overrides in modes.items():  # back to back on the same latencies
                    runs.setdefault((setting, name), []).append(await timed(seconds, **overrides))

    def median(key, field="wall_s"):
        return statistics.median(getattr(s, field) for s in runs[key])

    decode_s = median("pure decode")
    print(
        f"{args.episodes} episodes x {args.turns} tool turns, {len(script)} tokens per episode; "
        f"engine: {args.slots} slots, {engine.decode_rows} decode rows, prefill chunk "
        f"{engine.prefill_chunk}, decode chunk {args.chunk}; medians of {args.repeats}; "
        f"model: {common.describe(args)}; "
        f"{jax.devices()[0].platform}; load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(f"{'rollout':<24} {'wall s':>8} {'engine s':>9} {'idle s':>7}")
    print(f"{'pure decode':<24} {decode_s:8.2f} {median('pure decode', 'engine_s'):9.2f}")
    for setting, seconds in settings.items():
        per_episode = [
            sum(seconds[f"{i}-{k}"] for k in range(args.turns)) for i in range(args.episodes)
        ]
        tools_s = max(per_episode)
        ideal = max(decode_s, tools_s)
        print(f"{setting}: longest episode's tool time T = {tools_s:.2f} s, ideal {ideal:.2f} s")
        for name in modes:
            key = (setting, name)
            print(
                f"  {name:<22} {median(key):8.2f} {median(key, 'engine_s'):9.2f} "
                f"{median(key, 'engine_idle_s'):7.2f}"
            )
        for name in ("async", "async" + ref):
            wall = median((setting, name))
            speed = ", ".join(
                f"{median((setting, base)) / wall:.2f}x {base}"
                for base in ("lock-step", "lock-step" + ref)
            )
            print(f"  {name}: {speed}; overlap efficiency {ideal / wall:.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tool_s", type=float, default=0.5)
    parser.add_argument("--tool_spread", type=float, default=1.5, help="0: fixed latency only")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--decode_rows", type=int, default=16)
    parser.add_argument("--prefill_chunk", type=int, default=32)
    parser.add_argument("--max_len", type=int, default=576)
    parser.add_argument("--chunk", type=int, default=8)
    common.add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(common.resolve_model_args(parser.parse_args())))
