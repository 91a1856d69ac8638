"""Hugging Face import/export: parity with transformers' PyTorch models, round trip, bad input."""

import json

import helpers
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from toolr1_jax.models import model as model_lib
from toolr1_jax.models import params

FAMILIES = ("qwen2", "qwen3", "llama")


def _batch(vocab_size, seed=0):
    return helpers.left_padded_batch(vocab_size, seed)


def _max_err_on_real_tokens(a, b, mask):
    real = mask.astype(bool)
    return float(np.max(np.abs(a[real] - b[real])))


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory):
    return helpers.make_hf_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def test_parity_with_transformers(hf_dir):
    model, config = params.load_pretrained(hf_dir, dtype=jnp.float32)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokens, mask, positions = _batch(config.vocab_size)
    ours = helpers.our_logits(model, tokens, mask, positions)
    theirs = helpers.hf_logits(hf_model.eval(), tokens, mask, positions)
    assert ours.shape == theirs.shape == (3, 12, config.vocab_size)
    # Guard against a vacuous pass: logits must be far from constant.
    assert np.std(theirs[mask.astype(bool)]) > 0.1
    assert _max_err_on_real_tokens(ours, theirs, mask) <= 1e-4


def test_config_read_per_family(hf_dir):
    config = params.read_config(hf_dir)
    assert config.model_type in FAMILIES
    if config.model_type == "qwen2":
        assert config.qkv_bias and not config.qk_norm and not config.tie_word_embeddings
    if config.model_type == "qwen3":
        assert config.qk_norm and config.head_dim == 24
    if config.model_type == "llama":
        assert config.tie_word_embeddings and dict(config.rope_scaling)["factor"] == 8.0
    assert config.eos_token_ids == (helpers.IM_END_ID,)


def test_sharded_checkpoint_with_index(tmp_path):
    single = helpers.make_hf_model_dir(tmp_path, "qwen2", name="single")
    sharded = helpers.make_hf_model_dir(tmp_path, "qwen2", name="sharded", max_shard_size="100KB")
    assert (sharded / params.INDEX_FILE).is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, config = params.load_pretrained(single)
    b, _ = params.load_pretrained(sharded)
    tokens, mask, positions = _batch(config.vocab_size, seed=1)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    theirs = helpers.hf_logits(hf_model.eval(), tokens, mask, positions)
    ours = helpers.our_logits(b, tokens, mask, positions)
    assert _max_err_on_real_tokens(ours, theirs, mask) <= 1e-4
    np.testing.assert_array_equal(ours, helpers.our_logits(a, tokens, mask, positions))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_export_round_trip(tmp_path, model_type):
    src = helpers.make_hf_model_dir(tmp_path, model_type, seed=3)
    model, config = params.load_pretrained(src)
    # A small shard limit exercises the index writer too.
    out = params.save_pretrained(model, config, tmp_path / "export", max_shard_bytes=64 * 1024)
    assert (out / params.INDEX_FILE).is_file()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens, mask, positions = _batch(config.vocab_size, seed=2)
    ours = helpers.our_logits(model, tokens, mask, positions)
    theirs = helpers.hf_logits(hf_model.eval(), tokens, mask, positions)
    assert _max_err_on_real_tokens(ours, theirs, mask) <= 1e-4
    # Loading our export back gives the same config and bit-identical weights.
    again, config2 = params.load_pretrained(out)
    assert config2 == config
    np.testing.assert_array_equal(ours, helpers.our_logits(again, tokens, mask, positions))


def test_export_single_file_bfloat16(tmp_path):
    src = helpers.make_hf_model_dir(tmp_path, "qwen3")
    model, config = params.load_pretrained(src, dtype=jnp.bfloat16)
    assert model.layers[0].attn.wq_dnh[...].dtype == jnp.bfloat16
    out = params.save_pretrained(model, config, tmp_path / "export")
    assert (out / params.SINGLE_FILE).is_file() and not (out / params.INDEX_FILE).exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.dtype == torch.bfloat16
    ours = np.asarray(model.embed_vd[...].astype(jnp.float32))
    theirs = hf_model.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(ours, theirs)


# --- Bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return helpers.make_hf_model_dir(tmp_path_factory.mktemp("bad"), "qwen2", num_hidden_layers=1)


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_config(tmp_path, qwen2_dir):
    d = _copy_dir(qwen2_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="No config.json"):
        params.load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        params.load_pretrained(tmp_path / "nowhere")


def test_unsupported_model_type(tmp_path, qwen2_dir):
    d = _copy_dir(qwen2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'gpt2'.*qwen2, qwen3, llama"):
        params.load_pretrained(d)


def test_unsupported_variant(tmp_path, qwen2_dir):
    d = _copy_dir(qwen2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_sliding_window"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_sliding_window"):
        params.load_pretrained(d)


def _rewrite_weights(d, fn):
    file = d / params.SINGLE_FILE
    tensors = dict(safetensors.numpy.load_file(str(file)))
    fn(tensors)
    safetensors.numpy.save_file(tensors, str(file))


def test_missing_tensor(tmp_path, qwen2_dir):
    d = _copy_dir(qwen2_dir, tmp_path / "m")
    _rewrite_weights(d, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match="missing tensors: model.layers.0.self_attn.k_proj.bias"):
        params.load_pretrained(d)


def test_misshapen_tensor(tmp_path, qwen2_dir):
    d = _copy_dir(qwen2_dir, tmp_path / "m")

    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]

    _rewrite_weights(d, shrink)
    with pytest.raises(ValueError, match=r"up_proj.weight.*\(127, 64\).*\(128, 64\)"):
        params.load_pretrained(d)


def test_unexpected_tensor(tmp_path, qwen2_dir):
    d = _copy_dir(qwen2_dir, tmp_path / "m")

    def add(t):
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)

    _rewrite_weights(d, add)
    with pytest.raises(ValueError, match="does not use.*o_proj.bias"):
        params.load_pretrained(d)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, qwen2_dir, damage):
    d = _copy_dir(qwen2_dir, tmp_path / "m")
    file = d / params.SINGLE_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 200)
    with pytest.raises(ValueError, match="Corrupt or unreadable safetensors file"):
        params.load_pretrained(d)


def test_no_weights(tmp_path, qwen2_dir):
    d = _copy_dir(qwen2_dir, tmp_path / "m")
    (d / params.SINGLE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="No model.safetensors"):
        params.load_pretrained(d)


def test_export_rejects_inexpressible_config():
    config = model_lib.ModelConfig(
        model_type="llama",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=4,
        qkv_bias=True,
    )
    with pytest.raises(ValueError, match="o_proj bias"):
        params.hf_config_dict(config, jnp.float32)
