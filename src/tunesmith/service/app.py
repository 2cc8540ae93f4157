"""The HTTP API, shaped like OpenAI's fine-tuning API so the official `openai` client works unchanged.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; every /v1 route needs a bearer key.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .chat import ChatRequestError, complete as chat_complete, parse_chat_request, stream as chat_stream
from .inference import Engine
from .store import Store, new_id, now

HYPERPARAMETERS = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 1e-6, 100.0)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def create_app(data_dir: str | Path, api_keys: list[str], bases: dict[str, str], max_upload_mb: float = 100,
               start_worker: bool = True, device: str = "auto", job_config: str | Path | None = None) -> FastAPI:
    """The app on data folder `data_dir`. job_config: a YAML run-config fragment every job trains with
    (checked now, copied into the data folder so that `tunesmith worker` processes use it too)."""
    from ..io import atomic_write_text
    from .job import JOB_CONFIG, check_job_config
    store = Store(data_dir)
    atomic_write_text(store.dir / "bases.json", json.dumps(bases))
    if job_config is not None:
        atomic_write_text(store.dir / JOB_CONFIG, check_job_config(job_config))
    else:
        (store.dir / JOB_CONFIG).unlink(missing_ok=True)
    engine = Engine(store, bases, device)
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    app.state.store, app.state.stop = store, threading.Event()

    if start_worker:
        from .worker import work_forever

        @app.on_event("startup")
        def _start() -> None:
            threading.Thread(target=work_forever, args=(store, app.state.stop), daemon=True).start()

        @app.on_event("shutdown")
        def _stop() -> None:
            app.state.stop.set()

    @app.exception_handler(APIError)
    def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                            status_code=e.status)

    def auth(request: Request) -> None:
        header = request.headers.get("authorization", "")
        key = header[7:] if header.lower().startswith("bearer ") else ""
        if key not in api_keys:
            raise APIError(401, "Incorrect API key provided. Pass 'Authorization: Bearer <key>'; keys come from "
                                "--api-key or TUNESMITH_API_KEYS.", code="invalid_api_key", type_="authentication_error")

    def page(items: list[dict], after: str | None, limit: int) -> dict:
        ids = [i["id"] for i in items]
        if after:
            if after not in ids:
                raise APIError(404, f"No such object: {after!r} (the 'after' cursor)", param="after")
            items = items[ids.index(after) + 1:]
        chunk = items[:limit]
        return {"object": "list", "data": chunk, "has_more": len(items) > limit,
                "first_id": chunk[0]["id"] if chunk else None, "last_id": chunk[-1]["id"] if chunk else None}

    def file_object(f: dict) -> dict:
        return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None,
                "expires_at": None}

    # -- files ------------------------------------------------------------------------------------
    v1 = [Depends(auth)]

    @app.post("/v1/files", dependencies=v1)
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
        limit = int(max_upload_mb * 2**20)
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"File is larger than the server's limit of {max_upload_mb:g} MB", param="file")
        name = Path(file.filename or "upload").name
        if purpose == "fine-tune" and not name.endswith(".jsonl"):
            raise APIError(400, "Invalid file format for Fine-Tuning API. Must be .jsonl", param="file")
        return file_object(store.add_file(name, purpose, data))

    @app.get("/v1/files", dependencies=v1)
    def list_files(after: str | None = None, limit: int = 10000, purpose: str | None = None, order: str = "desc") -> dict:
        files = [file_object(f) for f in store.list_files(purpose)]
        return page(files if order == "desc" else files[::-1], after, limit)

    def known_file(file_id: str) -> dict:
        f = store.get_file(file_id)
        if f is None:
            raise APIError(404, f"No such File object: {file_id}", param="id")
        return f

    @app.get("/v1/files/{file_id}", dependencies=v1)
    def get_file(file_id: str) -> dict:
        return file_object(known_file(file_id))

    @app.get("/v1/files/{file_id}/content", dependencies=v1)
    def file_content(file_id: str) -> Response:
        known_file(file_id)
        return Response(store.file_path(file_id).read_bytes(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", dependencies=v1)
    def delete_file(file_id: str) -> dict:
        known_file(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs -------------------------------------------------------------------------------------
    def hyperparameters(raw: dict | None) -> dict:
        out = {}
        for key, value in (raw or {}).items():
            if key not in HYPERPARAMETERS:
                raise APIError(400, f"Unknown hyperparameter {key!r}; use {', '.join(HYPERPARAMETERS)}",
                               param=f"hyperparameters.{key}")
            kind, lo, hi = HYPERPARAMETERS[key]
            if value != "auto":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
                if not ok or (kind is int and value != int(value)):
                    raise APIError(400, f"Invalid hyperparameter {key}={value!r}: expected 'auto' or a number in "
                                        f"[{lo:g}, {hi:g}]", param=f"hyperparameters.{key}", code="invalid_hyperparameter")
            out[key] = value
        return {k: out.get(k, "auto") for k in HYPERPARAMETERS}

    @app.post("/v1/fine_tuning/jobs", dependencies=v1)
    async def create_job(request: Request) -> dict:
        body = await request.json()
        if body.get("model") not in bases:
            raise APIError(400, f"Model {body.get('model')!r} is not available for fine-tuning here; available: "
                                f"{', '.join(bases)}", param="model", code="model_not_available")
        for field in ("training_file", "validation_file"):
            if body.get(field) is not None and store.get_file(body[field]) is None:
                raise APIError(400, f"invalid {field}: no such file {body[field]!r}", param=field)
        if not body.get("training_file"):
            raise APIError(400, "training_file is required", param="training_file")
        method = body.get("method") or {"type": "supervised"}
        if method.get("type", "supervised") != "supervised":
            raise APIError(400, f"method type {method.get('type')!r} is not supported yet; only 'supervised'",
                           param="method.type")
        raw = (method.get("supervised") or {}).get("hyperparameters") or body.get("hyperparameters")
        hp = hyperparameters(raw)
        suffix = body.get("suffix")
        if suffix is not None and not (1 <= len(suffix) <= 64):
            raise APIError(400, "suffix must be 1 to 64 characters", param="suffix")
        metadata = body.get("metadata") or {}
        if len(metadata) > 16:
            raise APIError(400, "metadata holds at most 16 key-value pairs", param="metadata")
        seed = body.get("seed")
        job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": body["model"], "created_at": now(),
               "finished_at": None, "status": "validating_files", "fine_tuned_model": None, "organization_id": "user",
               "training_file": body["training_file"], "validation_file": body.get("validation_file"),
               "result_files": [], "trained_tokens": None, "hyperparameters": hp, "error": None,
               "seed": int(seed) if seed is not None else 42, "suffix": suffix, "estimated_finish": None,
               "integrations": [], "metadata": metadata or None,
               "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        store.add_job(job)
        store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        return job  # the worker validates the files (validating_files -> queued -> running)

    def known_job(job_id: str) -> dict:
        job = store.get_job(job_id)
        if job is None:
            raise APIError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return job

    @app.get("/v1/fine_tuning/jobs", dependencies=v1)
    def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict:
        wanted = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
        jobs = [known_job(j["id"]) for j in store.list_jobs()]
        jobs = [j for j in jobs if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
        return page(jobs, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=v1)
    def get_job(job_id: str) -> dict:
        return known_job(job_id)

    def control(job_id: str, want: str, allowed: tuple[str, ...]) -> dict:
        job = known_job(job_id)
        if job["status"] not in allowed:
            raise APIError(400, f"Cannot {want} a job that is {job['status']}", param="fine_tuning_job_id")
        row = store.job_row(job_id)
        if want == "cancel" and not row["pid"]:  # nothing is running it: cancel right here
            store.update_job(job_id, status="cancelled", finished_at=now())
            store.add_event(job_id, "Fine-tuning job cancelled")
        else:  # the worker signals its child, which checkpoints and exits
            store.set_job_control(job_id, want=want)
        return store.get_job(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=v1)
    def cancel(job_id: str) -> dict:
        return control(job_id, "cancel", ("validating_files", "queued", "running", "paused"))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause", dependencies=v1)
    def pause(job_id: str) -> dict:
        return control(job_id, "pause", ("running",))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume", dependencies=v1)
    def resume(job_id: str) -> dict:
        job = known_job(job_id)
        if job["status"] != "paused":
            raise APIError(400, f"Cannot resume a job that is {job['status']}", param="fine_tuning_job_id")
        store.set_job_control(job_id, resume=1)
        store.add_event(job_id, "Fine-tuning job resumed")
        return store.update_job(job_id, status="queued")

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=v1)
    def events(job_id: str, after: str | None = None, limit: int = 20) -> dict:
        known_job(job_id)
        return page(store.events(job_id), after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", dependencies=v1)
    def checkpoints(job_id: str, after: str | None = None, limit: int = 10) -> dict:
        known_job(job_id)
        return page(store.checkpoints(job_id), after, limit)

    # -- models and chat --------------------------------------------------------------------------
    def model_object(mid: str, created_at: int = 0, owner: str = "tunesmith") -> dict:
        return {"id": mid, "object": "model", "created": created_at, "owned_by": owner}

    @app.get("/v1/models", dependencies=v1)
    def list_models() -> dict:
        data = [model_object(b) for b in bases] + [model_object(m["id"], m["created"], m["owned_by"]) for m in store.list_models()]
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    def get_model(model_id: str) -> dict:
        if model_id in bases:
            return model_object(model_id)
        m = store.get_model(model_id)
        if m is None:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_object(m["id"], m["created"], m["owned_by"])

    @app.delete("/v1/models/{model_id:path}", dependencies=v1)
    def delete_model(model_id: str) -> dict:
        if model_id in bases:
            raise APIError(400, "base models cannot be deleted", param="model")
        if not store.delete_model(model_id):
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "The request body is not valid JSON") from None
        model_id = body.get("model") if isinstance(body, dict) else None
        if model_id not in bases and store.get_model(model_id or "") is None:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        try:
            req = parse_chat_request(body)
        except ChatRequestError as e:
            raise APIError(400, e.message, param=e.param) from None
        if req.stream:  # Starlette iterates a plain generator in its thread pool
            return StreamingResponse(chat_stream(engine, req), media_type="text/event-stream")
        return await run_in_threadpool(chat_complete, engine, req)  # generation must not block the event loop

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (Path(__file__).parent / "index.html").read_text()

    return app


def api_keys_from(cli_keys: list[str] | None) -> list[str]:
    keys = list(cli_keys or []) + [k for k in os.environ.get("TUNESMITH_API_KEYS", "").split(",") if k]
    if not keys:
        raise SystemExit("no API key: pass --api-key KEY (repeatable) or set TUNESMITH_API_KEYS=key1,key2")
    return keys
