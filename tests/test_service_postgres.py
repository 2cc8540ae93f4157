"""One contract for both stores, SQLite and PostgreSQL (a real server: pg_support.py): pages and cursors in one
query each, leases, claims that hand every job to exactly one of many concurrent workers, the rules that keep a
finished or cancelled job as it is; then what only PostgreSQL has: `--db`, the data folder bound to its
database, and clear errors for a wrong URL, an unreachable server or a folder of another store.

The rest of the service suite runs against PostgreSQL too: .ci/run runs tests/test_service*.py a second time
with TUNESMITH_TEST_DB set (each test's data folder gets a database of its own)."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from conftest import free_port, start_serve
from pg_support import fresh_database, server_url_or_skip
from tunesmith.errors import ConfigError
from tunesmith.service.store import Store, new_id, now


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request):
    return request.param


@pytest.fixture
def database(request, kind):
    """A store URL of this kind: `sqlite`, or a fresh PostgreSQL database."""
    return "sqlite" if kind == "sqlite" else fresh_database(server_url_or_skip(request))


@pytest.fixture
def store(tmp_path, database, monkeypatch):
    monkeypatch.delenv("TUNESMITH_DB", raising=False)
    return Store(tmp_path / "data", database)


@pytest.fixture
def pg_url(request):
    return fresh_database(server_url_or_skip(request))


def add_jobs(store: Store, n: int, status: str = "queued") -> list[str]:
    return [store.add_job({"id": new_id("ftjob-"), "created_at": now(), "status": status,
                           "metadata": {"team": "ab"[i % 2]}})["id"] for i in range(n)]


def count_statements(store: Store, monkeypatch) -> list[str]:
    """Every statement this thread's connection runs from now on."""
    seen: list[str] = []
    with store.connect() as db:
        if store.sql.name == "sqlite":
            db.set_trace_callback(seen.append)
        else:
            from tunesmith.service.store_pg import PgConnection
            real = PgConnection.execute
            monkeypatch.setattr(PgConnection, "execute", lambda self, q, p=(): (seen.append(q), real(self, q, p))[1])
    return seen


# -- the contract, on both stores ----------------------------------------------------------------------
def test_pages_are_one_query_each_with_cursors_filters_and_one_connection(store, monkeypatch):
    jobs = add_jobs(store, 60)
    for i in range(12):
        store.add_event(jobs[0], f"event {i}")
        store.add_checkpoint(jobs[0], i, {"step": i}, f"m{i}")
        store.add_file(f"f{i}.jsonl", "fine-tune", b"{}\n")  # several in one second: upload order still holds
    with store.connect() as db:
        connection = db
    seen = count_statements(store, monkeypatch)
    page = store.page_jobs(limit=20)
    assert [j["id"] for j in page["data"]] == jobs[::-1][:20] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == (jobs[-1], jobs[-20])
    assert [j["id"] for j in store.page_jobs(after=page["last_id"], limit=50)["data"]] == jobs[::-1][20:]
    team_a = store.page_jobs(metadata={"team": "a"}, limit=100)
    assert [j["id"] for j in team_a["data"]] == jobs[0::2][::-1] and not team_a["has_more"]
    events = store.page_events(jobs[0], limit=5)
    assert [e["message"] for e in events["data"]] == [f"event {i}" for i in range(11, 6, -1)]
    assert store.page_events(jobs[0], after=events["last_id"], limit=1)["data"][0]["message"] == "event 6"
    assert [c["step_number"] for c in store.page_checkpoints(jobs[0], limit=3)["data"]] == [11, 10, 9]
    newest = store.page_files(limit=3)
    assert [f["filename"] for f in newest["data"]] == ["f11.jsonl", "f10.jsonl", "f9.jsonl"]
    assert [f["filename"] for f in store.page_files(after=newest["last_id"], limit=2)["data"]] == ["f8.jsonl", "f7.jsonl"]
    assert [f["filename"] for f in store.page_files(limit=2, order="asc")["data"]] == ["f0.jsonl", "f1.jsonl"]
    assert set(store.page_files(limit=1)["data"][0]) == {"id", "bytes", "created_at", "filename", "purpose"}
    selects = [q for q in seen if q.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 10, selects  # ten pages, one query each
    with store.connect() as db:
        assert db is connection, "the thread's connection is reused"
    for lister in (store.page_jobs, lambda after: store.page_events(jobs[0], after=after), store.page_files):
        with pytest.raises(KeyError):
            lister(after="nope-unknown")


def test_leases_claims_and_finished_jobs(store):
    first, second, third = add_jobs(store, 3)
    row = store.claim_next_job("node-a:1:x", lease_s=30)
    assert row["id"] == first and row["owner"] == "node-a:1:x" and row["lease_until"] > time.time() + 20
    assert store.claim_next_job("node-b:1:x", lease_s=30)["id"] == second, "a held job is skipped"
    assert store.renew_lease(first, "node-a:1:x", 30) and not store.renew_lease(first, "node-b:1:x", 30)
    assert {r["id"] for r in store.held_jobs()} == {first, second}
    store.set_job_control(first, lease_until=0)  # its worker died: the lease ran out
    assert store.claim_next_job("node-c:1:x", lease_s=30)["id"] == first, "an expired lease is claimable"
    store.release_job(second, "node-b:1:x")
    assert store.job_row(second)["owner"] is None
    # a cancel asked while the job records success wins; a finished job keeps its status
    assert store.update_job(first, status="running", trained_tokens=5)["trained_tokens"] == 5
    store.set_job_control(first, want="cancel")
    assert store.finish_job(first, "succeeded", events=["done"], fine_tuned_model="x") == "cancelled"
    assert store.finish_job(first, "failed") == "cancelled"
    assert store.update_job(first, status="running")["status"] == "cancelled"
    assert store.get_job(first).get("fine_tuned_model") is None and store.job_row(first)["owner"] is None
    assert [e["message"] for e in store.events(first)] == ["Fine-tuning job cancelled"]
    # cancel of a job no live worker holds ends it at once
    assert store.request_control(third, "cancel")["status"] == "cancelled"


def test_rewind_drops_what_a_resumed_run_redoes_and_models_upsert(store):
    job = add_jobs(store, 1)[0]
    for step in range(1, 7):
        store.add_event(job, f"Step {step}", type_="metrics", data={"step": step})
        if step % 2 == 0:
            store.add_model(f"m{step}", job, "tiny", f"/runs/{step}", "user")
            store.add_checkpoint(job, step, {"step": step}, f"m{step}")
    store.add_event(job, "a message", data={"step": "not a number"})  # only metrics events are read as steps
    store.rewind_job(job, 4)
    assert sorted(e["data"]["step"] for e in store.events(job) if e["type"] == "metrics") == [1, 2, 3, 4]
    assert [c["step_number"] for c in store.checkpoints(job)] == [4, 2]
    assert {m["id"] for m in store.list_models()} == {"m2", "m4"}
    store.add_model("m4", job, "tiny", "/runs/again", "user")  # the same id again replaces it
    assert store.get_model("m4")["path"] == "/runs/again" and len(store.list_models()) == 2
    assert store.delete_model("m4") and not store.delete_model("m4")


def test_concurrent_claims_hand_every_job_to_exactly_one_worker(store, tmp_path, database):
    """Eight workers, each with its own connection, race for 40 jobs; none is handed out twice."""
    jobs = set(add_jobs(store, 40))
    claimed: list[tuple[str, str]] = []
    lock, start = threading.Lock(), threading.Barrier(8)

    def worker(i: int) -> None:
        mine = Store(tmp_path / "data", database)
        start.wait()
        while (row := mine.claim_next_job(f"node-{i}:1:x", lease_s=60)) is not None:
            with lock:
                claimed.append((row["id"], row["owner"]))
            time.sleep(0.01)  # the job's work: the others claim meanwhile

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    counts = Counter(job for job, _ in claimed)
    assert set(counts) == jobs and set(counts.values()) == {1}, counts.most_common(3)
    assert all(store.job_row(job)["owner"] == owner for job, owner in claimed)
    assert len({owner for _, owner in claimed}) > 1, "the work was shared"


# -- PostgreSQL only -----------------------------------------------------------------------------------
def test_a_data_folder_belongs_to_one_database(tmp_path, pg_url, request, monkeypatch):
    monkeypatch.delenv("TUNESMITH_DB", raising=False)
    folder = tmp_path / "shared"
    store = Store(folder, pg_url)
    job = add_jobs(store, 1)[0]
    binding = json.loads((folder / "database.json").read_text())
    assert binding["url"] == pg_url and len(binding["store_id"]) == 16
    again = Store(folder)  # no --db: the database the folder was made with
    assert again.sql.name == "postgresql" and again.get_job(job)["id"] == job
    assert not (folder / "tunesmith.sqlite").exists()
    with pytest.raises(ConfigError, match="holds the files of the PostgreSQL store"):
        Store(folder, "sqlite")
    other = fresh_database(server_url_or_skip(request))
    with pytest.raises(ConfigError, match="holds the files of another store"):
        Store(folder, other)
    Store(tmp_path / "lite", "sqlite")  # a SQLite store...
    with pytest.raises(ConfigError, match="holds a SQLite store"):
        Store(tmp_path / "lite", other)  # ...is not turned into a PostgreSQL one
    monkeypatch.setenv("TUNESMITH_DB", other)  # $TUNESMITH_DB is the default for a new folder
    assert Store(tmp_path / "fresh").path == other


def test_bad_database_urls_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected `sqlite`.*or a PostgreSQL URL"):
        Store(tmp_path / "a", "mysql://localhost/x")
    with pytest.raises(ConfigError, match=r"cannot connect to PostgreSQL") as e:
        Store(tmp_path / "b", f"postgresql://nobody:s3cret@127.0.0.1:{free_port()}/none")
    assert "s3cret" not in str(e.value), "the password is never shown"


@pytest.mark.slow
def test_serve_and_worker_take_db(tmp_path, pg_url, lm_dir, monkeypatch):
    """`serve --db URL`: uploads and jobs land in PostgreSQL; `tunesmith worker --db` reaches the same store."""
    import subprocess
    import sys

    import openai
    monkeypatch.delenv("TUNESMITH_TEST_DB", raising=False)  # this test passes --db itself
    port, data = free_port(), tmp_path / "data"
    proc = start_serve("--data", str(data), "--db", pg_url, "--api-key", "k", "--no-worker",
                       "--model", f"tiny={lm_dir}", port=port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        rows = "".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                       for i in range(10))
        file_id = client.files.create(file=("t.jsonl", rows.encode()), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(training_file=file_id, model="tiny",
                                             hyperparameters={"n_epochs": 1, "batch_size": 5})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    import psycopg
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT id FROM files").fetchall() == [(file_id,)]
        assert db.execute("SELECT id, status FROM jobs").fetchall() == [(job.id, "validating_files")]
    worker = subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--db", pg_url, "--data", str(data),
                               "--model", f"tiny={lm_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        store = Store(data, pg_url)
        deadline = time.time() + 180
        while store.get_job(job.id)["status"] not in ("succeeded", "failed") and time.time() < deadline:
            time.sleep(0.3)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    done = store.get_job(job.id)
    assert done["status"] == "succeeded", done.get("error")
    assert [e["data"]["step"] for e in store.events(job.id) if e["type"] == "metrics"] == [2, 1]
