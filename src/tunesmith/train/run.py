"""The typed state of a run, and `setup(cfg) -> Run`: everything the loop's small functions share.

Setup decides once what the run is (objective, model, data) and writes it down (config.yaml, run.json);
the loop then only asks the objective and advances `Run.state`, which checkpoints store and resume restores.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import RunConfig, dump_config, load_config
from ..data import PreparedData
from ..devices import autocast, resolve_device
from ..errors import ConfigError, TunesmithError
from ..freeze import ParamSummary, trainable_summary
from ..io import atomic_write_text, check_run_folder_free, is_run_folder, lock_run_folder
from ..models.quantize import quantization_summary
from ..objectives import Objective
from ..runinfo import RunInfo
from .checkpoint import latest_checkpoint, load_checkpoint
from .distributed import start_distributed
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler
from .setup import build, compile_blocks


@dataclass
class Window:
    """What the next metrics line averages over (kept in checkpoints, so a resumed run logs the same lines)."""
    loss_sum: float = 0.0
    count: int = 0
    correct: int | None = 0
    units: int = 0
    extra: dict = field(default_factory=dict)  # the objective's step metrics: name -> [sum, count]

    def add(self, m: "StepMetrics") -> None:
        self.loss_sum += m.loss_sum
        self.count += m.count
        self.units += m.units
        self.correct = None if m.correct is None or self.correct is None else self.correct + m.correct
        add_sums(self.extra, m.extra)


def add_sums(into: dict, sums: dict) -> None:
    """Add {name: (sum, count)} metrics into {name: [sum, count]}."""
    for name, (total, n) in sums.items():
        acc = into.setdefault(name, [0.0, 0])
        acc[0], acc[1] = acc[0] + float(total), acc[1] + int(n)


@dataclass
class TrainState:
    """What a checkpoint stores besides tensors: where the run is, the open metrics window, early stopping."""
    step: int = 0
    best_eval: float | None = None
    bad_evals: int = 0
    trained_tokens: int = 0  # throughput units trained so far (real tokens, or images)
    first_loss: float | None = None  # the first step's loss (summary.json)
    last_eval_step: int = -1  # the step of the latest evaluation: an interrupt may land before a due one
    window: Window = field(default_factory=Window)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        known["window"] = Window(**known.get("window", {}))
        return cls(**known)


@dataclass
class StepMetrics:
    """One optimizer step: summed loss over `count` loss terms, correct predictions (None: no accuracy)."""
    step: int
    loss_sum: float
    count: int
    correct: int | None
    units: int
    seconds: float
    extra: dict = field(default_factory=dict)  # the objective's step metrics: name -> [sum, count]

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
    epoch_end: bool = False  # this step took the last micro-batch of an epoch
    extra: dict[str, float] = field(default_factory=dict)  # the objective's step metrics (DPO's reward margin, ...)


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
    window_start: float = field(default_factory=time.perf_counter)  # throughput of the open metrics window
    rng: dict | None = None  # the RNG state at the start of step `state.step`: what an interrupt checkpoints
    last_record: dict = field(default_factory=dict)  # the last metrics line written
    last_eval: dict = field(default_factory=dict)
    stopped_early: bool = False
    orders: dict = field(default_factory=dict)  # epoch -> batches of example indices (one epoch cached)
    dist: Any = None  # under torchrun: this rank, the world, the wrapped model (train/distributed.py); else None

    def autocast(self):
        return autocast(self.device, self.cfg.training.bf16)


def _check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    import yaml
    # the saved config read as a config: fields added since the run started compare as their defaults
    old = yaml.safe_load(dump_config(load_config(saved)))
    if cfg.data.packing is None:  # chosen by the run when it started (null: by its objective): keep that choice
        cfg.data.packing = (old.get("data") or {}).get("packing")
    if cfg.training.gradient_checkpointing is None:  # likewise; a run from before the field existed had it off
        raw = (yaml.safe_load(saved.read_text()) or {}).get("training") or {}
        cfg.training.gradient_checkpointing = raw.get("gradient_checkpointing") or False
    new = yaml.safe_load(dump_config(cfg))
    _same_paths(old, new, run_dir)
    for section in ("model", "adapter", "data", "objective", "freeze"):
        if old.get(section) != new.get(section):
            before, now = old.get(section) or {}, new.get(section) or {}
            keys = sorted(k for k in {*before, *now} if before.get(k) != now.get(k)) if isinstance(before, dict) \
                and isinstance(now, dict) else []
            changes = "; ".join(f"{section}.{k}: {before.get(k)!r} in the run, {now.get(k)!r} now" for k in keys[:3])
            raise ConfigError(f"--resume: section '{section}' differs from the run's saved {saved} "
                              f"({changes or 'changed'}); resume with the same config: "
                              f"`tunesmith train {run_dir} --resume` uses the saved one")


def _same_paths(old: dict, new: dict, run_dir: Path) -> None:
    """Give `new` the saved value of model.name / data.train / data.eval where both name the same thing: the
    same path written relative to another folder (config.yaml's paths are relative to the folder the run
    started in), or a data file moved since, whose content _check_resume_data compares by hash."""
    from ..data.builtin import is_named_dataset
    from ..runinfo import RUN_JSON, read_run_info
    try:
        info = read_run_info(run_dir) if (run_dir / RUN_JSON).exists() else None
    except TunesmithError:
        info = None  # _check_resume_data reports an unreadable run.json
    started = Path(info.started_in) if info is not None and info.started_in else Path.cwd()
    sources = info.data_sources if info is not None and isinstance(info.data_sources, dict) else {}
    hashed = {k for k, v in sources.items() if isinstance(v, dict) and "sha256" in v}
    for section, key in (("model", "name"), ("data", "train"), ("data", "eval")):
        was, now = (old.get(section) or {}).get(key), (new.get(section) or {}).get(key)
        if was == now or not isinstance(was, str) or not isinstance(now, str) or is_named_dataset(was) \
                or is_named_dataset(now):
            continue
        if (started / was).resolve() == Path(now).resolve() or (section == "data" and key in hashed):
            new[section][key] = was


def _check_resume_data(run_dir: Path, info: RunInfo, data_cfg, read: dict | None = None) -> None:
    """The data read now must give the run the same classes and target scale it trained with: a training file
    edited in place would silently re-map the head's outputs."""
    from ..runinfo import RUN_JSON, read_run_info
    if not (run_dir / RUN_JSON).exists():
        return
    saved = read_run_info(run_dir)
    from ..data.fingerprint import changed_sources, legacy_fingerprint
    try:
        changed = changed_sources(saved.data_sources, info.data_sources)
    except ValueError as e:
        raise ConfigError(f"--resume: {run_dir / RUN_JSON}: {e}") from None
    changed = [k for k in changed if legacy_fingerprint(getattr(data_cfg, k, None), (read or {}).get(k, ()), k)
               != saved.data_sources.get(k)]  # a run hashed the older way
    if changed:
        names = {"train": f"data.train ({data_cfg.train})", "eval": f"data.eval ({data_cfg.eval})",
                 "weak": "a file of data.weak.functions"}
        raise ConfigError(f"--resume: {' and '.join(names.get(k, k) for k in changed)} changed since the run started "
                          f"(the content differs from the hash in {run_dir / RUN_JSON}), so the run would not "
                          + ("evaluate on the same examples" if changed == ["eval"] else "continue on the same examples")
                          + ". Restore it, or start a new run (--overwrite, or another output.dir)")
    for name, was, now in (("objective", saved.objective, info.objective), ("labels", saved.labels, info.labels),
                           ("objective_params", saved.objective_params, info.objective_params)):
        if was != now:
            raise ConfigError(f"--resume: the data now gives {name} {now!r}, but the run trained with {was!r} "
                              f"({run_dir / RUN_JSON}); was the training file changed? Restore it, or start a "
                              "new run")


def prepare_run_folder(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool, log: Callable) -> Path | None:
    """Nothing is overwritten by accident: a folder that holds anything is continued (--resume), replaced
    (--overwrite, only if it is a run; replace_run_folder deletes it once the new run has built) or refused.
    Returns the checkpoint to resume from."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite replaces it: pass one of them")
    check_run_folder_free(run_dir)  # another process training it: resuming or replacing it would wreck both
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume:
        _check_resume_config(run_dir, cfg)
        if (run_dir / "summary.json").exists():
            raise ConfigError(f"{run_dir}: the run has finished, there is nothing to resume; pass --overwrite to "
                              "train it again from the start, or choose another output.dir")
        if checkpoint is None:
            log(f"no checkpoint in {run_dir}/checkpoints; starting from the beginning")
        return checkpoint
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            what = "checkpoints" if checkpoint else ("a finished run" if (run_dir / "summary.json").exists()
                                                     else "files" if not is_run_folder(run_dir) else "a run")
            raise ConfigError(f"{run_dir} already holds {what}; pass --resume to continue it, --overwrite to replace "
                              "it, or choose another output.dir")
        if not is_run_folder(run_dir, strict=True):
            raise ConfigError(f"{run_dir} is not a tunesmith run folder (a run has both config.yaml and run.json), "
                              "so --overwrite will not delete it; choose another output.dir")
        if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
            raise ConfigError(f"output.dir {run_dir} is the current folder or holds it; --overwrite will not delete "
                              "it: choose another output.dir")
        if run_dir.is_symlink():
            raise ConfigError(f"output.dir {run_dir} is a symbolic link (to {run_dir.resolve()}); --overwrite does "
                              "not delete through a link: give the folder itself, or choose another output.dir")
        inside = [f"{key} ({value})" for key, value in (("model.name", cfg.model.name), ("data.train", cfg.data.train),
                                                         ("data.eval", cfg.data.eval))
                  if value and Path(value).exists() and Path(value).resolve().is_relative_to(run_dir.resolve())]
        if inside:
            raise ConfigError(f"--overwrite would delete {run_dir}, but this run reads {' and '.join(inside)} from "
                              "inside it; copy that out first, or choose another output.dir")
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir {run_dir} is a file; choose a folder")
    return None


def replace_run_folder(run_dir: Path, log: Callable) -> None:
    """--overwrite, once the new run's model and data have loaded: a typo in the new config must not have
    cost the old run."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        check_run_folder_free(run_dir)  # again: another process may have started training there meanwhile
        shutil.rmtree(run_dir)
        log(f"--overwrite: removed the previous run in {run_dir}")


def _choose_precision(cfg: RunConfig, built, device, run_dir: Path, checkpoint, log: Callable) -> None:
    """Settle training.bf16 before config.yaml is written: a resumed run keeps its saved choice; a new run
    with bf16: null takes bf16 where the hardware does it natively, if its first batch's loss agrees."""
    from .precision import check_auto_bf16, choose_bf16
    t = cfg.training
    if t.bf16 is None and checkpoint is not None:
        t.bf16 = load_config(run_dir / "config.yaml").training.bf16
    auto = t.bf16 is None
    t.bf16, line = choose_bf16(t.bf16, device)
    log(line)
    needs_attach = type(built.objective).attach is not Objective.attach  # a reference model etc.: not ready yet
    if auto and t.bf16 and built.data.train and built.data.transform is None and not needs_attach:
        t.bf16 = check_auto_bf16(built.model.to(device), built.objective, built.data.train, t.batch_size,
                                 getattr(built.tokenizer, "pad_token_id", None) or 0, device, log)


def setup(cfg: RunConfig, resume: bool = False, log: Callable = print, overwrite: bool = False) -> Run:
    """Check the run folder, build model + data + objective, restore the latest checkpoint when resuming."""
    started = time.perf_counter()
    run_dir, t = Path(cfg.output.dir), cfg.training
    dist = start_distributed(cfg)  # None in one process; under torchrun, rank 0 alone speaks and writes
    if dist is None:
        checkpoint = prepare_run_folder(run_dir, cfg, resume, overwrite, log)
        device = resolve_device(t.device)
    else:
        log = dist.log(log)
        checkpoint, device = dist.on_main(prepare_run_folder, run_dir, cfg, resume, overwrite, log), dist.device
        # a resume settles these from the saved config on rank 0 alone: every rank takes its values
        cfg.data.packing, t.gradient_checkpointing = dist.on_main(lambda: (cfg.data.packing, t.gradient_checkpointing))
    auto_checkpointing = t.gradient_checkpointing is None
    built = build(cfg)  # a config, data or model error leaves no run folder behind to block a retry
    if overwrite:
        replace_run_folder(run_dir, log) if dist is None else dist.on_main(replace_run_folder, run_dir, log)
    if auto_checkpointing:
        log("gradient checkpointing: on (auto, a language-model objective: about half the peak memory for a quarter "
            "less speed; training.gradient_checkpointing=false for speed)" if t.gradient_checkpointing else
            "gradient checkpointing: off (auto: " + ("this model does not support it" if built.info.task == "causal_lm"
                                                     else "not a language-model objective") + ")")
    if checkpoint is not None:
        _check_resume_data(run_dir, built.info, cfg.data, built.data.read)
    _choose_precision(cfg, built, device, run_dir, checkpoint, log)
    if dist is not None:  # every rank trains in rank 0's precision, whatever its own check said
        t.bf16 = dist.on_main(lambda: t.bf16)
    if dist is None or dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_folder(run_dir)  # held until train() returns (released by the caller, or when the process ends)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        built.info.write(run_dir)
    model = built.model.to(device)
    try:
        built.objective.attach(model, built.tokenizer, built.data, run_dir, cfg, log)  # the starting weights
    except BaseException:
        if not resume:  # a new run that could not start leaves no folder behind to block a retry
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    for note in built.data.notes:
        log(f"data: {note}")
    params = trainable_summary(model)
    log(str(params))
    if cfg.model.quantize:
        log(quantization_summary(model))  # base weights nf4: 60 MiB in 210 Linear layers (float32 would be ...)
    if device.type != "cpu":
        log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    batches_per_epoch = math.ceil(len(built.data.train) / t.batch_size)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accum))
    if t.compile:
        log(f"torch.compile: {compile_blocks(model)} (compiled at the first step and at each new "
            "batch shape)")
    if dist is not None:
        model = dist.wrap(model)  # DDP or FSDP2, before the optimizer: FSDP replaces the parameters by their shards
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, total_steps, t)
    state = TrainState()
    if checkpoint is not None:
        state = TrainState.from_dict(load_checkpoint(checkpoint, model, opt, sched))
        log(f"resumed from {checkpoint} (step {state.step} of {total_steps})")
        if state.step > total_steps:  # e.g. resumed with a smaller training.max_steps
            log(f"the checkpoint is already past the {total_steps} steps asked for now: the run finishes at step "
                f"{state.step} without training further")
    metrics = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=state.step if checkpoint else -1) \
        if dist is None or dist.is_main else dist.metrics_log()
    return Run(cfg, run_dir, device, model, built.tokenizer, built.data, built.objective, built.info, opt, sched,
               metrics, params, total_steps, batches_per_epoch, getattr(built.tokenizer, "pad_token_id", None) or 0,
               log, state, checkpoint, started, dist=dist)
