"""Policy models: NNX transformer, Hugging Face weight import/export, tokenizer."""

from toolr1_jax.models.model import KVCache, ModelConfig, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
