"""GRPO math against an independent NumPy implementation and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import test_util as jtu

from tests import helpers
from toolr1_jax import grpo
from toolr1_jax.models import model as model_lib

CLIP_LOW, CLIP_HIGH, IS_CAP = 0.2, 0.28, 2.0


def np_loss(logp, prox, beh, ref, adv, mask, *, beta, kl_estimator, aggregation):
    """The same formulas written out in float64 NumPy; returns (loss, per-token terms)."""
    logp, prox, beh, ref, mask = (np.asarray(a, np.float64) for a in (logp, prox, beh, ref, mask))
    adv = np.asarray(adv, np.float64)[:, None]
    r = np.exp(logp - prox)
    pg = np.maximum(-adv * r, -adv * np.clip(r, 1 - CLIP_LOW, 1 + CLIP_HIGH))
    w = np.minimum(np.exp(np.where(mask > 0, prox - beh, 0.0)), IS_CAP)
    if kl_estimator == "k3":
        kl = np.exp(ref - logp) - (ref - logp) - 1
    else:
        kl = 0.5 * (logp - ref) ** 2
    per_tok = (w * pg + beta * kl) * mask
    n_seq = mask.sum(1)
    has = n_seq > 0
    if aggregation == "token_mean":
        loss = per_tok.sum() / mask.sum()
    elif aggregation == "seq_mean_token_mean":
        loss = (per_tok.sum(1)[has] / n_seq[has]).mean()
    else:
        loss = (per_tok.sum(1)[has] / mask.shape[1]).mean()
    return loss, dict(r=r, w=w, kl=kl, adv=np.broadcast_to(adv, mask.shape))


def random_inputs(seed, b=4, t=9):
    rng = np.random.default_rng(seed)
    # Log-ratios spread over both sides of the clip range, kept away from its edges so finite
    # differences never straddle a kink.
    lo, hi = np.log(1 - CLIP_LOW), np.log(1 + CLIP_HIGH)
    d = rng.uniform(-0.7, 0.7, (b, t))
    d = np.where(np.abs(d - lo) < 0.03, d - 0.06, d)
    d = np.where(np.abs(d - hi) < 0.03, d + 0.06, d)
    prox = rng.uniform(-3.0, -0.1, (b, t))
    logp = prox + d
    beh = prox - rng.uniform(-1.0, 1.5, (b, t))  # exp(prox - beh) up to ~4.5 > IS_CAP
    ref = logp + rng.normal(0, 0.3, (b, t))
    adv = np.array([1.3, -0.7, 0.4, -1.8])[:b]
    mask = (rng.uniform(size=(b, t)) < 0.8).astype(np.float32)
    mask[0, 0] = 1.0
    mask[-1] = 0.0  # a padding row: no loss tokens
    f32 = lambda a: np.asarray(a, np.float32)
    return f32(logp), f32(prox), f32(beh), f32(ref), f32(adv), mask


def jax_loss(logp, prox, beh, ref, adv, mask, *, beta, kl_estimator, aggregation):
    s, d, m = grpo.grpo_loss(
        logp,
        prox,
        beh,
        ref,
        adv,
        mask,
        clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH,
        is_cap=IS_CAP,
        beta=beta,
        kl_estimator=kl_estimator,
        aggregation=aggregation,
    )
    return s / d, m


def test_group_advantages_matches_numpy():
    r = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.3, 0.9, 0.1, 0.0], np.float32)
    g = r.reshape(-1, 4).astype(np.float64)
    centred = g - g.mean(1, keepdims=True)
    want = centred / (g.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(grpo.group_advantages(r, 4), want.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        grpo.group_advantages(r, 4, scale=False), centred.reshape(-1), rtol=1e-6, atol=1e-7
    )
    # A zero-variance group carries no signal.
    np.testing.assert_array_equal(np.asarray(grpo.group_advantages(r, 4))[4:8], 0.0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(r, 5)


def test_loss_hand_computed_example():
    # A>0 above the clip (clipped), A<0 below the clip (clipped), A<0 above the clip: the
    # pessimistic max keeps the unclipped, larger penalty.
    prox = np.zeros((1, 3), np.float32)
    logp = np.log(np.array([[1.5, 0.5, 1.5]], np.float32))
    adv = np.array([[1.0, -1.0, -1.0]], np.float32)

    def loss(lp):
        return grpo.grpo_loss(
            lp,
            prox,
            prox,
            None,
            adv,
            np.ones((1, 3), np.float32),
            clip_low=0.2,
            clip_high=0.2,
            is_cap=2.0,
            beta=0.0,
            kl_estimator="k3",
            aggregation="token_mean",
        )

    s, d, m = loss(logp)
    np.testing.assert_allclose(s / d, (-1.2 + 0.8 + 1.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_high"], 1 / 3, rtol=1e-6)
    grad = jax.grad(lambda lp: loss(lp)[0])(logp)
    # d/dlogp of -A r = -A r: zero where clipped, 1.5 for the unclipped negative-advantage token.
    np.testing.assert_allclose(grad, [[0.0, 0.0, 1.5]], rtol=1e-6)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", grpo.KL_ESTIMATORS)
def test_loss_and_metrics_match_numpy(aggregation, kl_estimator):
    logp, prox, beh, ref, adv, mask = random_inputs(0)
    kw = dict(beta=0.1, kl_estimator=kl_estimator, aggregation=aggregation)
    want, parts = np_loss(logp, prox, beh, ref, adv, mask, **kw)
    got, metrics = jax_loss(logp, prox, beh, ref, adv, mask, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5)

    on = mask > 0
    r, w, a = parts["r"][on], parts["w"][on], parts["adv"][on]
    # The inputs reach every case the issue lists.
    assert (r < 1 - CLIP_LOW).any() and (r > 1 + CLIP_HIGH).any()
    assert (a > 0).any() and (a < 0).any() and (w == IS_CAP).any()
    want_metrics = {
        "num_tokens": on.sum(),
        "clip_frac_low": np.mean((r < 1 - CLIP_LOW) & (a < 0)),
        "clip_frac_high": np.mean((r > 1 + CLIP_HIGH) & (a > 0)),
        "ratio_mean": r.mean(),
        "ratio_min": r.min(),
        "ratio_max": r.max(),
        "is_weight_mean": w.mean(),
        "is_weight_max": w.max(),
        "is_capped_frac": np.mean(np.exp(prox - beh)[on] > IS_CAP),
        "kl": parts["kl"][on].mean(),
    }
    for k, v in want_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", grpo.KL_ESTIMATORS)
def test_gradient_matches_finite_differences(aggregation, kl_estimator):
    logp, prox, beh, ref, adv, mask = random_inputs(1)
    kw = dict(beta=0.1, kl_estimator=kl_estimator, aggregation=aggregation)
    grad = np.asarray(jax.grad(lambda lp: jax_loss(lp, prox, beh, ref, adv, mask, **kw)[0])(logp))
    # Central differences of the float64 NumPy loss: independent of the JAX code path.
    h = 1e-6
    fd = np.zeros(logp.shape)
    base = logp.astype(np.float64)
    for idx in np.ndindex(logp.shape):
        up, dn = base.copy(), base.copy()
        up[idx] += h
        dn[idx] -= h
        fd[idx] = (
            np_loss(up, prox, beh, ref, adv, mask, **kw)[0]
            - np_loss(dn, prox, beh, ref, adv, mask, **kw)[0]
        ) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-7)
    assert np.all(grad[mask == 0] == 0.0)
    jtu.check_grads(
        lambda lp: jax_loss(lp, prox, beh, ref, adv, mask, **kw)[0], (logp,), 1, modes=("rev",)
    )


def test_importance_weight_is_stop_gradient():
    logp, prox, beh, ref, adv, mask = random_inputs(2)
    kw = dict(beta=0.0, kl_estimator="k3", aggregation="token_mean")
    g_prox = jax.grad(lambda p: jax_loss(logp, p, beh, ref, adv, mask, **kw)[0])(prox)
    g_beh = jax.grad(lambda b: jax_loss(logp, prox, b, ref, adv, mask, **kw)[0])(beh)
    np.testing.assert_array_equal(g_prox, 0.0)
    np.testing.assert_array_equal(g_beh, 0.0)


def test_loss_rejects_bad_arguments():
    logp, prox, beh, ref, adv, mask = random_inputs(3)
    kw = dict(clip_low=0.2, clip_high=0.2, is_cap=2.0, kl_estimator="k3")
    with pytest.raises(ValueError, match="aggregation"):
        grpo.grpo_loss(logp, prox, beh, ref, adv, mask, beta=0.0, aggregation="mean", **kw)
    with pytest.raises(ValueError, match="ref_logp is None"):
        grpo.grpo_loss(logp, prox, beh, None, adv, mask, beta=0.1, aggregation="token_mean", **kw)
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        grpo.grpo_loss(
            logp, prox, beh[:, :3], ref, adv, mask, beta=0.0, aggregation="token_mean", **kw
        )
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo.grpo_loss(
            logp,
            prox,
            beh,
            ref,
            adv,
            mask,
            beta=0.1,
            aggregation="token_mean",
            clip_low=0.2,
            clip_high=0.2,
            is_cap=2.0,
            kl_estimator="k1",
        )


def direct_logprobs(logits, tokens, temperature):
    lsm = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
    nxt = jnp.take_along_axis(lsm[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(nxt, ((0, 0), (1, 0)))


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])
def test_token_logprobs_chunked_equals_unchunked(chunk_size):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 10, 17)).astype(np.float32)
    tokens = rng.integers(0, 17, (2, 10)).astype(np.int32)
    got = grpo.token_logprobs(logits, tokens, 0.7, chunk_size=chunk_size)
    assert got.shape == (2, 10) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, direct_logprobs(logits, tokens, 0.7), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[:, 0], 0.0)


def tiny_model():
    config = helpers.tiny_model_config(vocab_size=61, num_heads=4, num_kv_heads=2, head_dim=8)
    return model_lib.Transformer(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("remat", ["block", "none"])  # the head recomputes or keeps its probs
def test_sequence_logprobs_matches_full_logits_and_gradient(remat):
    model = tiny_model()
    model.remat = remat
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 61, (2, 11)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    attn = jnp.ones((2, 11), jnp.bool_)
    weights = jnp.asarray(rng.normal(size=(2, 11)), jnp.float32)

    def chunked(state):
        m = nnx.merge(graphdef, state)
        lp, ent = grpo.sequence_logprobs(
            m, tokens, positions, attn, 0.8, chunk_size=4, stat="entropy"
        )
        return jnp.sum(lp * weights), (lp, ent)

    def full(state):
        m = nnx.merge(graphdef, state)
        logits, _ = m(tokens, positions, attn_mask=attn)
        lp = direct_logprobs(logits, tokens, 0.8)
        lsm = jax.nn.log_softmax(logits / 0.8, axis=-1)
        ent = -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)
        return jnp.sum(lp * weights), (lp, jnp.pad(ent[:, :-1], ((0, 0), (1, 0))))

    (v1, (lp1, ent1)), g1 = jax.jit(jax.value_and_grad(chunked, has_aux=True))(state)
    (v2, (lp2, ent2)), g2 = jax.jit(jax.value_and_grad(full, has_aux=True))(state)
    np.testing.assert_allclose(lp1, lp2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent1, ent2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_kept_head_probabilities_save_the_logits_recomputation():
    """With keep_probs the head's backward runs its two gradient matmuls and no third one that
    recomputes the logits; the gradients are the same."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(8, 37)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 37, (2, 10)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, 10)), jnp.float32)
    grads, matmuls = {}, {}
    for keep in (False, True):

        def loss(w, x, keep=keep):
            lp, _ = grpo._next_token_stats(grpo._matmul_head, w, x, tokens, 0.7, 4, None, keep)
            return jnp.sum(lp * weights)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        grads[keep] = fn(w, x)
        matmuls[keep] = fn.lower(w, x).compile().as_text().count(" dot(")
    for a, b in zip(grads[True], grads[False], strict=True):
        # The probabilities are formed two float32 ways: equal to rounding of the largest entry.
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    assert matmuls == {False: 4, True: 3}, matmuls


@pytest.mark.parametrize("chunk_size", [3, 4, 11, 256])
def test_sequence_logprobs_argmax_hits_match_full_logits(chunk_size):
    model = tiny_model()
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 61, (3, 11)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(11), (3, 11))
    attn = jnp.ones((3, 11), jnp.bool_)
    logits, _ = model(tokens, positions, attn_mask=attn)
    # Make some targets the argmax, so both outcomes occur.
    tokens = tokens.at[:, 5:].set(jnp.pad(logits.argmax(-1)[:, 4:-1], ((0, 0), (0, 1)))[:, :6])
    lp, hit = grpo.sequence_logprobs(
        model, tokens, positions, attn, 1.0, chunk_size=chunk_size, stat="argmax_hit"
    )
    logits, _ = model(tokens, positions, attn_mask=attn)
    expected = logits.argmax(-1)[:, :-1] == tokens[:, 1:]
    assert 0 < int(expected.sum()) < expected.size
    np.testing.assert_array_equal(hit[:, 1:], expected.astype(np.float32))
    np.testing.assert_array_equal(hit[:, 0], 0.0)
    np.testing.assert_allclose(lp, direct_logprobs(logits, tokens, 1.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown statistic"):
        grpo.sequence_logprobs(model, tokens, positions, attn, 1.0, stat="perplexity")


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_sums_over_row_splits_give_the_full_batch_loss(aggregation):
    logp, prox, beh, ref, adv, mask = random_inputs(4)
    kw = dict(
        clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH,
        is_cap=IS_CAP,
        beta=0.1,
        kl_estimator="k3",
        aggregation=aggregation,
    )
    s, d, _ = grpo.grpo_loss(logp, prox, beh, ref, adv, mask, **kw)
    parts = [
        grpo.grpo_loss(logp[i::2], prox[i::2], beh[i::2], ref[i::2], adv[i::2], mask[i::2], **kw)
        for i in range(2)
    ]
    np.testing.assert_allclose(sum(p[0] for p in parts), s, rtol=1e-6)
    np.testing.assert_allclose(sum(p[1] for p in parts), d, rtol=0)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", grpo.KL_ESTIMATORS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_masked_log_differences_of_1e4_leave_loss_and_gradient_finite(
    aggregation, kl_estimator, sign
):
    # float32 exp overflows above ~88: a masked position holding a log-difference of +-1e4
    # (a reference model or a stale pi_prox on prompt or observation tokens) must change
    # nothing, in value or gradient.
    logp, prox, beh, ref, adv, mask = random_inputs(4)
    masked = mask == 0
    far = sign * 1e4
    # Every log-difference the loss forms is +-1e4 at the masked positions.
    prox_far = np.where(masked, logp - far, prox).astype(np.float32)
    beh_far = np.where(masked, prox_far - far, beh).astype(np.float32)
    ref_far = np.where(masked, logp + far, ref).astype(np.float32)
    kw = dict(beta=0.1, kl_estimator=kl_estimator, aggregation=aggregation)

    def loss(lp, p, b, r):
        return jax_loss(lp, p, b, r, adv, mask, **kw)[0]

    value, grad = jax.value_and_grad(loss)(logp, prox_far, beh_far, ref_far)
    _, metrics = jax_loss(logp, prox_far, beh_far, ref_far, adv, mask, **kw)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad)) and np.all(grad[masked] == 0.0)
    for k, v in metrics.items():
        assert np.isfinite(v), k
    # The masked positions do not matter: the same loss and gradient as with ordinary values.
    want_value, want_grad = jax.value_and_grad(loss)(logp, prox, beh, ref)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)
