"""The reward of a trajectory: judge score, share of successful code runs, well-formedness.

total = w_answer * judge + w_exec * (code runs ok / code runs) + w_format * (every turn parsed),
with the auxiliary terms counted only for answered episodes when `aux_requires_answer`. A group
whose judging failed is returned as a `DroppedGroup`, never scored 0. Imports no JAX.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence

from toolr1_jax.data import types as data_types
from toolr1_jax.rewards import judge as judge_lib


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    w_answer: float = 1.0
    w_exec: float = 0.1
    w_format: float = 0.1
    # Without an answer, code that ran and tidy turns earn nothing: otherwise the policy can
    # farm the auxiliary terms by never finishing.
    aux_requires_answer: bool = True

    def __post_init__(self):
        for name in ("w_answer", "w_exec", "w_format"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RewardConfig.{name} must be a finite number, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class DroppedGroup:
    """Marks a group that must not enter the update because its judging failed."""

    task_id: str
    num_trajectories: int
    reason: str


def score_trajectory(
    traj: data_types.Trajectory, judge_score: float | None, config: RewardConfig
) -> data_types.Trajectory:
    """`traj` with `reward` and `reward_components` filled.

    `judge_score` is the judge's score of `traj.final_answer`; it must be None exactly when the
    trajectory gave no final answer (that scores 0 on the answer term without a judge).
    Components (unweighted, after gating): `answer`, `exec` (share of code runs that succeeded,
    0 with no code runs), `format` (1 when every turn parsed) and `answered`.
    """
    answered = traj.final_answer is not None
    if answered and judge_score is None:
        raise ValueError(
            f"Trajectory {traj.task_id}/{traj.group_id} has a final answer but no judge score."
        )
    if not answered and judge_score is not None:
        raise ValueError(
            f"Trajectory {traj.task_id}/{traj.group_id} has no final answer but got judge score "
            f"{judge_score}; unanswered trajectories are not judged."
        )
    if answered and judge_score not in judge_lib.VALID_SCORES:
        raise ValueError(
            f"Judge score must be one of {judge_lib.VALID_SCORES}, got {judge_score!r} for "
            f"{traj.task_id}/{traj.group_id}."
        )

    answer = float(judge_score) if answered else 0.0
    aux_counts = answered or not config.aux_requires_answer
    runs = traj.num_code_runs
    exec_rate = traj.num_code_ok / runs if runs else 0.0
    components = {
        "answer": answer,
        "exec": exec_rate if aux_counts else 0.0,
        "format": float(traj.all_turns_parsed) if aux_counts else 0.0,
        "answered": float(answered),
    }
    reward = (
        config.w_answer * components["answer"]
        + config.w_exec * components["exec"]
        + config.w_format * components["format"]
    )
    return dataclasses.replace(traj, reward=float(reward), reward_components=components)


async def score_group(
    trajectories: Sequence[data_types.Trajectory],
    *,
    question: str,
    reference: str,
    judge: judge_lib.Judge,
    config: RewardConfig,
) -> tuple[data_types.Trajectory, ...] | DroppedGroup:
    """Judges every answered member concurrently and scores the group.

    Returns the scored trajectories in order, or a `DroppedGroup` when any judgement failed with
    `JudgeError` (the whole group goes: GRPO advantages need every member's reward).
    """
    if not trajectories:
        raise ValueError("score_group: the group is empty.")
    task_ids = {t.task_id for t in trajectories}
    if len(task_ids) != 1:
        raise ValueError(f"score_group: a group holds one question's episodes, got {task_ids}.")

    async def judge_one(traj):
        if traj.final_answer is None:
            return None
        verdict = await judge.score(question, reference, traj.final_answer)
        return verdict.score

    # return_exceptions: let every judgement finish (and fill the cache) before deciding.
    results = await asyncio.gather(*(judge_one(t) for t in trajectories), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if not isinstance(failure, judge_lib.JudgeError):
            raise failure
    if failures:
        return DroppedGroup(
            task_id=trajectories[0].task_id,
            num_trajectories=len(trajectories),
            reason=f"{len(failures)} of {len(trajectories)} judgements failed: {failures[0]}",
        )
    return tuple(score_trajectory(t, s, config) for t, s in zip(trajectories, results, strict=True))
