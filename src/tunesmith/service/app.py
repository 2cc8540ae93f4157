"""The HTTP API, shaped like OpenAI's fine-tuning API so the official `openai` client works unchanged.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; every /v1 route needs a bearer key
(unless the server runs with --no-auth on a loopback address). Request bodies are the pydantic models of
schemas.py: a body of the wrong shape is a 400 naming the parameter before any route runs, and a body over its
size limit is a 413 before it is read (declared length) or as soon as it passes the limit (streamed).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .chat import ChatRequestError, chat_request
from .chat import admit as chat_admit
from .chat import complete as chat_complete
from .chat import stream as chat_stream
from .inference import Engine
from .responses import (
    ChatCompletion,
    Deleted,
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    ModelObject,
    Page,
    answers,
)
from .schemas import (
    APIError,
    ChatCompletionCreate,
    FileUpload,
    JobCreate,
    validation_error,
)
from .store import Store, new_id, now

MAX_JSON_BYTES = 8 * 2**20  # a JSON request body (a job, a chat request)
MULTIPART_SLACK = 16 * 2**10  # an upload's body beyond its file: boundaries, part headers, the purpose field
MAX_FILES_PAGE, MAX_PAGE = 10000, 1000  # the largest `limit` of GET /v1/files and of the job, event, checkpoint lists


def body_limit(method: str, path: str, upload_bytes: int) -> int:
    """The most bytes a request's body may have: an upload's file plus its multipart framing, else a JSON body."""
    return upload_bytes + MULTIPART_SLACK if (method, path) == ("POST", "/v1/files") else MAX_JSON_BYTES


def too_large(method: str, path: str, upload_bytes: int) -> APIError:
    if (method, path) == ("POST", "/v1/files"):
        return APIError(413, f"File is larger than the server's limit of {upload_bytes / 2**20:g} MB "
                             "(tunesmith serve --max-upload-mb)", param="file", code="file_too_large")
    return APIError(413, f"The request body is larger than the server's limit of {MAX_JSON_BYTES // 2**20} MB",
                    code="request_too_large")


class DeclaredLengthLimit:
    """Refuse a body whose Content-Length is over its limit before reading a byte of it, in OpenAI's error shape.
    (Bodies sent without a length are counted as they arrive by the routes' `max_body_size`.)"""

    def __init__(self, app: ASGIApp, upload_bytes: int) -> None:
        self.app, self.upload_bytes = app, upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length", "")
            method, path = scope["method"], scope["path"]
            if declared.isdigit() and int(declared) > body_limit(method, path, self.upload_bytes):
                e = too_large(method, path, self.upload_bytes)
                return await JSONResponse(e.body(), e.status, headers={"connection": "close"})(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(data_dir: str | Path, api_keys: list[str] | None, bases: dict[str, str], max_upload_mb: float = 100,
               start_worker: bool = True, device: str = "auto", job_config: str | Path | None = None,
               allow_python_graders: bool = False, db: str | None = None, job_nproc: int = 1) -> FastAPI:
    """The app on data folder `data_dir`. api_keys: the accepted bearer keys, or None for no authentication
    (`serve --no-auth`). job_config: a YAML run-config fragment every job trains with (checked now, copied into
    the data folder so that `tunesmith worker` processes use it too). allow_python_graders: reinforcement jobs
    may use OpenAI's `python` grader, which runs the job's code in its training process. job_nproc: processes
    the in-process worker trains each job on (torchrun, DDP)."""
    from ..io import atomic_write_text
    from .job import JOB_CONFIG, PYTHON_GRADERS, check_job_config
    if api_keys is not None and (not api_keys or not all(isinstance(k, str) and k.strip() for k in api_keys)):
        raise ValueError(f"api_keys must be non-empty strings (None turns authentication off), got {api_keys!r}")
    upload_bytes = int(max_upload_mb * 2**20)
    store = Store(data_dir, db)  # db: sqlite (None) or a PostgreSQL URL shared by a fleet of workers
    atomic_write_text(store.dir / "bases.json", json.dumps(bases))
    if job_config is not None:
        atomic_write_text(store.dir / JOB_CONFIG, check_job_config(job_config, job_nproc if start_worker else 1))
    else:
        (store.dir / JOB_CONFIG).unlink(missing_ok=True)
    if allow_python_graders:  # the workers read it: a python grader runs only while the operator allows it
        atomic_write_text(store.dir / PYTHON_GRADERS, "python graders run the job's code in its training process\n")
    else:
        (store.dir / PYTHON_GRADERS).unlink(missing_ok=True)
    engine = Engine(store, bases, device)
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    app.add_middleware(DeclaredLengthLimit, upload_bytes=upload_bytes)
    app.state.store, app.state.stop = store, threading.Event()
    app.router.add_event_handler("startup", engine.start)  # the inference process; SIGTERM cuts generations short
    app.router.add_event_handler("shutdown", engine.stop)

    if start_worker:
        from .worker import work_forever

        @app.on_event("startup")
        def _start() -> None:
            threading.Thread(target=work_forever, args=(store, app.state.stop), kwargs={"nproc": job_nproc},
                             daemon=True).start()

        @app.on_event("shutdown")
        def _stop() -> None:
            app.state.stop.set()

    @app.exception_handler(APIError)
    def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    def _invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        error = validation_error(list(e.errors()))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown routes, 405s, a body over its limit
        error = (too_large(request.method, request.url.path, upload_bytes) if e.status_code == 413
                 else APIError(e.status_code, str(e.detail)))
        return JSONResponse(error.body(), status_code=error.status, headers=e.headers)

    async def auth(request: Request) -> None:  # async: no thread-pool hop for every request
        if api_keys is None:  # --no-auth, loopback only (checked by api_keys_from)
            return
        header = request.headers.get("authorization", "")
        key = (header[7:] if header.lower().startswith("bearer ") else "").encode()
        if not any(hmac.compare_digest(key, k.encode()) for k in api_keys):
            raise APIError(401, "Incorrect API key provided. Pass 'Authorization: Bearer <key>'; keys come from "
                                "--api-key or TUNESMITH_API_KEYS.", code="invalid_api_key", type_="authentication_error")

    def store_page(lister, *args, after: str | None, **kwargs) -> dict:
        """One page from the store (one query); an unknown `after` cursor is a 404."""
        try:
            return lister(*args, after=after, **kwargs)
        except KeyError:
            raise APIError(404, f"No such object: {after!r} (the 'after' cursor)", param="after") from None

    def file_object(f: dict) -> dict:
        return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None,
                "expires_at": None}

    # -- files ------------------------------------------------------------------------------------
    v1 = [Depends(auth)]

    # the body is counted as it arrives and parsing stops past the limit; the file's exact size is checked after
    @app.post("/v1/files", dependencies=v1, responses=answers(FileObject),
              max_body_size=body_limit("POST", "/v1/files", upload_bytes),
              form_limits={"max_files": 1, "max_fields": 8, "max_part_size": 1024})
    def upload(form: Annotated[FileUpload, Form()]) -> dict:
        if form.file.size is None or form.file.size > upload_bytes:
            raise too_large("POST", "/v1/files", upload_bytes)
        name = Path(form.file.filename or "upload").name
        if form.purpose == "fine-tune" and not name.endswith(".jsonl"):
            raise APIError(400, "Invalid file format for Fine-Tuning API. Must be .jsonl", param="file")
        return file_object(store.add_file(name, form.purpose, form.file.file.read()))

    @app.get("/v1/files", dependencies=v1, responses=answers(Page[FileObject]))
    async def list_files(after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_FILES_PAGE)] = MAX_FILES_PAGE,
                   purpose: str | None = None, order: Literal["asc", "desc"] = "desc") -> dict:
        listed = store_page(store.page_files, after=after, limit=limit, purpose=purpose, order=order)
        return {**listed, "data": [file_object(f) for f in listed["data"]]}

    def known_file(file_id: str) -> dict:
        f = store.get_file(file_id)
        if f is None:
            raise APIError(404, f"No such File object: {file_id}", param="id")
        return f

    @app.get("/v1/files/{file_id}", dependencies=v1, responses=answers(FileObject))
    async def get_file(file_id: str) -> dict:
        return file_object(known_file(file_id))

    @app.get("/v1/files/{file_id}/content", dependencies=v1)
    def file_content(file_id: str) -> Response:
        known_file(file_id)
        return Response(store.file_path(file_id).read_bytes(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", dependencies=v1, responses=answers(Deleted))
    def delete_file(file_id: str) -> dict:
        known_file(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs -------------------------------------------------------------------------------------
    def fine_tuning_file(field: str, file_id: str) -> None:
        f = store.get_file(file_id)
        if f is None:
            raise APIError(400, f"invalid {field}: no such file {file_id!r}", param=field)
        if f["purpose"] != "fine-tune":
            raise APIError(400, f"invalid {field}: {file_id} was uploaded with purpose {f['purpose']!r}; fine-tuning "
                                "reads files uploaded with purpose 'fine-tune'", param=field, code="invalid_file_purpose")

    @app.post("/v1/fine_tuning/jobs", dependencies=v1, responses=answers(FineTuningJob),
              max_body_size=MAX_JSON_BYTES)
    def create_job(body: JobCreate) -> dict:
        if body.model not in bases:
            raise APIError(400, f"Model {body.model!r} is not available for fine-tuning here; available: "
                                f"{', '.join(bases)}", param="model", code="model_not_available")
        fine_tuning_file("training_file", body.training_file)
        if body.validation_file is not None:
            fine_tuning_file("validation_file", body.validation_file)
        kind = body.method_type
        check_method(body, allow_python_graders)
        hp = body.chosen_hyperparameters()
        job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": body.model, "created_at": now(),
               "finished_at": None, "status": "validating_files", "fine_tuned_model": None, "organization_id": "user",
               "training_file": body.training_file, "validation_file": body.validation_file,
               "result_files": [], "trained_tokens": None, "error": None,
               "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
               "seed": 42 if body.seed is None else body.seed, "suffix": body.suffix, "estimated_finish": None,
               "integrations": [], "metadata": body.metadata or None,
               "method": {"type": kind, kind: {"hyperparameters": hp,
                                               **({"grader": body.method.reinforcement.grader}
                                                  if kind == "reinforcement" else {})}}}
        store.add_job(job)
        store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        return job  # the worker validates the files (validating_files -> queued -> running)

    def known_job(job_id: str) -> dict:
        job = store.get_job(job_id)
        if job is None:
            raise APIError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return job

    @app.get("/v1/fine_tuning/jobs", dependencies=v1, responses=answers(Page[FineTuningJob]))
    async def list_jobs(request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20) -> dict:
        wanted = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
        return store_page(store.page_jobs, after=after, limit=limit, metadata=wanted)

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=v1, responses=answers(FineTuningJob))
    async def get_job(job_id: str) -> dict:
        return known_job(job_id)

    def control(job_id: str, want: str, allowed: tuple[str, ...]) -> dict:
        job = known_job(job_id)
        if job["status"] not in allowed:
            raise APIError(400, f"Cannot {want} a job that is {job['status']}", param="fine_tuning_job_id")
        return store.request_control(job_id, want)  # cancelled now if no live worker holds the job

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=v1, responses=answers(FineTuningJob))
    def cancel(job_id: str) -> dict:
        return control(job_id, "cancel", ("validating_files", "queued", "running", "paused"))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause", dependencies=v1, responses=answers(FineTuningJob))
    def pause(job_id: str) -> dict:
        return control(job_id, "pause", ("running",))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume", dependencies=v1, responses=answers(FineTuningJob))
    def resume(job_id: str) -> dict:
        job = known_job(job_id)
        if job["status"] != "paused":
            raise APIError(400, f"Cannot resume a job that is {job['status']}", param="fine_tuning_job_id")
        store.set_job_control(job_id, resume=1)
        store.add_event(job_id, "Fine-tuning job resumed")
        return store.update_job(job_id, status="queued")

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=v1, responses=answers(Page[JobEvent]))
    async def events(job_id: str, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20) -> dict:
        known_job(job_id)
        return store_page(store.page_events, job_id, after=after, limit=limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", dependencies=v1, responses=answers(Page[JobCheckpoint]))
    async def checkpoints(job_id: str, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 10) -> dict:
        known_job(job_id)
        return store_page(store.page_checkpoints, job_id, after=after, limit=limit)

    # -- models and chat --------------------------------------------------------------------------
    def model_object(mid: str, created_at: int = 0, owner: str = "tunesmith") -> dict:
        return {"id": mid, "object": "model", "created": created_at, "owned_by": owner}

    @app.get("/v1/models", dependencies=v1, responses=answers(Page[ModelObject]))
    def list_models() -> dict:
        data = [model_object(b) for b in bases] + [model_object(m["id"], m["created"], m["owned_by"]) for m in store.list_models()]
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/models/{model_id:path}", dependencies=v1, responses=answers(ModelObject))
    async def get_model(model_id: str) -> dict:
        if model_id in bases:
            return model_object(model_id)
        m = store.get_model(model_id)
        if m is None:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_object(m["id"], m["created"], m["owned_by"])

    @app.delete("/v1/models/{model_id:path}", dependencies=v1, responses=answers(Deleted))
    def delete_model(model_id: str) -> dict:
        if model_id in bases:
            raise APIError(400, "base models cannot be deleted", param="model")
        if not store.delete_model(model_id):
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions", dependencies=v1, responses=answers(ChatCompletion),
              max_body_size=MAX_JSON_BYTES)
    async def chat(request: Request, body: ChatCompletionCreate):
        if body.model not in bases and store.get_model(body.model) is None:
            raise APIError(404, f"The model {body.model!r} does not exist", param="model", code="model_not_found")
        try:
            req = chat_request(body)
            gens = await chat_admit(engine, req)  # a prompt over the context is a 400 before any reply starts
            if req.stream:  # closing the stream cancels its generation
                return StreamingResponse(chat_stream(gens[0], req), media_type="text/event-stream")
            return await chat_complete(gens, req, request.is_disconnected)
        except ChatRequestError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (Path(__file__).parent / "index.html").read_text()

    return app


LOOPBACK_NAMES = ("localhost",)


def check_method(body: JobCreate, allow_python_graders: bool) -> None:
    """What the schema cannot say: one method's settings, and a grader that can score (refused now, not mid-job)."""
    from ..graders import GraderError, build_grader
    kind = body.method_type
    others = [k for k in ("supervised", "dpo", "reinforcement") if k != kind and getattr(body.method, k, None)]
    if others:
        raise APIError(400, f"method.{others[0]} is given but method.type is {kind!r}", param=f"method.{others[0]}")
    if kind != "supervised" and body.hyperparameters is not None:
        raise APIError(400, f"'hyperparameters' is the supervised method's (deprecated) place; give them as "
                            f"method.{kind}.hyperparameters", param="hyperparameters")
    given = body.method.supervised if body.method is not None and kind == "supervised" else None
    if body.hyperparameters is not None and given is not None and given.hyperparameters is not None:
        raise APIError(400, "hyperparameters are given twice, at the top level (deprecated) and in "
                            "method.supervised.hyperparameters; give them in one place", param="hyperparameters")
    if body.integrations:  # accepting and dropping them would say a run is tracked when it is not
        raise APIError(400, "integrations (e.g. wandb) are not supported by this server; leave 'integrations' "
                            "empty (the run folder keeps metrics.jsonl and loss.png)", param="integrations")
    if kind == "reinforcement":
        if body.method.reinforcement is None:
            raise APIError(400, "Missing required parameter: 'method.reinforcement.grader'.",
                           param="method.reinforcement.grader")
        bad = _not_unicode(body.method.reinforcement.grader, "method.reinforcement.grader")
        if bad:  # a grader is free-form JSON: its text must still encode, or the stored job could never be shown
            raise APIError(400, "not valid Unicode text: a lone surrogate", param=bad)
        try:
            # checked only: a python grader is compiled here, never run (it runs in the training process)
            build_grader(body.method.reinforcement.grader, allow_python_graders, "method.reinforcement.grader",
                         run_code=False)
        except GraderError as e:
            raise APIError(400, f"Invalid grader: {e}", param=e.param) from None


def _not_unicode(value, param: str) -> str | None:
    """Where a JSON value holds text that is not valid Unicode (a lone surrogate such as \\ud800), or None."""
    todo = [(value, param)]
    while todo:
        node, where = todo.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(node, dict):
            todo += [(k, where) for k in node] + [(v, f"{where}.{k}") for k, v in node.items()]
        elif isinstance(node, list):
            todo += [(v, f"{where}[{i}]") for i, v in enumerate(node)]
    return None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: an address only this machine can reach."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def api_keys_from(cli_keys: list[str] | None, no_auth: bool = False, host: str = "127.0.0.1") -> list[str] | None:
    """The accepted keys from --api-key and TUNESMITH_API_KEYS, or None with --no-auth (loopback hosts only).
    An empty key is an error, never "no authentication"."""
    env = os.environ.get("TUNESMITH_API_KEYS", "")
    env_keys = env.split(",") if env.strip() else []
    for source, keys in (("--api-key", cli_keys or []), ("TUNESMITH_API_KEYS", env_keys)):
        for i, key in enumerate(keys):
            if not key.strip():
                where = f"key {i + 1} of TUNESMITH_API_KEYS={env!r}" if source == "TUNESMITH_API_KEYS" else f"--api-key {key!r}"
                raise SystemExit(f"{where} is empty: an empty key would let anyone in. Give a real key, or run "
                                 f"without keys with --no-auth (loopback addresses only)")
    keys = [k.strip() for k in [*(cli_keys or []), *env_keys]]
    if no_auth:
        if keys:
            raise SystemExit("--no-auth was given together with API keys (--api-key / TUNESMITH_API_KEYS): choose one")
        if not is_loopback(host):
            raise SystemExit(f"--no-auth is only allowed on a loopback address (127.0.0.1, ::1, localhost), not "
                             f"--host {host}: anyone who can reach {host} could use the server. Pass --api-key KEY")
        return None
    if not keys:
        raise SystemExit("no API key: pass --api-key KEY (repeatable) or set TUNESMITH_API_KEYS=key1,key2 "
                         "(or --no-auth on a loopback address)")
    return keys
