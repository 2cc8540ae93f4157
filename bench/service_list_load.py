"""Load test of the service's read side: a store of 1,000 jobs, a real uvicorn server on loopback, N concurrent
clients listing and retrieving for a bounded time. Prints p50/p99 latency per request kind and the errors.

    python bench/service_list_load.py [--jobs 1000] [--clients 50] [--seconds 20] [--think-ms 0] [--wrk]

Target (issue 12): p99 < 100 ms and zero errors with 1,000 jobs and 50 clients. The server runs without a
worker (nothing trains); each client is a thread with one keep-alive connection, picking a request kind at
random: list jobs, retrieve a job, list a job's events, list its checkpoints, list files. With --think-ms 0
(the default) each client sends its next request as soon as the last is answered (a closed loop: latency is
then 50 / throughput); a think time stands for clients that poll. Python client threads share the GIL
and the 2 cores with the server, so their latency includes their own queueing: `--wrk` drives the same
request mix with wrk (Debian's `wrk`, 50 connections from one C thread) for the server's own latency.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "bench-key"


def fill_store(data: Path, n_jobs: int) -> list[str]:
    """n_jobs jobs shaped as POST /v1/fine_tuning/jobs stores them, each with events and checkpoints."""
    from tunesmith.service.store import Store, new_id, now
    store = Store(data)
    file_id = store.add_file("train.jsonl", "fine-tune", b'{"messages": []}\n')["id"]
    hp = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}
    ids = []
    with store.connect() as db:
        db.execute("BEGIN")
    for i in range(n_jobs):
        job = {"object": "fine_tuning.job", "id": new_id("ftjob-"), "model": "tiny", "created_at": now(),
               "finished_at": now(), "status": "succeeded", "fine_tuned_model": f"ft:tiny:user::{i:08d}",
               "organization_id": "user", "training_file": file_id, "validation_file": None, "result_files": [],
               "trained_tokens": 1234, "hyperparameters": hp, "error": None, "seed": 42, "suffix": None,
               "estimated_finish": None, "integrations": [], "metadata": {"team": f"t{i % 10}"},
               "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        store.add_job(job)
        ids.append(job["id"])
        for step in range(1, 11):
            store.add_event(job["id"], f"Step {step}/10: training loss=1.0", type_="metrics", data={"step": step})
        for step in (5, 10):
            store.add_checkpoint(job["id"], step, {"step": step, "train_loss": 1.0}, f"ft:tiny:user::{i:08d}:ckpt-step-{step}")
    with store.connect() as db:
        db.execute("COMMIT")
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", "--data", str(data), "--host", "127.0.0.1",
                             "--port", str(port), "--api-key", KEY, "--no-worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited at start-up")
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def paths(job_ids: list[str], rng: random.Random) -> tuple[str, str]:
    job = rng.choice(job_ids)
    kind = rng.choice(["list_jobs", "get_job", "events", "checkpoints", "list_files"])
    return kind, {"list_jobs": "/v1/fine_tuning/jobs?limit=20", "get_job": f"/v1/fine_tuning/jobs/{job}",
                  "events": f"/v1/fine_tuning/jobs/{job}/events?limit=20",
                  "checkpoints": f"/v1/fine_tuning/jobs/{job}/checkpoints", "list_files": "/v1/files?limit=20"}[kind]


def client(port: int, job_ids: list[str], until: float, seed: int, out: list, errors: list, think: float) -> None:
    rng, conn = random.Random(seed), http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {KEY}"}
    while time.perf_counter() < until:
        kind, path = paths(job_ids, rng)
        start = time.perf_counter()
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or "object" not in json.loads(body):
                errors.append(f"{kind}: HTTP {resp.status} {body[:200]!r}")
        except Exception as e:  # noqa: BLE001 - every failure is counted and shown
            errors.append(f"{kind}: {type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        out.append((kind, time.perf_counter() - start))
        if think:
            time.sleep(rng.uniform(0.5, 1.5) * think)
    conn.close()


WRK_SCRIPT = """
paths = {}
for line in io.lines(os.getenv("WRK_PATHS")) do paths[#paths + 1] = line end
wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_KEY")
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
"""


def run_wrk(port: int, job_ids: list[str], clients: int, seconds: float, tmp: Path) -> None:
    """The same request mix through wrk; prints wrk's latency distribution (p50 ... p99) and errors."""
    import shutil
    if not shutil.which("wrk"):
        raise SystemExit("--wrk needs wrk (apt-get install wrk)")
    rng = random.Random(0)
    (tmp / "paths.txt").write_text("".join(paths(job_ids, rng)[1] + "\n" for _ in range(5000)))
    (tmp / "mix.lua").write_text(WRK_SCRIPT)
    env = dict(os.environ, WRK_PATHS=str(tmp / "paths.txt"), WRK_KEY=KEY)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", str(tmp / "mix.lua"),
                          f"http://127.0.0.1:{port}"], env=env, capture_output=True, text=True).stdout
    print(out)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--think-ms", type=float, default=0.0, help="mean pause between a client's requests")
    ap.add_argument("--wrk", action="store_true", help="drive the load with wrk instead of Python threads")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        job_ids = fill_store(data, args.jobs)
        port = free_port()
        server = start_server(data, port)
        if args.wrk:
            try:
                return run_wrk(port, job_ids, args.clients, args.seconds, Path(tmp))
            finally:
                server.terminate()
                server.wait(timeout=30)
        try:
            latencies: list[tuple[str, float]] = []
            errors: list[str] = []
            until = time.perf_counter() + args.seconds
            threads = [threading.Thread(target=client, args=(port, job_ids, until, i, latencies, errors, args.think_ms / 1000))
                       for i in range(args.clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{args.jobs} jobs, {args.clients} clients (think {args.think_ms:g} ms), {elapsed:.1f} s: {len(latencies)} requests "
          f"({len(latencies) / elapsed:.0f} req/s), {len(errors)} errors")
    rows = [("all", [s for _, s in latencies])] + [
        (kind, [s for k, s in latencies if k == kind]) for kind in sorted({k for k, _ in latencies})]
    print(f"{'request':>12} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind, values in rows:
        if values:
            print(f"{kind:>12} {len(values):>7} {1000 * percentile(values, 50):>8.1f} {1000 * percentile(values, 99):>8.1f} "
                  f"{1000 * max(values):>8.1f}")
    for e in errors[:5]:
        print("error:", e)
    p99 = percentile([s for _, s in latencies], 99) if latencies else float("inf")
    print(f"target p99 < 100 ms and zero errors: {'met' if p99 < 0.1 and not errors else 'NOT met'}")


if __name__ == "__main__":
    main()
