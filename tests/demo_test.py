"""The README's main job in a shortened setting: SFT then GRPO on the synthetic suite.

`configs/demo.py:short` keeps the demo's model and its SFT stage (so the cold start must really
teach the agent something) and shortens GRPO to two small steps. The test checks that SFT lifts
held-out accuracy above the untrained model's, that GRPO runs after it, and that the run writes
its plot and Hugging Face export.
"""

import json
import os
import pathlib
import subprocess

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1800)  # ~8 min on an idle 2-core machine; shared CI boxes are slower
def test_demo_short_sft_then_grpo(tmp_path):
    workdir = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        # Keeping one checkpoint shows that the SFT result (step 0) is kept past max_to_keep.
        helpers.train_cmd(
            "demo.py:short", workdir, tmp_path / "tfds", "--config.ckpt.max_to_keep=1"
        ),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    untrained = next(r["eval_init/accuracy"] for r in rows if "eval_init/accuracy" in r)
    after_sft = next(r["eval/accuracy"] for r in rows if r["step"] == 0 and "eval/accuracy" in r)
    # SFT taught the agent to answer some held-out questions; the untrained model cannot.
    assert after_sft > untrained, (untrained, after_sft)
    assert after_sft >= 3 / 64, after_sft  # at least three of the 64 held-out questions
    sft = next(r for r in rows if "sft/loss_first" in r)
    assert sft["sft/num_demos"] > 0
    assert sft["sft/loss_last"] < 0.5 * sft["sft/loss_first"]
    # GRPO ran its steps after SFT and evaluated at the end.
    assert max(r["step"] for r in rows) == 2
    assert any("eval/accuracy" in r and r["step"] == 2 for r in rows)
    assert "Held-out accuracy: untrained" in proc.stdout
    png = (workdir / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (workdir / "export" / name).is_file()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [0, 2]
