"""One fine-tuning job, run in a child process (`python -m tunesmith.service.job JOB_ID DATA_DIR`).

It validates the files, maps OpenAI's hyperparameters onto a RunConfig, and calls the same `train()` that
`tunesmith train` uses, reporting events, metrics and checkpoints to the store as it goes.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import traceback
from pathlib import Path

from .store import Store

MIN_EXAMPLES = 10
AUTO = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}
JOB_CONFIG = "job_config.yaml"  # in the data folder: the server's --job-config, read by every worker
# How jobs train unless the server's --job-config says otherwise. training.lr is the rate at
# learning_rate_multiplier = 1; epochs, batch size, seed and the files always come from the job itself.
JOB_DEFAULTS = {"adapter": {"kind": "lora", "targets": "all-linear", "r": 8, "alpha": 16},
                "data": {"max_length": 512, "eval_fraction": 0},
                "training": {"lr": 2e-4, "log_every": 1, "save_every": 5}}
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


def check_job_config(path: str | Path) -> str:
    """Validate a --job-config YAML up front (unknown keys, bad values, fields the job controls); returns its text."""
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
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"--job-config {path}: {e}") from None
    return text


def validate_file(store: Store, job: dict, field: str) -> tuple[dict | None, int]:
    """(error or None, number of examples) for the job's training/validation file."""
    from ..data import read_records, validate
    from ..data.formats import DataError
    path = store.file_path(job[field])
    records, problems = read_records(path)
    try:
        fmt = validate(records, problems, "auto")
    except DataError as e:
        p = e.problems[0]
        return {"code": f"invalid_{field}", "param": field,
                "message": f"{field.replace('_', ' ').capitalize()} {job[field]} has {len(e.problems)} problem(s). "
                           f"Line {p.line}, {p.field}: {p.message}"}, 0
    if fmt not in ("chat", "prompt_completion"):
        return {"code": f"invalid_{field}", "param": field,
                "message": f"{field} must hold chat ({{\"messages\": [...]}}) or prompt/completion examples, not {fmt}"}, 0
    if field == "training_file" and len(records) < MIN_EXAMPLES:
        return {"code": "invalid_n_examples", "param": field,
                "message": f"Training file has {len(records)} example(s), but must have at least {MIN_EXAMPLES} examples"}, 0
    return None, len(records)


def resolve_hyperparameters(job: dict) -> dict:
    hp = dict(job["method"]["supervised"]["hyperparameters"])
    return {k: (AUTO[k] if hp.get(k, "auto") == "auto" else hp[k]) for k in AUTO}


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


def run(job_id: str, data_dir: str) -> int:
    import yaml
    from ..config import config_from_dict, set_values
    from ..train import StepEvent, train
    store = Store(data_dir)
    job, row = store.get_job(job_id), store.job_row(job_id)
    resume = bool(row["resume"])
    run_dir = store.dir / "jobs" / job_id
    if not resume:
        store.update_job(job_id, status="validating_files")
        store.add_event(job_id, f"Validating training file: {job['training_file']}")
        for field in ("training_file", "validation_file"):
            if job.get(field):
                error, _ = validate_file(store, job, field)
                if error:
                    store.update_job(job_id, status="failed", error=error, finished_at=_now())
                    store.add_event(job_id, error["message"], level="error")
                    return 1
        store.add_event(job_id, "Files validated, moving job to queued state")
        store.update_job(job_id, status="queued")
    hp = resolve_hyperparameters(job)
    method = dict(job["method"])
    method["supervised"] = {"hyperparameters": hp}
    store.update_job(job_id, status="running", hyperparameters=hp, method=method)
    store.add_event(job_id, "Fine-tuning job started" if not resume else "Fine-tuning job resumed from its last checkpoint")
    base_spec = json.loads((store.dir / "bases.json").read_text()).get(job["model"], job["model"])
    server = store.dir / JOB_CONFIG
    defaults = job_defaults(yaml.safe_load(server.read_text()) if server.exists() else None)
    values = {"model.name": base_spec, "data.train": str(store.file_path(job["training_file"])),
              "data.eval": str(store.file_path(job["validation_file"])) if job.get("validation_file") else None,
              "training.epochs": hp["n_epochs"], "training.batch_size": hp["batch_size"],
              "training.lr": float(defaults["training"]["lr"]) * float(hp["learning_rate_multiplier"]),
              "training.seed": job["seed"], "output.dir": str(run_dir), "output.progress": False}
    cfg = config_from_dict(set_values(defaults, values))  # values, never strings to re-parse
    if resume and (run_dir / "config.yaml").exists():  # the settings it started with, even if the server's changed
        from ..config import load_config
        cfg = load_config(run_dir / "config.yaml")
    base_name = job["model"].replace(":", "-")

    parent = os.getppid()

    def on_step(event: StepEvent) -> None:
        if os.getppid() != parent:  # the server died: stop; the restarted server resumes from the last checkpoint
            os._exit(75)
        step, total = event.step, event.total_steps
        step_metrics = {"step": step, "train_loss": event.loss, "train_mean_token_accuracy": event.accuracy}
        if event.eval:
            step_metrics.update(valid_loss=event.eval["eval_loss"], valid_mean_token_accuracy=event.eval["eval_token_accuracy"])
        store.add_event(job_id, f"Step {step}/{total}: training loss={event.loss:.4f}", type_="metrics",
                        data={**step_metrics, "total_steps": total})
        if event.checkpoint:  # like OpenAI's, a checkpoint is a model you can chat with
            from ..adapters import save_adapter
            name = f"{_model_name(job, base_name)}:ckpt-step-{step}"
            folder = run_dir / "checkpoint-models" / f"step-{step}"
            save_adapter(event.model, folder / "adapter", metadata={"task": "causal_lm", "step": str(step)})
            store.add_model(name, job_id, job["model"], str(folder), job.get("organization_id", "user"))
            store.add_checkpoint(job_id, step, step_metrics, name)

    try:
        result = train(cfg, resume=resume, on_step=on_step, log=lambda *_: None)
    except KeyboardInterrupt:
        return 130  # paused or cancelled: the worker records which
    except Exception as e:  # noqa: BLE001 - any failure becomes the job's error, never a silent stop
        store.update_job(job_id, status="failed", finished_at=_now(),
                         error={"code": "training_failed", "message": f"{type(e).__name__}: {e}", "param": None})
        store.add_event(job_id, f"Training failed: {e}", level="error", data={"traceback": traceback.format_exc()[-2000:]})
        return 1
    model_id = _model_name(job, base_name)
    results = store.add_file(f"step_metrics_{job_id}.csv", "fine-tune-results", result_csv(run_dir / "metrics.jsonl"))
    store.add_model(model_id, job_id, job["model"], str(run_dir), job.get("organization_id", "user"))
    store.add_event(job_id, f"New fine-tuned model created: {model_id}")
    store.update_job(job_id, status="succeeded", fine_tuned_model=model_id, finished_at=_now(),
                     result_files=[results["id"]], trained_tokens=result.get("trained_tokens"))
    store.add_event(job_id, "Fine tuning job successfully completed")  # OpenAI's wording
    return 0


def _model_name(job: dict, base: str) -> str:
    return f"ft:{base}:{job.get('organization_id', 'user')}:{job.get('suffix') or ''}:{job['id'][-8:]}"


def _now() -> int:
    import time
    return int(time.time())


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2]))
