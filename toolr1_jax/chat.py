"""A chat model: chat template -> engine -> text, with concurrent requests batched into one
engine call. `serve.py` puts it behind HTTP; the `local` judge uses it in-process (no HTTP stack).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import threading
from collections.abc import Sequence

import jax.numpy as jnp

from toolr1_jax import engine as engine_lib
from toolr1_jax import models

# End-of-turn tokens of common chat templates (ChatML, Llama 3); a base checkpoint's config
# often names only its end-of-text token, yet the chat template ends turns with these.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")


class RequestError(ValueError):
    """A request the server refuses; answered with HTTP `status` and an OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict[str, str], ...]
    max_tokens: int | None = None  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh seed per engine call
    logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class ChatResult:
    text: str
    token_ids: tuple[int, ...]  # generated ids kept in the answer (stop token dropped)
    logprobs: tuple[float, ...]  # the engine's log-prob of each of token_ids
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int  # every generated token, including a dropped stop token


@dataclasses.dataclass
class _Pending:
    prompt: list[int]
    sampling: engine_lib.SamplingParams
    future: asyncio.Future


class ChatModel:
    """A model, its tokenizer and an engine, answering chat requests.

    Requests that arrive while the engine is busy are queued and run together in the next
    engine call (each with its own sampling settings), from a worker thread so the event loop stays
    responsive. The engine is used by one thread at a time.
    """

    def __init__(
        self,
        engine: engine_lib.Engine,
        tokenizer: models.Tokenizer,
        *,
        name: str,
        max_len: int,
        stop_token_ids: Sequence[int],
    ):
        self.engine = engine
        self.tokenizer = tokenizer  # models.Tokenizer
        self.name = name
        self.max_len = int(max_len)
        self.stop_token_ids = tuple(sorted(set(int(i) for i in stop_token_ids)))
        # Request stop strings are matched by the engine on the answer's text.
        if engine.detokenize is None:
            engine.detokenize = self.decode
        self._engine_lock = threading.Lock()
        self.reset_loop()

    @classmethod
    def load(
        cls,
        model_dir: str,
        *,
        num_slots: int = 8,
        max_len: int = 4096,
        dtype: str = "float32",
        name: str | None = None,
    ) -> ChatModel:
        model_dir = os.fspath(model_dir)
        models.sources.check(model_dir)  # an HF directory, a GGUF file or a named model
        model, config = models.load_pretrained(model_dir, dtype=jnp.dtype(dtype))
        tokenizer = models.load_tokenizer(model_dir)
        engine = engine_lib.Engine(model, num_slots=num_slots, max_len=max_len)
        stop_ids = set(config.eos_token_ids) | set(tokenizer.eos_token_ids)
        vocab = tokenizer.hf.get_vocab()
        stop_ids |= {vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab}
        if not stop_ids:
            raise ValueError(
                f"No end-of-sequence token found for {model_dir!r} (config.json, "
                "generation_config.json and the tokenizer name none); generation could not stop."
            )
        return cls(
            engine,
            tokenizer,
            name=name or os.path.basename(os.path.normpath(model_dir)),
            max_len=max_len,
            stop_token_ids=sorted(stop_ids),
        )

    # -- prompt side ---------------------------------------------------------------------------

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        try:
            return self.tokenizer.prompt_ids(messages)
        except Exception as e:  # jinja raises its own errors for messages the template refuses
            raise RequestError(f"The chat template rejected the messages: {e}") from e

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- generation ----------------------------------------------------------------------------

    def reset_loop(self) -> None:
        """Forget loop-bound state; needed when the model is used from a new event loop."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None

    async def complete(self, request: ChatRequest) -> ChatResult:
        prompt = self.encode_messages(request.messages)
        budget = self.max_len - len(prompt)
        if budget < 1:
            raise RequestError(
                f"The prompt has {len(prompt)} tokens; the context is {self.max_len} tokens, "
                "which leaves no room to generate.",
                param="messages",
            )
        max_tokens = budget if request.max_tokens is None else request.max_tokens
        if max_tokens > budget:
            raise RequestError(
                f"The context is {self.max_len} tokens; the prompt has {len(prompt)} and "
                f"max_tokens asks for {max_tokens} more.",
                param="max_tokens",
            )
        if request.seed is None:
            # The engine's random stream depends only on the seed and positions: unseeded
            # requests each need their own seed or equal prompts would sample equal text.
            seed = secrets.randbelow(2**31)
        else:
            seed = request.seed
        sampling = engine_lib.SamplingParams(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stop_token_ids=self.stop_token_ids,
            stop_strings=request.stop,
            seed=seed,
        )
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.reset_loop()
            self._loop = loop
        future = loop.create_future()
        self._pending.append(_Pending(prompt, sampling, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        completion = await future
        return self._result(prompt, completion, request)

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let requests arriving in the same tick join this batch
            batch, self._pending = self._pending, []
            live = [item for item in batch if not item.future.done()]  # skip cancelled ones
            if not live:
                continue
            try:
                outs = await asyncio.to_thread(
                    self._generate, [i.prompt for i in live], [i.sampling for i in live]
                )
            except Exception as e:
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            for item, out in zip(live, outs, strict=True):
                if not item.future.done():
                    item.future.set_result(out)

    def _generate(self, prompts, sampling):
        with self._engine_lock:
            return self.engine.generate(prompts, sampling)

    def _result(self, prompt: list[int], completion, request: ChatRequest) -> ChatResult:
        tokens = [int(t) for t in completion.tokens]
        logprobs = [float(x) for x in completion.logprobs]
        finish_reason = completion.finish_reason
        num_generated = len(tokens)
        if finish_reason == "stop" and tokens and tokens[-1] in self.stop_token_ids:
            tokens, logprobs = tokens[:-1], logprobs[:-1]
        text = self.decode(tokens)
        # The engine kept the token that completed a stop string; the answer ends before it.
        if request.stop:
            cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                finish_reason = "stop"
                tokens, logprobs = _tokens_covering(self, tokens, logprobs, text)
        return ChatResult(
            text=text,
            token_ids=tuple(tokens),
            logprobs=tuple(logprobs),
            finish_reason=finish_reason,
            prompt_tokens=len(prompt),
            completion_tokens=num_generated,
        )

    def text_pieces(self, token_ids: Sequence[int], text: str) -> list[str]:
        """Splits `text` into one piece per token where decoding allows (for streaming)."""
        pieces, emitted = [], 0
        for i in range(1, len(token_ids) + 1):
            prefix = self.decode(token_ids[:i])
            # A prefix ending in U+FFFD is a partial UTF-8 character: wait for the rest.
            if prefix.endswith("\ufffd") or not text.startswith(prefix) or len(prefix) <= emitted:
                continue
            pieces.append(text[emitted : len(prefix)])
            emitted = len(prefix)
        if emitted < len(text):
            pieces.append(text[emitted:])
        return pieces


def _tokens_covering(model: ChatModel, tokens, logprobs, text):
    """The shortest token prefix whose decoding covers `text` (after a stop-string cut)."""
    for i in range(len(tokens) + 1):
        if len(model.decode(tokens[:i])) >= len(text):
            return tokens[:i], logprobs[:i]
    return tokens, logprobs
