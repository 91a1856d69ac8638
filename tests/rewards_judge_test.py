"""Judges: verdict parsing, the rule judge, and the openai judge against a scripted HTTP server.

The scripted server is a real `http.server` on 127.0.0.1 that answers each request according to
a script (ok / HTTP error / hang / malformed JSON / wrong content type / no verdict), so retries,
timeouts and the final error go through the official `openai` client over a real socket.
"""

import asyncio
import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from toolr1_jax.rewards import judge as judge_lib

# ----------------------------------------------------------------------------------------------
# Verdict parsing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("The answer matches.\nScore: 1", 1.0),
        ("Close but one item missing.\nScore: 0.5", 0.5),
        ("Wrong city.\nScore: 0", 0.0),
        ("**Score:** 1", 1.0),
        ("**Score: 0.5**", 0.5),
        ("score = 0", 0.0),
        ("SCORE:1.", 1.0),
        ("Score: 1.0", 1.0),
        ("Score: .5", 0.5),
        ("Score: 1/2", 0.5),
        ('{"rationale": "same value", "score": 1}', 1.0),
        ('```json\n{"score": 0.5}\n```', 0.5),
        ('{"verdict": "incorrect"}', 0.0),
        ("Verdict: CORRECT", 1.0),
        ("Verdict: Partially correct", 0.5),
        ("Verdict: partially_correct", 0.5),
        ("Verdict: INCORRECT", 0.0),
        ("I must output Score: 0, 0.5 or 1.\nThe answer is right.\nScore: 1", 1.0),
        ("<think>maybe Score: 0</think>The answer is right. Score: 1", 1.0),
        ("1", 1.0),
        ("0.5", 0.5),
        ("correct.", 1.0),
        ("  Incorrect  ", 0.0),
        ("### Final verdict: **wrong**", 0.0),
        ("Score: 10", None),
        ("Score: 1.5", None),
        ("Score: 2", None),
        ("I cannot tell.", None),
        ("", None),
        ("<think>Score: 1", None),  # an unfinished reasoning block states nothing
    ],
)
def test_parse_verdict(reply, expected):
    assert judge_lib.parse_verdict(reply) == expected


def test_prompt_template_checked():
    judge_lib.check_prompt_template(judge_lib.DEFAULT_PROMPT_TEMPLATE)
    with pytest.raises(ValueError, match="must use exactly the fields"):
        judge_lib.check_prompt_template("Q: {question} A: {prediction}")
    with pytest.raises(ValueError, match=r"uses \['answer'"):
        judge_lib.check_prompt_template("{answer} {question} {reference} {prediction}")
    with pytest.raises(ValueError, match="not a valid format string"):
        judge_lib.check_prompt_template("{question} {reference} {prediction} {")
    prompt = judge_lib.render_prompt(
        "Q={question} R={reference} P={prediction} {{literal}}", "q{x}", "r", "p"
    )
    assert prompt == "Q=q{x} R=r P=p {literal}"


def test_verdict_rejects_other_scores():
    with pytest.raises(ValueError, match="must be one of"):
        judge_lib.Verdict(score=0.7, rationale="")


# ----------------------------------------------------------------------------------------------
# Rule judge and make_judge
# ----------------------------------------------------------------------------------------------


async def test_rule_judge_scores_and_caches():
    judge = judge_lib.make_judge("rule")
    assert isinstance(judge, judge_lib.RuleJudge)
    right = await judge.score("How much?", "1000", "$1,000")
    wrong = await judge.score("How much?", "1000", "17 hours")
    assert (right.score, wrong.score) == (1.0, 0.0)
    assert "matches" in right.rationale and "does not match" in wrong.rationale
    again = await judge.score("How much?", "1000", "$1,000")
    assert again is right
    assert (judge.num_requests, judge.num_cache_hits) == (2, 1)
    with pytest.raises(TypeError, match="prediction must be a str"):
        await judge.score("q", "r", None)


def test_make_judge_errors():
    with pytest.raises(ValueError, match="Unknown judge kind 'gpt'"):
        judge_lib.make_judge("gpt")
    with pytest.raises(TypeError, match="accepts .*base_url"):
        judge_lib.make_judge("openai", url="http://127.0.0.1:1/v1", model="m")
    with pytest.raises(ValueError, match="base_url is empty"):
        judge_lib.make_judge("openai", base_url="", model="m")
    with pytest.raises(ValueError, match="must use exactly the fields"):
        judge_lib.make_judge(
            "openai", base_url="http://127.0.0.1:1/v1", model="m", prompt_template="{question}"
        )


# ----------------------------------------------------------------------------------------------
# Scripted OpenAI-compatible server
# ----------------------------------------------------------------------------------------------


def _completion_body(text: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "scripted",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


class ScriptedServer:
    """Answers request i with script[min(i, len - 1)]: ("ok", text), ("status", code),
    ("hang",), ("malformed",), ("plain",), ("slow_ok", seconds, text)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    index = len(outer.requests)
                    outer.requests.append((self.path, body))
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                try:
                    self._answer(outer.script[min(index, len(outer.script) - 1)])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected in the hang tests
                finally:
                    with outer.lock:
                        outer.active -= 1

            def _send(self, code, body, content_type="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, action):
                kind = action[0]
                if kind == "ok":
                    self._send(200, _completion_body(action[1]))
                elif kind == "slow_ok":
                    outer.stop.wait(action[1])
                    self._send(200, _completion_body(action[2]))
                elif kind == "status":
                    error = {"error": {"message": f"scripted {action[1]}", "type": "server"}}
                    self._send(action[1], json.dumps(error).encode())
                elif kind == "hang":
                    outer.stop.wait(30)
                elif kind == "malformed":
                    self._send(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
                elif kind == "plain":
                    self._send(200, b"upstream proxy error", content_type="text/plain")
                else:
                    raise AssertionError(kind)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(*script):
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _judge(server, **kwargs):
    args = dict(
        base_url=server.base_url,
        model="judge-model",
        api_key="test-key",
        timeout_s=5.0,
        max_attempts=3,
        backoff_s=0.01,
        max_tokens=64,
    )
    args.update(kwargs)
    return judge_lib.make_judge("openai", **args)


async def test_openai_judge_round_trip_and_cache(scripted):
    server = scripted(("ok", "Same city.\nScore: 1"))
    judge = _judge(server)
    verdict = await judge.score("Capital of France?", "Paris", "paris")
    assert verdict == judge_lib.Verdict(score=1.0, rationale="Same city.\nScore: 1")
    path, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-model"
    assert (body["max_tokens"], body["temperature"]) == (64, 0.0)
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert "Question: Capital of France?" in message["content"]
    assert "Reference answer: Paris" in message["content"]
    assert "Assistant's final answer: paris" in message["content"]
    # A cache hit sends nothing; a different prediction does.
    assert await judge.score("Capital of France?", "Paris", "paris") is verdict
    assert len(server.requests) == 1
    await judge.score("Capital of France?", "Paris", "Lyon")
    assert len(server.requests) == 2
    await judge.aclose()


async def test_openai_judge_retries_server_errors(scripted):
    server = scripted(("status", 500), ("status", 503), ("ok", "Score: 0.5"))
    verdict = await _judge(server).score("q", "a, b", "a")
    assert verdict.score == 0.5
    assert len(server.requests) == 3


async def test_openai_judge_retries_after_a_hang(scripted):
    server = scripted(("hang",), ("ok", "Score: 1"))
    start = time.monotonic()
    verdict = await _judge(server, timeout_s=0.5).score("q", "r", "p")
    assert verdict.score == 1.0
    assert len(server.requests) == 2
    assert time.monotonic() - start >= 0.5


async def test_openai_judge_retries_malformed_json(scripted):
    server = scripted(("malformed",), ("plain",), ("ok", "Score: 0"))
    verdict = await _judge(server).score("q", "r", "p")
    assert verdict.score == 0.0
    assert len(server.requests) == 3


async def test_openai_judge_keeps_failing_raises(scripted):
    server = scripted(("status", 500))
    judge = _judge(server)
    with pytest.raises(judge_lib.JudgeError) as info:
        await judge.score("Which year?", "1999", "1999")
    message = str(info.value)
    assert "failed 3 attempt(s)" in message
    assert "HTTP 500" in message and "'Which year?'" in message and "judge-model" in message
    assert len(server.requests) == 3
    assert judge.num_failures == 1
    # Failures are not cached: the next call asks again.
    with pytest.raises(judge_lib.JudgeError):
        await judge.score("Which year?", "1999", "1999")
    assert len(server.requests) == 6


async def test_openai_judge_hang_times_out(scripted):
    server = scripted(("hang",))
    start = time.monotonic()
    with pytest.raises(judge_lib.JudgeError, match=r"attempt 2: timed out after 0.3s"):
        await _judge(server, timeout_s=0.3, max_attempts=2).score("q", "r", "p")
    elapsed = time.monotonic() - start
    assert 0.6 <= elapsed < 3.0
    assert len(server.requests) == 2


async def test_openai_judge_malformed_forever(scripted):
    server = scripted(("malformed",), ("plain",))
    with pytest.raises(judge_lib.JudgeError) as info:
        await _judge(server).score("q", "r", "p")
    assert str(info.value).count("malformed response") == 3


async def test_openai_judge_reply_without_score(scripted):
    server = scripted(("ok", "I am not sure what to say."))
    with pytest.raises(judge_lib.JudgeError, match="no score in the reply: 'I am not sure"):
        await _judge(server, max_attempts=2).score("q", "r", "p")
    assert len(server.requests) == 2


async def test_openai_judge_client_errors_fail_fast(scripted):
    server = scripted(("status", 401))
    with pytest.raises(judge_lib.JudgeError, match="non-retryable error.*HTTP 401"):
        await _judge(server).score("q", "r", "p")
    assert len(server.requests) == 1


async def test_openai_judge_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = judge_lib.make_judge(
        "openai",
        base_url=f"http://127.0.0.1:{port}/v1",
        model="m",
        max_attempts=2,
        backoff_s=0.01,
    )
    with pytest.raises(judge_lib.JudgeError, match="attempt 2: connection error"):
        await judge.score("q", "r", "p")


async def test_openai_judge_bounded_concurrency_and_dedup(scripted):
    server = scripted(("slow_ok", 0.2, "Score: 1"))
    judge = _judge(server, max_concurrency=2)
    predictions = [f"p{i}" for i in range(6)]
    # Each distinct prediction twice: identical concurrent requests share one HTTP call.
    verdicts = await asyncio.gather(*(judge.score("q", "r", p) for p in predictions * 2))
    assert [v.score for v in verdicts] == [1.0] * 12
    assert len(server.requests) == 6
    assert server.max_active == 2
    assert (judge.num_requests, judge.num_cache_hits) == (6, 6)


def test_openai_judge_across_event_loops(scripted):
    # The trainer may run one asyncio.run per step; the judge must not stay bound to the first.
    server = scripted(("slow_ok", 0.05, "Score: 1"))
    judge = _judge(server, max_concurrency=1)

    async def step(tag):
        return await asyncio.gather(*(judge.score("q", "r", f"{tag}{i}") for i in range(3)))

    first = asyncio.run(step("a"))
    second = asyncio.run(step("b"))
    assert [v.score for v in first + second] == [1.0] * 6
    assert len(server.requests) == 6


def test_rewards_import_no_jax():
    # DESIGN: rewards/ (except the local judge, which imports lazily) stays free of JAX.
    code = (
        "import sys\n"
        "from toolr1_jax.rewards import gaia_scorer, judge, reward\n"
        "judge.make_judge('rule')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
