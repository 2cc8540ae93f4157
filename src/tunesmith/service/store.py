"""The service's state in one SQLite file (WAL mode: many readers, one writer at a time; no extra server).

Ids are generated here and only ever used as keys: file contents live under data/files/<id> after the id
is validated against the table, never built from user input.
"""
from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, bytes INTEGER, created_at INTEGER, filename TEXT, purpose TEXT);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at INTEGER, body TEXT, status TEXT, seq INTEGER,
    resume INTEGER DEFAULT 0, pid INTEGER, want TEXT);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, job_id TEXT, created_at INTEGER,
    level TEXT, message TEXT, type TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, job_id TEXT, created_at INTEGER,
    step INTEGER, metrics TEXT, model TEXT);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, created INTEGER, owned_by TEXT, job_id TEXT, base TEXT, path TEXT);
"""
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-:.]{1,200}$")


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Store:
    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir).resolve()
        (self.dir / "files").mkdir(parents=True, exist_ok=True)
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "tunesmith.sqlite"
        with self.connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    # -- files ------------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        """Where a *known* file's bytes live. Unknown or malformed ids never become paths."""
        if not ID_PATTERN.match(file_id) or self.get_file(file_id) is None:
            raise KeyError(file_id)
        path = (self.dir / "files" / file_id).resolve()
        if path.parent != (self.dir / "files").resolve():
            raise KeyError(file_id)
        return path

    def add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        from ..io import atomic_write_bytes
        fid = new_id("file-")
        atomic_write_bytes(self.dir / "files" / fid, data)
        row = {"id": fid, "bytes": len(data), "created_at": now(), "filename": filename, "purpose": purpose}
        with self.connect() as db:
            db.execute("INSERT INTO files VALUES (:id, :bytes, :created_at, :filename, :purpose)", row)
        return row

    def get_file(self, file_id: str) -> dict | None:
        with self.connect() as db:
            r = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(r) if r else None

    def list_files(self, purpose: str | None = None) -> list[dict]:
        with self.connect() as db:
            q = "SELECT * FROM files" + (" WHERE purpose = ?" if purpose else "") + " ORDER BY created_at DESC, rowid DESC"
            return [dict(r) for r in db.execute(q, (purpose,) if purpose else ())]

    def delete_file(self, file_id: str) -> bool:
        try:
            path = self.file_path(file_id)
        except KeyError:
            return False
        with self.connect() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        path.unlink(missing_ok=True)
        return True

    # -- jobs -------------------------------------------------------------------------------------
    def add_job(self, body: dict) -> dict:
        with self.connect() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute("INSERT INTO jobs (id, created_at, body, status, seq) VALUES (?, ?, ?, ?, ?)",
                       (body["id"], body["created_at"], json.dumps(body), body["status"], seq))
        return body

    @staticmethod
    def _job(row: sqlite3.Row) -> dict:
        """The job object, with the status column (the source of truth) folded in."""
        return {**json.loads(row["body"]), "status": row["status"]}

    def get_job(self, job_id: str) -> dict | None:
        with self.connect() as db:
            r = db.execute("SELECT body, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(r) if r else None

    def job_row(self, job_id: str) -> dict | None:
        with self.connect() as db:
            r = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(r) if r else None

    def list_jobs(self) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT body, status FROM jobs ORDER BY seq DESC").fetchall()
        return [self._job(r) for r in rows]

    def update_job(self, job_id: str, **fields) -> dict:
        """Merge `fields` into the job object; `status` also goes to its own column."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            body = self._job(db.execute("SELECT body, status FROM jobs WHERE id = ?", (job_id,)).fetchone())
            body.update(fields)
            db.execute("UPDATE jobs SET body = ?, status = ? WHERE id = ?", (json.dumps(body), body["status"], job_id))
            db.execute("COMMIT")
        return body

    def set_job_control(self, job_id: str, **cols) -> None:
        sets = ", ".join(f"{k} = ?" for k in cols)
        with self.connect() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*cols.values(), job_id))

    def claim_next_job(self, pid: int) -> dict | None:
        """Atomically move the oldest queued job to running for this worker."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            r = db.execute("SELECT id FROM jobs WHERE status IN ('validating_files', 'queued') AND pid IS NULL "
                           "ORDER BY seq LIMIT 1").fetchone()
            if r is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (pid, r["id"]))  # the child sets the status
            db.execute("COMMIT")
        return self.job_row(r["id"])

    # -- events, checkpoints, models --------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", type_: str = "message", data: dict | None = None) -> None:
        with self.connect() as db:
            db.execute("INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (new_id("ftevent-"), job_id, now(), level, message, type_, json.dumps(data or {})))

    def events(self, job_id: str) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [{"object": "fine_tuning.job.event", "id": r["id"], "created_at": r["created_at"], "level": r["level"],
                 "message": r["message"], "type": r["type"], "data": json.loads(r["data"])} for r in rows]

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, model: str) -> None:
        with self.connect() as db:
            db.execute("INSERT INTO checkpoints (id, job_id, created_at, step, metrics, model) VALUES (?, ?, ?, ?, ?, ?)",
                       (new_id("ftckpt_"), job_id, now(), step, json.dumps(metrics), model))

    def checkpoints(self, job_id: str) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [{"object": "fine_tuning.job.checkpoint", "id": r["id"], "created_at": r["created_at"],
                 "fine_tuned_model_checkpoint": r["model"], "fine_tuning_job_id": job_id, "step_number": r["step"],
                 "metrics": json.loads(r["metrics"])} for r in rows]

    def add_model(self, model_id: str, job_id: str, base: str, path: str, owner: str) -> None:
        with self.connect() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)", (model_id, now(), owner, job_id, base, path))

    def get_model(self, model_id: str) -> dict | None:
        with self.connect() as db:
            r = db.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        return dict(r) if r else None

    def list_models(self) -> list[dict]:
        with self.connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM models ORDER BY created DESC")]

    def delete_model(self, model_id: str) -> bool:
        with self.connect() as db:
            return db.execute("DELETE FROM models WHERE id = ?", (model_id,)).rowcount > 0
