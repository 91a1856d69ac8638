"""Cold-start SFT: demonstrations are token-exact episodes of the reference solutions with real
observations; the loss is the masked NLL; a tiny model fitted to level-1 demonstrations writes
the agent format through the real engine."""

import asyncio
import dataclasses
import functools
import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from flax import nnx

from tests import helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax import sft, sharding, update
from toolr1_jax.agent import prompt, rollout
from toolr1_jax.data import synthetic
from toolr1_jax.data import types as data_types
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import tokenizer as tokenizer_lib
from toolr1_jax.sandbox import pool as pool_lib
from toolr1_jax.tools import search

SEED = 0
IMPORTS = ("math", "pandas")
# Short, so that the tiny model's episodes are short; the tools are rendered in full.
SYSTEM_TEMPLATE = """\
Solve the task in steps. Each step: a line "Thought: ...", then Python code between <code> and \
</code>. Printed output comes back as "Observation:". Tools:
{tools}
Imports: {authorized_imports}.
"""
AGENT = rollout.AgentConfig(
    system_prompt_template=SYSTEM_TEMPLATE,
    max_turns=4,
    max_total_tokens=1024,
    max_new_tokens_per_turn=256,
    observation_max_chars=1000,
)
# Level-1 families that need no search: single-turn episodes short enough for a CPU test.
TRAIN_FAMILIES = ("arith", "table_agg", "text_count")


def _turns(solution, thought="Go on."):
    return {"solution": solution, "thoughts": [thought] * len(solution)}


def _bad_examples(base: data_types.Example) -> list[data_types.Example]:
    """One example per skip reason, built from a good one (`base`, a table_agg task)."""

    def variant(task_id, **metadata):
        return dataclasses.replace(base, task_id=task_id, metadata={**base.metadata, **metadata})

    return [
        data_types.Example("no-solution", "What is 1 + 1?", "2", 1),
        dataclasses.replace(base, task_id="wrong", answer="-1"),
        variant("early", **_turns([base.metadata["solution"][0], "print(1)"])),
        variant("never", **_turns(["print(1)"])),
        variant("crash", **_turns(["x = 1 / 0", "final_answer(x)"])),
        variant("turns", **_turns(["print(1)"] * 4 + [f"final_answer({base.answer})"])),
        variant("thoughts", thoughts=[]),
        variant("stop", **_turns([f'print("</code>")\nfinal_answer({base.answer})'])),
        variant("long", **_turns(["x = 0\n" + "x += 1\n" * 200 + f"final_answer({base.answer})"])),
    ]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Examples, a tokenizer trained on them, and their demonstrations from one sandbox pool."""
    train = synthetic.generate("train", 32, SEED, levels=(1,), families=TRAIN_FAMILIES)
    # Multi-turn episodes: a search observation, and a printed table read from an attachment.
    multi = synthetic.generate("train", 2, SEED, families=("search_fact", "table_groupby"))
    tool = search.make_search_tool(synthetic.corpus(SEED))
    system = prompt.render_system_prompt(SYSTEM_TEMPLATE, [tool], IMPORTS)
    texts = [system, "system user assistant"]
    for e in train + multi:
        texts += [e.question, *e.metadata["thoughts"], *e.metadata["solution"]]
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer = tokenizer_lib.load_tokenizer(
        tokenizer_lib.train_chatml_tokenizer(texts, 1024, path)
    )
    bad = _bad_examples(train[1])

    async def play():
        pool = pool_lib.SandboxPool(
            2,
            30.0,
            2048,
            tools=[tool],
            authorized_imports=IMPORTS,
            preload=synthetic.SANDBOX_PRELOAD,
        )
        async with pool:
            return await asyncio.gather(
                sft.demonstrations(train, tokenizer=tokenizer, pool=pool, agent_config=AGENT),
                sft.demonstrations(multi, tokenizer=tokenizer, pool=pool, agent_config=AGENT),
                sft.demonstrations(
                    [train[0], *bad], tokenizer=tokenizer, pool=pool, agent_config=AGENT
                ),
            )

    (train_demos, train_skipped), (multi_demos, _), (bad_demos, bad_skipped) = asyncio.run(play())
    assert train_skipped == {}
    return types.SimpleNamespace(
        tokenizer=tokenizer,
        tool=tool,
        system=system,
        train=train,
        train_demos=train_demos,
        multi=multi,
        multi_demos=multi_demos,
        bad_demos=bad_demos,
        bad_skipped=bad_skipped,
    )


# ---------------------------------------------------------------------------------------------
# Demonstrations
# ---------------------------------------------------------------------------------------------


def test_demonstrations_are_the_chat_template_conversation_with_real_observations(suite):
    tok = suite.tokenizer
    assert len(suite.multi_demos) == 2
    for example, demo in zip(suite.multi, suite.multi_demos, strict=True):
        solution, thoughts = example.metadata["solution"], example.metadata["thoughts"]
        assert demo.task_id == example.task_id and demo.status == "answered"
        assert [t.code for t in demo.turns] == solution
        assert demo.final_answer == example.answer
        # The whole conversation through the chat template; the last turn is cut at </code>,
        # where the engine stops and the episode ends.
        task = prompt.render_task(AGENT.task_template, example.question, example.files)
        messages = prompt.build_messages(suite.system, task)
        mask = np.zeros(0, np.int32)
        for k, (thought, code) in enumerate(zip(thoughts, solution, strict=True)):
            start = len(tok.encode(tok.render(messages, add_generation_prompt=True)))
            text = f"Thought: {thought}\n<code>\n{code}\n</code>"
            turn_ids = tok.encode(text)
            mask = np.concatenate([mask, np.zeros(start - len(mask)), np.ones(len(turn_ids))])
            messages.append({"role": "assistant", "content": text})
            if k < len(solution) - 1:
                messages.append({"role": "user", "content": demo.turns[k].observation})
        whole = tok.render(messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
        np.testing.assert_array_equal(demo.tokens, tok.encode(whole))
        np.testing.assert_array_equal(demo.loss_mask, mask)
        assert demo.prompt_len == len(tok.prompt_ids(messages[:2]))
        np.testing.assert_array_equal(demo.behaviour_logprobs, np.zeros(len(demo.tokens)))
        # The template's own end of the last turn is the only difference to the full render.
        full = tok.render(messages, add_generation_prompt=False)
        assert full == tok.decode(demo.tokens) + "<|im_end|>\n"

    # The observations are what the code really printed in the sandbox.
    search_demo, table_demo = suite.multi_demos
    query = suite.multi[0].metadata["solution"][0].split('"')[1]
    assert search_demo.turns[0].observation == "Observation:\n" + suite.tool(query).rstrip("\n")
    assert suite.multi[0].answer in search_demo.turns[0].observation
    head = pd.read_excel(io.BytesIO(suite.multi[1].files["sales.xlsx"])).head()
    assert table_demo.turns[0].observation == "Observation:\n" + str(head)
    assert [t.observation for t in suite.multi_demos[0].turns][-1] == ""


def test_demonstration_turns_end_where_the_engine_stops(suite):
    # The engine ends a turn at the first token whose text completes a stop string.
    def stops(ids):
        return any(s in suite.tokenizer.decode(ids) for s in AGENT.stop_strings)

    for demo in suite.train_demos + suite.multi_demos:
        edges = np.diff(np.concatenate([[0], demo.loss_mask, [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        assert len(ends) == len(demo.turns)
        for start, end in zip(starts, ends, strict=True):
            turn = demo.tokens[start:end].tolist()
            assert stops(turn) and not stops(turn[:-1]), suite.tokenizer.decode(turn[-8:])


def test_demonstrations_skip_solutions_that_fail_or_do_not_fit(suite):
    assert [d.task_id for d in suite.bad_demos] == [suite.train[0].task_id]
    assert suite.bad_demos[0].group_id == 0
    assert suite.bad_skipped == {
        "no_solution": 1,
        "wrong_answer": 3,  # a wrong stored answer, an answer before the last turn, no answer
        "exec_error": 1,
        "too_many_turns": 1,
        "format": 2,  # thoughts missing; a stop string inside the code
        "too_long": 1,
    }
    assert set(suite.bad_skipped) <= set(sft.SKIP_REASONS)


async def test_demonstrations_need_the_code_stop_string(suite):
    config = dataclasses.replace(AGENT, stop_strings=("<end_code>",))
    with pytest.raises(ValueError, match="</code>"):
        await sft.demonstrations([], tokenizer=suite.tokenizer, pool=None, agent_config=config)


# ---------------------------------------------------------------------------------------------
# The loss and its gradients
# ---------------------------------------------------------------------------------------------

SMALL = helpers.tiny_model_config(vocab_size=64, num_heads=4, num_kv_heads=2, head_dim=8)


def random_state(config, seed=0, std=0.1):
    """(graphdef, state) with weights drawn on the host (nnx.Rngs init is slow on a busy CPU)."""
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, std, s.shape).astype(s.dtype)), abstract
    )
    return graphdef, state


def hand_batch(b=8, length=10, seed=0):
    """Right-padded rows with loss masks on some real tokens, and one row without any."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, SMALL.vocab_size, (b, length)).astype(np.int32)
    lengths = rng.integers(3, length + 1, b)
    lengths[0] = length
    attn = np.arange(length)[None] < lengths[:, None]
    loss_mask = (rng.random((b, length)) < 0.6).astype(np.float32)
    loss_mask[2] = 0.0  # a row with no loss tokens counts for nothing
    loss_mask[:, 0] = 1.0  # position 0 has no prediction; its mask must not matter
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    return update.Batch(
        tokens=tokens,
        positions=positions,
        attn_mask=attn,
        loss_mask=loss_mask,
        behaviour_logprobs=np.zeros((b, length), np.float32),
        advantages=np.zeros((b,), np.float32),
    )


@functools.cache
def _grad_fn(graphdef, num_microbatches, chunk_size, mesh=None):
    return update.make_grad_fn(
        graphdef,
        update.SFT_LOSS,
        num_microbatches=num_microbatches,
        chunk_size=chunk_size,
        mesh=mesh,
    )


@functools.cache
def _reference(graphdef):
    """Jitted plain SFT loss: the full [B, T, V] log-softmax at once, no chunks, no micro-batches;
    returns (loss, logits) and the gradient of the loss."""

    def loss(state, batch):
        model = nnx.merge(graphdef, state)
        logits, _ = model(batch.tokens, batch.positions, attn_mask=batch.attn_mask)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, batch.tokens[:, 1:, None], -1)[..., 0]
        mask = (batch.loss_mask * batch.attn_mask)[:, 1:]
        return -(picked * mask).sum() / mask.sum(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_sft_loss_is_the_cross_entropy_and_microbatches_give_the_full_batch_gradient():
    graphdef, state = random_state(SMALL)
    batch = hand_batch()
    # Two micro-batches, and LM-head chunks (3) that do not divide the length (10).
    grads, metrics = _grad_fn(graphdef, 2, 3)(state, batch)
    (want_loss, logits), want_grads = _reference(graphdef)(state, batch)

    # The loss and accuracy by hand, in float64 NumPy, from the model's logits.
    logits = np.asarray(logits, np.float64)[:, :-1]  # row t predicts token t + 1
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = batch.tokens[:, 1:]
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = (batch.loss_mask * batch.attn_mask)[:, 1:]
    loss = -(picked * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(want_loss), loss, rtol=1e-5)
    hits = logits.argmax(-1) == targets
    np.testing.assert_allclose(float(metrics["token_accuracy"]), (hits * mask).sum() / mask.sum())
    assert float(metrics["num_tokens"]) == mask.sum()
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7), grads, want_grads
    )


def test_sft_gradients_on_a_2x2x2_mesh_equal_one_device():
    graphdef, state = random_state(SMALL)
    batch = hand_batch()
    mesh = sharding.make_mesh(2, 2, 2)
    want, want_metrics = _grad_fn(graphdef, 2, 3)(state, batch)
    got, metrics = _grad_fn(graphdef, 2, 3, mesh)(state, batch)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7), got, want)
    for k in want_metrics:
        np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5)


def test_a_batch_without_loss_tokens_gives_zero_loss_and_zero_gradient():
    graphdef, state = random_state(SMALL)
    batch = hand_batch()
    batch = batch.replace(loss_mask=np.zeros_like(batch.loss_mask))
    grads, metrics = _grad_fn(graphdef, 2, 3)(state, batch)
    assert float(metrics["loss"]) == 0.0 and float(metrics["num_tokens"]) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_sft_batches_pad_to_fixed_shapes_and_reject_what_does_not_fit(suite):
    demos = suite.train_demos[:3]
    batch = update.make_batch(demos, batch_size=4, max_len=320)
    assert batch.tokens.shape == batch.loss_mask.shape == (4, 320)
    for row, d in enumerate(demos):
        n = len(d.tokens)
        np.testing.assert_array_equal(batch.tokens[row, :n], d.tokens)
        np.testing.assert_array_equal(batch.loss_mask[row], np.pad(d.loss_mask, (0, 320 - n)))
        assert batch.attn_mask[row].sum() == n
    assert not batch.attn_mask[3].any() and not batch.loss_mask[3].any()
    with pytest.raises(ValueError, match="max_len"):
        update.make_batch(demos, batch_size=4, max_len=100)
    with pytest.raises(ValueError, match="batch_size"):
        update.make_batch(demos, batch_size=2, max_len=320)
    graphdef, state = random_state(SMALL)
    with pytest.raises(ValueError, match="max_len"):
        sft.run_sft(
            demos,
            graphdef=graphdef,
            state=state,
            optimizer=optax.sgd(0.1),
            opt_state=optax.sgd(0.1).init(state),
            num_steps=1,
            batch_size=2,
            max_len=100,
            seed=0,
        )


# ---------------------------------------------------------------------------------------------
# Fitting a tiny model
# ---------------------------------------------------------------------------------------------


def test_sft_fits_level1_demonstrations_and_the_engine_then_writes_the_format(suite):
    tok, demos = suite.tokenizer, suite.train_demos
    assert len(demos) == 32
    max_len = -(-max(len(d.tokens) for d in demos) // 64) * 64
    config = model_lib.ModelConfig(
        model_type="qwen2",
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qkv_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=max_len,
        eos_token_ids=tok.eos_token_ids,
    )
    graphdef, state = random_state(config, std=0.02)
    num_steps = 70
    optimizer = update.make_optimizer(2e-2, 2, num_steps, 0.0, 1.0)
    seen = []
    state, _, history = sft.run_sft(
        demos,
        graphdef=graphdef,
        state=state,
        optimizer=optimizer,
        opt_state=optimizer.init(state),
        num_steps=num_steps,
        batch_size=8,
        max_len=max_len,
        seed=SEED,
        on_metrics=lambda step, m: seen.append(step),
    )
    assert seen == list(range(num_steps)) and len(history) == num_steps
    losses = [m["loss"] for m in history]
    assert np.all(np.isfinite(losses))
    # From uniform (log V) to a small fraction of it.
    np.testing.assert_allclose(losses[0], np.log(tok.vocab_size), rtol=1e-2)
    assert np.mean(losses[-5:]) < 0.2 * losses[0], losses

    # Greedy decoding through the engine writes the demonstrations' first turn: the thought of
    # the task's family, then the code block opening.
    engine = engine_lib.Engine(
        nnx.merge(graphdef, state), num_slots=3, max_len=max_len, detokenize=tok.decode
    )
    picks = [
        next(d for d, e in zip(demos, suite.train, strict=True) if e.metadata["family"] == f)
        for f in TRAIN_FAMILIES
    ]
    sampling = engine_lib.SamplingParams(max_new_tokens=32, stop_strings=AGENT.stop_strings)
    outputs = engine.generate([d.tokens[: d.prompt_len].tolist() for d in picks], sampling)
    for demo, out in zip(picks, outputs, strict=True):
        turn = demo.tokens[demo.prompt_len :].tolist()
        k = next(k for k in range(len(turn)) if "<code>" in tok.decode(turn[:k]))
        opening = turn[:k]
        assert tok.decode(opening).startswith("Thought: ")
        got = out.tokens[: len(opening)].tolist()
        assert got == opening, (tok.decode(got), demo.turns[0].text)
