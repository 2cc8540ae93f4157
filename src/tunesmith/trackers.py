"""Experiment trackers (`output.report_to: [tensorboard, mlflow, trackio]`): each gets the run's config, every
metrics line, the sample replies and the loss plot, written with the tracker's own library.

  tensorboard  event files in RUN/tensorboard (torch.utils.tensorboard); `tensorboard --logdir RUN/tensorboard`
  mlflow       MLFLOW_TRACKING_URI (default: MLflow's own, sqlite:///mlflow.db with artifacts in ./mlruns),
               experiment MLFLOW_EXPERIMENT_NAME (default "tunesmith"), one MLflow run per tunesmith run (a
               resumed run continues its MLflow run: the id is kept in RUN/trackers.json)
  trackio      project TRACKIO_PROJECT (default "tunesmith"), stored in TRACKIO_DIR; `trackio show`

The training loop's metrics log is wrapped (`TrackedMetrics`): metrics.jsonl stays the record of truth and
each line is also sent on, as `train/loss`, `eval/loss`, `train/lr`, ... at its optimizer step. A tracker
that fails to start stops the run before training; one that fails later is reported once and skipped.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "mlflow", "trackio")
STATE_FILE = "trackers.json"  # ids a resumed run needs to continue its trackers' runs


def metric_names(event: str, values: dict) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: {"train/loss": ..}, {"eval/loss": ..} (eval_ prefix dropped)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[len("eval_"):] if event in ("eval", "probe") and key.startswith("eval_") else key
        out[f"{event}/{name}"] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """{"training.lr": "0.0002", ...}: the nested run config as flat text parameters."""
    out = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return out


def samples_markdown(rows: list[dict]) -> str:
    """Sample replies as a markdown table (TensorBoard's text plugin renders markdown)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")
    return "| prompt | reply |\n|---|---|\n" + "".join(f"| {cell(r['prompt'])} | {cell(r['reply'])} |\n" for r in rows)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict, state: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.where = f"tensorboard --logdir {run_dir / 'tensorboard'}"

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("samples", samples_markdown(rows), step)

    def image(self, name: str, path: Path, step: int) -> None:
        import matplotlib.image
        pixels = matplotlib.image.imread(str(path))[..., :3]  # (H, W, 3) floats in [0, 1]
        self.writer.add_image(name, pixels, step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowTracker:
    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, config: dict, state: dict) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param
        self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri())
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunesmith")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = state.get("mlflow_run_id")
        if self.run_id and self._exists(self.run_id):  # a resumed tunesmith run continues its MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                 tags={"tunesmith.run_dir": str(run_dir)}).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        state["mlflow_run_id"] = self.run_id
        self.where = f"MLflow run {self.run_id} ({self.client.tracking_uri}, experiment {experiment})"

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException: a run deleted or from another store
            return False

    def metrics(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def samples(self, step: int, rows: list[dict]) -> None:
        self.client.log_dict(self.run_id, rows, f"samples/step-{step:06d}.json")

    def image(self, name: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class TrackioTracker:
    name = "trackio"

    def __init__(self, run_dir: Path, run_name: str, config: dict, state: dict) -> None:
        import trackio
        self.trackio = trackio
        project = os.environ.get("TRACKIO_PROJECT", "tunesmith")
        with contextlib.redirect_stdout(io.StringIO()):  # its banner; one line of ours says where the run is
            self.run = trackio.init(project=project, name=run_name, config=config, resume="allow",
                                    auto_log_cpu=False, auto_log_gpu=False, embed=False)
        self.where = f"trackio project {project}, run {run_name} (trackio show --project {project})"

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        table = self.trackio.Table(data=[[r["prompt"], r["reply"]] for r in rows], columns=["prompt", "reply"])
        self.run.log({"samples": table}, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.trackio.Image(str(path))}, step=step)

    def close(self, status: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()


KINDS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "trackio": TrackioTracker}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny sqlalchemy alembic", "trackio": "trackio"}


class TrackedMetrics:
    """The run's metrics log, with every line also sent to the trackers (reads go to metrics.jsonl)."""

    def __init__(self, inner: Any, trackers: list, log) -> None:
        self.inner, self.trackers, self.log = inner, trackers, log
        self.failed: set[str] = set()
        self.closed = False

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def write(self, **record) -> None:
        self.inner.write(**record)
        values = metric_names(str(record.get("event", "train")), {k: v for k, v in record.items()
                                                                   if k not in ("event", "step")})
        if values:
            self._each("metrics", int(record.get("step", 0)), values)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        self._each("samples", step, rows)

    def log_image(self, name: str, path: Path, step: int) -> None:
        self._each("image", name, path, step)

    def close(self, status: str = "FINISHED") -> None:
        if not self.closed:
            self.closed = True
            self._each("close", status)

    def _each(self, method: str, *args) -> None:
        for tracker in self.trackers:
            if tracker.name in self.failed:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops a run once it is training
                self.failed.add(tracker.name)
                self.log(f"{tracker.name}: {type(e).__name__}: {e}; no more is sent to it in this run")


def start_trackers(names: list[str], run_dir: Path, run_name: str, config: dict, log=print) -> list:
    """The configured trackers, started (their runs created, the config logged); a missing package is an error
    that says what to install."""
    from .errors import ConfigError
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    trackers = []
    for name in dict.fromkeys(names):
        try:
            trackers.append(KINDS[name](run_dir, run_name, config, state))
        except ImportError as e:
            raise ConfigError(f"output.report_to: {name} needs its package ({e.name} is missing): pip install "
                              f"{PACKAGES[name]} (or 'tunesmith[trackers]')") from None
        log(f"{name}: {trackers[-1].where}")
    if state:
        from .io import atomic_write_text
        atomic_write_text(state_path, json.dumps(state))
    return trackers


def attach_trackers(run) -> None:
    """Wrap the run's metrics log so output.report_to's trackers get every line (rank 0 alone under torchrun)."""
    names = run.cfg.output.report_to
    if not names or (run.dist is not None and not run.dist.is_main):
        return
    from .config import config_to_dict
    trackers = start_trackers(names, run.run_dir, run.run_dir.name, config_to_dict(run.cfg), run.log)
    run.metrics = TrackedMetrics(run.metrics, trackers, run.log)
    atexit.register(run.metrics.close, "KILLED")  # an interrupted or crashed run still closes its tracker runs


def finish_trackers(run, plot: Path | None) -> None:
    """At the end of a run: the loss plot, then each tracker's run closed as finished."""
    metrics = run.metrics
    if not isinstance(metrics, TrackedMetrics):
        return
    if plot is not None:
        metrics.log_image("loss_plot", plot, run.state.step)
    metrics.close("FINISHED")
