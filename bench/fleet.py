"""A fleet on one PostgreSQL store: an API server (`serve --no-worker`) and 4 `tunesmith worker` processes, each
standing for its own machine (TUNESMITH_NODE), share one database and one data folder. 20 fine-tuning jobs are
created with the official openai client; the worker running the long first job is killed mid-job (with its
training process, as when a machine dies), and another worker finishes it from its last checkpoint.

Checked, from the store: every job succeeded; each started once ("Fine-tuning job started" once, and only the
killed one "taken over"); each step's metrics were reported exactly once; the killed job resumed from a
checkpoint. Printed: wall time, jobs per worker, the takeover delay.

    python bench/fleet.py                      # starts a throwaway PostgreSQL server from the postgres binaries
    python bench/fleet.py --db postgresql://USER@HOST:PORT/DATABASE   # an empty database of yours
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers: a throwaway PostgreSQL server, tiny chat data

KEY = "fleet-bench-key"


def tiny_base(folder: Path) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer: jobs take seconds, not minutes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", help="an empty PostgreSQL database (default: a throwaway server)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--lease", type=float, default=4.0, help="TUNESMITH_JOB_LEASE_S for the workers (default 4)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import chat_rows, free_port
    from pg_support import LocalServer, fresh_database, postgres_bin

    server, work = None, Path(tempfile.mkdtemp(prefix="tunesmith-fleet-"))
    if args.db is None:
        if postgres_bin() is None:
            raise SystemExit("no PostgreSQL binaries here: pass --db postgresql://... or install Debian's postgresql")
        server = LocalServer(postgres_bin())
    procs: list[subprocess.Popen] = []
    try:
        db = args.db or fresh_database(server.url)
        base, data = tiny_base(work / "base"), work / "shared-data"  # data: the folder every machine mounts
        os.environ["TUNESMITH_JOB_LEASE_S"] = str(args.lease)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--no-worker", "--db", db, "--data",
                                       str(data), "--api-key", KEY, "--model", f"tiny={base}", "--port", str(port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        import openai
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=5)
        wait_for(lambda: _up(client), 120, "the API server")

        def upload(n: int) -> str:
            body = "".join(json.dumps(r) + "\n" for r in chat_rows(n)).encode()
            return client.files.create(file=("train.jsonl", body), purpose="fine-tune").id

        started = time.time()
        long_job = client.fine_tuning.jobs.create(training_file=upload(40), model="tiny",
                                                  hyperparameters={"n_epochs": 1, "batch_size": 1}).id  # 40 steps
        short_file = upload(12)
        jobs = [long_job] + [client.fine_tuning.jobs.create(training_file=short_file, model="tiny",
                                                            hyperparameters={"n_epochs": 1, "batch_size": 4}).id
                             for _ in range(args.jobs - 1)]  # 3 steps each
        workers = {}
        for i in range(args.workers):
            node = f"machine-{i}"  # each worker stands for its own machine: a dead one is noticed by its lease
            workers[node] = subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--data", str(data),
                                              "--db", db, "--model", f"tiny={base}"],
                                             env=dict(env, TUNESMITH_NODE=node), stdout=subprocess.DEVNULL,
                                             stderr=subprocess.STDOUT)
        procs += list(workers.values())

        from tunesmith.service.store import Store
        store = Store(data, db)
        owners: dict[str, set] = defaultdict(set)

        def watch() -> None:  # who holds what, sampled (jobs shorter than a poll may be missed here)
            for job_id in jobs:
                row = store.job_row(job_id)
                if row["owner"]:
                    owners[job_id].add(row["owner"].split(":")[0])

        def steps(job_id: str) -> list[int]:
            return sorted(e["data"]["step"] for e in store.events(job_id) if e["type"] == "metrics")

        def past_a_checkpoint() -> bool:
            watch()
            done = steps(long_job)
            return bool(done) and max(done) >= 7 and bool(store.checkpoints(long_job))

        wait_for(past_a_checkpoint, 400, "the long job to pass its first checkpoint", every=0.05)
        row = store.job_row(long_job)
        victim = row["owner"].split(":")[0]
        killed_at, killed_step = time.time(), max(steps(long_job))
        workers[victim].send_signal(signal.SIGKILL)  # the machine dies: its worker and the training process
        if row["pid"]:
            try:
                os.kill(row["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        workers[victim].wait()
        print(f"killed {victim} while it ran {long_job} at step {killed_step}/40")

        def all_ended() -> bool:
            watch()
            return all(store.get_job(j)["status"] in ("succeeded", "failed", "cancelled") for j in jobs)

        wait_for(all_ended, 900, "every job to end")
        wall = time.time() - started
        return report(store, jobs, long_job, victim, killed_at, owners, wall)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _up(client) -> bool:
    try:
        client.models.list()
        return True
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def report(store, jobs: list[str], long_job: str, victim: str, killed_at: float, owners: dict, wall: float) -> int:
    problems = []
    for job_id in jobs:
        job = store.get_job(job_id)
        said = [e["message"] for e in reversed(store.events(job_id))]
        steps = sorted(e["data"]["step"] for e in store.events(job_id) if e["type"] == "metrics")
        total = 40 if job_id == long_job else 3
        if job["status"] != "succeeded":
            problems.append(f"{job_id}: {job['status']} {job.get('error')}")
        if sum(m.startswith("Fine-tuning job started") for m in said) != 1:
            problems.append(f"{job_id}: started {sum(m.startswith('Fine-tuning job started') for m in said)} times")
        takeovers = sum("took it over" in m for m in said)
        if takeovers != (job_id == long_job):
            problems.append(f"{job_id}: taken over {takeovers} times")
        if steps != list(range(1, total + 1)):
            problems.append(f"{job_id}: steps reported {steps}")
    said = [e for e in reversed(store.events(long_job))]
    took = next(e["created_at"] for e in said if "took it over" in e["message"])
    resumed = [e["message"] for e in said if e["message"].startswith("Fine-tuning job resumed from its last checkpoint")]
    finisher = owners[long_job] - {victim}
    per_worker = Counter(next(iter(o)) for j, o in owners.items() if len(o) == 1)
    print(f"{len(jobs)} jobs on {len(set().union(*owners.values()))} workers in {wall:.1f} s "
          f"({len(jobs) / wall * 60:.1f} jobs/min); jobs seen per worker (sampled): {dict(sorted(per_worker.items()))}")
    print(f"long job: killed on {victim}, taken over {took - killed_at:+.1f} s after the kill (its lease ran out after "
          f"{os.environ['TUNESMITH_JOB_LEASE_S']} s, then the first worker to finish its own job took it) by "
          f"{', '.join(sorted(finisher)) or '?'}, resumed from its checkpoint: {bool(resumed)}; "
          f"status {store.get_job(long_job)['status']}")
    print("each job exactly once (one start, every step reported once, one takeover for the killed job): "
          + ("yes" if not problems else "NO"))
    for p in problems:
        print("  " + p)
    return 1 if problems or not resumed else 0


if __name__ == "__main__":
    sys.exit(main())
