"""The training loop: readable in one sitting. setup -> train -> save, with exact resume.

One optimizer step = `grad_accum` micro-batches. Losses are summed and divided by the label count of the
whole accumulated batch, so accumulation equals one large batch. Data order is a permutation fixed by
(seed, epoch), and each checkpoint stores weights, optimizer, scheduler, RNG and step, so a resumed run
reaches the same final loss as one never interrupted.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig, dump_config
from ..devices import autocast as autocast_on, resolve_device, to_device
from ..errors import ConfigError
from ..freeze import set_train_mode, trainable_summary
from ..io import atomic_write_text
from ..objectives import classification_loss_sum, lm_loss_sum, lm_token_correct
from ..data.batching import batches_for_epoch, collate
from ..vision.data import augment
from .artifacts import save_result
from .checkpoint import capture_rng, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .evaluate import evaluate, forward
from .metrics import MetricsLog, plot_losses
from .optim import build_optimizer, build_scheduler
from .probe import linear_probe
from .setup import build


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


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


def train(cfg: RunConfig, resume: bool = False, on_step: Callable[[int, dict], None] | None = None,
          log: Callable = print) -> dict:
    """Run a fine-tune described by `cfg`. Returns a summary (losses, eval metrics, paths, time).

    on_step(step, info) is called after every optimizer step; info holds this step's 'loss' and 'accuracy'
    (token accuracy for LMs), 'total_steps', 'checkpoint' (the folder) when one was written, 'eval' (metrics)
    when an evaluation ran at this step, and 'model' (read it, do not change it). An exception from it stops
    the run (as a crash would).
    """
    run_dir = Path(cfg.output.dir)
    t = cfg.training
    checkpoint = latest_checkpoint(run_dir) if run_dir.exists() else None
    if checkpoint is not None and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or choose another output.dir")
    if resume:
        _check_resume_config(run_dir, cfg)
        if checkpoint is None:
            log(f"no checkpoint in {run_dir}/checkpoints; starting from the beginning")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    start = time.perf_counter()
    device = resolve_device(t.device)
    s = build(cfg)
    model, data, task = s.model, s.data, s.task
    model.to(device)
    pad_id = getattr(s.tokenizer, "pad_token_id", None) or 0
    for note in data.notes:
        log(f"data: {note}")
    summary = trainable_summary(model)
    log(str(summary))
    if device.type != "cpu":
        log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    batches_per_epoch = math.ceil(len(data.train) / t.batch_size)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accum))
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, total_steps, t)
    state = {"step": 0, "best_eval": None, "bad_evals": 0}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, opt, sched)
        log(f"resumed from {checkpoint} (step {state['step']} of {total_steps})")
    metrics = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=state["step"] if checkpoint else -1)
    loss_fn = (lambda lg, b: classification_loss_sum(lg, b["label"], cfg.objective.label_smoothing)) \
        if task == "classification" else (lambda lg, b: lm_loss_sum(lg, b["labels"]))
    correct_fn = (lambda lg, b: int((lg.argmax(-1) == b["label"]).sum())) \
        if task == "classification" else (lambda lg, b: lm_token_correct(lg, b["labels"]))
    autocast = autocast_on(device, t.bf16)
    orders: dict[int, list[list[int]]] = {}

    def micro_batch(micro: int) -> dict[str, torch.Tensor]:
        epoch, idx = divmod(micro, batches_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batches_for_epoch(len(data.train), t.batch_size, t.seed, epoch)
        batch = collate([data.train[i] for i in orders[epoch][idx]], pad_id)
        if "pixel_values" in batch and cfg.data.augment != "none":  # seeded by position: resume sees the same
            g = torch.Generator().manual_seed(t.seed * 1_000_003 + micro)
            batch["pixel_values"] = augment(batch["pixel_values"], cfg.data.augment, g)
        return to_device(batch, device)

    unit_name = "images_per_s" if data.fmt == "image" else "tokens_per_s"

    def units(b) -> int:
        """Throughput units in a batch: images, or real (non-padding) tokens."""
        if "pixel_values" in b:
            return b["pixel_values"].shape[0]
        return int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()

    def count(b) -> int:
        return b["label"].numel() if task == "classification" else int((b["labels"][:, 1:] != -100).sum())

    def do_eval(step: int) -> dict:
        result = evaluate(model, data.eval, task, pad_id, t.eval_batch_size, len(data.labels) if data.labels else None,
                          bf16=t.bf16)
        set_train_mode(model, cfg.freeze.batchnorm)
        if result:
            metrics.write(event="eval", step=step, **result)
        return result

    def checkpoint_now(rng=None) -> Path:
        folder = save_checkpoint(run_dir / "checkpoints" / f"step-{state['step']}", model, opt, sched, state, rng)
        prune_checkpoints(run_dir, t.keep_checkpoints)
        return folder

    if t.linear_probe_epochs and checkpoint is None:
        from safetensors.torch import save_file
        probe = linear_probe(model, data.train, pad_id, t.linear_probe_epochs, t.head_lr or 10 * t.lr,
                             t.batch_size, t.seed, t.weight_decay)
        save_file({k: v.cpu().contiguous() for k, v in probe.items()}, str(run_dir / "probe_head.safetensors"))
        if data.eval:
            probed = do_eval(0)
            metrics.write(event="probe", step=0, **probed)
            log("after linear probing: " + ", ".join(f"{k}={v:.4f}" for k, v in probed.items()))
    before = {}
    if t.eval_at_start and data.eval and checkpoint is None:
        before = do_eval(0)
        log("before training: " + ", ".join(f"{k}={v:.4f}" for k, v in before.items()))
    set_train_mode(model, cfg.freeze.batchnorm)
    bar = _progress(total_steps, state["step"], cfg.output.progress)
    def new_window() -> dict:  # what the next metrics line averages over
        return {"loss": 0.0, "count": 0, "units": 0, "correct": 0, "start": time.perf_counter()}

    window = new_window()
    last_eval: dict = {}
    last_eval_step = -1
    stopped_early = False
    rng = capture_rng()
    train_seconds = 0.0  # optimizer steps only: no evaluation, checkpoints or setup
    try:
        while state["step"] < total_steps:
            step_start = time.perf_counter()
            rng = capture_rng()  # the state a resumed run must start this step from
            step = state["step"]
            group = [micro_batch(step * t.grad_accum + k) for k in range(t.grad_accum)]
            n_total = sum(count(b) for b in group)
            group_loss, group_correct = 0.0, 0
            for b in group:
                with autocast:
                    logits = forward(model, b, task)
                    loss_sum, _ = loss_fn(logits, b)
                (loss_sum / max(n_total, 1)).backward()
                group_loss += float(loss_sum.detach())
                group_correct += correct_fn(logits.detach(), b)
                del logits
                n_units = units(b)
                window["units"] += n_units
                state["trained_tokens"] = state.get("trained_tokens", 0) + n_units
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step + 1
            train_seconds += time.perf_counter() - step_start
            window["loss"] += group_loss
            window["count"] += n_total
            window["correct"] += group_correct
            bar.update(1)
            if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                elapsed = time.perf_counter() - window["start"]
                rec = {"loss": window["loss"] / max(window["count"], 1),
                       "accuracy": window["correct"] / max(window["count"], 1), "lr": sched.get_last_lr()[0],
                       unit_name: window["units"] / max(elapsed, 1e-9),
                       "epoch": round(state["step"] * t.grad_accum / batches_per_epoch, 3)}
                metrics.write(event="train", step=state["step"], **rec)
                bar.set_postfix({"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", unit_name: f"{rec[unit_name]:.0f}"})
                window = new_window()
            epoch_end = (state["step"] * t.grad_accum) // batches_per_epoch > (step * t.grad_accum) // batches_per_epoch
            if data.eval and ((t.eval_every and state["step"] % t.eval_every == 0) or (not t.eval_every and epoch_end)):
                last_eval, last_eval_step = do_eval(state["step"]), state["step"]
                bar.write(f"step {state['step']}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
                if t.early_stopping_patience:
                    if state["best_eval"] is None or last_eval["eval_loss"] < state["best_eval"]:
                        state["best_eval"], state["bad_evals"] = last_eval["eval_loss"], 0
                    else:
                        state["bad_evals"] += 1
                        if state["bad_evals"] >= t.early_stopping_patience:
                            stopped_early = True
            saved_ckpt = None
            if t.save_every and state["step"] % t.save_every == 0 and state["step"] < total_steps:
                saved_ckpt = checkpoint_now()
            if on_step is not None:
                on_step(state["step"], {"loss": group_loss / max(n_total, 1), "accuracy": group_correct / max(n_total, 1),
                                        "total_steps": total_steps, "checkpoint": saved_ckpt, "model": model,
                                        "eval": last_eval if last_eval_step == state["step"] else None})
            if stopped_early:
                bar.write(f"early stopping: eval loss has not improved for {t.early_stopping_patience} evaluations")
                break
    except KeyboardInterrupt:
        bar.close()
        opt.zero_grad(set_to_none=True)  # a half-accumulated step is discarded and redone on resume
        checkpoint_now(rng)
        plot_losses(metrics.read(), run_dir / "loss.png", f"{cfg.model.name} (interrupted)")
        log(f"\ninterrupted at step {state['step']}: checkpoint saved; continue with --resume")
        raise
    bar.close()

    if data.eval and last_eval_step != state["step"]:
        last_eval = do_eval(state["step"])
    saved = save_result(run_dir, model, s.tokenizer, cfg, task, data.labels)
    plot = plot_losses(metrics.read(), run_dir / "loss.png", f"{cfg.model.name}: {task}")
    train_losses = [r["loss"] for r in metrics.read() if r.get("event") == "train"]
    result = {"steps": state["step"], "total_steps": total_steps, "stopped_early": stopped_early,
              "first_loss": train_losses[0] if train_losses else None,
              "final_loss": train_losses[-1] if train_losses else None, **last_eval, "before": before,
              "trainable": summary.trainable, "total_params": summary.total,
              "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
              "trained_tokens": state.get("trained_tokens", 0),
              "epochs": state["step"] * t.grad_accum / batches_per_epoch, "saved": str(saved), "plot": str(plot) if plot else None,
              "run_dir": str(run_dir)}
    atomic_write_text(run_dir / "summary.json", json.dumps(result, indent=2))
    return result
