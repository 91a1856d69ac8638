"""Host-side records of one episode: what the policy saw, sampled and did (DESIGN section 4).

Imports no JAX, so rewards/, data/ and the sandbox can use these records.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

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
