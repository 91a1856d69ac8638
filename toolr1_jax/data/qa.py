"""User question sets (multi-hop QA such as HotpotQA / 2WikiMultiHopQA, or agent task sets) as a
TFDS builder over a manual directory holding `{train,validation,test}.{jsonl,json,parquet}`.

Each row needs a question and an answer; `files` (attachment paths relative to the manual
directory), `level` and an id are optional; every other field is kept in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pandas as pd
import tensorflow_datasets as tfds

from toolr1_jax.data import records, types

SPLITS = ("train", "validation", "test")
_EXTENSIONS = (".jsonl", ".json", ".parquet")

# Accepted spellings, first match wins: HotpotQA/2Wiki use `_id`, GAIA-style sets `task_id`,
# `Question` and `Final answer`.
_QUESTION_KEYS = ("question", "Question")
_ANSWER_KEYS = ("answer", "Final answer", "final_answer")
_ID_KEYS = ("task_id", "id", "_id")
_LEVEL_KEYS = ("level", "Level")
_FILES_KEYS = ("files", "file_name")

INSTRUCTIONS = """\
Put your question set in the manual directory as train.jsonl / validation.jsonl / test.jsonl
(or .json holding a list, or .parquet), one row per question with fields `question` and
`answer` and optionally `files` (attachment paths relative to the manual directory), `level`
(1-3) and `task_id`. Attachment files go in the same directory."""


def split_path(manual_dir: str | os.PathLike, split: str) -> str | None:
    for ext in _EXTENSIONS:
        path = os.path.join(os.fspath(manual_dir), split + ext)
        if os.path.isfile(path):
            return path
    return None


def available_splits(manual_dir: str | os.PathLike) -> list[str]:
    return [s for s in SPLITS if split_path(manual_dir, s) is not None]


def check_manual_dir(manual_dir: str | os.PathLike | None) -> None:
    if manual_dir is None or not os.path.isdir(manual_dir):
        raise FileNotFoundError(
            f"Question-set directory {manual_dir!r} does not exist.\n{INSTRUCTIONS}"
        )
    if not available_splits(manual_dir):
        raise FileNotFoundError(
            f"No question file in {os.fspath(manual_dir)!r}: expected one of "
            f"{[s + e for s in SPLITS for e in _EXTENSIONS]}.\n{INSTRUCTIONS}"
        )


def read_rows(path: str) -> list[dict[str, Any]]:
    if path.endswith(".parquet"):
        return [records.plain(r) for r in pd.read_parquet(path).to_dict(orient="records")]
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            rows = json.load(f)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
            return rows
        rows = []
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
        return rows


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if k in row and not records.is_missing(row[k]):
            return k, row[k]
    return None, None


def _answer_text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return str(value)
    # A list answer becomes GAIA's comma-separated list, which the scorer compares element-wise.
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(str(v) for v in value)
    raise ValueError(f"{where}: answer must be a string, number or list of them, got {value!r}")


def read_split(manual_dir: str | os.PathLike, split: str) -> Iterator[types.Example]:
    path = split_path(manual_dir, split)
    if path is None:
        raise FileNotFoundError(f"No {split}.jsonl/.json/.parquet in {os.fspath(manual_dir)!r}.")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no questions")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        q_key, question = _first(row, _QUESTION_KEYS)
        a_key, answer = _first(row, _ANSWER_KEYS)
        if q_key is None or a_key is None:
            raise ValueError(f"{where}: needs a question and an answer (fields {sorted(row)})")
        id_key, task_id = _first(row, _ID_KEYS)
        if id_key is None:
            # Content-derived ids stay stable when rows are reordered or the file is re-exported.
            digest = hashlib.sha1(f"{question}\x00{answer}".encode()).hexdigest()[:16]
            task_id = f"{split}-{digest}"
        task_id = str(task_id)
        if task_id in seen:
            raise ValueError(f"{where}: duplicate task id {task_id!r}")
        seen.add(task_id)
        level_key, level = _first(row, _LEVEL_KEYS)
        files_key, file_list = _first(row, _FILES_KEYS)
        if isinstance(file_list, str):
            file_list = [file_list]
        files = {}
        for rel in file_list or []:
            full = os.path.join(os.fspath(manual_dir), rel)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{where}: attachment {rel!r} not found at {full!r}")
            with open(full, "rb") as f:
                files[os.path.basename(rel)] = f.read()
        used = {q_key, a_key, id_key, level_key, files_key}
        metadata = {k: records.plain(v) for k, v in row.items() if k not in used}
        metadata["source"] = "qa"
        yield types.Example(
            task_id=task_id,
            question=str(question),
            answer=_answer_text(answer, where),
            level=1 if level is None else int(level),
            files=files,
            metadata=metadata,
        )


class QaTasks(records.Builder):
    """A user's question set. Name distinct sets with `config=tfds.core.BuilderConfig(name=...)`
    so that each gets its own folder under data_dir."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSONL/JSON/parquet question sets with optional attachments."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A user-provided question set (question, answer, optional files).",
            features=records.features(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        check_manual_dir(manual_dir)
        return {s: self._generate_examples(manual_dir, s) for s in available_splits(manual_dir)}

    def _generate_examples(self, manual_dir: str, split: str):
        for example in read_split(manual_dir, split):
            yield example.task_id, records.encode(example)
