"""Reward weights, gating and group scoring on hand-built trajectories."""

import math
import socket

import numpy as np
import pytest

from toolr1_jax.data import types as data_types
from toolr1_jax.rewards import judge as judge_lib
from toolr1_jax.rewards import reward as reward_lib


def _turn(status, code="print(1)"):
    return data_types.Turn(
        text="Thought: go\n<code>...</code>", code=code, observation="1", exec_status=status
    )


def _traj(final_answer, statuses, task_id="t1", member=0):
    n = 6
    return data_types.Trajectory(
        task_id=task_id,
        group_id=member,
        tokens=np.arange(n, dtype=np.int32),
        loss_mask=np.array([0, 0, 1, 1, 1, 1], np.int32),
        behaviour_logprobs=np.zeros(n, np.float32),
        prompt_len=2,
        policy_version=0,
        turns=tuple(_turn(s) for s in statuses),
        final_answer=final_answer,
        status="answered" if final_answer is not None else "max_turns",
    )


CONFIG = reward_lib.RewardConfig(w_answer=1.0, w_exec=0.5, w_format=0.25, aux_requires_answer=True)


def test_weights_combine_components():
    traj = _traj("Paris", ["ok", "error", "ok", None])
    scored = reward_lib.score_trajectory(traj, 1.0, CONFIG)
    assert scored.reward_components == {
        "answer": 1.0,
        "exec": pytest.approx(2 / 3),
        "format": 1.0,
        "answered": 1.0,
    }
    assert scored.reward == pytest.approx(1.0 + 0.5 * 2 / 3 + 0.25)
    assert traj.reward is None  # the input is untouched (frozen record, replaced copy)
    half = reward_lib.score_trajectory(traj, 0.5, CONFIG)
    assert half.reward == pytest.approx(0.5 + 0.5 * 2 / 3 + 0.25)


def test_parse_errors_cost_format_and_do_not_count_as_runs():
    traj = _traj("x", ["parse_error", "ok", "timeout"])
    assert (traj.num_code_runs, traj.num_code_ok) == (2, 1)
    scored = reward_lib.score_trajectory(traj, 0.0, CONFIG)
    assert scored.reward_components["exec"] == 0.5
    assert scored.reward_components["format"] == 0.0
    assert scored.reward == pytest.approx(0.5 * 0.5)


def test_no_code_runs_scores_zero_exec():
    scored = reward_lib.score_trajectory(_traj("42", [None]), 1.0, CONFIG)
    assert scored.reward_components["exec"] == 0.0
    assert scored.reward == pytest.approx(1.0 + 0.25)


def test_auxiliary_terms_gated_on_answer():
    traj = _traj(None, ["ok", "ok"])
    gated = reward_lib.score_trajectory(traj, None, CONFIG)
    assert gated.reward == 0.0
    assert gated.reward_components == {"answer": 0.0, "exec": 0.0, "format": 0.0, "answered": 0.0}
    ungated_config = reward_lib.RewardConfig(
        w_answer=1.0, w_exec=0.5, w_format=0.25, aux_requires_answer=False
    )
    ungated = reward_lib.score_trajectory(traj, None, ungated_config)
    assert ungated.reward == pytest.approx(0.5 + 0.25)
    assert ungated.reward_components["answered"] == 0.0


def test_answer_only_weights():
    config = reward_lib.RewardConfig(w_answer=2.0, w_exec=0.0, w_format=0.0)
    scored = reward_lib.score_trajectory(_traj("a", ["ok", "parse_error"]), 0.5, config)
    assert scored.reward == 1.0


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="has a final answer but no judge score"):
        reward_lib.score_trajectory(_traj("a", ["ok"]), None, CONFIG)
    with pytest.raises(ValueError, match="has no final answer but got judge score"):
        reward_lib.score_trajectory(_traj(None, ["ok"]), 0.0, CONFIG)
    with pytest.raises(ValueError, match="must be one of"):
        reward_lib.score_trajectory(_traj("a", ["ok"]), 0.3, CONFIG)
    with pytest.raises(ValueError, match="w_exec must be a finite number"):
        reward_lib.RewardConfig(w_answer=1.0, w_exec=math.nan, w_format=0.0)


async def test_group_scored_with_rule_judge():
    judge = judge_lib.make_judge("rule")
    group = [
        _traj("$1,000", ["ok"], member=0),
        _traj("1000", ["ok", "error"], member=1),
        _traj("17 hours", ["ok"], member=2),
        _traj(None, ["ok", "ok"], member=3),
    ]
    scored = await reward_lib.score_group(
        group, question="How much?", reference="1000", judge=judge, config=CONFIG
    )
    assert isinstance(scored, tuple)
    assert [t.group_id for t in scored] == [0, 1, 2, 3]
    assert [t.reward for t in scored] == pytest.approx(
        [1.0 + 0.5 + 0.25, 1.0 + 0.25 + 0.25, 0.0 + 0.5 + 0.25, 0.0]
    )
    # The unanswered member was not judged.
    assert judge.num_requests == 3


class _FailsOn(judge_lib.Judge):
    """A judge whose backend fails for one prediction (as a dead judge server would)."""

    def __init__(self, bad_prediction):
        super().__init__()
        self.bad_prediction = bad_prediction

    async def _judge(self, question, reference, prediction):
        if prediction == self.bad_prediction:
            raise judge_lib.JudgeError(f"backend down while judging {prediction!r}")
        return judge_lib.Verdict(score=1.0, rationale="ok")


async def test_group_with_failed_judgement_is_dropped():
    group = [_traj("a", ["ok"], member=0), _traj("b", ["ok"], member=1)]
    result = await reward_lib.score_group(
        group, question="q", reference="a", judge=_FailsOn("b"), config=CONFIG
    )
    assert isinstance(result, reward_lib.DroppedGroup)
    assert result.task_id == "t1" and result.num_trajectories == 2
    assert "1 of 2 judgements failed" in result.reason and "'b'" in result.reason


async def test_group_dropped_when_judge_server_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = judge_lib.make_judge(
        "openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", max_attempts=2, backoff_s=0
    )
    group = [_traj("a", ["ok"], member=0), _traj(None, ["ok"], member=1)]
    result = await reward_lib.score_group(
        group, question="q", reference="a", judge=judge, config=CONFIG
    )
    assert isinstance(result, reward_lib.DroppedGroup)
    assert "connection error" in result.reason


async def test_group_without_answers_needs_no_judge():
    judge = judge_lib.make_judge("openai", base_url="http://127.0.0.1:9/v1", model="unused")
    group = [_traj(None, ["ok"], member=i) for i in range(3)]
    scored = await reward_lib.score_group(
        group, question="q", reference="a", judge=judge, config=CONFIG
    )
    assert [t.reward for t in scored] == [0.0, 0.0, 0.0]
    assert judge.num_requests == 0


async def test_group_checks():
    judge = judge_lib.make_judge("rule")
    with pytest.raises(ValueError, match="group is empty"):
        await reward_lib.score_group([], question="q", reference="a", judge=judge, config=CONFIG)
    mixed = [_traj("a", ["ok"], task_id="t1"), _traj("a", ["ok"], task_id="t2")]
    with pytest.raises(ValueError, match="one question's episodes"):
        await reward_lib.score_group(mixed, question="q", reference="a", judge=judge, config=CONFIG)


async def test_judge_bugs_are_not_swallowed():
    class Broken(judge_lib.Judge):
        async def _judge(self, question, reference, prediction):
            raise KeyError("a bug, not a judge failure")

    group = [_traj("a", ["ok"])]
    with pytest.raises(KeyError, match="a bug"):
        await reward_lib.score_group(
            group, question="q", reference="a", judge=Broken(), config=CONFIG
        )
