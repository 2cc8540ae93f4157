"""The service's state: one SQLite file in the data folder (the default: WAL mode, many readers, one writer at
a time, no extra server), or a PostgreSQL database shared by workers on several machines (`--db postgresql://`,
store_pg.py). Both answer through this one Store; the few statements that differ come from its `Dialect`.

Ids are generated here and only ever used as keys: file contents live under data/files/<id> after the id
is validated against the table, never built from user input.

Every list is one query per page (ORDER BY ... LIMIT, the `after` cursor resolved inside the query), and each
thread keeps one open connection, so a request costs a few statements, not a connection per row.

Jobs are claimed with a lease (`owner`, `lease_until`): the worker that runs a job renews it while the job
runs; a job whose lease has expired is claimable again by any worker, and resumes from its last checkpoint.
Read-modify-write transactions lock what they change (SQLite: BEGIN IMMEDIATE; PostgreSQL: the job's row,
FOR UPDATE), and a claim skips rows another worker is claiming (PostgreSQL: FOR UPDATE SKIP LOCKED), so no
job is ever handed to two workers.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError

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
# Added after the first release: ALTER TABLE for data folders made before them, then the indexes.
JOB_COLUMNS = {"owner": "TEXT", "lease_until": "REAL"}
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, lease_until);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS events_id ON events (id);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_id ON checkpoints (id);
CREATE INDEX IF NOT EXISTS files_order ON files (created_at);
"""
FILE_COLUMNS = "id, bytes, created_at, filename, purpose"
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-:.]{1,200}$")
ACTIVE = ("validating_files", "queued", "running")  # a worker may hold these; paused waits for /resume
TERMINAL = ("succeeded", "failed", "cancelled")
SQLITE_FILE = "tunesmith.sqlite"


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def list_object(data: list[dict], has_more: bool) -> dict:
    """OpenAI's page: {"object": "list", "data", "has_more", "first_id", "last_id"}."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases: how to connect and create the tables, and a few statements. Queries
    are written once, with SQLite's `?` and `:name` placeholders (the PostgreSQL connection translates them)."""
    name: str
    where: str  # for messages: the SQLite file, or the database URL without its password
    open: Callable[[], Any]  # a new connection: execute(), executescript(), in_transaction, rollback()
    create_schema: Callable[[Any], None]
    begin_write: str  # starts a transaction that will write
    lock_row: str  # appended to a SELECT whose rows the transaction then changes
    claim_lock: str  # appended to the claim's SELECT: skip rows another worker is claiming right now
    file_order: str  # the column that orders files uploaded within one second
    next_job_seq: str  # the next job's position in the list
    metadata_match: str  # a job's metadata[{key}] = {value} ({key}, {value}: placeholders)
    metrics_after: str  # an events row is a metrics event of a step after ?
    upsert_model: str  # INSERT a models row, replacing one with the same id


def sqlite_dialect(path: Path) -> Dialect:
    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def create_schema(db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)
        have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
        for name, kind in JOB_COLUMNS.items():
            if name not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        db.executescript(INDEXES)

    return Dialect(
        "sqlite", str(path), connect, create_schema, begin_write="BEGIN IMMEDIATE", lock_row="", claim_lock="",
        file_order="rowid", next_job_seq="(SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs)",
        metadata_match="EXISTS (SELECT 1 FROM json_each(jobs.body, '$.metadata') WHERE json_each.key = {key} "
                       "AND json_each.value = {value})",
        metrics_after="type = 'metrics' AND json_extract(data, '$.step') > ?",
        upsert_model="INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)")


def default_database(data_dir: Path) -> str | None:
    """The database of a data folder opened without `db`: $TUNESMITH_DB, else the PostgreSQL database the folder
    was first used with (its database.json), else None: SQLite in the folder."""
    if os.environ.get("TUNESMITH_DB"):
        return os.environ["TUNESMITH_DB"]
    from .store_pg import recorded_database
    return recorded_database(data_dir)


class Store:
    """The service's tables over SQLite (`db` None or "sqlite") or PostgreSQL (`db` a postgresql:// URL); files
    and run folders always live in `data_dir`, which every worker must see at the same path."""

    def __init__(self, data_dir: str | Path, db: str | None = None) -> None:
        self.dir = Path(data_dir).resolve()
        (self.dir / "files").mkdir(parents=True, exist_ok=True)
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        url = db if db is not None else default_database(self.dir)
        if url in (None, "", "sqlite"):
            from .store_pg import check_sqlite_folder
            check_sqlite_folder(self.dir)
            self.sql = sqlite_dialect(self.dir / SQLITE_FILE)
        elif url.startswith(("postgresql://", "postgres://")):
            from .store_pg import postgres_dialect
            self.sql = postgres_dialect(url)
        else:
            raise ConfigError(f"--db {url!r}: expected `sqlite` (the default: a file in the data folder) or a "
                              "PostgreSQL URL, postgresql://USER@HOST:PORT/DATABASE")
        self.path = self.sql.where  # the SQLite file, or the database URL without its password
        self.url = url if self.sql.name == "postgresql" else "sqlite"  # how another process opens this store
        self._local = threading.local()
        with self.connect() as conn:
            self.sql.create_schema(conn)
        if self.sql.name == "postgresql":
            from .store_pg import bind_data_folder
            with self.connect() as conn:
                bind_data_folder(self.dir, conn, self.path)

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """This thread's connection (opened once, again after it broke). A transaction an exception leaves open
        is rolled back."""
        db = getattr(self._local, "db", None)
        if db is None or getattr(db, "broken", False):
            db = self._local.db = self.sql.open()
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise

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
            db.execute(f"INSERT INTO files ({FILE_COLUMNS}) VALUES (:id, :bytes, :created_at, :filename, :purpose)",
                       row)
        return row

    def get_file(self, file_id: str) -> dict | None:
        with self.connect() as db:
            r = db.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(r) if r else None

    def list_files(self, purpose: str | None = None) -> list[dict]:
        """Every file, newest first (kept for callers that want all; pages come from page_files)."""
        with self.connect() as db:
            q = (f"SELECT {FILE_COLUMNS} FROM files" + (" WHERE purpose = ?" if purpose else "") +
                 f" ORDER BY created_at DESC, {self.sql.file_order} DESC")
            return [dict(r) for r in db.execute(q, (purpose,) if purpose else ())]

    def page_files(self, after: str | None = None, limit: int = 20, purpose: str | None = None,
                   order: str = "desc") -> dict:
        """One page of file rows in upload order (newest first for 'desc'); raises KeyError(after) for an unknown
        cursor."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        seq = self.sql.file_order  # orders the uploads of one second
        q = (f"SELECT {FILE_COLUMNS} FROM files WHERE (CAST(:purpose AS TEXT) IS NULL OR purpose = :purpose) AND "
             f"(CAST(:after AS TEXT) IS NULL OR (created_at, {seq}) {op} (SELECT created_at, {seq} FROM files "
             f"WHERE id = :after)) ORDER BY created_at {direction}, {seq} {direction} LIMIT :n")
        return self._page(q, {"purpose": purpose, "after": after, "n": limit + 1}, limit, dict, "files", after)

    def delete_file(self, file_id: str) -> bool:
        try:
            path = self.file_path(file_id)
        except KeyError:
            return False
        with self.connect() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        path.unlink(missing_ok=True)
        return True

    def _page(self, query: str, params: dict, limit: int, convert, table: str, after: str | None) -> dict:
        """One page; KeyError(after) for a cursor that is not a row of this list (another job's event too)."""
        scoped = "job" in params  # a job's events or checkpoints
        with self.connect() as db:
            rows = db.execute(query, params).fetchall()
            if after is not None and not rows and db.execute(
                    f"SELECT 1 FROM {table} WHERE id = ?" + (" AND job_id = ?" if scoped else ""),
                    (after, params["job"]) if scoped else (after,)).fetchone() is None:
                raise KeyError(after)
        return list_object([convert(r) for r in rows[:limit]], len(rows) > limit)

    # -- jobs -------------------------------------------------------------------------------------
    def add_job(self, body: dict) -> dict:
        with self.connect() as db:
            db.execute("INSERT INTO jobs (id, created_at, body, status, seq) "
                       f"VALUES (?, ?, ?, ?, {self.sql.next_job_seq})",
                       (body["id"], body["created_at"], json.dumps(body), body["status"]))
        return body

    @staticmethod
    def _job(row) -> dict:
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
        """Every job, newest first (kept for callers that want all; pages come from page_jobs)."""
        with self.connect() as db:
            rows = db.execute("SELECT body, status FROM jobs ORDER BY seq DESC").fetchall()
        return [self._job(r) for r in rows]

    def page_jobs(self, after: str | None = None, limit: int = 20, metadata: dict[str, str] | None = None) -> dict:
        """One page of job objects, newest first, filtered on metadata key=value pairs, in one query.
        Raises KeyError(after) for an unknown cursor."""
        params: dict = {"after": after, "n": limit + 1}
        where = ["(CAST(:after AS TEXT) IS NULL OR seq < (SELECT seq FROM jobs WHERE id = :after))"]
        for i, (key, value) in enumerate((metadata or {}).items()):
            where.append(self.sql.metadata_match.format(key=f"CAST(:k{i} AS TEXT)", value=f"CAST(:v{i} AS TEXT)"))
            params[f"k{i}"], params[f"v{i}"] = key, value
        q = f"SELECT id, body, status FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT :n"
        return self._page(q, params, limit, self._job, "jobs", after)

    def update_job(self, job_id: str, **fields) -> dict:
        """Merge `fields` into the job object; `status` also goes to its own column. A finished job
        (succeeded, failed, cancelled) keeps its status: a late update from its training process cannot revive it."""
        with self.connect() as db:
            db.execute(self.sql.begin_write)
            body = self._job(db.execute(f"SELECT body, status FROM jobs WHERE id = ?{self.sql.lock_row}",
                                        (job_id,)).fetchone())
            if body["status"] in TERMINAL:
                fields.pop("status", None)
            body.update(fields)
            db.execute("UPDATE jobs SET body = ?, status = ? WHERE id = ?", (json.dumps(body), body["status"], job_id))
            db.execute("COMMIT")
        return body

    def finish_job(self, job_id: str, status: str, events: list[str] = (), **fields) -> str:
        """Move a job to a terminal status once, with its closing `events` in the same transaction: a job
        already finished keeps its status, and a job whose cancel was requested becomes 'cancelled', never
        'succeeded'. Returns the status it ends in."""
        assert status in TERMINAL, status
        with self.connect() as db:
            db.execute(self.sql.begin_write)
            r = db.execute(f"SELECT body, status, want FROM jobs WHERE id = ?{self.sql.lock_row}", (job_id,)).fetchone()
            if r["status"] in TERMINAL:
                db.execute("COMMIT")
                return r["status"]
            if r["want"] == "cancel" or status == "cancelled":
                status, fields, events = "cancelled", {}, ["Fine-tuning job cancelled"]
            body = {**self._job(r), **fields, "status": status, "finished_at": now()}
            db.execute("UPDATE jobs SET body = ?, status = ?, want = NULL, owner = NULL, lease_until = NULL, pid = NULL "
                       "WHERE id = ?", (json.dumps(body), status, job_id))
            for message in events:
                level = "error" if status == "failed" else "info"
                db.execute("INSERT INTO events (id, job_id, created_at, level, message, type, data) "
                           "VALUES (?, ?, ?, ?, ?, 'message', '{}')", (new_id("ftevent-"), job_id, now(), level, message))
            db.execute("COMMIT")
        return status

    def set_job_control(self, job_id: str, **cols) -> None:
        sets = ", ".join(f"{k} = ?" for k in cols)
        with self.connect() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*cols.values(), job_id))

    def request_control(self, job_id: str, want: str) -> dict:
        """Ask for 'cancel' or 'pause'. A job no live worker holds (no lease, or an expired one) is cancelled
        here and now; otherwise the worker holding it (or its training process, at the next step) stops it."""
        with self.connect() as db:
            db.execute(self.sql.begin_write)
            r = db.execute(f"SELECT status, lease_until FROM jobs WHERE id = ?{self.sql.lock_row}",
                           (job_id,)).fetchone()
            held = r["lease_until"] is not None and r["lease_until"] >= time.time()
            db.execute("UPDATE jobs SET want = ? WHERE id = ?", (want, job_id))
            db.execute("COMMIT")
        if want == "cancel" and (not held or r["status"] == "paused"):
            self.finish_job(job_id, "cancelled")
        return self.get_job(job_id)

    # -- leases -----------------------------------------------------------------------------------
    def claim_next_job(self, owner: str | int, lease_s: float = 30.0) -> dict | None:
        """Atomically take the oldest job that no live worker holds: queued ones, and running ones whose
        worker stopped renewing its lease. The row returned carries the new owner and lease."""
        t = time.time()
        with self.connect() as db:
            db.execute(self.sql.begin_write)
            r = db.execute(f"SELECT id FROM jobs WHERE status IN {ACTIVE} AND (lease_until IS NULL OR lease_until < ?) "
                           f"ORDER BY seq LIMIT 1{self.sql.claim_lock}", (t,)).fetchone()
            if r is not None:
                db.execute("UPDATE jobs SET owner = ?, lease_until = ?, pid = NULL WHERE id = ?",
                           (str(owner), t + lease_s, r["id"]))
            db.execute("COMMIT")
        return None if r is None else self.job_row(r["id"])

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease; False if the job is no longer this owner's (another worker took it over)."""
        with self.connect() as db:
            return db.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ?",
                              (time.time() + lease_s, job_id, owner)).rowcount == 1

    def release_job(self, job_id: str, owner: str) -> None:
        with self.connect() as db:
            db.execute("UPDATE jobs SET owner = NULL, lease_until = NULL, pid = NULL WHERE id = ? AND owner = ?",
                       (job_id, owner))

    def held_jobs(self) -> list[dict]:
        """Rows of jobs some worker holds a live lease on (what a restarting worker checks for dead owners)."""
        with self.connect() as db:
            return [dict(r) for r in db.execute(f"SELECT id, owner, pid, lease_until FROM jobs WHERE status IN {ACTIVE} "
                                                "AND lease_until >= ?", (time.time(),))]

    # -- events, checkpoints, models --------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", type_: str = "message", data: dict | None = None) -> None:
        with self.connect() as db:
            db.execute("INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (new_id("ftevent-"), job_id, now(), level, message, type_, json.dumps(data or {})))

    @staticmethod
    def _event(r) -> dict:
        return {"object": "fine_tuning.job.event", "id": r["id"], "created_at": r["created_at"], "level": r["level"],
                "message": r["message"], "type": r["type"], "data": json.loads(r["data"])}

    def events(self, job_id: str) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [self._event(r) for r in rows]

    def page_events(self, job_id: str, after: str | None = None, limit: int = 20) -> dict:
        """One page of a job's events, newest first; raises KeyError(after) for an unknown cursor."""
        q = ("SELECT * FROM events WHERE job_id = :job AND (CAST(:after AS TEXT) IS NULL OR seq < (SELECT seq FROM "
             "events WHERE id = :after AND job_id = :job)) ORDER BY seq DESC LIMIT :n")
        return self._page(q, {"job": job_id, "after": after, "n": limit + 1}, limit, self._event, "events", after)

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, model: str) -> None:
        with self.connect() as db:
            db.execute("INSERT INTO checkpoints (id, job_id, created_at, step, metrics, model) VALUES (?, ?, ?, ?, ?, ?)",
                       (new_id("ftckpt_"), job_id, now(), step, json.dumps(metrics), model))

    @staticmethod
    def _checkpoint(r) -> dict:
        return {"object": "fine_tuning.job.checkpoint", "id": r["id"], "created_at": r["created_at"],
                "fine_tuned_model_checkpoint": r["model"], "fine_tuning_job_id": r["job_id"], "step_number": r["step"],
                "metrics": json.loads(r["metrics"])}

    def checkpoints(self, job_id: str) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [self._checkpoint(r) for r in rows]

    def page_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> dict:
        """One page of a job's checkpoints, newest first; raises KeyError(after) for an unknown cursor."""
        q = ("SELECT * FROM checkpoints WHERE job_id = :job AND (CAST(:after AS TEXT) IS NULL OR seq < (SELECT seq "
             "FROM checkpoints WHERE id = :after AND job_id = :job)) ORDER BY seq DESC LIMIT :n")
        return self._page(q, {"job": job_id, "after": after, "n": limit + 1}, limit, self._checkpoint, "checkpoints",
                          after)

    def rewind_job(self, job_id: str, step: int) -> None:
        """A run resuming from the checkpoint of `step` redoes the steps after it: drop their metrics events,
        checkpoints and checkpoint models, so each step is reported once."""
        with self.connect() as db:
            db.execute(self.sql.begin_write)
            db.execute(f"DELETE FROM events WHERE job_id = ? AND {self.sql.metrics_after}", (job_id, step))
            db.execute("DELETE FROM models WHERE id IN (SELECT model FROM checkpoints WHERE job_id = ? AND step > ?)",
                       (job_id, step))
            db.execute("DELETE FROM checkpoints WHERE job_id = ? AND step > ?", (job_id, step))
            db.execute("COMMIT")

    def add_model(self, model_id: str, job_id: str, base: str, path: str, owner: str) -> None:
        with self.connect() as db:
            db.execute(self.sql.upsert_model, (model_id, now(), owner, job_id, base, path))

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
