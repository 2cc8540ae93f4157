"""A new LoRA adapter from a weighted combination of existing ones (exact 'cat', or rank-preserving 'linear')."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..errors import AdapterStateError
from .config import LoraConfig
from .lora import LoraLayer
from .manage import _require, adapter_configs, adapter_layers, add_adapter, saved_modules


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str,
                     method: str = "cat") -> None:
    """Make a new LoRA adapter from a weighted combination of existing ones.

    method='cat': exact. Ranks concatenate (different ranks welcome); delta = sum_i w_i * delta_i.
    method='linear': same ranks only; A = sum_i w_i sqrt(s_i) A_i, B likewise. Cheap and rank-preserving,
        exact for one-hot weights or identical adapters, approximate otherwise (cross terms B_i A_j).
    """
    _require(model, names)
    if len(names) != len(weights) or not names:
        raise AdapterStateError(f"combine_adapters: give one weight per adapter ({len(names)} names, {len(weights)} weights)")
    if method not in ("cat", "linear"):
        raise AdapterStateError(f"combine_adapters: method must be 'cat' or 'linear', got {method!r}")
    configs = adapter_configs(model)
    for n in names:
        c = configs[n]
        if not isinstance(c, LoraConfig) or c.use_dora:
            raise AdapterStateError(f"combine_adapters: {n!r} is not a plain LoRA adapter (DoRA, IA3 and bottleneck cannot be combined)")
    if new_name in configs:
        raise AdapterStateError(f"adapter {new_name!r} already exists")
    plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_name, layer in adapter_layers(model):
        present = [(n, w) for n, w in zip(names, weights) if n in layer.configs]
        if present:
            plan[layer_name] = _combine_factors(layer, present, method)
    heads = {}  # a module trained in full by one of the adapters: the new adapter starts from that copy
    for module_name, module in saved_modules(model):
        owners = [n for n in names if n in module.modules_to_save]
        if len(owners) > 1:
            raise AdapterStateError(f"combine_adapters: {owners} each train their own copy of {module_name!r}, and "
                                    "whole modules cannot be combined (PEFT refuses too); combine adapters that do not "
                                    "share a module in modules_to_save")
        if owners:
            heads[module_name] = module.modules_to_save[owners[0]]
    first = configs[names[0]]
    new_cfg = LoraConfig(targets=list(plan), r=first.r, alpha=first.r, dropout=first.dropout,
                         modules_to_save=list(heads) or None)
    options = {n: {"r": A.shape[0], "alpha": A.shape[0]} for n, (A, _) in plan.items()}  # scale 1
    add_adapter(model, new_cfg, new_name, activate=False, freeze_base=False, names=list(plan), options=options)
    for module_name, source in heads.items():
        model.get_submodule(module_name).modules_to_save[new_name].load_state_dict(source.state_dict())
    for layer_name, (A, B) in plan.items():
        layer = model.get_submodule(layer_name)
        a, b = layer.factors(new_name)
        with torch.no_grad():
            a.copy_(A)
            b.copy_(B)


def _combine_factors(layer: LoraLayer, present: list[tuple[str, float]], method: str):
    As, Bs = [], []
    for n, w in present:
        A, B = layer.factors(n)
        s = layer.scaling[n]
        if method == "cat":
            As.append(A * (w * s))
            Bs.append(B)
        else:
            As.append(A * (w * math.sqrt(s)))
            Bs.append(B * (math.sqrt(s)))
    if method == "cat":
        return torch.cat(As, 0).detach(), torch.cat(Bs, 1).detach()
    ranks = {a.shape[0] for a in As}
    if len(ranks) > 1:
        raise AdapterStateError(f"{layer.module_name}: method='linear' needs equal ranks, found {sorted(ranks)}; use method='cat'")
    weights = [w for _, w in present]
    # B_new = sum w_i sqrt(s_i) B_i so that equal adapters with weights summing to 1 reproduce themselves
    return sum(As).detach(), sum(b * w for b, w in zip(Bs, weights)).detach()
