"""The GRPO update at a real model's size fits its memory bound on the CI machine.

SmolLM2-135M's dimensions (30 layers, D 576, V 49,152), random weights, float32, B8 x 1024 tokens.
Without per-block rematerialisation (and XLA:CPU's memory-aware scheduler, set on import of
toolr1_jax) the backward kept every layer's [B, K, G, T, T] attention scores: 40 GB of
temporaries. The bound: 4 GB beyond parameters and optimizer state.

One micro-batch is the hard case: XLA removes a one-trip accumulation loop, and in the flat
program that leaves, global-norm clipping let the CPU scheduler keep every layer's recomputed
activations alive (15 GiB). The update keeps its loop (`update._loop_over_microbatches`); both
counts are compiled and checked, and the one-micro-batch step runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolr1_jax import update
from toolr1_jax.models import model as model_lib

SMOLLM2_DIMS = model_lib.ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
LOSS = update.LossConfig(
    clip_low=0.2,
    clip_high=0.28,
    is_cap=2.0,
    beta=0.0,
    kl_estimator="k3",
    aggregation="token_mean",
    temperature=1.0,
)
B, T = 8, 1024
BOUND_BYTES = 4 * 2**30


@pytest.mark.parametrize("num_microbatches", [2, 1])
def test_smollm2_size_update_runs_within_its_memory_bound(num_microbatches):
    model = model_lib.Transformer(SMOLLM2_DIMS, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    optimizer = update.make_optimizer(1e-5, 0, 10, 0.0, 1.0)  # no warmup: step 0 moves
    opt_state = optimizer.init(state)
    step = update.make_train_step(graphdef, optimizer, LOSS, num_microbatches=num_microbatches)

    rng = np.random.default_rng(0)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, 256:] = 1.0
    batch = update.Batch(
        tokens=jnp.asarray(rng.integers(3, SMOLLM2_DIMS.vocab_size, (B, T)), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
        attn_mask=jnp.ones((B, T), bool),
        loss_mask=jnp.asarray(loss_mask),
        behaviour_logprobs=jnp.asarray(-rng.uniform(8.0, 13.0, (B, T)) * loss_mask, jnp.float32),
        advantages=jnp.asarray(rng.normal(size=B), jnp.float32),
    )
    compiled = step.lower(state, opt_state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < BOUND_BYTES, f"{temp / 2**30:.2f} GiB of temporaries"
    if num_microbatches > 1:
        return  # compiled and bounded; one run (below, one micro-batch) is enough for CI

    before = jax.tree.map(np.asarray, state)
    state, opt_state, metrics = compiled(state, opt_state, batch, None)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state, before)
    assert max(jax.tree.leaves(moved)) > 0  # the step updated the parameters
