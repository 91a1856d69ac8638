import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toolr1_jax import checkpoint


def _state(step):
    return {
        "params": {"w": jnp.arange(12.0).reshape(3, 4) * step, "b": jnp.ones(4) + step},
        "rng": jax.random.key_data(jax.random.key(step)),
        "queue": {"tokens": jnp.full((2, 5), step, jnp.int32)},
    }


def _assert_tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_keeps_last_n(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step, "data": {"position": 7 * step}})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    step, state, meta = ckpt.restore_latest(_state(0))
    ckpt.close()
    assert step == 3
    assert meta == {"step": 3, "data": {"position": 21}}
    _assert_tree_equal(state, _state(3))


def test_keep_steps_survive_the_last_n(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, keep_steps=(0,))
    for step in range(5):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [0, 3, 4]
    ckpt.close()
    # A resume reads the newest; step 0 restores on its own (as `ckpt.resume_from` does).
    step, _, _ = checkpoint.Checkpointer(str(tmp_path / "ckpt")).restore_latest(_state(0))
    assert step == 4
    step, state, meta = checkpoint.restore_from(str(tmp_path / "ckpt" / "0"), _state(0))
    assert (step, meta) == (0, {"step": 0})
    _assert_tree_equal(state, _state(0))


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()
    # Damage every array file of the newest checkpoint.
    for root, _, files in os.walk(directory / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")

    ckpt = checkpoint.Checkpointer(str(directory))
    with caplog.at_level(logging.WARNING):
        step, state, meta = ckpt.restore_latest(_state(0))
    assert step == 1 and meta == {"step": 1}
    _assert_tree_equal(state, _state(1))
    assert "step 2" in caplog.text and "falling back to step 1" in caplog.text
    # The bad checkpoint is kept aside, and its step can be written again.
    assert (directory / "corrupt_step_2").is_dir()
    ckpt.save(2, _state(7), {"step": 2})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore_latest(_state(0))[2] == {"step": 2}
    ckpt.close()


def test_partial_latest_is_skipped(tmp_path):
    directory = tmp_path / "ckpt"
    ckpt = checkpoint.Checkpointer(str(directory))
    ckpt.save(5, _state(5), {"step": 5})
    ckpt.save(6, _state(6), {"step": 6})
    ckpt.close()
    # A save interrupted half way: the state item is gone.
    import shutil

    shutil.rmtree(directory / "6" / "state")
    step, _, _ = checkpoint.Checkpointer(str(directory)).restore_latest(_state(0))
    assert step == 5


def test_empty_directory_restores_nothing(tmp_path):
    assert checkpoint.Checkpointer(str(tmp_path / "none")).restore_latest(_state(0)) is None


def test_restore_from_other_run(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run1"))
    ckpt.save(4, _state(4), {"step": 4})
    ckpt.close()
    step, state, _ = checkpoint.restore_from(str(tmp_path / "run1"), _state(0))
    assert step == 4
    _assert_tree_equal(state, _state(4))
    step, state, _ = checkpoint.restore_from(str(tmp_path / "run1" / "4"), _state(0))
    assert step == 4
    with pytest.raises(checkpoint.CheckpointError, match="not a directory"):
        checkpoint.restore_from(str(tmp_path / "missing"), _state(0))


def test_restore_params_from_reads_only_the_params(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run1"))
    ckpt.save(0, _state(3), {"step": 0})
    ckpt.close()
    assert checkpoint.step_of(str(tmp_path / "run1")) == 0
    # The rest of the state may have other shapes (another question pool's queue).
    other = {**_state(0), "queue": {"tokens": jnp.zeros((9, 5), jnp.int32)}}
    step, params = checkpoint.restore_params_from(str(tmp_path / "run1" / "0"), other["params"])
    assert step == 0
    _assert_tree_equal(params, _state(3)["params"])
    # A full restore into those shapes fails naming the queue, and moves nothing aside.
    with pytest.raises(checkpoint.ShapeMismatchError, match=r"step 0 .*\(queue\)"):
        checkpoint.restore_from(str(tmp_path / "run1"), other)
    assert sorted(os.listdir(tmp_path / "run1")) == ["0"]
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.step_of(str(tmp_path))


def test_a_changed_config_is_not_taken_for_a_corrupt_checkpoint(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    for step in (1, 2):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()
    # The run comes back with a config whose queue is larger: every step would fail to load.
    # That is said, and no checkpoint is set aside or skipped.
    other = {**_state(0), "queue": {"tokens": jnp.zeros((9, 5), jnp.int32)}}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with pytest.raises(checkpoint.ShapeMismatchError, match=r"step 2 .*\(queue\).*config"):
        ckpt.restore_latest(other)
    assert ckpt.all_steps() == [1, 2]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]
    assert ckpt.restore_latest(_state(0))[0] == 2
    ckpt.close()
