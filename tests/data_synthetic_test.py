"""The synthetic suite: reference solutions run in the real sandbox to the stored answers, splits
share no entities, and generation is deterministic."""

import asyncio
import collections
import csv
import io

import pandas as pd
import pytest

from toolr1_jax.data import synthetic
from toolr1_jax.rewards import gaia_scorer
from toolr1_jax.sandbox import SandboxPool
from toolr1_jax.tools import files, search

SEED = 5
_NUM_FAMILIES = len(synthetic.FAMILIES)


def test_every_family_and_level_is_generated():
    examples = synthetic.generate("train", 2 * _NUM_FAMILIES, SEED)
    families = collections.Counter(e.metadata["family"] for e in examples)
    assert families == {name: 2 for name, _, _ in synthetic.FAMILIES}
    assert {e.level for e in examples} == {1, 2, 3}
    for e in examples:
        assert e.level == synthetic.FAMILY_LEVELS[e.metadata["family"]]
        solution = e.metadata["solution"]
        assert solution and "final_answer(" in solution[-1]
        assert not any("final_answer(" in code for code in solution[:-1])
        assert len(e.metadata["thoughts"]) == len(solution)
    level1 = synthetic.generate("validation", 20, SEED, levels=(1,))
    assert {e.level for e in level1} == {1}
    # Level-1 tasks stay short: at most two turns of a few lines, a one-line question.
    for e in level1:
        assert len(e.metadata["solution"]) <= 2 and len(e.question) < 120
        assert all(code.count("\n") <= 3 for code in e.metadata["solution"])


def test_attachments_read_back_with_pandas_and_inspect_file(tmp_path):
    # The hand-written XLSX must read the same through pandas and the inspect_file tool as the
    # CSV a solution would get.
    (example,) = synthetic.generate("train", 1, SEED, families=["table_join"])
    sheet = pd.read_excel(io.BytesIO(example.files["customers.xlsx"]))
    assert list(sheet.columns) == ["customer_id", "name", "city"]
    assert len(sheet) == 6 and sheet["customer_id"].dtype.kind == "i"
    path = tmp_path / "customers.xlsx"
    path.write_bytes(example.files["customers.xlsx"])
    text = files.inspect_file(str(path))
    for row in sheet.itertuples(index=False):
        assert f"{row.customer_id} | {row.name} | {row.city}" in text
    orders = list(csv.reader(io.StringIO(example.files["orders.csv"].decode())))
    assert orders[0] == ["order_id", "customer_id", "date", "amount"]
    assert set(int(r[1]) for r in orders[1:]) <= set(sheet["customer_id"])


def test_same_seed_same_tasks_and_prefix_stable():
    a = synthetic.generate("test", 30, SEED)
    assert a == synthetic.generate("test", 30, SEED)  # byte-identical attachments included
    assert synthetic.generate("test", 10, SEED) == a[:10]
    b = synthetic.generate("test", 30, SEED + 1)
    assert [e.question for e in a] != [e.question for e in b]
    assert synthetic.corpus(SEED) == synthetic.corpus(SEED)
    assert synthetic.corpus(SEED) != synthetic.corpus(SEED + 1)


def test_splits_share_no_entities():
    corpus_titles = {d["title"] for d in synthetic.corpus(SEED)}
    entities = {}
    for split in synthetic.SPLITS:
        examples = synthetic.generate(split, 120, SEED)
        entities[split] = {name for e in examples for name in e.metadata["entities"]}
        assert entities[split]
        for e in examples:
            if e.metadata["family"].startswith("search"):
                # What a search task asks about is in the shared corpus.
                assert set(e.metadata["entities"]) <= corpus_titles
    for i, first in enumerate(synthetic.SPLITS):
        for second in synthetic.SPLITS[i + 1 :]:
            assert not entities[first] & entities[second], (first, second)
    # The generated words themselves are disjoint too (names share only fixed suffixes like
    # "Labs" or "Kettle", which are not words of any name generator).
    words = {s: {w for name in entities[s] for w in name.split()} for s in entities}
    fixed = set(synthetic._SUFFIXES) | {k for ks in synthetic._INDUSTRIES.values() for k in ks}
    assert not (words["train"] & words["test"]) - fixed
    assert not (words["train"] & words["validation"]) - fixed
    assert not (words["validation"] & words["test"]) - fixed


async def _run_solution(pool, example, open_sessions):
    async with open_sessions:  # a few processes at a time on a small CI machine
        session = await pool.open(files=dict(example.files))
        try:
            return [await session.run(code) for code in example.metadata["solution"]]
        finally:
            await session.close()


@pytest.mark.timeout(300)
async def test_reference_solutions_reach_the_stored_answer_in_the_sandbox():
    # One task of every family from each of two splits: all levels, files, search and code.
    sample = synthetic.generate("train", _NUM_FAMILIES, SEED) + synthetic.generate(
        "test", _NUM_FAMILIES, SEED
    )
    assert {e.level for e in sample} == {1, 2, 3}
    tool = search.make_search_tool(synthetic.corpus(SEED))
    pool = SandboxPool(
        num_workers=2,
        timeout_s=60,
        memory_mb=2048,
        tools=[tool],
        preload=synthetic.SANDBOX_PRELOAD,
    )
    async with pool:
        open_sessions = asyncio.Semaphore(4)
        runs = await asyncio.gather(*(_run_solution(pool, e, open_sessions) for e in sample))
    for example, results in zip(sample, runs, strict=True):
        where = f"{example.task_id}: {example.question}"
        for r in results:
            assert r.status == "ok" and r.error is None, (where, r)
        assert all(r.final_answer is None for r in results[:-1]), where
        final = results[-1].final_answer
        assert final is not None, where
        assert gaia_scorer.question_scorer(final, example.answer), (where, final, example.answer)
        # Values the last turn copies from earlier observations really are in them.
        observed = "\n".join(r.stdout for r in results[:-1])
        for fact in example.metadata["facts"]:
            assert fact in observed, (where, fact, observed)
