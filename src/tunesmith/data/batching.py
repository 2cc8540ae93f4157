"""Batches: padding, masks, and a deterministic order that a resumed run can reproduce exactly.

A collated batch holds the model's inputs (MODEL_INPUTS) beside its targets: `labels` (next-token ids,
IGNORE = no loss), `label` (a class per example), `value` (a number per example), `tags` (a class per
token, IGNORE = untagged) or `soft_label` (a probability per class, beside `label`). Objectives read the
targets; the data side alone knows the inputs.
"""
from __future__ import annotations

import torch

from .tokenize import IGNORE

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")
TOKEN_TARGETS = ("labels", "tags")  # padded like input_ids, with IGNORE


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The part of a batch the model takes as keyword arguments."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def batch_units(batch: dict) -> int:
    """What throughput counts in a batch: images, or real (non-padding) tokens."""
    if "pixel_values" in batch:
        return batch["pixel_values"].shape[0]
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors.

    Packed rows (with position_ids) get no attention_mask: the padding tail becomes its own segment,
    its positions restart at 0 and its labels are ignored.
    """
    if "pixel_values" in examples[0]:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "label": torch.tensor([e["label"] for e in examples], dtype=torch.long)}
    if "rejected_input_ids" in examples[0] or "prompt" in examples[0]:  # preference pairs, prompts for online RL
        from .preference import collate_preference
        return collate_preference(examples, pad_id)
    if all(isinstance(v, torch.Tensor) for v in examples[0].values()):  # fixed-size examples (diffusion: latents
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}  # and caption states): stacked
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    batch: dict[str, torch.Tensor] = {}
    packed = "position_ids" in examples[0]
    if packed:
        pos = torch.zeros((len(examples), width), dtype=torch.long)
    else:
        mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_targets = {k: torch.full((len(examples), width), IGNORE, dtype=torch.long) for k in TOKEN_TARGETS if k in examples[0]}
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.tensor(e["input_ids"])
        if packed:
            pos[r, :n] = torch.tensor(e["position_ids"])
            pos[r, n:] = torch.arange(width - n)
        else:
            mask[r, :n] = 1
        for k, target in token_targets.items():
            target[r, :n] = torch.tensor(e[k])
    batch["input_ids"] = ids
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = mask
    batch.update(token_targets)
    if "label" in examples[0]:
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    if "value" in examples[0]:
        batch["value"] = torch.tensor([e["value"] for e in examples], dtype=torch.float32)
    if "soft_label" in examples[0]:  # weak supervision: the label model's probability per class
        batch["soft_label"] = torch.tensor([e["soft_label"] for e in examples], dtype=torch.float32)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order for one epoch: a permutation fixed by (seed, epoch), so resume can skip exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_for_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = epoch_order(n, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
