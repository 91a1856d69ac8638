"""GGUF files (llama.cpp's format) -> Hugging Face checkpoint directories.

A GGUF file is converted once into a directory that the safetensors loader and transformers both
read: `config.json` from the file's metadata, `model.safetensors` with every tensor dequantized to
float32 (written tensor by tensor, so the host never holds the model twice), and the tokenizer
with its chat template. Conversions are cached by the file's SHA-256, so a second run reads the
cache. Reading and dequantizing go through the `gguf` package, which llama.cpp maintains.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile

import gguf
import numpy as np
import transformers

# GGUF architectures we convert -> transformers' model_type and class.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# Tensor types a small-model user meets that the gguf package dequantizes.
_T = gguf.GGMLQuantizationType
TENSOR_TYPES = (
    _T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1,
    _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
)  # fmt: skip
# What a cached conversion directory holds when complete; written last.
_DONE_FILE = "gguf_source.json"

# GGUF tensor name -> Hugging Face tensor name ({i} is the layer).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def cache_root() -> pathlib.Path:
    """Where conversions live: `$TOOLR1_JAX_CACHE/gguf`, by default `~/.cache/toolr1_jax/gguf`."""
    root = os.environ.get("TOOLR1_JAX_CACHE") or os.path.join("~", ".cache", "toolr1_jax")
    return pathlib.Path(root).expanduser() / "gguf"


def find_gguf(path) -> pathlib.Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a directory without a
    `config.json`; None when `path` is not a GGUF source."""
    path = pathlib.Path(path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(
            f"{str(path)!r} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
            "give the path of the one to load."
        )
    return files[0] if files else None


def file_sha256(path: pathlib.Path) -> str:
    """The file's SHA-256, read once per process for each (path, size, mtime): a run resolves
    its source for the config, the weights and the tokenizer, and a 7B GGUF takes seconds."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # in the cache key only: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def cached_conversion(gguf_path) -> pathlib.Path:
    """The Hugging Face directory converted from `gguf_path`, converting it on first use."""
    gguf_path = pathlib.Path(gguf_path).expanduser().resolve()
    target = cache_root() / file_sha256(gguf_path)[:32]
    if (target / _DONE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert beside the target and rename: a crash leaves no half-written cache entry, and two
    # processes converting at once both end with a complete directory.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        convert(gguf_path, tmp)
        # Renaming onto an existing directory fails: another process renamed its complete copy
        # first (and may be reading it by now), so ours is dropped, never theirs.
        with contextlib.suppress(OSError):
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / _DONE_FILE).is_file():
        raise RuntimeError(f"Converting {gguf_path} to {target} did not complete.")
    return target


def _open_reader(path: pathlib.Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise ValueError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {e!r}"
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, "
                f"but the file has {size} bytes."
            )
    return reader


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _short_float(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 becomes 9.9999997e-06); the shortest decimal that
    round-trips to the same float32 is what the source config said."""
    return float(str(np.float32(x)))


def hf_config(reader: gguf.GGUFReader, path: pathlib.Path) -> dict:
    """transformers config fields from the file's metadata, rejecting what we cannot convert."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported architectures are "
            f"{', '.join(ARCHITECTURES)}."
        )
    model_type, hf_class = ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = _field(reader, f"{arch}.rope.scaling.factor", 1.0)
    # Llama 3.1+ store their scaling as a rope_freqs tensor of per-frequency divisors.
    if "rope_freqs.weight" in names or scaling not in ("none", "linear") or factor != 1.0:
        raise ValueError(f"{path}: RoPE scaling in GGUF files is not supported.")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}.")
        if not isinstance(value, int | float):
            raise ValueError(
                f"{path}: {arch}.{key} is {value!r}; per-layer values are unsupported."
            )
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ValueError(f"{path}: per-layer attention.head_count_kv is unsupported.")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: no token_embd.weight tensor.")
    fields = dict(
        architectures=[hf_class],
        vocab_size=int(embed.shape[-1]),  # GGUF lists dimensions innermost first
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_field(reader, f"{arch}.attention.key_length", hidden // heads),
        hidden_act="silu",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": _short_float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        },
        rms_norm_eps=_short_float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=_field(reader, f"{arch}.context_length", 32768),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        dtype="float32",
    )
    if model_type == "qwen2":
        fields["use_sliding_window"] = False
    return {"model_type": model_type, **fields}


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _to_hf_layout(name: str, w: np.ndarray, arch: str, config: dict) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation for Llama. Its converter views each head's rows as
    [2, H/2] (HF's rotate-half order) and swaps them to [H/2, 2] (interleaved pairs, llama.cpp's
    RoPE); qwen2 and qwen3 keep HF's order in GGUF."""
    if arch != "llama" or not name.endswith(("attn_q.weight", "attn_k.weight")):
        return w
    heads = config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t) -> np.ndarray:
    """One tensor as float32 in its logical shape (GGUF lists dimensions innermost first)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        shape
    )


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header, offset = {}, 0
    for name, shape in entries:
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def convert(gguf_path, out_dir) -> pathlib.Path:
    """Writes the Hugging Face directory for `gguf_path` into `out_dir` (config, float32
    safetensors, tokenizer when the file has one)."""
    gguf_path = pathlib.Path(gguf_path)
    out_dir = pathlib.Path(out_dir)
    reader = _open_reader(gguf_path)
    config = hf_config(reader, gguf_path)
    arch = _field(reader, "general.architecture")

    unknown = [t.name for t in reader.tensors if _hf_name(t.name) is None]
    if unknown:
        raise ValueError(
            f"{gguf_path}: tensors this converter does not map (unsupported {arch} variant?): "
            f"{', '.join(unknown[:8])}."
        )
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in TENSOR_TYPES})
    if bad:
        raise ValueError(
            f"{gguf_path}: unsupported tensor type(s) {', '.join(bad)}; supported types are "
            f"{', '.join(t.name for t in TENSOR_TYPES)}."
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    model_type = config.pop("model_type")
    transformers.AutoConfig.for_model(model_type, **config).save_pretrained(str(out_dir))
    config["model_type"] = model_type

    # Streamed: the header is planned from shapes, then each tensor is dequantized, written and
    # dropped, so host memory holds one tensor at a time.
    entries = [(_hf_name(t.name), tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors]
    with open(out_dir / "model.safetensors", "wb") as f:
        f.write(_safetensors_header(entries))
        for t in reader.tensors:
            w = _to_hf_layout(t.name, dequantize(t), arch, config)
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
            del w

    if _field(reader, "tokenizer.ggml.model") is not None:
        _convert_tokenizer(gguf_path, out_dir)
    source = {"gguf": str(gguf_path), "architecture": arch, "size": gguf_path.stat().st_size}
    (out_dir / _DONE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def _convert_tokenizer(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    # transformers rebuilds a fast tokenizer (vocabulary, merges, pre-tokenizer, special tokens and
    # chat template) from the GGUF metadata; saved as tokenizer.json it loads in milliseconds.
    try:
        hf = transformers.AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as e:
        raise ValueError(f"Could not convert the tokenizer in {gguf_path}: {e!r}") from e
    hf.save_pretrained(str(out_dir))
