"""Engine decode over cache-length buckets: a chunk attends over the smallest cache prefix that
holds its rows, and gives the same tokens and log-probs as attending over the whole cache.

The engines here use buckets of 8, 16, 32 and 64 positions, so short scripts cross every
boundary: within a chunk (a row's length passes 8 during it) and across chunks (the next chunk
needs a larger prefix, or a newly added long prompt does). Every test runs with a decode row per
slot and with two rows for four slots (gathered rows carry only the bucket's positions).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax.models import model as model_lib

NUM_SLOTS = 4
MAX_LEN = 64
MIN_DECODE_LEN = 8
VOCAB = 128


@pytest.fixture(scope="module")
def model():
    config = helpers.tiny_model_config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    # Weights 10x the default init, so logits are peaked and greedy choices are not near-ties.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x + 0.1, state)
    return nnx.merge(graphdef, state)


def _engine(model, decode_rows, min_decode_len=MIN_DECODE_LEN):
    return engine_lib.Engine(
        model,
        num_slots=NUM_SLOTS,
        max_len=MAX_LEN,
        prefill_chunk=16,
        decode_rows=decode_rows,
        min_decode_len=min_decode_len,
    )


@pytest.fixture(scope="module", params=[NUM_SLOTS, 2], ids=["all_rows", "2_rows"])
def decode_rows(request):
    return request.param


@pytest.fixture(scope="module")
def full_logprobs(model):
    """seq -> [len(seq), V] float32 log-softmax of logits / temperature from one uncached pass."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(tokens, temperature):
        logits, _ = nnx.merge(graphdef, params)(tokens, jnp.arange(MAX_LEN)[None])
        return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)

    def run(seq, temperature):
        padded = np.zeros((1, MAX_LEN), np.int32)
        padded[0, : len(seq)] = seq
        return np.asarray(forward(padded, np.float32(temperature)))[0, : len(seq)]

    return run


@contextlib.contextmanager
def _recorded_kv_lens(engine, program: str, kv_len_arg: int):
    """Yields the list of the kv_len argument (position `kv_len_arg`) of every call of the
    engine's jitted `program` ("_decode_fn" or "_prefill_fn") inside the block."""
    original = getattr(engine, program)
    kv_lens = []

    def recording(*args):
        kv_lens.append(args[kv_len_arg])
        return original(*args)

    setattr(engine, program, recording)
    try:
        yield kv_lens
    finally:
        setattr(engine, program, original)


def _run_script(engine, temperature):
    """Adds prompts in waves so the decoding rows' lengths climb through every bucket.

    Returns {prompt index: (prompt, tokens, log-probs)} and the kv_len of every decode chunk.
    """
    rng = np.random.default_rng(0)
    waves = [  # (prompt tokens, max_new_tokens) added before chunk k
        {0: [(2, 40), (3, 10)]},
        {3: [(12, 14)]},
        {5: [(30, 9), (7, 20)]},
    ]
    waves = {k: v for wave in waves for k, v in wave.items()}
    results, owner, num_added = {}, {}, 0
    with _recorded_kv_lens(engine, "_decode_fn", 5) as kv_lens:
        for chunk in range(40):
            for length, max_new in waves.get(chunk, []):
                prompt = rng.integers(0, VOCAB, length).tolist()
                sampling = engine_lib.SamplingParams(
                    max_new_tokens=max_new, temperature=temperature, seed=num_added
                )
                owner[engine.add(prompt, sampling)] = (num_added, prompt)
                num_added += 1
            # Chunks of 5 steps: a row's length reaches each power of two mid-chunk.
            for out in engine.step(5):
                index, prompt = owner.pop(out.slot)
                results[index] = (prompt, out.tokens, out.logprobs)
                engine.release(out.slot)
            if num_added == 5 and not owner:
                break
    assert len(results) == 5
    return results, kv_lens


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bucketed_decode_matches_full_forward_and_whole_cache(
    model, decode_rows, full_logprobs, temperature
):
    bucketed = _engine(model, decode_rows)
    whole = _engine(model, decode_rows, min_decode_len=MAX_LEN)
    assert bucketed.decode_lens == (8, 16, 32, 64)
    assert whole.decode_lens == (MAX_LEN,)

    results, kv_lens = _run_script(bucketed, temperature)
    reference, _ = _run_script(whole, temperature)
    # The script runs every bucket, and grows out of the small ones within and across chunks.
    assert set(kv_lens) == {8, 16, 32, 64}

    # Same tolerance as tests/engine_test.py: 1e-5 on the logits, so 1e-5 / T on log-probs.
    atol = 1e-5 / (temperature or 1.0)
    for index, (prompt, tokens, logprobs) in results.items():
        ref_prompt, ref_tokens, ref_logprobs = reference[index]
        assert prompt == ref_prompt
        assert tokens.tolist() == ref_tokens.tolist()
        np.testing.assert_allclose(logprobs, ref_logprobs, rtol=0, atol=atol)

        seq = prompt + tokens.tolist()
        rows = full_logprobs(seq, temperature or 1.0)[len(prompt) - 1 : len(seq) - 1]
        np.testing.assert_allclose(
            logprobs, rows[np.arange(len(tokens)), tokens], rtol=0, atol=atol
        )
        if temperature == 0.0:
            np.testing.assert_array_equal(tokens, rows.argmax(axis=-1))


def test_no_compilation_after_warmup_with_mixed_lengths(model, decode_rows):
    engine = _engine(model, decode_rows)
    engine.warmup()
    # Per length bucket: prefill for one slot and for decode_rows slots, and decode; the two
    # prefills that read no cache (first chunks); the copy.
    assert engine.num_compilations == 1 + 2 + 3 * len(engine.decode_lens) == 15
    rng = np.random.default_rng(1)
    with helpers.backend_compiles() as backend_compiles:
        live = {}  # slot -> tokens in the slot (cache + pending)
        for _ in range(16):
            for _ in range(int(rng.integers(0, engine.num_free_slots + 1))):
                n = int(rng.integers(1, 50))
                sampling = engine_lib.SamplingParams(
                    max_new_tokens=int(rng.integers(1, 12)),
                    temperature=float(rng.choice([0.0, 1.0])),
                    seed=int(rng.integers(100)),
                )
                live[engine.add(rng.integers(0, VOCAB, n).tolist(), sampling)] = n
            for out in engine.step(int(rng.integers(1, 12))):
                live[out.slot] += len(out.tokens)
                room = MAX_LEN - 1 - live[out.slot]
                if room > 0 and rng.random() < 0.6:
                    obs = rng.integers(0, VOCAB, int(rng.integers(0, min(room, 20)))).tolist()
                    engine.append(out.slot, obs)
                    live[out.slot] += len(obs)
                else:
                    engine.release(out.slot)
                    del live[out.slot]
        for slot in live:
            engine.release(slot)
    assert engine.num_compilations == 15
    assert backend_compiles == []


def test_prefill_chunks_read_only_what_came_before_them(model, decode_rows, full_logprobs):
    """A prompt's first chunk reads no cache (kv_len 0: the program with plain causal
    attention), each later chunk the smallest bucket holding the entries before it, and the
    tokens are still those of one uncached forward pass."""
    engine = _engine(model, decode_rows)
    prompt = np.random.default_rng(3).integers(0, VOCAB, 41).tolist()
    with _recorded_kv_lens(engine, "_prefill_fn", 8) as kv_lens:
        # 40 tokens are written (the last becomes the pending token): chunks start at 0, 16, 32.
        (completion,) = engine.generate([prompt], engine_lib.SamplingParams(max_new_tokens=6))
    assert kv_lens == [0, 16, 32]
    seq = prompt + completion.tokens.tolist()
    rows = full_logprobs(seq, 1.0)[len(prompt) - 1 : len(seq) - 1]
    np.testing.assert_array_equal(completion.tokens, rows.argmax(axis=-1))
