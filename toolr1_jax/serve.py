"""OpenAI-compatible HTTP server over the engine: `/v1/models`, `/v1/chat/completions` (+ SSE).

Serves a trained policy or a local judge: `chat.ChatModel` (which the `local` judge also uses
in-process, without this module's HTTP stack) behind HTTP.

    python -m toolr1_jax.serve --model=DIR --port=8000 [--host=127.0.0.1] [--num_slots=8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import uvicorn
from starlette import applications, requests, responses, routing

from toolr1_jax import chat

_ROLES = ("system", "user", "assistant", "tool", "developer")


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
                raise chat.RequestError(
                    f"messages[{index}].content: only text parts are supported, got {kind!r}.",
                    param="messages",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise chat.RequestError(
        f"messages[{index}].content must be a string or a list of text parts.", param="messages"
    )


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise chat.RequestError(f"{key} must be a number, got {value!r}.", param=key)
    if not low <= value <= high:
        raise chat.RequestError(f"{key} must be in [{low}, {high}], got {value}.", param=key)
    return float(value)


def _int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise chat.RequestError(f"{key} must be an integer, got {value!r}.", param=key)
    return value


def parse_chat_request(body: Any, served_name: str) -> tuple[chat.ChatRequest, bool, bool]:
    """(request, stream, include_usage) from a `/v1/chat/completions` JSON body."""
    if not isinstance(body, dict):
        raise chat.RequestError("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != served_name:
        raise chat.RequestError(
            f"The model {model!r} does not exist; this server serves {served_name!r}.",
            status=404,
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise chat.RequestError("messages must be a non-empty list.", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise chat.RequestError(
                f"messages[{i}] must be an object with a role in {_ROLES}.", param="messages"
            )
        parsed.append(
            {"role": message["role"], "content": _message_content(message.get("content"), i)}
        )
    for unsupported in ("tools", "functions", "tool_choice"):
        if body.get(unsupported):
            raise chat.RequestError(
                f"{unsupported} is not supported by this server.", param=unsupported
            )
    n = _int(body, "n")
    if n not in (None, 1):
        raise chat.RequestError(f"Only n=1 is supported, got n={n}.", param="n")
    top_logprobs = _int(body, "top_logprobs")
    if top_logprobs:
        raise chat.RequestError("top_logprobs is not supported.", param="top_logprobs")
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise chat.RequestError(
            f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens"
        )
    top_k = _int(body, "top_k")  # vLLM's extension; -1 means off there
    if top_k is not None and top_k < -1:
        raise chat.RequestError(f"top_k must be >= -1, got {top_k}.", param="top_k")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise chat.RequestError("top_p must be > 0.", param="top_p")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise chat.RequestError(
            "stop must be a string or a list of non-empty strings.", param="stop"
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise chat.RequestError(f"stream must be a boolean, got {stream!r}.", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise chat.RequestError("stream_options must be an object.", param="stream_options")
    request = chat.ChatRequest(
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


def _logprobs_body(model: chat.ChatModel, result: chat.ChatResult):
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


def _usage(result: chat.ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def build_app(model: chat.ChatModel):
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
        except chat.RequestError as e:
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
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face model directory, GGUF file, or named model (smollm2-135m-instruct).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port.")
    parser.add_argument("--served_model_name", "--served-model-name", default=None)
    parser.add_argument("--num_slots", "--num-slots", type=int, default=8)
    parser.add_argument("--max_len", "--max-len", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)

    model = chat.ChatModel.load(
        args.model,
        num_slots=args.num_slots,
        max_len=args.max_len,
        dtype=args.dtype,
        name=args.served_model_name,
    )
    # Compile the engine's programs before announcing the address, so the first client does
    # not pay for it.
    warmup = chat.ChatRequest(messages=({"role": "user", "content": "hi"},), max_tokens=2, seed=0)
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
