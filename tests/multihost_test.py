"""Multi-host training: two processes with 4 CPU devices each, joined by `jax.distributed` on
loopback, train the same two steps as one process with 8 devices.

All three runs start from one short SFT run's checkpoint (a random tiny policy never produces a
parseable turn, so every reward would be 0 and no parameter would move). The queue caches every
trajectory (threshold 0), so its arrays hold the step's rollouts: tokens and masks must be
bitwise equal, and so must every reward and rollout statistic; behaviour log-probs come from
engines with another batch layout and agree to float32 rounding. The parameters may differ only
by float32 rounding of the gradient all-reduce, whose summation order differs between one process
and two (gloo).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Wall-clock and compile counts differ between runs; update/* are float reductions over devices.
_NOT_EXACT = ("time/", "throughput/", "compiles", "update/", "eval/wall_s", "eval/time/")
# The parameters after 2 steps: the gradient differs by float32 rounding (all-reduce order,
# behaviour log-probs in the importance weights), which moves each Adam step (at most lr = 1e-4)
# by a relative ~1e-5 at most; rounding the params adds a few ulps. So: 1e-4 of the two steps'
# budget 2 * lr absolute, 8 float32 ulps relative.
_RTOL, _ATOL = 1e-6, 2e-8

_COMMON = (
    "--config.log.progress_bar=false",
    "--config.log.eval_every_steps=0",
    "--config.grpo.questions_per_step=4",
    "--config.grpo.group_size=4",
    "--config.queue.max_replay=1",
    "--config.optim.num_microbatches=1",
    "--config.engine.num_slots=8",
    "--config.sandbox.num_workers=2",
    # Execution and format terms count without an answer: the SFT'd tiny policy rarely
    # answers, and the group rewards need variance for a gradient.
    "--config.reward.aux_requires_answer=false",
)


def _cmd(workdir, data_dir, *overrides):
    return helpers.train_cmd("gaia.py:debug", workdir, data_dir, *_COMMON, *overrides)


def _env(num_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs, timeout_s):
    deadline = time.monotonic() + timeout_s
    try:
        for name, proc, log in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, f"{name} failed:\n{log.read_text()[-4000:]}"
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _start(name, cmd, num_devices, log):
    out = open(log, "w")  # noqa: SIM115  closed when the process ends
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(num_devices), stdout=out, stderr=subprocess.STDOUT
    )
    out.close()
    return name, proc, log


def _state(workdir, step):
    """A checkpoint's arrays as numpy, whatever the devices that saved it."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata
        like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        state = ckptr.restore(path, like)
    return jax.tree.map(np.asarray, state)


def _metrics(workdir):
    rows = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        rows.setdefault(d.pop("step"), {}).update(d)
    return rows


def _without_durations(tree):
    """A JSON tree without the wall-clock times of code runs (they differ between any runs)."""
    if isinstance(tree, dict):
        return {k: _without_durations(v) for k, v in tree.items() if k != "duration_s"}
    if isinstance(tree, list):
        return [_without_durations(v) for v in tree]
    return tree


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A checkpoint after cold-start SFT (step 0) and its tokenizer; the run is stopped there."""
    root = tmp_path_factory.mktemp("multihost")
    data_dir, workdir = root / "tfds", root / "sft"
    cmd = _cmd(
        workdir,
        data_dir,
        "--config.sft.enabled=true",
        "--config.sft.num_demos=64",
        "--config.sft.num_steps=30",
        "--config.sft.batch_size=8",
        "--config.sft.lr=2e-2",
        "--config.sft.warmup_steps=2",
    )
    name, proc, log = _start("sft", cmd, 8, root / "sft.log")
    committed = workdir / "checkpoints" / "0" / "commit_success.txt"
    deadline = time.monotonic() + 600
    try:
        while not committed.exists():
            assert proc.poll() is None, f"SFT run ended early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no SFT checkpoint within 10 minutes"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return root, data_dir, workdir


# An SFT run, then three training processes at once on one machine (fixture setup counts).
@pytest.mark.timeout(1500)
def test_two_processes_match_one(start):
    root, data_dir, sft_dir = start
    resume = (
        f"--config.ckpt.resume_from={sft_dir / 'checkpoints' / '0'}",
        f"--config.model.tokenizer={sft_dir / 'tokenizer'}",
        "--config.total_steps=2",
        "--config.queue.threshold=0.0",
        # Evaluated at step 2, each process on its share (3 and 2 of the 5 questions).
        "--config.log.eval_every_steps=2",
        "--config.data.num_eval=5",
    )
    single, multi = root / "single", root / "multi"
    port = _free_port()
    joined = (
        "--config.distributed.enabled=true",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
    )
    procs = [
        _start("1x8", _cmd(single, data_dir, *resume), 8, root / "single.log"),
        *(
            _start(
                f"process {i}",
                _cmd(multi, data_dir, *resume, *joined, f"--config.distributed.process_id={i}"),
                4,
                root / f"multi_{i}.log",
            )
            for i in range(2)
        ),
    ]
    _wait(procs, timeout_s=900)
    logs = [(root / f"multi_{i}.log").read_text() for i in range(2)]
    assert "JAX process 1/2" in logs[1]
    # Each process evaluated its share.
    assert "Evaluated 3 of the 5 questions" in logs[0]
    assert "Evaluated 2 of the 5 questions" in logs[1]

    # The rollouts: every reward, status count and sample counter is the same.
    a, b = _metrics(single), _metrics(multi)
    assert sorted(a) == sorted(b) == [1, 2]
    assert a[2]["eval/num_questions"] == 5
    for step in a:
        exact_a = {k: v for k, v in a[step].items() if not k.startswith(_NOT_EXACT)}
        exact_b = {k: v for k, v in b[step].items() if not k.startswith(_NOT_EXACT)}
        assert exact_a == exact_b, step
        for key, value in a[step].items():
            if key.startswith("update/"):
                np.testing.assert_allclose(b[step][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        # There was something to learn from.
        assert a[step]["reward/std"] > 0 and a[step]["update/grad_norm"] > 0

    # The queue holds the trajectories bitwise, and its statistics are the same.
    start_params = _state(sft_dir, 0)["params"]
    for step in (1, 2):
        sa, sb = _state(single, step), _state(multi, step)
        assert (sa["queue"]["question"] >= 0).sum() > 0
        for key, value in sa["queue"].items():
            if key == "behaviour_logprobs":
                # Each engine runs the episode on its own devices with a different number of
                # slots per device (2 vs 4), and XLA's CPU kernels round float32 logits
                # differently for other batch shapes: log-probs agree to a few ulps of the
                # logits' scale (~10), the sampled tokens exactly.
                np.testing.assert_allclose(sb["queue"][key], value, rtol=1e-5, atol=1e-5)
            else:
                np.testing.assert_array_equal(sb["queue"][key], value, err_msg=key)
        np.testing.assert_array_equal(sa["rng"], sb["rng"])
        meta = [
            _without_durations(
                json.loads((w / "checkpoints" / str(step) / "meta" / "metadata").read_text())
            )
            for w in (single, multi)
        ]
        assert meta[0] == meta[1]  # question statistics, cached turns, data position, counters

    # The parameters: equal up to float32 rounding, and training moved them far more than that.
    # "Far more" is measured in units of each parameter's own tolerance (atol + rtol * |x|), the
    # slack the equality above forgives at that magnitude: an untrained run must fail equality on
    # most parameters, or the equality is vacuous. (A bare max |diff| is one ulp of the largest
    # parameter that rounding touched, which changes with any change to the starting point.)
    pa, pb = jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"])
    moved_in_tols, diff = [], 0.0
    for x, y, x0 in zip(pa, pb, jax.tree.leaves(start_params), strict=True):
        np.testing.assert_allclose(y, x, rtol=_RTOL, atol=_ATOL)
        tol = _ATOL + _RTOL * np.abs(x)
        moved_in_tols.append((np.abs(x - x0) / tol).ravel())
        diff = max(diff, float(np.abs(x - y).max()))
    moved_in_tols = np.concatenate(moved_in_tols)
    far = float(np.mean(moved_in_tols > 10.0))
    print(
        f"2 steps: max |1x8 - 2x4| = {diff:.3g}; change from the start in tolerances: "
        f"median {np.median(moved_in_tols):.3g}, share beyond 10 tolerances {far:.3f}"
    )
    # Adam moves every parameter with a gradient by ~lr per step, 2e-4 here: ~100 tolerances at
    # magnitude 1 and more below it. Embedding rows of tokens absent from both steps do not move.
    assert far > 0.5
