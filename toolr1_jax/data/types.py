"""The task record every dataset yields and every episode starts from (DESIGN section 4)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any


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
