"""GAIA as a TFDS builder over the folder a user downloads by hand (the dataset is gated).

Reads `2023/{validation,test}/metadata.{parquet,jsonl}` and the attachment files next to them;
attachments travel with each Example so episodes get them in their working directory.
"""

from __future__ import annotations

import dataclasses
import glob
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
_LEVELS = (1, 2, 3)
# GAIA publishes "?" in place of the test split's private answers.
HIDDEN_ANSWER = "?"

# What a file holds when the repository was cloned without git-lfs: a small text stub naming the
# content's hash instead of the content (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
_LFS_POINTER_MAX_BYTES = 1024


def is_lfs_pointer(path: str) -> bool:
    """True when `path` is a Git LFS pointer stub rather than the file it stands for."""
    if os.path.getsize(path) > _LFS_POINTER_MAX_BYTES:
        return False
    with open(path, "rb") as f:
        return f.read(len(_LFS_POINTER_PREFIX)) == _LFS_POINTER_PREFIX


def _lfs_fix(manual_dir: str | os.PathLike) -> str:
    return (
        "The repository was cloned without git-lfs, so these files hold LFS pointer text instead "
        f"of their content. Fetch the content: `git lfs install && git -C {os.fspath(manual_dir)} "
        "lfs pull` (or download again with `huggingface-cli download gaia-benchmark/GAIA "
        f"--repo-type dataset --local-dir {os.fspath(manual_dir)}`)."
    )


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
        # A Hugging Face cache folder (datasets--gaia-benchmark--GAIA) keeps the files one level
        # down, in snapshots/<revision>/; name that folder rather than make the user find it.
        snapshots = sorted(
            os.path.dirname(d)
            for d in glob.glob(os.path.join(os.fspath(manual_dir), "snapshots", "*", "2023"))
        )
        hint = ""
        if snapshots:
            hint = (
                f"\nThis is a Hugging Face cache folder: set manual_dir to a snapshot in it, "
                f"{snapshots[-1]!r}."
            )
        # A folder one or two levels inside the download (2023/, 2023/validation/).
        for root, depth in ((manual_dir, 1), (os.path.dirname(os.fspath(manual_dir)), 2)):
            if any(_metadata_path(os.path.join(root, s)) for s in SPLITS):
                above = os.path.dirname(os.path.abspath(root))
                hint = f"\nThis folder is {depth} level(s) inside the download: use {above!r}."
                break
        raise FileNotFoundError(
            f"No GAIA metadata found in {os.fspath(manual_dir)!r}: expected "
            f"{' or '.join(expected)}.{hint}\n{INSTRUCTIONS}"
        )


def _metadata_path(directory: str) -> str | None:
    # The parquet release (October 2025) replaced the JSONL one; prefer it when both exist.
    for name in ("metadata.parquet", "metadata.jsonl"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_metadata(path: str, manual_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a GAIA metadata.parquet or metadata.jsonl file as plain dicts."""
    if is_lfs_pointer(path):
        raise ValueError(f"GAIA metadata {path!r} is a Git LFS pointer. {_lfs_fix(manual_dir)}")
    if path.endswith(".parquet"):
        try:
            table = pd.read_parquet(path)
        except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) name no fix
            raise ValueError(
                f"GAIA metadata {path!r} is not a readable parquet file ({e}); download it "
                f"again.\n{INSTRUCTIONS}"
            ) from e
        rows = [records.plain(r) for r in table.to_dict(orient="records")]
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
    seen = set()
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks GAIA field(s) {missing}")
        if records.is_missing(row["task_id"]):
            raise ValueError(f"{path}: row {i} has no task_id; fix or remove that row.")
        if str(row["task_id"]) in seen:
            raise ValueError(
                f"{path}: GAIA task {row['task_id']} appears twice (row {i}); remove the copy."
            )
        seen.add(str(row["task_id"]))
    return rows


def _level(row: dict[str, Any], path: str) -> int:
    # The parquet release stores Level as a string ("1"), the JSONL one as an integer; a null
    # level in a parquet column of numbers arrives as a float.
    value = row["Level"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip() if not records.is_missing(value) else ""
    if text not in {str(v) for v in _LEVELS}:
        shown = "null" if records.is_missing(value) and value != "" else repr(value)
        raise ValueError(
            f"{path}: GAIA task {row['task_id']} has Level {shown}; expected one of {_LEVELS}. "
            "A release downloaded whole has none other: fix that row or download the metadata "
            "again."
        )
    return int(text)


def _answer(row: dict[str, Any], path: str, split: str) -> str:
    value = row["Final answer"]
    if not records.is_missing(value):
        return str(value)
    if split == "test":
        # Some copies leave the private answers empty instead of "?"; they are hidden either way.
        return HIDDEN_ANSWER
    raise ValueError(
        f"{path}: GAIA task {row['task_id']} has no Final answer (null); only the test "
        f"split hides its answers (as {HIDDEN_ANSWER!r}). Fix that row or download the metadata "
        "again."
    )


def read_split(manual_dir: str | os.PathLike, split: str) -> Iterator[types.Example]:
    """Yields the Examples of one GAIA split, attachments read into memory."""
    directory = split_dir(manual_dir, split)
    path = _metadata_path(directory)
    if path is None:
        raise FileNotFoundError(
            f"GAIA split {split!r}: no metadata.parquet or metadata.jsonl in {directory!r}.\n"
            f"{INSTRUCTIONS}"
        )
    rows = read_metadata(path, manual_dir)
    # Every row is checked before any is yielded, so a bad copy fails the build at once and an
    # LFS clone is reported with all its stubs, not one task at a time.
    attachments = {str(row["task_id"]): _attachment(row, directory, manual_dir) for row in rows}
    pointers = [(t, p) for t, p in attachments.items() if p is not None and is_lfs_pointer(p)]
    if pointers:
        shown = "; ".join(f"task {t}: {p}" for t, p in pointers[:5])
        more = f" and {len(pointers) - 5} more" if len(pointers) > 5 else ""
        raise ValueError(
            f"GAIA split {split!r}: {len(pointers)} attachment(s) are Git LFS pointers "
            f"({shown}{more}). {_lfs_fix(manual_dir)}"
        )
    parsed = [(row, _level(row, path), _answer(row, path, split)) for row in rows]
    for row, level, answer in parsed:
        task_id = str(row["task_id"])
        files = {}
        found = attachments[task_id]
        if found is not None:
            with open(found, "rb") as f:
                files[os.path.basename(row["file_name"])] = f.read()
        yield types.Example(
            task_id=task_id,
            question=str(row["Question"]),
            answer=answer,
            level=level,
            files=files,
            metadata={
                "source": "gaia",
                "split": split,
                "answer_hidden": answer == HIDDEN_ANSWER,
                "annotator_metadata": records.plain(row.get("Annotator Metadata")),
            },
        )


def _attachment(row: dict[str, Any], directory: str, manual_dir: str | os.PathLike) -> str | None:
    """The path of a row's attachment (None when it has none); raises when it is missing."""
    file_name = row.get("file_name")
    if records.is_missing(file_name):
        return None
    # `file_name` sits next to the metadata; `file_path` (parquet release) is relative to the
    # repository root. Either locates the attachment.
    candidates = [os.path.join(directory, os.path.basename(file_name))]
    if not records.is_missing(row.get("file_path")):
        candidates.append(os.path.join(os.fspath(manual_dir), row["file_path"]))
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise FileNotFoundError(
            f"GAIA task {row['task_id']}: attachment {file_name!r} not found (looked at "
            f"{candidates}); download the attachment files with the metadata (a Hugging Face "
            "cache snapshot whose links point at missing blobs needs the download resumed)."
        )
    return found


def missing_split_hint(
    split: str,
    built_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None,
    builder_config: tfds.core.BuilderConfig,
) -> str:
    """What to do when a built GAIA lacks `split` (TFDS builds once and never looks again)."""
    built_dir = os.fspath(built_dir)
    level = getattr(builder_config, "level", None)
    downloaded = manual_dir is not None and split in available_splits(manual_dir)
    if (
        downloaded
        and level is not None
        and not any(
            _level(r, path) == level
            for path in [_metadata_path(split_dir(manual_dir, split))]
            for r in read_metadata(path, manual_dir)
        )
    ):
        return f"GAIA's {split} split has no level-{level} task; pick another config or split."
    if downloaded:
        return (
            f"The build in {built_dir!r} was made before {split!r} was downloaded into "
            f"{os.fspath(manual_dir)!r}: delete {built_dir!r} (the built copy, not the download) "
            "and run again to rebuild it with every split."
        )
    return (
        f"Download the {split} split (2023/{split}/metadata.parquet and its attachments) into "
        f"the GAIA folder, pass that folder as manual_dir, and delete {built_dir!r} so that it "
        f"is rebuilt.\n{INSTRUCTIONS}"
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
                    _level(r, path) == level
                    for path in [_metadata_path(split_dir(manual_dir, s))]
                    for r in read_metadata(path, manual_dir)
                )
            ]
        return {s: self._generate_examples(manual_dir, s) for s in splits}

    def _generate_examples(self, manual_dir: str, split: str):
        for example in read_split(manual_dir, split):
            if self.builder_config.level is None or example.level == self.builder_config.level:
                yield example.task_id, records.encode(example)
