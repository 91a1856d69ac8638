"""Shared-prefix prefill: prompts queued together (a GRPO step's groups) share their common
prefixes through the copy program, and give the same tokens and log-probs as per-slot prefill.

A shared system prompt across groups, ragged tasks, identical prompts within each group, distinct
seeds per episode, then a second turn appended to every slot: the sharing engine and one that
prefills every slot on its own must agree token for token, with the engine tests' log-prob
tolerance, on one device with a row per slot, with fewer rows than slots, and on a 2x2x2 mesh.
"""

import contextlib

import jax
import numpy as np
import pytest
from flax import nnx

from tests import engine_test, helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax import sharding as sharding_lib

NUM_SLOTS = 12
MAX_LEN = 96
PREFILL_CHUNK = 16
GROUP_SIZE = 3
RNG = np.random.default_rng(17)
SYSTEM = RNG.integers(0, engine_test.VOCAB, 37).tolist()  # 2 chunks and a bit: shared by all
# Ragged tasks: empty (the prompt is the system prompt), shorter than a chunk, longer than one.
TASKS = [
    [],
    RNG.integers(0, engine_test.VOCAB, 5).tolist(),
    RNG.integers(0, engine_test.VOCAB, 23).tolist(),
]
# A second family that shares only one token with the first: nothing worth copying across.
OTHER = RNG.integers(0, engine_test.VOCAB, 20).tolist()


def _prompts():
    """Groups in request order: each task's G episodes share one prompt."""
    prompts = [SYSTEM + task for task in TASKS] + [SYSTEM[:1] + OTHER]
    return [p for p in prompts for _ in range(GROUP_SIZE)]


def _sampling(i):
    # Greedy and sampled episodes side by side; distinct seeds make the samples distinct.
    temperature = 0.0 if i % 3 == 0 else 1.0
    return engine_lib.SamplingParams(max_new_tokens=6, temperature=temperature, seed=100 + i)


@pytest.fixture(scope="module")
def model():
    return engine_test._to_nnx(engine_test._hf_model(seed=0))


@pytest.fixture(scope="module")
def engines(model):
    """(share, decode_rows) -> an engine, built once for the module (compiling dominates)."""
    built = {}

    def get(share, decode_rows=None):
        if (share, decode_rows) not in built:
            built[share, decode_rows] = engine_lib.Engine(
                model,
                num_slots=NUM_SLOTS,
                max_len=MAX_LEN,
                prefill_chunk=PREFILL_CHUNK,
                decode_rows=decode_rows,
                share_prefixes=share,
            )
        return built[share, decode_rows]

    return get


@contextlib.contextmanager
def _counting_prefill_rows(engine):
    """Counts the rows the engine's prefill program computes (real or padding) meanwhile."""
    rows = []
    prefill = engine._prefill_fn

    def counting(*args):
        rows.append(len(args[2]))  # slot_ids [P]
        return prefill(*args)

    engine._prefill_fn = counting
    try:
        yield rows
    finally:
        engine._prefill_fn = prefill


def _two_turns(engine, prompts):
    """Adds every prompt, decodes until all stop, appends an observation to each, decodes again.
    Returns {prompt index: [turn 1 output, turn 2 output]}."""
    slots = {engine.add(p, _sampling(i)): i for i, p in enumerate(prompts)}
    turns = {i: [] for i in slots.values()}
    for turn in range(2):
        waiting = set(slots)
        while waiting:
            for out in engine.step(4):
                turns[slots[out.slot]].append(out)
                waiting.discard(out.slot)
        if turn == 0:
            for slot, i in slots.items():
                engine.append(slot, [(7 * i + j) % engine_test.VOCAB for j in range(1 + i % 4)])
    for slot in slots:
        engine.release(slot)
    return turns


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for i in want:
        for a, b in zip(got[i], want[i], strict=True):
            assert a.tokens.tolist() == b.tokens.tolist(), f"prompt {i}"
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
            assert a.finish_reason == b.finish_reason


@pytest.mark.parametrize("decode_rows", [None, 4], ids=["all_rows", "4_rows"])
def test_shared_prefixes_give_per_slot_tokens_and_logprobs(engines, decode_rows):
    prompts = _prompts()
    with _counting_prefill_rows(engines(False, decode_rows)) as per_slot_rows:
        want = _two_turns(engines(False, decode_rows), prompts)
    with _counting_prefill_rows(engines(True, decode_rows)) as shared_rows:
        got = _two_turns(engines(True, decode_rows), prompts)
    _assert_same(got, want)
    # Fewer rows computed (the plan test says which), though the appends are not shared.
    assert sum(shared_rows) < sum(per_slot_rows), (shared_rows, per_slot_rows)
    # The sampled episodes of one group differ (the copies did not share their seeds).
    group = [got[i][0].tokens.tolist() for i in range(3, 3 + GROUP_SIZE)]
    assert group[1] != group[2]


def test_plan_copies_equal_prompts_and_the_prefixes_that_save_a_chunk(engines):
    engine = engines(True)
    prompts = _prompts()
    for i, p in enumerate(prompts):
        engine.add(p, _sampling(i))
    levels = engine._plan_prefills(list(engine._queued.values()))
    for slot in range(len(prompts)):
        engine.release(slot)
    writes = [(job.slot, job.start, len(job.tokens)) for _, level in levels for job in level]
    copies = [(c.donor, c.slot, c.num_tokens) for level, _ in levels for c in level]
    # Level 0 prefills the system prompt alone (slot 0, the donor of its family) in full, and
    # the other family's prompt (slot 9), which shares one token: not worth a copy.
    assert sorted(writes[:2]) == [(0, 0, 36), (9, 0, 20)]
    # The other leaders copy the 36 system tokens written (the last one is pending) and write
    # their tasks; the 5-token task fits its first chunk, the 23-token one needs two.
    assert writes[2:] == [(3, 36, 5), (6, 36, 23)]
    # Followers copy their leader's whole prompt and write nothing.
    assert sorted(copies) == [
        (0, 1, 36),
        (0, 2, 36),
        (0, 3, 36),
        (0, 6, 36),
        (3, 4, 41),
        (3, 5, 41),
        (6, 7, 59),
        (6, 8, 59),
        (9, 10, 20),
        (9, 11, 20),
    ]
    # Three levels: followers of slots 3 and 6 wait for those slots' own copies and writes.
    assert [sorted(c.slot for c in level) for level, _ in levels] == [
        [],
        [1, 2, 3, 6, 10, 11],
        [4, 5, 7, 8],
    ]


def test_no_compilation_after_warmup(engines):
    engine = engines(True, 4)
    engine.warmup()
    # Prefill for 1 and for 4 rows, each reading the cache or not (first chunks), the copy, decode.
    assert engine.num_compilations == 6
    with helpers.backend_compiles() as backend_compiles:
        _two_turns(engine, _prompts())
        engine.generate([[1, 2, 3]] * 5 + [[4]] * 3, engine_lib.SamplingParams(max_new_tokens=2))
    assert engine.num_compilations == 6
    assert backend_compiles == []


def test_on_a_mesh(model, engines):
    mesh = sharding_lib.make_mesh(2, 2, 2)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, sharding_lib.param_shardings(state, mesh)))
    engine = engine_lib.Engine(
        sharded, num_slots=NUM_SLOTS, max_len=MAX_LEN, prefill_chunk=PREFILL_CHUNK
    )
    want = _two_turns(engines(False), _prompts())
    with _counting_prefill_rows(engine) as rows:
        got = _two_turns(engine, _prompts())
    _assert_same(got, want)
    assert sum(rows) < NUM_SLOTS * 4
