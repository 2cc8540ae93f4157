"""Find the modules an adapter targets, wrap them, and report what was done.

Matching follows PEFT so configs carry over: a list entry matches a module whose name equals it or
ends with '.' + entry; a plain string is a regex matched against the whole name; 'all-linear' is every
Linear / GPT-2 Conv1D except the output head. A target that matches nothing is an error naming the
closest module names that exist. 'all-conv' is every non-grouped Conv layer (depthwise convs are skipped).
Modules named in `modules_to_save` (trained in full) are never targets, and everything inside them is skipped
(PEFT's rule); each of those entries must match too, checked before anything is wrapped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import TargetNotFoundError, closest
from ..naming import is_head_name, matches, matches_any_prefix
from .bottleneck import BottleneckLayer
from .config import AdapterConfig, IA3Config, LoraConfig
from .ia3 import IA3Layer
from .layer import AdapterLayer, layout_of
from .lora import LoraLayer
from .merge import CONV, GPT2_CONV1D, LINEAR
from .modules_to_save import ModulesToSave

LAYER_CLASSES: dict[str, type[AdapterLayer]] = {"lora": LoraLayer, "ia3": IA3Layer, "bottleneck": BottleneckLayer}
COMMON_LAYER_LISTS = ("layers", "h", "block", "blocks", "layer")


@dataclass
class WrappedModule:
    name: str
    layer_type: str
    weight_shape: tuple[int, ...]
    params_added: int


@dataclass
class InjectionReport:
    """What `add_adapter` did: every wrapped module with its shape and the parameters it gained, and the
    modules the adapter trains in full (its own copies, `modules_to_save`)."""

    adapter: str
    kind: str
    modules: list[WrappedModule] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)

    @property
    def params_added(self) -> int:
        return sum(m.params_added for m in self.modules)

    def __str__(self) -> str:
        lines = [f"adapter {self.adapter!r} ({self.kind}): {len(self.modules)} modules, "
                 f"{self.params_added:,} parameters added"]
        width = max((len(m.name) for m in self.modules), default=10)
        for m in self.modules:
            lines.append(f"  {m.name:<{width}}  {m.layer_type:<10} {str(m.weight_shape):<16} +{m.params_added:,}")
        if self.saved:
            lines.append(f"  trained in full (its own copy): {', '.join(self.saved)}")
        return "\n".join(lines)


def pattern_value(patterns: dict, name: str, default):
    """Per-module override lookup with PEFT's semantics for rank_pattern / alpha_pattern."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index in a name like 'model.layers.3.mlp.up_proj' (3), or None."""
    lists = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or COMMON_LAYER_LISTS)
    for lst in lists:
        m = re.search(rf"(?:^|\.){re.escape(lst)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module, skipping the internals of adapter layers (no adapters on adapters) and of modules
    trained in full (their copies belong to their adapters)."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        out[name] = module
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            inside.append(name + ".")
    return out


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def output_head_names(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    heads = {n for n in modules if is_head_name(n)}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        heads |= {n for n, m in modules.items() if out is not None and base_of(m) is out}
    return heads


def _no_match_error(target: str, modules: dict[str, nn.Module], wrappable: list[str]) -> TargetNotFoundError:
    leaves = sorted({n.split(".")[-1] for n in wrappable})
    near = closest(target, leaves + list(modules), n=5)
    msg = f"target {target!r} matches no module in this model."
    if near:
        msg += f" Closest names: {', '.join(near)}."
    msg += f" Wrappable layer names here: {', '.join(leaves[:30])}{' ...' if len(leaves) > 30 else ''}"
    msg += " (run `tunesmith inspect MODEL` to list every module)."
    return TargetNotFoundError(msg)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules `config` targets, in model order. Raises if a target matches nothing."""
    modules = candidate_modules(model)
    layer_cls = LAYER_CLASSES[config.kind]
    wrappable = [n for n, m in modules.items() if layout_of(base_of(m)) in layer_cls.supported_layouts]
    targets = config.targets
    if targets == "all-linear" or targets == ["all-linear"]:
        heads = output_head_names(model, modules)
        chosen = [n for n in wrappable if layout_of(base_of(modules[n])) in (LINEAR, GPT2_CONV1D) and n not in heads]
        if not chosen:
            raise TargetNotFoundError("targets='all-linear' found no Linear layers outside the output head")
    elif targets == "all-conv" or targets == ["all-conv"]:
        chosen = [n for n in wrappable if layout_of(base_of(modules[n])) == CONV and base_of(modules[n]).groups == 1]
        if not chosen:
            raise TargetNotFoundError("targets='all-conv' found no (non-grouped) Conv layers in this model")
    elif isinstance(targets, str):
        chosen = [n for n in wrappable if re.fullmatch(targets, n)]
        if not chosen:
            hit = [n for n in modules if re.fullmatch(targets, n)]
            if hit:
                raise _unwrappable_error(targets, hit, modules, layer_cls)
            raise _no_match_error(targets, modules, wrappable)
    else:
        chosen_set: set[str] = set()
        for t in targets:
            hit = [n for n in modules if n == t or n.endswith("." + t)]
            ok = [n for n in hit if n in set(wrappable)]
            if not hit:
                raise _no_match_error(t, modules, wrappable)
            if not ok:
                raise _unwrappable_error(t, hit, modules, layer_cls)
            chosen_set.update(ok)
        chosen = [n for n in wrappable if n in chosen_set]
    before = len(chosen)
    chosen = [n for n in chosen if not matches(n, config.exclude) and not matches_any_prefix(n, config.modules_to_save)]
    if config.layers_to_transform is not None:
        keep = set(config.layers_to_transform)
        chosen = [n for n in chosen if layer_index(n, config.layers_pattern) in keep]
    if not chosen:
        raise TargetNotFoundError(
            f"targets matched {before} modules, but exclude={config.exclude!r} / "
            f"layers_to_transform={config.layers_to_transform!r} / modules_to_save={config.modules_to_save!r} "
            "removed all of them"
        )
    return chosen


def find_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules `config.modules_to_save` trains in full (the shallowest match of each entry), in
    model order. Every entry must match; a module that holds adapter layers cannot be one. Changes nothing."""
    if not config.modules_to_save:
        return []
    modules = candidate_modules(model)
    found: set[str] = set()
    for entry in config.modules_to_save:
        hit = [n for n in modules if matches(n, [entry])]
        if not hit:
            leaves = sorted({n.split(".")[-1] for n in modules})
            near = closest(entry, leaves + list(modules), n=5)
            raise TargetNotFoundError(
                f"modules_to_save entry {entry!r} matches no module in this model."
                + (f" Closest names: {', '.join(near)}." if near else "")
                + " (run `tunesmith inspect MODEL` to list every module)")
        found.update(hit)
    chosen = [n for n in modules if n in found and not any(n.startswith(f + ".") for f in found)]
    for name in chosen:
        held = [n for n, m in modules[name].named_modules()
                if isinstance(m, (AdapterLayer, ModulesToSave)) and m is not modules[name]]
        if isinstance(modules[name], AdapterLayer) or held:
            inner = ", ".join(f"{name}.{n}" if n else name for n in (held or [""])[:3])
            raise TargetNotFoundError(
                f"modules_to_save: {name!r} holds adapter layers ({inner}); a module trained in full cannot also "
                "carry adapters. Name a module outside them, or delete those adapters first")
    return chosen


def _unwrappable_error(target, hit, modules, layer_cls) -> TargetNotFoundError:
    first = hit[0]
    inner = sorted({n.split(".")[-1] for n, m in modules.items()
                    if n.startswith(first + ".") and layout_of(base_of(m)) in layer_cls.supported_layouts})
    kinds = ", ".join(sorted({type(base_of(modules[n])).__name__ for n in hit}))
    msg = (f"target {target!r} matches {len(hit)} module(s) such as {first!r}, but they are {kinds}, which a "
           f"{layer_cls.kind} adapter cannot wrap (it wraps {', '.join(layer_cls.supported_layouts)} layers).")
    if inner:
        msg += f" Inside {first!r} you could target: {', '.join(inner)}."
    return TargetNotFoundError(msg)


def _layer_options(config: AdapterConfig, name: str) -> dict:
    if isinstance(config, LoraConfig):
        return {"r": pattern_value(config.rank_pattern, name, config.r),
                "alpha": pattern_value(config.alpha_pattern, name, config.alpha)}
    if isinstance(config, IA3Config):
        return {"feedforward": matches(name, config.feedforward)}
    return {}


def inject(model: nn.Module, config: AdapterConfig, adapter: str, names: list[str] | None = None,
           options: dict[str, dict] | None = None) -> InjectionReport:
    """Wrap the targeted modules (or exactly `names`) and add adapter `adapter` to each.

    All or nothing: if any module fails, every change made so far is rolled back.
    """
    names = find_targets(model, config) if names is None else names
    report = InjectionReport(adapter, config.kind)
    created: list[tuple[str, nn.Module]] = []
    touched: list[AdapterLayer] = []
    try:
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                if module.kind != config.kind:
                    raise TargetNotFoundError(
                        f"{name}: already holds {module.kind} adapters {module.adapter_names}; one adapter kind "
                        f"per module (delete those first, or target other modules for the {config.kind} adapter)"
                    )
                layer = module
            else:
                layer = LAYER_CLASSES[config.kind](module, name)
                model.set_submodule(name, layer)
                created.append((name, module))
            opts = (options or {}).get(name) or _layer_options(config, name)
            layer.add(adapter, config, **opts)
            touched.append(layer)
            added = sum(p.numel() for p in layer.adapter_parameters(adapter))
            report.modules.append(WrappedModule(name, type(layer.base_layer).__name__,
                                                tuple(layer.base_layer.weight.shape), added))
    except Exception:
        for layer in touched:
            if adapter in layer.configs:
                layer._drop(adapter)
                del layer.configs[adapter]
        for name, original in created:
            model.set_submodule(name, original)
        raise
    return report
