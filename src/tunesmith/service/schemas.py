"""The service's request bodies as pydantic models, and OpenAI's error object.

FastAPI validates every body against these models before a route runs; `validation_error` turns pydantic's
errors into OpenAI's 400 ({"error": {"message", "type", "param", "code"}}) naming the parameter, so a wrong
type or an out-of-range value never reaches a handler. Ranges are OpenAI's where it documents them.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_SEED = 2**31 - 1  # OpenAI's job seed range; every RNG the worker seeds accepts it
INT64 = 2**63 - 1


class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP status `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _int(low: int, high: int) -> Any:
    return Annotated[StrictInt, Field(ge=low, le=high)]


def _number(low: float, high: float, low_open: bool = False) -> Any:  # a JSON number (ints too), never a string
    return Annotated[float, Field(strict=True, le=high, **({"gt": low} if low_open else {"ge": low}))]


class _Body(BaseModel):
    """OpenAI refuses parameters it does not know ("Unrecognized request argument supplied")."""
    model_config = ConfigDict(extra="forbid")


# -- files ----------------------------------------------------------------------------------------
class FileUpload(BaseModel):
    """POST /v1/files (multipart). expires_after[...] fields are accepted and ignored: files do not expire here."""
    model_config = ConfigDict(extra="ignore")
    file: UploadFile
    purpose: Literal[UPLOAD_PURPOSES]  # type: ignore[valid-type]


# -- fine-tuning jobs -----------------------------------------------------------------------------
class Hyperparameters(_Body):
    """Each is "auto" (resolved by the worker) or a number in OpenAI's range."""
    n_epochs: Literal["auto"] | _int(1, 50) = "auto"
    batch_size: Literal["auto"] | _int(1, 256) = "auto"
    learning_rate_multiplier: Literal["auto"] | _number(1e-6, 100.0) = "auto"


class Supervised(_Body):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | _number(0, 2, low_open=True) = "auto"  # OpenAI's range (0, 2]


class Dpo(_Body):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's reinforcement hyperparameters. compute_multiplier sets the completions sampled per prompt
    (4 x multiplier, at least 2); eval_interval, eval_samples and reasoning_effort are accepted and recorded."""
    compute_multiplier: Literal["auto"] | _number(0, 10, low_open=True) = "auto"
    eval_interval: Literal["auto"] | _int(1, 10_000) = "auto"
    eval_samples: Literal["auto"] | _int(1, 1_000) = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"


class Reinforcement(_Body):
    grader: dict[str, Any]  # checked by tunesmith.graders when the job is created (the error names the field)
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: Reinforcement | None = None


def _model_name_part(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("a suffix may hold only letters, digits, '-' and '_' (it becomes part of the model name)")
    return text


Suffix = Annotated[StrictStr, Field(min_length=1, max_length=64), AfterValidator(_model_name_part)]
Metadata = Annotated[dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[StrictStr, Field(max_length=512)]],
                     Field(max_length=16)]


class JobCreate(_Body):
    """POST /v1/fine_tuning/jobs."""
    model: StrictStr
    training_file: StrictStr
    validation_file: StrictStr | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's deprecated spelling of method.supervised.hyperparameters
    method: Method | None = None
    suffix: Suffix | None = None  # becomes part of the model name: letters, digits, '-' and '_' only
    seed: _int(0, MAX_SEED) | None = None
    metadata: Metadata | None = None
    integrations: list[dict[str, Any]] | None = None

    @property
    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def chosen_hyperparameters(self) -> dict:
        """The job's hyperparameters for its method, every one present ("auto" where not given)."""
        kind = self.method_type
        given = getattr(self.method, kind, None) if self.method else None
        empty = {"supervised": Hyperparameters, "dpo": DpoHyperparameters,
                 "reinforcement": ReinforcementHyperparameters}[kind]()
        hp = (given.hyperparameters if given else None) or (self.hyperparameters if kind == "supervised" else None)
        return (hp or empty).model_dump()


# -- chat completions -----------------------------------------------------------------------------
def _unicode_text(text: str) -> str:
    """JSON may spell a lone surrogate (\\ud800), which is no character: the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate {text[e.start]!r} at character {e.start}") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode_text)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls, ...: accepted, not used by a text model
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: Text | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = None


StopText = Annotated[Text, Field(min_length=1)]


class ChatCompletionCreate(BaseModel):
    """POST /v1/chat/completions. OpenAI parameters this server does not use (user, logprobs, ...) are ignored."""
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: _int(1, MAX_SEED) | None = None
    max_completion_tokens: _int(1, MAX_SEED) | None = None
    temperature: _number(0, 2) | None = None
    top_p: _number(0, 1, low_open=True) | None = None
    n: _int(1, 8) | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    seed: _int(-INT64 - 1, INT64) | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None


# -- errors ---------------------------------------------------------------------------------------
EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
            "float_type": "a number", "float_parsing": "a number", "string_type": "a string", "bool_type": "a boolean",
            "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
            "list_type": "an array", "literal_error": None}
_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


def _json_kind(value: Any) -> str:
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (dict, "an object"),
             (list, "an array"), (bytes, "raw bytes"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def error_param(loc: tuple) -> str | None:
    """OpenAI's name for where an error is: messages[0].role, method.supervised.hyperparameters.n_epochs, ...
    (pydantic's union-member tags such as 'int' or "literal['auto']" are dropped; inside metadata, 'metadata')."""
    parts: list[str] = []
    for item in loc[1:]:  # loc[0] is body / query / path
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item.islower() and item not in _TYPE_TAGS:
            parts.append(item)
        if parts[-1:] == ["metadata"]:
            break
    return ".".join(parts) or None


def _shown(value: Any) -> str:
    text = repr(value[:40]) if isinstance(value, bytes) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _at_fault(errors: list[dict]) -> tuple[str | None, list[dict]]:
    """The parameter to blame and its errors. A union gives one error per member; the member that matched the
    input deepest names the real problem (content[0].text, not content)."""
    first = error_param(errors[0]["loc"])
    if first is None:
        return None, errors[:1]
    params = [error_param(e["loc"]) or "" for e in errors]
    related = [p for p in params if p == first or p.startswith((first + ".", first + "["))]
    deepest = max(related, key=len)
    return deepest, [e for e, p in zip(errors, params) if p == deepest]


def validation_error(errors: list[dict]) -> APIError:
    """The 400 for FastAPI's validation errors, in OpenAI's words, naming the parameter at fault."""
    param, errs = _at_fault(errors)
    kind, value = errs[0]["type"], errs[0].get("input")
    if kind == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request "
                             f"({errs[0].get('ctx', {}).get('error', 'invalid JSON')}); send a JSON object.")
    if param is None:
        got = "nothing" if kind == "missing" else _json_kind(value)
        return APIError(400, f"The request body must be a JSON object, sent with Content-Type: application/json; "
                             f"got {got}.")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if all(EXPECTED.get(e["type"]) for e in errs):
        wanted = " or ".join(dict.fromkeys(EXPECTED[e["type"]] for e in errs))
        return APIError(400, f"Invalid type for '{param}': expected {wanted}, but got {_json_kind(value)} instead.",
                        param=param)
    msgs = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errs))
    if len(msgs) > 1 and all(m.startswith("Input should be ") for m in msgs):  # a union: 'auto' or an integer >= 1
        msgs = [msgs[0]] + [m.removeprefix("Input should be ") for m in msgs[1:]]
    reasons = " or ".join(msgs)
    reasons = reasons[:1].lower() + reasons[1:]
    return APIError(400, f"Invalid value for '{param}' ({_shown(value)}): {reasons}.", param=param)
