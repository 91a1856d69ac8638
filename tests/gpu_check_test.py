"""benchmarks/gpu_check.sh, the GPU check of issue 17: GPUs are lent to few sessions, so its steps
run here at the tiny preset (`--smoke`) to keep the script and the benchmark flags it uses
working: bfloat16 decode without transformers, the JAX-only bfloat16 update, the shared-prefix
prefill."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/run does)")
    out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_smoke_run_prints_every_figure():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["PYTHON"] = sys.executable
    out = subprocess.run(
        [str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env, timeout=900
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "gpu_check: all steps ran" in out.stdout
    for figure in (
        "B16 decode bandwidth use (bytes read / s / measured)",  # the HBM fraction on a GPU
        "B32 decode step at its floor",
        "jax model FLOP/s over matmul throughput",  # the update, bfloat16, no PyTorch
        "prefill wall time, per episode / shared",
    ):
        assert figure in out.stdout, figure
    assert out.stdout.count("model: tiny preset (llama)") == 2  # both update steps ran
    assert "bfloat16" in out.stdout


def test_a_missing_package_is_named_before_any_step(tmp_path):
    # The GPU image lacks some of the project's packages: here gguf fails to import.
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "__init__.py").write_text("raise ImportError('no gguf here')\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(tmp_path))
    out = subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gpu_check: cannot import:" in out.stdout and "no gguf here" in out.stdout
    assert "===" not in out.stdout  # no step ran
