"""The typed state of a run, and `setup(cfg) -> Run`: everything the loop's small functions share.

Setup decides once what the run is (objective, model, data) and writes it down (config.yaml, run.json);
the loop then only asks the objective and advances `Run.state`, which checkpoints store and resume restores.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import RunConfig, dump_config
from ..data import PreparedData
from ..devices import autocast, resolve_device
from ..errors import ConfigError
from ..freeze import ParamSummary, trainable_summary
from ..io import atomic_write_text
from ..objectives import Objective
from ..runinfo import RunInfo
from .checkpoint import latest_checkpoint, load_checkpoint
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler
from .setup import build


@dataclass
class TrainState:
    """What a checkpoint stores besides tensors: where the run is, and the early-stopping record."""
    step: int = 0
    best_eval: float | None = None
    bad_evals: int = 0
    trained_tokens: int = 0  # throughput units trained so far (real tokens, or images)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class StepMetrics:
    """One optimizer step: summed loss over `count` loss terms, correct predictions (None: no accuracy)."""
    step: int
    loss_sum: float
    count: int
    correct: int | None
    units: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / max(self.count, 1)


@dataclass
class StepEvent:
    """What `on_step` receives after every optimizer step. Read `model`, do not change it; an exception
    raised by on_step stops the run as a crash would."""
    step: int
    total_steps: int
    loss: float
    accuracy: float | None  # token accuracy for LMs; None for objectives without one (regression)
    checkpoint: Path | None  # the checkpoint folder written at this step, if any
    eval: dict[str, float] | None  # metrics of an evaluation run at this step, if any
    model: nn.Module


@dataclass
class Window:
    """What the next metrics line averages over."""
    loss_sum: float = 0.0
    count: int = 0
    correct: int | None = 0
    units: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, m: StepMetrics) -> None:
        self.loss_sum += m.loss_sum
        self.count += m.count
        self.units += m.units
        self.correct = None if m.correct is None or self.correct is None else self.correct + m.correct


@dataclass
class Summary:
    steps: int
    total_steps: int
    stopped_early: bool
    first_loss: float | None
    final_loss: float | None
    eval: dict[str, float]
    before: dict[str, float]
    trainable: int
    total_params: int
    seconds: float
    train_seconds: float  # optimizer steps only: no evaluation, checkpoints or setup
    trained_tokens: int
    epochs: float
    saved: str
    plot: str | None
    run_dir: str

    def as_dict(self) -> dict[str, Any]:
        """summary.json: the eval metrics at the top level beside the rest."""
        d = asdict(self)
        metrics = d.pop("eval")
        head = {k: d.pop(k) for k in ("steps", "total_steps", "stopped_early", "first_loss", "final_loss")}
        return {**head, **metrics, **d}


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    model: nn.Module
    tokenizer: Any
    data: PreparedData
    objective: Objective
    info: RunInfo
    opt: torch.optim.Optimizer
    sched: Any
    metrics: MetricsLog
    params: ParamSummary
    total_steps: int
    batches_per_epoch: int
    pad_id: int
    log: Callable
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Path | None = None
    started: float = field(default_factory=time.perf_counter)
    train_seconds: float = 0.0
    window: Window = field(default_factory=Window)
    last_eval: dict = field(default_factory=dict)
    last_eval_step: int = -1
    stopped_early: bool = False
    orders: dict = field(default_factory=dict)  # epoch -> batches of example indices (one epoch cached)

    def autocast(self):
        return autocast(self.device, self.cfg.training.bf16)


def _check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    import yaml
    old, new = yaml.safe_load(saved.read_text()), yaml.safe_load(dump_config(cfg))
    for section in ("model", "adapter", "data", "objective", "freeze"):
        if old.get(section) != new.get(section):
            raise ConfigError(f"--resume: section '{section}' differs from the run's saved {saved}; "
                              "resume with the same config (or start a new output.dir)")


def setup(cfg: RunConfig, resume: bool = False, log: Callable = print) -> Run:
    """Check the run folder, build model + data + objective, restore the latest checkpoint when resuming."""
    started = time.perf_counter()
    run_dir, t = Path(cfg.output.dir), cfg.training
    checkpoint = latest_checkpoint(run_dir) if run_dir.exists() else None
    if checkpoint is not None and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or choose another output.dir")
    if resume:
        _check_resume_config(run_dir, cfg)
        if checkpoint is None:
            log(f"no checkpoint in {run_dir}/checkpoints; starting from the beginning")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    device = resolve_device(t.device)
    built = build(cfg)
    built.info.write(run_dir)
    model = built.model.to(device)
    for note in built.data.notes:
        log(f"data: {note}")
    params = trainable_summary(model)
    log(str(params))
    if device.type != "cpu":
        log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    batches_per_epoch = math.ceil(len(built.data.train) / t.batch_size)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accum))
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, total_steps, t)
    state = TrainState()
    if checkpoint is not None:
        state = TrainState.from_dict(load_checkpoint(checkpoint, model, opt, sched))
        log(f"resumed from {checkpoint} (step {state.step} of {total_steps})")
    metrics = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=state.step if checkpoint else -1)
    return Run(cfg, run_dir, device, model, built.tokenizer, built.data, built.objective, built.info, opt, sched,
               metrics, params, total_steps, batches_per_epoch, getattr(built.tokenizer, "pad_token_id", None) or 0,
               log, state, checkpoint, started)
