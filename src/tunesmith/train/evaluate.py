"""Evaluation with the objective's metrics (loss, perplexity and token accuracy for LMs; accuracy and F1 for
classifiers; RMSE, MAE, R² for regression; span F1 for tagging), on the device the model is on."""
from __future__ import annotations

import torch
from torch import nn

from ..data.batching import collate
from ..devices import autocast, model_device, to_device
from ..objectives import Objective


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], objective: Objective, pad_id: int, batch_size: int = 32,
             bf16: bool = False) -> dict[str, float]:
    """The objective's eval_* metrics over encoded `examples` ({} when there are none)."""
    if not examples:
        return {}
    device = model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    collected: dict[str, list] = {}
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i:i + batch_size], pad_id), device)
        with autocast(device, bf16):
            out = objective.forward(model, batch).float()
        loss, n = objective.eval_loss(out, batch)
        c = objective.correct(out, batch)
        correct = None if c is None or correct is None else correct + c
        for key, values in objective.collect(out, batch).items():
            collected.setdefault(key, []).extend(values)
        loss_sum += float(loss)
        count += n
    model.train(was_training)
    return objective.metrics(loss_sum, count, correct, collected)
