"""The service's tables in PostgreSQL: one database that `tunesmith serve` and `tunesmith worker` processes on
several machines share (`--db postgresql://USER@HOST:PORT/DATABASE`), with the data folder (uploads, run
folders) on a path every machine mounts.

The Store's queries are written once with SQLite's placeholders; `PgConnection` translates them (`?` -> `%s`,
`:name` -> `%(name)s`) and otherwise behaves like the sqlite3 connection Store uses. What differs is in the
Dialect: sequences instead of AUTOINCREMENT and rowid, jsonb for the metadata filter, row locks (`FOR UPDATE`)
in read-modify-write transactions, and `FOR UPDATE SKIP LOCKED` in the job claim, so concurrent workers take
disjoint jobs without waiting on each other.

A data folder belongs to one store: the first PostgreSQL store opened on it writes database.json (the URL
without its password, and the database's store id). A folder opened later without --db uses that database (so
`tunesmith worker --data /shared/dir` needs no URL, given libpq's PGPASSWORD or ~/.pgpass where the
database wants a password); a folder of another store, or one that holds a SQLite store, is refused.
"""
from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError

BINDING = "database.json"  # in the data folder: which database holds its store
SCHEMA = """
CREATE TABLE IF NOT EXISTS tunesmith_meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, bytes BIGINT, created_at BIGINT, filename TEXT, purpose TEXT,
    seq BIGSERIAL);
CREATE SEQUENCE IF NOT EXISTS jobs_order;
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at BIGINT, body TEXT, status TEXT, seq BIGINT,
    resume INTEGER DEFAULT 0, pid INTEGER, want TEXT, owner TEXT, lease_until DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS events (seq BIGSERIAL PRIMARY KEY, id TEXT, job_id TEXT, created_at BIGINT,
    level TEXT, message TEXT, type TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (seq BIGSERIAL PRIMARY KEY, id TEXT, job_id TEXT, created_at BIGINT,
    step INTEGER, metrics TEXT, model TEXT);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, created BIGINT, owned_by TEXT, job_id TEXT, base TEXT, path TEXT);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, lease_until);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS events_id ON events (id);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_id ON checkpoints (id);
CREATE INDEX IF NOT EXISTS files_order ON files (created_at, seq);
"""
SCHEMA_LOCK = 7_467_312  # pg_advisory_xact_lock key: workers starting together create the tables once
# quoted text (left alone), a literal %, `?`, or `:name` (not a `::type` cast)
TOKEN = re.compile(r"'[^']*'|%|(?<![:\w]):([A-Za-z_]\w*)|\?")


def redact(url: str) -> str:
    """The URL without its password (in the netloc or as ?password=): what messages and database.json show."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    if netloc[1]:
        netloc = (netloc[0].partition(":")[0], "@", netloc[2])
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    return urlunsplit((parts.scheme, "".join(netloc), parts.path, query, parts.fragment))


def translate(query: str) -> str:
    """SQLite placeholders to psycopg's: `?` -> `%s`, `:name` -> `%(name)s`, a literal % -> %%."""
    def sub(m: re.Match) -> str:
        text = m.group(0)
        if text.startswith("'") or text == "%":
            return text.replace("%", "%%")
        return "%s" if text == "?" else f"%({m.group(1)})s"
    return TOKEN.sub(sub, query)


class PgConnection:
    """A psycopg connection that takes the Store's SQLite-style statements: execute(query, params) returns a
    cursor of dict rows (fetchone, fetchall, iteration, rowcount). Autocommit, with explicit BEGIN/COMMIT, as
    the Store uses SQLite."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row
        self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=10)

    def execute(self, query: str, params: Any = ()) -> Any:
        if params is None or params == ():
            return self.conn.execute(translate(query))
        return self.conn.execute(translate(query), params)

    def executescript(self, script: str) -> None:
        self.conn.execute(script)  # no parameters: psycopg runs several statements in one call

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus
        return self.conn.info.transaction_status != TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        """Lost (the server restarted, the network dropped): the Store opens a new connection."""
        return self.conn.broken or self.conn.closed

    def rollback(self) -> None:
        if not self.broken:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()


def create_schema(db: PgConnection) -> None:
    db.execute("BEGIN")
    db.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
    db.executescript(SCHEMA)
    db.execute("INSERT INTO tunesmith_meta (key, value) VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
               (secrets.token_hex(8),))
    db.execute("COMMIT")


def postgres_dialect(url: str):
    from .store import Dialect
    try:
        import psycopg
    except ImportError:
        raise ConfigError("--db postgresql://...: PostgreSQL needs psycopg; install it with "
                          "`pip install 'tunesmith[postgres]'` (or `pip install 'psycopg[binary]'`)") from None
    where = redact(url)

    def connect() -> PgConnection:
        try:
            return PgConnection(url)
        except psycopg.OperationalError as e:
            raise ConfigError(f"--db {where}: cannot connect to PostgreSQL ({str(e).strip()})") from None

    return Dialect(
        "postgresql", where, connect, create_schema, begin_write="BEGIN", lock_row=" FOR UPDATE",
        claim_lock=" FOR UPDATE SKIP LOCKED", file_order="seq", next_job_seq="nextval('jobs_order')",
        metadata_match="(CAST(jobs.body AS jsonb) -> 'metadata' ->> {key}) = {value}",
        # CASE: only metrics events' data are read as a step number, whatever order the planner picks
        metrics_after="CASE WHEN type = 'metrics' THEN CAST(CAST(data AS jsonb) ->> 'step' AS DOUBLE PRECISION) "
                      "> ? ELSE FALSE END",
        upsert_model="INSERT INTO models VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                     "created = EXCLUDED.created, owned_by = EXCLUDED.owned_by, job_id = EXCLUDED.job_id, "
                     "base = EXCLUDED.base, path = EXCLUDED.path")


def recorded_database(data_dir: Path) -> str | None:
    """The database URL the data folder was bound to (without a password), or None."""
    file = Path(data_dir) / BINDING
    return json.loads(file.read_text())["url"] if file.exists() else None


def check_sqlite_folder(data_dir: Path) -> None:
    """A folder bound to a PostgreSQL store is not opened as a SQLite one (its files are that store's)."""
    url = recorded_database(data_dir)
    if url is not None:
        raise ConfigError(f"{data_dir} holds the files of the PostgreSQL store at {url} ({BINDING}); pass "
                          f"--db {url} (or no --db), or use another data folder for a SQLite store")


def bind_data_folder(data_dir: Path, db: PgConnection, where: str) -> None:
    """Check that the data folder belongs to this database's store, and record the binding on first use."""
    from ..io import atomic_write_text
    from .store import SQLITE_FILE
    store_id = db.execute("SELECT value FROM tunesmith_meta WHERE key = 'store_id'").fetchone()["value"]
    file = data_dir / BINDING
    if file.exists():
        bound = json.loads(file.read_text())
        if bound["store_id"] != store_id:
            raise ConfigError(f"{data_dir} holds the files of another store (the one at {bound['url']}, store "
                              f"{bound['store_id']}); {where} holds store {store_id}. Give each database its own "
                              "data folder: use the folder this database was created with, or a new one")
        if bound["url"] == where:
            return
    elif (data_dir / SQLITE_FILE).exists():
        raise ConfigError(f"{data_dir} holds a SQLite store ({SQLITE_FILE}); a PostgreSQL store needs its own data "
                          "folder (rows are not moved between databases): pass a new --data")
    atomic_write_text(file, json.dumps({"url": where, "store_id": store_id}, indent=1) + "\n")
