"""Hugging Face checkpoints <-> NNX `Transformer`: streaming safetensors import and export.

`load_pretrained` builds the model abstractly and fills it one tensor at a time, each placed
straight into its target sharding, so host memory holds the model about once. `save_pretrained`
writes `config.json` and (optionally sharded) safetensors that transformers loads unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers
from flax import nnx
from jax.experimental import multihost_utils

from toolr1_jax import sharding
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import sources

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
# Tensors some checkpoints carry that the forward pass does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and where it lives in the NNX model."""

    hf_name: str
    path: tuple[str | int, ...]  # attribute path of the nnx.Param in `Transformer`
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _plain(hf_name, path, shape) -> _Tensor:
    return _Tensor(hf_name, path, shape, lambda x: x, lambda x: x)


def _dense(hf_name, path, out_dim, in_dim) -> _Tensor:
    """HF linear weight [out, in] <-> ours [in, out]."""
    return _Tensor(hf_name, path, (out_dim, in_dim), lambda x: x.T, lambda x: x.T)


def _heads_in(hf_name, path, heads, h, d) -> _Tensor:
    """q/k/v projection: HF [heads * H, D] <-> ours [D, heads, H]."""
    return _Tensor(
        hf_name,
        path,
        (heads * h, d),
        lambda x: x.T.reshape(d, heads, h),
        lambda x: x.reshape(d, heads * h).T,
    )


def _heads_out(hf_name, path, n, h, d) -> _Tensor:
    """o projection: HF [D, N * H] <-> ours [N, H, D]."""
    return _Tensor(
        hf_name, path, (d, n * h), lambda x: x.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T
    )


def _bias(hf_name, path, heads, h) -> _Tensor:
    """q/k/v bias: HF [heads * H] <-> ours [heads, H]."""
    return _Tensor(
        hf_name, path, (heads * h,), lambda x: x.reshape(heads, h), lambda x: x.reshape(heads * h)
    )


def tensor_map(config: model_lib.ModelConfig) -> list[_Tensor]:
    """Every parameter of `Transformer(config)` with its HF name, HF shape and layout transforms."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    out = [_plain("model.embed_tokens.weight", ("embed_vd",), (v, d))]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        attn = (*ours, "attn")
        out += [
            _heads_in(hf + "self_attn.q_proj.weight", (*attn, "wq_dnh"), n, h, d),
            _heads_in(hf + "self_attn.k_proj.weight", (*attn, "wk_dkh"), k, h, d),
            _heads_in(hf + "self_attn.v_proj.weight", (*attn, "wv_dkh"), k, h, d),
            _heads_out(hf + "self_attn.o_proj.weight", (*attn, "wo_nhd"), n, h, d),
        ]
        if config.qkv_bias:
            out += [
                _bias(hf + "self_attn.q_proj.bias", (*attn, "bq_nh"), n, h),
                _bias(hf + "self_attn.k_proj.bias", (*attn, "bk_kh"), k, h),
                _bias(hf + "self_attn.v_proj.bias", (*attn, "bv_kh"), k, h),
            ]
        if config.qk_norm:
            out += [
                _plain(hf + "self_attn.q_norm.weight", (*attn, "q_norm", "scale"), (h,)),
                _plain(hf + "self_attn.k_norm.weight", (*attn, "k_norm", "scale"), (h,)),
            ]
        out += [
            _plain(hf + "input_layernorm.weight", (*ours, "attn_norm", "scale"), (d,)),
            _plain(hf + "post_attention_layernorm.weight", (*ours, "mlp_norm", "scale"), (d,)),
            _dense(hf + "mlp.gate_proj.weight", (*ours, "mlp", "w_gate_df"), f, d),
            _dense(hf + "mlp.up_proj.weight", (*ours, "mlp", "w_up_df"), f, d),
            _dense(hf + "mlp.down_proj.weight", (*ours, "mlp", "w_down_fd"), d, f),
        ]
    out.append(_plain("model.norm.weight", ("final_norm", "scale"), (d,)))
    if not config.tie_word_embeddings:
        out.append(_dense("lm_head.weight", ("lm_head_dv",), v, d))
    return out


def _get_param(model: nnx.Module, path) -> nnx.Variable:
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------


def read_config(path) -> model_lib.ModelConfig:
    """Reads the architecture of a local HF directory, GGUF file or named model (see
    `sources.resolve`), rejecting what the model cannot represent."""
    path = sources.resolve(path)
    config_file = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"Model directory {str(path)!r} does not exist.")
    if not config_file.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in model directory {str(path)!r}.")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    model_type = raw.get("model_type")
    if model_type not in model_lib.SUPPORTED_MODEL_TYPES:
        # Checked before AutoConfig, whose error for unknown types does not say what we support.
        raise ValueError(
            f"Unsupported model_type {model_type!r} in {config_file}; supported model types are "
            f"{', '.join(model_lib.SUPPORTED_MODEL_TYPES)}."
        )
    hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    c = hf_config.to_dict()
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (only 'silu')")
    if c.get("mlp_bias"):
        problems.append("mlp_bias=True")
    if model_type != "qwen2" and c.get("attention_bias"):
        problems.append("attention_bias=True (o_proj bias is not implemented)")
    if c.get("use_sliding_window"):
        problems.append("use_sliding_window=True")
    layer_types = set(c.get("layer_types") or ())
    if layer_types - {"full_attention"}:
        problems.append(f"layer_types {sorted(layer_types)} (only 'full_attention')")
    if problems:
        raise ValueError(f"Unsupported settings in {config_file}: {'; '.join(problems)}.")
    return model_lib.ModelConfig.from_hf(hf_config)


def _weight_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from e
        files = {name: path / fname for name, fname in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} lists files that do not exist: {missing}.")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(
            f"No {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file in {str(path)!r}."
        )
    files = {}
    for shard in shards:
        for name in _open(shard, lambda f: list(f.keys())):
            if name in files:
                raise ValueError(f"Tensor {name!r} is in both {files[name]} and {shard}.")
            files[name] = shard
    return files


def _open(file: pathlib.Path, fn):
    # A fresh handle per call: safetensors memory-maps the file, and mapped pages that were read
    # count towards RSS until unmapped, which would hold a second copy of the model on the host.
    try:
        with safetensors.safe_open(str(file), framework="numpy") as f:
            return fn(f)
    except safetensors.SafetensorError as e:
        raise ValueError(f"Corrupt or unreadable safetensors file {file}: {e}") from e


def load_pretrained(
    path, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None
) -> tuple[model_lib.Transformer, model_lib.ModelConfig]:
    """Loads a local checkpoint as `(Transformer, ModelConfig)`.

    Args:
      path: a Hugging Face directory with `config.json` and `model.safetensors` (or shards plus
        `model.safetensors.index.json`), a GGUF file (or a directory holding one), or a named
        model such as "smollm2-135m-instruct"; GGUF is converted once and cached.
      dtype: parameter (and compute) dtype; tensors are cast while streaming.
      mesh: when given, each parameter is placed with the sharding `toolr1_jax.sharding` rules
        imply; otherwise on the default device.
    """
    path = sources.resolve(path)
    config = read_config(path)
    files = _weight_files(path)
    expected = tensor_map(config)
    expected_names = {t.hf_name for t in expected}

    missing = [t.hf_name for t in expected if t.hf_name not in files]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ValueError(f"Checkpoint {str(path)!r} is missing tensors: {shown}.")
    unexpected = sorted(
        name
        for name in files
        if name not in expected_names
        and not name.endswith(_IGNORED_SUFFIXES)
        # Tied checkpoints sometimes store the (identical) output projection anyway.
        and not (config.tie_word_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise ValueError(
            f"Checkpoint {str(path)!r} has tensors this {config.model_type} config does not use "
            f"(unsupported architecture variant?): {', '.join(unexpected[:8])}."
        )

    np_dtype = jnp.dtype(dtype)  # also accepts names such as "bfloat16"
    model = nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0), dtype=np_dtype))
    for t in expected:
        param = _get_param(model, t.path)
        array = _open(files[t.hf_name], lambda f, name=t.hf_name: f.get_tensor(name))
        if tuple(array.shape) != t.hf_shape:
            raise ValueError(
                f"Tensor {t.hf_name!r} in {files[t.hf_name]} has shape {tuple(array.shape)}, "
                f"but config.json implies {t.hf_shape}."
            )
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"Tensor {t.hf_name!r} has non-float dtype {array.dtype}.")
        array = t.to_ours(array.astype(np_dtype, copy=False))
        if mesh is None:
            placed = jax.device_put(array)
        else:
            spec = sharding.logical_to_spec(param.get_metadata("logical_axes"), array.shape, mesh)
            placed = jax.device_put(array, jax.sharding.NamedSharding(mesh, spec))
        del array  # so at most one host tensor is alive at a time
        param.set_value(placed)
    return model, config


# ---------------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------------


def hf_config_dict(config: model_lib.ModelConfig, dtype) -> dict:
    """transformers config fields for `config` (what `save_pretrained` writes to config.json)."""
    if config.qkv_bias and config.model_type != "qwen2":
        raise ValueError(
            f"Cannot export {config.model_type} with qkv_bias: transformers ties it to an o_proj "
            "bias this model does not have."
        )
    if config.qk_norm != (config.model_type == "qwen3"):
        raise ValueError(f"qk_norm={config.qk_norm} cannot be expressed as {config.model_type}.")
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, **dict(config.rope_scaling)}
    eos = list(config.eos_token_ids)
    return dict(
        architectures=[_ARCHITECTURES[config.model_type]],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rope_parameters=rope,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=None if not eos else eos[0] if len(eos) == 1 else eos,
        dtype=np.dtype(dtype).name,
    )


def _to_host(value: jax.Array) -> np.ndarray:
    if not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value)


def save_pretrained(
    model: model_lib.Transformer,
    config: model_lib.ModelConfig,
    path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> pathlib.Path:
    """Writes `model` as a Hugging Face checkpoint directory (config.json + safetensors).

    Above `max_shard_bytes` the weights are split into `model-0000i-of-0000n.safetensors` files
    with `model.safetensors.index.json`. Shards are fetched and written one at a time, so host
    memory holds at most one shard. In a multi-host run every process must call this (arrays are
    gathered collectively); only process 0 writes.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    path = pathlib.Path(path)
    dtype = model.embed_vd.get_value().dtype
    hf_dict = hf_config_dict(config, dtype)
    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        # Weights left by an earlier save with another shard count would shadow or mix with ours.
        for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
            stale.unlink(missing_ok=True)
        hf_config = transformers.AutoConfig.for_model(config.model_type, **hf_dict)
        hf_config.save_pretrained(str(path))

    # Plan shards from shapes alone, so no tensor is fetched before its shard is written.
    tensors = tensor_map(config)
    shards: list[list[_Tensor]] = [[]]
    shard_bytes = 0
    for t in tensors:
        nbytes = math.prod(t.hf_shape) * np.dtype(dtype).itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(t)
        shard_bytes += nbytes

    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for fname, shard in zip(names, shards, strict=True):
        arrays = {
            t.hf_name: np.ascontiguousarray(t.to_hf(_to_host(_get_param(model, t.path)[...])))
            for t in shard
        }
        if writer:
            safetensors.numpy.save_file(arrays, str(path / fname), metadata={"format": "pt"})
        del arrays
    if writer and len(shards) > 1:
        total = sum(math.prod(t.hf_shape) * np.dtype(dtype).itemsize for t in tensors)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {
                t.hf_name: fname for fname, shard in zip(names, shards, strict=True) for t in shard
            },
        }
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path
