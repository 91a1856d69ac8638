"""KV cache: prefill + token-by-token decode equals one full forward (float32)."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolr1_jax.models import model as model_lib
from toolr1_jax.models import params


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    # The HF fixture's perturbed biases and norms, so the cached path sees non-trivial values.
    path = helpers.make_hf_model_dir(tmp_path_factory.mktemp("cache"), "qwen2", seed=5)
    return params.load_pretrained(path)


def _jitted(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, positions, cache, attn_mask):
        return nnx.merge(graphdef, state)(tokens, positions, cache, attn_mask)

    return lambda *args: forward(state, *args)


def test_prefill_then_decode_matches_full_forward(loaded):
    model, config = loaded
    forward = _jitted(model)
    rng = np.random.default_rng(0)
    b, t, prompt = 2, 10, 4
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, size=(b, t)))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    full, _ = forward(tokens, positions, None, None)

    cache = model_lib.KVCache.init(config, b, max_len=16)
    logits, cache = forward(tokens[:, :prompt], positions[:, :prompt], cache, None)
    steps = [logits]
    for i in range(prompt, t):
        logits, cache = forward(tokens[:, i : i + 1], positions[:, i : i + 1], cache, None)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [t, t])
    assert float(jnp.max(jnp.abs(cached - full))) <= 1e-5


def test_rows_with_different_cache_lengths(loaded):
    """Right-padded prefill leaves rows at different lengths; each row decodes at its own offset."""
    model, config = loaded
    forward = _jitted(model)
    rng = np.random.default_rng(1)
    prompt_lens = [3, 7]
    new_tokens = 4
    b, width = len(prompt_lens), max(prompt_lens)
    seqs = [rng.integers(3, config.vocab_size, size=n + new_tokens) for n in prompt_lens]

    prefill = np.zeros((b, width), np.int64)
    mask = np.zeros((b, width), bool)
    for r, n in enumerate(prompt_lens):
        prefill[r, :n] = seqs[r][:n]
        mask[r, :n] = True
    cache = model_lib.KVCache.init(config, b, max_len=16)
    positions = jnp.broadcast_to(jnp.arange(width), (b, width))
    logits, cache = forward(jnp.asarray(prefill), positions, cache, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens)
    last = [logits[r, n - 1] for r, n in enumerate(prompt_lens)]
    outs = [[last[r]] for r in range(b)]
    for i in range(new_tokens):
        step = np.array([[seqs[r][n + i]] for r, n in enumerate(prompt_lens)])
        pos = np.array([[n + i] for n in prompt_lens])
        logits, cache = forward(jnp.asarray(step), jnp.asarray(pos), cache, None)
        for r in range(b):
            outs[r].append(logits[r, 0])

    for r, n in enumerate(prompt_lens):
        seq = jnp.asarray(seqs[r])[None]
        full, _ = forward(seq, jnp.arange(seq.shape[1])[None], None, None)
        expected = full[0, n - 1 :]  # logits for the last prompt token and every decoded one
        got = jnp.stack(outs[r])
        assert float(jnp.max(jnp.abs(got - expected))) <= 1e-5


def test_blocked_causal_attention_matches_one_softmax_over_all_keys(loaded):
    """Without a cache, attention runs in query blocks that skip the keys every query of the block
    is masked from. Longer than several blocks (with a ragged last one) and right-padded, its
    logits and parameter gradients equal those of the cached path, which scores every query
    against every key under the mask in one softmax."""
    model, config = loaded
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(2)
    b, t = 2, 2 * model_lib._CAUSAL_BLOCK + 45
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, size=(b, t)))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([[t], [t - 70]]))

    def loss(state, cached):
        m = nnx.merge(graphdef, state)
        cache = model_lib.KVCache.init(config, b, max_len=t) if cached else None
        logits, _ = m(tokens, positions, cache, mask)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(mask[:, 1:], picked, 0.0)), logits

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (blocked_grads, blocked), (cached_grads, cached) = grad(state, False), grad(state, True)
    real = np.asarray(mask)
    assert float(jnp.max(jnp.abs(blocked - cached)[real])) <= 1e-5
    for g1, g2 in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(cached_grads), strict=True):
        scale = max(float(jnp.max(jnp.abs(g2))), 1.0)
        assert float(jnp.max(jnp.abs(g1 - g2))) <= 1e-5 * scale


def test_tied_head_vocab_major_for_few_rows():
    # Decode's few rows take the vocab-major head ([V, D] embedding times the rows); more rows
    # take [rows, D] x [D, V]. Both give the same logits, and the few-row program has the
    # barrier that keeps XLA from folding the vocab-major product back.
    config = helpers.tiny_model_config(tie_word_embeddings=True, vocab_size=1000)
    model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    embed = np.asarray(model.embed_vd[...], np.float64)
    rng = np.random.default_rng(0)
    for shape, vocab_major in (((16, 1), True), ((2, 16), True), ((4, 16), False)):
        hidden = jnp.asarray(rng.normal(size=(*shape, config.hidden_size)), jnp.float32)
        logits = model.logits(hidden)
        assert logits.shape == (*shape, config.vocab_size)
        np.testing.assert_allclose(
            np.asarray(logits), np.asarray(hidden, np.float64) @ embed.T, rtol=1e-5, atol=1e-5
        )
        program = str(jax.make_jaxpr(model.logits)(hidden))
        assert ("optimization_barrier" in program) == vocab_major
