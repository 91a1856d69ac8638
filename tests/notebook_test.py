"""notebooks/quickstart.ipynb runs top to bottom in a fresh python3 kernel (one tiny training run
through train.py) and shows its plot and a trajectory."""

import json
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_notebook_is_valid_nbformat_4():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    # Committed without outputs, and with no path of this machine baked in.
    text = NOTEBOOK.read_text()
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert str(ROOT) not in text and "/work/" not in text
    install = next(c.source for c in nb.cells if "%pip install" in c.source)
    assert 'importlib.util.find_spec("toolr1_jax") is None' in install


# The training cell is demo.py:short with one GRPO step: SmolLM2's SFT and evaluations make it
# about as long as tests/demo_test.py (~5x longer on the loaded shared box than on an idle one).
@pytest.mark.timeout(5400)
def test_notebook_runs(tmp_path, monkeypatch):
    # The kernel and the training subprocess inherit this environment: a private run directory
    # and dataset cache, and one CPU device like a Colab CPU runtime (not conftest's 8).
    monkeypatch.setenv("TOOLR1_QUICKSTART_DIR", str(tmp_path))
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=5000,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "exit code 0" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1
    assert pngs[0].data["image/png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature

    # The run it made: one GRPO step, evaluated, with the trajectory the notebook printed.
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 1
    assert any("eval/accuracy" in r for r in rows if r["step"] == 1)
    path = tmp_path / "run" / "eval" / "step_1" / "trajectories.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    shown = next((r for r in records if r["correct"]), records[0])
    assert f"Question: {shown['question']}" in text
    assert f"Reference answer: {shown['reference']}" in text
    assert "--- turn 1" in text and f"final answer {shown['final_answer']!r}" in text
