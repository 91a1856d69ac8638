"""GAIA as its users meet it: `evaluate.py --config=configs/gaia.py:debug` on a GAIA-layout
folder (validation: accuracy per level; test: a leaderboard submission and no accuracy), hidden
answers in the evaluation library, and how the config keys pick the dataset and tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from configs import demo, gaia
from tests import data_gaia_test, helpers
from tests.evaluation_test import make_traj
from toolr1_jax import build, evaluation
from toolr1_jax.data import types

REPO = helpers.ROOT


# ----------------------------------------------------------------------------------------------
# Which dataset and tools the config keys pick
# ----------------------------------------------------------------------------------------------


def test_gaia_config_evaluates_gaia_from_data_manual_dir():
    c = gaia.get_config()
    c.data.manual_dir = "/data/GAIA"
    assert build.dataset(c, for_eval=True) == build.Dataset("gaia", "2023_all", "/data/GAIA")
    # Training reads the user's question set, from its own keys.
    assert build.dataset(c).name == "qa"
    assert "zipfile" in build.authorized_imports(c)


def test_debug_variant_evaluates_gaia_when_given_a_folder_and_synthetic_otherwise():
    c = gaia.get_config("debug")
    assert build.dataset(c, for_eval=True) == build.Dataset("synthetic", "default", None)
    assert "search" in [t.name for t in build.tools(c, for_eval=True)]

    c.data.manual_dir = "/data/GAIA"
    assert build.dataset(c, for_eval=True) == build.Dataset("gaia", "2023_all", "/data/GAIA")
    # The synthetic suite's search corpus stays with the synthetic suite.
    assert [t.name for t in build.tools(c, for_eval=True)] == ["inspect_file"]
    assert build.dataset(c).name == "synthetic"  # training is unchanged

    c = gaia.get_config("debug")
    c.data.name, c.data.manual_dir = "gaia", "/data/GAIA"  # the other obvious spelling
    assert build.dataset(c, for_eval=True) == build.Dataset("gaia", "2023_all", "/data/GAIA")
    assert [t.name for t in build.tools(c)] == ["inspect_file"]


def test_config_mistakes_name_the_key_to_set(tmp_path):
    c = demo.get_config()
    c.data.manual_dir = "/data/GAIA"  # with the synthetic suite, which reads no files
    with pytest.raises(build.ConfigError, match="--config.data.eval_name=gaia"):
        build.dataset(c, for_eval=True)
    c = gaia.get_config("debug")
    c.data.name, c.data.config = "gaia", "default"
    with pytest.raises(build.ConfigError, match=r"data.config='default'.*'2023_level1'"):
        build.dataset(c, for_eval=True)
    c = gaia.get_config()
    c.data.manual_dir, c.data.data_dir = "/nowhere/GAIA", str(tmp_path)
    with pytest.raises(build.ConfigError, match=r"(?s)'/nowhere/GAIA'.*--config.data.manual_dir"):
        build.examples(c, "validation", for_eval=True)
    c.sandbox.vision_url = "http://127.0.0.1:1/v1"
    with pytest.raises(build.ConfigError, match="sandbox.vision_model is empty"):
        build.tools(c)
    # GAIA's test split can be evaluated but never trained on: its answers are "?".
    c = gaia.get_config("debug")
    c.data.name = "gaia"
    c.data.manual_dir = str(data_gaia_test._write_release(tmp_path / "GAIA", splits=("test",)))
    c.data.data_dir = str(tmp_path / "tfds")
    assert len(build.examples(c, "test", for_eval=True)) == len(
        data_gaia_test._release_rows("test")
    )
    with pytest.raises(build.ConfigError, match="hides its answers.*set data.train_split"):
        build.examples(c, "test")


# ----------------------------------------------------------------------------------------------
# Hidden answers in the library
# ----------------------------------------------------------------------------------------------


def _hidden_example(task_id: str, level: int) -> types.Example:
    return types.Example(task_id, "q?", "?", level, metadata={"answer_hidden": True})


def test_hidden_answers_are_never_scored_and_give_a_submission():
    turn = types.Turn(
        "Thought: it is 7\n<code>final_answer('?')</code>", "final_answer('?')", "", "ok"
    )
    records = []
    for i, (answer, level) in enumerate([("?", 1), (None, 2)]):
        ex = _hidden_example(f"h{i}", level)
        for sample, final in enumerate([None, answer]):
            traj = make_traj(ex.task_id, i, [turn], final, "answered" if final else "max_turns")
            records.append(evaluation.grade(ex, sample, traj, ["inspect_file"]))
    # "?" against a hidden "?" would score as correct; it is not scored at all.
    assert [r.correct for r in records] == [None] * 4
    m = evaluation.compute_metrics(records, num_samples=2, judged=False, answers_hidden=True)
    assert not [k for k in m if k.startswith(("accuracy", "pass@"))]
    assert (m["num_questions/level_1"], m["answer_rate"]) == (1, 0.25)
    result = evaluation.EvalResult(m, tuple(records), 2, False, answers_hidden=True)
    lines = evaluation.submission_lines(result)
    # The first sample with an answer is submitted; a question without one submits "".
    assert [(x["task_id"], x["model_answer"]) for x in lines] == [("h0", "?"), ("h1", "")]
    assert lines[0]["reasoning_trace"].startswith("Step 1:\nThought: it is 7")

    with pytest.raises(ValueError, match="some examples have hidden answers"):
        evaluation.answers_hidden([_hidden_example("a", 1), types.Example("b", "q", "x", 1)])


# ----------------------------------------------------------------------------------------------
# evaluate.py end to end on a GAIA-layout folder
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaia_runs(tmp_path_factory):
    """`python evaluate.py --config=configs/gaia.py:debug --config.data.manual_dir=GAIA` on a
    tiny model, once for validation and once for test."""
    root = tmp_path_factory.mktemp("evaluate_gaia")
    manual = data_gaia_test._write_release(root / "GAIA")
    model_dir = helpers.make_hf_model_dir(root, "qwen2", max_position_embeddings=1024)
    tokenizer_dir = helpers.make_chatml_tokenizer_dir(root)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    runs = {}
    for split in ("validation", "test"):
        out = root / f"out_{split}"
        cmd = [
            sys.executable,
            str(REPO / "evaluate.py"),
            f"--config={REPO / 'configs' / 'gaia.py'}:debug",
            f"--config.data.manual_dir={manual}",
            f"--config.data.data_dir={root / 'tfds'}",
            f"--config.model.tokenizer={tokenizer_dir}",
            "--config.data.num_eval=0",  # every task, so the submission is complete
            f"--model={model_dir}",
            f"--split={split}",
            f"--output_dir={out}",
            "--noprogress",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[split] = (out, proc, manual)
    return runs


def test_validation_reports_accuracy_per_level_of_gaia(gaia_runs):
    out, _, manual = gaia_runs["validation"]
    summary = json.loads((out / "results.json").read_text())
    run, m = summary["run"], summary["metrics"]
    # The dataset actually used, though data.name says "synthetic" in the debug variant.
    assert summary["run"]["config"]["data"]["name"] == "synthetic"
    assert (run["dataset"], run["dataset_config"], run["manual_dir"]) == (
        "gaia", "2023_all", str(manual)
    )  # fmt: skip
    rows = data_gaia_test._release_rows("validation")
    assert m["num_questions"] == len(rows)
    lines = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    for level in (1, 2, 3):
        expected = [r["task_id"] for r in rows if int(r["Level"]) == level]
        assert m[f"num_questions/level_{level}"] == len(expected)
        got = [t for t in lines if t["level"] == level]
        assert m[f"accuracy/level_{level}"] == pytest.approx(
            sum(t["correct"] for t in got) / len(got)
        )
    by_id = {t["task_id"]: t for t in lines}
    assert by_id["t-zip"]["files"] == ["t-zip.zip"] and by_id["t-zip"]["reference"] == "answer 2"
    assert not (out / evaluation.SUBMISSION_FILE).exists()


def test_test_split_writes_a_submission_and_no_accuracy(gaia_runs):
    out, proc, _ = gaia_runs["test"]
    summary = json.loads((out / "results.json").read_text())
    assert summary["answers_hidden"] is True
    assert not [k for k in summary["metrics"] if k.startswith(("accuracy", "pass@"))]
    assert all(q["num_correct"] is None for q in summary["questions"])
    lines = [json.loads(x) for x in (out / "submission.jsonl").read_text().splitlines()]
    rows = data_gaia_test._release_rows("test")
    assert sorted(x["task_id"] for x in lines) == sorted(r["task_id"] for r in rows)
    trajectories = {
        t["task_id"]: t
        for t in map(json.loads, (out / "trajectories.jsonl").read_text().splitlines())
    }
    for x in lines:
        assert set(x) == {"task_id", "model_answer", "reasoning_trace"}
        assert all(isinstance(v, str) for v in x.values())
        t = trajectories[x["task_id"]]
        assert x["model_answer"] == (t["final_answer"] or "")
        assert x["reasoning_trace"].startswith("Step 1:\n" + t["turns"][0]["text"].strip())
    assert "answers hidden" in (out / "report.html").read_text()
    assert "accuracy" not in proc.stderr.lower().replace("no accuracy", "")
