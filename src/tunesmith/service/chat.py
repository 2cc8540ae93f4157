"""POST /v1/chat/completions: request validation (OpenAI's ranges and error shape), `n` choices, and
server-sent events for streaming. Generation itself is the Engine's (inference.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from .inference import Engine, completion_id, created

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatRequestError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    n: int
    stream: bool
    include_usage: bool

    def engine_args(self, choice: int = 0) -> tuple:
        seed = None if self.seed is None else self.seed + choice  # n choices: different draws, reproducible
        return (self.model, self.messages, self.max_tokens, self.temperature, self.top_p, self.stop, seed)


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
    return ChatRequest(model=body.get("model"), messages=clean, max_tokens=_number(body, key, 256, int, 1, 32768),
                       temperature=_number(body, "temperature", 1.0, float, 0, 2),
                       top_p=_number(body, "top_p", 1.0, float, 0, 1, low_open=True), stop=stop, seed=seed, n=n,
                       stream=stream, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))


def complete(engine: Engine, req: ChatRequest) -> dict:
    """A whole chat.completion object (blocking: call it from a worker thread)."""
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i in range(req.n):
        text, final = "", None
        for piece, info in engine.complete(*req.engine_args(i)):
            text += piece
            final = info or final
        choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None, "finish_reason": final["finish_reason"]})
        usage["prompt_tokens"] = final["usage"]["prompt_tokens"]  # the prompt is counted once, as OpenAI does
        usage["completion_tokens"] += final["usage"]["completion_tokens"]
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": completion_id(), "object": "chat.completion", "created": created(), "model": req.model,
            "system_fingerprint": None, "choices": choices, "usage": usage}


def stream(engine: Engine, req: ChatRequest):
    """Server-sent events: a role chunk, content chunks, a finish chunk, optional usage, then [DONE]."""
    cid, ts = completion_id(), created()

    def chunk(delta: dict | None, finish=None, usage=None) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": ts, "model": req.model, "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece, info in engine.complete(*req.engine_args()):
        if piece:
            yield chunk({"content": piece})
        if info:
            yield chunk({}, info["finish_reason"])
            if req.include_usage:
                yield chunk(None, usage=info["usage"])
    yield "data: [DONE]\n\n"
