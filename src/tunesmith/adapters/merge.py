"""Merge math as pure functions on tensors. No modules, no state: easy to test and to reuse offline.

Weight layouts follow the base layer: Linear (out, in); GPT-2 Conv1D (in, out) ("fan_in_fan_out");
ConvNd (out, in, *k); Embedding (num, dim). LoRA factor shapes follow PEFT:
    Linear / Conv1D: A (r, in), B (out, r)      ConvNd: A (r, in, *k), B (out, r, 1, ...)
    Embedding:       A (r, num), B (dim, r)
"""
from __future__ import annotations

import torch

from ..errors import AdapterStateError

LINEAR, GPT2_CONV1D, CONV, EMBEDDING = "linear", "conv1d_gpt2", "conv", "embedding"


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, layout: str) -> torch.Tensor:
    """The weight change scale * B @ A, shaped like the base layer's weight."""
    if layout == LINEAR:
        return (B @ A) * scaling  # (out, in)
    if layout == GPT2_CONV1D:
        return (B @ A).T * scaling  # (in, out)
    if layout == CONV:
        # B is a 1x1 conv: delta[o, i, k...] = sum_r B[o, r] A[r, i, k...]
        return torch.tensordot(B.flatten(1), A, dims=1) * scaling
    if layout == EMBEDDING:
        return (B @ A).T * scaling  # (num, dim)
    raise ValueError(f"unknown layout {layout!r}")


def as_out_in(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """View a weight with the output dimension first (Conv1D stores (in, out))."""
    return weight.T if layout == GPT2_CONV1D else weight


def dora_norm(weight: torch.Tensor, delta: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-output-unit L2 norm of W + delta, shape (out,). DoRA treats this as a constant (detached)."""
    w = as_out_in(weight + delta, layout)
    return w.flatten(1).norm(p=2, dim=1)


def dora_factor(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, layout: str) -> torch.Tensor:
    """m / ||W + delta||, shape (out,): the per-row rescale DoRA applies to W + delta."""
    return magnitude / dora_norm(weight, delta, layout)


def scale_rows(weight: torch.Tensor, factor: torch.Tensor, layout: str) -> torch.Tensor:
    """Multiply each output unit's weights by factor[out]."""
    if layout == GPT2_CONV1D:
        return weight * factor.view(1, -1)
    return weight * factor.view(-1, *([1] * (weight.dim() - 1)))


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, layout: str) -> torch.Tensor:
    """DoRA's merged weight: (m / ||W + dW||) * (W + dW), row-wise."""
    return scale_rows(weight + delta, dora_factor(weight, delta, magnitude, layout), layout)


def ia3_scale_shape(weight: torch.Tensor, layout: str, feedforward: bool) -> tuple[int, ...]:
    """PEFT's ia3_l shape: (out, 1) scales outputs, (1, in) scales inputs (feedforward modules)."""
    w = as_out_in(weight, layout)
    out_f, in_f = w.shape[0], w.shape[1]
    if layout == CONV:
        extra = (1,) * (w.dim() - 2)
        return (1, in_f, *extra) if feedforward else (1, out_f, *extra)
    return (1, in_f) if feedforward else (out_f, 1)


def ia3_merged_weight(weight: torch.Tensor, scale: torch.Tensor, layout: str, feedforward: bool) -> torch.Tensor:
    """Fold an IA3 vector into the weight: scale output rows, or input columns for feedforward modules."""
    v = scale.flatten()
    if layout == CONV:
        shape = (1, -1) if feedforward else (-1, 1)
        return weight * v.view(*shape, *([1] * (weight.dim() - 2)))
    if layout == GPT2_CONV1D:  # (in, out)
        return weight * (v.view(-1, 1) if feedforward else v.view(1, -1))
    return weight * (v.view(1, -1) if feedforward else v.view(-1, 1))


def merge_lora_weights(
    base: dict[str, torch.Tensor], adapter: dict[str, dict[str, torch.Tensor]], scalings: dict[str, float],
    layouts: dict[str, str],
) -> dict[str, torch.Tensor]:
    """Merge LoRA/DoRA factors into a base state dict, returning a new dict (inputs untouched).

    adapter: {module: {'A': ..., 'B': ..., optional 'magnitude': ...}}; base keys are '<module>.weight'.
    """
    out = dict(base)
    for module, t in adapter.items():
        key = f"{module}.weight"
        if key not in base:
            raise AdapterStateError(f"cannot merge into {module!r}: the base state dict has no {key!r}")
        w, layout = base[key], layouts[module]
        delta = lora_delta(t["A"].to(w.dtype), t["B"].to(w.dtype), scalings[module], layout)
        if "magnitude" in t:
            out[key] = dora_merged_weight(w, delta, t["magnitude"].to(w.dtype), layout)
        else:
            out[key] = w + delta
    return out
