"""Code-agent episodes through the real engine and the real sandbox.

A tiny model is forced token by token to a scripted conversation: its logits get a large bias
toward `script[position + 1]`, where the script is the chat template's rendering of the whole
expected conversation. Observations in that script come from running the scripted code in a real
sandbox session first, so nothing here hard-codes what the sandbox prints. The rollout must then
reproduce the script exactly: every sampled token at its position, every observation appended.
"""

from __future__ import annotations

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax.agent import parse, prompt, rollout
from toolr1_jax.data import types
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import tokenizer as tokenizer_lib
from toolr1_jax.sandbox import pool as pool_lib
from toolr1_jax.sandbox import worker
from toolr1_jax.tools import registry

MAX_LEN = 768
NUM_SLOTS = 4
SYSTEM_TEMPLATE = "Solve the task with Python.\n{tools}"
GREEDY = engine_lib.SamplingParams(max_new_tokens=1)


class ScriptedModel(nnx.Module):
    """A real tiny transformer whose logits are pushed toward `script[position + 1]`.

    `scale` 0 leaves the random model as it is. Script and scale are variables, so a test swaps
    them with `engine.set_params` and the compiled programs are reused.
    """

    def __init__(self, inner: model_lib.Transformer):
        self.inner = inner
        self.config = inner.config
        self.dtype = inner.dtype
        self.script = nnx.Variable(jnp.zeros((MAX_LEN + 1,), jnp.int32))
        self.scale = nnx.Variable(jnp.zeros((), jnp.float32))

    def hidden_states(self, tokens, positions, cache=None, attn_mask=None):
        return self.inner.hidden_states(tokens, positions, cache, attn_mask)

    def hidden_states_and_kv(self, tokens, positions, cache, attn_mask=None):
        return self.inner.hidden_states_and_kv(tokens, positions, cache, attn_mask)

    def __call__(self, tokens, positions, cache=None, attn_mask=None):
        logits, cache = self.inner(tokens, positions, cache, attn_mask)
        target = self.script[...][jnp.clip(positions + 1, 0, MAX_LEN)]  # [B, T]
        bias = self.scale[...] * jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
        return logits + bias, cache


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizer_lib.load_tokenizer(
        helpers.make_chatml_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    )


@pytest.fixture(scope="module")
def scripted():
    """One engine for the module, so its programs compile once."""
    config = helpers.tiny_model_config()
    model = ScriptedModel(model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    engine = engine_lib.Engine(model, num_slots=NUM_SLOTS, max_len=MAX_LEN)
    return model, engine


@pytest.fixture(scope="module")
def scripted_one_row(scripted):
    """The same model on an engine whose four slots share one decode row."""
    model, _ = scripted
    return model, engine_lib.Engine(model, num_slots=NUM_SLOTS, max_len=MAX_LEN, decode_rows=1)


def set_script(scripted, ids, scale=1e4):
    model, engine = scripted
    assert len(ids) <= MAX_LEN, f"scripted conversation of {len(ids)} tokens exceeds {MAX_LEN}"
    script = np.zeros((MAX_LEN + 1,), np.int32)
    script[: len(ids)] = ids
    model.script[...] = jnp.asarray(script)
    model.scale[...] = jnp.asarray(scale, jnp.float32)
    engine.set_params(nnx.split(model)[1])


def agent_config(**overrides):
    kw = dict(
        system_prompt_template=SYSTEM_TEMPLATE,
        max_turns=6,
        max_total_tokens=MAX_LEN,
        max_new_tokens_per_turn=96,
        observation_max_chars=500,
        episode_timeout_s=120.0,
        decode_chunk_steps=8,
    )
    return rollout.AgentConfig(**{**kw, **overrides})


def opening(example, pool, config):
    system = prompt.render_system_prompt(
        config.system_prompt_template, pool.tools, pool.authorized_imports
    )
    task = prompt.render_task(config.task_template, example.question, example.files)
    return prompt.build_messages(system, task)


async def scripted_conversation(pool, example, config, turns):
    """The whole conversation the agent should have: `turns` are the assistant texts; each
    observation is what the real sandbox returns for that turn's code (None for turns without
    code: the format-error observation). No observation follows the last turn."""
    messages = opening(example, pool, config)
    session = await pool.open(files=dict(example.files))
    try:
        for i, text in enumerate(turns):
            messages.append({"role": "assistant", "content": text})
            code = parse.extract_code(text)
            if code is None:
                body = config.format_error_observation
            else:
                body = (await session.run(code)).observation(config.observation_max_chars)
            if i < len(turns) - 1:
                messages.append({"role": "user", "content": prompt.render_observation(body)})
    finally:
        await session.close()
    return messages


def assistant_spans(tokenizer, messages):
    """[start, end) token spans of each assistant message's content, from the template alone."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tokenizer.prompt_ids(messages[:i]))
            spans.append((start, start + len(tokenizer.encode(m["content"]))))
    return spans


async def run(requests, scripted, tokenizer, pool, config, sampling=GREEDY, on_group=None):
    groups = []

    def collect(group):
        groups.append(group)
        if on_group is not None:
            on_group(group)

    stats = await rollout.rollout(
        requests,
        engine=scripted[1],
        tokenizer=tokenizer,
        pool=pool,
        config=config,
        sampling=sampling,
        policy_version=5,
        on_group=collect,
    )
    return groups, stats


def check_token_exact(tokenizer, traj, messages, *, closed_by_model=()):
    """Tokens are the template's rendering of `messages` (up to the last turn's closing tokens),
    the loss mask is 1 exactly on assistant content, and log-probs sit only there."""
    full = tokenizer.encode(tokenizer.render(messages, add_generation_prompt=False))
    n = len(traj.tokens)
    assert traj.tokens.tolist() == full[:n]
    # Only the closing of the last assistant turn is missing: the policy never sampled it.
    assert tokenizer.decode(full[n:]) in ("<|im_end|>\n", "\n")
    mask = np.zeros(n, np.int32)
    for k, (start, end) in enumerate(assistant_spans(tokenizer, messages)):
        # A turn the model closed itself (stop on <|im_end|>) sampled that token too.
        mask[start : end + (1 if k in closed_by_model else 0)] = 1
    np.testing.assert_array_equal(traj.loss_mask, mask)
    sampled = traj.behaviour_logprobs[mask == 1]
    assert np.all(sampled <= 0) and np.all(sampled > -1e-3)  # forced: probability ~1
    assert np.all(traj.behaviour_logprobs[mask == 0] == 0)
    assert traj.prompt_len == len(tokenizer.prompt_ids(messages[:2]))


async def test_full_episode_is_token_exact(scripted, tokenizer):
    example = types.Example("sum", "What is 21 * 2 + 1?", "43", 1)
    turns = [
        "Thought: store a value.\n<code>\nx = 21 * 2\nprint(x)\n</code>",
        "Thought: reuse it.\n<code>\ny = x + 1\nprint(y)\n</code>",
        "Thought: done.\n<code>\nfinal_answer(y)\n</code>",
    ]
    config = agent_config()
    async with pool_lib.SandboxPool(2, 5.0, 512, preload=()) as pool:
        messages = await scripted_conversation(pool, example, config, turns)
        # The variable from turn 1 survived into turn 2.
        assert [m["content"] for m in messages[3::2]] == ["Observation:\n42", "Observation:\n43"]
        set_script(scripted, tokenizer.encode(tokenizer.render(messages, False)))
        groups, stats = await run([(example, 2, 11)], scripted, tokenizer, pool, config)

    assert len(groups) == 1 and groups[0].group_id == 11 and groups[0].example is example
    for traj in groups[0].trajectories:
        assert (traj.status, traj.final_answer, traj.task_id) == ("answered", "43", "sum")
        assert (traj.group_id, traj.policy_version) == (11, 5)
        assert [t.text for t in traj.turns] == turns
        assert [t.code for t in traj.turns] == [parse.extract_code(t) for t in turns]
        assert [t.observation for t in traj.turns] == [
            "Observation:\n42",
            "Observation:\n43",
            "",
        ]
        assert [t.exec_status for t in traj.turns] == ["ok", "ok", "ok"]
        check_token_exact(tokenizer, traj, messages)
        # Each turn stopped at </code>: the <|im_end|> after it was appended, not sampled.
        ends = [end for _, end in assistant_spans(tokenizer, messages)]
        assert [traj.loss_mask[e] for e in ends[:-1]] == [0, 0]
        assert len(traj.tokens) == ends[-1]
    assert stats.num_episodes == 2 and stats.num_turns == 6 and stats.num_code_runs == 6
    assert stats.statuses == {"answered": 2} and stats.num_format_errors == 0


async def test_format_error_then_recovery_with_a_model_closed_turn(scripted, tokenizer):
    # Turn 1 has no code and the model closes it with <|im_end|> itself: the observation's delta
    # must not close the turn a second time.
    example = types.Example("fmt", "Name a prime.", "7", 1)
    turns = [
        "The answer is seven, probably.",
        "Thought: use code.\n<code>\nfinal_answer(7)\n</code>",
    ]
    config = agent_config()
    async with pool_lib.SandboxPool(1, 5.0, 512, preload=()) as pool:
        messages = await scripted_conversation(pool, example, config, turns)
        assert messages[3]["content"] == "Observation:\n" + parse.FORMAT_ERROR_OBSERVATION
        set_script(scripted, tokenizer.encode(tokenizer.render(messages, False)))
        groups, stats = await run([(example, 1, 0)], scripted, tokenizer, pool, config)
    (traj,) = groups[0].trajectories
    assert (traj.status, traj.final_answer) == ("answered", "7")
    assert [t.exec_status for t in traj.turns] == ["parse_error", "ok"]
    assert traj.turns[0].code is None and not traj.all_turns_parsed
    check_token_exact(tokenizer, traj, messages, closed_by_model=(0,))
    assert stats.num_format_errors == 1


async def test_never_producing_code_ends_with_parse_error(scripted, tokenizer):
    example = types.Example("noc", "Say hi.", "hi", 1)
    turns = ["Hello there.", "Still no code here."]
    config = agent_config(max_turns=2)
    async with pool_lib.SandboxPool(1, 5.0, 512, preload=()) as pool:
        messages = await scripted_conversation(pool, example, config, turns)
        set_script(scripted, tokenizer.encode(tokenizer.render(messages, False)))
        groups, _ = await run([(example, 1, 0)], scripted, tokenizer, pool, config)
    (traj,) = groups[0].trajectories
    assert (traj.status, traj.final_answer) == ("parse_error", None)
    assert [t.exec_status for t in traj.turns] == ["parse_error", "parse_error"]
    check_token_exact(tokenizer, traj, messages, closed_by_model=(0, 1))


async def test_sandbox_timeouts_and_crashes_become_observations(scripted, tokenizer):
    example = types.Example("rough", "Survive.", "done", 1)
    turns = [
        "Thought: a slow loop.\n<code>\nx = 5\nwhile True:\n    pass\n</code>",
        "Thought: x is kept.\n<code>\nprint(x + 1)\n</code>",
        "Thought: crash.\n<code>\nimport ctypes\nctypes.string_at(0)\n</code>",
        "Thought: go on.\n<code>\nfinal_answer('done')\n</code>",
    ]
    config = agent_config(max_total_tokens=MAX_LEN)
    imports = (*worker.DEFAULT_AUTHORIZED_IMPORTS, "ctypes")
    async with pool_lib.SandboxPool(
        1, 0.5, 512, preload=(), kill_grace_s=0.5, authorized_imports=imports
    ) as pool:
        messages = await scripted_conversation(pool, example, config, turns)
        set_script(scripted, tokenizer.encode(tokenizer.render(messages, False)))
        groups, _ = await run([(example, 1, 0)], scripted, tokenizer, pool, config)
    (traj,) = groups[0].trajectories
    assert [t.exec_status for t in traj.turns] == ["timeout", "ok", "crashed", "ok"]
    assert "TimeoutError" in traj.turns[0].observation
    assert traj.turns[1].observation == "Observation:\n6"
    assert "SIGSEGV" in traj.turns[2].observation
    assert (traj.status, traj.final_answer) == ("answered", "done")
    check_token_exact(tokenizer, traj, messages)


async def test_random_model_episodes_end_cleanly(scripted, tokenizer):
    set_script(scripted, [], scale=0.0)  # the untrained model as it is
    config = agent_config(max_turns=3, max_new_tokens_per_turn=12, max_total_tokens=300)
    sampling = engine_lib.SamplingParams(max_new_tokens=1, temperature=1.0, seed=3)
    examples = [types.Example(f"r{i}", f"Question {i}?", "x", 1) for i in range(3)]
    async with pool_lib.SandboxPool(1, 5.0, 512, preload=()) as pool:
        groups, stats = await run(
            [(e, 2, i) for i, e in enumerate(examples)], scripted, tokenizer, pool, config, sampling
        )
    assert sorted(g.group_id for g in groups) == [0, 1, 2]
    trajs = [t for g in groups for t in g.trajectories]
    assert len(trajs) == 6
    for traj in trajs:
        assert traj.status in ("parse_error", "max_tokens"), traj.status
        assert traj.final_answer is None and 1 <= len(traj.turns) <= 3
        assert len(traj.tokens) <= config.max_total_tokens
        assert traj.loss_mask[: traj.prompt_len].sum() == 0
        # One run of sampled tokens per turn, separated by appended observations.
        runs = np.flatnonzero(np.diff(np.concatenate([[0], traj.loss_mask])) == 1)
        assert len(runs) == len(traj.turns)
        assert np.all(traj.behaviour_logprobs[traj.loss_mask == 1] < 0)
    # The two episodes of a group are distinct samples.
    for g in groups:
        a, b = g.trajectories
        assert a.tokens.tolist() != b.tokens.tolist()
    assert sum(stats.statuses.values()) == 6


def _pace_tool(release: asyncio.Event, log: list, safety_s: float):
    async def pace(mode: str) -> str:
        """Waits when `mode` is "slow", as a web request might."""
        if mode == "slow":
            try:
                await asyncio.wait_for(release.wait(), safety_s)
                log.append("released")
            except asyncio.TimeoutError:
                log.append("timed out")
        return "ok"

    return registry.make_tool(pace, host=True)


async def _slow_tool_run(scripted, tokenizer, *, lockstep, safety_s):
    """Group 0's tool blocks until groups 1-3 have completed (or `safety_s` passes)."""
    release, log, order = asyncio.Event(), [], []
    tool = _pace_tool(release, log, safety_s)
    examples = [
        types.Example(f"p{i}", "Pace yourself.", "x", 1, files={"mode.txt": mode})
        for i, mode in enumerate([b"slow", b"fast", b"fast", b"fast"])
    ]
    turns = [
        "Thought: check.\n<code>\nmode = open('mode.txt').read()\nprint(pace(mode))\n</code>",
        "Thought: done.\n<code>\nfinal_answer(mode)\n</code>",
    ]
    config = agent_config(lockstep=lockstep)

    def on_group(group):
        order.append(group.group_id)
        if set(order) >= {1, 2, 3}:
            release.set()

    async with pool_lib.SandboxPool(4, 5.0 + safety_s, 512, preload=(), tools=[tool]) as pool:
        # All four conversations are the same token for token ("ok" either way).
        messages = await scripted_conversation(pool, examples[1], config, turns)
        set_script(scripted, tokenizer.encode(tokenizer.render(messages, False)))
        groups, _ = await run(
            [(e, 1, i) for i, e in enumerate(examples)],
            scripted,
            tokenizer,
            pool,
            config,
            on_group=on_group,
        )
    answers = {g.group_id: g.trajectories[0].final_answer for g in groups}
    assert answers == {0: "slow", 1: "fast", 2: "fast", 3: "fast"}
    for g in groups:
        check_token_exact(tokenizer, g.trajectories[0], messages)
    return order, log


async def test_slow_tool_does_not_delay_other_episodes(scripted, tokenizer):
    order, log = await _slow_tool_run(scripted, tokenizer, lockstep=False, safety_s=60.0)
    # The other three decoded their second turn and finished while group 0's tool was waiting:
    # its wait ended because they completed, not by its safety timeout.
    assert order[-1] == 0 and sorted(order[:3]) == [1, 2, 3]
    assert log == ["released"]


async def test_an_episode_waiting_on_a_tool_keeps_its_slot_but_no_decode_row(
    scripted_one_row, tokenizer
):
    # Four slots, one decode row: group 0's slot keeps its cache while its tool waits, and the
    # other three take turns on the one row and finish meanwhile. Then group 0 continues from
    # its cache (token-exact, checked in the run).
    order, log = await _slow_tool_run(scripted_one_row, tokenizer, lockstep=False, safety_s=60.0)
    assert order[-1] == 0 and sorted(order[:3]) == [1, 2, 3]
    assert log == ["released"]


async def test_lockstep_baseline_waits_for_the_slowest_tool(scripted, tokenizer):
    # The contrast that gives the test above its meaning: in lock-step nobody decodes while a
    # tool runs, so the others cannot finish and the slow tool runs into its safety timeout.
    order, log = await _slow_tool_run(scripted, tokenizer, lockstep=True, safety_s=1.0)
    assert log == ["timed out"]
    assert sorted(order) == [0, 1, 2, 3]


async def test_episodes_beyond_the_slots_queue_for_one(scripted, tokenizer):
    example = types.Example("q", "What is 2 + 3?", "5", 1)
    turns = [
        # A tool slower than a decode chunk: the waiting episodes queue while it runs.
        "Thought: add.\n<code>\nimport time\ntime.sleep(0.3)\ns = 2 + 3\nprint(s)\n</code>",
        "Thought: done.\n<code>\nfinal_answer(s)\n</code>",
    ]
    async with pool_lib.SandboxPool(2, 5.0, 512, preload=()) as pool:
        config = agent_config()
        messages = await scripted_conversation(pool, example, config, turns)
        set_script(scripted, tokenizer.encode(tokenizer.render(messages, False)))
        requests = [(example, 3, g) for g in range(3)]  # 9 episodes on 4 slots
        groups, stats = await run(requests, scripted, tokenizer, pool, config)
        assert sorted(g.group_id for g in groups) == [0, 1, 2]
        for g in groups:
            for traj in g.trajectories:
                assert (traj.status, traj.final_answer) == ("answered", "5")
                check_token_exact(tokenizer, traj, messages)


async def test_async_group_callbacks_and_empty_groups(scripted, tokenizer):
    example = types.Example("cb", "What is 2 + 3?", "5", 1)
    turns = ["Thought: done.\n<code>\nfinal_answer(2 + 3)\n</code>"]
    scored = []

    async def on_group(group):
        await asyncio.sleep(0.05)  # a judge call
        scored.append((group.group_id, len(group.trajectories)))

    async with pool_lib.SandboxPool(1, 5.0, 512, preload=()) as pool:
        config = agent_config()
        messages = await scripted_conversation(pool, example, config, turns)
        set_script(scripted, tokenizer.encode(tokenizer.render(messages, False)))
        requests = [rollout.GroupRequest(example, 0, 0), rollout.GroupRequest(example, 2, 1)]
        await rollout.rollout(
            requests,
            engine=scripted[1],
            tokenizer=tokenizer,
            pool=pool,
            config=config,
            sampling=GREEDY,
            policy_version=0,
            on_group=on_group,
        )
    # Both callbacks finished before rollout returned; the empty group was handed on too.
    assert sorted(scored) == [(0, 0), (1, 2)]


def test_bad_configs_and_requests_are_rejected(scripted, tokenizer):
    with pytest.raises(ValueError, match="max_turns"):
        rollout.AgentConfig(max_turns=0)
    with pytest.raises(ValueError, match="observation_max_chars"):
        rollout.AgentConfig(observation_max_chars=10)
    with pytest.raises(ValueError, match="stop_strings"):
        rollout.AgentConfig(stop_strings="</code>")
    with pytest.raises(ValueError, match=r"\{tools\}"):
        rollout.AgentConfig(system_prompt_template="no slots")
    with pytest.raises(ValueError, match="num_episodes"):
        rollout.GroupRequest(types.Example("a", "q", "a", 1), -1, 0)

    async def start(requests, config):
        async with pool_lib.SandboxPool(1, 5.0, 512, preload=()) as pool:
            await run(requests, scripted, tokenizer, pool, config)

    example = types.Example("a", "q", "a", 1)
    with pytest.raises(ValueError, match="max_len"):
        asyncio.run(start([(example, 1, 0)], agent_config(max_total_tokens=MAX_LEN + 1)))
    with pytest.raises(ValueError, match="unique"):
        asyncio.run(start([(example, 1, 0), (example, 1, 0)], agent_config()))
