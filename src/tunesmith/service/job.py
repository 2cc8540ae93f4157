"""One fine-tuning job, run in a child process (`python -m tunesmith.service.job JOB_ID DATA_DIR [OWNER]`).

The first time, it validates the files and writes the job's complete run config to jobs/<id>/job.yaml; every
time (first start, resume after a pause or crash), it runs that file the way `tunesmith train job.yaml --resume`
does (load_config, then train), reporting events, metrics and checkpoints to the store as it goes. So the
service and the CLI train one way, and a job can be re-run by hand from its folder.

Each step it checks the store: a cancel or pause request stops it (after a checkpoint), and a job another
worker took over (this one's lease expired) makes it exit without writing anything more.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import traceback
from pathlib import Path

from .store import TERMINAL, Store

MIN_EXAMPLES = 10
AUTO = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}
# "auto" per method, over AUTO. Online RL samples completions every step: one epoch unless asked for more.
METHOD_AUTO = {"supervised": {}, "dpo": {"beta": 0.1},
               "reinforcement": {"n_epochs": 1, "compute_multiplier": 1.0, "eval_interval": 1, "eval_samples": 1}}
# What each method trains on, and the objective that trains it
METHOD_FORMATS = {"supervised": ("chat", "prompt_completion"), "dpo": ("preference",), "reinforcement": ("prompt_only",)}
METHOD_OBJECTIVE = {"supervised": "auto", "dpo": "dpo", "reinforcement": "grpo"}
FORMAT_EXAMPLES = {"chat": '{"messages": [...]}', "prompt_completion": '{"prompt": ..., "completion": ...}',
                   "preference": '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}',
                   "prompt_only": '{"messages": [...], "answer": ...} (a prompt and the fields the grader reads)'}
GRADER_FILE = "grader.json"  # in the job's folder: the reinforcement job's grader
PYTHON_GRADERS = "python_graders.enabled"  # in the data folder while the server allows python graders
JOB_RUN_CONFIG = "job.yaml"  # in the job's folder: the complete run config the job trains with
JOB_CONFIG = "job_config.yaml"  # in the data folder: the server's --job-config, read by every worker
# How jobs train unless the server's --job-config says otherwise. training.lr is the rate at
# learning_rate_multiplier = 1; epochs, batch size, seed and the files always come from the job itself.
JOB_DEFAULTS = {"adapter": {"kind": "lora", "targets": "all-linear", "r": 8, "alpha": 16},
                "data": {"max_length": 512, "eval_fraction": 0, "packing": False},  # steps count examples
                "training": {"lr": 2e-4, "log_every": 1, "save_every": 5}}
NPROC_STRATEGY = ("distributed.strategy: a worker's --nproc runs jobs with ddp (an FSDP job cannot save its chat-able "
                  "checkpoints from one rank); remove distributed from the server's --job-config, or run the worker "
                  "without --nproc")
JOB_CONTROLLED = {"model": ("name",), "data": ("train", "eval"), "training": ("epochs", "max_steps", "batch_size", "seed"),
                  "output": ("dir",)}


def job_defaults(extra: dict | None) -> dict:
    """JOB_DEFAULTS with the server's job config laid over it, section by section."""
    merged = {k: dict(v) for k, v in JOB_DEFAULTS.items()}
    for section, values in (extra or {}).items():
        if section == "adapter" and (values is None or isinstance(values, dict) and values.get("kind", "lora") != "lora"):
            merged[section] = values  # another adapter kind: none of the LoRA defaults apply
        elif isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def check_job_config(path: str | Path, nproc: int = 1) -> str:
    """Validate a --job-config YAML up front (unknown keys, bad values, fields the job controls, a strategy
    the worker's --nproc cannot run); returns its text."""
    import yaml
    from ..config import ConfigError, config_from_dict, set_values
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError("expected a mapping of config sections (adapter, data, training, ...)")
        for section, keys in JOB_CONTROLLED.items():
            taken = [k for k in keys if isinstance(data.get(section), dict) and k in data[section]]
            if taken:
                raise ConfigError(f"{section}.{taken[0]}: set by each job (its file, model and hyperparameters), "
                                  "not by the server; remove it")
        cfg = config_from_dict(set_values(job_defaults(data), {"data.train": "check.jsonl"}))
        if cfg.adapter is None:
            raise ConfigError("adapter: the service serves fine-tuned models as adapters on a shared base model; "
                              "full fine-tuning is `tunesmith train`'s job")
        if nproc > 1 and cfg.distributed.strategy != "ddp":
            raise ConfigError(NPROC_STRATEGY)
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"--job-config {path}: {e}") from None
    return text


def validate_file(store: Store, job: dict, field: str) -> tuple[dict | None, int]:
    """(error or None, number of examples) for the job's training/validation file."""
    from ..data import read_records, validate
    from ..data.formats import DataError
    path = store.file_path(job[field])
    records, problems = read_records(path)
    wanted = METHOD_FORMATS[job["method"]["type"]]
    try:
        fmt = validate(records, problems, "auto" if len(wanted) > 1 else wanted[0])
    except DataError as e:
        p = e.problems[0]
        return {"code": f"invalid_{field}", "param": field,
                "message": f"{field.replace('_', ' ').capitalize()} {job[field]} has {len(e.problems)} problem(s). "
                           f"Line {p.line}, {p.field}: {p.message}"}, 0
    if fmt not in wanted:
        shapes = " or ".join(FORMAT_EXAMPLES[f] for f in wanted)
        return {"code": f"invalid_{field}", "param": field,
                "message": f"{field} of a {job['method']['type']} job must hold {shapes} examples, not {fmt}"}, 0
    if field == "training_file" and len(records) < MIN_EXAMPLES:
        return {"code": "invalid_n_examples", "param": field,
                "message": f"Training file has {len(records)} example(s), but must have at least {MIN_EXAMPLES} examples"}, 0
    return None, len(records)


def resolve_hyperparameters(job: dict) -> dict:
    """The method's hyperparameters with every "auto" resolved (what the job trains with and reports)."""
    kind = job["method"]["type"]
    hp = dict(job["method"][kind]["hyperparameters"])
    auto = {**AUTO, **METHOD_AUTO[kind]}
    return {k: (auto[k] if v == "auto" and k in auto else v) for k, v in {**dict.fromkeys(AUTO, "auto"), **hp}.items()}


def method_values(store: Store, job: dict, hp: dict) -> dict:
    """Config values of the job's method: the objective and its settings (a reinforcement job's grader is
    written to the job's folder and scored by tunesmith.graders)."""
    kind = job["method"]["type"]
    values = {"objective.type": METHOD_OBJECTIVE[kind]}
    if kind == "dpo":
        values["objective.beta"] = float(hp["beta"])
    if kind == "reinforcement":
        from ..io import atomic_write_text
        grader = store.dir / "jobs" / job["id"] / GRADER_FILE
        grader.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(grader, json.dumps(job["method"]["reinforcement"]["grader"]))
        values.update({"objective.graders": [str(grader)], "objective.reward_funcs": None,
                       "objective.num_generations": max(2, round(4 * float(hp["compute_multiplier"])))})
    return values


def result_csv(metrics_path: Path) -> bytes:
    """OpenAI's result file: step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = {r["step"]: r for r in rows if r.get("event") == "eval"}
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"])
    for r in (r for r in rows if r.get("event") == "train"):
        e = evals.get(r["step"], {})
        w.writerow([r["step"], r["loss"], r.get("accuracy", ""), e.get("eval_loss", ""), e.get("eval_token_accuracy", "")])
    return out.getvalue().encode()


def job_run_config(store: Store, job: dict, hp: dict):
    """The job's complete RunConfig: the server's job config (or JOB_DEFAULTS) with the job's model, files
    and hyperparameters set as values."""
    import yaml
    from ..config import config_from_dict, set_values
    base_spec = json.loads((store.dir / "bases.json").read_text()).get(job["model"], job["model"])
    server = store.dir / JOB_CONFIG
    defaults = job_defaults(yaml.safe_load(server.read_text()) if server.exists() else None)
    values = {"model.name": base_spec, "data.train": str(store.file_path(job["training_file"])),
              "data.eval": str(store.file_path(job["validation_file"])) if job.get("validation_file") else None,
              "training.epochs": hp["n_epochs"], "training.batch_size": hp["batch_size"],
              "training.lr": float(defaults["training"]["lr"]) * float(hp["learning_rate_multiplier"]),
              "training.seed": job["seed"], "output.dir": str(store.dir / "jobs" / job["id"]), "output.progress": False,
              **method_values(store, job, hp)}
    return config_from_dict(set_values(defaults, values))  # values, never strings to re-parse


def missing_file(store: Store, job: dict) -> dict | None:
    """OpenAI's error object for a training/validation file deleted (row or bytes) since the job was created."""
    for field in ("training_file", "validation_file"):
        file_id = job.get(field)
        if not file_id:
            continue
        try:
            present = store.file_path(file_id).is_file()
        except KeyError:
            present = False
        if not present:
            what = field.replace("_", " ").capitalize()
            return {"code": f"invalid_{field}", "param": field,
                    "message": f"{what} {file_id} was not found: it was deleted after the job was created. Upload "
                               "it again and create a new job with the new file id."}
    return None


def stop_wanted(row: dict) -> bool:
    """A cancel or pause was asked for, or the job was ended (cancelled) while nothing ran it."""
    return row["want"] in ("cancel", "pause") or row["status"] in TERMINAL


class Reporter:
    """on_step for train(): metrics events, chat-able checkpoints at each epoch end and each saved training
    checkpoint, and the per-step look at the store (lost lease: exit; cancel or pause: stop). Under torchrun
    (a worker's --nproc), rank 0 alone reads and writes the store and every rank acts on its decision, so all
    stop after the same step."""

    def __init__(self, store: Store, job: dict, owner: str | None) -> None:
        self.store, self.job, self.owner = store, job, owner
        self.run_dir = store.dir / "jobs" / job["id"]
        # the worker: this process's parent, or torchrun's (it says so in $TUNESMITH_WORKER_PID)
        self.worker = int(os.environ.get("TUNESMITH_WORKER_PID") or os.getppid())
        self.direct = self.worker == os.getppid()
        self.last_metrics: dict | None = None
        self.stopping = False  # a cancel or pause stops the job (not a signal)

    def worker_alive(self) -> bool:
        if os.getppid() == self.worker:
            return True
        from .worker import _alive
        return not self.direct and _alive(self.worker)  # a direct child is re-parented when its worker dies

    def still_ours(self, row: dict | None = None) -> bool:
        if not self.worker_alive():  # the worker died: another worker resumes the job once its lease expires
            return False
        row = row or self.store.job_row(self.job["id"])
        return self.owner is None or row["owner"] == self.owner

    def __call__(self, event) -> None:
        from ..train.distributed import on_main_process
        decision = on_main_process(self.report, event)
        if decision == "lost":
            os._exit(75)  # write nothing more: the job belongs to another worker now
        if decision == "stop":
            self.stopping = True  # every rank, after the same step
            raise KeyboardInterrupt  # train() saves a checkpoint and re-raises; the worker records which

    def report(self, event) -> str:
        """The step's events and checkpoint model; "go", "stop" (cancel or pause asked) or "lost"."""
        row = self.store.job_row(self.job["id"])  # one read a step: who holds the job, and what is asked of it
        if not self.still_ours(row):
            return "lost"
        job_id, step, total = self.job["id"], event.step, event.total_steps
        metrics = {"step": step, "train_loss": event.loss, "train_mean_token_accuracy": event.accuracy,
                   **{f"train_{k}": v for k, v in event.extra.items()}}  # DPO's reward margin, RL's mean reward
        if event.eval:  # every objective's held-out numbers: SFT's token accuracy, DPO's pair accuracy and margin, ...
            metrics.update({"valid_mean_token_accuracy" if k == "eval_token_accuracy" else f"valid_{k[5:]}": v
                            for k, v in event.eval.items() if k.startswith("eval_") and isinstance(v, (int, float))})
        self.store.add_event(job_id, f"Step {step}/{total}: training loss={event.loss:.4f}", type_="metrics",
                             data={**metrics, "total_steps": total})
        self.last_metrics = metrics
        if step < total and (event.checkpoint or event.epoch_end):
            self.save_checkpoint_model(event.model, step, metrics)  # the final one is the job's own model
        return "stop" if stop_wanted(row) else "go"  # after this step is recorded: its checkpoint and events agree

    def save_checkpoint_model(self, model, step: int, metrics: dict) -> None:
        """Like OpenAI's, a checkpoint is a model you can chat with: `ft:...:ckpt-step-N`."""
        from ..adapters import save_adapter
        folder = self.run_dir / "checkpoint-models" / f"step-{step}"
        save_adapter(model, folder / "adapter", metadata={"task": "causal_lm", "step": str(step)})
        self.add_checkpoint(step, metrics, folder)

    def add_checkpoint(self, step: int, metrics: dict, folder: Path) -> None:
        name = f"{_model_name(self.job)}:ckpt-step-{step}"
        self.store.add_model(name, self.job["id"], self.job["model"], str(folder), self.job.get("organization_id", "user"))
        self.store.add_checkpoint(self.job["id"], step, metrics, name)


def fail(store: Store, job_id: str, error: dict, data: dict | None = None) -> int:
    if store.finish_job(job_id, "failed", error=error) == "failed":
        store.add_event(job_id, error["message"], level="error", data=data)
    return 1


def prepare(store: Store, job: dict) -> Path | None:
    """First start: validate the files and write the job's run config; returns None if the job failed."""
    job_id, path = job["id"], store.dir / "jobs" / job["id"] / JOB_RUN_CONFIG
    store.update_job(job_id, status="validating_files")
    store.add_event(job_id, f"Validating training file: {job['training_file']}")
    for field in ("training_file", "validation_file"):
        if job.get(field):
            error, _ = validate_file(store, job, field)
            if error:
                fail(store, job_id, error)
                return None
    store.add_event(job_id, "Files validated, moving job to queued state")
    store.update_job(job_id, status="queued")
    from ..config import dump_config
    from ..io import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump_config(job_run_config(store, job, resolve_hyperparameters(job))))
    return path


def train_job(store: Store, job: dict, config_path: Path, reporter: Reporter) -> dict:
    """`tunesmith train job.yaml --resume`, reporting to the store: resumes from the last checkpoint when there
    is one (dropping the events and checkpoints of the steps it will redo); a run that already finished
    (the job crashed while recording it) is not trained again."""
    from ..config import load_config
    from ..train import train
    from ..train.checkpoint import latest_checkpoint
    from ..train.distributed import on_main_process
    run_dir = config_path.parent
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    checkpoint = latest_checkpoint(run_dir)
    on_main_process(store.rewind_job, job["id"], int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    from .. import io
    io.RUN_LOCKS = False  # this process is the job's: the store's lease already makes it the only one
    return train(load_config(config_path), resume=True, on_step=reporter)


def run(job_id: str, data_dir: str, owner: str | None = None) -> int:
    """The job's whole life in this process; any failure becomes the job's error (it fails once, never loops).
    Under torchrun every rank runs this; rank 0 alone writes to the store."""
    from ..train.distributed import is_main_process, join_process_group
    join_process_group()
    store = Store(data_dir)
    job = store.get_job(job_id)
    try:
        return _run(store, job, owner)
    except KeyboardInterrupt:
        return 130  # paused or cancelled: the worker records which
    except Exception as e:  # noqa: BLE001 - any failure becomes the job's error, never a silent stop or a retry
        if not is_main_process():
            return 1  # rank 0 records it
        # the traceback is the operator's (server paths, code): in the job folder and the worker's log, never
        # in what API clients read
        from ..io import atomic_write_text
        trace = traceback.format_exc()
        print(f"job {job_id} failed:\n{trace}", file=sys.stderr, flush=True)
        try:
            atomic_write_text(store.dir / "jobs" / job_id / "error.log", trace)
        except OSError:
            pass
        return fail(store, job_id, {"code": "training_failed", "message": f"{type(e).__name__}: {e}", "param": None})


def _run(store: Store, job: dict, owner: str | None) -> int:
    import torch.distributed as dist

    from ..train.distributed import on_main_process
    reporter = Reporter(store, job, owner)
    config_path = store.dir / "jobs" / job["id"] / JOB_RUN_CONFIG
    code = on_main_process(begin, store, job, config_path)
    if code is not None:
        return code
    try:
        result = train_job(store, job, config_path, reporter)
    except KeyboardInterrupt:
        if not (reporter.stopping and dist.is_initialized()):
            raise
        # a cancel or pause, on every rank after the same step: rank 0 gets here once its checkpoint is on disk,
        # and no rank may exit before (torchrun stops the other ranks as soon as one exits)
        dist.barrier()
        return 0  # a normal end under torchrun (130 would read as a failed rank); the worker records which
    return on_main_process(lambda: 75 if not reporter.still_ours() else succeed(store, job, result, reporter))


def begin(store: Store, job: dict, config_path: Path) -> int | None:
    """Checks, the first start's preparation and the "running" status; an exit code if the job ends here."""
    job_id = job["id"]
    error = missing_file(store, job)
    if error:
        return fail(store, job_id, error)
    hp = resolve_hyperparameters(job)
    grader = job["method"].get("reinforcement", {}).get("grader") if job["method"]["type"] == "reinforcement" else None
    from ..graders import uses_python
    if uses_python(grader) and not (store.dir / PYTHON_GRADERS).exists():
        return fail(store, job_id, {"code": "python_graders_disabled", "param": "method.reinforcement.grader",
                                    "message": "This job's grader runs Python code, and the server no longer allows "
                                               "it (start `tunesmith serve --allow-python-graders`)"})
    resumed = config_path.exists()
    if not resumed and prepare(store, job) is None:
        return 1
    if stop_wanted(store.job_row(job_id)):
        return 130
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from ..config import load_config
        if load_config(config_path).distributed.strategy != "ddp":
            return fail(store, job_id, {"code": "unsupported_distributed", "param": None, "message": NPROC_STRATEGY})
    kind = job["method"]["type"]
    store.update_job(job_id, status="running", hyperparameters={k: hp[k] for k in AUTO},
                     method={**job["method"], kind: {**job["method"][kind], "hyperparameters": hp}})
    store.add_event(job_id, "Fine-tuning job resumed from its last checkpoint" if resumed else "Fine-tuning job started")
    if world > 1:
        store.add_event(job_id, f"Training on {world} processes (torchrun, DDP)")
    return None


def succeed(store: Store, job: dict, result: dict, reporter: Reporter) -> int:
    """The final checkpoint (the job's model itself), the result file, the model, and 'succeeded' — unless a
    cancel came first."""
    job_id, run_dir = job["id"], store.dir / "jobs" / job["id"]
    step = result["steps"]
    if not any(c["step_number"] == step for c in store.checkpoints(job_id)):
        metrics = reporter.last_metrics if (reporter.last_metrics or {}).get("step") == step else \
            {"step": step, "train_loss": result.get("final_loss")}
        reporter.add_checkpoint(step, metrics, run_dir)
    model_id = _model_name(job)
    results = store.add_file(f"step_metrics_{job_id}.csv", "fine-tune-results", result_csv(run_dir / "metrics.jsonl"))
    store.add_model(model_id, job_id, job["model"], str(run_dir), job.get("organization_id", "user"))
    status = store.finish_job(job_id, "succeeded", events=[f"New fine-tuned model created: {model_id}",
                                                            "Fine tuning job successfully completed"],  # OpenAI's wording
                              fine_tuned_model=model_id, result_files=[results["id"]],
                              trained_tokens=result.get("trained_tokens"))
    if status != "succeeded":
        store.delete_model(model_id)
    return 0


def _model_name(job: dict) -> str:
    base = job["model"].replace(":", "-")
    return f"ft:{base}:{job.get('organization_id', 'user')}:{job.get('suffix') or ''}:{job['id'][-8:]}"


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
