"""Several named adapters per model: add, activate, disable, delete, combine, merge, unload.

Functions on a plain `nn.Module` (an HF model stays an HF model: `.generate()` keeps working). The
adapter configs live in `model.tunesmith_adapters`; everything else lives in the wrapped layers.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import AdapterStateError, closest
from .config import AdapterConfig, LoraConfig
from .inject import InjectionReport, inject, matches
from .layer import AdapterLayer
from .lora import LoraLayer

REGISTRY = "tunesmith_adapters"


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """{adapter name: config} for every adapter on `model` (empty if none)."""
    if REGISTRY not in model.__dict__:
        model.__dict__[REGISTRY] = {}
    return model.__dict__[REGISTRY]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("tunesmith_active", []))


def _require(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_configs(model)
    for n in names:
        if n not in known:
            near = closest(n, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise AdapterStateError(f"no adapter named {n!r}{hint}; this model has {sorted(known) or 'none'}")


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *, activate: bool = True,
                freeze_base: bool = True, names: list[str] | None = None, options: dict | None = None) -> InjectionReport:
    """Inject adapter `name` and (by default) make it the active one and the only trainable part.

    `freeze_base=True` freezes every base parameter, then unfreezes this adapter, the config's
    `modules_to_save` and the biases its `bias` option names. Returns a report of what was wrapped.
    """
    if name in adapter_configs(model):
        raise AdapterStateError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick a new name")
    report = inject(model, config, name, names=names, options=options)
    adapter_configs(model)[name] = config
    if activate:
        set_active_adapters(model, [name])
    if freeze_base:
        mark_trainable(model, [name])
    return report


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly these adapters active (their outputs add up; LoRA merges may be mixed in)."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for _, layer in adapter_layers(model):
        layer.set_active(names)
    model.__dict__["tunesmith_active"] = names


def mark_trainable(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Freeze everything, then unfreeze the named (default: active) adapters, their modules_to_save and biases."""
    names = active_adapters(model) if names is None else list(names)
    configs = adapter_configs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer_name, layer in adapter_layers(model):
        for n in layer.adapter_names:
            for p in layer.adapter_parameters(n):
                p.requires_grad_(n in names)
        if any(getattr(configs.get(n), "bias", "none") == "lora_only" for n in names if n in layer.configs):
            bias = getattr(layer.base_layer, "bias", None)
            if bias is not None:
                bias.requires_grad_(True)
    for n in names:
        cfg = configs[n]
        if getattr(cfg, "bias", "none") == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.requires_grad_(True)
        for module in modules_to_save(model, cfg):
            for p in module.parameters():
                p.requires_grad_(True)


def modules_to_save(model: nn.Module, config: AdapterConfig) -> list[nn.Module]:
    return [m for _, m in named_modules_to_save(model, config)]


def named_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The shallowest modules matching `config.modules_to_save` (a new head, say)."""
    if not config.modules_to_save:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and matches(name, config.modules_to_save) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    if not found:
        raise AdapterStateError(f"modules_to_save={config.modules_to_save!r} matches no module of this model")
    return found


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: merged adapters are taken out for the duration and put back after."""
    layers = [layer for _, layer in adapter_layers(model)]
    merged = [list(layer.merged_adapters) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, names in zip(layers, merged):
            layer.disabled = False
            layer.merge(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter (unmerging it first); layers left with no adapter get their base layer back."""
    _require(model, [name])
    for layer_name, layer in list(adapter_layers(model)):
        layer.delete(name)
        if not layer.configs:
            model.set_submodule(layer_name, layer.base_layer)
    del adapter_configs(model)[name]
    model.__dict__["tunesmith_active"] = [n for n in active_adapters(model) if n != name]


def merge_adapters(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights. Calling it twice is harmless."""
    names = active_adapters(model) if names is None else list(names)
    _require(model, names)
    layers = [layer for _, layer in adapter_layers(model)]
    _check_mergeable(layers, names)
    _untie_merge_targets(model, [layer for layer in layers if any(n in layer.configs for n in names)])
    for layer in layers:
        layer.merge(names)


def _untie_merge_targets(model: nn.Module, layers: list[AdapterLayer]) -> None:
    """A merge writes into the base weight. Where another module shares that tensor (tied input and output
    embeddings), the adapter never acted on it, so it gets its own copy first: merged outputs then equal
    unmerged ones, and the model config stops asking for the tie (a saved merged model reloads the same)."""
    import warnings
    targets = {id(layer.base_layer.weight): layer.module_name for layer in layers
               if isinstance(getattr(layer.base_layer, "weight", None), nn.Parameter)}
    bases = {id(layer.base_layer) for layer in layers}
    untied = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, AdapterLayer) or id(module) in bases:
            continue  # the wrapper (its .weight is its base's) and the base itself
        if isinstance(w, nn.Parameter) and id(w) in targets:
            module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            untied.append(f"{name} (tied to {targets[id(w)]})")
    if untied:
        config = getattr(model, "config", None)
        for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        warnings.warn(f"merging untied {', '.join(untied)}: the adapter changes only its own module, so the tied "
                      "one keeps the original weights (as it did unmerged)", stacklevel=3)


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _check_mergeable(layers: list[AdapterLayer], names: Sequence[str]) -> None:
    for layer in layers:
        if layer.kind == "bottleneck" and any(n in layer.configs for n in names):
            layer._merge_one(next(n for n in names if n in layer.configs))  # raises the explanation


def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Merge adapters (default: active) and return the model with every tunesmith module removed."""
    merge_adapters(model, names)
    return unload(model, _keep_merged=True)


def unload(model: nn.Module, _keep_merged: bool = False) -> nn.Module:
    """Remove every adapter without merging: the plain base model comes back."""
    for layer_name, layer in list(adapter_layers(model)):
        if not _keep_merged:
            layer.unmerge()
        model.set_submodule(layer_name, layer.base_layer)
    adapter_configs(model).clear()
    model.__dict__["tunesmith_active"] = []
    return model


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
    first = configs[names[0]]
    new_cfg = LoraConfig(targets=list(plan), r=first.r, alpha=first.r, dropout=first.dropout,
                         modules_to_save=first.modules_to_save)
    options = {n: {"r": A.shape[0], "alpha": A.shape[0]} for n, (A, _) in plan.items()}  # scale 1
    add_adapter(model, new_cfg, new_name, activate=False, freeze_base=False, names=list(plan), options=options)
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
