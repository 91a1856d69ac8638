"""The jitted update: accumulation equals the full batch, the 2x2x2 mesh equals one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from toolr1_jax import checkpoint, sharding, update
from toolr1_jax.data import types as data_types
from toolr1_jax.models import model as model_lib

B, L = 8, 12
LOSS = update.LossConfig(
    clip_low=0.2,
    clip_high=0.28,
    is_cap=2.0,
    beta=0.05,
    kl_estimator="k3",
    aggregation="seq_mean_token_mean",
    temperature=0.9,
)


CONFIG = helpers.tiny_model_config(vocab_size=64, num_heads=4, num_kv_heads=2, head_dim=8)


@functools.cache
def _init(seed):
    # One jitted init instead of one eager compile per parameter shape.
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.Transformer(CONFIG, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.state(model_lib.Transformer(CONFIG, rngs=nnx.Rngs(seed))))()
    return graphdef, state


def tiny_model(seed=0):
    """(graphdef, a fresh copy of the state): steps donate their state."""
    graphdef, state = _init(seed)
    return graphdef, jax.tree.map(lambda x: x.copy(), state)


@functools.cache
def _logprob_fn(graphdef):
    return update.make_logprob_fn(graphdef, LOSS)


def make_batch(graphdef, state, seed=0):
    """Right-padded rows, a prompt prefix outside the loss, and off-policy log-probs."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (B, L)).astype(np.int32)
    lengths = rng.integers(5, L + 1, B)
    lengths[0] = L
    attn = np.arange(L)[None] < lengths[:, None]
    loss_mask = (attn & (np.arange(L)[None] >= 3)).astype(np.float32)
    positions = np.broadcast_to(np.arange(L), (B, L)).astype(np.int32)
    batch = update.Batch(
        tokens=tokens,
        positions=positions,
        attn_mask=attn,
        loss_mask=loss_mask,
        behaviour_logprobs=np.zeros((B, L), np.float32),
        advantages=rng.normal(size=B).astype(np.float32),
    )
    lp = np.asarray(_logprob_fn(graphdef)(state, batch))
    # pi_prox and pi_behaviour differ from the current policy, so the clip and the cap both act.
    prox = lp + rng.uniform(-0.5, 0.5, (B, L)).astype(np.float32)
    behaviour = prox - rng.uniform(-1.0, 1.5, (B, L)).astype(np.float32)
    return batch.replace(behaviour_logprobs=behaviour * loss_mask, prox_logprobs=prox)


def ref_params(state):
    # A frozen reference that differs from the policy, so the KL term is not zero.
    return jax.tree.map(lambda p: p * 1.05, state)


def max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def test_accumulation_over_4_microbatches_equals_full_batch():
    graphdef, state = tiny_model()
    batch = make_batch(graphdef, state)
    ref = ref_params(state)
    full = update.make_grad_fn(graphdef, LOSS, num_microbatches=1, chunk_size=5)
    acc = update.make_grad_fn(graphdef, LOSS, num_microbatches=4, chunk_size=5)
    g_full, m_full = full(state, batch, ref)
    g_acc, m_acc = acc(state, batch, ref)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g_acc), jax.tree.leaves(g_full), strict=True
    ):
        assert np.abs(np.asarray(b)).max() > 0, path
        assert max_rel_err(a, b) <= 1e-6, (jax.tree_util.keystr(path), max_rel_err(a, b))
    assert m_full["clip_frac_low"] > 0 and m_full["clip_frac_high"] > 0
    assert m_full["is_capped_frac"] > 0 and m_full["kl"] > 0
    assert m_full["num_tokens"] == batch.loss_mask.sum()
    for k in m_full:
        # atol: float32 resolution of the O(1) per-token terms, for means that cancel (pg_loss).
        np.testing.assert_allclose(m_acc[k], m_full[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_remat_policies_give_the_same_gradients_and_differ_in_recomputation():
    """optim.remat changes what the backward recomputes, never the gradient: "dots" and "none"
    equal "block" (the default), and the compiled programs show the recomputation: "block" runs
    each block's matmuls again in the backward, "dots" only attention's, "none" nothing."""
    graphdef, state = tiny_model()
    assert nnx.merge(graphdef, state).remat == "block"
    batch, ref = make_batch(graphdef, state), ref_params(state)
    grads, matmuls = {}, {}
    for remat in model_lib.REMAT_POLICIES:
        model = nnx.merge(graphdef, state)
        model.remat = remat
        gd = nnx.graphdef(model)
        fn = update.make_grad_fn(gd, LOSS, chunk_size=5)
        grads[remat], _ = fn(state, batch, ref)
        hlo = jax.jit(fn).lower(state, batch, ref).compile().as_text()
        matmuls[remat] = hlo.count(" dot(")
    for remat in ("dots", "none"):
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(grads[remat]),
            jax.tree.leaves(grads["block"]),
            strict=True,
        ):
            assert max_rel_err(a, b) <= 1e-6, (remat, jax.tree_util.keystr(path))
    # "block" recomputes every matmul of a block, "dots" only the attention's batched ones.
    assert matmuls["block"] > matmuls["dots"] > matmuls["none"], matmuls


def test_loss_config_and_batch_errors():
    with pytest.raises(ValueError, match="k1 is not offered"):
        update.LossConfig(kl_estimator="k1")
    with pytest.raises(ValueError, match="aggregation"):
        update.LossConfig(aggregation="sum")
    with pytest.raises(ValueError, match="total_steps"):
        update.make_optimizer(1e-3, 10, 10, 0.0, 1.0)
    graphdef, state = tiny_model()
    batch = make_batch(graphdef, state)
    grad_fn = update.make_grad_fn(graphdef, LOSS, num_microbatches=3)
    with pytest.raises(ValueError, match="not divisible by num_microbatches 3"):
        grad_fn(state, batch, ref_params(state))
    with pytest.raises(ValueError, match="needs ref_state"):
        update.make_grad_fn(graphdef, LOSS)(state, batch)


def run_step(mesh):
    graphdef, state = tiny_model()
    batch = make_batch(graphdef, state)
    ref = ref_params(state)
    if mesh is not None:
        state = jax.device_put(state, sharding.param_shardings(state, mesh))
    optimizer = update.make_optimizer(
        1e-3, warmup_steps=0, total_steps=10, weight_decay=0.1, max_grad_norm=1.0
    )
    opt_state = optimizer.init(state)
    step = update.make_train_step(graphdef, optimizer, LOSS, num_microbatches=2, mesh=mesh)
    state, opt_state, metrics = step(state, opt_state, batch, ref)
    return state, opt_state, jax.device_get(metrics), (step, batch, ref)


def test_update_on_2x2x2_mesh_equals_single_device():
    mesh = sharding.make_mesh(2, 2, 2)
    state_1, opt_1, metrics_1, _ = run_step(None)
    state_m, opt_m, metrics_m, (step_m, batch, ref) = run_step(mesh)

    for k in metrics_1:
        np.testing.assert_allclose(metrics_m[k], metrics_1[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # AdamW's first moments hold (1 - b1) * the clipped gradient: the gradients agree.
    mu_1, mu_m = opt_1[1][0].mu, opt_m[1][0].mu
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(mu_m), jax.tree.leaves(mu_1), strict=True
    ):
        assert max_rel_err(a, b) <= 1e-6, (jax.tree_util.keystr(path), max_rel_err(a, b))
    # Adam's first step is lr * g / (|g| + eps): its derivative in g is lr * eps / (|g| + eps)^2,
    # so the 1e-6 gradient agreement above allows, per element, the params difference below
    # (large only where |g| is near eps, e.g. the key bias, whose gradient is almost zero), plus
    # one float32 ulp of the param for the rounding of p + update.
    lr, eps = 1e-3, 1e-8
    for (path, a), b, m in zip(
        jax.tree_util.tree_leaves_with_path(state_m),
        jax.tree.leaves(state_1),
        jax.tree.leaves(mu_1),
        strict=True,
    ):
        g = np.abs(np.asarray(m, np.float64)) / (1 - 0.9)
        bound = lr * (1e-6 + eps * 1e-6 * g.max() / (g + eps) ** 2)
        bound += np.spacing(np.abs(np.asarray(b, np.float32))).astype(np.float64)
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert np.all(diff <= bound), (jax.tree_util.keystr(path), (diff / bound).max())

    # The params are sharded over fsdp and tensor, stay so, and a second step reuses the program.
    wq = state_m["layers"][0]["attn"]["wq_dnh"][...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len(wq.addressable_shards) == 8
    assert step_m.num_compilations == 1
    state_m, opt_m, metrics_m = step_m(state_m, opt_m, batch, ref)
    assert step_m.num_compilations == 1
    assert state_m["layers"][0]["attn"]["wq_dnh"][...].sharding.spec == wq.sharding.spec
    assert np.isfinite(metrics_m["loss"])


def test_steps_raise_logprob_of_positive_advantage_tokens():
    graphdef, state = tiny_model(seed=1)
    loss = update.LossConfig(temperature=LOSS.temperature)
    batch = make_batch(graphdef, state, seed=1)
    # On-policy: no prox (the step uses its own log-probs) and behaviour = current log-probs.
    logprob_fn = _logprob_fn(graphdef)
    lp0 = np.asarray(logprob_fn(state, batch))
    batch = batch.replace(
        prox_logprobs=None,
        behaviour_logprobs=lp0 * batch.loss_mask,
        advantages=np.where(np.arange(B) % 2 == 0, 1.0, -1.0).astype(np.float32),
    )
    optimizer = update.make_optimizer(1e-2, 0, 10, 0.0, 1.0)
    opt_state = optimizer.init(state)
    step = update.make_train_step(graphdef, optimizer, loss)
    state, opt_state, m0 = step(state, opt_state, batch)
    # At the start of an on-policy step every ratio and importance weight is exactly 1.
    assert m0["ratio_min"] == m0["ratio_max"] == 1.0
    np.testing.assert_allclose(m0["is_weight_mean"], 1.0, rtol=1e-6)
    for _ in range(3):
        state, opt_state, _ = step(state, opt_state, batch)
    lp1 = np.asarray(logprob_fn(state, batch))
    seq_delta = ((lp1 - lp0) * batch.loss_mask).sum(1)
    assert np.all(seq_delta[0::2] > 0) and np.all(seq_delta[1::2] < 0), seq_delta


def _changed(a, b) -> float:
    """The fraction of entries that differ between two param trees."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    changed = sum(
        int((np.asarray(x, np.float32) != np.asarray(y, np.float32)).sum()) for x, y in pairs
    )
    return changed / sum(np.size(x) for x, _ in pairs)


def test_bfloat16_params_step_on_float32_master_weights(tmp_path):
    # configs/gaia.py trains bfloat16 params at lr 1e-6. Adam moves a weight by about the
    # learning rate, ~100x below bfloat16's spacing near 0.02: added to bfloat16 weights
    # directly, nearly every step rounds away. The optimizer steps float32 master weights.
    def model16():
        return model_lib.Transformer(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)

    graphdef16 = nnx.graphdef(nnx.eval_shape(model16))
    start16 = jax.jit(lambda: nnx.state(model16()))()
    graphdef32, _ = tiny_model()
    start32 = jax.tree.map(lambda x: x.astype(jnp.float32), start16)  # the same weights
    batch = make_batch(graphdef32, start32)
    loss = update.LossConfig(temperature=LOSS.temperature)
    optimizer = update.make_optimizer(1e-6, 0, 10, 0.0, 1.0)
    runs = {}
    for name, graphdef, start in (("bf16", graphdef16, start16), ("f32", graphdef32, start32)):
        state = jax.tree.map(lambda x: x.copy(), start)
        opt_state = optimizer.init(state)
        step = update.make_train_step(graphdef, optimizer, loss)
        for _ in range(3):
            state, opt_state, _ = step(state, opt_state, batch)
        runs[name] = state, opt_state, step
    state16, opt16, step16 = runs["bf16"]
    state32, opt32, _ = runs["f32"]

    # float32 params keep the plain optimizer state; bfloat16 ones get float32 master weights
    # and moments from the start, so the step's program never changes (one compilation).
    assert not isinstance(opt32, update.MasterWeightsState)
    assert isinstance(opt16, update.MasterWeightsState)
    assert {x.dtype for x in jax.tree.leaves(opt16) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert step16.num_compilations == 1
    # Each param is its master weight rounded to bfloat16, exactly.
    for p, m in zip(jax.tree.leaves(state16), jax.tree.leaves(opt16.master), strict=True):
        assert p.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
    # The master weights moved where the float32 run's params did; the bfloat16 params alone
    # would have lost nearly all of it.
    moved32, moved_master = _changed(start32, state32), _changed(start32, opt16.master)
    assert moved32 > 0.5 and moved_master >= 0.95 * moved32, (moved32, moved_master)
    assert _changed(start16, state16) < 0.2 * moved32
    # Adam's steps are about lr each: the master weights are within a few steps of the float32
    # run (bfloat16's gradients flip the sign of some of the smallest).
    for m, p in zip(jax.tree.leaves(opt16.master), jax.tree.leaves(state32), strict=True):
        assert np.abs(np.asarray(m) - np.asarray(p)).max() <= 6 * 1e-6 * 1.1

    # The state checkpoints and resumes as itself (the update tells the two kinds apart).
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    saved = {"params": state16, "opt_state": opt16}
    ckpt.save(3, saved, {})
    _, restored, _ = ckpt.restore_latest(saved)
    ckpt.close()
    assert isinstance(restored["opt_state"], update.MasterWeightsState)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and the next step from it is the step from the state that was saved.
    expected, _, _ = step16(*jax.tree.map(lambda x: x.copy(), (state16, opt16)), batch)
    resumed, _, _ = step16(restored["params"], restored["opt_state"], batch)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fully_masked_batch_gives_zero_gradient_and_finite_metrics():
    # Every episode cut by a limit (drop_truncated) leaves nothing to learn from: the step must
    # be a no-op with metrics a logger can write, not +-inf extremes.
    graphdef, state = tiny_model()
    batch = make_batch(graphdef, state)
    batch = batch.replace(loss_mask=np.zeros_like(batch.loss_mask))
    grad_fn = update.make_grad_fn(graphdef, LOSS, num_microbatches=2)
    grads, metrics = grad_fn(state, batch, ref_params(state))
    for g in jax.tree.leaves(grads):
        assert not np.asarray(g).any()
    assert metrics["num_tokens"] == 0
    for k, v in metrics.items():
        assert np.isfinite(v), (k, v)


def _traj(n, status, reward=0.0, prompt_len=2, tokens=None, behaviour=-0.5):
    """An episode of n tokens (default 1..n) whose first `prompt_len` are the prompt;
    `behaviour` (a scalar or [n]) gives the sampled tokens' log-probs."""
    sampled = np.arange(n) >= prompt_len
    return data_types.Trajectory(
        task_id=f"t{n}",
        group_id=0,
        tokens=np.arange(1, n + 1, dtype=np.int32) if tokens is None else tokens,
        loss_mask=sampled.astype(np.int32),
        behaviour_logprobs=np.where(sampled, behaviour, 0.0).astype(np.float32),
        prompt_len=prompt_len,
        policy_version=0,
        turns=(),
        final_answer=None,
        status=status,
        reward=reward,
    )


def test_make_batch_pads_rows_places_advantages_and_masks_truncated_episodes():
    trajs = [_traj(5, "answered"), _traj(7, "max_tokens"), _traj(3, "parse_error")]
    batch = update.make_batch(
        trajs, batch_size=4, max_len=8, advantages=[1.5, -0.5, 0.25], drop_truncated=True
    )
    assert batch.tokens.shape == batch.loss_mask.shape == batch.behaviour_logprobs.shape == (4, 8)
    np.testing.assert_array_equal(batch.advantages, [1.5, -0.5, 0.25, 0.0])
    for row, t in enumerate(trajs):
        n = len(t.tokens)
        np.testing.assert_array_equal(batch.tokens[row, :n], t.tokens)
        assert batch.attn_mask[row].sum() == n and not batch.tokens[row, n:].any()
        np.testing.assert_array_equal(batch.behaviour_logprobs[row, :n], t.behaviour_logprobs)
    # The episode cut by max_tokens keeps its tokens but gives no loss tokens.
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 0, 1, 1, 1, 0, 0, 0])
    assert not batch.loss_mask[1].any() and batch.loss_mask[2].sum() == 1
    assert not batch.attn_mask[3].any() and not batch.loss_mask[3].any()
    kept = update.make_batch(trajs, batch_size=4, max_len=8, drop_truncated=False)
    np.testing.assert_array_equal(kept.loss_mask[1, :7], trajs[1].loss_mask)
    assert not kept.advantages.any()
    with pytest.raises(ValueError, match="max_len"):
        update.make_batch(trajs, batch_size=4, max_len=6)


def test_check_finite_names_the_step_the_metric_and_the_last_good_checkpoint():
    update.check_finite(
        {"loss": 0.5, "grad_norm": 2.0, "kl": float("nan")}, where="x", last_good=""
    )
    for key in update.GUARDED_METRICS:
        for bad in (float("nan"), float("inf")):
            metrics = {"loss": 0.5, "grad_norm": 2.0, key: bad}
            with pytest.raises(update.NonFiniteError, match=f"GRPO step 7: {key} is {bad}"):
                update.check_finite(metrics, where="GRPO step 7", last_good="/ckpt/6")


def test_make_batch_packs_sequences_into_the_first_microbatches():
    trajs = [_traj(5, "answered"), _traj(7, "max_tokens"), _traj(3, "parse_error")]
    batch = update.make_batch(
        trajs,
        batch_size=4,
        max_len=8,
        advantages=[1.5, -0.5, 0.25],
        drop_truncated=True,
        pack=True,
        num_microbatches=2,
    )
    # First fit, longest first: [7] and [5, 3]. Micro-batch 0 is rows 0 and 2 (rows j, j + M).
    np.testing.assert_array_equal(batch.segment_ids[0], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch.segment_ids[2], [1, 1, 1, 1, 1, 2, 2, 2])
    assert not batch.attn_mask[1].any() and not batch.attn_mask[3].any()
    np.testing.assert_array_equal(batch.attn_mask, batch.segment_ids > 0)
    np.testing.assert_array_equal(batch.tokens[2], [*trajs[0].tokens, *trajs[2].tokens])
    np.testing.assert_array_equal(batch.positions[2], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(batch.advantages[2], [1.5] * 5 + [0.25] * 3)
    np.testing.assert_array_equal(batch.advantages[0, :7], [-0.5] * 7)
    # Loss tokens: each sequence's own, never its first; the truncated one has none.
    np.testing.assert_array_equal(batch.loss_mask[2], [0, 0, 1, 1, 1, 0, 0, 1])
    assert not batch.loss_mask[0].any()
    np.testing.assert_array_equal(batch.behaviour_logprobs[2, 5:], trajs[2].behaviour_logprobs)


def _ragged_trajectories(n, max_len, seed):
    rng = np.random.default_rng(seed)
    trajs = []
    for i in range(n):
        length = int(rng.integers(4, max_len // 2 + 3))
        trajs.append(
            _traj(
                length,
                "answered",
                reward=float(i % 2),
                prompt_len=int(rng.integers(1, 4)),
                tokens=rng.integers(0, 64, length).astype(np.int32),
                behaviour=rng.uniform(-4.0, -0.5, length),
            )
        )
    return trajs, rng.normal(size=n).astype(np.float32)


@pytest.mark.parametrize(
    "aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
)
def test_packed_batch_gives_the_unpacked_loss_and_gradients(aggregation):
    """Sequences packed several to a row attend only within their segment, restart their
    positions and keep their advantages, so loss, metrics and gradients are the one-per-row
    batch's; the packed batch fills half the micro-batches and the step skips the rest."""
    graphdef, state = tiny_model()
    trajs, adv = _ragged_trajectories(8, 24, seed=3)
    loss = update.LossConfig(**{**LOSS.__dict__, "aggregation": aggregation})
    grad_fn = update.make_grad_fn(graphdef, loss, num_microbatches=4, chunk_size=5)
    kwargs = dict(batch_size=8, max_len=24, advantages=adv)
    plain = update.make_batch(trajs, **kwargs)
    packed = update.make_batch(trajs, **kwargs, pack=True, num_microbatches=4)
    used = np.flatnonzero(packed.attn_mask.any(1))
    assert len(used) <= 4 and set(used % 4) <= {0, 1}, used  # micro-batches 0 and 1 only
    ref = ref_params(state)
    g_plain, m_plain = grad_fn(state, plain, ref)
    g_packed, m_packed = grad_fn(state, packed, ref)
    assert (
        m_packed["num_tokens"] == m_plain["num_tokens"] == sum(t.loss_mask[1:].sum() for t in trajs)
    )
    for k in m_plain:
        np.testing.assert_allclose(m_packed[k], m_plain[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g_packed), jax.tree.leaves(g_plain), strict=True
    ):
        assert np.abs(np.asarray(b)).max() > 0, path
        assert max_rel_err(a, b) <= 1e-5, (jax.tree_util.keystr(path), max_rel_err(a, b))


def test_the_update_loop_runs_only_the_microbatches_that_hold_tokens():
    m, rows, length = 4, 2, 3
    attn = np.zeros((m, rows, length), bool)
    attn[0, 1, :2] = attn[2, 0, 0] = True  # micro-batches 0 and 2 hold tokens, 1 and 3 do not
    mbs = update.Batch(
        tokens=np.zeros((m, rows, length), np.int32),
        positions=np.zeros((m, rows, length), np.int32),
        attn_mask=attn,
        loss_mask=attn.astype(np.float32),
        behaviour_logprobs=np.zeros((m, rows, length), np.float32),
        advantages=np.zeros((m, rows), np.float32),
    )

    def body(trips, mb):
        return trips + 1, {"num_tokens": mb.attn_mask.sum().astype(np.float32)}

    loop = jax.jit(lambda mbs: update._loop_over_microbatches(body, np.int32(0), mbs, m))
    trips, stacked = loop(mbs)
    assert int(trips) == 2
    np.testing.assert_array_equal(stacked["num_tokens"], [2, 0, 1, 0])
