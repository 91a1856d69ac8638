"""The OpenAI-compatible server, the `openai` judge through it, and the `local` judge.

The model is a tiny Qwen2 checkpoint saved by transformers with hand-set weights: attention and
MLP outputs are zero, so the next token depends only on the current one (a bigram table), and the
table makes greedy decoding after the chat prompt spell "Score: 1" then <|im_end|>. That gives
exact expected outputs for a real engine behind a real HTTP server, and a parseable verdict for
the judges.
"""

import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import helpers
import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

from toolr1_jax import serve
from toolr1_jax.rewards import judge as judge_lib

REPLY = "Score: 1"
SERVED_NAME = "tiny-judge"
MAX_LEN = 256
# Short prompts keep every request in the engine's smallest prefill bucket (one compilation);
# the default template's parsing is covered against the scripted server in rewards_judge_test.
SHORT_TEMPLATE = "{question}\n{reference}\n{prediction}"


def _build_bigram_model_dir(root: pathlib.Path) -> tuple[pathlib.Path, list[int], list[int]]:
    tok_dir = helpers.make_chatml_tokenizer_dir(root)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": "any question"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok.encode(prompt_ids, add_special_tokens=False)
    reply_ids = tok.encode(REPLY, add_special_tokens=False)
    chain = [prompt_ids[-1], *reply_ids, helpers.IM_END_ID]
    # Every prompt ends with "assistant\n"; each chain token must lead to exactly one next token.
    assert len(set(chain[:-1])) == len(chain) - 1, chain

    model = helpers.make_hf_model("qwen2", seed=3)
    hidden = model.config.hidden_size
    assert len(chain) <= hidden
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        for k, (src, dst) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
            embed[src] = torch.nn.functional.one_hot(torch.tensor(k), hidden).float()
            head[:, k] = 0.0
            head[dst, k] = 5.0
    path = root / "bigram_model"
    model.save_pretrained(path)
    for name in os.listdir(tok_dir):
        shutil.copy(tok_dir / name, path / name)
    return path, prompt_ids, reply_ids


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    return _build_bigram_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(bigram):
    model_dir = bigram[0]
    cmd = [
        sys.executable,
        "-m",
        "toolr1_jax.serve",
        f"--model={model_dir}",
        "--port=0",
        f"--served_model_name={SERVED_NAME}",
        "--num_slots=2",
        f"--max_len={MAX_LEN}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    deadline = time.monotonic() + 180
    url = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("toolr1_jax.serve: serving"):
            url = line.rsplit(" at ", 1)[1].strip()
            break
    if url is None:
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(lines) + (proc.stdout.read() or ""))
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _ask(client, content="any question", **kwargs):
    return client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": content}],
        temperature=0.0,
        **kwargs,
    )


def test_models_endpoint(client):
    assert [m.id for m in client.models.list()] == [SERVED_NAME]


def test_chat_completion(client, bigram):
    _, prompt_ids, reply_ids = bigram
    response = _ask(client, max_tokens=32)
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert response.model == SERVED_NAME
    assert response.usage.prompt_tokens == len(prompt_ids)
    # The reply's tokens plus the <|im_end|> that stopped generation.
    assert response.usage.completion_tokens == len(reply_ids) + 1


def test_length_limit_and_stop_strings(client, bigram):
    tok = transformers.AutoTokenizer.from_pretrained(bigram[0])
    short = _ask(client, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == tok.decode(bigram[2][:2])
    stopped = _ask(client, max_tokens=32, stop=[":", "zzz"])
    assert stopped.choices[0].message.content == "Score"
    assert stopped.choices[0].finish_reason == "stop"
    # More stop strings than OpenAI's four, one spanning two tokens: generation ends at the
    # token that completes it (counted in the usage), not at <|im_end|>.
    stops = [f"never {i}" for i in range(8)] + ["re: "]
    stopped = _ask(client, max_tokens=32, stop=stops)
    assert stopped.choices[0].message.content == "Sco"
    assert stopped.choices[0].finish_reason == "stop"
    reply_ids = bigram[2]
    kept = next(k for k in range(1, len(reply_ids) + 1) if "re: " in tok.decode(reply_ids[:k]))
    assert kept < len(reply_ids)
    assert stopped.usage.completion_tokens == kept


def test_logprobs(client, bigram):
    response = _ask(client, max_tokens=32, logprobs=True)
    content = response.choices[0].logprobs.content
    assert "".join(t.token for t in content) == REPLY
    assert len(content) == len(bigram[2])
    # The bigram table makes each greedy token nearly certain.
    assert all(-0.01 < t.logprob <= 0.0 for t in content)


def test_streaming(client, bigram):
    stream = _ask(client, max_tokens=32, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    # One content chunk per token of the reply.
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) == len(bigram[2])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(bigram[2]) + 1
    assert len({c.id for c in chunks}) == 1


async def test_concurrent_async_requests(server):
    async with openai.AsyncOpenAI(base_url=server, api_key="unused", max_retries=0) as client:
        responses = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=SERVED_NAME,
                    messages=[{"role": "user", "content": f"question {i}"}],
                    temperature=0.0,
                    max_tokens=16,
                )
                for i in range(6)
            )
        )
    assert [r.choices[0].message.content for r in responses] == [REPLY] * 6


def test_bad_requests(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model=SERVED_NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="the prompt has .* max_tokens asks for"):
        _ask(client, max_tokens=MAX_LEN)
    with pytest.raises(openai.BadRequestError, match="Only n=1"):
        _ask(client, n=2)
    raw = httpx.post(f"{server}/chat/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400
    assert "not valid JSON" in raw.json()["error"]["message"]


async def test_openai_judge_through_server(server):
    judge = judge_lib.make_judge(
        "openai",
        base_url=server,
        model=SERVED_NAME,
        timeout_s=60,
        max_tokens=32,
        prompt_template=SHORT_TEMPLATE,
    )
    verdicts = await asyncio.gather(
        judge.score("Capital?", "Paris", "Paris"), judge.score("Capital?", "Paris", "Lyon")
    )
    assert verdicts == [judge_lib.Verdict(score=1.0, rationale=REPLY)] * 2
    assert judge.num_requests == 2
    await judge.aclose()


def test_cli_rejects_missing_model_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"Model directory {str(missing)!r} does not exist"):
        serve.main([f"--model={missing}", "--port=0"])


async def test_local_judge(bigram):
    judge = judge_lib.make_judge(
        "local",
        model_dir=str(bigram[0]),
        max_tokens=16,
        max_len=MAX_LEN,
        num_slots=2,
        prompt_template=SHORT_TEMPLATE,
    )
    predictions = ["Paris", "Lyon", "Marseille"]
    verdicts = await asyncio.gather(*(judge.score("Capital?", "Paris", p) for p in predictions))
    assert [v.score for v in verdicts] == [1.0, 1.0, 1.0]
    assert verdicts[0].rationale == REPLY
    assert judge.num_requests == 3


def test_bigram_fixture_is_what_transformers_generates(bigram):
    # The expected reply is a property of the weights, checked with transformers' own generate.
    model_dir, prompt_ids, reply_ids = bigram
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False, eos_token_id=2
    )
    generated = out[0, len(prompt_ids) :].tolist()
    assert generated == [*reply_ids, helpers.IM_END_ID]
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2"
    assert np.all(np.asarray(generated) < 512)
