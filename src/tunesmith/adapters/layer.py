"""The protocol every adapter layer follows, so freezing, saving and merging treat all kinds alike.

An adapter layer wraps its base layer (PEFT's pattern) instead of copying it; the base stays at
`.base_layer`, so the wrapped model's state-dict keys read `<module>.base_layer.weight` and the adapter's
own tensors live beside it, keyed by adapter name.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import AdapterStateError, TargetNotFoundError
from .merge import CONV, EMBEDDING, GPT2_CONV1D, LINEAR


def layout_of(module: nn.Module) -> str | None:
    """Which weight layout a module has, or None if adapters cannot wrap it."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        return GPT2_CONV1D
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return None


def out_features(module: nn.Module, layout: str) -> int:
    w = module.weight
    return {LINEAR: w.shape[0], GPT2_CONV1D: w.shape[1], CONV: w.shape[0], EMBEDDING: w.shape[1]}[layout]


def in_features(module: nn.Module, layout: str) -> int:
    w = module.weight
    return {LINEAR: w.shape[1], GPT2_CONV1D: w.shape[0], CONV: w.shape[1], EMBEDDING: w.shape[0]}[layout]


class AdapterLayer(nn.Module):
    """Base of LoRA / IA3 / bottleneck layers: named adapters, which are active, which are merged.

    Subclasses implement `add`, `_drop`, `_merge_one`, `_unmerge_one`, `adapter_state`, `forward`.
    `adapter_state(name)` returns the live tensors under PEFT's key suffixes ('lora_A.weight', ...):
    saving, loading, freezing and parameter counts all go through it.
    """

    kind = ""
    supported_layouts: tuple[str, ...] = (LINEAR, GPT2_CONV1D, CONV, EMBEDDING)

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        layout = layout_of(base_layer)
        if layout not in self.supported_layouts:
            raise TargetNotFoundError(
                f"{module_name or type(base_layer).__name__}: a {self.kind} adapter cannot wrap a "
                f"{type(base_layer).__name__}; it supports {', '.join(self.supported_layouts)} layers"
            )
        self.base_layer = base_layer
        self.layout = layout
        self.module_name = module_name
        self.configs: dict[str, object] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # e.g. .weight, .in_features, .num_embeddings

    # -- the protocol --------------------------------------------------------------------------
    def add(self, name: str, config, **options) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _drop(self, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _merge_one(self, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unmerge_one(self, name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared behaviour ----------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [t for t in self.adapter_state(name).values() if isinstance(t, nn.Parameter)]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.configs]

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold adapters into the base weight. Idempotent: an adapter already merged is skipped."""
        for name in list(self.active_adapters if names is None else names):
            if name in self.configs and name not in self.merged_adapters:
                with torch.no_grad():
                    self._merge_one(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight, newest first."""
        while self.merged_adapters:
            with torch.no_grad():
                self._unmerge_one(self.merged_adapters.pop())

    def delete(self, name: str) -> None:
        if name not in self.configs:
            return
        merged = [n for n in self.merged_adapters if n != name]
        self.unmerge()
        self._drop(name)
        del self.configs[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self.merge(merged)

    def _check_new(self, name: str) -> None:
        if name in self.configs:
            raise AdapterStateError(
                f"{self.module_name}: an adapter named {name!r} already exists; delete it or pick another name"
            )

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
