"""What one program run gave back, and how the agent sees it."""

from __future__ import annotations

import dataclasses
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "crashed"]
STATUSES = ("ok", "error", "timeout", "memory", "crashed")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """`value` is the repr of the program's last expression; `final_answer` is `str(x)` when the
    program called `final_answer(x)`; `notice` says when this run started in a fresh interpreter
    because the previous one was killed (so earlier variables are gone)."""

    status: Status
    stdout: str = ""
    value: str | None = None
    error: str | None = None
    final_answer: str | None = None
    duration_s: float = 0.0
    notice: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"ExecResult.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def observation(self, max_chars: int) -> str:
        """The text the agent gets back: notice, stdout, then the last value or the error, cut in
        the middle (keeping both ends) to at most `max_chars` characters."""
        return render_observation(self, max_chars)


def render_observation(result: ExecResult, max_chars: int) -> str:
    if max_chars < 100:
        raise ValueError(f"max_chars must be at least 100, got {max_chars}")
    parts = []
    if result.notice:
        parts.append(f"[{result.notice}]")
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.error:
        parts.append(f"Error: {result.error}")
    elif result.value is not None:
        parts.append(f"Out: {result.value}")
    if result.final_answer is not None:
        parts.append(f"Final answer: {result.final_answer}")
    text = "\n".join(parts) if parts else "(no output)"
    if len(text) <= max_chars:
        return text
    marker = f"\n... [{len(text)} characters, middle cut] ...\n"
    head = (max_chars - len(marker)) * 2 // 3
    tail = max_chars - len(marker) - head
    return text[:head] + marker + (text[-tail:] if tail > 0 else "")
