"""One base model, a different LoRA adapter on each row of a batch (S-LoRA / LoRAX's idea, without their kernels).

For row i with adapter a_i (None: the base model), every wrapped layer computes

    y_i = base(x_i) + s_a * B_a A_a x_i          s_a = alpha_a / r_a

The adapters' own forward is switched off for the duration (no adapter is "active"), and a forward hook on each
LoRA layer adds the delta of each adapter present in the batch to its rows only. Nothing about the model's
adapter state outlives the `with` block, so two batches can never see each other's adapter choice.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..adapters.lora import LoraLayer
from ..adapters.manage import adapter_layers, saved_modules
from ..adapters.merge import GPT2_CONV1D, LINEAR


def can_mix(model: nn.Module, names: Sequence[str | None]) -> bool:
    """True when rows with these adapters can share one batch: plain LoRA on Linear / Conv1D layers, nothing
    merged, no DoRA, no modules trained in full. Anything else runs one adapter per batch."""
    wanted = {n for n in names if n is not None}
    for _, layer in adapter_layers(model):
        if layer.merged_adapters:
            return False
        present = wanted & set(layer.configs)
        if not present:
            continue
        if not isinstance(layer, LoraLayer) or layer.layout not in (LINEAR, GPT2_CONV1D):
            return False
        if any(n in layer.lora_magnitude_vector for n in present):
            return False
    return not any(set(module.modules_to_save) & wanted for _, module in saved_modules(model))


def _row_delta_hook(rows: dict[str, torch.Tensor]):
    def hook(layer: LoraLayer, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (B, T, in)
        for name, idx in rows.items():
            if name in layer.lora_A:  # an adapter need not wrap every layer
                delta = layer.lora_B[name](layer.lora_A[name](x.index_select(0, idx)))  # (b, T, out)
                out = out.index_add(0, idx, delta, alpha=layer.scaling[name])
        return out
    return hook


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run `model` with adapter names[i] on batch row i (None: the base). Check `can_mix` first."""
    device = next(model.parameters()).device
    rows: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        if name is not None:
            rows.setdefault(name, [])
            rows[name].append(i)
    rows = {n: torch.tensor(idx, device=device) for n, idx in rows.items()}
    layers = [layer for _, layer in adapter_layers(model)]
    saved = [module for _, module in saved_modules(model)]
    active = [layer.active_adapters for layer in layers]
    handles = []
    try:
        for layer in layers:
            layer.active_adapters = []  # the layer's own forward adds nothing; the hook adds per-row deltas
            if isinstance(layer, LoraLayer):
                handles.append(layer.register_forward_hook(_row_delta_hook(rows)))
        for module in saved:
            module.disabled = True  # no adapter of a mixed batch owns a copy (can_mix)
        yield model
    finally:
        for h in handles:
            h.remove()
        for layer, names_before in zip(layers, active):
            layer.active_adapters = names_before
        for module in saved:
            module.disabled = False
