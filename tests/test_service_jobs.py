"""The job side of the service under faults: vanished files, dead workers and leases, cancel, resume without
duplicates, epoch-end checkpoints, and one query per listed page. Jobs run in real worker and training
processes against a real SQLite store (no HTTP: the routes are thin over the store)."""
from __future__ import annotations

import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import chat_rows
from tunesmith.service.store import Store, new_id, now

ENDED = ("succeeded", "failed", "cancelled")


def new_store(tmp_path, lm_dir, job_config: str | None = None) -> Store:
    store = Store(tmp_path / "data")
    (store.dir / "bases.json").write_text(json.dumps({"tiny": str(lm_dir)}))
    if job_config:
        (store.dir / "job_config.yaml").write_text(job_config)
    return store


def add_file(store: Store, n: int) -> str:
    return store.add_file("train.jsonl", "fine-tune", "".join(json.dumps(r) + "\n" for r in chat_rows(n)).encode())["id"]


def add_job(store: Store, file_id: str, n_epochs: int = 1, batch_size: int = 4) -> str:
    """A job exactly as POST /v1/fine_tuning/jobs stores it."""
    hp = {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": "auto"}
    job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": "tiny", "created_at": now(), "finished_at": None,
           "status": "validating_files", "fine_tuned_model": None, "organization_id": "user", "training_file": file_id,
           "validation_file": None, "result_files": [], "trained_tokens": None, "hyperparameters": hp, "error": None,
           "seed": 42, "suffix": None, "estimated_finish": None, "integrations": [], "metadata": None,
           "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
    store.add_job(job)
    return job["id"]


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def ended(store: Store, job_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (j := store.get_job(job_id))["status"] in ENDED and j, timeout, f"{job_id} to end")


def messages(store: Store, job_id: str) -> list[str]:
    return [e["message"] for e in reversed(store.events(job_id))]


def metric_steps(store: Store, job_id: str) -> list[int]:
    return sorted(e["data"]["step"] for e in store.events(job_id) if e["type"] == "metrics")


@pytest.fixture
def worker_thread():
    """Run `work_forever` on a store in this process (its jobs still train in child processes)."""
    from tunesmith.service.worker import work_forever
    stop, threads = threading.Event(), []

    def start(store: Store, lease_s: float = 30) -> None:
        kwargs = {"poll": 0.1}
        if "lease_s" in inspect.signature(work_forever).parameters:  # so the test also runs on a worker without leases
            kwargs["lease_s"] = lease_s
        t = threading.Thread(target=work_forever, args=(store, stop), kwargs=kwargs, daemon=True)
        t.start()
        threads.append(t)

    yield start
    stop.set()
    for t in threads:
        t.join(timeout=120)


def worker_process(store: Store, node: str, lease_s: float) -> subprocess.Popen:
    """`tunesmith worker` as its own process; `node` stands for the machine it runs on."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TUNESMITH_JOB_LEASE_S=str(lease_s), TUNESMITH_NODE=node)
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "worker", "--data", str(store.dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except OSError:
        return True


# -- item 1 and 10, and the job's run config -----------------------------------------------------
def test_vanished_files_fail_once_and_the_next_job_runs_with_epoch_checkpoints(tmp_path, lm_dir, worker_thread):
    store = new_store(tmp_path, lm_dir)
    gone_row, gone_bytes, good = add_file(store, 12), add_file(store, 12), add_file(store, 12)
    job_row_deleted, job_bytes_deleted = add_job(store, gone_row), add_job(store, gone_bytes)
    job = add_job(store, good, n_epochs=2, batch_size=4)  # 3 steps an epoch, 6 in all; save_every is 5
    store.delete_file(gone_row)  # the file's row and bytes
    (store.dir / "files" / gone_bytes).unlink()  # only its bytes
    worker_thread(store)

    for job_id, file_id in ((job_row_deleted, gone_row), (job_bytes_deleted, gone_bytes)):
        failed = ended(store, job_id, timeout=90)
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "invalid_training_file" and failed["error"]["param"] == "training_file"
        assert file_id in failed["error"]["message"] and "not found" in failed["error"]["message"]
    done = ended(store, job)
    assert done["status"] == "succeeded", done["error"]
    time.sleep(1.0)  # a crash loop would show as more events by now
    for job_id in (job_row_deleted, job_bytes_deleted):
        levels = Counter(e["level"] for e in store.events(job_id))
        assert levels["error"] == 1, messages(store, job_id)
        assert store.job_row(job_id)["owner"] is None and store.get_job(job_id)["status"] == "failed"

    # item 10: a checkpoint at each epoch end (3 and the final 6) besides the periodic one (5), each a model
    ckpts = store.checkpoints(job)
    assert [c["step_number"] for c in ckpts] == [6, 5, 3]
    from tunesmith.adapters import load_adapter
    from tunesmith.models import load_model
    for c in ckpts:
        assert c["fine_tuned_model_checkpoint"] == f"{done['fine_tuned_model']}:ckpt-step-{c['step_number']}"
        assert c["metrics"]["step"] == c["step_number"] and c["metrics"]["train_loss"] > 0
        model = store.get_model(c["fine_tuned_model_checkpoint"])
        assert model is not None and model["base"] == "tiny"
        load_adapter(load_model(str(lm_dir), "causal_lm"), Path(model["path"]) / "adapter")  # chat-able

    # the design point: the job is its run config, which `tunesmith train job.yaml --resume` runs as is
    from tunesmith.config import dump_config, load_config
    run_dir = store.dir / "jobs" / job
    job_cfg, saved = load_config(run_dir / "job.yaml"), load_config(run_dir / "config.yaml")
    assert job_cfg.training.bf16 is None and saved.training.bf16 in (True, False)  # auto, resolved by the hardware
    job_cfg.training.bf16 = saved.training.bf16  # the run records the precision it chose; resume keeps it
    assert job_cfg.training.gradient_checkpointing is None and saved.training.gradient_checkpointing is True  # a LM
    job_cfg.training.gradient_checkpointing = True
    assert dump_config(job_cfg) == dump_config(saved)
    cfg = load_config(run_dir / "job.yaml")
    assert cfg.training.epochs == 2 and cfg.training.batch_size == 4 and cfg.output.dir == str(run_dir)


def test_a_job_shorter_than_the_checkpoint_interval_keeps_its_final_checkpoint(tmp_path, lm_dir, worker_thread):
    store = new_store(tmp_path, lm_dir)
    job = add_job(store, add_file(store, 12), n_epochs=1, batch_size=4)  # 3 steps; save_every is 5
    worker_thread(store)
    done = ended(store, job)
    assert done["status"] == "succeeded", done["error"]
    assert [(c["step_number"], c["fine_tuned_model_checkpoint"]) for c in store.checkpoints(job)] == \
        [(3, f"{done['fine_tuned_model']}:ckpt-step-3")]


# -- item 3 and 11: leases, a dead worker, takeover, resume without duplicates ------------------
def test_a_killed_worker_s_job_is_taken_over_after_its_lease_and_reported_once(tmp_path, lm_dir):
    store = new_store(tmp_path, lm_dir, "training: {save_every: 10}\n")
    job = add_job(store, add_file(store, 40), n_epochs=4, batch_size=1)  # 160 steps, a checkpoint every 10
    lease = 3.0
    a = worker_process(store, "node-a", lease)
    try:
        # kill worker A between checkpoints, with steps reported after the last checkpoint (redone on resume)
        wait_for(lambda: store.checkpoints(job) and 3 <= max(metric_steps(store, job)) % 10 <= 7
                 and max(metric_steps(store, job)) > 10, 120, "a step between checkpoints", every=0.01)
        child = store.job_row(job)["pid"]
        a.send_signal(signal.SIGKILL)
        a.wait()
    finally:
        a.kill()
    row = store.job_row(job)
    assert row["status"] == "running" and row["owner"].startswith("node-a:")
    assert row["lease_until"] > time.time() - 1, "the lease is still A's for a moment"
    wait_for(lambda: not pid_alive(child), 30, "the orphaned training process to stop")
    b = worker_process(store, "node-b", lease)
    try:
        done = ended(store, job, timeout=240)
    finally:
        b.terminate()
        b.wait(timeout=60)
    assert done["status"] == "succeeded", done["error"]
    said = messages(store, job)
    assert sum(m.startswith("Fine-tuning job started") for m in said) == 1
    assert sum("took it over" in m for m in said) == 1
    assert sum(m.startswith("Fine-tuning job resumed from its last checkpoint") for m in said) == 1
    assert metric_steps(store, job) == list(range(1, 161)), "each step's metrics are reported exactly once"
    steps = [c["step_number"] for c in store.checkpoints(job)]
    assert len(steps) == len(set(steps)) and 160 in steps and 40 in steps  # epoch ends; no duplicates


def test_cancel_takes_effect_on_a_job_whose_worker_died(tmp_path, lm_dir, worker_thread):
    """The server-only crash: the job is 'running', held by a dead worker with a dead pid. Cancel must end it
    (at once if the lease has expired, else by the next worker), and it is never trained again."""
    store = new_store(tmp_path, lm_dir)
    held, expired = add_job(store, add_file(store, 12)), add_job(store, add_file(store, 12))
    for job_id, lease in ((held, 2.0), (expired, -1.0)):
        assert store.claim_next_job("node-gone:999999:dead", lease)["id"] == job_id
        store.set_job_control(job_id, pid=999999)
        store.update_job(job_id, status="running")
    assert store.request_control(expired, "cancel")["status"] == "cancelled"  # no live lease: at once
    assert store.request_control(held, "cancel")["status"] == "running"  # the holder may still be alive
    worker_thread(store, lease_s=2)
    assert ended(store, held, timeout=30)["status"] == "cancelled"
    for job_id in (held, expired):
        said = messages(store, job_id)
        assert said.count("Fine-tuning job cancelled") == 1, said
        assert not any("took it over" in m or m.startswith("Fine-tuning job") and "started" in m for m in said)
        assert store.job_row(job_id)["owner"] is None


def test_cancel_stops_a_running_job_and_it_never_succeeds(tmp_path, lm_dir, worker_thread):
    store = new_store(tmp_path, lm_dir)
    job = add_job(store, add_file(store, 40), n_epochs=20, batch_size=1)  # 800 steps: cancelled long before
    worker_thread(store)
    wait_for(lambda: metric_steps(store, job), 120, "the first step")
    assert store.request_control(job, "cancel")["status"] == "running"
    done = ended(store, job, timeout=60)
    assert done["status"] == "cancelled" and done["fine_tuned_model"] is None
    assert max(metric_steps(store, job)) < 800
    time.sleep(0.5)
    assert store.get_job(job)["status"] == "cancelled"
    # and the race at the very end: a cancel requested while the job records success wins
    other = add_job(store, add_file(store, 12))
    store.set_job_control(other, want="cancel")
    assert store.finish_job(other, "succeeded", fine_tuned_model="x") == "cancelled"
    assert store.get_job(other)["fine_tuned_model"] is None
    assert store.finish_job(other, "failed") == "cancelled", "a finished job keeps its status"


# -- item 9: one query per page ---------------------------------------------------------------
def test_lists_are_one_query_per_page(tmp_path, monkeypatch):
    store = Store(tmp_path / "data")
    jobs = []
    for i in range(1000):
        job = {"id": new_id("ftjob-"), "created_at": now(), "status": "queued", "metadata": {"team": "ab"[i % 2]}}
        jobs.append(store.add_job(job)["id"])
    for i in range(30):
        store.add_event(jobs[0], f"event {i}")
        store.add_checkpoint(jobs[0], i, {"step": i}, f"m{i}")
        store.add_file(f"f{i}.jsonl", "fine-tune", b"{}\n")
    opened, statements = [], []
    real_connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        opened.append(db)
        return db

    monkeypatch.setattr(sqlite3, "connect", counting_connect)

    store = Store(store.dir)  # opened after the patch: its statements are counted
    assert len(opened) == 1
    statements.clear()
    page = store.page_jobs(limit=20)
    assert [j["id"] for j in page["data"]] == jobs[::-1][:20] and page["has_more"]
    assert page["first_id"] == jobs[-1] and page["last_id"] == jobs[-20]
    nxt = store.page_jobs(after=page["last_id"], limit=20)
    assert [j["id"] for j in nxt["data"]] == jobs[::-1][20:40]
    team_a = store.page_jobs(metadata={"team": "a"}, limit=1000)
    assert [j["id"] for j in team_a["data"]] == jobs[0::2][::-1] and not team_a["has_more"]
    events = store.page_events(jobs[0], limit=10)
    assert [e["message"] for e in events["data"]] == [f"event {i}" for i in range(29, 19, -1)] and events["has_more"]
    assert [e["message"] for e in store.page_events(jobs[0], after=events["last_id"], limit=100)["data"]][0] == "event 19"
    ckpts = store.page_checkpoints(jobs[0], limit=5)
    assert [c["step_number"] for c in ckpts["data"]] == [29, 28, 27, 26, 25]
    files = store.page_files(limit=3)
    assert [f["filename"] for f in files["data"]] == ["f29.jsonl", "f28.jsonl", "f27.jsonl"]
    assert [f["filename"] for f in store.page_files(limit=2, order="asc")["data"]] == ["f0.jsonl", "f1.jsonl"]
    queries = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(queries) == 8, queries  # eight pages, one query each
    assert len(opened) == 1, "the thread's connection is reused"
    for lister in (store.page_jobs, lambda after: store.page_events(jobs[0], after=after)):
        with pytest.raises(KeyError):
            lister(after="ftjob-nope")
    start = time.perf_counter()
    for job_id in jobs:
        store.get_job(job_id)
    assert time.perf_counter() - start < 1.0, "a thousand retrievals reuse one connection"


def test_a_worker_never_reclaims_a_job_of_a_same_named_host_in_another_container(tmp_path, monkeypatch):
    """Two containers with one host name: each sees the other's worker pid as dead. A job is reclaimed only
    from a dead worker of this node (same host name and process-id namespace)."""
    import socket
    import time as _time

    from tunesmith.service.worker import node_name, reclaim_from_dead_workers, worker_name
    monkeypatch.delenv("TUNESMITH_NODE", raising=False)
    namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    assert node_name() == f"{socket.gethostname()}.pidns{namespace}"  # was the host name alone
    assert worker_name().startswith(node_name() + f":{os.getpid()}:")
    store = Store(tmp_path / "data")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owners = {"ftjob-other": f"{socket.gethostname()}.pidns1:{dead.pid}:abc",  # the other container's worker
              "ftjob-ours": f"{node_name()}:{dead.pid}:abc"}  # a worker of this node that died
    for job_id, owner in owners.items():
        store.add_job({"id": job_id, "created_at": int(_time.time()), "status": "running"})
        store.set_job_control(job_id, owner=owner, lease_until=_time.time() + 600)
    reclaim_from_dead_workers(store)
    assert store.job_row("ftjob-other")["lease_until"] > _time.time()  # still the other container's
    assert store.job_row("ftjob-ours")["lease_until"] == 0  # free for any worker at once
