"""Stop strings matched on decoded text, with the real SmolLM2 tokenizer.

"output is:" alone is `output`, ` is`, `:`; inside a sentence it is ` output`, ` is`, `:`. A
token-id stop sequence from the string alone never fires; the text match stops the slot at the
first chunk boundary after it, keeps exactly the tokens up to the one completing it, and rewinds
the slot so that an append continues as a fresh prefill of the cut history would.

A tiny transformer with the real vocabulary is forced to a scripted reply (the agent tests'
`ScriptedModel`); with the script's bias off, the same weights run free and greedy for the
continuation, which then depends on every cache entry being where it belongs.
"""

import numpy as np
import pytest
from flax import nnx

from tests import agent_rollout_test as scripted_lib
from tests import helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import tokenizer as tokenizer_lib

NAME = "smollm2-135m-instruct"
MAX_LEN = 128
CHUNK = 5  # decode steps per `step` call
STOP = "output is:"
REPLY = "I ran it and the output is: 42, so the answer is 42. That is all I have to say here."


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer(NAME)


@pytest.fixture(scope="module")
def scripted(tok):
    config = helpers.tiny_model_config(
        vocab_size=tok.hf.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2
    )
    inner = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    # Peaked logits (std ~3), so free-running greedy choices are far from ties.
    inner.lm_head_dv[...] = 20 * inner.lm_head_dv[...]
    return scripted_lib.ScriptedModel(inner)


@pytest.fixture(scope="module", params=[2, 1], ids=["all_rows", "1_row"])
def engine(scripted, tok, request):
    return engine_lib.Engine(
        scripted, num_slots=2, max_len=MAX_LEN, decode_rows=request.param, detokenize=tok.decode
    )


@pytest.fixture(scope="module")
def conversation(tok):
    prompt = tok.prompt_ids([{"role": "user", "content": "Run the program."}])
    return prompt, tok.encode(REPLY)


def _script(engine, scripted, ids, scale):
    script = np.zeros(scripted.script.shape, np.int32)
    script[: len(ids)] = ids
    scripted.script[...] = script
    scripted.scale[...] = np.float32(scale)
    engine.set_params(nnx.split(scripted)[1])


def _steps_until_stopped(engine, slot, max_calls=64):
    """(output, number of `step` calls) for `slot`."""
    for calls in range(1, max_calls + 1):
        for out in engine.step(CHUNK):
            if out.slot == slot:
                return out, calls
    raise AssertionError(f"slot {slot} did not stop")


def test_stop_string_tokenized_differently_in_context_stops_within_a_chunk(
    engine, scripted, tok, conversation
):
    prompt, reply = conversation
    alone = tok.encode(STOP)
    assert not any(reply[i : i + len(alone)] == alone for i in range(len(reply)))
    # The first token whose text completes the stop string: everything up to it is kept.
    kept = next(k for k in range(1, len(reply) + 1) if STOP in tok.decode(reply[:k]))
    assert tok.decode(reply[:kept]).endswith(STOP) and kept > CHUNK  # found in the 2nd chunk
    _script(engine, scripted, prompt + reply, scale=30.0)
    budget = engine_lib.SamplingParams(max_new_tokens=len(reply))

    (full,) = engine.generate([prompt], budget)
    assert full.tokens.tolist() == reply and full.finish_reason == "length"
    # The token-id spelling of the string alone never matches: decoding runs to the budget.
    (by_ids,) = engine.generate(
        [prompt], engine_lib.SamplingParams(len(reply), stop_sequences=(alone,))
    )
    assert by_ids.finish_reason == "length" and len(by_ids.tokens) == len(reply)

    # The device decodes on past the stop within the chunk; a neighbour added after it (so it
    # waits for the one row, if there is one) decodes on after the cut.
    slot = engine.add(prompt, engine_lib.SamplingParams(len(reply), stop_strings=(STOP,)))
    other = engine.add(prompt, budget)
    out, calls = _steps_until_stopped(engine, slot)
    assert calls == -(-kept // CHUNK)  # the first chunk boundary at or after the stop
    assert calls * CHUNK > kept  # the device decoded past the stop: the slot is rewound
    assert out.finish_reason == "stop"
    assert out.tokens.tolist() == full.tokens[:kept].tolist()
    np.testing.assert_allclose(out.logprobs, full.logprobs[:kept], rtol=0, atol=1e-5)

    # The neighbour decodes a chunk more while the cut slot waits; then the cut slot continues,
    # with the script off (the free model's greedy tokens depend on the whole cache).
    engine.step(CHUNK)
    _script(engine, scripted, [], scale=0.0)
    observation = tok.encode("\nObservation: 42\n")
    after = engine_lib.SamplingParams(max_new_tokens=10)
    engine.append(slot, observation, after)
    continued, _ = _steps_until_stopped(engine, slot)
    engine.release(slot)
    engine.release(other)
    (fresh,) = engine.generate([prompt + reply[:kept] + observation], after)
    assert continued.tokens.tolist() == fresh.tokens.tolist()
    np.testing.assert_allclose(continued.logprobs, fresh.logprobs, rtol=0, atol=1e-5)


def test_any_number_of_stop_strings_and_the_earliest_wins(engine, scripted, tok, conversation):
    prompt, reply = conversation
    _script(engine, scripted, prompt + reply, scale=30.0)
    # More strings than the engine's token-sequence slots (4); "answer is" comes later.
    stops = tuple(f"never {i}" for i in range(10)) + ("answer is", STOP)
    assert len(stops) > engine.max_stop_sequences
    (out,) = engine.generate([prompt], engine_lib.SamplingParams(len(reply), stop_strings=stops))
    kept = next(k for k in range(1, len(reply) + 1) if STOP in tok.decode(reply[:k]))
    assert out.finish_reason == "stop" and out.tokens.tolist() == reply[:kept]
    # A token-id stop that comes first wins; a stop string that never appears changes nothing.
    (out,) = engine.generate(
        [prompt],
        engine_lib.SamplingParams(len(reply), stop_token_ids=(reply[2],), stop_strings=(STOP,)),
    )
    assert out.finish_reason == "stop" and out.tokens.tolist() == reply[:3]
    (out,) = engine.generate([prompt], engine_lib.SamplingParams(6, stop_strings=("never",)))
    assert out.finish_reason == "length" and out.tokens.tolist() == reply[:6]


def test_stop_strings_need_a_detokenizer_and_real_strings(scripted):
    plain = engine_lib.Engine(scripted, num_slots=1, max_len=16)
    with pytest.raises(ValueError, match="detokenize"):
        plain.add([1, 2], engine_lib.SamplingParams(4, stop_strings=("x",)))
    with pytest.raises(ValueError, match="the string"):
        engine_lib.SamplingParams(4, stop_strings="</code>")
    with pytest.raises(ValueError, match="non-empty"):
        engine_lib.SamplingParams(4, stop_strings=("a", ""))
