r"""Learning curves of a sweep: eval accuracy against fresh samples drawn and against wall time.

  python plot.py --workdir=/tmp/sweeps/queue --out=/tmp/sweeps/queue/curves.png --target=0.5

Reads `WORKDIR/<arm>/seed_<s>/metrics.jsonl` (what sweep.py writes; a single run's directory
works too) and draws, per arm, the mean over seeds (band: +- one standard deviation) of the eval
metric against `samples/fresh_total` (episodes sampled online, replays not counted) and against
cumulative GRPO wall time (the sum of the logged `time/step_s`: setup, cold-start SFT and
evaluation time are left out, so arms with different eval schedules compare fairly). An eval
before the first step (step 0, after SFT) sits at zero samples. Means are taken at the eval
steps every seed reached; a step logged twice (a resumed run) counts once, with its later values.
Then it prints, per arm, the fresh samples (and wall time) needed to first reach `--target`: on
the mean curve, and per seed ("-" where never reached).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (or one run's directory).")
_OUT = flags.DEFINE_string("out", None, "PNG to write; default WORKDIR/curves.png.")
_TARGET = flags.DEFINE_float("target", 0.5, "Accuracy to reach, for the samples-to-target table.")
_METRIC = flags.DEFINE_string("metric", "eval/accuracy", "The metric on the y axis.")
_BASELINE = flags.DEFINE_string(
    "baseline", None, "An arm; the table then gives each arm's fresh samples to target over its."
)
flags.mark_flags_as_required(["workdir"])

FRESH = "samples/fresh_total"
STEP_TIME = "time/step_s"


def read_metrics(path: str | pathlib.Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: metrics}. Rows of one step are merged (the trainer writes train and
    eval metrics separately); a step logged again after a resume keeps the later values."""
    rows: dict[int, dict[str, float]] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run
        rows.setdefault(step, {}).update(record)
    return rows


def eval_points(rows: dict[int, dict[str, float]], metric: str) -> np.ndarray:
    """[num_evals, 4]: (step, fresh samples, wall time s, metric) at the steps with `metric`."""
    points, fresh, wall = [], 0.0, 0.0
    for step in sorted(rows):
        row = rows[step]
        fresh = row.get(FRESH, fresh)  # an eval before training (step 0) has drawn nothing
        wall += row.get(STEP_TIME, 0.0)
        if metric in row:
            points.append((step, fresh, wall, row[metric]))
    return np.array(points, np.float64).reshape(-1, 4)


def find_runs(workdir: pathlib.Path) -> dict[str, dict[str, pathlib.Path]]:
    """{arm: {seed label: metrics.jsonl}}, arms in sweep.json's order when there is one."""
    runs: dict[str, dict[str, pathlib.Path]] = {}
    for path in workdir.glob("*/seed_*/metrics.jsonl"):
        runs.setdefault(path.parent.parent.name, {})[path.parent.name] = path
    if not runs and (workdir / "metrics.jsonl").is_file():
        runs[workdir.name] = {"seed": workdir / "metrics.jsonl"}
    order = []
    manifest = workdir / "sweep.json"
    if manifest.is_file():
        order = [a["name"] for a in json.loads(manifest.read_text())["arms"]]
    rank = {name: i for i, name in enumerate(order)}

    def seed_key(label: str):
        m = re.fullmatch(r"seed_(-?\d+)", label)
        return (0, int(m.group(1)), "") if m else (1, 0, label)

    return {
        arm: dict(sorted(runs[arm].items(), key=lambda kv: seed_key(kv[0])))
        for arm in sorted(runs, key=lambda a: (rank.get(a, len(rank)), a))
    }


def mean_curve(curves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' eval points -> (mean [n, 4], std of the metric [n]) at the steps all seeds share."""
    common = set(curves[0][:, 0])
    for c in curves[1:]:
        common &= set(c[:, 0])
    steps = np.array(sorted(common))
    stacked = np.stack([c[np.isin(c[:, 0], steps)] for c in curves])  # [seeds, n, 4]
    return stacked.mean(axis=0), stacked[:, :, 3].std(axis=0)


def first_reach(points: np.ndarray, target: float) -> tuple[float, float] | None:
    """(fresh samples, wall s) at the first eval point with metric >= target, else None."""
    hits = np.nonzero(points[:, 3] >= target)[0]
    return None if len(hits) == 0 else (float(points[hits[0], 1]), float(points[hits[0], 2]))


def plot(arms: dict[str, tuple[np.ndarray, np.ndarray, int]], metric, target, title, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    max_wall = max((m[:, 2].max() for m, _, _ in arms.values() if len(m)), default=0.0)
    unit, scale = ("h", 3600.0) if max_wall > 3 * 3600 else ("min", 60.0)
    if max_wall < 600:
        unit, scale = "s", 1.0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (arm, (mean, std, num_seeds)) in enumerate(arms.items()):
        color = f"C{i % 10}"
        label = f"{arm} ({num_seeds} seed{'s' if num_seeds > 1 else ''})"
        for ax, col, x_scale in ((axes[0], 1, 1.0), (axes[1], 2, scale)):
            x = mean[:, col] / x_scale
            ax.plot(x, mean[:, 3], marker="o", ms=3, color=color, label=label)
            if num_seeds > 1:
                ax.fill_between(x, mean[:, 3] - std, mean[:, 3] + std, color=color, alpha=0.15)
    for ax in axes:
        ax.axhline(target, color="0.5", ls="--", lw=1)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("fresh samples drawn (episodes)")
    axes[1].set_xlabel(f"training wall time ({unit})")
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir = pathlib.Path(_WORKDIR.value).expanduser()
    metric, target = _METRIC.value, _TARGET.value
    runs = find_runs(workdir)
    if not runs:
        raise app.UsageError(f"No metrics.jsonl under {workdir} (expected <arm>/seed_<s>/).")

    arms, per_seed = {}, {}
    for arm, seeds in runs.items():
        curves = {}
        for label, path in seeds.items():
            points = eval_points(read_metrics(path), metric)
            if len(points):
                curves[label] = points
            else:
                print(f"warning: {path} has no {metric}; left out.", file=sys.stderr)
        if curves:
            mean, std = mean_curve(list(curves.values()))
            arms[arm] = (mean, std, len(curves))
            per_seed[arm] = {label: first_reach(c, target) for label, c in curves.items()}
    if not arms:
        raise app.UsageError(f"No run under {workdir} has logged {metric} yet.")

    out = pathlib.Path(_OUT.value).expanduser() if _OUT.value else workdir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(arms, metric, target, str(workdir), out)
    print(f"Wrote {out}")

    # The table: fresh samples (and training wall time) to first reach the target.
    reached = {arm: first_reach(mean, target) for arm, (mean, _, _) in arms.items()}
    baseline = _BASELINE.value
    if baseline is not None and reached.get(baseline) is None:
        raise app.UsageError(f"--baseline={baseline}: no such arm, or it never reached {target}.")
    header = ["arm", "seeds", "final", "fresh_to_target", "wall_to_target_s"]
    header += [f"vs_{baseline}"] if baseline else []
    header += ["per_seed_fresh"]
    table = []
    for arm, (mean, _, num_seeds) in arms.items():
        hit = reached[arm]
        row = [arm, str(num_seeds), f"{mean[-1, 3]:.4f}"]
        row += [f"{hit[0]:.0f}", f"{hit[1]:.1f}"] if hit else ["-", "-"]
        if baseline:
            row.append(
                f"{hit[0] / reached[baseline][0]:.3f}" if hit and reached[baseline][0] else "-"
            )
        row.append(",".join(f"{h[0]:.0f}" if h else "-" for h in per_seed[arm].values()))
        table.append(row)
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(f"{metric} >= {target} (mean over seeds; final = at the last common eval step)")
    for row in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    app.run(main)
