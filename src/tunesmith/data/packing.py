"""Packing short examples into full rows with best-fit decreasing, without attention across examples.

A packed row carries `position_ids` that restart at 0 for each example; transformers builds a
block-diagonal causal mask from them (no attention_mask given), so tokens attend only within their own
example. The first label of every example is masked, so no token learns to predict across a boundary.
"""
from __future__ import annotations

import bisect

from .tokenize import IGNORE


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity, tightest fit first (longest items first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining space, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}; truncate first")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """Concatenate examples into rows: input_ids, labels, position_ids (restarting per example)."""
    rows = []
    for group in best_fit_decreasing([len(e["input_ids"]) for e in examples], capacity):
        ids, labels, pos = [], [], []
        for i in sorted(group):
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE] + ex["labels"][1:]
            pos += list(range(len(ex["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows
