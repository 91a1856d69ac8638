"""Loading the synthetic suite through TFDS and iterating it with a checkpointable position."""

import json
import subprocess
import sys

import pytest

from toolr1_jax.data import pipeline, synthetic, types

_CONFIG = synthetic.SyntheticConfig(
    name="pipeline_test", seed=3, num_train=36, num_validation=12, num_test=12
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    pipeline.builder("synthetic", data_dir=path, config=_CONFIG)
    return path


def test_tfds_round_trip_equals_the_generator(data_dir):
    for split, n in (("train", 36), ("validation", 12), ("test", 12)):
        loaded = pipeline.load_examples("synthetic", split, data_dir=data_dir, config=_CONFIG)
        generated = synthetic.generate(split, n, seed=3)
        assert loaded == sorted(generated, key=lambda e: e.task_id)
    level1 = pipeline.load_examples(
        "synthetic", "train", data_dir=data_dir, config=_CONFIG, levels=(1,)
    )
    assert level1 and {e.level for e in level1} == {1}

    source = pipeline.data_source("synthetic", "test", data_dir=data_dir, config=_CONFIG)
    assert len(source) == 12
    assert isinstance(source[5], types.Example)
    assert [e.task_id for e in source[2:4]] == [source[2].task_id, source[3].task_id]


def test_reusing_a_config_name_with_other_parameters_is_an_error(data_dir):
    changed = synthetic.SyntheticConfig(
        name="pipeline_test", seed=4, num_train=36, num_validation=12, num_test=12
    )
    with pytest.raises(ValueError, match=r"built as .*seed=3.* not .*seed=4"):
        pipeline.builder("synthetic", data_dir=data_dir, config=changed)


def test_resumed_iterator_continues_with_the_next_example(data_dir):
    source = pipeline.data_source("synthetic", "train", data_dir=data_dir, config=_CONFIG)
    it = pipeline.ExampleIterator(source, seed=7)
    seen = [next(it).task_id for _ in range(50)]  # crosses into the second epoch
    # The state goes through JSON, as it would through a checkpoint's metadata.
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it).task_id for _ in range(30)]

    resumed = pipeline.ExampleIterator(source, seed=7)
    resumed.set_state(state)
    assert [next(resumed).task_id for _ in range(30)] == expected
    assert state["next_index"] == 50 and resumed.epoch == 2

    # Each epoch is a permutation of the split, reshuffled per epoch.
    first, second = seen[:36], (seen[36:] + expected)[:36]
    assert sorted(first) == sorted(second) == sorted(e.task_id for e in source)
    assert first != second


def test_iterator_epochs_shards_and_state_checks():
    examples = synthetic.generate("validation", 10, seed=1)
    ids = [e.task_id for e in examples]

    ordered = pipeline.ExampleIterator(examples, seed=0, shuffle=False, num_epochs=2)
    assert [e.task_id for e in ordered] == ids + ids  # finite: stops after two epochs

    shards = [
        [e.task_id for e in pipeline.ExampleIterator(examples, seed=0, num_epochs=1,
                                                     shard_index=i, num_shards=3)]
        for i in range(3)
    ]  # fmt: skip
    assert sorted(sum(shards, [])) == sorted(ids)
    assert [len(s) for s in shards] == [4, 3, 3]

    state = pipeline.ExampleIterator(examples, seed=0).get_state()
    with pytest.raises(ValueError, match="different iterator.*seed"):
        pipeline.ExampleIterator(examples, seed=1).set_state(state)
    with pytest.raises(ValueError, match="shard_index 3 not in"):
        pipeline.ExampleIterator(examples, seed=0, shard_index=3, num_shards=3)
    with pytest.raises(ValueError, match="0 examples"):
        pipeline.ExampleIterator([], seed=0)


def test_building_and_loading_import_no_jax(data_dir):
    code = (
        "import sys\n"
        "from toolr1_jax.data import gaia, pipeline, qa, synthetic\n"
        f"config = synthetic.SyntheticConfig(name='pipeline_test', seed=3, num_train=36, "
        "num_validation=12, num_test=12)\n"
        f"examples = pipeline.load_examples('synthetic', 'test', data_dir={str(data_dir)!r}, "
        "config=config)\n"
        "assert len(examples) == 12\n"
        "assert 'jax' not in sys.modules, 'data/ imported JAX'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
