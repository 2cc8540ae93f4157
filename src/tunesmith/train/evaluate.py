"""Evaluation with the task's metrics: loss, token accuracy and perplexity for LMs; accuracy and F1 for classifiers."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.batching import collate
from ..devices import autocast, model_device, to_device
from ..objectives import classification_loss_sum, lm_loss_sum, lm_token_correct, macro_f1


def forward(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Logits for a collated batch (labels are not passed: losses are computed by tunesmith)."""
    if "pixel_values" in batch:
        return model(batch["pixel_values"])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if task == "classification":
        return model(**inputs)
    return model(**inputs, use_cache=False).logits


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], task: str, pad_id: int, batch_size: int = 32,
             num_classes: int | None = None, bf16: bool = False) -> dict[str, float]:
    """Metrics over `examples`, on the device the model is on."""
    if not examples:
        return {}
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_loss, count, correct = 0.0, 0, 0
    preds, gold = [], []
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i:i + batch_size], pad_id), device)
        with autocast(device, bf16):
            logits = forward(model, batch, task).float()
        if task == "classification":
            loss, n = classification_loss_sum(logits, batch["label"])
            p = logits.argmax(-1)
            correct += int((p == batch["label"]).sum())
            preds += p.tolist()
            gold += batch["label"].tolist()
        else:
            loss, n = lm_loss_sum(logits, batch["labels"])
            correct += lm_token_correct(logits, batch["labels"])
        total_loss += float(loss)
        count += n
    model.train(was_training)
    loss = total_loss / max(count, 1)
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(count, 1),
                "eval_f1": macro_f1(preds, gold, num_classes or (max(gold) + 1))}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)), "eval_token_accuracy": correct / max(count, 1)}
