"""Batches: padding, masks, and a deterministic order that a resumed run can reproduce exactly."""
from __future__ import annotations

import torch

from .tokenize import IGNORE


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors.

    Packed rows (with position_ids) get no attention_mask: the padding tail becomes its own segment,
    its positions restart at 0 and its labels are ignored.
    """
    if "pixel_values" in examples[0]:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "label": torch.tensor([e["label"] for e in examples], dtype=torch.long)}
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    batch: dict[str, torch.Tensor] = {}
    packed = "position_ids" in examples[0]
    if packed:
        pos = torch.zeros((len(examples), width), dtype=torch.long)
    else:
        mask = torch.zeros((len(examples), width), dtype=torch.long)
    has_labels = "labels" in examples[0]
    if has_labels:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.tensor(e["input_ids"])
        if packed:
            pos[r, :n] = torch.tensor(e["position_ids"])
            pos[r, n:] = torch.arange(width - n)
        else:
            mask[r, :n] = 1
        if has_labels:
            labels[r, :n] = torch.tensor(e["labels"])
    batch["input_ids"] = ids
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = mask
    if has_labels:
        batch["labels"] = labels
    else:
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order for one epoch: a permutation fixed by (seed, epoch), so resume can skip exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_for_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = epoch_order(n, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
