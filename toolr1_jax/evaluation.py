"""Evaluation: run the agent on examples, grade every episode, compute metrics, write the outputs.

`evaluate` is what both `evaluate.py` and the trainer's periodic evaluation call; `write_outputs`
writes `results.json` (metrics and per-question counts), `trajectories.jsonl` (one episode a line)
and `report.html` (a self-contained, JavaScript-free page to browse every episode).
"""

from __future__ import annotations

import ast
import asyncio
import collections
import dataclasses
import html
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tqdm

from toolr1_jax import engine as engine_lib
from toolr1_jax.agent import rollout
from toolr1_jax.data import types as data_types
from toolr1_jax.rewards import gaia_scorer
from toolr1_jax.rewards import judge as judge_lib
from toolr1_jax.tools import registry

RESULTS_FILE = "results.json"
TRAJECTORIES_FILE = "trajectories.jsonl"
REPORT_FILE = "report.html"
# GAIA's leaderboard takes one JSONL line per test task: task_id, model_answer, reasoning_trace.
SUBMISSION_FILE = "submission.jsonl"


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One graded episode.

    `correct` is GAIA's exact scorer on the final answer (an episode without one is wrong), or
    None when the reference is hidden (GAIA's test split): there is nothing to score against.
    The judge fields are set only when a judge was given and the episode answered: `judge_score`
    is its verdict, or None with `judge_error` saying why the judge failed.
    """

    example: data_types.Example
    sample: int  # index of this episode among its question's samples
    trajectory: data_types.Trajectory
    correct: bool | None
    num_tool_calls: int  # calls of the agent's tools (final_answer excluded) in code that ran
    judge_score: float | None = None
    judge_rationale: str = ""
    judge_error: str = ""


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """`metrics` is flat (`accuracy`, `accuracy/level_1`, `pass@2`, ...) so a trainer can log it
    as is; `records` are in example order, then sample order."""

    metrics: dict[str, float]
    records: tuple[EvalRecord, ...]
    num_samples: int
    judged: bool  # a judge was given (the judge_* metrics are present)
    # The references are hidden (GAIA's test split): no accuracy, a submission file instead.
    answers_hidden: bool = False


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k: {name} must be an int, got {value!r}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    # Exact integer binomials: the float product form loses precision for large n.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def count_tool_calls(code: str, tool_names: Iterable[str]) -> int:
    """How many calls `code` makes to functions named in `tool_names`.

    Read from the syntax tree, so a name in a string or comment, or a method of the same name
    (`df.search(...)`), does not count. Code that does not parse falls back to a textual match
    of `name(`: the sandbox ran it (and reported the syntax error), so a rough count is better
    than none.
    """
    names = frozenset(tool_names)
    if not names:
        return 0
    try:
        tree = ast.parse(code)
    except SyntaxError:
        pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")\s*\(")
        return len(pattern.findall(code))
    return sum(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
        for node in ast.walk(tree)
    )


def _code_ran(turn: data_types.Turn) -> bool:
    return turn.code is not None and turn.exec_status not in (None, "parse_error")


def _rate(numerator: float, denominator: float) -> float:
    # A rate over nothing is 0; the count beside each rate in the metrics tells the two apart.
    return numerator / denominator if denominator else 0.0


def answers_hidden(examples: Sequence[data_types.Example]) -> bool:
    """True when every example's reference is hidden (GAIA's test split), False when none is."""
    hidden = {bool(e.metadata.get("answer_hidden", False)) for e in examples}
    if len(hidden) > 1:
        shown = [e.task_id for e in examples if e.metadata.get("answer_hidden")][:5]
        raise ValueError(
            f"evaluate: some examples have hidden answers ({shown}...) and some do not; evaluate "
            "GAIA's test split (hidden answers) and validation split separately"
        )
    return hidden == {True}


def compute_metrics(
    records: Sequence[EvalRecord], *, num_samples: int, judged: bool, answers_hidden: bool = False
) -> dict[str, float]:
    """Metrics of graded episodes; every question must have exactly `num_samples` records.

    With `answers_hidden` the scoring metrics (accuracy, pass@k) are left out: only the agent
    statistics and counts remain.

    Keys: `accuracy` (share of episodes the GAIA scorer accepts), `accuracy/level_L`,
    `accuracy/family_F` (tasks with a `metadata["family"]`, as the synthetic suite's), `pass@k`
    and `pass@k/level_L` for k = 1..num_samples (the unbiased estimator, averaged over
    questions), `answer_rate`, `avg_turns`, `avg_tokens`, `avg_sampled_tokens`, `tool_call_rate`
    (share of episodes whose code called a tool at least once), `tool_calls_per_episode`,
    `code_error_rate` (share of code runs that did not end "ok"), `format_error_rate` (share of
    turns without code or answer), `status/S` (share of episodes that ended with status S), the
    counts they are over, and with a judge `judge_agreement` (share of judged episodes where the
    judge's verdict, score >= 0.5, equals the scorer's), `judge_accuracy` (mean judge score,
    unanswered episodes counting 0), `num_judged` and `num_judge_failures`.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not records:
        raise ValueError("compute_metrics: no records to compute metrics over")
    by_question: dict[str, list[EvalRecord]] = collections.defaultdict(list)
    for r in records:
        by_question[r.example.task_id].append(r)
    wrong = {t: len(rs) for t, rs in by_question.items() if len(rs) != num_samples}
    if wrong:
        shown = ", ".join(f"{t}: {n}" for t, n in sorted(wrong.items())[:5])
        raise ValueError(
            f"compute_metrics: every question needs {num_samples} records; got {shown}"
        )

    m: dict[str, float] = {}
    n = len(records)
    m["num_questions"] = len(by_question)
    m["num_episodes"] = n
    m["num_samples"] = num_samples
    levels = sorted({rs[0].example.level for rs in by_question.values()})
    for level in levels:
        rs = [r for r in records if r.example.level == level]
        if not answers_hidden:
            m[f"accuracy/level_{level}"] = _rate(sum(r.correct for r in rs), len(rs))
        m[f"num_questions/level_{level}"] = len(rs) // num_samples
    # Task families (the synthetic suite's metadata["family"]): which kinds of task a change helps.
    families = sorted(
        {f for rs in by_question.values() if (f := rs[0].example.metadata.get("family"))}
    )
    for family in families:
        rs = [r for r in records if r.example.metadata.get("family") == family]
        if not answers_hidden:
            m[f"accuracy/family_{family}"] = _rate(sum(r.correct for r in rs), len(rs))
        m[f"num_questions/family_{family}"] = len(rs) // num_samples
    if not answers_hidden:
        m["accuracy"] = _rate(sum(r.correct for r in records), n)
    for k in range(1, 1 if answers_hidden else num_samples + 1):
        per_question = {
            t: pass_at_k(num_samples, sum(r.correct for r in rs), k)
            for t, rs in by_question.items()
        }
        m[f"pass@{k}"] = sum(per_question.values()) / len(per_question)
        for level in levels:
            values = [
                v for t, v in per_question.items() if by_question[t][0].example.level == level
            ]
            m[f"pass@{k}/level_{level}"] = sum(values) / len(values)

    trajectories = [r.trajectory for r in records]
    turns = [t for traj in trajectories for t in traj.turns]
    code_runs = [t for t in turns if _code_ran(t)]
    m["answer_rate"] = _rate(sum(t.final_answer is not None for t in trajectories), n)
    m["avg_turns"] = _rate(len(turns), n)
    m["avg_tokens"] = _rate(sum(len(t.tokens) for t in trajectories), n)
    m["avg_sampled_tokens"] = _rate(sum(int(t.loss_mask.sum()) for t in trajectories), n)
    m["tool_call_rate"] = _rate(sum(r.num_tool_calls > 0 for r in records), n)
    m["tool_calls_per_episode"] = _rate(sum(r.num_tool_calls for r in records), n)
    m["num_turns"] = len(turns)
    m["num_code_runs"] = len(code_runs)
    m["code_error_rate"] = _rate(sum(t.exec_status != "ok" for t in code_runs), len(code_runs))
    m["format_error_rate"] = _rate(sum(t.exec_status == "parse_error" for t in turns), len(turns))
    for status, count in sorted(collections.Counter(t.status for t in trajectories).items()):
        m[f"status/{status}"] = count / n

    if judged:
        verdicts = [r for r in records if r.judge_score is not None]
        m["num_judged"] = len(verdicts)
        m["num_judge_failures"] = sum(bool(r.judge_error) for r in records)
        m["judge_agreement"] = _rate(
            sum((r.judge_score >= 0.5) == r.correct for r in verdicts), len(verdicts)
        )
        # Unanswered episodes are not judged and score 0; failed judgements are left out.
        scored = [r for r in records if not r.judge_error]
        m["judge_accuracy"] = _rate(sum(r.judge_score or 0.0 for r in scored), len(scored))
    return m


# ----------------------------------------------------------------------------------------------
# Running the agent
# ----------------------------------------------------------------------------------------------


def grade(
    example: data_types.Example,
    sample: int,
    traj: data_types.Trajectory,
    tool_names: Iterable[str],
) -> EvalRecord:
    """The episode's record: GAIA's scorer on its final answer (None when the reference is
    hidden) and its calls to `tool_names`."""
    correct = None
    if not example.metadata.get("answer_hidden", False):
        # Never scored against a hidden "?": the scorer would accept "", "?" and "." for it.
        correct = traj.final_answer is not None and bool(
            gaia_scorer.question_scorer(traj.final_answer, example.answer)
        )
    names = frozenset(tool_names)
    calls = sum(count_tool_calls(t.code, names) for t in traj.turns if _code_ran(t))
    return EvalRecord(example, sample, traj, correct, calls)


async def _judge_record(judge: judge_lib.Judge, record: EvalRecord) -> EvalRecord:
    answer = record.trajectory.final_answer
    if answer is None:
        return record
    try:
        verdict = await judge.score(record.example.question, record.example.answer, answer)
    except judge_lib.JudgeError as e:
        # Reported, never counted as a wrong verdict (DESIGN section 8).
        return dataclasses.replace(record, judge_error=str(e) or type(e).__name__)
    return dataclasses.replace(record, judge_score=verdict.score, judge_rationale=verdict.rationale)


async def evaluate(
    examples: Sequence[data_types.Example],
    *,
    engine: engine_lib.Engine,
    tokenizer,
    pool,
    tools: Sequence[registry.Tool],
    agent_config: rollout.AgentConfig,
    sampling: engine_lib.SamplingParams,
    num_samples: int,
    judge: judge_lib.Judge | None = None,
    progress: bool = True,
    policy_version: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> EvalResult:
    """Runs `num_samples` episodes of every example and grades them.

    Args:
      examples: the questions, with unique task ids.
      engine: an idle `Engine` holding the policy's weights.
      tokenizer: `models.tokenizer.Tokenizer`.
      pool: a started `SandboxPool` whose tools are `tools`.
      tools: the tools the agent has (the pool's); calls to them give the tool-call metrics.
      agent_config: `rollout.AgentConfig`.
      sampling: temperature, top-p, top-k and base seed (see `rollout.rollout`).
      num_samples: episodes per question (n of pass@k).
      judge: when given, every answered episode is also judged and the judge_* metrics are
        reported; a judge failure is recorded on the episode, not raised. Not allowed when the
        answers are hidden (GAIA's test split), where the result has no accuracy and
        `write_outputs` writes a leaderboard submission instead.
      progress: show a progress bar (episodes done, running accuracy) on stderr.
      policy_version: stored in the trajectories.
      shard: `(index, count)`: run only examples `index, index + count, ...`, one process's share
        of a multi-host evaluation; `merge_shards` joins the shares. Episode seeds follow each
        example's position in `examples`, so the shares sample what one unsharded run would.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("evaluate: no examples given")
    for e in examples:
        if not isinstance(e, data_types.Example):
            raise TypeError(f"evaluate: examples must be Examples, got {type(e).__name__}")
    ids = collections.Counter(e.task_id for e in examples)
    duplicates = sorted(t for t, c in ids.items() if c > 1)
    if duplicates:
        raise ValueError(f"evaluate: task ids must be unique, repeated: {duplicates[:5]}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"evaluate: num_samples must be an integer >= 1, got {num_samples!r}")
    hidden = answers_hidden(examples)
    if hidden and judge is not None:
        raise ValueError("evaluate: the answers are hidden (GAIA's test split): nothing to judge")
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(
            f"evaluate: shard must be (index, count) with 0 <= index < count, got {shard}"
        )
    tools = registry.check_unique(tools)
    tool_names = [t.name for t in tools]
    pool_names = [t.name for t in pool.tools]
    if sorted(tool_names) != sorted(pool_names):
        # The prompt shows the pool's tools; counting calls to others would misreport.
        raise ValueError(
            f"evaluate: tools {sorted(tool_names)} differ from the sandbox pool's tools "
            f"{sorted(pool_names)}"
        )

    mine = _share(len(examples), index, count)

    graded: dict[int, list[EvalRecord]] = {}
    bar = tqdm.tqdm(
        total=len(mine) * num_samples,
        desc="eval",
        unit="episode",
        disable=not progress,
        dynamic_ncols=True,
    )
    num_done, num_correct = 0, 0

    async def on_group(group: rollout.Group) -> None:
        nonlocal num_done, num_correct
        records = [
            grade(group.example, i, traj, tool_names) for i, traj in enumerate(group.trajectories)
        ]
        num_done += len(records)
        bar.update(len(records))
        if hidden:
            num_correct += sum(r.trajectory.final_answer is not None for r in records)
            bar.set_postfix(answered=f"{num_correct / num_done:.3f}", refresh=False)
        else:
            num_correct += sum(r.correct for r in records)
            bar.set_postfix(accuracy=f"{num_correct / num_done:.3f}", refresh=False)
        if judge is not None:
            records = await asyncio.gather(*(_judge_record(judge, r) for r in records))
        graded[group.group_id] = list(records)

    start = time.perf_counter()
    try:
        stats = await rollout.rollout(
            [rollout.GroupRequest(examples[i], num_samples, i) for i in mine],
            engine=engine,
            tokenizer=tokenizer,
            pool=pool,
            config=agent_config,
            sampling=sampling,
            policy_version=policy_version,
            on_group=on_group,
        )
    finally:
        bar.close()
    records = tuple(r for i in mine for r in graded[i])
    # A share can be empty (more processes than questions); its metrics come from the merge.
    metrics = (
        compute_metrics(
            records, num_samples=num_samples, judged=judge is not None, answers_hidden=hidden
        )
        if records
        else {}
    )
    metrics["wall_s"] = time.perf_counter() - start
    metrics["time/engine_s"] = stats.engine_s
    metrics["time/sandbox_s"] = stats.sandbox_s
    return EvalResult(metrics, records, num_samples, judge is not None, hidden)


def _share(num_examples: int, index: int, count: int) -> range:
    """The example positions of share `index` of `count`: every count-th, from `index`."""
    return range(index, num_examples, count)


def merge_shards(shards: Sequence[EvalResult]) -> EvalResult:
    """One result from every share of `evaluate(..., shard=(i, len(shards)))`, in share order.

    Records return to example order and the metrics are computed over all of them; the times are
    the slowest share's (the processes ran side by side).
    """
    count = len(shards)
    if not count:
        raise ValueError("merge_shards: no shares given")
    n, hidden = shards[0].num_samples, shards[0].answers_hidden
    if any(
        (s.num_samples, s.judged, s.answers_hidden) != (n, shards[0].judged, hidden) for s in shards
    ):
        raise ValueError(
            "merge_shards: the shares differ in num_samples, judging or hidden answers"
        )
    groups = [[s.records[j : j + n] for j in range(0, len(s.records), n)] for s in shards]
    num_examples = sum(len(g) for g in groups)
    shares = [_share(num_examples, i, count) for i in range(count)]
    if [len(g) for g in groups] != [len(share) for share in shares]:
        raise ValueError(
            f"merge_shards: shares of {[len(g) for g in groups]} questions are not the "
            f"({count}-way, in order) split of {num_examples} questions"
        )
    by_example = {
        i: g
        for share, gs in zip(shares, groups, strict=True)
        for i, g in zip(share, gs, strict=True)
    }
    records = tuple(r for i in range(num_examples) for r in by_example[i])
    metrics = compute_metrics(
        records, num_samples=n, judged=shards[0].judged, answers_hidden=hidden
    )
    for key in ("wall_s", "time/engine_s", "time/sandbox_s"):
        metrics[key] = max(s.metrics[key] for s in shards)
    return EvalResult(metrics, records, n, shards[0].judged, hidden)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def episode_json(traj: data_types.Trajectory, example: data_types.Example) -> dict[str, Any]:
    """An episode as one JSON line: its question, turns and outcome (token ids are left out;
    their counts are kept). Evaluation and the trainer's rollout dump both write these."""
    return {
        "task_id": example.task_id,
        "group_id": traj.group_id,
        "level": example.level,
        "family": example.metadata.get("family"),
        "question": example.question,
        "reference": example.answer,
        "files": sorted(example.files),
        "final_answer": traj.final_answer,
        "status": traj.status,
        "num_tokens": len(traj.tokens),
        "num_sampled_tokens": int(traj.loss_mask.sum()),
        "prompt_len": traj.prompt_len,
        "policy_version": traj.policy_version,
        "turns": [
            {
                "text": t.text,
                "code": t.code,
                "observation": t.observation,
                "exec_status": t.exec_status,
                "duration_s": t.duration_s,
            }
            for t in traj.turns
        ],
    }


def record_json(record: EvalRecord) -> dict[str, Any]:
    """One line of trajectories.jsonl: the episode and its grade."""
    return {
        "sample": record.sample,
        **episode_json(record.trajectory, record.example),
        "correct": record.correct,
        "judge_score": record.judge_score,
        "judge_rationale": record.judge_rationale,
        "judge_error": record.judge_error,
        "num_tool_calls": record.num_tool_calls,
    }


def results_json(result: EvalResult, run_info: Mapping[str, Any] | None = None) -> dict:
    """The content of results.json: metrics, per-question counts and what was run."""
    questions = []
    by_question: dict[str, list[EvalRecord]] = {}
    for r in result.records:
        by_question.setdefault(r.example.task_id, []).append(r)
    for task_id, rs in by_question.items():
        questions.append(
            {
                "task_id": task_id,
                "level": rs[0].example.level,
                "reference": rs[0].example.answer,
                "num_samples": len(rs),
                "num_correct": None if result.answers_hidden else sum(r.correct for r in rs),
                "answers": [r.trajectory.final_answer for r in rs],
            }
        )
    return {
        "metrics": dict(result.metrics),
        "num_samples": result.num_samples,
        "judged": result.judged,
        "answers_hidden": result.answers_hidden,
        "run": dict(run_info or {}),
        "questions": questions,
    }


def reasoning_trace(traj: data_types.Trajectory) -> str:
    """An episode as text: each turn's thought and code, then what the code printed."""
    parts = []
    for k, turn in enumerate(traj.turns, 1):
        parts.append(f"Step {k}:\n{turn.text.strip()}")
        if turn.observation:
            parts.append(f"Observation:\n{turn.observation.strip()}")
    return "\n\n".join(parts)


def submission_lines(result: EvalResult) -> list[dict[str, str]]:
    """GAIA leaderboard lines, one per question in example order.

    With several samples per question the first that gave an answer is submitted (sample 0
    when none did), so a greedy run submits its one episode.
    """
    by_question: dict[str, list[EvalRecord]] = {}
    for r in result.records:
        by_question.setdefault(r.example.task_id, []).append(r)
    lines = []
    for task_id, rs in by_question.items():
        chosen = next((r for r in rs if r.trajectory.final_answer is not None), rs[0])
        answer = chosen.trajectory.final_answer
        lines.append(
            {
                "task_id": task_id,
                "model_answer": "" if answer is None else str(answer),
                "reasoning_trace": reasoning_trace(chosen.trajectory),
            }
        )
    return lines


def write_outputs(
    result: EvalResult,
    output_dir: str | os.PathLike,
    *,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, pathlib.Path]:
    """Writes results.json, trajectories.jsonl and report.html into `output_dir` (created if
    needed), and submission.jsonl (GAIA's leaderboard format) when the answers are hidden;
    `run_info` (model, split, config, ...) goes into results.json and the report.
    Returns the paths by file name."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [RESULTS_FILE, TRAJECTORIES_FILE, REPORT_FILE]
    if result.answers_hidden:
        names.append(SUBMISSION_FILE)
        submission = "".join(
            json.dumps(line, ensure_ascii=False) + "\n" for line in submission_lines(result)
        )
        _write_text(out / SUBMISSION_FILE, submission)
    paths = {name: out / name for name in names}
    summary = results_json(result, run_info)
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers.
    _write_text(paths[RESULTS_FILE], json.dumps(summary, indent=2, allow_nan=False) + "\n")
    lines = (json.dumps(record_json(r), ensure_ascii=False) + "\n" for r in result.records)
    _write_text(paths[TRAJECTORIES_FILE], "".join(lines))
    _write_text(paths[REPORT_FILE], render_report(result, run_info))
    return paths


def _write_text(path: pathlib.Path, text: str) -> None:
    # Write then rename, so a reader (or a crash) never sees half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# HTML report
# ----------------------------------------------------------------------------------------------

# Filtering is done with CSS alone (radio buttons and sibling selectors), so the page needs no
# script and what a headless browser's DOM dump shows is the page itself.
_CSS = """\
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em;
  color: #1d1d1f; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table.metrics { border-collapse: collapse; margin: .5em 0; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f5f5f7; padding: .5em; overflow-x: auto; white-space: pre-wrap;
  word-break: break-word; margin: .3em 0; }
pre.code { background: #eef3fb; }
pre.observation { background: #f4f8ee; }
details.trajectory { border: 1px solid #ccc; border-left: 6px solid #c62828; margin: .4em 0;
  border-radius: 4px; }
details.trajectory[data-correct="true"] { border-left-color: #2e7d32; }
details.trajectory > summary { cursor: pointer; padding: .3em .6em; }
details.trajectory > div.body { padding: 0 1em 1em; }
.verdict { font-weight: bold; }
.verdict.correct { color: #2e7d32; } .verdict.wrong { color: #c62828; }
.muted { color: #666; }
section.question > h3 { font-size: 1em; margin: 1.2em 0 .3em; }
div.turn { border-top: 1px dashed #ccc; margin-top: .6em; padding-top: .3em; }
input[name="filter"] { display: none; }
.filters label { margin-right: 1em; cursor: pointer; text-decoration: underline; }
#show-all:checked ~ p.filters label[for="show-all"],
#show-correct:checked ~ p.filters label[for="show-correct"],
#show-wrong:checked ~ p.filters label[for="show-wrong"] {
  font-weight: bold; text-decoration: none; }
#show-correct:checked ~ main details.trajectory[data-correct="false"] { display: none; }
#show-wrong:checked ~ main details.trajectory[data-correct="true"] { display: none; }
"""


# C0 controls other than tab and newline (an untrained policy samples them) are shown as
# escapes: HTML forbids them as text, and invisible they would hide what the policy wrote.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _esc(value: Any) -> str:
    text = _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group(0)):02x}", str(value))
    return html.escape(text, quote=True)


def _format_metric(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4f}"
    if isinstance(value, float):
        return str(int(value))
    return _esc(value)


def _json_bool(value: bool | None) -> str:
    return "null" if value is None else str(value).lower()


def _thought(turn: data_types.Turn) -> str:
    """The turn's text before its code block (all of it when the turn had no code)."""
    if turn.code is None:
        return turn.text
    cut = [i for i in (turn.text.find("<code>"), turn.text.find("```")) if i >= 0]
    return turn.text[: min(cut)] if cut else turn.text


def _verdict_html(record: EvalRecord) -> str:
    if record.correct is None:
        parts = ['<span class="verdict hidden">GAIA scorer: answer hidden, not scored</span>']
    else:
        word, cls = ("correct", "correct") if record.correct else ("wrong", "wrong")
        parts = [f'<span class="verdict {cls}">GAIA scorer: {word}</span>']
    if record.judge_score is not None:
        parts.append(
            f'<span class="judge">judge: {record.judge_score:g}</span>'
            f'<pre class="rationale">{_esc(record.judge_rationale)}</pre>'
        )
    elif record.judge_error:
        parts.append(
            f'<span class="judge">judge failed</span><pre>{_esc(record.judge_error)}</pre>'
        )
    return " ".join(parts)


def _trajectory_html(index: int, record: EvalRecord) -> str:
    traj, ex = record.trajectory, record.example
    answer = "(none)" if traj.final_answer is None else traj.final_answer
    mark, cls = {True: ("&#10003;", "correct"), False: ("&#10007;", "wrong")}.get(
        record.correct, ("?", "hidden")
    )
    summary = (
        f'<span class="verdict {cls}">{mark}</span> '
        f"<b>{_esc(ex.task_id)}</b> #{record.sample} "
        f'<span class="muted">level {ex.level} &middot; {_esc(traj.status)} &middot; '
        f"{len(traj.turns)} turn(s) &middot; answer:</span> {_esc(answer)}"
    )
    body = [
        f'<p><b>Question</b></p><pre class="question">{_esc(ex.question)}</pre>',
        f'<p><b>Reference answer:</b> <span class="reference">{_esc(ex.answer)}</span></p>',
    ]
    if ex.files:
        body.append(f"<p><b>Files:</b> {_esc(', '.join(sorted(ex.files)))}</p>")
    for k, turn in enumerate(traj.turns, 1):
        status = "no code run" if turn.exec_status is None else turn.exec_status
        parts = [
            f'<div class="turn"><p><b>Turn {k}</b> <span class="muted">({_esc(status)}, '
            f"{turn.duration_s:.2f} s)</span></p>"
        ]
        thought = _thought(turn).strip()
        if thought:
            parts.append(f'<pre class="thought">{_esc(thought)}</pre>')
        if turn.code is not None:
            parts.append(f'<pre class="code"><code>{_esc(turn.code)}</code></pre>')
        if turn.observation:
            parts.append(f'<pre class="observation">{_esc(turn.observation)}</pre>')
        parts.append("</div>")
        body.append("".join(parts))
    body.append(
        f'<p><b>Final answer:</b> <span class="final-answer">{_esc(answer)}</span> '
        f'<span class="muted">(status {_esc(traj.status)})</span></p>'
    )
    body.append(f"<p>{_verdict_html(record)}</p>")
    return (
        f'<details class="trajectory" id="t{index}" data-task-id="{_esc(ex.task_id)}" '
        f'data-correct="{_json_bool(record.correct)}"><summary>{summary}</summary>'
        f'<div class="body">{"".join(body)}</div></details>'
    )


def render_report(result: EvalResult, run_info: Mapping[str, Any] | None = None) -> str:
    """A self-contained HTML page: the metrics, then one collapsible entry per episode
    (question, each turn's thought, code and observation, the final answer and the verdicts),
    grouped by question. No scripts and no external resources."""
    rows = "".join(
        f'<tr><th>{_esc(k)}</th><td class="num">{_format_metric(v)}</td></tr>'
        for k, v in result.metrics.items()
    )
    run_rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>"
        for k, v in (run_info or {}).items()
        if not isinstance(v, Mapping)
    )
    sections, index = [], 0
    by_question: dict[str, list[EvalRecord]] = {}
    for r in result.records:
        by_question.setdefault(r.example.task_id, []).append(r)
    for task_id, rs in by_question.items():
        entries = []
        for r in rs:
            entries.append(_trajectory_html(index, r))
            index += 1
        if result.answers_hidden:
            tally = f"{sum(r.trajectory.final_answer is not None for r in rs)}/{len(rs)} answered"
        else:
            tally = f"{sum(r.correct for r in rs)}/{len(rs)} correct"
        sections.append(
            f'<section class="question"><h3>{_esc(task_id)} '
            f'<span class="muted">level {rs[0].example.level} &middot; {tally}'
            f"</span></h3>{''.join(entries)}</section>"
        )
    n = len(result.records)
    if result.answers_hidden:
        score = "answers hidden (GAIA test split): no accuracy, see submission.jsonl"
    else:
        score = f"accuracy {result.metrics.get('accuracy', 0.0):.4f}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>toolr1_jax evaluation</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>toolr1_jax evaluation</h1>"
        f"<p>{n} episode(s) over {len(by_question)} question(s), {result.num_samples} sample(s) "
        f"each; {score}.</p>"
        + (f'<table class="metrics run">{run_rows}</table>' if run_rows else "")
        + f'<h2>Metrics</h2><table class="metrics">{rows}</table>'
        "<h2>Episodes</h2>"
        '<input type="radio" name="filter" id="show-all" checked>'
        '<input type="radio" name="filter" id="show-correct">'
        '<input type="radio" name="filter" id="show-wrong">'
        '<p class="filters"><label for="show-all">all</label>'
        '<label for="show-correct">correct only</label>'
        '<label for="show-wrong">wrong only</label></p>'
        f"<main>{''.join(sections)}</main></body></html>\n"
    )


def summarize_accuracy(
    workdir: pathlib.Path, metric: str = "accuracy", *, plot: bool = True
) -> dict[str, float]:
    """Eval `metric` (a key under `eval/`) before training, after SFT (step 0) and at the last
    eval, from a training run's `metrics.jsonl`; with `plot`, draws `accuracy.png` beside it: the
    metric and each level's accuracy against GRPO step and against fresh episodes drawn (replays
    not counted, so runs with and without the sample queue compare on the sampling they paid
    for)."""
    rows: dict[int, dict[str, float]] = collections.defaultdict(dict)
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        rows[d.pop("step")].update(d)
    summary: dict[str, float] = {}
    init = next((r for _, r in sorted(rows.items()) if f"eval_init/{metric}" in r), None)
    if init is not None:
        summary["untrained"] = init[f"eval_init/{metric}"]
    evals = {step: r for step, r in sorted(rows.items()) if f"eval/{metric}" in r}
    if not evals:
        return summary
    if 0 in evals:
        summary["start"] = evals[0][f"eval/{metric}"]
    summary["final"] = evals[max(evals)][f"eval/{metric}"]
    if not plot:
        return summary

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fresh, fresh_at = 0.0, {}
    for step, r in sorted(rows.items()):
        fresh = r.get("samples/fresh_total", fresh)  # step 0 (after SFT) has drawn nothing
        fresh_at[step] = fresh
    levels = sorted(
        {
            k.rsplit("_", 1)[1]
            for r in evals.values()
            for k in r
            if k.startswith("eval/accuracy/level_")
        }
    )
    label = {"accuracy": "all levels", "accuracy/grpo_levels": "GRPO's levels"}.get(metric, metric)
    curves = [(f"eval/{metric}", label)]
    curves += [(f"eval/accuracy/level_{lv}", f"level {lv}") for lv in levels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    steps = sorted(evals)
    for ax, xs, xlabel in (
        (axes[0], steps, "GRPO step (0 = after SFT)"),
        (axes[1], [fresh_at[s] for s in steps], "fresh episodes drawn"),
    ):
        for i, (key, label) in enumerate(curves):
            ys = [evals[s].get(key, float("nan")) for s in steps]
            ax.plot(xs, ys, marker="o", lw=2.5 if i == 0 else 1, label=label)
        if "untrained" in summary:
            ax.axhline(summary["untrained"], color="gray", linestyle="--", label="untrained")
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("held-out accuracy (greedy)")
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "accuracy.png", dpi=100)
    plt.close(fig)
    return summary
