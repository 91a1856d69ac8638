"""Evaluation: pass@k, metrics over graded episodes, the three outputs, the report in headless
Chromium, `evaluate` through the real engine and sandbox, and `evaluate.py` end to end."""

from __future__ import annotations

import dataclasses
import html.parser
import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from toolr1_jax import engine as engine_lib
from toolr1_jax import evaluation
from toolr1_jax.agent import prompt, rollout
from toolr1_jax.data import types
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import tokenizer as tokenizer_lib
from toolr1_jax.rewards import judge as judge_lib
from toolr1_jax.sandbox import pool as pool_lib
from toolr1_jax.tools import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


@registry.tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


# ----------------------------------------------------------------------------------------------
# Hand-built episodes
# ----------------------------------------------------------------------------------------------


def make_traj(task_id, group_id, turns, final_answer, status, prompt_len=5, num_sampled=3):
    n = prompt_len + num_sampled
    mask = np.array([0] * prompt_len + [1] * num_sampled, np.int32)
    return types.Trajectory(
        task_id=task_id,
        group_id=group_id,
        tokens=np.arange(n, dtype=np.int32),
        loss_mask=mask,
        behaviour_logprobs=-0.5 * mask.astype(np.float32),
        prompt_len=prompt_len,
        policy_version=0,
        turns=tuple(turns),
        final_answer=final_answer,
        status=status,
    )


def code_turn(code, status, observation="Observation:\nok"):
    return types.Turn(f"Thought: run it.\n<code>\n{code}\n</code>", code, observation, status)


Q1 = types.Example("q1", "What is 2 + 3? <script>alert(1)</script>", "5", 1)
Q2 = types.Example("q2", "Name two capitals.", "Paris, Rome", 2, files={"notes.txt": b"x"})


def hand_built_records():
    """Two questions, three samples each, covering every status and verdict kind."""
    no_code = types.Turn("I think it is 6.\x07", None, "Observation:\nformat", "parse_error")
    episodes = [
        (Q1, ["x = add(2, 3)\nprint(x)", "final_answer(x)"], ["ok", "ok"], "5", "answered"),
        (Q1, [no_code, "final_answer(6)"], ["parse_error", "ok"], "6", "answered"),
        (Q1, ["1 / 0", "add(1, 'a')"], ["error", "error"], None, "max_turns"),
        (Q2, ["final_answer('paris,  rome')"], ["ok"], "paris,  rome", "answered"),
        (Q2, ["final_answer('Paris, Rome')"], ["ok"], "Paris, Rome", "answered"),
        (Q2, ["while True: pass  # add(1, 2)"], ["timeout"], None, "timeout"),
    ]
    records = []
    for i, (ex, codes, statuses, answer, status) in enumerate(episodes):
        turns = [
            c if isinstance(c, types.Turn) else code_turn(c, s)
            for c, s in zip(codes, statuses, strict=True)
        ]
        traj = make_traj(ex.task_id, 0 if ex is Q1 else 1, turns, answer, status)
        records.append(evaluation.grade(ex, i % 3, traj, ["add"]))
    return records


def with_verdicts(records):
    """Judge verdicts: agree, disagree (0.5 on a wrong answer), failure, agree."""
    r = list(records)
    r[0] = dataclasses.replace(r[0], judge_score=1.0, judge_rationale="same number")
    r[1] = dataclasses.replace(r[1], judge_score=0.5, judge_rationale="close <b>enough</b>")
    r[3] = dataclasses.replace(r[3], judge_error="judge unavailable")
    r[4] = dataclasses.replace(r[4], judge_score=1.0, judge_rationale="exact")
    return r


def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluation.pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        evaluation.pass_at_k(3, 5, 1)
    with pytest.raises(TypeError, match="k must be an int"):
        evaluation.pass_at_k(3, 1, 1.0)


def test_count_tool_calls_reads_calls_not_text():
    names = ["search", "add"]
    assert evaluation.count_tool_calls("r = search('x')\nprint(add(1, add(2, 3)))", names) == 3
    # Strings, comments, methods and other functions do not count.
    code = "s = 'search(1)'  # add(2, 3)\ndf.search(1)\nsearcher(2)\nprint(s)"
    assert evaluation.count_tool_calls(code, names) == 0
    # Code that does not parse falls back to a textual count.
    assert evaluation.count_tool_calls("x = search('a'\nadd (1, 2)", names) == 2
    assert evaluation.count_tool_calls("search('a')", []) == 0


def test_grade_uses_the_gaia_scorer():
    records = hand_built_records()
    assert [r.correct for r in records] == [True, False, False, True, True, False]
    # Tool calls only in code that ran; the timed-out loop's comment mentions add but never calls.
    assert [r.num_tool_calls for r in records] == [1, 0, 1, 0, 0, 0]


def test_metrics_by_hand():
    m = evaluation.compute_metrics(with_verdicts(hand_built_records()), num_samples=3, judged=True)
    expected = {
        "num_questions": 2,
        "num_episodes": 6,
        "num_samples": 3,
        "accuracy": 3 / 6,
        "accuracy/level_1": 1 / 3,
        "accuracy/level_2": 2 / 3,
        "num_questions/level_1": 1,
        "num_questions/level_2": 1,
        "pass@1": (1 / 3 + 2 / 3) / 2,
        # q1: 1 - C(2,2)/C(3,2) = 2/3; q2: 1 - C(1,2)/C(3,2) = 1.
        "pass@2": (2 / 3 + 1) / 2,
        "pass@3": 1.0,
        "pass@1/level_1": 1 / 3,
        "pass@2/level_1": 2 / 3,
        "pass@3/level_1": 1.0,
        "pass@1/level_2": 2 / 3,
        "pass@2/level_2": 1.0,
        "pass@3/level_2": 1.0,
        "answer_rate": 4 / 6,
        "avg_turns": 9 / 6,
        "avg_tokens": 8.0,
        "avg_sampled_tokens": 3.0,
        "tool_call_rate": 2 / 6,
        "tool_calls_per_episode": 2 / 6,
        "num_turns": 9,
        # Every turn with code ran: 8; the parse-error turn did not.
        "num_code_runs": 8,
        "code_error_rate": 3 / 8,
        "format_error_rate": 1 / 9,
        "status/answered": 4 / 6,
        "status/max_turns": 1 / 6,
        "status/timeout": 1 / 6,
        "num_judged": 3,
        "num_judge_failures": 1,
        # Agree on r0 and r4, disagree on r1 (0.5 counts as correct; the scorer says wrong).
        "judge_agreement": 2 / 3,
        # Over the 5 episodes without a judge failure: 1 + 0.5 + 0 + 1 + 0.
        "judge_accuracy": 2.5 / 5,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    # Without a judge there are no judge metrics.
    plain = evaluation.compute_metrics(hand_built_records(), num_samples=3, judged=False)
    assert not [k for k in plain if k.startswith(("judge", "num_judge"))]


def test_metrics_reject_uneven_samples():
    records = hand_built_records()
    with pytest.raises(ValueError, match=r"needs 3 records; got q1: 2"):
        evaluation.compute_metrics(records[1:], num_samples=3, judged=False)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        evaluation.compute_metrics(records, num_samples=0, judged=False)
    with pytest.raises(ValueError, match="no records"):
        evaluation.compute_metrics([], num_samples=1, judged=False)


class _Entries(html.parser.HTMLParser):
    """Counts report entries (`details.trajectory`) and script elements in an HTML page."""

    def __init__(self):
        super().__init__()
        self.entries, self.scripts, self.task_ids = 0, 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details" and "trajectory" in (attrs.get("class") or "").split():
            self.entries += 1
            self.task_ids.append(attrs.get("data-task-id"))
        if tag == "script":
            self.scripts += 1


def count_entries(page: str) -> _Entries:
    parser = _Entries()
    parser.feed(page)
    return parser


def hand_built_result():
    records = with_verdicts(hand_built_records())
    metrics = evaluation.compute_metrics(records, num_samples=3, judged=True)
    return evaluation.EvalResult(metrics, tuple(records), 3, True)


def test_write_outputs(tmp_path):
    result = hand_built_result()
    paths = evaluation.write_outputs(result, tmp_path / "out", run_info={"split": "validation"})
    assert sorted(p.name for p in paths.values()) == [
        "report.html",
        "results.json",
        "trajectories.jsonl",
    ]
    summary = json.loads(paths["results.json"].read_text())
    assert summary["metrics"] == pytest.approx(result.metrics)
    assert summary["run"] == {"split": "validation"} and summary["num_samples"] == 3
    assert [(q["task_id"], q["num_correct"], q["answers"]) for q in summary["questions"]] == [
        ("q1", 1, ["5", "6", None]),
        ("q2", 2, ["paris,  rome", "Paris, Rome", None]),
    ]

    lines = [json.loads(line) for line in paths["trajectories.jsonl"].read_text().splitlines()]
    assert len(lines) == 6
    first = lines[0]
    assert (first["task_id"], first["sample"], first["correct"], first["judge_score"]) == (
        "q1",
        0,
        True,
        1.0,
    )
    assert [t["code"] for t in first["turns"]] == ["x = add(2, 3)\nprint(x)", "final_answer(x)"]
    assert lines[3]["judge_error"] == "judge unavailable" and lines[3]["judge_score"] is None
    assert lines[3]["files"] == ["notes.txt"] and lines[5]["status"] == "timeout"
    assert [line["num_sampled_tokens"] for line in lines] == [3] * 6

    page = paths["report.html"].read_text()
    parsed = count_entries(page)
    assert parsed.entries == 6 and parsed.task_ids == ["q1"] * 3 + ["q2"] * 3
    # The question's <script> is text, not an element; nothing loads from elsewhere.
    assert parsed.scripts == 0
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "close &lt;b&gt;enough&lt;/b&gt;" in page
    # A control character the policy wrote is shown, not dropped; the JSONL keeps it as it is.
    assert "I think it is 6.\\x07" in page and "\x07" not in page
    assert lines[1]["turns"][0]["text"] == "I think it is 6.\x07"
    assert "http://" not in page and "https://" not in page


def chromium_dom(path: pathlib.Path, tmp_path: pathlib.Path) -> str:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (CI installs it: apt-get install -y chromium)")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--dump-dom",
        path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_one_entry_per_episode_in_chromium(tmp_path):
    result = hand_built_result()
    paths = evaluation.write_outputs(result, tmp_path / "out")
    dom = chromium_dom(paths["report.html"], tmp_path)
    parsed = count_entries(dom)
    assert parsed.entries == len(result.records) == 6
    assert parsed.scripts == 0
    # The browser parsed the escaped question back to text, and kept every turn's code.
    assert "What is 2 + 3? &lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert dom.count('class="code"') == 9 - 1  # nine turns, one without code


# ----------------------------------------------------------------------------------------------
# `evaluate` through the real engine and sandbox
# ----------------------------------------------------------------------------------------------

MAX_LEN = 384
SYSTEM_TEMPLATE = "Solve the task with Python.\n{tools}"
ANSWER_TURN = "Thought: add them.\n<code>\nfinal_answer(add(2, 3))\n</code>"


class ForcedModel(nnx.Module):
    """A real tiny transformer whose logits get a large bias toward `script[position + 1]`, so
    every episode whose prompt has the script's length writes the script's assistant turn."""

    def __init__(self, inner: model_lib.Transformer, script: np.ndarray):
        self.inner = inner
        self.config = inner.config
        self.dtype = inner.dtype
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))

    def hidden_states(self, tokens, positions, cache=None, attn_mask=None):
        return self.inner.hidden_states(tokens, positions, cache, attn_mask)

    def hidden_states_and_kv(self, tokens, positions, cache, attn_mask=None):
        return self.inner.hidden_states_and_kv(tokens, positions, cache, attn_mask)

    def __call__(self, tokens, positions, cache=None, attn_mask=None):
        logits, cache = self.inner(tokens, positions, cache, attn_mask)
        target = self.script[...][jnp.clip(positions + 1, 0, MAX_LEN)]  # [B, T]
        return logits + 1e4 * jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype), cache


def random_transformer(config: model_lib.ModelConfig) -> model_lib.Transformer:
    """A Transformer with random weights drawn on the host: initialising through nnx.Rngs runs
    one small device program per parameter, which costs seconds on a busy CPU."""
    model = nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape).astype(s.dtype)), nnx.state(model)
    )
    nnx.update(model, state)
    return model


class LenientJudge(judge_lib.Judge):
    """Accepts every answer, and fails on questions that mention `fail_on`."""

    kind = "lenient"

    def __init__(self, fail_on: str):
        super().__init__()
        self.fail_on = fail_on

    async def _judge(self, question, reference, prediction):
        if self.fail_on in question:
            raise judge_lib.JudgeError("judge server unavailable")
        return judge_lib.Verdict(1.0, f"{prediction} looks fine")


AGENT_CONFIG = rollout.AgentConfig(
    system_prompt_template=SYSTEM_TEMPLATE,
    max_turns=3,
    max_total_tokens=MAX_LEN,
    max_new_tokens_per_turn=64,
    observation_max_chars=500,
    decode_chunk_steps=8,
)


async def test_evaluate_runs_grades_and_judges_every_episode(tmp_path, capsys):
    tokenizer = tokenizer_lib.load_tokenizer(helpers.make_chatml_tokenizer_dir(tmp_path))
    examples = [
        types.Example("a", "What is 2 + 3?", "5", 1),
        types.Example("b", "What is 2 + 4?", "6", 1),
        types.Example("c", "What is 2 + 7?", "9", 2),
    ]
    config = AGENT_CONFIG
    system = prompt.render_system_prompt(SYSTEM_TEMPLATE, [add], ())
    openings = [
        prompt.build_messages(system, prompt.render_task(config.task_template, e.question))
        for e in examples
    ]
    # Precondition of the forcing: every prompt has the same length, so the one script (the
    # first question's conversation) forces the same answer turn in every episode.
    assert len({len(tokenizer.prompt_ids(m)) for m in openings}) == 1
    conversation = [*openings[0], {"role": "assistant", "content": ANSWER_TURN}]
    script = np.zeros((MAX_LEN + 1,), np.int32)
    ids = tokenizer.encode(tokenizer.render(conversation, add_generation_prompt=False))
    script[: len(ids)] = ids
    inner_config = helpers.tiny_model_config()
    model = ForcedModel(random_transformer(inner_config), script)
    engine = engine_lib.Engine(model, num_slots=4, max_len=MAX_LEN)
    judge = LenientJudge(fail_on="7")
    async with pool_lib.SandboxPool(2, 10.0, 512, tools=[add], preload=()) as pool:
        result = await evaluation.evaluate(
            examples,
            engine=engine,
            tokenizer=tokenizer,
            pool=pool,
            tools=[add],
            agent_config=config,
            sampling=engine_lib.SamplingParams(max_new_tokens=1, temperature=1.0, seed=3),
            num_samples=2,
            judge=judge,
            progress=True,
        )

    records = result.records
    assert [(r.example.task_id, r.sample) for r in records] == [
        (t, i) for t in "abc" for i in range(2)
    ]
    for r in records:
        traj = r.trajectory
        assert (traj.status, traj.final_answer, traj.task_id) == (
            "answered",
            "5",
            r.example.task_id,
        )
        assert [t.text for t in traj.turns] == [ANSWER_TURN]
        assert traj.turns[0].exec_status == "ok" and r.num_tool_calls == 1
    assert [r.correct for r in records] == [True, True, False, False, False, False]
    assert [r.judge_score for r in records] == [1.0, 1.0, 1.0, 1.0, None, None]
    assert [bool(r.judge_error) for r in records] == [False] * 4 + [True] * 2
    m = result.metrics
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["accuracy/level_1"] == pytest.approx(2 / 4) and m["accuracy/level_2"] == 0.0
    assert m["pass@1"] == pytest.approx(1 / 3) and m["pass@2"] == pytest.approx(1 / 3)
    assert (m["avg_turns"], m["tool_call_rate"], m["code_error_rate"]) == (1.0, 1.0, 0.0)
    assert m["judge_agreement"] == pytest.approx(2 / 4)
    assert (m["num_judged"], m["num_judge_failures"]) == (4, 2)
    assert m["wall_s"] > 0
    # The progress bar reached every episode.
    assert "6/6" in capsys.readouterr().err


async def test_shards_merge_to_the_unsharded_evaluation(tmp_path):
    """A multi-host evaluation (each process a share, `merge_shards` on the gathered shares)
    samples and grades exactly what one process running every question does."""
    tokenizer = tokenizer_lib.load_tokenizer(helpers.make_chatml_tokenizer_dir(tmp_path))
    examples = [
        types.Example(t, f"What is 2 + {i}?", str(2 + i), 1 + i % 2) for i, t in enumerate("abcde")
    ]
    config = AGENT_CONFIG
    model_config = helpers.tiny_model_config()
    engine = engine_lib.Engine(random_transformer(model_config), num_slots=4, max_len=MAX_LEN)
    sampling = engine_lib.SamplingParams(max_new_tokens=1, temperature=1.0, seed=5)
    async with pool_lib.SandboxPool(2, 10.0, 512, tools=[add], preload=()) as pool:

        async def run(shard):
            return await evaluation.evaluate(
                examples,
                engine=engine,
                tokenizer=tokenizer,
                pool=pool,
                tools=[add],
                agent_config=config,
                sampling=sampling,
                num_samples=2,
                progress=False,
                shard=shard,
            )

        whole = await run((0, 1))
        # Six shares of five questions: the last holds none.
        shares = {count: [await run((i, count)) for i in range(count)] for count in (2, 6)}

    def tokens(result):
        return [(r.example.task_id, r.sample, r.trajectory.tokens.tolist()) for r in result.records]

    # The samples are random (the two episodes of a question differ), so equal tokens below
    # mean every episode kept its seed.
    assert (
        whole.records[0].trajectory.tokens.tolist() != whole.records[1].trajectory.tokens.tolist()
    )
    assert [len(s.records) for s in shares[6]] == [2, 2, 2, 2, 2, 0]
    timing = ("wall_s", "time/engine_s", "time/sandbox_s")
    for count, parts in shares.items():
        merged = evaluation.merge_shards(parts)
        assert tokens(merged) == tokens(whole), count
        assert [r.correct for r in merged.records] == [r.correct for r in whole.records]
        strip = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
        assert strip(merged.metrics) == strip(whole.metrics), count
        assert merged.metrics["wall_s"] == max(p.metrics["wall_s"] for p in parts)
    with pytest.raises(ValueError, match="not the"):
        evaluation.merge_shards(shares[2][::-1])


async def test_evaluate_rejects_bad_arguments():
    example = types.Example("a", "q", "1", 1)

    class NoTools:
        tools = ()

    kw = dict(
        engine=None,
        tokenizer=None,
        pool=NoTools(),
        tools=[],
        agent_config=None,
        sampling=None,
        num_samples=1,
    )
    with pytest.raises(ValueError, match="no examples"):
        await evaluation.evaluate([], **kw)
    with pytest.raises(ValueError, match=r"task ids must be unique, repeated: \['a'\]"):
        await evaluation.evaluate([example, example], **kw)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        await evaluation.evaluate([example], **{**kw, "num_samples": 0})
    with pytest.raises(TypeError, match="must be Examples"):
        await evaluation.evaluate(["a"], **kw)
    for shard in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="0 <= index < count"):
            await evaluation.evaluate([example], **{**kw, "shard": shard})
    with pytest.raises(ValueError, match=r"tools \['add'\] differ from the sandbox pool's"):
        await evaluation.evaluate([example], **{**kw, "tools": [add]})


# ----------------------------------------------------------------------------------------------
# evaluate.py end to end on the tiny model
# ----------------------------------------------------------------------------------------------

CONFIG_FILE = """\
from configs import common


def get_config():
    c = common.base_config()
    c.model.dtype = "float32"
    c.engine.num_slots = 4
    c.engine.max_len = 1024
    c.engine.decode_chunk_steps = 8
    c.agent.system_prompt = "Solve the task with Python.\\n{tools}"
    c.agent.max_turns = 2
    c.agent.max_total_tokens = 1024
    c.agent.max_new_tokens_per_turn = 16
    c.sandbox.num_workers = 2
    c.sandbox.memory_mb = 512
    c.data.name = "qa"
    c.data.config = "eval_test"
    return c
"""

QUESTIONS = [
    {"task_id": "e1", "question": "What is 6 times 7?", "answer": "42", "level": 1},
    {"task_id": "e2", "question": "Capital of France?", "answer": "Paris", "level": 1},
    {"task_id": "e3", "question": "Sum of 1, 2 and 3?", "answer": "6", "level": 2},
]


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """Runs `python evaluate.py` once on a tiny random model and a three-question set."""
    root = tmp_path_factory.mktemp("evaluate_script")
    model_dir = helpers.make_hf_model_dir(root, "qwen2", max_position_embeddings=1024)
    tokenizer_dir = helpers.make_chatml_tokenizer_dir(root)
    manual_dir = root / "questions"
    manual_dir.mkdir()
    (manual_dir / "validation.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    config_path = root / "eval_config.py"
    config_path.write_text(CONFIG_FILE)
    output_dir = root / "out"
    cmd = [
        sys.executable,
        str(REPO / "evaluate.py"),
        f"--config={config_path}",
        f"--config.model.tokenizer={tokenizer_dir}",
        f"--config.data.data_dir={root / 'tfds'}",
        f"--config.data.manual_dir={manual_dir}",
        f"--model={model_dir}",
        "--split=validation",
        "--num_samples=2",
        f"--output_dir={output_dir}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return output_dir, proc


def test_evaluate_script_writes_all_three_outputs(script_run):
    output_dir, proc = script_run
    summary = json.loads((output_dir / "results.json").read_text())
    lines = [
        json.loads(line) for line in (output_dir / "trajectories.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 6
    assert sorted((t["task_id"], t["sample"]) for t in lines) == [
        (q["task_id"], i) for q in QUESTIONS for i in range(2)
    ]
    m = summary["metrics"]
    assert (m["num_questions"], m["num_episodes"], m["num_samples"]) == (3, 6, 2)
    # The summary agrees with the episodes it summarises.
    assert m["accuracy"] == pytest.approx(sum(t["correct"] for t in lines) / 6)
    assert m["avg_turns"] == pytest.approx(sum(len(t["turns"]) for t in lines) / 6)
    statuses = {t["status"] for t in lines}
    assert sum(m[f"status/{s}"] for s in statuses) == pytest.approx(1.0)
    for key in ("pass@1", "pass@2", "accuracy/level_1", "accuracy/level_2", "tool_call_rate"):
        assert 0.0 <= m[key] <= 1.0, key
    assert "judge_agreement" not in m  # the rule judge is the scorer itself
    assert summary["run"]["split"] == "validation" and summary["run"]["num_samples"] == 2
    assert summary["run"]["config"]["data"]["name"] == "qa"
    for t in lines:
        assert t["turns"] and all(len(turn["text"]) > 0 for turn in t["turns"])
        assert t["num_sampled_tokens"] > 0 and t["prompt_len"] > 0
    page = (output_dir / "report.html").read_text()
    assert count_entries(page).entries == 6
    # The progress bar ran over the six episodes.
    assert "6/6" in proc.stderr


def test_evaluate_script_report_in_chromium(script_run, tmp_path):
    output_dir, _ = script_run
    lines = (output_dir / "trajectories.jsonl").read_text().splitlines()
    dom = chromium_dom(output_dir / "report.html", tmp_path)
    parsed = count_entries(dom)
    assert parsed.entries == len(lines) == 6
    assert sorted(parsed.task_ids) == sorted(json.loads(line)["task_id"] for line in lines)
