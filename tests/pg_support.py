"""A real PostgreSQL server for the tests: the one .ci/run starts ($TUNESMITH_TEST_PG), or one started here from
the machine's postgres binaries (initdb in a temporary folder; as the `postgres` user when running as root, since
initdb refuses root). Tests skip only when neither exists.

The PostgreSQL pass of the service suite (.ci/run sets $TUNESMITH_TEST_DB to the server's URL) gives every data
folder a database of its own, as each test's SQLite store is its own file: a folder opened without --db is bound
to a fresh database (`postgres_store_pass`), and `start_serve` passes `--db` with the database of its --data.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

ADMIN_DB = "postgres"


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A throwaway PostgreSQL server in a temporary folder (fsync off: test data only)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin, self.dir, self.port = bin_dir, Path(tempfile.mkdtemp(prefix="tunesmith-pg-")), _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            shutil.chown(self.dir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w", "start", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c full_page_writes=off -c max_connections=400")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{ADMIN_DB}"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def server_url_or_skip(request) -> str:
    """$TUNESMITH_TEST_PG, else a server started for this test session; skips when no binaries exist."""
    if os.environ.get("TUNESMITH_TEST_PG"):
        return os.environ["TUNESMITH_TEST_PG"]
    cache = request.config
    if not hasattr(cache, "_tunesmith_pg"):
        bin_dir = postgres_bin()
        if bin_dir is None:
            pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine: install Debian's `postgresql` "
                        "package, or set TUNESMITH_TEST_PG=postgresql://USER@HOST:PORT/postgres")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("psycopg is not installed: pip install -e '.[postgres]'")
        cache._tunesmith_pg = LocalServer(bin_dir)
        request.config.add_cleanup(cache._tunesmith_pg.stop)
    return cache._tunesmith_pg.url


def fresh_database(server_url: str) -> str:
    """A new empty database on the server; returns its URL."""
    import secrets

    import psycopg
    name = f"tunesmith_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def database_for(data_dir: str | Path) -> str:
    """The database of a data folder in the PostgreSQL pass: the one it is bound to, else a fresh one."""
    from tunesmith.service.store_pg import recorded_database
    return recorded_database(Path(data_dir).resolve()) or fresh_database(os.environ["TUNESMITH_TEST_DB"])


@pytest.fixture(scope="session", autouse=True)
def postgres_store_pass():
    """In the PostgreSQL pass ($TUNESMITH_TEST_DB), a Store opened without --db on a new folder gets a fresh
    database instead of a SQLite file, so the unchanged service tests run against PostgreSQL."""
    if not os.environ.get("TUNESMITH_TEST_DB"):
        yield
        return
    from tunesmith.service import store
    patch = pytest.MonkeyPatch()
    patch.setattr(store, "default_database", lambda data_dir: os.environ.get("TUNESMITH_DB") or database_for(data_dir))
    yield
    patch.undo()
