"""Judges grade a final answer against the reference: score in {0, 0.5, 1} plus a rationale.

Backends: `rule` (GAIA's exact scorer), `openai` (any OpenAI-compatible chat endpoint: vLLM,
SGLang, toolr1_jax.serve) and `local` (a model run by this project's engine). All are async,
cache by (question, reference, prediction) and raise `JudgeError` when they keep failing, so a
failed judgement is never mistaken for a wrong answer. Only the `local` backend imports JAX.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import random
import re
import string
from typing import Any

import openai

from toolr1_jax.rewards import gaia_scorer

VALID_SCORES = (0.0, 0.5, 1.0)

DEFAULT_PROMPT_TEMPLATE = """\
You are grading an AI assistant's final answer to a question against the reference answer.

Question: {question}

Reference answer: {reference}

Assistant's final answer: {prediction}

Decide whether the assistant's answer means the same as the reference answer. Ignore formatting, \
capitalisation and harmless extra words; do not solve the question yourself. Give 1 if the answer \
is correct, 0.5 if it is partially correct (for example one of several required items is missing), \
and 0 if it is wrong or missing.

Explain your reasoning in one or two sentences, then end with a line of the form "Score: 1", \
"Score: 0.5" or "Score: 0"."""

_TEMPLATE_FIELDS = frozenset({"question", "reference", "prediction"})


@dataclasses.dataclass(frozen=True)
class Verdict:
    score: float  # one of VALID_SCORES
    rationale: str

    def __post_init__(self):
        if self.score not in VALID_SCORES:
            raise ValueError(f"Verdict score must be one of {VALID_SCORES}, got {self.score!r}.")


class JudgeError(RuntimeError):
    """A judge could not produce a verdict; the group it was judging must be dropped."""


# ----------------------------------------------------------------------------------------------
# Verdict parsing
# ----------------------------------------------------------------------------------------------

_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)
_VALUE = (
    r"1\s*/\s*2|1(?:\.0+)?|0?\.50*|0(?:\.0+)?"
    r"|incorrect|partially[\s_-]*correct|partial|correct|wrong|right"
)
# A label, an optional quote/colon/equals (covers "Score: 1", "score = 0.5" and JSON
# '"score": 1'), then the value; the lookahead refuses "10" or "1.5" but accepts "1." at a
# sentence end.
_LABELLED = re.compile(
    r"\b(?:score|verdict|grade|rating|judg(?:e)?ment)\b[\"']?\s*[:=]?\s*[\"']?\s*"
    rf"(?P<value>{_VALUE})(?!\w|\.\d)",
    re.IGNORECASE,
)
_BARE = re.compile(rf"(?P<value>{_VALUE})", re.IGNORECASE)
_WORD_SCORES = {
    "correct": 1.0,
    "right": 1.0,
    "incorrect": 0.0,
    "wrong": 0.0,
    "partial": 0.5,
}


def _value_to_score(value: str) -> float:
    value = value.lower()
    if "/" in value:
        return 0.5
    if value.startswith("partially"):
        return 0.5
    if value in _WORD_SCORES:
        return _WORD_SCORES[value]
    return float(value)


def parse_verdict(reply: str) -> float | None:
    """The score a judge's reply states, or None when it states none.

    Tolerates markdown emphasis, JSON, reasoning blocks (`<think>...</think>`), case, and words
    ("correct", "partially correct", "incorrect") instead of numbers. The last labelled score
    wins (the reply may quote the instructions first); a reply that is only a value also counts.
    """
    text = _THINK_BLOCK.sub("", reply).replace("*", "").replace("`", "").replace("#", "")
    labelled = list(_LABELLED.finditer(text))
    if labelled:
        return _value_to_score(labelled[-1].group("value"))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        last = lines[-1].strip(string.punctuation.replace(".", "").replace("/", "") + " ")
        last = last.rstrip(".")
        bare = _BARE.fullmatch(last)
        if bare:
            return _value_to_score(bare.group("value"))
    return None


def render_prompt(template: str, question: str, reference: str, prediction: str) -> str:
    return template.format(question=question, reference=reference, prediction=prediction)


def check_prompt_template(template: str) -> None:
    """Raises ValueError unless `template` uses exactly {question}, {reference}, {prediction}."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"Judge prompt template is not a valid format string: {e}") from e
    if names != _TEMPLATE_FIELDS:
        raise ValueError(
            "Judge prompt template must use exactly the fields {question}, {reference} and "
            f"{{prediction}} (write literal braces as {{{{ }}}}); it uses {sorted(names)}."
        )


# ----------------------------------------------------------------------------------------------
# The interface: caching and de-duplication of concurrent identical requests
# ----------------------------------------------------------------------------------------------

_Key = tuple[str, str, str]


class Judge(abc.ABC):
    """`await judge.score(question, reference, prediction) -> Verdict`, cached.

    Successful verdicts are cached by (question, reference, prediction); failures are not, so a
    later call retries. Concurrent calls with the same key share one request. A judge can be
    used from successive event loops (e.g. one `asyncio.run` per training step): per-loop state
    (in-flight tasks, HTTP clients, semaphores) is rebuilt when the running loop changes.
    """

    kind: str = ""

    def __init__(self):
        self._cache: dict[_Key, Verdict] = {}
        self._inflight: dict[_Key, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_requests = 0  # judgements actually run (cache misses)
        self.num_cache_hits = 0
        self.num_failures = 0

    async def score(self, question: str, reference: str, prediction: str) -> Verdict:
        for name, value in (
            ("question", question),
            ("reference", reference),
            ("prediction", prediction),
        ):
            if not isinstance(value, str):
                raise TypeError(
                    f"{type(self).__name__}.score: {name} must be a str, got "
                    f"{type(value).__name__} ({value!r})."
                )
        key = (question, reference, prediction)
        if key in self._cache:
            self.num_cache_hits += 1
            return self._cache[key]
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._inflight = {}
            self._on_new_loop()
        task = self._inflight.get(key)
        if task is None:
            self.num_requests += 1
            task = loop.create_task(self._judge(question, reference, prediction))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finish(key, t))
        else:
            self.num_cache_hits += 1
        # shield: one caller being cancelled must not cancel the request others wait on.
        return await asyncio.shield(task)

    def _finish(self, key: _Key, task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled():
            return
        if task.exception() is None:
            self._cache[key] = task.result()
        else:
            self.num_failures += 1

    def _on_new_loop(self) -> None:  # noqa: B027 (optional hook)
        """Rebuild loop-bound resources; called before the first request on a new loop."""

    @abc.abstractmethod
    async def _judge(self, question: str, reference: str, prediction: str) -> Verdict:
        """One uncached judgement; raises JudgeError when it cannot produce one."""

    async def aclose(self) -> None:  # noqa: B027 (optional hook)
        """Release connections; the judge stays usable (they are rebuilt on demand)."""


class RuleJudge(Judge):
    """GAIA's exact scorer as a judge: 1 or 0, never 0.5, never fails."""

    kind = "rule"

    async def _judge(self, question: str, reference: str, prediction: str) -> Verdict:
        del question  # the exact scorer only compares answers
        ok = gaia_scorer.question_scorer(prediction, reference)
        word = "matches" if ok else "does not match"
        return Verdict(
            score=1.0 if ok else 0.0,
            rationale=f"GAIA exact scorer: {prediction!r} {word} {reference!r}.",
        )


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP judge
# ----------------------------------------------------------------------------------------------


class _MalformedReply(Exception):
    pass


# Statuses worth retrying: overload, rate limits, server errors. Anything else (bad request,
# auth, unknown model) will not get better by asking again.
_RETRYABLE_STATUS = frozenset({408, 409, 429})


def _is_retryable_status(status: int) -> bool:
    return status in _RETRYABLE_STATUS or status >= 500


class OpenAIJudge(Judge):
    """A judge behind any OpenAI-compatible `/v1/chat/completions` endpoint.

    Each attempt is bounded by `timeout_s` (both the client's HTTP timeout and an overall
    deadline, so a server trickling bytes cannot stall a step); failed attempts (timeouts,
    connection errors, 408/409/429/5xx, malformed JSON, replies without a verdict) are retried
    `max_attempts` times in all with jittered exponential backoff; at most `max_concurrency`
    requests are in flight per event loop. Other HTTP errors fail at once.
    """

    kind = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        timeout_s: float = 60.0,
        max_attempts: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 32,
        max_tokens: int = 512,
        temperature: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if not base_url:
            raise ValueError("OpenAIJudge: base_url is empty (e.g. 'http://127.0.0.1:8000/v1').")
        if not model:
            raise ValueError("OpenAIJudge: model is empty; give the served model's name.")
        if timeout_s <= 0 or max_attempts < 1 or max_concurrency < 1 or backoff_s < 0:
            raise ValueError(
                f"OpenAIJudge: need timeout_s > 0, max_attempts >= 1, max_concurrency >= 1 and "
                f"backoff_s >= 0; got timeout_s={timeout_s}, max_attempts={max_attempts}, "
                f"max_concurrency={max_concurrency}, backoff_s={backoff_s}."
            )
        check_prompt_template(prompt_template)
        self.base_url = base_url
        self.model = model
        self._api_key = api_key or "EMPTY"
        self.prompt_template = prompt_template
        self.timeout_s = float(timeout_s)
        self.max_attempts = int(max_attempts)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_concurrency = int(max_concurrency)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self._rng = random.Random(seed)
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def _on_new_loop(self) -> None:
        # The HTTP connection pool and the semaphore belong to the loop that created them.
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._api_key,
            timeout=self.timeout_s,
            max_retries=0,  # retries are ours, with our backoff and error accounting
        )
        self._semaphore = asyncio.Semaphore(self.max_concurrency)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._loop = None  # forces a fresh client on the next request

    def _backoff_s(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * self._rng.uniform(0.5, 1.0)

    async def _request(self, prompt: str) -> str:
        assert self._client is not None
        completion = await self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )
        # The client returns plain text for a non-JSON content type and builds models without
        # validation, so check the shape ourselves.
        if not isinstance(completion, openai.types.chat.ChatCompletion):
            raise _MalformedReply(
                f"expected a chat completion object, got {type(completion).__name__}: "
                f"{str(completion)[:200]!r}"
            )
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError, KeyError) as e:
            raise _MalformedReply(f"no choices[0].message.content in the response ({e})") from e
        if not isinstance(content, str):
            raise _MalformedReply(f"message content is {type(content).__name__}, not text")
        return content

    async def _judge(self, question: str, reference: str, prediction: str) -> Verdict:
        prompt = render_prompt(self.prompt_template, question, reference, prediction)
        errors: list[str] = []
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(self._backoff_s(attempt))
            try:
                assert self._semaphore is not None
                async with self._semaphore:
                    reply = await asyncio.wait_for(self._request(prompt), self.timeout_s)
            except (TimeoutError, openai.APITimeoutError):
                errors.append(f"timed out after {self.timeout_s:g}s")
                continue
            except openai.APIStatusError as e:
                message = f"HTTP {e.status_code}: {str(e)[:300]}"
                if not _is_retryable_status(e.status_code):
                    raise self._error(question, errors + [message], retryable=False) from e
                errors.append(message)
                continue
            except openai.APIConnectionError as e:
                errors.append(f"connection error: {e.__cause__ or e}")
                continue
            except (_MalformedReply, openai.APIResponseValidationError) as e:
                errors.append(f"malformed response: {e}")
                continue
            except ValueError as e:  # json.JSONDecodeError from a body that claims to be JSON
                errors.append(f"malformed response: {type(e).__name__}: {e}")
                continue
            score = parse_verdict(reply)
            if score is None:
                errors.append(f"no score in the reply: {reply[:300]!r}")
                continue
            return Verdict(score=score, rationale=reply.strip())
        raise self._error(question, errors, retryable=True)

    def _error(self, question: str, errors: list[str], *, retryable: bool) -> JudgeError:
        how = (
            f"failed {len(errors)} attempt(s)"
            if retryable
            else f"got a non-retryable error after {len(errors) - 1} earlier failure(s)"
        )
        details = "; ".join(f"attempt {i + 1}: {e}" for i, e in enumerate(errors))
        return JudgeError(
            f"openai judge (model {self.model!r} at {self.base_url}) {how} for question "
            f"{question[:80]!r}: {details}"
        )


# ----------------------------------------------------------------------------------------------
# Local judge: a model run by this project's engine
# ----------------------------------------------------------------------------------------------


class LocalJudge(Judge):
    """A judge model run in-process by toolr1_jax's engine (imports JAX on construction).

    Concurrent judgements are batched into one engine call. Greedy decoding (the default) is
    deterministic, so a reply without a verdict is not retried unless `temperature > 0`.
    """

    kind = "local"

    def __init__(
        self,
        *,
        model_dir: str,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        max_tokens: int = 512,
        temperature: float = 0.0,
        max_attempts: int = 1,
        num_slots: int = 8,
        max_len: int = 4096,
        seed: int = 0,
    ):
        super().__init__()
        check_prompt_template(prompt_template)
        if max_attempts < 1:
            raise ValueError(f"LocalJudge: max_attempts must be >= 1, got {max_attempts}.")
        # Lazy import: the rule and openai judges must not pull in JAX.
        from toolr1_jax import chat

        self.prompt_template = prompt_template
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.max_attempts = int(max_attempts) if temperature > 0 else 1
        self.seed = int(seed)
        self.chat_model = chat.ChatModel.load(model_dir, num_slots=num_slots, max_len=max_len)

    async def _judge(self, question: str, reference: str, prediction: str) -> Verdict:
        from toolr1_jax import chat

        prompt = render_prompt(self.prompt_template, question, reference, prediction)
        replies = []
        for attempt in range(self.max_attempts):
            request = chat.ChatRequest(
                messages=({"role": "user", "content": prompt},),
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                seed=self.seed + attempt,
            )
            try:
                result = await self.chat_model.complete(request)
            except chat.RequestError as e:
                raise JudgeError(f"local judge rejected the prompt: {e}") from e
            score = parse_verdict(result.text)
            if score is not None:
                return Verdict(score=score, rationale=result.text.strip())
            replies.append(result.text)
        raise JudgeError(
            f"local judge ({self.chat_model.name}) gave no score in {len(replies)} attempt(s) "
            f"for question {question[:80]!r}; last reply: {replies[-1][:300]!r}"
        )


_BACKENDS: dict[str, type[Judge]] = {"rule": RuleJudge, "openai": OpenAIJudge, "local": LocalJudge}


def make_judge(kind: str, **kwargs: Any) -> Judge:
    """Builds a judge: `make_judge("rule")`, `make_judge("openai", base_url=..., model=...)`,
    `make_judge("local", model_dir=...)`; keyword arguments go to the backend's constructor."""
    if kind not in _BACKENDS:
        raise ValueError(f"Unknown judge kind {kind!r}; expected one of {sorted(_BACKENDS)}.")
    cls = _BACKENDS[kind]
    try:
        return cls(**kwargs)
    except TypeError as e:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise TypeError(
            f"make_judge({kind!r}): bad arguments {sorted(kwargs)} ({e}); {cls.__name__} accepts "
            f"{accepted}."
        ) from e
