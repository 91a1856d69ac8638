"""GAIA as a TFDS builder over the folder a user downloads by hand (the dataset is gated).

Reads `2023/{validation,test}/metadata.{parquet,jsonl}` and the attachment files next to them;
attachments travel with each Example so episodes get them in their working directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import pandas as pd
import tensorflow_datasets as tfds

from toolr1_jax.data import records, types

SPLITS = ("validation", "test")

INSTRUCTIONS = """\
GAIA is gated: accept its terms at https://huggingface.co/datasets/gaia-benchmark/GAIA, then
download the repository, e.g.
    huggingface-cli download gaia-benchmark/GAIA --repo-type dataset --local-dir <manual_dir>
or
    git clone https://huggingface.co/datasets/gaia-benchmark/GAIA <manual_dir>
so that <manual_dir>/2023/validation/ and <manual_dir>/2023/test/ hold metadata.parquet (or
metadata.jsonl) and the attachment files, and pass that folder as manual_dir."""

# GAIA's column names, as in both the JSONL and the parquet releases.
_REQUIRED = ("task_id", "Question", "Level", "Final answer")


def split_dir(manual_dir: str | os.PathLike, split: str) -> str:
    return os.path.join(os.fspath(manual_dir), "2023", split)


def available_splits(manual_dir: str | os.PathLike) -> list[str]:
    """The GAIA splits whose metadata file exists under `manual_dir`."""
    return [s for s in SPLITS if _metadata_path(split_dir(manual_dir, s)) is not None]


def check_manual_dir(manual_dir: str | os.PathLike | None) -> None:
    """Raises FileNotFoundError, saying where to get GAIA and where to put it, when absent."""
    if manual_dir is None or not os.path.isdir(manual_dir):
        raise FileNotFoundError(
            f"GAIA manual directory {manual_dir!r} does not exist.\n{INSTRUCTIONS}"
        )
    if not available_splits(manual_dir):
        expected = [
            os.path.join(split_dir(manual_dir, s), "metadata.parquet|metadata.jsonl")
            for s in SPLITS
        ]
        raise FileNotFoundError(
            f"No GAIA metadata found in {os.fspath(manual_dir)!r}: expected "
            f"{' or '.join(expected)}.\n{INSTRUCTIONS}"
        )


def _metadata_path(directory: str) -> str | None:
    # The parquet release (October 2025) replaced the JSONL one; prefer it when both exist.
    for name in ("metadata.parquet", "metadata.jsonl"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_metadata(path: str) -> list[dict[str, Any]]:
    """Rows of a GAIA metadata.parquet or metadata.jsonl file as plain dicts."""
    if path.endswith(".parquet"):
        rows = [records.plain(r) for r in pd.read_parquet(path).to_dict(orient="records")]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks GAIA field(s) {missing}")
    return rows


def read_split(manual_dir: str | os.PathLike, split: str) -> Iterator[types.Example]:
    """Yields the Examples of one GAIA split, attachments read into memory."""
    directory = split_dir(manual_dir, split)
    path = _metadata_path(directory)
    if path is None:
        raise FileNotFoundError(
            f"GAIA split {split!r}: no metadata.parquet or metadata.jsonl in {directory!r}.\n"
            f"{INSTRUCTIONS}"
        )
    for row in read_metadata(path):
        task_id = str(row["task_id"])
        files = {}
        file_name = row.get("file_name")
        if not records.is_missing(file_name):
            # `file_name` sits next to the metadata; `file_path` (parquet release) is relative to
            # the repository root. Either locates the attachment.
            candidates = [os.path.join(directory, os.path.basename(file_name))]
            if not records.is_missing(row.get("file_path")):
                candidates.append(os.path.join(os.fspath(manual_dir), row["file_path"]))
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found is None:
                raise FileNotFoundError(
                    f"GAIA task {task_id}: attachment {file_name!r} not found (looked at "
                    f"{candidates}); download the attachment files with the metadata."
                )
            with open(found, "rb") as f:
                files[os.path.basename(file_name)] = f.read()
        answer = str(row["Final answer"])
        yield types.Example(
            task_id=task_id,
            question=str(row["Question"]),
            answer=answer,
            level=int(row["Level"]),
            files=files,
            metadata={
                "source": "gaia",
                "split": split,
                # The test split's answers are private; GAIA publishes "?" in their place.
                "answer_hidden": answer == "?",
                "annotator_metadata": records.plain(row.get("Annotator Metadata")),
            },
        )


@dataclasses.dataclass(eq=False)
class GaiaConfig(tfds.core.BuilderConfig):
    level: int | None = None  # keep only this level; None keeps all


class Gaia(records.Builder):
    """GAIA 2023 (validation with answers, test with hidden answers), from a manual directory."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "GAIA 2023, JSONL or parquet metadata, attachments embedded."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    BUILDER_CONFIGS = [
        GaiaConfig(name="2023_all"),
        GaiaConfig(name="2023_level1", level=1),
        GaiaConfig(name="2023_level2", level=2),
        GaiaConfig(name="2023_level3", level=3),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="GAIA: a benchmark for general AI assistants (tool use, files, web).",
            features=records.features(),
            homepage="https://huggingface.co/datasets/gaia-benchmark/GAIA",
        )

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        check_manual_dir(manual_dir)
        level = self.builder_config.level
        splits = available_splits(manual_dir)
        if level is not None:
            # TFDS cannot write an empty split; a level missing from a split drops that split.
            splits = [
                s
                for s in splits
                if any(
                    int(r["Level"]) == level
                    for r in read_metadata(_metadata_path(split_dir(manual_dir, s)))
                )
            ]
        return {s: self._generate_examples(manual_dir, s) for s in splits}

    def _generate_examples(self, manual_dir: str, split: str):
        for example in read_split(manual_dir, split):
            if self.builder_config.level is None or example.level == self.builder_config.level:
                yield example.task_id, records.encode(example)
