"""The job worker: claims jobs with a lease and runs each in a child process (a crashing job never takes the
server down).

While the child runs, the worker renews the job's lease (its heartbeat). A worker that dies stops renewing, so
the lease expires and any worker may take the job over; the child resumes from its last checkpoint. The child
checks the job at every step: a cancel or pause stops it after a checkpoint, and a job taken over by another
worker makes it exit. A child that exits without finishing its job fails the job once; nothing is retried in
a loop.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from .store import TERMINAL, Store

LEASE_S = float(os.environ.get("TUNESMITH_JOB_LEASE_S", "30"))  # how long a job stays a dead worker's
SIGNAL_AFTER_S = 5.0  # a cancel or pause the child has not acted on by then (a long step or eval) gets SIGINT


def node_name() -> str:
    """$TUNESMITH_NODE, or the host name and the process-id namespace: what tells whether a worker's pid can be
    looked up from here. Containers often share a host name (or run as pid 1) while their pids are apart."""
    if os.environ.get("TUNESMITH_NODE"):
        return os.environ["TUNESMITH_NODE"]
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:  # no /proc (macOS): the host name alone
        return socket.gethostname()
    return f"{socket.gethostname()}.pidns{namespace}"


def worker_name() -> str:
    """NODE:PID:RANDOM (node_name()): workers on one node can tell a dead peer."""
    return f"{node_name()}:{os.getpid()}:{secrets.token_hex(3)}"


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


def _is_job_process(pid: int, job_id: str) -> bool:
    """Whether `pid` is still the training process of `job_id` (not a recycled pid); False where unknowable."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"tunesmith.service.job" in cmdline and job_id.encode() in cmdline


def reclaim_from_dead_workers(store: Store) -> None:
    """Jobs held by a worker on this node whose process is gone: stop the orphaned training process and expire
    the lease now, instead of waiting for it to run out (a restarted server resumes its job at once)."""
    node = node_name()
    for row in store.held_jobs():
        owner_node, _, rest = (row["owner"] or "").partition(":")
        owner_pid = rest.partition(":")[0]
        if owner_node != node or not owner_pid.isdigit() or _alive(int(owner_pid)):
            continue
        if row["pid"] and _is_job_process(row["pid"], row["id"]):
            _kill_tree(row["pid"])  # checkpoints are atomic; a resumed run redoes the lost steps
            for _ in range(50):
                if not _alive(row["pid"]):
                    break
                time.sleep(0.1)
        store.set_job_control(row["id"], lease_until=0)


recover = reclaim_from_dead_workers  # the name the server used before leases


def job_command(job_id: str, data_dir: Path, owner: str, nproc: int = 1) -> list[str]:
    """The job's process: `python -m tunesmith.service.job`, or torchrun running it on `nproc` local processes
    (DDP; --standalone: a rendezvous on a free local port)."""
    job = ["-m", "tunesmith.service.job", job_id, str(data_dir), owner]
    if nproc <= 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *job]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc; just `pid` where there is none). torchrun starts each rank in a
    session of its own, so the job's process group alone would miss them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child)
    return tree


def _kill_tree(pid: int) -> None:
    """SIGKILL the job's processes: each one's group (the job's session; each torchrun rank's), all at once
    (listed first: a rank whose parent died is re-parented and could no longer be found)."""
    for p in process_tree(pid):
        try:
            os.killpg(p, signal.SIGKILL) if os.getpgid(p) == p else os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_one(store: Store, row: dict, owner: str, lease_s: float = LEASE_S, poll: float = 0.2, nproc: int = 1) -> None:
    """Run the claimed job `row` to its end (or until this worker loses its lease), renewing the lease.
    nproc > 1: the job trains on that many processes under torchrun."""
    job_id = row["id"]
    if row["want"] in ("cancel", "pause"):  # asked while no worker held it
        _settle(store, job_id, owner, row["want"])
        return
    if row["status"] == "running":
        store.add_event(job_id, "The server restarted or the worker running this job stopped; another worker took "
                                "it over and resumes it from its last checkpoint", level="warn")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TUNESMITH_WORKER_PID=str(os.getpid()))
    with open(store.dir / "jobs" / f"{job_id}.log", "ab") as log:
        proc = subprocess.Popen(job_command(job_id, store.dir, owner, nproc), stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)  # a Ctrl-C or SIGTERM to the server's group is not the job's
    store.set_job_control(job_id, pid=proc.pid)
    renewed, wanted_since, signalled = time.monotonic(), None, False
    while proc.poll() is None:
        time.sleep(poll)
        try:
            if time.monotonic() - renewed > lease_s / 3:
                if not store.renew_lease(job_id, owner, lease_s):  # another worker holds it now
                    _kill_tree(proc.pid)
                    proc.wait()
                    return
                renewed = time.monotonic()
            want = store.job_row(job_id)["want"]
        except Exception:  # noqa: BLE001 - a busy database: try again at the next poll, the lease has slack
            continue
        wanted_since = (wanted_since or time.monotonic()) if want in ("cancel", "pause") else None
        if wanted_since and not signalled and nproc <= 1 and time.monotonic() - wanted_since > SIGNAL_AFTER_S:
            proc.send_signal(signal.SIGINT)  # the loop saves a checkpoint, then exits
            # (not to torchrun: its ranks would stop at different points; they stop together after the step)
            signalled = True
    row = store.job_row(job_id)
    if row["owner"] != owner:
        return  # taken over while the child ran, or already finished by it
    if row["status"] in TERMINAL:
        store.release_job(job_id, owner)
    elif row["want"] in ("cancel", "pause"):
        _settle(store, job_id, owner, row["want"])
    else:  # the child died without recording an outcome: fail once, never claim it again in a loop
        store.finish_job(job_id, "failed", events=[f"The training process exited with code {proc.returncode}"],
                         error={"code": "worker_crashed", "param": None, "message":
                                f"the training process exited with code {proc.returncode}; see jobs/{job_id}.log"})


def _settle(store: Store, job_id: str, owner: str, want: str) -> None:
    if want == "cancel":
        store.finish_job(job_id, "cancelled")
        return
    store.set_job_control(job_id, want=None, resume=1)
    store.update_job(job_id, status="paused")
    store.add_event(job_id, "Fine-tuning job paused; a checkpoint was saved")
    store.release_job(job_id, owner)


def work_forever(store: Store, stop: threading.Event | None = None, poll: float = 0.3,
                 lease_s: float | None = None, nproc: int = 1) -> None:
    """Claim and run jobs until `stop` is set. lease_s: how long a claimed job stays this worker's without a
    heartbeat (default $TUNESMITH_JOB_LEASE_S or 30 s). nproc: processes each job trains on (torchrun, DDP)."""
    owner, lease_s = worker_name(), lease_s or LEASE_S
    while stop is None or not stop.is_set():
        try:
            reclaim_from_dead_workers(store)
            row = store.claim_next_job(owner, lease_s)
            if row is None:
                time.sleep(poll)
                continue
            run_one(store, row, owner, lease_s, nproc=nproc)
        except Exception:  # noqa: BLE001 - the worker outlives any one job's trouble; the lease covers the job
            traceback.print_exc()
            time.sleep(poll)
