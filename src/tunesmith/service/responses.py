"""The service's answers as pydantic models: OpenAI's objects, field for field (extra="forbid").

Each route declares its answer with `responses=answers(Model)`: the OpenAPI schema (/openapi.json) documents
the real objects, and the tests check every answer they get against these models (tests/test_service.py), so
a field we forgot or mistyped fails a test, not a client. They are not enforced per request: one stored job
written by an older version must not turn every list into a 500.
"""
from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorObject(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    error: ErrorObject


class Page(_Out, Generic[T]):
    """A cursor page: pass `last_id` as `after` for the next one."""
    object: Literal["list"]
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class Deleted(_Out):
    id: str
    object: str
    deleted: bool


# -- files ----------------------------------------------------------------------------------------
class FileObject(_Out):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str | None
    status_details: str | None
    expires_at: int | None


# -- fine-tuning jobs -----------------------------------------------------------------------------
class JobError(_Out):
    code: str
    message: str
    param: str | None


class JobHyperparameters(_Out):
    n_epochs: int | Literal["auto"]
    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float | Literal["auto"]


class JobMethod(_Out):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJob(_Out):
    object: Literal["fine_tuning.job"]
    id: str
    model: str
    created_at: int
    finished_at: int | None
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    fine_tuned_model: str | None
    organization_id: str
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    hyperparameters: JobHyperparameters
    error: JobError | None
    seed: int
    suffix: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    method: JobMethod


class JobEvent(_Out):
    object: Literal["fine_tuning.job.event"]
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class JobCheckpoint(_Out):
    object: Literal["fine_tuning.job.checkpoint"]
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


# -- models and chat ------------------------------------------------------------------------------
class ModelObject(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ChatMessageOut(_Out):
    role: Literal["assistant"]
    content: str
    refusal: str | None


class Choice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: None
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"]


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[Choice]
    usage: Usage


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 500, 503)}


def answers(model: Any) -> dict:
    """A route's documented answers: `model` for 200, OpenAI's error object otherwise."""
    return {200: {"model": model}, **ERRORS}
