r"""Runs an ablation sweep: every arm of a sweep file times every seed, one `train.py` run each.

  python sweep.py --sweep=configs/sweeps/queue_ablation.py --workdir=/tmp/sweeps/queue \
      --seeds=0,1,2
  python sweep.py --sweep=configs/sweeps/queue_ablation.py:tiny --workdir=/tmp/sweeps/q --print_only
  python plot.py --workdir=/tmp/sweeps/queue --out=/tmp/sweeps/queue/curves.png

A sweep file defines `get_sweep(arg=None) -> list[dict]`, one dict per arm:
`{"name": "queue_off", "config": "configs/demo.py:queue=false", "overrides": {"total_steps": 40}}`
(`overrides` optional; keys are dotted config paths). Run `(arm, seed)` goes into
`WORKDIR/<arm>/seed_<seed>` with `--config.seed=<seed>`. Locally the runs go one after another,
each logging to `train.log` in its directory. A run counts as finished once its metrics.jsonl
reaches the config's total_steps; finished runs are skipped and unfinished ones rerun in place
(the trainer resumes from their checkpoints), so an interrupted sweep continues where it stopped.
`--print_only` prints the unfinished runs' commands (relative to the repository root), one per
line, for a cluster's job array. Every arm's config and overrides are checked before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file, optionally with `:arg` for get_sweep.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; runs go in <arm>/seed_<seed>.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Comma-separated seeds, run for every arm.")
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the commands instead of running.")
_ARMS = flags.DEFINE_list("arms", [], "Only these arms (default: all).")
_TRAIN_SCRIPT = flags.DEFINE_string(
    "train_script", "train.py", "Training script, relative to the repository root."
)
flags.mark_flags_as_required(["sweep", "workdir"])

_ARM_KEYS = {"name", "config", "overrides"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    config: str  # `path[:arg]` as train.py's --config takes it
    overrides: tuple[tuple[str, Any], ...]
    total_steps: int
    workdir: str

    def args(self) -> list[str]:
        """train.py's arguments for this run (after the script)."""
        out = [f"--config={self.config}", f"--workdir={self.workdir}", f"--config.seed={self.seed}"]
        out += [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides]
        return out


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        raise ValueError(f"Override values must be scalars, got {value!r}.")
    return str(value)


def _load_module(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"Cannot load {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(path: str) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def load_arms(sweep: str) -> list[dict]:
    """`path[:arg]` -> the validated list of arms from the file's `get_sweep(arg)`."""
    path, _, arg = sweep.partition(":")
    module = _load_module(_resolve(path), "_sweep_file")
    arms = module.get_sweep(arg or None)
    if not arms:
        raise ValueError(f"{sweep} defines no arms.")
    names = set()
    for arm in arms:
        unknown = set(arm) - _ARM_KEYS
        if unknown or "name" not in arm or "config" not in arm:
            raise ValueError(
                f"Arm {arm!r}: keys must be name, config and optionally overrides"
                f"{f'; unknown: {sorted(unknown)}' if unknown else ''}."
            )
        if not _NAME_RE.match(arm["name"]):
            raise ValueError(f"Arm name {arm['name']!r} must be usable as a directory name.")
        if arm["name"] in names:
            raise ValueError(f"Arm name {arm['name']!r} appears twice.")
        names.add(arm["name"])
    return arms


def _total_steps(config: str, overrides: Mapping[str, Any]) -> int:
    """Builds the arm's config as train.py would; unknown override keys fail here, before any
    run starts, rather than after the earlier arms have trained for hours."""
    path, _, arg = config.partition(":")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # config files import `configs.common`
    module = _load_module(_resolve(path), "_sweep_config")
    c = module.get_config(arg or None)
    for key, value in overrides.items():
        node, *parents = c, *key.split(".")[:-1]
        for part in parents:
            node = node[part]
        leaf = key.split(".")[-1]
        if leaf not in node:
            raise KeyError(f"{config}: override {key!r} is not a config key.")
        node[leaf] = value
    return int(c.total_steps)


def plan(arms: Sequence[dict], seeds: Sequence[int], workdir: str) -> list[Run]:
    runs = []
    for arm in arms:
        overrides = dict(arm.get("overrides", {}))
        if "seed" in overrides:
            raise ValueError(f"Arm {arm['name']!r}: the seed comes from --seeds, not overrides.")
        total_steps = _total_steps(arm["config"], overrides)
        for seed in seeds:
            runs.append(
                Run(
                    arm=arm["name"],
                    seed=seed,
                    config=arm["config"],
                    overrides=tuple(overrides.items()),
                    total_steps=total_steps,
                    workdir=os.path.join(workdir, arm["name"], f"seed_{seed}"),
                )
            )
    return runs


def last_step(workdir: str | os.PathLike) -> int:
    """The highest step in a run's metrics.jsonl (0 when there is none yet)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            step = max(step, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run
    return step


def is_finished(run: Run) -> bool:
    return last_step(run.workdir) >= run.total_steps


def execute(runs: Sequence[Run], python: str, train_script: str) -> list[Run]:
    """Runs the unfinished runs one after another; returns those that failed."""
    script = str(_resolve(train_script))
    failed = []
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.arm} seed {run.seed}"
        step = last_step(run.workdir)
        if step >= run.total_steps:
            print(f"{label}: finished ({step}/{run.total_steps} steps), skipped.", flush=True)
            continue
        os.makedirs(run.workdir, exist_ok=True)
        log_path = os.path.join(run.workdir, "train.log")
        resumed = f", resuming at step {step}" if step else ""
        print(f"{label}: running{resumed}; log in {log_path}", flush=True)
        t0 = time.perf_counter()
        with open(log_path, "a") as log:
            # cwd=ROOT: config paths in sweep files are relative to the repository root.
            rc = subprocess.call(
                [python, script, *run.args()], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        took = time.perf_counter() - t0
        if rc != 0 or not is_finished(run):
            failed.append(run)
            tail = "\n".join(pathlib.Path(log_path).read_text(errors="replace").splitlines()[-15:])
            print(f"{label}: FAILED (exit code {rc}) after {took:.0f} s:\n{tail}", flush=True)
        else:
            print(f"{label}: done in {took:.0f} s.", flush=True)
    return failed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}.") from None
    try:
        all_arms = load_arms(_SWEEP.value)
        missing = set(_ARMS.value) - {a["name"] for a in all_arms}
        if missing:
            raise ValueError(f"--arms: no arm named {', '.join(sorted(missing))}.")
        arms = [a for a in all_arms if not _ARMS.value or a["name"] in _ARMS.value]
        workdir = os.path.expanduser(_WORKDIR.value)
        if not _PRINT_ONLY.value:
            workdir = os.path.abspath(workdir)  # the runs' cwd is the repository root
        runs = plan(arms, seeds, workdir)
    except (ValueError, KeyError, TypeError) as e:
        raise app.UsageError(f"Bad sweep {_SWEEP.value}: {e}") from None

    if _PRINT_ONLY.value:
        pending = [r for r in runs if not is_finished(r)]
        for run in pending:
            print(shlex.join(["python", _TRAIN_SCRIPT.value, *run.args()]))
        if len(pending) < len(runs):
            print(f"# {len(runs) - len(pending)} finished runs left out.", file=sys.stderr)
        return

    os.makedirs(workdir, exist_ok=True)
    # What plot.py reads for arm order and labels; rewritten each time so it matches the file.
    manifest = {"sweep": _SWEEP.value, "seeds": seeds, "arms": all_arms}
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    failed = execute(runs, sys.executable, _TRAIN_SCRIPT.value)
    if failed:
        names = ", ".join(f"{r.arm}/seed_{r.seed}" for r in failed)
        print(f"{len(failed)} of {len(runs)} runs failed: {names}", flush=True)
        sys.exit(1)
    print(f"All {len(runs)} runs finished. Plot: python plot.py --workdir={workdir}", flush=True)


if __name__ == "__main__":
    app.run(main)
