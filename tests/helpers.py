"""Test fixtures shared across test files: tiny Hugging Face model and ChatML tokenizer dirs,
and a compilation counter.

Both are built from scratch and saved locally (tests never touch the network), in exactly the
formats real checkpoints use, so they go through the same loading code as production weights.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from toolr1_jax.models import model as model_lib
from toolr1_jax.models import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Special token ids of the tokenizer below; the model fixtures use them for eos/pad.
ENDOFTEXT_ID = 0
IM_START_ID = 1
IM_END_ID = 2
SPECIAL_TOKENS = tokenizer_lib.CHATML_SPECIAL_TOKENS

CHATML_TEMPLATE = tokenizer_lib.CHATML_TEMPLATE

# Text the byte-level BPE merges are learned from: the shapes a code agent reads and writes.
DEFAULT_CORPUS = (
    "You are a helpful agent. Solve the task by writing Python code.",
    "Thought: I will compute the answer with Python.\n<code>\nx = 21 * 2\nprint(x)\n</code>",
    "Observation:\n42\n",
    "Thought: I have the answer.\n<code>\nfinal_answer(42)\n</code>",
    "What is the capital of France? The answer is Paris.",
    "system user assistant",
    "def f(a, b):\n    return a + b\n\nresult = f(1, 2)\nprint(result)",
    "import math\nprint(math.sqrt(16))\nfor i in range(10):\n    print(i)",
)

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    # Larger than the default 0.02 so logits are far from uniform and mapping bugs show.
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=IM_END_ID,
    pad_token_id=ENDOFTEXT_ID,
)

# Per family: what makes it different from the others, so each test exercises that path.
_FAMILY = {
    "qwen2": dict(
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    # Explicit head_dim != hidden_size // num_heads, and q/k norms.
    "qwen3": dict(
        head_dim=24,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Llama 3 RoPE scaling and tied embeddings.
    "llama": dict(
        head_dim=16,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


def tiny_model_config(**overrides) -> model_lib.ModelConfig:
    """A one-layer Qwen2-style config for tests that need a model but not its quality;
    `overrides` replace any field."""
    fields = dict(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        qkv_bias=True,
    )
    return model_lib.ModelConfig(**{**fields, **overrides})


def left_padded_batch(vocab_size: int, seed: int = 0, pad_id: int = ENDOFTEXT_ID):
    """Random tokens [3, 12] for parity tests; row 1 is left-padded by 5, row 2 by 11 (a single
    real token). Returns (tokens, attention mask, positions) as int64 numpy arrays."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :5] = 0
    mask[2, :11] = 0
    tokens[mask == 0] = pad_id
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def hf_logits(hf_model, tokens, mask, positions) -> np.ndarray:
    """A transformers model's logits [B, T, V] for a batch from `left_padded_batch`."""
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


def our_logits(model, tokens, mask, positions) -> np.ndarray:
    """A `Transformer`'s logits [B, T, V] for the same batch."""
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), attn_mask=jnp.asarray(mask))
    return np.asarray(logits)


def make_hf_config(model_type: str = "qwen2", **overrides) -> transformers.PretrainedConfig:
    """A tiny transformers config of the given family; `overrides` replace any config field."""
    if model_type not in _FAMILY:
        raise ValueError(f"No tiny preset for model_type {model_type!r}; have {sorted(_FAMILY)}.")
    kwargs = {**_TINY, **_FAMILY[model_type], **overrides}
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def make_hf_model(model_type: str = "qwen2", *, seed: int = 0, **overrides):
    """A tiny random float32 transformers causal LM with perturbed norms and biases.

    Norm scales start at 1 and biases at 0 in transformers; both are perturbed so a loader that
    drops or misplaces them fails the parity tests.
    """
    config = make_hf_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_hf_model_dir(
    tmp_path,
    model_type: str = "qwen2",
    *,
    seed: int = 0,
    max_shard_size: int | str | None = None,
    name: str | None = None,
    **overrides,
) -> pathlib.Path:
    """Saves a tiny random model (see `make_hf_model`) with transformers; returns the directory.

    Args:
      tmp_path: parent directory (pytest's `tmp_path`).
      model_type: "qwen2", "qwen3" or "llama".
      seed: torch seed for the weights.
      max_shard_size: e.g. "100KB" to write several safetensors files plus an index.
      name: sub-directory name; defaults to the model type.
      **overrides: config fields, e.g. `num_hidden_layers=1, vocab_size=384`.
    """
    path = pathlib.Path(tmp_path) / (name or f"{model_type}_model")
    model = make_hf_model(model_type, seed=seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def make_chatml_tokenizer_dir(
    tmp_path,
    vocab_size: int = 384,
    *,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    name: str = "chatml_tokenizer",
) -> pathlib.Path:
    """Trains a tiny byte-level BPE tokenizer with ChatML special tokens and a chat template.

    Any text encodes (all 256 bytes are in the vocabulary). Ids: `<|endoftext|>` = 0,
    `<|im_start|>` = 1, `<|im_end|>` = 2 (the eos token); the total size is at most `vocab_size`,
    so it fits the model fixtures' default vocab of 512.
    """
    path = pathlib.Path(tmp_path) / name
    return tokenizer_lib.train_chatml_tokenizer(corpus, vocab_size, path)


def train_cmd(config: str, workdir, data_dir, *overrides) -> list[str]:
    """`python train.py --config=configs/<config>` on `workdir` (e.g. config="gaia.py:debug"),
    reading datasets from `data_dir`, without a progress bar."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config=" + str(ROOT / "configs" / config),
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.log.progress_bar=false",
        *overrides,
    ]


@contextlib.contextmanager
def backend_compiles() -> Iterator[list[float]]:
    """Collects the duration of every XLA backend compilation in the process while open."""
    durations: list[float] = []

    def on_duration(event: str, duration_s: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            durations.append(duration_s)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield durations
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
