"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) on a layer's output.

    h = base(x);  h <- h + scale * up(act(down(h)))      down: (size, features), up: (features, size)
`up` starts at zero, so a fresh adapter is the identity. The nonlinearity means it cannot be merged
into the base weight: it stays a separate module (and is saved in tunesmith's own PEFT-style format).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterStateError
from .layer import AdapterLayer, out_features
from .merge import CONV

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckLayer(AdapterLayer):
    kind = "bottleneck"

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()

    def add(self, name: str, config) -> None:
        self._check_new(name)
        w = self.base_layer.weight
        features = out_features(self.base_layer, self.layout)
        size = config.size or max(1, features // config.reduction_factor)
        kw = dict(device=w.device, dtype=w.dtype)
        self.adapter_down[name] = nn.Linear(features, size, **kw)
        self.adapter_up[name] = up = nn.Linear(size, features, **kw)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.configs[name] = config

    def _drop(self, name: str) -> None:
        del self.adapter_down[name]
        del self.adapter_up[name]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def _merge_one(self, name: str) -> None:
        raise AdapterStateError(
            f"{self.module_name}: bottleneck adapter {name!r} is nonlinear and cannot be merged into the base "
            "weights; keep it unmerged (it is saved as a small separate file) or use LoRA/IA3 for mergeable adapters"
        )

    def _unmerge_one(self, name: str) -> None:  # never merged
        pass

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disabled or not self.active_adapters:
            return h
        channels_first = self.layout == CONV
        if channels_first:
            h = h.movedim(1, -1)  # (B, C, ...) -> (B, ..., C)
        for name in self.active_adapters:
            cfg = self.configs[name]
            h = h + cfg.scale * self.adapter_up[name](_ACTIVATIONS[cfg.activation](self.adapter_down[name](h)))
        return h.movedim(-1, 1) if channels_first else h
