"""Several named adapters per model: add, activate, disable, delete, merge, unload.

Functions on a plain `nn.Module` (an HF model stays an HF model: `.generate()` keeps working). The
adapter configs live in `model.tunesmith_adapters`; everything else lives in the wrapped layers and in the
modules trained in full (`ModulesToSave`: the original plus one copy per adapter that trains it).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from ..errors import AdapterStateError, TargetNotFoundError, closest
from .config import AdapterConfig
from .inject import InjectionReport, find_modules_to_save, find_targets, inject
from .layer import AdapterLayer
from .modules_to_save import ModulesToSave

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


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """Every module some adapter trains in full (`modules_to_save`), wrapped with one copy per such adapter."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def internal_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of everything that is not the base model: the adapter tensors inside adapter layers (their
    `base_layer` is base), and modules trained in full (their originals are set aside, not used while active)."""
    out = [f"{name}.{child}." for name, layer in adapter_layers(model)
           for child, _ in layer.named_children() if child != "base_layer"]
    return tuple(out + [f"{name}." for name, _ in saved_modules(model)])


def base_parameters(model: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, nn.Parameter]]:
    """The base model's parameters by name, with no adapter tensors and no modules trained in full
    (`remove_duplicate=False`: a tied parameter under each of its names)."""
    internal = internal_prefixes(model)
    return [(n, p) for n, p in model.named_parameters(remove_duplicate=remove_duplicate) if not n.startswith(internal)]


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

    All or nothing: targets and `modules_to_save` are resolved and checked before anything changes, and a
    failure part way leaves the model as it was. Each module in `modules_to_save` gets a copy of its own for
    this adapter; the original stays for the base model and the other adapters. `freeze_base=True` freezes
    every base parameter, then unfreezes this adapter, its copies and the biases its `bias` option names.
    Returns a report of what was wrapped and copied.
    """
    if name in adapter_configs(model):
        raise AdapterStateError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick a new name")
    targets = find_targets(model, config) if names is None else list(names)
    saved = find_modules_to_save(model, config)
    inside = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if inside:
        raise TargetNotFoundError(f"{inside[0]}: an adapter target inside a module this adapter trains in full "
                                  f"(modules_to_save={config.modules_to_save!r}); a module is one or the other")
    report = inject(model, config, name, names=targets, options=options)
    try:
        for module_name in saved:
            module = model.get_submodule(module_name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, module_name)
                model.set_submodule(module_name, module)
            module.add(name)
    except Exception:
        _remove(model, name)
        raise
    report.saved = saved
    adapter_configs(model)[name] = config
    if activate:
        set_active_adapters(model, [name])
    if freeze_base:
        mark_trainable(model, [name])
    return report


def _remove(model: nn.Module, name: str) -> None:
    """Take adapter `name` out of every layer and module copy; wrappers left with no adapter are undone."""
    for layer_name, layer in list(adapter_layers(model)):
        layer.delete(name)
        if not layer.configs:
            model.set_submodule(layer_name, layer.base_layer)
    for module_name, module in list(saved_modules(model)):
        module.delete(name)
        if not module.adapter_names:
            model.set_submodule(module_name, module.original_module)


def _check_one_copy_each(model: nn.Module, names: Sequence[str]) -> None:
    for _, module in saved_modules(model):
        module.owner(names)  # raises if two of `names` own copies of this module


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly these adapters active (their outputs add up; LoRA merges may be mixed in). Each module
    trained in full runs the copy of the active adapter that owns one (two such owners at once are refused)."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    _check_one_copy_each(model, names)  # before anything changes
    for _, layer in adapter_layers(model):
        layer.set_active(names)
    for _, module in saved_modules(model):
        module.set_active(names)
    model.__dict__["tunesmith_active"] = names


def mark_trainable(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Freeze everything, then unfreeze the named (default: active) adapters, their copies of modules_to_save
    and their biases. Originals of modules trained in full stay frozen: they are the base model's."""
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
    for _, module in saved_modules(model):
        for n, own in module.modules_to_save.items():
            own.requires_grad_(n in names)
    if any(getattr(configs[n], "bias", "none") == "all" for n in names):
        for pname, p in base_parameters(model):
            if pname.endswith("bias"):
                p.requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: merged adapters are taken out for the duration and put back after, and modules
    trained in full run their originals."""
    layers = [layer for _, layer in adapter_layers(model)]
    saved = [module for _, module in saved_modules(model)]
    merged = [list(layer.merged_adapters) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for module in saved:
        module.disabled = True
    try:
        yield model
    finally:
        for module in saved:
            module.disabled = False
        for layer, names in zip(layers, merged):
            layer.disabled = False
            layer.merge(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter (unmerging it first) and its copies; wrapped modules left with no adapter get their
    original module back."""
    _require(model, [name])
    _remove(model, name)
    del adapter_configs(model)[name]
    model.__dict__["tunesmith_active"] = [n for n in active_adapters(model) if n != name]


def merge_adapters(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights. Calling it twice is harmless. A quantized
    base weight (QLoRA) is dequantized first and stays float (unmerging leaves dequant(W))."""
    names = active_adapters(model) if names is None else list(names)
    _require(model, names)
    layers = [layer for _, layer in adapter_layers(model)]
    _check_mergeable(layers, names)
    merging = [layer for layer in layers if any(n in layer.configs for n in names)]
    _untie_merge_targets(model, merging)
    from ..models.quantize import dequantize_base
    dequantize_base(model, [layer.base_layer for layer in merging])  # a 4/8-bit base (QLoRA) becomes float to merge into
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
        if isinstance(module, (AdapterLayer, ModulesToSave)) or id(module) in bases:
            continue  # the wrappers (their .weight is another module's) and the base itself
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and id(w) in targets:
            module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            untied.append(f"{name} (tied to {targets[id(w)]})")
    if untied:
        _stop_tying(model)
        warnings.warn(f"merging untied {', '.join(untied)}: the adapter changes only its own module, so the tied "
                      "one keeps the original weights (as it did unmerged)", stacklevel=3)


def _stop_tying(model: nn.Module) -> None:
    """Tied modules now hold different weights: the config stops asking for the tie, so a saved model reloads
    as it is instead of re-tying."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _check_mergeable(layers: list[AdapterLayer], names: Sequence[str]) -> None:
    for layer in layers:
        if layer.kind == "bottleneck" and any(n in layer.configs for n in names):
            layer._merge_one(next(n for n in names if n in layer.configs))  # raises the explanation


def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Merge adapters (default: active) and return the model with every tunesmith module removed. A module
    trained in full becomes the copy of the merged adapter that owns one (else its original); a quantized base
    (QLoRA) comes back dequantized, in plain float weights."""
    names = active_adapters(model) if names is None else list(names)
    _require(model, names)
    _check_one_copy_each(model, names)
    merge_adapters(model, names)
    model = unload(model, _keep_merged=True, _keep_copies_of=names)
    from ..models.quantize import dequantize_base
    dequantize_base(model)  # the rest of a quantized base too: a plain float model, ready to save or export
    return model


def unload(model: nn.Module, _keep_merged: bool = False, _keep_copies_of: Sequence[str] = ()) -> nn.Module:
    """Remove every adapter without merging: the plain base model comes back."""
    for layer_name, layer in list(adapter_layers(model)):
        if not _keep_merged:
            layer.unmerge()
        model.set_submodule(layer_name, layer.base_layer)
    for module_name, module in list(saved_modules(model)):
        owner = module.owner(_keep_copies_of)
        if owner is not None and _shares_tensors(model, module_name, module.original_module):
            _stop_tying(model)  # a trained copy of a tied lm_head: the tie would overwrite it on reload
        model.set_submodule(module_name, module.original_module if owner is None else module.modules_to_save[owner])
    adapter_configs(model).clear()
    model.__dict__["tunesmith_active"] = []
    return model


def _shares_tensors(model: nn.Module, name: str, module: nn.Module) -> bool:
    own = {id(p) for p in module.parameters()}
    return any(id(p) in own for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(name + "."))
