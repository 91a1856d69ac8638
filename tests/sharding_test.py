"""Mesh construction, logical rules, and sharded placement/forward on a 2x2x2 CPU mesh."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from toolr1_jax import sharding
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import params


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(2, 2, 2)


def test_make_mesh_sizes():
    m = sharding.make_mesh(-1, 2, 1)
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert m.axis_types == (jax.sharding.AxisType.Auto,) * 3
    sub = sharding.make_mesh(1, 2, -1, devices=jax.devices()[:4])
    assert dict(sub.shape) == {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((2, 2, 4), "multiply to 16, but there are 8 devices"),
        ((-1, -1, 2), "At most one"),
        ((3, -1, 1), "not divisible"),
        ((0, 8, 1), "positive"),
    ],
)
def test_make_mesh_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(*sizes)


def test_logical_to_spec(mesh):
    assert sharding.logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    # A mesh axis is never used twice in one spec: embed's fsdp is taken by batch.
    assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "batch")) == P("fsdp", None)
    # With a mesh, dims that do not divide their mesh axes are replicated.
    assert sharding.logical_to_spec(("batch", "mlp"), (8, 3), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("vocab", "embed"), (7, 64), mesh) == P(None, "fsdp")
    assert sharding.logical_to_spec(("batch",), (6,), mesh) == P(None)
    with pytest.raises(ValueError, match="Unknown logical axis 'embd'"):
        sharding.logical_to_spec(("embd",))
    with pytest.raises(ValueError, match="do not match"):
        sharding.logical_to_spec(("embed",), (2, 2), mesh)


# Specs the rules imply for the tiny qwen2 fixture (D=64, F=128, V=512, N=4, K=2, H=16).
EXPECTED = {
    ("embed_vd",): P("tensor", "fsdp"),
    ("lm_head_dv",): P("fsdp", "tensor"),
    ("final_norm", "scale"): P("fsdp"),
    ("layers", 0, "attn", "wq_dnh"): P("fsdp", "tensor", None),
    ("layers", 0, "attn", "wk_dkh"): P("fsdp", "tensor", None),
    ("layers", 0, "attn", "wo_nhd"): P("tensor", None, "fsdp"),
    ("layers", 0, "attn", "bq_nh"): P("tensor", None),
    ("layers", 0, "mlp", "w_gate_df"): P("fsdp", "tensor"),
    ("layers", 0, "mlp", "w_down_fd"): P("tensor", "fsdp"),
    ("layers", 1, "attn_norm", "scale"): P("fsdp"),
}


def _spec(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node[...].sharding.spec


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return helpers.make_hf_model_dir(tmp_path_factory.mktemp("shard"), "qwen2")


def test_load_pretrained_places_sharded(qwen2_dir, mesh, tmp_path):
    model, config = params.load_pretrained(qwen2_dir, mesh=mesh)
    for path, spec in EXPECTED.items():
        assert _spec(model, path) == spec, path
    wq = model.layers[0].attn.wq_dnh[...]
    # Each device holds a quarter of wq: D split over fsdp, N over tensor.
    assert wq.addressable_shards[0].data.shape == (32, 2, 16)
    # Saving gathers the shards: the export holds the same weights as an unsharded load.
    params.save_pretrained(model, config, tmp_path / "export")
    again, _ = params.load_pretrained(tmp_path / "export")
    reference, _ = params.load_pretrained(qwen2_dir)
    leaves = zip(
        jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(reference)), strict=True
    )
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shard_model_and_sharded_forward(qwen2_dir, mesh):
    model, config = params.load_pretrained(qwen2_dir)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, size=(4, 8)))
    positions = jnp.broadcast_to(jnp.arange(8), (4, 8))
    expected, _ = model(tokens, positions)

    sharding.shard_model(model, mesh)
    for path, spec in EXPECTED.items():
        assert _spec(model, path) == spec, path
    graphdef, state = nnx.split(model)
    shardings = sharding.param_shardings(state, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(jax.tree.map(lambda _: 0, state))

    @jax.jit
    def forward(state, tokens, positions):
        tokens = sharding.constrain(tokens, ("batch", "length"))
        logits, _ = nnx.merge(graphdef, state)(tokens, positions)
        return sharding.constrain(logits, ("batch", "length", "vocab"))

    with jax.set_mesh(mesh):
        got = forward(state, tokens, positions)
    assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


def test_constrain_without_mesh_is_identity():
    x = jnp.ones((4, 8))
    assert sharding.constrain(x, ("batch", "embed")) is x


def test_replicated_fallback_for_odd_sizes(mesh):
    # One kv head and an odd vocab cannot split over tensor=2: those dims are replicated.
    config = helpers.tiny_model_config(vocab_size=509)
    # Abstract model: the specs come from shapes and metadata alone, no weights needed.
    abstract = nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    shardings = sharding.param_shardings(abstract, mesh)
    attn = shardings["layers"][0]["attn"]
    assert attn["wk_dkh"].get_value().spec == P("fsdp", None, None)
    assert attn["bk_kh"].get_value().spec == P(None, None)
    assert attn["wq_dnh"].get_value().spec == P("fsdp", "tensor", None)
    assert shardings["embed_vd"].get_value().spec == P(None, "fsdp")
