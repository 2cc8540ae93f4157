"""Load PEFT-format adapter folders into a model: check everything against the model first, then copy.

Two directions are checked. What the file holds must fit (every key names a module or parameter here, every
shape matches), and what the config calls for must be in the file: each module its target_modules pick here,
each module its modules_to_save trains, each bias its `bias` option trains. A file that lacks any of them is an
error naming them; `strict=False` makes it a warning (as PEFT warns), and what is missing keeps its fresh
value, which is what PEFT leaves: adapters that change nothing, modules_to_save at the base module's values.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterLoadError, TunesmithError, closest
from .inject import candidate_modules, find_targets, matches
from .manage import (
    add_adapter, adapter_layers, base_parameters, delete_adapter, saved_modules, set_active_adapters,
)
from .peft_format import (
    CONFIG, PREFIX, WEIGHTS, adapter_tensors, base_model_hash, config_from_peft, read_adapter_config,
    read_adapter_weights, split_key,
)


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", *, trainable: bool = False,
                 activate: bool = True, strict: bool = True) -> None:
    """Load a PEFT-format adapter folder into `model` as adapter `name`.

    Checks every name and shape first and reports all mismatches at once (key, expected vs found shape, and
    which base model the adapter was made for); on any error the model is left unchanged. Tensors the config
    calls for but the file lacks are an error too, naming them; with `strict=False` a warning, and they keep
    their fresh values (see the module docstring).
    """
    path = Path(path)
    d = read_adapter_config(path)
    tensors, meta = read_adapter_weights(path)
    made_for = meta.get("base_model") or d.get("base_model_name_or_path") or "an unnamed base model"
    if meta.get("base_model_hash"):
        made_for += f" (weights hash {meta['base_model_hash'][:12]})"
    file = path / WEIGHTS
    found: dict[str, tuple[str, str, torch.Tensor]] = {}  # normalised key -> (module, suffix, tensor)
    for key, t in tensors.items():
        module, suffix = split_key(key, file)
        found[f"{PREFIX}{module}.{suffix}" if suffix else PREFIX + module] = (module, suffix, t)
    wrapped = {module for module, suffix, _ in found.values() if suffix}
    modules = candidate_modules(model)
    unknown = sorted(m for m in wrapped if m not in modules)
    if unknown:
        near = closest(unknown[0], modules, n=3)
        raise AdapterLoadError(
            f"{file}: the adapter wraps {len(unknown)} module(s) this model does not have, e.g. {unknown[0]!r}"
            f"{' (closest here: ' + ', '.join(near) + ')' if near else ''}. It was made for {made_for}."
        )
    configured = set(configured_targets(model, d))
    targets = [m for m in modules if m in wrapped or m in configured]  # model order
    if not targets:
        raise AdapterLoadError(f"{file}: holds no adapter tensors, and its target_modules pick nothing in this model "
                               f"(it was made for {made_for})")
    present = [e for e in dict.fromkeys(d.get("modules_to_save") or []) if any(matches(n, [e]) for n in modules)]
    config = config_from_peft(d, targets, present)  # entries that match nothing are left out, as PEFT does
    expected_hash = meta.get("base_model_hash")
    add_adapter(model, config, name, activate=activate, freeze_base=trainable)
    try:
        missing = _copy_checked(model, name, found, file, made_for, strict)
    except Exception:
        delete_adapter(model, name)
        raise
    if missing:
        warnings.warn(f"{file}: loaded with strict=False though it lacks what its config calls for; these keep their "
                      "fresh values:\n  " + "\n  ".join(missing), stacklevel=2)
    if expected_hash and not trainable:
        actual = base_model_hash(model)
        if actual and actual != expected_hash:
            warnings.warn(f"{file}: made for base {made_for} (hash {expected_hash[:12]}), but this model's weights "
                          f"hash to {actual[:12]}; outputs may differ from what the adapter was trained for", stacklevel=2)


def load_adapters(model: nn.Module, path: str | Path, *, trainable: bool = False, strict: bool = True) -> list[str]:
    """Load every adapter of a multi-adapter folder (PEFT's layout): the top-level one as 'default', each
    subfolder holding adapter_config.json under its folder name. Activates 'default' (else the first);
    returns the names loaded. All or nothing."""
    path = Path(path)
    found: list[tuple[str, Path]] = []
    if path.is_dir():
        found = [("default", path)] if (path / CONFIG).exists() else []
        found += [(p.name, p) for p in sorted(path.iterdir()) if p.is_dir() and (p / CONFIG).exists()]
    if not found:
        raise AdapterLoadError(f"{path}: no {CONFIG} here or in any subfolder; not an adapter folder")
    loaded: list[str] = []
    try:
        for name, folder in found:
            load_adapter(model, folder, name, trainable=trainable, activate=False, strict=strict)
            loaded.append(name)
    except Exception:
        for name in loaded:
            delete_adapter(model, name)
        raise
    set_active_adapters(model, loaded[0])
    return loaded


def configured_targets(model: nn.Module, d: dict) -> list[str]:
    """The modules a PEFT config's target_modules (with exclude_modules and layers_to_transform) pick in this
    model, by PEFT's rules; [] where tunesmith cannot tell (no entry matches a module it can wrap)."""
    raw = d.get("target_modules")
    if isinstance(raw, (list, tuple, set)):  # one entry that matches nothing is fine in PEFT
        names = list(candidate_modules(model))
        raw = [t for t in raw if any(n == t or n.endswith("." + t) for n in names)]
    if not raw:
        return []
    try:
        config = dataclasses.replace(config_from_peft(d, raw), exclude=d.get("exclude_modules") or None)
        chosen = find_targets(model, config)
    except TunesmithError:
        return []
    layers = d.get("layers_to_transform")
    if layers is None or layers == []:
        return chosen
    keep = {layers} if isinstance(layers, int) else set(layers)
    return [n for n in chosen if _peft_layer_index(n + ".", d.get("layers_pattern")) in keep]


def _peft_layer_index(key: str, layers_pattern) -> int | None:
    """PEFT's reading of a block index: the first numbered segment, or the one after `layers_pattern`."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def _copy_checked(model: nn.Module, name: str, found: dict, file: Path, made_for: str, strict: bool) -> list[str]:
    """Check the file against adapter `name` (just added), then copy it in. Returns what was missing (only
    with strict=False: otherwise missing tensors raise, like every other problem)."""
    expected = adapter_tensors(model, name)
    layers = dict(adapter_layers(model))
    params = dict(base_parameters(model, remove_duplicate=False))  # tied aliases too (lm_head.base_layer.weight)
    for module_name, module in saved_modules(model):  # PEFT's bias="all" also saves originals' biases
        params.update({f"{module_name}.original_module.{k}": v for k, v in module.original_module.named_parameters()})
    params.update({k.replace(".base_layer.", "."): v for k, v in list(params.items()) if ".base_layer." in k})
    problems: list[str] = []
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, (module, suffix, t) in found.items():
        target = expected.get(key)
        if target is None and suffix:
            layer = layers[module]
            problems.append(f"{key}: unexpected for a {layer.kind} adapter on {type(layer.base_layer).__name__}")
            continue
        if target is None:
            target = params.get(module)
            if target is None:
                problems.append(f"{key}: no such parameter in this model")
                continue
        if tuple(target.shape) != tuple(t.shape):
            problems.append(f"{key}: expected shape {tuple(target.shape)}, found {tuple(t.shape)}")
        else:
            pairs.append((target, t))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AdapterLoadError(f"{file} does not fit this model (it was made for {made_for}):\n  {shown}{more}")
    missing = _describe_missing(layers, name, [k for k in expected if k not in found])
    if missing and strict:
        n_targets = sum(1 for line in missing if "a configured target" in line)
        summary = f"{n_targets} configured target(s) with none of their tensors, {len(missing) - n_targets} missing tensor(s)"
        raise AdapterLoadError(
            f"{file} lacks what its config calls for ({summary}); it was made for {made_for}:\n  " + "\n  ".join(missing)
            + "\nThe file is incomplete or was cut down: save it again, or pass strict=False to load the rest (missing "
            "adapter tensors then change nothing, modules_to_save keep the base module's values)")
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src.to(dst.dtype))
    return missing


def _describe_missing(layers: dict, name: str, missing: list[str]) -> list[str]:
    """One line per configured target with no tensors at all, then one per other missing key."""
    gone, lines = set(missing), []
    for layer_name, layer in layers.items():
        if name not in layer.configs:
            continue
        keys = [f"{PREFIX}{layer_name}.{suffix}" for suffix in layer.adapter_state(name)]
        if all(k in gone for k in keys):
            lines.append(f"{PREFIX}{layer_name}: a configured target, but none of its tensors "
                         f"({', '.join(layer.adapter_state(name))}) is in the file")
            gone -= set(keys)
    return lines + [f"{k}: missing from the file" for k in missing if k in gone]
