"""Core host-side records (DESIGN section 4): the task every dataset yields (`Example`) and the
token-exact record of one episode on it (`Trajectory`, its `Turn`s). Imports no JAX, so rewards/,
data/ and the sandbox can use them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    """One task: a question, its reference answer and the attachments an episode gets.

    `files` maps an attachment's file name (a plain name, no directories) to its bytes; the
    sandbox copies them into the episode's working directory. `level` is GAIA's difficulty
    (1-3). `metadata` is JSON-serialisable; synthetic tasks carry `metadata["solution"]` (one
    code string per agent turn, the last calling `final_answer(...)`) and
    `metadata["family"]`.
    """

    task_id: str
    question: str
    answer: str
    level: int
    files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.task_id, str) or not self.task_id:
            raise ValueError(f"Example.task_id must be a non-empty str, got {self.task_id!r}")
        for name in ("question", "answer"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(
                    f"Example {self.task_id}: {name} must be a str, "
                    f"got {type(getattr(self, name)).__name__}"
                )
        if isinstance(self.level, bool) or not isinstance(self.level, int) or self.level < 1:
            raise ValueError(
                f"Example {self.task_id}: level must be an int >= 1, got {self.level!r}"
            )
        for file_name, data in self.files.items():
            check_file_name(file_name, self.task_id)
            if not isinstance(data, bytes):
                raise TypeError(
                    f"Example {self.task_id}: file {file_name!r} must be bytes, "
                    f"got {type(data).__name__}"
                )


def check_file_name(file_name: str, task_id: str) -> None:
    """Rejects attachment names that could escape the episode's working directory."""
    if (
        not isinstance(file_name, str)
        or not file_name
        or file_name in (".", "..")
        or "/" in file_name
        or "\\" in file_name
        or os.sep in file_name
        or "\x00" in file_name
    ):
        raise ValueError(
            f"Example {task_id}: attachment name {file_name!r} must be a plain file name "
            "(no directories)"
        )


ExecStatus = Literal["ok", "error", "timeout", "memory", "crashed", "parse_error"]
EpisodeStatus = Literal[
    "answered", "max_turns", "max_tokens", "timeout", "sandbox_error", "parse_error"
]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One assistant turn and what running its code gave back."""

    text: str  # the assistant's decoded output for this turn (thought + code)
    code: str | None  # the extracted code, None when the turn had none
    observation: str  # the observation text appended after this turn ("" for the last turn)
    exec_status: ExecStatus | None  # None when no code ran (e.g. the episode ended)
    duration_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One episode, token-exact.

    `tokens` are exactly the ids the engine conditioned on (prompt + every turn + every
    observation); `loss_mask` is 1 only where the policy sampled the token; `behaviour_logprobs`
    are the sampler's log-probs of those tokens and 0 elsewhere. All three have the same length.
    """

    task_id: str
    group_id: int
    tokens: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] int32 (0/1)
    behaviour_logprobs: np.ndarray  # [L] float32
    prompt_len: int
    policy_version: int
    turns: tuple[Turn, ...]
    final_answer: str | None
    status: EpisodeStatus
    reward: float | None = None
    reward_components: dict[str, float] = dataclasses.field(default_factory=dict)
    replayed: bool = False  # True when this trajectory came from the dynamic sample queue

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"Trajectory {self.task_id}/{self.group_id}: tokens ({n}), loss_mask "
                f"({len(self.loss_mask)}) and behaviour_logprobs ({len(self.behaviour_logprobs)}) "
                "must have the same length."
            )

    @property
    def num_code_runs(self) -> int:
        return sum(t.exec_status is not None and t.exec_status != "parse_error" for t in self.turns)

    @property
    def num_code_ok(self) -> int:
        return sum(t.exec_status == "ok" for t in self.turns)

    @property
    def all_turns_parsed(self) -> bool:
        return all(t.exec_status != "parse_error" for t in self.turns)
