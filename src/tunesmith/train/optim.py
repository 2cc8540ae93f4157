"""AdamW with sensible parameter groups (LoRA+ and head learning rates), and warmup + decay schedules."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, loraplus_ratio: float | None = None,
                 head_lr: float | None = None, head_names: tuple[str, ...] = ("head.",)) -> list[dict]:
    """Trainable parameters split by role. No weight decay on biases and norms (1-D tensors).

    LoRA+ (Hayou et al. 2024): B matrices learn `loraplus_ratio` times faster than A.
    A new head can get its own learning rate (`head_lr`), as it starts from scratch.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g_lr = lr
        if loraplus_ratio and (".lora_B." in name or ".lora_embedding_B." in name):
            g_lr = lr * loraplus_ratio
        if head_lr is not None and name.startswith(head_names):
            g_lr = head_lr
        wd = 0.0 if p.ndim < 2 else weight_decay
        groups.setdefault((g_lr, wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def build_optimizer(model: nn.Module, t) -> torch.optim.Optimizer:
    head = getattr(model, "head_name", "head") + "."
    groups = param_groups(model, t.lr, t.weight_decay, t.loraplus_ratio, t.head_lr, head_names=(head,))
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (check adapter / freeze settings)")
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier on the base learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, t) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(t.warmup_steps, int(t.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup, t.schedule))
