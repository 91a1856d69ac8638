"""toolr1_jax: Tool-R1 (code agent, GRPO, dynamic sample queue) in JAX."""
