"""IA3: learned scaling vectors, initialised to one (Liu et al., 2022), in PEFT's layout.

    output scaling:          y = l * base(x)         l: (out, 1)     (bias scaled too)
    input scaling (ffn):     y = base(l * x)         l: (1, in)
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .layer import AdapterLayer
from .merge import CONV, GPT2_CONV1D, LINEAR, ia3_merged_weight, ia3_scale_shape


class IA3Layer(AdapterLayer):
    kind = "ia3"
    supported_layouts = (LINEAR, GPT2_CONV1D, CONV)

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: bool | None = None  # one choice per layer, fixed by its first adapter

    def add(self, name: str, config, feedforward: bool = False) -> None:
        self._check_new(name)
        if self.feedforward is not None and self.feedforward != feedforward:
            raise ConfigError(
                f"{self.module_name}: IA3 adapters on one layer must all scale inputs or all scale outputs; "
                f"this layer already scales {'inputs' if self.feedforward else 'outputs'}"
            )
        self.feedforward = feedforward
        w = self.base_layer.weight
        shape = ia3_scale_shape(w, self.layout, feedforward)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))
        self.configs[name] = config

    def _drop(self, name: str) -> None:
        del self.ia3_l[name]
        if not self.ia3_l:
            self.feedforward = None

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def _merge_one(self, name: str) -> None:
        self._scale_base(self.ia3_l[name])

    def _unmerge_one(self, name: str) -> None:
        self._scale_base(1.0 / self.ia3_l[name])

    def _scale_base(self, scale: torch.Tensor) -> None:  # not `_apply`: that is nn.Module.to()'s hook
        base = self.base_layer
        base.weight.copy_(ia3_merged_weight(base.weight, scale, self.layout, self.feedforward))
        if not self.feedforward and base.bias is not None:
            base.bias.mul_(scale.flatten())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale = None
        if not self.disabled:
            for name in self.active_adapters:
                if name not in self.merged_adapters:
                    v = self.ia3_l[name].flatten()
                    scale = v if scale is None else scale * v
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        channel_shape = (-1,) + (1,) * (x.dim() - 2) if self.layout == CONV else (-1,)
        if self.feedforward:
            return self.base_layer(x * scale.view(channel_shape), *args, **kwargs)
        return self.base_layer(x, *args, **kwargs) * scale.view(channel_shape)
