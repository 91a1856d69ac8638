"""Loading: build a dataset's TFDS builder (array_record files, no TensorFlow), read a split back
through its TFDS data source, and iterate it through grain with a checkpointable position.

grain imports JAX (its profiler does), so it is imported only when an iterator is made: building
and reading datasets stays JAX-free, as data/ must be.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import tensorflow_datasets as tfds

from toolr1_jax.data import gaia, qa, records, synthetic, types

DATASETS = ("synthetic", "gaia", "qa")
DEFAULT_CONFIGS = {"synthetic": "default", "gaia": "2023_all", "qa": "default"}


def builder_configs(dataset: str) -> list[str] | None:
    """The builder config names `dataset` accepts; None when any name is valid (qa)."""
    if dataset == "qa":
        return None
    cls = {"synthetic": synthetic.SyntheticTasks, "gaia": gaia.Gaia}[dataset]
    return sorted(cls.builder_configs)


def builder(
    dataset: str,
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of a dataset, generated into `data_dir` on first use.

    `config` picks a builder config: for "gaia" one of 2023_all / 2023_level{1,2,3}; for
    "synthetic" default / level1 or a `synthetic.SyntheticConfig`; for "qa" any name, which
    keeps different question sets apart under `data_dir`. "gaia" and "qa" read their source
    files from `manual_dir` the first time.
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of {DATASETS}")
    config = DEFAULT_CONFIGS[dataset] if config is None else config
    if dataset == "qa" and isinstance(config, str) and config not in qa.QaTasks.builder_configs:
        # Question sets are the user's: any name is a valid config.
        config = tfds.core.BuilderConfig(name=config)
    cls = {"synthetic": synthetic.SyntheticTasks, "gaia": gaia.Gaia, "qa": qa.QaTasks}[dataset]
    b = cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    if b.is_prepared() and dataset == "synthetic":
        _check_same_parameters(b)
    if not b.is_prepared():
        if dataset == "gaia":
            gaia.check_manual_dir(manual_dir)
        elif dataset == "qa":
            qa.check_manual_dir(manual_dir)
        download_config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir),
            try_download_gcs=False,
        )
        b.download_and_prepare(download_config=download_config)
    return b


def _check_same_parameters(b: tfds.core.DatasetBuilder) -> None:
    with open(os.path.join(b.data_dir, "dataset_info.json")) as f:
        stored = json.load(f).get("configDescription")
    wanted = b.builder_config.description
    if stored != wanted:
        raise ValueError(
            f"{b.data_dir} holds synthetic config {b.builder_config.name!r} built as {stored!r}, "
            f"not {wanted!r}: give the config another name or delete that folder."
        )


class ExampleSource(Sequence):
    """Random access to one split's Examples, decoded from the TFDS data source on demand."""

    def __init__(self, records_source: Sequence):
        self._records = records_source

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        # Batched reads are cheaper per record; explicit bounds because the ArrayRecord source
        # need not raise IndexError past the end.
        for start in range(0, len(self), 256):
            yield from self.__getitems__(range(start, min(start + 256, len(self))))

    def __getitems__(self, indices: Sequence[int]) -> list[types.Example]:
        return [records.decode(r) for r in self._records.__getitems__(list(indices))]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return records.decode(self._records[index])


def data_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
) -> ExampleSource:
    """A lazily decoded, random-access view of a split, backed by TFDS's ArrayRecord source."""
    b = builder(dataset, data_dir=data_dir, manual_dir=manual_dir, config=config)
    if split not in b.info.splits:
        hint = ""
        if dataset == "gaia":
            hint = " " + gaia.missing_split_hint(split, b.data_dir, manual_dir, b.builder_config)
        raise ValueError(
            f"Dataset {dataset!r} (config {b.builder_config.name!r}) has no split {split!r}; "
            f"available: {sorted(b.info.splits)}.{hint}"
        )
    return ExampleSource(b.as_data_source(split=split))


def load_examples(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    levels: Sequence[int] | None = None,
) -> list[types.Example]:
    """Every Example of a split (optionally only some levels), sorted by task id.

    Sorting undoes TFDS's hash-based on-disk order, so the list is stable across rebuilds.
    """
    source = data_source(dataset, split, data_dir=data_dir, manual_dir=manual_dir, config=config)
    examples = [e for e in source if levels is None or e.level in levels]
    return sorted(examples, key=lambda e: e.task_id)


class ExampleIterator:
    """Shuffled (per-epoch reshuffled by seed) iteration over Examples via grain.

    `num_epochs=None` repeats forever (training). `get_state()` is a small JSON-able dict the
    trainer checkpoints; `set_state` on an iterator built with the same arguments continues with
    the example that would have come next. `shard_index`/`num_shards` split the examples
    between hosts before shuffling.
    """

    def __init__(
        self,
        examples: Sequence[types.Example],
        *,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
    ):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
        if len(examples) < num_shards:
            raise ValueError(f"Cannot iterate: {len(examples)} examples for {num_shards} shard(s)")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        import grain  # see the module docstring

        ds = grain.MapDataset.source(examples)
        if num_shards > 1:
            ds = ds[shard_index::num_shards]
        if shuffle:
            ds = ds.shuffle(seed=seed)
        self.examples_per_epoch = len(ds)
        ds = ds.repeat(num_epochs)
        self._identity = {
            "num_examples": len(examples),
            "seed": seed,
            "shuffle": shuffle,
            "shard_index": shard_index,
            "num_shards": num_shards,
        }
        # No reader threads: the sandbox forks worker processes, and forking next to running
        # threads is unsafe; decoding an Example is cheap next to an episode anyway.
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = iter(ds.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self) -> types.Example:
        return next(self._iterator)

    @property
    def epoch(self) -> int:
        return self.get_state()["next_index"] // self.examples_per_epoch

    def get_state(self) -> dict:
        return {**self._identity, "next_index": int(self._iterator.get_state()["next_index"])}

    def set_state(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if mismatched:
            raise ValueError(
                f"Iterator state was saved for a different iterator (saved, current): {mismatched}"
            )
        self._iterator.set_state({"next_index": int(state["next_index"])})
