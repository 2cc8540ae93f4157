"""LoRA and DoRA on Linear, GPT-2 Conv1D, Conv1d/2d/3d and Embedding layers.

    y = base(x) + s * B(A(dropout(x)))          s = alpha / r  (or alpha / sqrt(r), rsLoRA)
    DoRA: y = m / ||W + s BA|| * (W + s BA) x + b, the norm taken per output unit and treated as a constant
B starts at zero (A for embeddings, as PEFT), so a fresh adapter leaves the output unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import lora_fused
from .layer import AdapterLayer, in_features, out_features
from .merge import CONV, EMBEDDING, GPT2_CONV1D, LINEAR, as_out_in, dora_factor, lora_delta, scale_rows


class LoraLayer(AdapterLayer):
    kind = "lora"

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._dora_factors: dict[str, torch.Tensor] = {}  # kept at merge time so unmerge is exact

    def add(self, name: str, config, r: int | None = None, alpha: float | None = None) -> None:
        self._check_new(name)
        r = config.r if r is None else r
        alpha = config.alpha if alpha is None else alpha
        base, layout = self.base_layer, self.layout
        if config.use_dora and layout not in (LINEAR, GPT2_CONV1D):
            raise ConfigError(f"{self.module_name}: DoRA is supported on Linear-type layers only, not {type(base).__name__}")
        w = base.weight
        kw = dict(device=w.device, dtype=w.dtype)
        n_in, n_out = in_features(base, layout), out_features(base, layout)
        if layout == EMBEDDING:
            a = nn.Parameter(torch.zeros(r, n_in, **kw))
            b = nn.Parameter(torch.empty(n_out, r, **kw))
            nn.init.normal_(b)
            self.lora_embedding_A[name], self.lora_embedding_B[name] = a, b
        else:
            if layout == CONV:
                if base.groups != 1:
                    raise ConfigError(
                        f"{self.module_name}: LoRA cannot wrap a grouped/depthwise conv (groups={base.groups}); "
                        "target the pointwise (1x1) convs instead"
                    )
                conv = type(base)
                A = conv(n_in, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False,
                         padding_mode=base.padding_mode, **kw)
                B = conv(r, n_out, 1, 1, bias=False, **kw)
            else:
                A, B = nn.Linear(n_in, r, bias=False, **kw), nn.Linear(r, n_out, bias=False, **kw)
            if config.init == "gaussian":
                nn.init.normal_(A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
            self.lora_A[name], self.lora_B[name] = A, B
            self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.r[name] = r
        self.alpha[name] = alpha
        self.scaling[name] = config.scaling(r, alpha)
        self.configs[name] = config
        if config.use_dora:
            with torch.no_grad():
                norm = as_out_in(w, layout).flatten(1).norm(p=2, dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.clone())

    def _drop(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B,
                  self.lora_magnitude_vector, self.lora_dropout):
            if name in d:
                del d[name]
        self.r.pop(name, None)
        self.alpha.pop(name, None)
        self.scaling.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if self.layout == EMBEDDING:
            state = {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}
        else:
            state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in PEFT's shapes."""
        if self.layout == EMBEDDING:
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        return lora_delta(A, B, self.scaling[name], self.layout)

    def _merge_one(self, name: str) -> None:
        w = self.base_layer.weight
        delta = self.delta_weight(name).to(w.dtype)
        if name in self.lora_magnitude_vector:
            factor = dora_factor(w, delta, self.lora_magnitude_vector[name], self.layout)
            self._dora_factors[name] = factor
            w.copy_(scale_rows(w + delta, factor, self.layout))
        else:
            w.add_(delta)

    def _unmerge_one(self, name: str) -> None:
        w = self.base_layer.weight
        delta = self.delta_weight(name).to(w.dtype)
        if name in self._dora_factors:
            w.copy_(scale_rows(w, 1.0 / self._dora_factors.pop(name), self.layout) - delta)
        else:
            w.sub_(delta)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (len(self.active_adapters) == 1 and not self.merged_adapters and not self.disabled
                and self.layout == LINEAR and lora_fused.applies(self, x, self.active_adapters[0], args, kwargs)):
            return lora_fused.lora_linear(self, x, self.active_adapters[0])  # training's common case, one kernel set
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        base_result = result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            s = self.scaling[name]
            if self.layout == EMBEDDING:
                b = self.base_layer
                after_a = F.embedding(x, self.lora_embedding_A[name].T, b.padding_idx, b.max_norm,
                                      b.norm_type, b.scale_grad_by_freq, b.sparse)  # (..., r)
                result = result + (after_a @ self.lora_embedding_B[name].T) * s
                continue
            dropout = self.lora_dropout[name]
            h = x if isinstance(dropout, nn.Identity) else dropout(x)
            lora_out = self.lora_B[name](self.lora_A[name](h))
            if name in self.lora_magnitude_vector:
                result = result + self._dora_extra(name, h, lora_out, base_result, h is x)
            else:
                result = torch.add(result, lora_out, alpha=s)  # one fused kernel for result + s * lora_out
        return result

    def _dora_extra(self, name, h, lora_out, base_result, same_input: bool) -> torch.Tensor:
        """DoRA's output minus base(x): (f - 1) * W x + f * s * B A x, with f = m / ||W + s BA||."""
        base, s = self.base_layer, self.scaling[name]
        w = as_out_in(base.weight, self.layout)  # (out, in)
        A, B = self.factors(name)
        with torch.no_grad():  # the norm is a constant in DoRA's gradient (paper, sec. 4.3)
            norm = (w + (B @ A) * s).norm(p=2, dim=1)
        f = self.lora_magnitude_vector[name] / norm  # (out,)
        if same_input and base.bias is not None:
            plain = base_result - base.bias
        elif same_input:
            plain = base_result
        else:
            plain = F.linear(h, w)  # the base applied to the dropped-out input, as PEFT does
        return (f - 1) * plain + f * lora_out * s
