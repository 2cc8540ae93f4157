"""The training loop: setup -> train_step ... -> finish, plain functions over a typed `Run`.

One optimizer step = `grad_accum` micro-batches. Losses are summed and divided by the loss-term count of
the whole accumulated batch, so accumulation equals one large batch. Data order is a permutation fixed by
(seed, epoch), and each checkpoint stores weights, optimizer, scheduler, RNG and step, so a resumed run
reaches the same final loss as one never interrupted. What is trained, and how, is the objective's
business (tunesmith.objectives): the loop never looks at the task.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig
from ..data.batching import batches_for_epoch, collate
from ..devices import to_device
from ..errors import TunesmithError
from ..freeze import set_train_mode
from ..io import atomic_write_text, release_run_folder
from .artifacts import save_result
from .checkpoint import capture_rng, latest_checkpoint, prune_checkpoints, save_checkpoint
from .interrupts import interrupts_deferred
from .evaluate import evaluate
from .metrics import plot_losses
from .probe import run_linear_probe
from .run import Run, StepEvent, StepMetrics, Summary, Window, add_sums, setup
from .samples import write_samples
from ..trackers import attach_trackers, finish_trackers


class TrainingDiverged(TunesmithError):
    """The loss became NaN or infinite."""


def micro_batch(run: Run, micro: int) -> dict[str, torch.Tensor]:
    """The `micro`-th micro-batch of the run, on the run's device: the same at any resume."""
    t = run.cfg.training
    epoch, idx = divmod(micro, run.batches_per_epoch)
    if epoch not in run.orders:
        run.orders = {epoch: batches_for_epoch(len(run.data.train), t.batch_size, t.seed, epoch)}
    batch = collate([run.data.train[i] for i in run.orders[epoch][idx]], run.pad_id)
    if run.data.transform is not None:  # e.g. image augmentation, seeded by position
        batch = run.data.transform(batch, torch.Generator().manual_seed(t.seed * 1_000_003 + micro))
    return to_device(batch, run.device)


def train_step(run: Run) -> StepMetrics:
    """One optimizer step over `grad_accum` micro-batches; advances run.state and logs the metrics window.

    An interrupt while gradients accumulate discards them (the step is redone on resume); once the optimizer
    steps, applying, counting and logging the step finish first (interrupts_deferred)."""
    t, obj, start = run.cfg.training, run.objective, time.perf_counter()
    group = [micro_batch(run, run.state.step * t.grad_accum + k) for k in range(t.grad_accum)]
    n_total = sum(obj.count(b) for b in group)
    loss_total, correct, units, extra = 0.0, 0, 0, {}
    for b in group:
        with run.autocast():
            out = obj.forward(run.model, b)
            loss_sum, _ = obj.loss(out, b)
        (loss_sum / max(n_total, 1)).backward()
        loss_total += float(loss_sum.detach())
        c = obj.correct(out.detach(), b)
        correct = None if c is None or correct is None else correct + c
        add_sums(extra, obj.step_metrics(out.detach(), b))
        del out
        units += obj.units(b)
    return apply_step(run, loss_total, n_total, correct, units, extra, start)


def apply_step(run: Run, loss_total: float, n_total: int, correct: int | None, units: int, extra: dict,
               start: float) -> StepMetrics:
    """The gradients of a whole step are in (summed over micro-batches, and under torchrun over ranks): clip,
    step the optimizer and scheduler, count the step and log its metrics."""
    t = run.cfg.training
    if not math.isfinite(loss_total):  # before the optimizer step: the weights stay as the last good step left them
        last = latest_checkpoint(run.run_dir)
        raise TrainingDiverged(f"the loss is {loss_total} at step {run.state.step + 1}: training diverged. Lower "
                               f"training.lr (now {t.lr:g}), keep training.max_grad_norm on, or check the data; "
                               + (f"the last checkpoint, {last}, is intact" if last else
                                  "no checkpoint was saved yet, so there is nothing to resume from"))
    if t.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], t.max_grad_norm)
    with interrupts_deferred():
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        s = run.state
        s.step += 1
        s.trained_tokens += units
        seconds = time.perf_counter() - start
        run.train_seconds += seconds
        m = StepMetrics(s.step, loss_total, n_total, correct, units, seconds, extra)
        if s.first_loss is None:
            s.first_loss = m.loss
        log_window(run, m)
        run.rng = capture_rng()  # the state the next step starts from: what an interrupt from here on saves
    return m


def evaluate_now(run: Run, step: int) -> dict[str, float]:
    """Evaluate on the run's eval set, log it to metrics.jsonl, and return to training mode."""
    t = run.cfg.training
    result = evaluate(run.model, run.data.eval, run.objective, run.pad_id, t.eval_batch_size, bf16=t.bf16)
    set_train_mode(run.model, run.cfg.freeze.batchnorm)
    if result:
        run.metrics.write(event="eval", step=step, **result)
    run.last_eval, run.state.last_eval_step = result, step
    write_samples(run, step)  # training.sample_prompts: greedy replies to samples.jsonl, the console, the trackers
    return result


def log_window(run: Run, m: StepMetrics) -> None:
    """Add the step to the metrics window; every log_every steps write its averages to metrics.jsonl."""
    t, w = run.cfg.training, run.state.window
    w.add(m)
    if m.step % t.log_every and m.step != run.total_steps:
        return
    unit = f"{run.objective.unit}_per_s"
    rec = {"loss": w.loss_sum / max(w.count, 1)}
    if w.correct is not None:
        rec["accuracy"] = w.correct / max(w.count, 1)
    rec.update({"lr": run.sched.get_last_lr()[0], unit: w.units / max(time.perf_counter() - run.window_start, 1e-9),
                "epoch": round(m.step * t.grad_accum / run.batches_per_epoch, 3)})
    rec.update({name: total / max(n, 1) for name, (total, n) in w.extra.items()})  # e.g. DPO's reward margin
    run.metrics.write(event="train", step=m.step, **rec)
    run.last_record = rec
    run.state.window, run.window_start = Window(), time.perf_counter()


def ends_epoch(run: Run, step: int) -> bool:
    """Whether optimizer step `step` (1-based) took the last micro-batch of an epoch."""
    accum = run.cfg.training.grad_accum
    return (step * accum) // run.batches_per_epoch > ((step - 1) * accum) // run.batches_per_epoch


def eval_due(run: Run, step: int) -> bool:
    """Every eval_every steps, or (eval_every 0) when the step finished an epoch."""
    t = run.cfg.training
    if not run.data.eval:
        return False
    return step % t.eval_every == 0 if t.eval_every else ends_epoch(run, step)


def update_early_stop(run: Run, result: dict[str, float]) -> None:
    """Count evaluations without a lower eval loss; set run.stopped_early after `patience` of them."""
    patience, s = run.cfg.training.early_stopping_patience, run.state
    if not patience:
        return
    if s.best_eval is None or result["eval_loss"] < s.best_eval:
        s.best_eval, s.bad_evals = result["eval_loss"], 0
    else:
        s.bad_evals += 1
        run.stopped_early = s.bad_evals >= patience


def checkpoint(run: Run, rng: dict | None = None) -> Path | None:
    if run.dist is not None:  # torchrun: gathered from every rank, written by rank 0 (train/distributed.py)
        from .distributed import save_checkpoint_distributed
        return save_checkpoint_distributed(run, rng)
    folder = save_checkpoint(run.run_dir / "checkpoints" / f"step-{run.state.step}", run.model, run.opt, run.sched,
                             asdict(run.state), rng)
    prune_checkpoints(run.run_dir, run.cfg.training.keep_checkpoints)
    return folder


def start(run: Run) -> dict[str, float]:
    """Before the first step of a new run: the optional linear probe, and the optional evaluation at step 0."""
    t, fresh = run.cfg.training, run.resumed_from is None
    if t.linear_probe_epochs and fresh:
        run_linear_probe(run)
        if run.data.eval:
            probed = evaluate_now(run, 0)
            run.metrics.write(event="probe", step=0, **probed)
            run.log("after linear probing: " + _fmt(probed))
    s = run.state
    if not fresh and eval_due(run, s.step) and s.last_eval_step != s.step:  # interrupted before it: do it now
        update_early_stop(run, evaluate_now(run, s.step))
    before = {}
    if t.eval_at_start and run.data.eval and fresh:
        before = evaluate_now(run, 0)
        run.log("before training: " + _fmt(before))
    elif t.eval_at_start and run.data.eval:  # resumed: the run's own before-training numbers, from metrics.jsonl
        zero = [r for r in run.metrics.read() if r.get("event") == "eval" and r["step"] == 0]
        before = {k: v for k, v in zero[-1].items() if k.startswith("eval_")} if zero else {}
    set_train_mode(run.model, run.cfg.freeze.batchnorm)
    run.window_start = time.perf_counter()  # throughput counts training time from here
    return before


def finish(run: Run, before: dict[str, float]) -> Summary:
    """Final evaluation (unless this step had one), the artifact, run.json, loss.png and summary.json."""
    if run.data.eval and run.state.last_eval_step != run.state.step:
        evaluate_now(run, run.state.step)
    saved, run.info.artifact = save_result(run.run_dir, run.model, run.tokenizer, run.cfg, run.info)
    run.info.write(run.run_dir)
    records = run.metrics.read()
    plot = plot_losses(records, run.run_dir / "loss.png", f"{run.cfg.model.name}: {run.objective.name}")
    finish_trackers(run, plot)  # output.report_to: the loss plot, then each tracker's run closed
    losses = [r["loss"] for r in records if r.get("event") == "train"]
    summary = Summary(run.state.step, run.total_steps, run.stopped_early, run.state.first_loss,
                      losses[-1] if losses else None, run.last_eval, before, run.params.trainable, run.params.total,
                      time.perf_counter() - run.started, run.train_seconds, run.state.trained_tokens,
                      run.state.step * run.cfg.training.grad_accum / run.batches_per_epoch, str(saved),
                      str(plot) if plot else None, str(run.run_dir))
    atomic_write_text(run.run_dir / "summary.json", _json(summary.as_dict()))
    return summary


def train(cfg: RunConfig, resume: bool = False, on_step: Callable[[StepEvent], None] | None = None,
          log: Callable = print, overwrite: bool = False) -> dict:
    """Run a fine-tune described by `cfg`; returns summary.json's content (losses, eval metrics, paths, time).
    `on_step(event)` is called after every optimizer step with a StepEvent. `resume` continues the run in
    output.dir from its latest checkpoint; `overwrite` replaces a previous run there. One process at a time
    trains a run folder (a lock held until this returns)."""
    try:
        return _train(cfg, resume, on_step, log, overwrite)
    finally:
        release_run_folder(cfg.output.dir)


def _train(cfg: RunConfig, resume: bool, on_step: Callable[[StepEvent], None] | None, log: Callable,
           overwrite: bool) -> dict:
    run = setup(cfg, resume, log, overwrite)
    attach_trackers(run)  # output.report_to: every metrics line also goes to tensorboard / mlflow / trackio
    log = run.log  # under torchrun, silent on every rank but 0
    step, finish_run = train_step, finish
    if run.dist is not None:  # torchrun: each rank its share of every batch; rank 0 saves (train/distributed.py)
        from .distributed import finish_distributed, train_step_distributed
        step, finish_run = train_step_distributed, finish_distributed
    before = start(run)
    t = cfg.training
    bar = _progress(run.total_steps, run.state.step, cfg.output.progress)
    say = bar.write if cfg.output.progress else log
    try:
        while run.state.step < run.total_steps:
            run.rng = capture_rng()  # the state a resumed run must start this step from
            m = step(run)
            bar.update(1)
            if m.step % t.log_every == 0 or m.step == run.total_steps:
                bar.set_postfix(_postfix(run.last_record))
            evaluated = None
            if eval_due(run, m.step):
                evaluated = evaluate_now(run, m.step)
                say(f"step {m.step}: " + _fmt(evaluated))
                update_early_stop(run, evaluated)
            saved = checkpoint(run) if t.save_every and m.step % t.save_every == 0 and m.step < run.total_steps else None
            if on_step is not None:
                on_step(StepEvent(m.step, run.total_steps, m.loss, m.accuracy, saved, evaluated, run.model,
                                  ends_epoch(run, m.step), {k: t / max(n, 1) for k, (t, n) in m.extra.items()}))
            if run.stopped_early:
                say(f"early stopping: eval loss has not improved for {t.early_stopping_patience} evaluations")
                break
        bar.close()
        return finish_run(run, before).as_dict()  # inside the try: Ctrl-C in the final evaluation or save loses nothing
    except KeyboardInterrupt:
        bar.close()
        run.opt.zero_grad(set_to_none=True)  # a half-accumulated step is discarded and redone on resume
        checkpoint(run, run.rng)
        plot_losses(run.metrics.read(), run.run_dir / "loss.png", f"{cfg.model.name} (interrupted)")
        log(f"\ninterrupted at step {run.state.step}: checkpoint saved; continue with --resume")
        raise


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _postfix(rec: dict) -> dict[str, str]:
    """The progress bar's view of a metrics line: loss, learning rate, throughput."""
    return {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}",
            **{k: f"{v:.0f}" for k, v in rec.items() if k.endswith("_per_s")}}


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _json(d: dict) -> str:
    import json
    return json.dumps(d, indent=2)
