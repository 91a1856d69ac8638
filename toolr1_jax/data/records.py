"""What every TFDS builder here shares: the feature spec, Example <-> record conversion and a
base class."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from toolr1_jax.data import types


def plain(value: Any) -> Any:
    """Converts numpy/pandas values (parquet structs, arrays) into JSON-serialisable ones."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def is_missing(value: Any) -> bool:
    """True for the ways JSONL and parquet spell an absent value (None, NaN, "")."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


def features() -> tfds.features.FeaturesDict:
    # Metadata is free-form per dataset (GAIA's annotator notes, a synthetic task's solution),
    # so it is stored as one JSON string rather than a schema every builder must agree on.
    return tfds.features.FeaturesDict(
        {
            "task_id": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "level": np.int32,
            "files": tfds.features.Sequence(
                {
                    "name": tfds.features.Text(),
                    "data": tfds.features.Tensor(shape=(), dtype=np.object_),
                }
            ),
            "metadata_json": tfds.features.Text(),
        }
    )


def encode(example: types.Example) -> dict[str, Any]:
    names = sorted(example.files)
    return {
        "task_id": example.task_id,
        "question": example.question,
        "answer": example.answer,
        "level": example.level,
        "files": {"name": names, "data": [example.files[n] for n in names]},
        "metadata_json": json.dumps(dict(example.metadata), sort_keys=True),
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def decode(record: Mapping[str, Any]) -> types.Example:
    """Turns a record read back from a TFDS data source into an Example."""
    names = [_text(n) for n in record["files"]["name"]]
    data = [bytes(d) for d in record["files"]["data"]]
    return types.Example(
        task_id=_text(record["task_id"]),
        question=_text(record["question"]),
        answer=_text(record["answer"]),
        level=int(record["level"]),
        files=dict(zip(names, data, strict=True)),
        metadata=json.loads(_text(record["metadata_json"])),
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """Base of this package's builders."""

    # TFDS locates a packaged builder's source through the `importlib_resources` backport, which
    # it does not install on Python >= 3.9; the source file is all it needs (no checksums or
    # metadata files ship with these builders), so point it there directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))
