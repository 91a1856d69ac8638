"""tpu_scripts/: shellcheck, usage without touching gcloud, and the gcloud calls each script makes,
against a fake `gcloud` that runs `ssh --command` locally in a fake worker home directory (and a
fake `python3` there, so nothing is installed or trained)."""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("create.sh", "setup.sh", "launch.sh", "fetch.sh")

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
home = os.environ.get("FAKE_WORKER_HOME")
if home and args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    env = dict(os.environ, HOME=home)
    sys.exit(subprocess.call(["bash", "-c", command], cwd=home, env=env))
if home and args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    src, dst = [a for a in args[4:] if not a.startswith("--")]
    shutil.copy(src, os.path.join(home, dst.split(":", 1)[1]))
"""

FAKE_PYTHON3 = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_PYTHON_LOG"], "a") as f:
    f.write(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}) + "\\n")
"""


@pytest.fixture
def fake(tmp_path):
    """(run, gcloud_calls, python_calls, worker_home) with fakes first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("python3", FAKE_PYTHON3)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    home = tmp_path / "worker"
    home.mkdir()
    logs = {"FAKE_GCLOUD_LOG": tmp_path / "gcloud.jsonl", "FAKE_PYTHON_LOG": tmp_path / "py.jsonl"}
    for path in logs.values():
        path.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update({k: str(v) for k, v in logs.items()})
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def run(script, *args, exec_remote=False, cwd=ROOT, **extra_env):
        e = dict(env, **extra_env)
        if exec_remote:
            e["FAKE_WORKER_HOME"] = str(home)
        return subprocess.run(
            ["bash", str(ROOT / "tpu_scripts" / script), *args],
            cwd=cwd,
            env=e,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def read(name):
        return [json.loads(x) for x in logs[name].read_text().splitlines()]

    return run, lambda: read("FAKE_GCLOUD_LOG"), lambda: read("FAKE_PYTHON_LOG"), home


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/run does)")
    out = subprocess.run(
        ["shellcheck", str(ROOT / "tpu_scripts" / script)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_without_gcloud(fake, script):
    run, gcloud_calls, _, _ = fake
    for flag in ("--help", "-h"):
        out = run(script, flag)
        assert out.returncode == 0, out.stderr
        assert f"Usage: tpu_scripts/{script}" in out.stdout
        assert "TPU_NAME" in out.stdout and "[toolr1]" in out.stdout
        assert "set -euo" not in out.stdout and "#" not in out.stdout.splitlines()[0]
    assert gcloud_calls() == []


@pytest.mark.parametrize(
    "script, args",
    [("launch.sh", ()), ("launch.sh", ("configs/demo.py",)), ("fetch.sh", ())]
    + [("fetch.sh", ("a", "b", "c")), ("create.sh", ("extra",)), ("setup.sh", ("u", "r", "x"))],
)
def test_wrong_arguments_print_usage_and_fail(fake, script, args):
    run, gcloud_calls, _, _ = fake
    out = run(script, *args)
    assert out.returncode == 2
    assert f"Usage: tpu_scripts/{script}" in out.stderr
    assert gcloud_calls() == []


def test_create(fake):
    run, gcloud_calls, _, _ = fake
    assert run("create.sh").returncode == 0
    spot = run(
        "create.sh",
        TPU_NAME="pod",
        TPU_ZONE="us-east5-b",
        TPU_TYPE="v6e-16",
        TPU_RUNTIME="v2-alpha-tpuv6e",
        TPU_PROJECT="my-proj",
        TPU_SPOT="true",
    )
    assert spot.returncode == 0, spot.stderr
    base = ["compute", "tpus", "tpu-vm", "create"]
    assert gcloud_calls() == [
        base
        + ["toolr1", "--zone=us-central2-b", "--accelerator-type=v4-8"]
        + ["--version=tpu-ubuntu2204-base"],
        base
        + ["pod", "--zone=us-east5-b", "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e"]
        + ["--project=my-proj", "--spot"],
    ]


def test_setup_copies_the_checkout_and_installs(fake):
    run, gcloud_calls, python_calls, home = fake
    out = run("setup.sh", exec_remote=True, TPU_REMOTE_DIR="code dir")
    assert out.returncode == 0, out.stdout + out.stderr
    calls = gcloud_calls()
    assert len(calls) == 2
    assert calls[0][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert calls[0][5:7] == ["toolr1:toolr1_jax_src.tgz", "--worker=all"]
    assert calls[1][:6] == ["compute", "tpus", "tpu-vm", "ssh", "toolr1", "--worker=all"]
    copy = home / "code dir"
    for path in ("train.py", "setup.py", "toolr1_jax/trainer.py", "tpu_scripts/setup.sh"):
        assert (copy / path).read_bytes() == (ROOT / path).read_bytes()
    assert not (copy / ".git").exists() and not (home / "toolr1_jax_src.tgz").exists()
    assert python_calls() == [
        {"cwd": str(copy), "argv": ["-m", "pip", "install", "-q", "-e", ".[tpu]"]}
    ]


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_setup_clones_then_updates_from_git(fake, tmp_path):
    run, gcloud_calls, python_calls, home = fake
    origin = tmp_path / "origin"
    origin.mkdir()
    _git(origin, "init", "-q", "-b", "main")
    (origin / "setup.py").write_text("v1\n")
    _git(origin, "add", "setup.py")
    _git(origin, "commit", "-q", "-m", "v1")

    out = run("setup.sh", str(origin), exec_remote=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (home / "toolr1_jax" / "setup.py").read_text() == "v1\n"
    # A second setup after a new commit fetches it into the existing clone.
    (origin / "setup.py").write_text("v2\n")
    _git(origin, "commit", "-q", "-am", "v2")
    out = run("setup.sh", str(origin), "main", exec_remote=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (home / "toolr1_jax" / "setup.py").read_text() == "v2\n"
    assert [c["cwd"] for c in python_calls()] == [str(home / "toolr1_jax")] * 2
    assert all(c[:5] == ["compute", "tpus", "tpu-vm", "ssh", "toolr1"] for c in gcloud_calls())


def test_launch_runs_train_py_on_all_workers(fake):
    run, gcloud_calls, python_calls, home = fake
    (home / "toolr1_jax").mkdir()
    extra = ["--config.total_steps=5", "--config.reward.judge_model=a judge's name"]
    out = run(
        "launch.sh", "configs/gaia.py:debug", "/runs/x y", *extra, exec_remote=True, TPU_ZONE="z"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [call] = gcloud_calls()
    assert call[:7] == ["compute", "tpus", "tpu-vm", "ssh", "toolr1", "--worker=all", "--zone=z"]
    # What train.py receives on the worker, each argument intact.
    assert python_calls() == [
        {
            "cwd": str(home / "toolr1_jax"),
            "argv": [
                "train.py",
                "--config=configs/gaia.py:debug",
                "--workdir=/runs/x y",
                "--config.distributed.enabled=true",
                *extra,
            ],
        }
    ]

    out = run("launch.sh", "configs/demo.py", "/runs/z", TPU_DETACH="true")
    assert out.returncode == 0, out.stderr
    command = gcloud_calls()[-1][-1]
    assert command.startswith("--command=cd toolr1_jax && nohup python3 train.py ")
    assert command.endswith("> ~/toolr1_train.log 2>&1 < /dev/null &")


def test_fetch_copies_back_without_checkpoints(fake, tmp_path):
    run, gcloud_calls, _, home = fake
    remote = home / "runs" / "sweep"
    for path in (
        "metrics.jsonl",
        "eval/step_2/results.json",
        "checkpoints/2/state",
        "arm/seed_0/metrics.jsonl",
        "arm/seed_0/checkpoints/1/state",
    ):
        (remote / path).parent.mkdir(parents=True, exist_ok=True)
        (remote / path).write_text(path)

    local = tmp_path / "local"
    out = run("fetch.sh", "runs/sweep", str(local), exec_remote=True)
    assert out.returncode == 0, out.stdout + out.stderr
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert got == ["arm/seed_0/metrics.jsonl", "eval/step_2/results.json", "metrics.jsonl"]
    assert (local / "eval/step_2/results.json").read_text() == "eval/step_2/results.json"
    assert gcloud_calls()[0][:6] == ["compute", "tpus", "tpu-vm", "ssh", "toolr1", "--worker=0"]

    # Default LOCAL_DIR (the remote's basename, under the cwd) and checkpoints on request.
    out = run(
        "fetch.sh", "runs/sweep", exec_remote=True, cwd=tmp_path, TPU_FETCH_CHECKPOINTS="true"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "sweep" / "arm/seed_0/checkpoints/1/state").is_file()
