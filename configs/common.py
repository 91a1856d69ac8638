"""Shared config pieces: argument parsing for variants, model and mesh presets, the base config.

Every key the library reads is defined in `base_config()`; experiment files override values, never
add keys (ml_collections then rejects typos given on the command line).
"""

from __future__ import annotations

import ml_collections

# Architectures of the Hugging Face checkpoints we train from. When `model.init_from` points at a
# local directory its config.json is authoritative; the preset names the checkpoint to download
# and gives the shapes for from-scratch runs.
MODEL_PRESETS = {
    "tiny": dict(
        hf_repo="",
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        hf_repo="Qwen/Qwen2.5-0.5B-Instruct",
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hf_repo="Qwen/Qwen2.5-1.5B-Instruct",
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hf_repo="Qwen/Qwen2.5-7B-Instruct",
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        hf_repo="Qwen/Qwen2.5-14B-Instruct",
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=48,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "qwen3-4b": dict(
        hf_repo="Qwen/Qwen3-4B",
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        hf_repo="Qwen/Qwen3-8B",
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
}

# (data, fsdp, tensor); -1 takes the remaining devices.
MESH_PRESETS = {
    "single": (1, 1, 1),
    "dp": (-1, 1, 1),
    "fsdp": (1, -1, 1),
    "fsdp_tp": (1, -1, 4),
}


def parse_arg(arg: str | None, **spec):
    """Parses `key=value,flag` (the part after `:` in `--config=configs/x.py:...`).

    `spec` gives each allowed key with its default; the default's type converts the value. A bare
    `flag` sets a bool key to True. Unknown keys raise, naming the allowed ones.
    """
    values = ml_collections.ConfigDict(dict(spec))
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in spec:
            raise ValueError(
                f"Unknown config argument {key!r}; allowed: {', '.join(sorted(spec)) or 'none'}."
            )
        default = spec[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
            values[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Config argument {key}={value!r} is not a bool.")
            values[key] = value.lower() in ("true", "1")
        elif default is None:
            values[key] = value
        else:
            values[key] = type(default)(value)
    return values


def model_config(preset: str) -> ml_collections.ConfigDict:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {preset!r}; known: {', '.join(MODEL_PRESETS)}.")
    c = ml_collections.ConfigDict(MODEL_PRESETS[preset])
    c.preset = preset
    c.init_from = ""  # local Hugging Face directory (config.json + *.safetensors)
    c.tokenizer = ""  # local tokenizer directory; defaults to init_from
    c.dtype = "bfloat16"
    return c


def mesh_config(preset: str) -> ml_collections.ConfigDict:
    if preset not in MESH_PRESETS:
        raise ValueError(f"Unknown mesh preset {preset!r}; known: {', '.join(MESH_PRESETS)}.")
    data, fsdp, tensor = MESH_PRESETS[preset]
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
