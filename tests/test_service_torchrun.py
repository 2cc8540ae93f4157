"""A worker that trains each job on several processes (`tunesmith worker --nproc 2`: torchrun, DDP, gloo on
CPUs): the job reaches the losses of a one-process job, pauses and resumes with every rank stopping after the
same step, reports each step once, and a worker killed mid-job leaves no rank behind and has its job finished
by another worker. Real worker and torchrun processes against a real SQLite store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_jobs import add_file, add_job, ended, messages, metric_steps, new_store, pid_alive, wait_for

from tunesmith.service.worker import process_tree

pytestmark = pytest.mark.slow


SLOW_CHECKPOINTS = """
import time
import tunesmith.train.checkpoint as c
write = c.write_checkpoint
def slow(*args, **kwargs):
    time.sleep(2)  # a big model on a slow disk
    return write(*args, **kwargs)
c.write_checkpoint = slow
"""


def worker(store, node: str, nproc: int, lease_s: float = 30, slow_checkpoints: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TUNESMITH_JOB_LEASE_S=str(lease_s), TUNESMITH_NODE=node)
    if slow_checkpoints is not None:  # every process of the job writes its checkpoints slowly
        slow_checkpoints.mkdir(exist_ok=True)
        (slow_checkpoints / "sitecustomize.py").write_text(SLOW_CHECKPOINTS)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(slow_checkpoints), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "worker", "--data", str(store.dir),
                             "--nproc", str(nproc)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if pid_alive(p)]


def losses(store, job_id: str) -> dict[int, float]:
    return {e["data"]["step"]: e["data"]["train_loss"] for e in store.events(job_id) if e["type"] == "metrics"}


def test_a_two_process_job_pauses_resumes_and_matches_one_process(tmp_path, lm_dir):
    store = new_store(tmp_path, lm_dir, "training: {save_every: 2, bf16: false}\n")
    file_id = add_file(store, 16)
    two = add_job(store, file_id, n_epochs=3, batch_size=4)  # 12 steps
    w = worker(store, "node-a", nproc=2, slow_checkpoints=tmp_path / "slow")
    try:
        wait_for(lambda: max(metric_steps(store, two) or [0]) >= 3, 240, "step 3 of the two-process job", every=0.02)
        job_pids = process_tree(store.job_row(two)["pid"])
        assert len(job_pids) >= 3, "torchrun and two ranks"
        store.request_control(two, "pause")
        paused = wait_for(lambda: (j := store.get_job(two))["status"] == "paused" and j, 120, "the pause")
        at = max(metric_steps(store, two))
        assert at < 12, "paused before its end"
        assert not alive(job_pids), "torchrun and every rank stopped"
        # the checkpoint of the step it stopped after is on disk: no rank exited (and so had torchrun stop rank 0)
        # while rank 0 was still writing it
        assert (store.dir / "jobs" / two / "checkpoints" / f"step-{at}" / "state.json").exists(), "the pause's checkpoint"
        assert "ChildFailedError" not in (store.dir / "jobs" / f"{two}.log").read_text()
        store.set_job_control(two, resume=1)  # what POST .../resume does
        store.update_job(two, status="queued")
        assert ended(store, two, timeout=300)["status"] == "succeeded"
    finally:
        stop(w)
    said = messages(store, two)
    assert said.count("Training on 2 processes (torchrun, DDP)") == 2, said  # the first start and the resume
    assert said.count("Fine-tuning job paused; a checkpoint was saved") == 1 and paused["fine_tuned_model"] is None
    assert metric_steps(store, two) == list(range(1, 13)), "each step reported once, by rank 0 alone"

    # the same job in one process: the same losses (DDP averages the two ranks' halves of each batch)
    solo = new_store(tmp_path / "solo", lm_dir, "training: {save_every: 2, bf16: false}\n")
    ref = add_job(solo, add_file(solo, 16), n_epochs=3, batch_size=4)
    w = worker(solo, "node-b", nproc=1)
    try:
        assert ended(solo, ref, timeout=300)["status"] == "succeeded"
    finally:
        stop(w)
    got, want = losses(store, two), losses(solo, ref)
    assert got.keys() == want.keys()
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-4 * max(1.0, abs(want[step])), (step, got[step], want[step])
    from tunesmith.adapters import load_adapter
    from tunesmith.models import load_model
    for c in store.checkpoints(two):  # chat-able checkpoints, written by rank 0
        load_adapter(load_model(str(lm_dir), "causal_lm"), Path(store.get_model(c["fine_tuned_model_checkpoint"])["path"]) / "adapter")


def test_a_killed_worker_leaves_no_rank_behind_and_its_job_is_finished_once(tmp_path, lm_dir):
    store = new_store(tmp_path, lm_dir, "training: {save_every: 4}\n")
    job = add_job(store, add_file(store, 20), n_epochs=6, batch_size=2)  # 60 steps
    lease = 3.0
    a = worker(store, "node-a", nproc=2, lease_s=lease)
    try:
        wait_for(lambda: max(metric_steps(store, job) or [0]) >= 6, 240, "step 6", every=0.02)
        job_pids = process_tree(store.job_row(job)["pid"])
        assert len(job_pids) >= 3, "torchrun and two ranks"
        a.send_signal(signal.SIGKILL)
        a.wait()
    finally:
        a.kill()
    wait_for(lambda: not alive(job_pids), 60, "torchrun and its ranks to stop once their worker is gone")
    b = worker(store, "node-b", nproc=2, lease_s=lease)
    try:
        done = ended(store, job, timeout=300)
    finally:
        stop(b)
    assert done["status"] == "succeeded", done["error"]
    said = messages(store, job)
    assert sum("took it over" in m for m in said) == 1
    assert metric_steps(store, job) == list(range(1, 61)), "each step's metrics reported exactly once"


def test_nproc_settings_that_cannot_work_are_refused_at_start(tmp_path, lm_dir):
    """An FSDP job config for a worker with --nproc, and --nproc on a server without a worker."""
    store = new_store(tmp_path, lm_dir, "distributed: {strategy: fsdp}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "tunesmith.cli", "worker", "--data", str(store.dir), "--nproc", "2"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "distributed.strategy: a worker's --nproc runs jobs with ddp" in p.stderr
    p = subprocess.run([sys.executable, "-m", "tunesmith.cli", "serve", "--data", str(tmp_path / "d"), "--no-auth",
                        "--no-worker", "--nproc", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "pass --nproc to `tunesmith worker` instead" in p.stderr
