r"""Trains a Tool-R1 policy with GRPO and the dynamic sample queue.

  python train.py --config=configs/gaia.py --workdir=/tmp/toolr1_gaia
  python train.py --config=configs/gaia.py:debug --workdir=/tmp/toolr1_debug

Any config key can be overridden on the command line, e.g. `--config.grpo.group_size=16`.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from toolr1_jax import build, checkpoint, trainer

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    d = config.distributed
    if d.enabled:
        # Cross-process collectives between CPU devices (tests, CPU clusters) go through gloo,
        # JAX's default here; named so that a change of default cannot silently drop them.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Before anything touches a device: every process joins the same global mesh.
        jax.distributed.initialize(
            coordinator_address=d.coordinator_address or None,
            num_processes=d.num_processes or None,
            process_id=d.process_id if d.process_id >= 0 else None,
        )
    logging.info(
        "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    try:
        trainer.train(config, os.path.expanduser(_WORKDIR.value))
    except build.ConfigError as e:
        raise app.UsageError(f"Bad config: {e}") from None
    except checkpoint.CheckpointError as e:  # e.g. a resume whose config no longer fits
        raise app.UsageError(f"Checkpoint: {e}") from None


if __name__ == "__main__":
    app.run(main)
