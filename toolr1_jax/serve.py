"""OpenAI-compatible HTTP server over the engine: `/v1/models`, `/v1/chat/completions` (+ SSE).

Serves a trained policy or a local judge. `ChatModel` (chat template -> engine -> text, with
concurrent requests batched into one engine call) is also what the `local` judge uses in-process.

    python -m toolr1_jax.serve --model=DIR --port=8000 [--host=127.0.0.1] [--num_slots=8]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import uvicorn
from starlette import applications, requests, responses, routing

from toolr1_jax import engine as engine_lib
from toolr1_jax import models

# End-of-turn tokens of common chat templates (ChatML, Llama 3); a base checkpoint's config
# often names only its end-of-text token, yet the chat template ends turns with these.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")
_ROLES = ("system", "user", "assistant", "tool", "developer")


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
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"Model directory {model_dir!r} does not exist.")
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
            stop_sequences=self._stop_sequences(request.stop),
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

    def _stop_sequences(self, stop: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Stop strings as token sequences, so the engine can stop early.

        Only an optimisation: a string can tokenize differently inside the generated text, so
        `_result` cuts at the first stop string either way. Skipped when the engine's stop tables
        are too small for these strings.
        """
        seqs = tuple(tuple(self.tokenizer.encode(s)) for s in stop)
        if len(seqs) > self.engine.max_stop_sequences or any(
            not s or len(s) > self.engine.max_stop_len for s in seqs
        ):
            return ()
        return seqs

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


# ----------------------------------------------------------------------------------------------
# Request parsing (OpenAI chat completions schema)
# ----------------------------------------------------------------------------------------------


def _message_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    f"messages[{index}].content: only text parts are supported, got {kind!r}.",
                    param="messages",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise RequestError(
        f"messages[{index}].content must be a string or a list of text parts.", param="messages"
    )


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{key} must be a number, got {value!r}.", param=key)
    if not low <= value <= high:
        raise RequestError(f"{key} must be in [{low}, {high}], got {value}.", param=key)
    return float(value)


def _int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {value!r}.", param=key)
    return value


def parse_chat_request(body: Any, served_name: str) -> tuple[ChatRequest, bool, bool]:
    """(request, stream, include_usage) from a `/v1/chat/completions` JSON body."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != served_name:
        raise RequestError(
            f"The model {model!r} does not exist; this server serves {served_name!r}.",
            status=404,
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list.", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RequestError(
                f"messages[{i}] must be an object with a role in {_ROLES}.", param="messages"
            )
        parsed.append(
            {"role": message["role"], "content": _message_content(message.get("content"), i)}
        )
    for unsupported in ("tools", "functions", "tool_choice"):
        if body.get(unsupported):
            raise RequestError(f"{unsupported} is not supported by this server.", param=unsupported)
    n = _int(body, "n")
    if n not in (None, 1):
        raise RequestError(f"Only n=1 is supported, got n={n}.", param="n")
    top_logprobs = _int(body, "top_logprobs")
    if top_logprobs:
        raise RequestError("top_logprobs is not supported.", param="top_logprobs")
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    top_k = _int(body, "top_k")  # vLLM's extension; -1 means off there
    if top_k is not None and top_k < -1:
        raise RequestError(f"top_k must be >= -1, got {top_k}.", param="top_k")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be > 0.", param="top_p")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise RequestError("stop must be a string or a list of non-empty strings.", param="stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be a boolean, got {stream!r}.", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object.", param="stream_options")
    request = ChatRequest(
        messages=tuple(parsed),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        top_k=max(top_k or 0, 0),
        stop=stop,
        seed=_int(body, "seed"),
        logprobs=bool(body.get("logprobs") or False),
    )
    return request, stream, bool(stream_options.get("include_usage", False))


# ----------------------------------------------------------------------------------------------
# HTTP app
# ----------------------------------------------------------------------------------------------


def _error_response(message: str, status: int, param: str | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if status == 404 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return responses.JSONResponse(body, status_code=status)


def _logprobs_body(model: ChatModel, result: ChatResult):
    content = []
    for token, logprob in zip(result.token_ids, result.logprobs, strict=True):
        text = model.decode([token])
        content.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [],
            }
        )
    return {"content": content}


def _usage(result: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def build_app(model: ChatModel):
    """The starlette app serving `model` (run it with uvicorn, or use `main`)."""

    async def list_models(request: requests.Request):
        del request
        card = {"id": model.name, "object": "model", "created": 0, "owned_by": "toolr1_jax"}
        return responses.JSONResponse({"object": "list", "data": [card]})

    async def health(request: requests.Request):
        del request
        return responses.PlainTextResponse("ok")

    async def chat_completions(request: requests.Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error_response(f"The request body is not valid JSON: {e}", 400)
        try:
            chat_request, stream, include_usage = parse_chat_request(body, model.name)
            result = await model.complete(chat_request)
        except RequestError as e:
            return _error_response(str(e), e.status, e.param)
        except Exception as e:  # the engine failed: the client gets a 500 with the reason
            return _error_response(f"Generation failed: {type(e).__name__}: {e}", 500)

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        logprobs = _logprobs_body(model, result) if chat_request.logprobs else None
        if not stream:
            return responses.JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model.name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": result.text},
                            "logprobs": logprobs,
                            "finish_reason": result.finish_reason,
                        }
                    ],
                    "usage": _usage(result),
                }
            )

        def chunk(delta, finish_reason=None, chunk_logprobs=None, usage=None, choices=True):
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.name,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": chunk_logprobs,
                        "finish_reason": finish_reason,
                    }
                ]
                if choices
                else [],
            }
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            # The engine returns whole completions, so the chunks follow generation rather than
            # accompany it; the protocol (role, content deltas, finish, usage, [DONE]) is exact.
            yield chunk({"role": "assistant", "content": ""})
            pieces = model.text_pieces(list(result.token_ids), result.text)
            for piece in pieces:
                yield chunk({"content": piece})
            yield chunk({}, finish_reason=result.finish_reason, chunk_logprobs=logprobs)
            if include_usage:
                yield chunk(None, usage=_usage(result), choices=False)
            yield "data: [DONE]\n\n"

        return responses.StreamingResponse(events(), media_type="text/event-stream")

    return applications.Starlette(
        routes=[
            routing.Route("/v1/models", list_models, methods=["GET"]),
            routing.Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            routing.Route("/health", health, methods=["GET"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toolr1_jax.serve", description="OpenAI-compatible server over the engine."
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port.")
    parser.add_argument("--served_model_name", "--served-model-name", default=None)
    parser.add_argument("--num_slots", "--num-slots", type=int, default=8)
    parser.add_argument("--max_len", "--max-len", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)

    model = ChatModel.load(
        args.model,
        num_slots=args.num_slots,
        max_len=args.max_len,
        dtype=args.dtype,
        name=args.served_model_name,
    )
    # Compile the engine's programs before announcing the address, so the first client does
    # not pay for it.
    warmup = ChatRequest(messages=({"role": "user", "content": "hi"},), max_tokens=2, seed=0)
    asyncio.run(model.complete(warmup))
    model.reset_loop()

    # Bind and listen before announcing: a client that connects at once waits in the backlog.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    print(f"toolr1_jax.serve: serving {model.name!r} at http://{args.host}:{port}/v1", flush=True)
    config = uvicorn.Config(build_app(model), log_level="warning", timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
