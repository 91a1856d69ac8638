"""Rollout engine: parity with transformers, log-probs, continuation, slot independence, sampling
filters, stop handling, bad input and steady-state compilation.

One engine is shared by the module (compilation dominates on CPU); every test leaves it idle. Its
prefill chunk is short, so longer prompts and histories are written in several chunks. Every test
runs twice: with a decode row per slot, and with two rows for four slots (slots take turns).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests import helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax import sharding as sharding_lib
from toolr1_jax.models import model as model_lib

NUM_SLOTS = 4
MAX_LEN = 64
PREFILL_CHUNK = 16
VOCAB = 128
PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7, 7, 30], [100, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def _hf_model(seed: int):
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-6,
        # Well above the default 0.02 so logits are peaked and greedy choices are not near-ties.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        # Biases start at zero in transformers; make them matter.
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape))
    return hf


def _to_nnx(hf) -> model_lib.Transformer:
    """Copies a transformers Qwen2 model into a `Transformer` (float32)."""
    config = model_lib.ModelConfig.from_hf(hf.config)
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    w = {name: jnp.asarray(p.detach().numpy()) for name, p in hf.state_dict().items()}
    model.embed_vd[...] = w["model.embed_tokens.weight"]
    model.final_norm.scale[...] = w["model.norm.weight"]
    model.lm_head_dv[...] = w["lm_head.weight"].T
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attn_norm.scale[...] = w[p + "input_layernorm.weight"]
        layer.mlp_norm.scale[...] = w[p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        layer.attn.wq_dnh[...] = w[a + "q_proj.weight"].T.reshape(d, n, h)
        layer.attn.wk_dkh[...] = w[a + "k_proj.weight"].T.reshape(d, k, h)
        layer.attn.wv_dkh[...] = w[a + "v_proj.weight"].T.reshape(d, k, h)
        layer.attn.wo_nhd[...] = w[a + "o_proj.weight"].T.reshape(n, h, d)
        layer.attn.bq_nh[...] = w[a + "q_proj.bias"].reshape(n, h)
        layer.attn.bk_kh[...] = w[a + "k_proj.bias"].reshape(k, h)
        layer.attn.bv_kh[...] = w[a + "v_proj.bias"].reshape(k, h)
        layer.mlp.w_gate_df[...] = w[p + "mlp.gate_proj.weight"].T
        layer.mlp.w_up_df[...] = w[p + "mlp.up_proj.weight"].T
        layer.mlp.w_down_fd[...] = w[p + "mlp.down_proj.weight"].T
    return model


@pytest.fixture(scope="module")
def hf_model():
    return _hf_model(seed=0)


@pytest.fixture(scope="module")
def model(hf_model):
    return _to_nnx(hf_model)


@pytest.fixture(scope="module", params=[NUM_SLOTS, 2], ids=["all_rows", "2_rows"])
def engine(model, request):
    return engine_lib.Engine(
        model,
        num_slots=NUM_SLOTS,
        max_len=MAX_LEN,
        prefill_chunk=PREFILL_CHUNK,
        decode_rows=request.param,
    )


@pytest.fixture(scope="module")
def full_logprobs(model):
    """seq -> [len(seq), V] float32 log-softmax of logits / temperature from one uncached pass."""
    graphdef, _ = nnx.split(model)

    @jax.jit
    def forward(params, tokens, temperature):
        logits, _ = nnx.merge(graphdef, params)(tokens, jnp.arange(MAX_LEN)[None])
        return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)

    def run(seq, temperature=1.0, params=None):
        params = nnx.split(model)[1] if params is None else params
        # Right padding to one fixed length: causal attention keeps real positions exact.
        padded = np.zeros((1, MAX_LEN), np.int32)
        padded[0, : len(seq)] = seq
        return np.asarray(forward(params, padded, np.float32(temperature)))[0, : len(seq)]

    return run


def _sampled_logprobs(full_logprobs, prompt, tokens, temperature=1.0):
    """The full-pass log-prob of each generated token, and the full rows it was drawn from."""
    seq = list(prompt) + [int(t) for t in tokens]
    rows = full_logprobs(seq, temperature)[len(prompt) - 1 : len(seq) - 1]  # [n, V]
    return rows[np.arange(len(tokens)), np.asarray(tokens)], rows


def _decode_until_stopped(engine, slot, max_steps=64):
    for _ in range(max_steps):
        for out in engine.step(8):
            if out.slot == slot:
                return out
    raise AssertionError(f"slot {slot} did not stop")


def _assert_greedy_matches_transformers(engine, hf_model, prompts, max_new):
    completions = engine.generate(prompts, engine_lib.SamplingParams(max_new_tokens=max_new))
    for prompt, completion in zip(prompts, completions, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
            )
        assert completion.tokens.tolist() == out[0, len(prompt) :].tolist()
        assert completion.finish_reason == "length"
    assert engine.num_free_slots == NUM_SLOTS


def test_greedy_matches_transformers_generate(engine, hf_model):
    _assert_greedy_matches_transformers(engine, hf_model, PROMPTS, max_new=12)


def test_long_prompts_prefill_in_chunks_like_transformers(engine, hf_model):
    # 3, 2 and 1 chunks of 16, next to each other in one batched prefill.
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (41, 17, 16)]
    _assert_greedy_matches_transformers(engine, hf_model, prompts, max_new=6)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_full_forward(engine, full_logprobs, temperature):
    # The engine (cached, chunked prefill, then decode) and the one uncached pass round the
    # logits differently, by up to ~1e-5. A log-prob at temperature T is (logit - logsumexp) / T,
    # so it carries those errors times 1/T: the bound is 1e-5 on the logits at every T (at
    # T = 0.7 the row-gathered prefill of PROMPTS[1] lands 1.05e-5 from the full pass).
    atol = 1e-5 / (temperature or 1.0)
    sampling = engine_lib.SamplingParams(max_new_tokens=10, temperature=temperature, seed=3)
    completions = engine.generate(PROMPTS, sampling)
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        expected, rows = _sampled_logprobs(
            full_logprobs, prompt, completion.tokens, temperature or 1.0
        )
        np.testing.assert_allclose(completion.logprobs, expected, rtol=0, atol=atol)
        if temperature == 0.0:
            np.testing.assert_array_equal(completion.tokens, rows.argmax(axis=-1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_append_continues_like_a_fresh_prefill(engine, temperature):
    prompt, observation = [7, 3, 9, 12, 30], [50, 51, 52, 53, 54, 55]
    first = engine_lib.SamplingParams(max_new_tokens=6, temperature=temperature, seed=11)
    second = engine_lib.SamplingParams(max_new_tokens=8, temperature=temperature, seed=11)

    slot = engine.add(prompt, first)
    turn1 = _decode_until_stopped(engine, slot)
    assert turn1.finish_reason == "length" and len(turn1.tokens) == 6
    engine.append(slot, observation, second)
    turn2 = _decode_until_stopped(engine, slot)
    engine.release(slot)

    history = prompt + turn1.tokens.tolist() + observation
    slot = engine.add(history, second)
    fresh = _decode_until_stopped(engine, slot)
    engine.release(slot)

    assert turn2.tokens.tolist() == fresh.tokens.tolist()
    np.testing.assert_allclose(turn2.logprobs, fresh.logprobs, rtol=0, atol=1e-5)
    assert turn2.finish_reason == fresh.finish_reason == "length"


def test_append_without_sampling_keeps_settings_and_resets_budget(engine, full_logprobs):
    prompt = [3, 1, 4, 1, 5]
    slot = engine.add(prompt, engine_lib.SamplingParams(max_new_tokens=4))
    turn1 = _decode_until_stopped(engine, slot)
    engine.append(slot, [9, 2, 6])
    turn2 = _decode_until_stopped(engine, slot)
    engine.release(slot)
    assert len(turn1.tokens) == len(turn2.tokens) == 4
    history = prompt + turn1.tokens.tolist() + [9, 2, 6]
    _, rows = _sampled_logprobs(full_logprobs, history, turn2.tokens)
    np.testing.assert_array_equal(turn2.tokens, rows.argmax(axis=-1))


def test_slots_are_independent(engine):
    target = [8, 6, 7, 5, 3, 0, 9]
    sampling = engine_lib.SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234)
    (alone,) = engine.generate([target], sampling)

    # Six prompts on four slots: the target lands in a refilled slot, next to other sequences
    # with other settings and lengths.
    others = [
        engine_lib.SamplingParams(max_new_tokens=3, temperature=0.5, seed=1),
        engine_lib.SamplingParams(max_new_tokens=20, top_k=5, temperature=1.0, seed=2),
        engine_lib.SamplingParams(max_new_tokens=2),
        engine_lib.SamplingParams(max_new_tokens=9, top_p=0.8, temperature=1.3, seed=4),
        engine_lib.SamplingParams(max_new_tokens=5, temperature=2.0, seed=5),
    ]
    prompts = [[1, 2], [3] * 9, [4, 5, 6], [7] * 14, [8, 9, 10, 11], target]
    crowd = engine.generate(prompts, others + [sampling])
    assert crowd[-1].tokens.tolist() == alone.tokens.tolist()
    np.testing.assert_allclose(crowd[-1].logprobs, alone.logprobs, rtol=0, atol=1e-5)
    assert [len(c.tokens) for c in crowd[:5]] == [3, 20, 2, 9, 5]


def test_slots_beyond_the_rows_take_turns_and_keep_their_cache(engine, full_logprobs):
    prompts = [[3, 1, 4], [1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
    slots = [engine.add(p, engine_lib.SamplingParams(max_new_tokens=3)) for p in prompts]
    # The slots armed first hold the rows until they stop; the others wait their turn.
    turns = {}
    for k in range(0, len(slots), engine.decode_rows):
        outs = engine.step(8)
        assert sorted(out.slot for out in outs) == sorted(slots[k : k + engine.decode_rows])
        turns.update((out.slot, out) for out in outs)
    # The first slot waited, stopped, while the others decoded; it continues from its cache.
    engine.append(slots[0], [7, 7])
    (second,) = engine.step(8)
    for slot in slots:
        engine.release(slot)
    for prompt, slot in zip(prompts, slots, strict=True):
        _, rows = _sampled_logprobs(full_logprobs, prompt, turns[slot].tokens)
        np.testing.assert_array_equal(turns[slot].tokens, rows.argmax(axis=-1))
    history = prompts[0] + turns[slots[0]].tokens.tolist() + [7, 7]
    _, rows = _sampled_logprobs(full_logprobs, history, second.tokens)
    assert second.slot == slots[0] and len(second.tokens) == 3
    np.testing.assert_array_equal(second.tokens, rows.argmax(axis=-1))


def test_seed_makes_sampling_reproducible(engine):
    prompts = [[5, 6, 7], [5, 6, 7]]
    same = engine_lib.SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    other = engine_lib.SamplingParams(max_new_tokens=16, temperature=1.0, seed=8)
    a, b = engine.generate(prompts, same)
    (c,) = engine.generate(prompts[:1], same)
    (d,) = engine.generate(prompts[:1], other)
    assert a.tokens.tolist() == b.tokens.tolist() == c.tokens.tolist()
    assert a.tokens.tolist() != d.tokens.tolist()


def test_sample_tokens_stay_inside_top_k_and_top_p_sets():
    probs = np.array([0.05, 0.4, 0.02, 0.3, 0.13, 0.1], np.float32)
    num = 2000
    logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (num, len(probs))))
    keys = jax.random.split(jax.random.key(0), num)
    sample = jax.jit(engine_lib.sample_tokens)

    def draw(top_k, top_p):
        tokens, logprobs = sample(
            logits,
            jnp.ones((num,), jnp.float32),
            jnp.full((num,), top_k, jnp.int32),
            jnp.full((num,), top_p, jnp.float32),
            keys,
        )
        # Log-probs are of the untruncated distribution whatever the filters.
        np.testing.assert_allclose(np.exp(logprobs), probs[np.asarray(tokens)], rtol=1e-5)
        return set(np.asarray(tokens).tolist())

    assert draw(top_k=2, top_p=1.0) == {1, 3}
    # Nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third most likely (id 4) completes it.
    assert draw(top_k=0, top_p=0.75) == {1, 3, 4}
    assert draw(top_k=0, top_p=0.3) == {1}
    # top-p over the renormalised top-k set: {1: 0.4/0.83, 3: .., 4: ..} -> 0.48 + 0.36 > 0.8.
    assert draw(top_k=3, top_p=0.8) == {1, 3}
    assert draw(top_k=0, top_p=1.0) == set(range(len(probs)))


def test_engine_top_k_and_top_p_samples_stay_in_their_sets(engine, full_logprobs):
    temperature = 1.5
    samplings = [
        engine_lib.SamplingParams(
            max_new_tokens=16,
            temperature=temperature,
            seed=seed,
            **({"top_k": 3}, {"top_p": 0.5})[seed % 2],
        )
        for seed in range(4)
    ]
    prompts = [[11, 12, 13], [21, 22, 23, 24]] * 2
    completions = engine.generate(prompts, samplings)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        _, rows = _sampled_logprobs(full_logprobs, prompt, completion.tokens, temperature)
        order = np.argsort(-rows, axis=-1)
        if i % 2 == 0:
            allowed = order[:, :3]
        else:
            probs = np.exp(np.take_along_axis(rows, order, axis=-1))
            mass_before = np.cumsum(probs, axis=-1) - probs
            allowed = [o[m < 0.5] for o, m in zip(order, mass_before, strict=True)]
        for token, ok in zip(completion.tokens, allowed, strict=True):
            assert token in ok


def test_stop_token_and_stop_sequence_across_chunks(engine):
    prompt = [2, 7, 1, 8, 2, 8]
    (free_run,) = engine.generate([prompt], engine_lib.SamplingParams(max_new_tokens=24))
    run = free_run.tokens.tolist()

    # EOS: stop at the first occurrence of the 6th token, which is kept in the output.
    eos = run[5]
    (stopped,) = engine.generate(
        [prompt], engine_lib.SamplingParams(max_new_tokens=24, stop_token_ids=(eos,))
    )
    assert stopped.tokens.tolist() == run[: run.index(eos) + 1]
    assert stopped.finish_reason == "stop"

    # A 3-token stop sequence that starts in one decode chunk and ends in the next.
    end = next(
        j
        for j in range(6, len(run))
        if all(run[i : i + 3] != run[j - 2 : j + 1] for i in range(j - 2))
    )
    seq = tuple(run[end - 2 : end + 1])
    bigrams = set(zip(run, run[1:], strict=False))
    absent = next((a, b) for a in range(VOCAB) for b in range(VOCAB) if (a, b) not in bigrams)
    sampling = engine_lib.SamplingParams(max_new_tokens=24, stop_sequences=(absent, seq))
    slot = engine.add(prompt, sampling)
    assert engine.step(end - 1) == []  # generated run[: end - 1]: the sequence is cut in two
    (out,) = engine.step(8)
    assert out.slot == slot and out.finish_reason == "stop"
    assert out.tokens.tolist() == run[: end + 1]

    # The stopped slot keeps its cache: append continues from it.
    engine.append(slot, [3, 3])
    (more,) = engine.step(32)
    assert more.slot == slot and len(more.tokens) >= 1
    engine.release(slot)


def test_full_cache_finishes_with_length(engine):
    prompt = list(range(1, MAX_LEN - 3))  # 60 tokens: room for 4 generated
    slot = engine.add(prompt, engine_lib.SamplingParams(max_new_tokens=10))
    out = _decode_until_stopped(engine, slot)
    assert out.finish_reason == "length" and len(out.tokens) == 4
    with pytest.raises(ValueError, match="exceed max_len"):
        engine.append(slot, [1])
    engine.release(slot)


def test_bad_input_raises_clear_errors_and_engine_stays_usable(engine):
    sampling = engine_lib.SamplingParams(max_new_tokens=5)
    (before,) = engine.generate([PROMPTS[1]], sampling)

    with pytest.raises(ValueError, match="max_len"):
        engine.add(list(range(MAX_LEN)), sampling)
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([PROMPTS[0], [1] * (MAX_LEN + 1)], sampling)
    with pytest.raises(ValueError, match="empty"):
        engine.add([], sampling)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add([1, VOCAB], sampling)
    for bad in (
        dict(max_new_tokens=0),
        dict(max_new_tokens=4, temperature=-1.0),
        dict(max_new_tokens=4, temperature=float("nan")),
        dict(max_new_tokens=4, top_p=0.0),
        dict(max_new_tokens=4, top_p=1.5),
        dict(max_new_tokens=4, top_k=-1),
        dict(max_new_tokens=4, stop_sequences=((),)),
        dict(max_new_tokens=4, stop_token_ids=(-3,)),
        dict(max_new_tokens=4, seed=-1),
    ):
        with pytest.raises(ValueError):
            engine_lib.SamplingParams(**bad)
    with pytest.raises(ValueError, match="max_stop_sequences"):
        engine.add([1, 2], engine_lib.SamplingParams(4, stop_sequences=((1,),) * 5))
    with pytest.raises(ValueError, match="max_stop_len"):
        engine.add([1, 2], engine_lib.SamplingParams(4, stop_sequences=(tuple(range(17)),)))
    with pytest.raises(ValueError, match="free"):
        engine.append(2, [1, 2, 3])
    with pytest.raises(ValueError, match="free"):
        engine.release(0)
    with pytest.raises(ValueError, match="no slot"):
        engine.append(NUM_SLOTS, [1])
    with pytest.raises(ValueError, match="max_steps"):
        engine.step(0)

    slots = [engine.add([1, 2, 3], sampling) for _ in range(NUM_SLOTS)]
    with pytest.raises(RuntimeError, match="slots are in use"):
        engine.add([1, 2, 3], sampling)
    with pytest.raises(ValueError, match="still decoding"):
        engine.append(slots[0], [4])
    with pytest.raises(RuntimeError, match="idle"):
        engine.generate([[1]], sampling)
    engine.step(2)  # a released slot that is mid-decode is dropped cleanly
    for slot in slots:
        engine.release(slot)

    assert engine.num_free_slots == NUM_SLOTS
    (after,) = engine.generate([PROMPTS[1]], sampling)
    assert after.tokens.tolist() == before.tokens.tolist()


def test_set_params_switches_weights_without_copy_or_recompile(engine, full_logprobs):
    original = engine.params
    other = nnx.split(_to_nnx(_hf_model(seed=1)))[1]
    sampling = engine_lib.SamplingParams(max_new_tokens=8)
    engine.generate(PROMPTS, sampling)  # warm
    compilations = engine.num_compilations
    try:
        engine.set_params(other)
        # Same devices: the engine holds the trainer's arrays, not copies.
        assert all(
            a is b
            for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(other), strict=True)
        )
        completions = engine.generate(PROMPTS, sampling)
        for prompt, completion in zip(PROMPTS, completions, strict=True):
            seq = prompt + completion.tokens.tolist()
            rows = full_logprobs(seq, params=other)[len(prompt) - 1 : len(seq) - 1]
            np.testing.assert_array_equal(completion.tokens, rows.argmax(axis=-1))
        assert engine.num_compilations == compilations

        wrong = jax.tree.map(lambda x: x[..., :1] if x.ndim == 2 else x, other)
        with pytest.raises(ValueError, match="set_params: a parameter of shape"):
            engine.set_params(wrong)
        with pytest.raises(ValueError, match="structure"):
            engine.set_params({"embed": jnp.zeros((VOCAB, 64))})
    finally:
        engine.set_params(original)


def test_no_compilation_after_warmup(engine):
    """After `warmup`, prompts of any length, appends of any length, any number of simultaneous
    appends, any decode chunk and any sharing of prompt prefixes compile nothing: the engine has
    exactly six programs."""
    engine.warmup()
    # Prefill for one slot and for decode_rows slots, each reading the cache or not (a prompt's
    # first chunk), the prefix copy, decode: all this module's tests ever compiled.
    assert engine.num_compilations == 6
    rng = np.random.default_rng(0)

    def sampling(seed):
        return engine_lib.SamplingParams(
            max_new_tokens=int(rng.integers(1, 6)),
            temperature=float(rng.choice([0.0, 0.9])),
            top_k=int(rng.integers(0, 5)),
            top_p=float(rng.choice([1.0, 0.9])),
            stop_token_ids=(int(rng.integers(VOCAB)),),
            stop_sequences=((1, 2),),
            seed=seed,
        )

    with helpers.backend_compiles() as backend_compiles:
        live = {}  # slot -> tokens in the slot (cache + pending)
        for round_index in range(12):
            # Fill 0..all free slots with prompts of 1..40 tokens (1 to 3 prefill chunks).
            for _ in range(int(rng.integers(0, engine.num_free_slots + 1))):
                n = int(rng.integers(1, 41))
                live[engine.add(rng.integers(0, VOCAB, n).tolist(), sampling(round_index))] = n
            for out in engine.step(int(rng.integers(1, 9))):
                live[out.slot] += len(out.tokens)
                room = MAX_LEN - 1 - live[out.slot]
                # Stopped slots either take an observation of 0..20 tokens or end.
                if room > 0 and rng.random() < 0.7:
                    obs = rng.integers(0, VOCAB, int(rng.integers(0, min(room, 21)))).tolist()
                    engine.append(
                        out.slot, obs, sampling(round_index) if rng.random() < 0.5 else None
                    )
                    live[out.slot] += len(obs)
                else:
                    engine.release(out.slot)
                    del live[out.slot]
        for slot in live:
            engine.release(slot)
        engine.generate([[5] * 30] * 6, engine_lib.SamplingParams(max_new_tokens=3))
        # Prompts sharing a 20-token prefix (copying it saves each a chunk) and equal prompts.
        shared = rng.integers(0, VOCAB, 20).tolist()
        engine.generate(
            [shared + [1, 2], shared + [3], shared + [1, 2], shared + [4, 5, 6]],
            engine_lib.SamplingParams(max_new_tokens=3),
        )
    assert engine.num_compilations == 6
    assert backend_compiles == []


def test_params_on_a_mesh_give_the_same_tokens_without_recompiles(engine, model):
    mesh = sharding_lib.make_mesh(2, 2, 2)
    graphdef, state = nnx.split(model)
    sharded = jax.device_put(state, sharding_lib.param_shardings(state, mesh))
    mesh_engine = engine_lib.Engine(
        nnx.merge(graphdef, sharded), num_slots=NUM_SLOTS, max_len=MAX_LEN
    )
    sampling = [
        engine_lib.SamplingParams(max_new_tokens=8),
        engine_lib.SamplingParams(max_new_tokens=8, temperature=1.0, top_k=4, seed=2),
    ] * 2
    expected = engine.generate(PROMPTS, sampling)
    got = mesh_engine.generate(PROMPTS, sampling)
    for a, b in zip(expected, got, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)

    compilations = mesh_engine.num_compilations
    mesh_engine.set_params(sharded)
    assert all(
        a is b
        for a, b in zip(jax.tree.leaves(mesh_engine.params), jax.tree.leaves(sharded), strict=True)
    )
    mesh_engine.generate([p[::-1] for p in PROMPTS], sampling[::-1])
    assert mesh_engine.num_compilations == compilations
