"""Policy models: NNX transformer, Hugging Face and GGUF weight import, export, tokenizer."""

from toolr1_jax.models import sources
from toolr1_jax.models.model import KVCache, ModelConfig, Transformer
from toolr1_jax.models.params import load_pretrained, save_pretrained
from toolr1_jax.models.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "sources",
]
