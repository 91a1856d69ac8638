"""The trainer end to end: `configs/gaia.py:debug` through `train.py`, exact resume after SIGKILL,
recovery from a corrupt checkpoint, progress a run without a terminal logs, a non-finite loss that
stops the run, a resume that needs no `model.init_from`, and config errors that fail before any
work."""

import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import gaia
from tests import helpers
from toolr1_jax import build, models, sft, trainer, update

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Wall-clock and compile metrics differ between runs; everything else must match exactly.
_NONDETERMINISTIC = ("time/", "throughput/", "compiles", "eval/wall_s", "eval/time/")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # Shared by every run in this file, so the synthetic suite is built once.
    return tmp_path_factory.mktemp("tfds")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(workdir, data_dir, *overrides, timeout=900):
    proc = subprocess.run(
        helpers.train_cmd("gaia.py:debug", workdir, data_dir, *overrides),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def _metrics(workdir):
    """Per step, the last logged value of every deterministic metric."""
    rows = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        step = d.pop("step")
        clean = {k: v for k, v in d.items() if not k.startswith(_NONDETERMINISTIC)}
        rows.setdefault(step, {}).update(clean)
    return rows


def _saved_state(workdir, step):
    """A run's checkpointed state at `step` as orbax restores it without a target (dicts)."""
    directory = pathlib.Path(workdir) / "checkpoints" / str(step)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory / "state")


def _final_state(workdir, step):
    """The params and queue arrays of a run's checkpoint at `step`, as numpy."""
    state = _saved_state(workdir, step)
    return jax.tree.map(np.asarray, {"params": state["params"], "queue": state["queue"]})


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
    """An uninterrupted 3-step debug run (the README's main job, shortened nothing)."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run(workdir, data_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Its log (stderr is a pipe here, not a terminal) for the progress test below.
    (workdir / "stderr.txt").write_text(proc.stderr)
    return workdir


def test_debug_config_trains_three_steps(reference_run):
    rows = _metrics(reference_run)
    assert sorted(rows) == [1, 2, 3]
    for step, metrics in rows.items():
        for key, value in metrics.items():
            assert math.isfinite(value), (step, key, value)
        assert metrics["samples/fresh_total"] > 0
    # No XLA compilation after the first step (the eval at the last step aside).
    compiles = {}
    for line in (reference_run / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "compiles" in d:
            compiles[d["step"]] = d["compiles"]
    assert compiles[1] > 0
    assert compiles[2] == 0 and compiles[3] == 0, compiles
    # Checkpoints, eval outputs and the Hugging Face export are written.
    assert sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir()) == [1, 2, 3]
    eval_dir = reference_run / "eval" / "step_3"
    for name in ("results.json", "trajectories.jsonl", "report.html"):
        assert (eval_dir / name).is_file()
    model, config = models.load_pretrained(reference_run / "export")
    assert config.vocab_size == 1024
    exported = jax.tree.leaves(nnx.split(model)[1])
    final = jax.tree.leaves(_final_state(reference_run, 3)["params"])
    assert len(exported) == len(final)
    for x, y in zip(exported, final, strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_each_step_saves_the_episodes_it_learned_from(reference_run):
    rows = _metrics(reference_run)
    for step in (1, 2, 3):
        path = reference_run / "rollouts" / f"step_{step}.jsonl"
        episodes = [json.loads(line) for line in path.read_text().splitlines()]
        m = rows[step]
        # The same episodes the step's metrics count: fresh, replayed and their mean reward.
        assert sum(not e["replayed"] for e in episodes) == m["samples/fresh"]
        assert sum(e["replayed"] for e in episodes) == m["samples/replayed"]
        assert np.mean([e["reward"] for e in episodes]) == pytest.approx(m["reward/mean"])
        for e in episodes:
            assert e["step"] == step and e["question"] and e["turns"]
            assert set(e["reward_components"]) >= {"answer"}
            assert 0 < e["num_sampled_tokens"] <= e["num_tokens"] - e["prompt_len"]
            # Fresh episodes come from the policy the step started with; replays from older ones.
            if e["replayed"]:
                assert e["policy_version"] < step - 1
            else:
                assert e["policy_version"] == step - 1


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, data_dir, reference_run):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        helpers.train_cmd("gaia.py:debug", workdir, data_dir),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it in the middle of step 2, once step 1's checkpoint is committed.
    committed = workdir / "checkpoints" / "1" / "commit_success.txt"
    deadline = time.monotonic() + 600
    while not committed.exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "checkpoints" / "3").exists()

    resumed = _run(workdir, data_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from workdir at step" in resumed.stderr
    _assert_trees_equal(_final_state(workdir, 3), _final_state(reference_run, 3))
    assert _metrics(workdir) == _metrics(reference_run)


def test_corrupt_latest_checkpoint_resumes_from_previous(tmp_path, data_dir, reference_run):
    workdir = tmp_path / "corrupt"
    shutil.copytree(reference_run, workdir)
    shutil.rmtree(workdir / "export")
    # Truncate every array file of the last checkpoint, then ask for the same 3 steps again.
    for root, _, files in os.walk(workdir / "checkpoints" / "3" / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(7)
    proc = _run(workdir, data_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3" in proc.stderr and "falling back to step 2" in proc.stderr
    assert "Resumed from workdir at step 2" in proc.stderr
    _assert_trees_equal(_final_state(workdir, 3), _final_state(reference_run, 3))


def test_a_resume_with_another_question_pool_says_so_and_keeps_the_checkpoints(
    tmp_path, data_dir, reference_run
):
    workdir = tmp_path / "changed"
    shutil.copytree(reference_run / "checkpoints", workdir / "checkpoints")
    proc = _run(workdir, data_dir, "--config.data.num_train=8", "--config.total_steps=4")
    assert proc.returncode != 0
    assert "written by a run of other shapes (queue)" in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]


def test_a_run_without_a_terminal_logs_each_step_and_queue_metrics(reference_run):
    log_text = (reference_run / "stderr.txt").read_text()
    for step in (1, 2, 3):
        line = next((x for x in log_text.splitlines() if f"step {step}/3: reward " in x), None)
        assert line is not None, log_text[-3000:]
        for figure in ("accuracy", "loss", "queue", "fresh", "replayed", "rollout", "update"):
            assert figure in line, line
    # The evaluation says when it starts and what it measured.
    assert "eval at step 3: 4 held-out questions" in log_text, log_text[-3000:]
    assert re.search(r"eval at step 3: accuracy \d\.\d{3} \(level_1 \d\.\d{3}", log_text)
    rows = _metrics(reference_run)
    for step in (1, 2, 3):
        queue = {k: v for k, v in rows[step].items() if k.startswith("queue/")}
        assert {"queue/entries", "queue/questions_tried_frac"} <= set(queue), rows[step]
    # Four questions a step, new ones first: the share of questions tried grows.
    assert rows[1]["queue/questions_tried_frac"] > 0


def _debug_config(data_dir, **overrides):
    """configs/gaia.py:debug for an in-process run: no eval, no export."""
    config = gaia.get_config("debug")
    config.data.data_dir = str(data_dir)
    config.log.progress_bar = False
    config.log.eval_every_steps = 0
    config.ckpt.export_hf = False
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


def _poison_step(monkeypatch, at_call):
    """Makes the trainer's update step diverge at its `at_call`-th call: NaN params and loss."""
    real = update.make_train_step

    def make(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def diverging(state, opt_state, batch, ref_state=None):
            state, opt_state, metrics = step(state, opt_state, batch, ref_state)
            calls.append(None)
            if len(calls) == at_call:
                state = jax.tree.map(lambda x: x * np.nan, state)
                metrics = {**metrics, "loss": np.float32(np.nan)}
            return state, opt_state, metrics

        return diverging

    monkeypatch.setattr(update, "make_train_step", make)


def test_non_finite_loss_stops_the_run_and_the_resume_needs_no_init_from(
    tmp_path, data_dir, monkeypatch, caplog
):
    # A policy from a Hugging Face directory, which disappears after the first run.
    policy = helpers.make_hf_model_dir(tmp_path, name="policy", max_position_embeddings=1024)
    helpers.make_chatml_tokenizer_dir(tmp_path, name="policy")
    workdir = tmp_path / "run"
    config = _debug_config(data_dir, **{"model.init_from": str(policy), "model.dtype": "float32"})
    config.total_steps = 3

    # Step 2's loss is NaN: the run stops there, naming the step, the metric and step 1's
    # checkpoint, and nothing of step 2 reaches the disk.
    _poison_step(monkeypatch, at_call=2)
    with pytest.raises(update.NonFiniteError) as error:
        trainer.train(config, str(workdir))
    message = str(error.value)
    assert "GRPO step 2" in message and "loss is nan" in message, message
    assert str(workdir / "checkpoints" / "1") in message, message
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1]
    for x in jax.tree.leaves(_final_state(workdir, 1)):
        assert np.all(np.isfinite(x))
    rows = _metrics(workdir)
    assert sorted(rows) == [1]

    # The resume restores step 1 and trains on, with model.init_from gone.
    monkeypatch.undo()
    shutil.rmtree(policy)
    with caplog.at_level(logging.INFO):
        metrics = trainer.train(config, str(workdir))
    assert "Resumed from workdir at step 1" in caplog.text
    assert math.isfinite(metrics["update/loss"])
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2, 3]
    assert sorted(_metrics(workdir)) == [1, 2, 3]


def test_a_bfloat16_run_trains_on_float32_master_weights_and_resumes(tmp_path, data_dir, caplog):
    # configs/gaia.py's own dtype (its debug variant runs float32): the params stay bfloat16, the
    # checkpoint holds the optimizer's float32 master weights, each param is its master value
    # rounded, no step after the first compiles, and a resume carries on from them. (That the
    # master weights keep what bfloat16 cannot is update_test's: this tiny policy earns no
    # reward, so its gradients are zero.)
    workdir = tmp_path / "run"
    config = _debug_config(data_dir, **{"model.dtype": "bfloat16"})
    config.total_steps = 2
    trainer.train(config, str(workdir))
    compiles = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "compiles" in d:
            compiles[d["step"]] = d["compiles"]
    assert compiles[1] > 0 and compiles[2] == 0, compiles
    saved = _saved_state(workdir, 2)
    params, master = saved["params"], saved["opt_state"]["master"]
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(master), strict=True):
        assert p.dtype == jnp.bfloat16 and m.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))

    config.total_steps = 3
    with caplog.at_level(logging.INFO):
        metrics = trainer.train(config, str(workdir))
    assert "Resumed from workdir at step 2" in caplog.text
    assert math.isfinite(metrics["update/loss"])
    assert sorted(_metrics(workdir)) == [1, 2, 3]


# A cold-start SFT on 8 demonstrations before a one-step GRPO run (no warmup: one step).
_SHORT_SFT = {
    "sft.enabled": True,
    "sft.num_demos": 8,
    "sft.batch_size": 8,
    "sft.warmup_steps": 0,
    "optim.warmup_steps": 0,
}


def test_grpo_variants_start_from_another_runs_sft_result(tmp_path, data_dir, caplog):
    """`ckpt.resume_from=<run>/checkpoints/0` (a cold-start SFT result) hands over the weights:
    with the same settings the new run's first step is that run's exactly; with another seed
    and question pool (so another queue shape) it starts too; the other run's files stay."""
    sft_keys = {**_SHORT_SFT, "sft.num_steps": 2, "data.num_train": 16}
    first = tmp_path / "sft_run"
    config = _debug_config(data_dir, **sft_keys)
    config.total_steps = 1
    trainer.train(config, str(first))
    start = first / "checkpoints" / "0"
    assert start.is_dir()
    before = sorted(os.listdir(first / "checkpoints"))

    same = tmp_path / "same"
    config = _debug_config(data_dir, **sft_keys, **{"ckpt.resume_from": str(start)})
    config.total_steps = 1
    with caplog.at_level(logging.INFO):
        trainer.train(config, str(same))
    assert f"Starting GRPO from the weights of {start} (step 0)" in caplog.text
    assert not (same / "checkpoints" / "0").exists()  # no SFT ran
    assert _metrics(same)[1] == _metrics(first)[1]
    _assert_trees_equal(_final_state(same, 1), _final_state(first, 1))

    other = tmp_path / "other"
    overrides = {**sft_keys, "ckpt.resume_from": str(start), "data.num_train": 4}
    config = _debug_config(data_dir, **overrides)
    config.seed, config.total_steps = 1, 1
    trainer.train(config, str(other))
    assert sorted(_metrics(other)) == [1]
    # A queue of another capacity: 4 questions' rows against 16.
    queue_size = sum(x.size for x in jax.tree.leaves(_final_state(other, 1)["queue"]))
    assert queue_size < sum(x.size for x in jax.tree.leaves(_final_state(first, 1)["queue"]))
    assert sorted(os.listdir(first / "checkpoints")) == before


def test_grpo_is_not_asked_the_questions_sft_showed(tmp_path, data_dir):
    sft_keys = {**_SHORT_SFT, "sft.num_steps": 1}
    # A pool of 10: with SFT the first 10 questions it did not show; without, 8 of the 10 are
    # the demonstrations (the first questions of the split that have a solution).
    config = _debug_config(data_dir, **sft_keys, **{"data.num_train": 10})
    config.total_steps = 1
    examples = build.examples(config, config.data.train_split)
    shown = {e.task_id for e in sft.demo_examples(examples, config.sft.levels, 8)}
    assert len(shown) == 8

    def asked(workdir):
        path = workdir / "rollouts" / "step_1.jsonl"
        return {json.loads(line)["task_id"] for line in path.read_text().splitlines()}

    trainer.train(config, str(tmp_path / "sft"))
    assert len(asked(tmp_path / "sft")) == config.grpo.questions_per_step
    assert not asked(tmp_path / "sft") & shown
    config.sft.enabled = False
    trainer.train(config, str(tmp_path / "no_sft"))
    assert asked(tmp_path / "no_sft") & shown


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.grpo.no_such_key=1", "no_such_key"),
        ("--config.grpo.group_size=four", "group_size"),
        ("--config.mesh.data=3", "mesh.data"),
        ("--config.model.init_from=/nonexistent/model", "model.init_from"),
        ("--config.optim.num_microbatches=3", "optim.num_microbatches"),
        ("--config.optim.remat=some", "optim.remat"),
        ("--config.data.num_train=-1", "data.num_train"),
        ("--config.data.num_train=3", "grpo.questions_per_step=4"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, data_dir, override, expected):
    workdir = tmp_path / "bad"
    start = time.monotonic()
    proc = _run(workdir, data_dir, override, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    # Nothing was trained, built or written.
    assert not (workdir / "checkpoints").exists()
    assert time.monotonic() - start < 120
