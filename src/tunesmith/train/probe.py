"""Linear probing, the LP of LP-FT (Kumar et al. 2022): train only the new head on frozen features.

Features are computed once (model in eval mode: no dropout in the backbone, BatchNorm statistics fixed)
and the head is trained on the cache, which costs one forward pass over the data instead of one per epoch.
The probed head starts the fine-tune, and is theta_0's head for WiSE-FT interpolation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import collate, model_inputs
from ..devices import model_device, to_device
from ..errors import ConfigError, TunesmithError
from ..heads import active_head


@torch.no_grad()
def cached_features(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 64):
    feats, labels = [], []
    device = model_device(model)
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i:i + batch_size], pad_id), device)
        feats.append(model.pooled_features(**model_inputs(batch)).float())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def linear_probe(model: nn.Module, examples: list[dict], pad_id: int, epochs: float, lr: float,
                 batch_size: int, seed: int, weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """Train the head on cached features; returns the head's state dict (the model's head is updated too)."""
    if not hasattr(model, "pooled_features") or not hasattr(model, "classify"):
        raise TunesmithError("linear probing needs a classifier with a new head (a text classifier or MobileNetV2)")
    head = active_head(model)
    was_training = model.training
    model.eval()
    x, y = cached_features(model, examples, pad_id)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed + 7919)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    for _ in range(max(1, round(epochs * steps_per_epoch))):
        idx = torch.randint(0, len(y), (batch_size,), generator=g).to(y.device)
        loss = F.cross_entropy(model.classify(x[idx].to(next(head.parameters()).dtype)), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.train(was_training)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def run_linear_probe(run) -> None:
    """LP of LP-FT for a run: probe the new head, save it as probe_head.safetensors (WiSE-FT's theta_0 head)."""
    from safetensors.torch import save_file
    t = run.cfg.training
    if run.objective.name != "classification":
        raise ConfigError(f"training.linear_probe_epochs: linear probing trains a classifier's new head; this run's "
                          f"objective is {run.objective.name}. Set it to 0")
    probe = linear_probe(run.model, run.data.train, run.pad_id, t.linear_probe_epochs, t.head_lr or 10 * t.lr,
                         t.batch_size, t.seed, t.weight_decay)
    save_file({k: v.cpu().contiguous() for k, v in probe.items()}, str(run.run_dir / "probe_head.safetensors"))
