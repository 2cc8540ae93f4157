"""POST /v1/chat/completions: request validation (OpenAI's ranges and error shape), `n` choices, and
server-sent events for streaming. Generation itself is the Engine's (inference.py)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from .inference import ContextLengthError, Engine, completion_id, created
from .scheduler import Generation

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatRequestError(ValueError):
    """A chat request that cannot be answered, in OpenAI's error terms (400 unless `status` says otherwise)."""

    def __init__(self, message: str, param: str | None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    max_tokens: int | None  # None: up to DEFAULT_MAX_TOKENS, within what the context leaves
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    n: int
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, kind, low, high, low_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ChatRequestError(f"Invalid type for '{key}': expected {'an integer' if kind is int else 'a number'}, "
                               f"got {json.dumps(value)}", key)
    if not (low < value if low_open else low <= value) or value > high:
        raise ChatRequestError(f"Invalid '{key}': {value} is not in {'(' if low_open else '['}{low}, {high}]", key)
    return kind(value)


def parse_chat_request(body: dict) -> ChatRequest:
    """Validate a chat completions body; errors name the parameter, as OpenAI's 400s do."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ChatRequestError(f"Invalid value for 'messages[{i}].role': {role!r}; expected one of {', '.join(ROLES)}",
                                   f"messages[{i}].role")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: the text ones are what a text model reads
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ChatRequestError(f"Invalid type for 'messages[{i}].content': expected a string", f"messages[{i}].content")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ChatRequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = _number(body, "n", 1, int, 1, 8)
    stream = bool(body.get("stream"))
    if stream and n > 1:
        raise ChatRequestError("'n' greater than 1 is not supported with 'stream' by this server", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ChatRequestError("Invalid type for 'seed': expected an integer", "seed")
    return ChatRequest(model=body.get("model"), messages=clean, max_tokens=_number(body, key, None, int, 1, 2**31 - 1),
                       temperature=_number(body, "temperature", 1.0, float, 0, 2),
                       top_p=_number(body, "top_p", 1.0, float, 0, 1, low_open=True), stop=stop, seed=seed, n=n,
                       stream=stream, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))


async def admit(engine: Engine, req: ChatRequest) -> list[Generation]:
    """Queue the request's generations (one per choice); a prompt over the model's context is a 400 here,
    before any reply starts."""
    seeds = [None if req.seed is None else req.seed + i for i in range(req.n)]  # n choices: different draws
    try:
        return await run_in_threadpool(engine.submit, req.model, req.messages, req.max_tokens, req.temperature,
                                       req.top_p, req.stop, seeds, asyncio.get_running_loop())
    except ContextLengthError as e:
        raise ChatRequestError(e.message, e.param, e.code) from None
    except KeyError:  # a fine-tuned model whose base this server no longer offers, or deleted meanwhile
        raise ChatRequestError(f"The model '{req.model}' does not exist or its base model is not served here",
                               "model", "model_not_found", status=404) from None


async def complete(gens: list[Generation], req: ChatRequest, disconnected: Callable[[], Awaitable[bool]]) -> dict:
    """A whole chat.completion object. If the client goes away first, every choice's generation is cancelled."""
    async def one(gen: Generation) -> tuple[str, dict]:
        text = ""
        async for kind, value in gen.events():
            if kind == "text":
                text += value
            elif kind == "done":
                return text, value
            else:
                raise ChatRequestError(value, None, None, status=503)

    async def watch() -> None:
        while not await disconnected():
            await asyncio.sleep(0.25)
        for gen in gens:
            gen.cancel()

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(one(g) for g in gens))
    finally:
        watcher.cancel()
        for gen in gens:
            gen.cancel()  # no-op when finished; stops the others when one failed or the request was cancelled
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i, (text, final) in enumerate(results):
        choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": final["finish_reason"]})
        usage["prompt_tokens"] = final["usage"]["prompt_tokens"]  # the prompt is counted once, as OpenAI does
        usage["completion_tokens"] += final["usage"]["completion_tokens"]
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": completion_id(), "object": "chat.completion", "created": created(), "model": req.model,
            "system_fingerprint": None, "choices": choices, "usage": usage}


async def stream(gen: Generation, req: ChatRequest):
    """Server-sent events: a role chunk, content chunks, a finish chunk, optional usage, then [DONE].
    When the client disconnects, Starlette cancels this generator and the generation is cancelled with it."""
    cid, ts = completion_id(), created()

    def chunk(delta: dict | None, finish=None, usage=None) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": ts, "model": req.model, "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in gen.events():
            if kind == "text" and value:
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, value["finish_reason"])
                if req.include_usage:
                    yield chunk(None, usage=value["usage"])
            elif kind == "error":  # headers are sent: OpenAI's streams carry an error object, then end
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                return
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()  # the client went away (or the stream ended): stop generating at the next token
