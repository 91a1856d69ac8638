"""Training checkpoints: the only module that imports orbax.

A checkpoint is two items: `state`, a pytree of arrays (params, optimizer state, the queue's device
arrays, the RNG key), and `meta`, a JSON dict of host state (step, data position, question
statistics, counters). Saving is asynchronous; the last `max_to_keep` checkpoints are kept, and
those of `keep_steps`.
With several processes every one saves and restores (arrays must be global: each writes its own
shards) and orbax lets process 0 alone write the JSON and commit markers.
Restoring walks back from the newest step until one restores cleanly, so a checkpoint that a crash
left partial or that was corrupted later costs one save interval, never the run. A checkpoint of
other shapes than the run's (its config changed) is not corrupt: that stops the restore, naming
what differs, and moves nothing. Another run's checkpoints (`ckpt.resume_from`) are only read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from toolr1_jax import sharding

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class ShapeMismatchError(CheckpointError):
    """A checkpoint written by a run of other shapes: the config changed, nothing is corrupt."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints of a run under `directory`, and those of
    `keep_steps` (the trainer keeps step 0 after cold-start SFT, the start of GRPO ablations)."""

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        keep_steps: Sequence[int] = (),
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(max_to_keep),
                ocp.checkpoint_managers.CustomSteps(list(keep_steps)),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save; arrays are copied before this returns."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore_latest(self, like_state: Any) -> tuple[int, Any, dict] | None:
        """Restores the newest checkpoint that loads cleanly; None when there is none.

        `like_state` gives the structure, shapes, dtypes and shardings to restore into (arrays
        or `jax.ShapeDtypeStruct`s).
        """
        self._manager.reload()
        steps = self.all_steps()
        for i, step in enumerate(reversed(steps)):
            _check_shapes(self.directory, step, like_state)  # raises: no fallback, no set-aside
            try:
                state, meta = self._restore_step(self._manager, step, like_state)
            except Exception as e:  # noqa: BLE001  any failure means this checkpoint is unusable
                older = steps[: len(steps) - i - 1]
                kept = self._set_aside(step)
                log.warning(
                    "Checkpoint at step %d in %s is corrupt or incomplete (%s: %s); moved it to "
                    "%s; %s",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                    kept,
                    f"falling back to step {older[-1]}." if older else "no older checkpoint.",
                )
                continue
            return step, state, meta
        return None

    def _set_aside(self, step: int) -> str:
        """Renames a bad step's folder so the step can be saved again; kept for inspection.

        With several processes, process 0 renames it once all have given up on it, and none
        looks at the directory again before the rename is done.
        """
        sharding.sync_processes(f"checkpoint_{step}_unusable")
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, f"corrupt_step_{step}")
        suffix = 0
        while os.path.exists(dst):
            suffix += 1
            dst = os.path.join(self.directory, f"corrupt_step_{step}.{suffix}")
        if jax.process_index() == 0:
            os.rename(src, dst)
        sharding.sync_processes(f"checkpoint_{step}_set_aside")
        self._manager.reload()
        return dst

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    @staticmethod
    def _restore_step(manager, step: int, like_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like_state)), meta=ocp.args.JsonRestore()
        )
        restored = manager.restore(step, args=args)
        return restored.state, restored.meta


def _check_shapes(directory: str, step: int, like_state: Any) -> None:
    """Raises ShapeMismatchError when a saved step's arrays differ in shape from `like_state`'s,
    naming the top-level entries that differ (params, opt_state, queue, ...). A step whose
    metadata does not read passes: its restore fails and it counts as corrupt."""
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            saved = checkpointer.metadata(os.path.join(directory, str(step), "state"))
        saved = dict(saved.item_metadata.tree)
    except Exception:  # noqa: BLE001
        return

    def shapes(tree):
        return sorted(tuple(x.shape) for x in jax.tree.leaves(tree))

    differ = [
        k
        for k in sorted(saved.keys() | like_state.keys())
        if shapes(saved.get(k)) != shapes(like_state.get(k))
    ]
    if differ:
        raise ShapeMismatchError(
            f"The checkpoint at step {step} in {directory} was written by a run of other shapes "
            f"({', '.join(differ)}): the config changed (the model; or for the queue the GRPO "
            "question pool: data.num_train, data.grpo_levels, sft.*). Resume with the config it "
            "was written with, or start in another workdir (ckpt.resume_from=<its step 0> takes "
            "only the weights)."
        )


def _locate(path: str) -> tuple[str, int]:
    """(checkpoint directory, step) of `ckpt.resume_from`: a step's folder, or a run's
    checkpoint directory (its newest committed step)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"ckpt.resume_from={path!r} is not a directory.")
    name = os.path.basename(path.rstrip("/"))
    if name.isdigit():
        return os.path.dirname(path), int(name)
    manager = ocp.CheckpointManager(path)
    try:
        steps = manager.all_steps()
    finally:
        manager.close()
    if not steps:
        raise CheckpointError(f"ckpt.resume_from={path!r} holds no checkpoint.")
    return path, max(steps)


def step_of(path: str) -> int:
    """The step that `restore_from(path, ...)` restores."""
    return _locate(path)[1]


def restore_from(path: str, like_state: Any) -> tuple[int, Any, dict]:
    """Restores another run's checkpoint (`_locate` says which step). Read only: a checkpoint
    that does not load raises CheckpointError and stays where it is (another run's files are
    never set aside)."""
    directory, step = _locate(path)
    _check_shapes(directory, step, like_state)
    manager = ocp.CheckpointManager(directory)
    try:
        state, meta = Checkpointer._restore_step(manager, step, like_state)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"Could not restore step {step} of {directory!r}: {e}") from e
    finally:
        manager.close()
    return step, state, meta


def restore_params_from(path: str, like_params: Any) -> tuple[int, Any]:
    """Only the `params` of another run's checkpoint: the rest of its state is not read, so it
    may have any shapes (another question pool's queue, say)."""
    directory, step = _locate(path)
    like = {"params": _abstract(like_params)}
    args = ocp.args.PyTreeRestore(
        like, restore_args=ocp.checkpoint_utils.construct_restore_args(like), partial_restore=True
    )
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(os.path.join(directory, str(step), "state"), args=args)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"Could not restore the params of step {step} of {directory!r}: {e}"
        ) from e
    return step, restored["params"]
