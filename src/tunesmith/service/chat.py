"""POST /v1/chat/completions: the validated request (schemas.py checks every type and range), `n` choices, and
server-sent events for streaming. Generation itself runs in the inference process (inference.py)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from .inference import ContextLengthError, Engine, completion_id, created
from .inference_process import Reply
from .schemas import ChatCompletionCreate


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


def chat_request(body: ChatCompletionCreate) -> ChatRequest:
    """What generation needs of a validated body: text messages (content parts joined, developer as system),
    OpenAI's defaults filled in."""
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content or ""
        if isinstance(content, list):  # content parts: a text model reads text parts, and refuses the others
            for j, part in enumerate(content):  # (an image dropped silently would be answered as if never sent)
                if part.type != "text":
                    raise ChatRequestError(f"content part type {part.type!r} is not supported: the models this "
                                           "server runs read text only", f"messages[{i}].content[{j}].type")
                if part.text is None:
                    raise ChatRequestError("a text content part needs its 'text'", f"messages[{i}].content[{j}].text")
            content = "".join(p.text for p in content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    n, stream = body.n or 1, bool(body.stream)
    if stream and n > 1:
        raise ChatRequestError("'n' greater than 1 is not supported with 'stream' by this server", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return ChatRequest(model=body.model, messages=messages,
                       max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed, n=n, stream=stream,
                       include_usage=bool(body.stream_options and body.stream_options.include_usage))


async def admit(engine: Engine, req: ChatRequest) -> list[Reply]:
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


async def complete(gens: list[Reply], req: ChatRequest, disconnected: Callable[[], Awaitable[bool]]) -> dict:
    """A whole chat.completion object. If the client goes away first, every choice's generation is cancelled."""
    async def one(gen: Reply) -> tuple[str, dict]:
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


async def stream(gen: Reply, req: ChatRequest):
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
