"""sweep.py (commands, local execution with resume/skip, failures, config checks) and plot.py
(PNG output, samples-to-target table) on a fake training script and synthetic metrics files."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Stands in for train.py: resumes from its own metrics.jsonl like the trainer does, logs one
# train row per step (fresh samples grow by 10 * (seed + 1)) and an eval row every 2 steps and at
# the end, records its arguments, and fails on request.
FAKE_TRAIN = """\
import json, os, pathlib, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = pathlib.Path(args["workdir"])
total, seed = int(args["config.total_steps"]), int(args["config.seed"])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
workdir.mkdir(parents=True, exist_ok=True)
path = workdir / "metrics.jsonl"
start = max((json.loads(line)["step"] for line in path.open()), default=0) if path.exists() else 0
stop = 1 if workdir.parent.name == os.environ.get("FAKE_FAIL_ARM") else total
with path.open("a") as f:
    for step in range(start + 1, stop + 1):
        row = {"step": step, "samples/fresh_total": 10 * (seed + 1) * step, "time/step_s": 1.0}
        f.write(json.dumps(row) + "\\n")
        if step % 2 == 0 or step == total:
            f.write(json.dumps({"step": step, "eval/accuracy": step / total}) + "\\n")
print("fake training done")
sys.exit(3 if stop < total else 0)
"""

SWEEP_FILE = """\
def get_sweep(arg=None):
    steps = int(arg or 3)
    return [
        {"name": "a", "config": "configs/demo.py:tiny", "overrides": {"total_steps": steps}},
        {
            "name": "b",
            "config": "configs/demo.py:tiny,queue=false",
            "overrides": {"total_steps": steps + 1, "grpo.group_size": 2, "queue.enabled": False},
        },
    ]
"""


def _run(script, *args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp_path / "sweep_file.py").write_text(SWEEP_FILE)
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    return tmp_path, {"FAKE_CALLS": str(calls)}


def _calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _expected_args(workdir, arm, seed):
    if arm == "a":
        config, overrides = "configs/demo.py:tiny", ["--config.total_steps=3"]
    else:
        config = "configs/demo.py:tiny,queue=false"
        overrides = [
            "--config.total_steps=4",
            "--config.grpo.group_size=2",
            "--config.queue.enabled=false",
        ]
    return [
        f"--config={config}",
        f"--workdir={workdir}/{arm}/seed_{seed}",
        f"--config.seed={seed}",
        *overrides,
    ]


def test_print_only_prints_the_commands(tmp_path):
    workdir = tmp_path / "sw"
    out = _run(
        "sweep.py",
        "--sweep=configs/sweeps/queue_ablation.py:tiny",
        f"--workdir={workdir}",
        "--seeds=0,1",
        "--print_only",
    )
    assert out.returncode == 0, out.stderr
    expected = []
    for arm, variant, extra in (
        ("queue_on", "tiny,queue=true", []),
        ("queue_off", "tiny,queue=false", []),
        ("replay_only", "tiny,queue=true", ["--config.queue.restore_zero_variance=false"]),
    ):
        for seed in (0, 1):
            expected.append(
                [
                    "python",
                    "train.py",
                    f"--config=configs/demo.py:{variant}",
                    f"--workdir={workdir}/{arm}/seed_{seed}",
                    f"--config.seed={seed}",
                    "--config.total_steps=4",
                    "--config.log.eval_every_steps=2",
                    *extra,
                ]
            )
    assert [shlex.split(line) for line in out.stdout.splitlines()] == expected
    assert not workdir.exists()  # printing writes nothing


@pytest.mark.parametrize("name", ["queue_ablation", "replay_ablation", "grpo_ablation"])
def test_every_sweep_file_builds_valid_configs(name, tmp_path):
    # sweep.py builds each arm's config with its overrides, so a wrong key or a type mismatch
    # fails here; --arms keeps the check on a subset working too.
    for variant in ("", ":tiny"):
        out = _run(
            "sweep.py",
            f"--sweep=configs/sweeps/{name}.py{variant}",
            f"--workdir={tmp_path}",
            "--seeds=0",
            "--print_only",
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) >= 3
        assert all(line.startswith("python train.py --config=configs/demo.py") for line in lines)
        names = [shlex.split(line)[3].split("/")[-2] for line in lines]
        assert len(set(names)) == len(names)


def test_local_run_resumes_and_skips_finished_runs(fake):
    tmp_path, env = fake
    workdir = tmp_path / "sw"
    sweep_args = (
        f"--sweep={tmp_path}/sweep_file.py",
        f"--workdir={workdir}",
        "--seeds=0,1",
        f"--train_script={tmp_path}/fake_train.py",
    )
    out = _run("sweep.py", *sweep_args, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert _calls(tmp_path) == [_expected_args(workdir, arm, seed) for arm, seed in runs]
    for arm, seed in runs:
        run_dir = workdir / arm / f"seed_{seed}"
        steps = [
            json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert max(steps) == (3 if arm == "a" else 4)
        assert "fake training done" in (run_dir / "train.log").read_text()
    manifest = json.loads((workdir / "sweep.json").read_text())
    assert [a["name"] for a in manifest["arms"]] == ["a", "b"] and manifest["seeds"] == [0, 1]

    # Everything finished: a second invocation trains nothing.
    out = _run("sweep.py", *sweep_args, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(_calls(tmp_path)) == 4
    assert out.stdout.count("skipped") == 4

    # An interrupted run (metrics stop at step 1) is rerun in place, and only that one.
    metrics = workdir / "b" / "seed_1" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    printed = _run("sweep.py", *sweep_args, "--print_only", env=env)
    assert [shlex.split(x) for x in printed.stdout.splitlines()] == [
        ["python", f"{tmp_path}/fake_train.py", *_expected_args(workdir, "b", 1)]
    ]
    out = _run("sweep.py", *sweep_args, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _calls(tmp_path)[4:] == [_expected_args(workdir, "b", 1)]
    assert "resuming at step 1" in out.stdout
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4]


def test_failed_run_is_reported_and_the_rest_still_run(fake):
    tmp_path, env = fake
    workdir = tmp_path / "sw"
    out = _run(
        "sweep.py",
        f"--sweep={tmp_path}/sweep_file.py:2",
        f"--workdir={workdir}",
        "--seeds=0",
        f"--train_script={tmp_path}/fake_train.py",
        env={**env, "FAKE_FAIL_ARM": "a"},
    )
    assert out.returncode == 1
    assert "FAILED (exit code 3)" in out.stdout
    assert "1 of 2 runs failed: a/seed_0" in out.stdout
    assert [c[1] for c in _calls(tmp_path)] == [f"--workdir={workdir}/{x}/seed_0" for x in "ab"]
    assert (workdir / "b" / "seed_0" / "metrics.jsonl").read_text().count('"step": 3') == 2


@pytest.mark.parametrize(
    "arm, message",
    [
        ('{"name": "x", "config": "configs/demo.py", "overrides": {"grpo.group_sise": 4}}', "sise"),
        ('{"name": "x", "config": "configs/demo.py", "overrides": {"seed": 4}}', "--seeds"),
        ('{"name": "x y", "config": "configs/demo.py"}', "directory name"),
        ('{"name": "x", "config": "configs/demo.py", "override": {}}', "unknown"),
        ('{"name": "x", "config": "configs/demo.py:nope"}', "nope"),
    ],
)
def test_bad_sweeps_fail_before_any_run(fake, arm, message):
    tmp_path, env = fake
    (tmp_path / "bad.py").write_text(f"def get_sweep(arg=None):\n    return [{arm}]\n")
    out = _run(
        "sweep.py",
        f"--sweep={tmp_path}/bad.py",
        f"--workdir={tmp_path}/sw",
        f"--train_script={tmp_path}/fake_train.py",
        env=env,
    )
    assert out.returncode != 0
    assert message in out.stderr
    assert _calls(tmp_path) == []


def _write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train_rows(fresh_per_step, num_steps, step_s):
    return [
        {"step": s, "samples/fresh_total": fresh_per_step * s, "time/step_s": step_s}
        for s in range(1, num_steps + 1)
    ]


def test_plot_writes_png_and_samples_to_target(tmp_path):
    sweep = tmp_path / "sweep"
    # Arm "queue": 8 fresh samples per step, 2 s per step, evals at steps 0, 2, 4, 6.
    #   seed 0: 0.0, 0.3, 0.6, 0.9  -> reaches 0.5 at step 4: 32 samples.
    #   seed 1: 0.0, 0.1, 0.4, 0.7 -> step 6: 48 samples.  Mean: 0, .2, .5, .8 -> step 4, 32, 8 s.
    # Seed 1 was killed after step 3 and resumed from a step-2 checkpoint: step 3 is logged twice
    # (the later row counts) and the stray eval value of the first attempt is overwritten.
    for seed, accs in ((0, (0.0, 0.3, 0.6, 0.9)), (1, (0.0, 0.1, 0.4, 0.7))):
        rows = _train_rows(8, 6, 2.0)
        if seed == 1:
            rows = rows[:3] + [{"step": 4, "eval/accuracy": 1.0}] + rows[2:]
        rows += [{"step": 2 * i, "eval/accuracy": a} for i, a in enumerate(accs)]
        _write_metrics(sweep / "queue" / f"seed_{seed}" / "metrics.jsonl", rows)
    # Arm "plain": 16 per step, 1 s per step; evals at 2, 4, 6: 0.2, 0.45, 0.55 (both seeds)
    # -> 96 samples, 6 s. A third seed without any eval yet is left out.
    for seed in (0, 1):
        rows = _train_rows(16, 6, 1.0)
        rows += [{"step": s, "eval/accuracy": a} for s, a in ((2, 0.2), (4, 0.45), (6, 0.55))]
        _write_metrics(sweep / "plain" / f"seed_{seed}" / "metrics.jsonl", rows)
    _write_metrics(sweep / "plain" / "seed_2" / "metrics.jsonl", _train_rows(16, 1, 1.0))
    # Arm "never" stays below the target.
    rows = _train_rows(4, 2, 1.0) + [{"step": 2, "eval/accuracy": 0.25}]
    _write_metrics(sweep / "never" / "seed_0" / "metrics.jsonl", rows)
    (sweep / "sweep.json").write_text(json.dumps({"arms": [{"name": n} for n in ("plain",)]}))

    out_png = tmp_path / "plots" / "curves.png"
    out = _run(
        "plot.py", f"--workdir={sweep}", f"--out={out_png}", "--target=0.5", "--baseline=plain"
    )
    assert out.returncode == 0, out.stderr
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert b"IHDR" in data[8:16] and data.endswith(b"IEND\xaeB`\x82")
    assert "seed_2" in out.stderr and "no eval/accuracy" in out.stderr

    lines = out.stdout.splitlines()
    header = lines.index(next(x for x in lines if x.startswith("arm ")))
    assert lines[header].split() == [
        "arm",
        "seeds",
        "final",
        "fresh_to_target",
        "wall_to_target_s",
        "vs_plain",
        "per_seed_fresh",
    ]
    # sweep.json's order first, then the other arms by name.
    table = [x.split() for x in lines[header + 1 :]]
    assert table == [
        ["plain", "2", "0.5500", "96", "6.0", "1.000", "96,96"],
        ["never", "1", "0.2500", "-", "-", "-", "-"],
        ["queue", "2", "0.8000", "32", "8.0", "0.333", "32,48"],
    ]


def test_plot_fails_clearly_without_runs(tmp_path):
    out = _run("plot.py", f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert "No metrics.jsonl" in out.stderr
    assert not (tmp_path / "curves.png").exists()
