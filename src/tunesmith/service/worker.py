"""The job worker: claims queued jobs one at a time and runs each in a child process (a crashing job never
takes the server down). Cancel and pause signal the child; Ctrl-C semantics make it checkpoint first."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from .store import Store, now


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def recover(store: Store) -> None:
    """After a restart: a job left 'running' by a dead worker resumes from its last checkpoint."""
    with store.connect() as db:
        rows = db.execute("SELECT id, pid FROM jobs WHERE pid IS NOT NULL").fetchall()
    for r in rows:
        if not _alive(r["pid"]):
            started = (store.dir / "jobs" / r["id"] / "config.yaml").exists()
            store.set_job_control(r["id"], resume=1 if started else 0, pid=None, want=None)
            store.update_job(r["id"], status="queued" if started else "validating_files")
            store.add_event(r["id"], "The server restarted while this job ran; it is queued again and will resume "
                                     "from its last checkpoint", level="warn")


def run_one(store: Store, row: dict, poll: float = 0.2) -> None:
    job_id = row["id"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(store.dir / "jobs" / f"{job_id}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.service.job", job_id, str(store.dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    store.set_job_control(job_id, pid=proc.pid)
    signalled = None
    while proc.poll() is None:
        want = (store.job_row(job_id) or {}).get("want")
        if want in ("cancel", "pause") and signalled is None:
            proc.send_signal(signal.SIGINT)  # the loop saves a checkpoint, then exits
            signalled = want
        time.sleep(poll)
    log.close()
    store.set_job_control(job_id, pid=None)
    if signalled == "cancel":
        store.set_job_control(job_id, want=None, pid=None)
        store.update_job(job_id, status="cancelled", finished_at=now())
        store.add_event(job_id, "Fine-tuning job cancelled")
    elif signalled == "pause":
        store.set_job_control(job_id, want=None, pid=None, resume=1)
        store.update_job(job_id, status="paused")
        store.add_event(job_id, "Fine-tuning job paused; a checkpoint was saved")
    elif store.get_job(job_id)["status"] == "running":  # the child died without reporting
        store.update_job(job_id, status="failed", finished_at=now(), error={
            "code": "worker_crashed", "param": None,
            "message": f"the training process exited with code {proc.returncode}; see jobs/{job_id}.log"})


def work_forever(store: Store, stop: threading.Event | None = None, poll: float = 0.3) -> None:
    recover(store)
    while stop is None or not stop.is_set():
        row = store.claim_next_job(os.getpid())
        if row is None:
            time.sleep(poll)
            continue
        run_one(store, row)
