"""Read and write adapter folders in PEFT's format: adapter_model.safetensors + adapter_config.json.

Keys are `base_model.model.<module>.<suffix>` (suffixes: lora_A.weight, lora_B.weight, lora_embedding_A/B,
lora_magnitude_vector, ia3_l; full tensors of `modules_to_save` and trained biases under their own
names). tunesmith adds its metadata (base model identity and hash, creation time) to the safetensors
header, which PEFT ignores. Nothing is ever unpickled.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from .. import __version__
from ..errors import AdapterLoadError
from ..io import atomic_directory, atomic_write_bytes, atomic_write_text
from .config import AdapterConfig, BottleneckConfig, IA3Config, LoraConfig
from .inject import candidate_modules, matches, pattern_value
from .layer import AdapterLayer
from .manage import (
    add_adapter, adapter_configs, adapter_layers, delete_adapter, named_modules_to_save, set_active_adapters,
)

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."
ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                    "lora_magnitude_vector", "ia3_l", "adapter_down.weight", "adapter_down.bias",
                    "adapter_up.weight", "adapter_up.bias")
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "bottleneck": "BOTTLENECK"}


# -- identity of the base model --------------------------------------------------------------------
def base_model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def base_model_hash(model: nn.Module) -> str | None:
    """sha256 over the base weights (names, shapes, bytes), leaving out adapters and the modules they train
    in full (a new head); None while adapters are merged into the weights."""
    layers = dict(adapter_layers(model))
    if any(layer.merged_adapters for layer in layers.values()):
        return None
    internal = tuple(f"{n}.{part}" for n, layer in layers.items() for part in
                     {k.split(".")[0] for k, _ in layer.named_parameters()} - {"base_layer"})
    internal += tuple(f"{name}." for cfg in adapter_configs(model).values() for name, _ in named_modules_to_save(model, cfg))
    base = [(n, p) for n, p in sorted(model.state_dict().items()) if not n.startswith(internal)]
    # The weights change only in place (merge, an optimizer step) or by replacement, both of which show in
    # the tensors' storage pointers and version counters: repeated saves (checkpoints) skip the rehash.
    key = tuple((n, p.data_ptr(), p._version) for n, p in base)
    cached = model.__dict__.get("_tunesmith_base_hash")
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name, p in base:
        name = name.replace(".base_layer.", ".")
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    model.__dict__["_tunesmith_base_hash"] = (key, h.hexdigest())
    return h.hexdigest()


# -- saving -----------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (copies, contiguous, on CPU)."""
    config = adapter_configs(model)[name]
    out: dict[str, torch.Tensor] = {}
    for layer_name, layer in adapter_layers(model):
        if name not in layer.configs:
            continue
        for suffix, t in layer.adapter_state(name).items():
            out[f"{PREFIX}{layer_name}.{suffix}"] = t
        if getattr(config, "bias", "none") != "none" and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{PREFIX}{layer_name}.base_layer.bias"] = layer.base_layer.bias
    if getattr(config, "bias", "none") == "all":
        for pname, p in model.named_parameters():
            key = PREFIX + pname
            if pname.endswith("bias") and key not in out and ".lora_" not in pname:
                out[key] = p
    for mod_name, module in named_modules_to_save(model, config):
        for pname, p in module.state_dict().items():
            out[f"{PREFIX}{mod_name}.{pname}"] = p
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def _peft_config(model: nn.Module, name: str) -> dict:
    config = adapter_configs(model)[name]
    layers = {n: layer for n, layer in adapter_layers(model) if name in layer.configs}
    all_names = list(candidate_modules(model))
    ff = {n for n, layer in layers.items() if getattr(layer, "feedforward", False)}
    targets, feedforward = _short_names(set(layers), all_names), _short_names(ff, all_names)
    if any("." in t for t in targets) or not set(feedforward) <= set(targets):
        targets, feedforward = sorted(layers), sorted(ff)  # PEFT wants feedforward within targets
    d = {"peft_type": PEFT_TYPES[config.kind], "target_modules": targets, "modules_to_save": config.modules_to_save,
         "base_model_name_or_path": base_model_name(model), "inference_mode": True, "task_type": None,
         "exclude_modules": None, "revision": None}
    if isinstance(config, LoraConfig):
        r = {n: layer.r[name] for n, layer in layers.items()}
        alpha = {n: layer.alpha[name] for n, layer in layers.items()}
        base_r = max(set(r.values()), key=list(r.values()).count)
        base_alpha = max(set(alpha.values()), key=list(alpha.values()).count)
        d.update(layers_to_transform=None, layers_pattern=None, r=base_r, lora_alpha=base_alpha, lora_dropout=config.dropout, bias=config.bias,
                 use_rslora=config.use_rslora, use_dora=config.use_dora, init_lora_weights=True,
                 fan_in_fan_out=any(layer.layout == "conv1d_gpt2" for layer in layers.values()),
                 rank_pattern={_exact(n): v for n, v in r.items() if v != base_r},
                 alpha_pattern={_exact(n): v for n, v in alpha.items() if v != base_alpha})
    elif isinstance(config, IA3Config):
        d.update(feedforward_modules=feedforward, init_ia3_weights=True, fan_in_fan_out=any(layer.layout == "conv1d_gpt2" for layer in layers.values()))
    else:
        d.update(tunesmith_bottleneck={"size": config.size, "reduction_factor": config.reduction_factor,
                                       "activation": config.activation, "scale": config.scale})
    return d


def _short_names(chosen: set[str], all_names: list[str]) -> list[str]:
    """Leaf names when they pick exactly `chosen` among all modules, else the full names (PEFT matches both)."""
    leaves = sorted({n.split(".")[-1] for n in chosen})
    picked = {n for n in all_names if n.split(".")[-1] in leaves}
    return leaves if picked == chosen else sorted(chosen)


def _exact(name: str) -> str:
    return "^" + name.replace(".", r"\.")  # anchored so PEFT's '(.*\.)?(key)$' matches this module only


def save_adapter(model: nn.Module, path: str | Path, name: str = "default", metadata: dict | None = None) -> Path:
    """Write adapter `name` to folder `path` atomically, in PEFT's format plus tunesmith metadata."""
    _require_known(model, name)
    with atomic_directory(path) as tmp:
        _write_adapter(model, tmp, name, metadata)
    return Path(path)


def save_adapters(model: nn.Module, path: str | Path, names: list[str] | None = None,
                  metadata: dict | None = None) -> Path:
    """Write several adapters to one folder in PEFT's multi-adapter layout, atomically: 'default' at the top,
    every other adapter in a subfolder named after it (what PeftModel.save_pretrained writes and
    PeftModel.from_pretrained(..., subfolder) / load_adapter read)."""
    names = list(names or adapter_configs(model))
    for name in names:
        _require_known(model, name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise AdapterLoadError(f"adapter name {name!r} cannot be a folder name; use letters, digits, '_', '-', '.'")
    with atomic_directory(path) as tmp:
        for name in names:
            folder = tmp if name == "default" else tmp / name
            folder.mkdir(exist_ok=True)
            _write_adapter(model, folder, name, metadata)
    return Path(path)


def _write_adapter(model: nn.Module, folder: Path, name: str, metadata: dict | None) -> None:
    config = _peft_config(model, name)
    tensors = adapter_state_dict(model, name)
    header = {"format": "pt", "tunesmith_version": __version__, "adapter_name": name,
              "base_model": str(config["base_model_name_or_path"] or ""), "base_model_hash": base_model_hash(model) or "",
              "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    header.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(folder / WEIGHTS, st_save(tensors, metadata=header))
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapters(model: nn.Module, path: str | Path, *, trainable: bool = False) -> list[str]:
    """Load every adapter of a multi-adapter folder (PEFT's layout): the top-level one as 'default', each
    subfolder holding adapter_config.json under its folder name. Activates 'default' (else the first);
    returns the names loaded."""
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
            load_adapter(model, folder, name, trainable=trainable, activate=False)
            loaded.append(name)
    except Exception:
        for name in loaded:  # all or nothing
            delete_adapter(model, name)
        raise
    set_active_adapters(model, loaded[0])
    return loaded


def _require_known(model: nn.Module, name: str) -> None:
    if name not in adapter_configs(model):
        raise AdapterLoadError(f"no adapter named {name!r} to save; this model has {sorted(adapter_configs(model)) or 'none'}")


# -- loading ----------------------------------------------------------------------------------------
def read_adapter_config(path: str | Path) -> dict:
    """Parse adapter_config.json, naming the file, line and column of any syntax error."""
    file = Path(path) / CONFIG if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise AdapterLoadError(f"{file}: not found; an adapter folder holds {CONFIG} and {WEIGHTS}")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{file}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix or re-save the adapter") from None
    if not isinstance(d, dict) or "peft_type" not in d:
        raise AdapterLoadError(f"{file}: field 'peft_type' is missing; expected one of {', '.join(PEFT_TYPES.values())}")
    return d


def read_adapter_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) from adapter_model.safetensors, with a clear error for corrupt files."""
    file = Path(path) / WEIGHTS
    if not file.exists():
        legacy = Path(path) / "adapter_model.bin"
        hint = " (found adapter_model.bin: tunesmith never unpickles; re-save it with safetensors)" if legacy.exists() else ""
        raise AdapterLoadError(f"{file}: not found{hint}")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterLoadError(f"{file}: not a valid safetensors file ({e}); the file is corrupt or truncated, save it again") from None


def config_from_peft(d: dict, targets: list[str]) -> AdapterConfig:
    """Our config for a PEFT adapter_config.json dict, targeting exactly `targets`."""
    ptype = str(d.get("peft_type", "")).upper()
    common = dict(targets=targets, modules_to_save=d.get("modules_to_save") or None)
    if ptype == "LORA":
        return LoraConfig(r=int(d.get("r", 8)), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                          use_rslora=bool(d.get("use_rslora", False)), use_dora=bool(d.get("use_dora", False)),
                          bias=d.get("bias", "none") or "none", rank_pattern=d.get("rank_pattern") or {},
                          alpha_pattern=d.get("alpha_pattern") or {}, **common)
    if ptype == "IA3":
        return IA3Config(feedforward=d.get("feedforward_modules") or None, **common)
    if ptype == "BOTTLENECK":
        return BottleneckConfig(**(d.get("tunesmith_bottleneck") or {}), **common)
    raise AdapterLoadError(f"peft_type {ptype!r} is not supported; tunesmith loads {', '.join(PEFT_TYPES.values())} adapters")


def _split_key(key: str, file: Path) -> tuple[str, str]:
    if not key.startswith(PREFIX):
        raise AdapterLoadError(f"{file}: key {key!r} does not start with {PREFIX!r}; this is not a PEFT adapter file")
    rest = key[len(PREFIX):].replace(".modules_to_save.", ".")
    for suffix in ADAPTER_SUFFIXES:
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    return rest, ""


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", *, trainable: bool = False,
                 activate: bool = True) -> None:
    """Load a PEFT-format adapter folder into `model` as adapter `name`.

    Checks every name and shape first and reports all mismatches at once (key, expected vs found shape,
    and which base model the adapter was made for); on any error the model is left unchanged.
    """
    path = Path(path)
    d = read_adapter_config(path)
    tensors, meta = read_adapter_weights(path)
    made_for = meta.get("base_model") or d.get("base_model_name_or_path") or "an unnamed base model"
    if meta.get("base_model_hash"):
        made_for += f" (weights hash {meta['base_model_hash'][:12]})"
    file = path / WEIGHTS
    adapter_keys: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, suffix = _split_key(key, file)
        if suffix:
            adapter_keys.setdefault(module, {})[suffix] = t
        else:
            other[module] = t
    modules = candidate_modules(model)
    missing = [m for m in adapter_keys if m not in modules]
    if missing:
        from ..errors import closest
        near = closest(missing[0], modules, n=3)
        raise AdapterLoadError(
            f"{file}: the adapter wraps {len(missing)} module(s) this model does not have, e.g. {missing[0]!r}"
            f"{' (closest here: ' + ', '.join(near) + ')' if near else ''}. It was made for {made_for}."
        )
    targets = [m for m in modules if m in adapter_keys]  # model order
    config = config_from_peft(d, targets)
    expected_hash = meta.get("base_model_hash")
    add_adapter(model, config, name, activate=activate, freeze_base=trainable)
    try:
        _copy_checked(model, name, adapter_keys, other, file, made_for)
    except Exception:
        delete_adapter(model, name)
        raise
    if expected_hash and not trainable:
        actual = base_model_hash(model)
        if actual and actual != expected_hash:
            import warnings
            warnings.warn(f"{file}: made for base {made_for} (hash {expected_hash[:12]}), but this model's weights "
                          f"hash to {actual[:12]}; outputs may differ from what the adapter was trained for", stacklevel=2)


def _copy_checked(model, name, adapter_keys, other, file, made_for) -> None:
    problems: list[str] = []
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module, found in adapter_keys.items():
        layer: AdapterLayer = model.get_submodule(module)
        expected = layer.adapter_state(name)
        for suffix, t in found.items():
            key = f"{PREFIX}{module}.{suffix}"
            if suffix not in expected:
                problems.append(f"{key}: unexpected for a {layer.kind} adapter on {type(layer.base_layer).__name__}")
            elif tuple(expected[suffix].shape) != tuple(t.shape):
                problems.append(f"{key}: expected shape {tuple(expected[suffix].shape)}, found {tuple(t.shape)}")
            else:
                pairs.append((expected[suffix], t))
        for suffix in set(expected) - set(found):
            problems.append(f"{PREFIX}{module}.{suffix}: missing from the file")
    params = dict(model.named_parameters())
    params.update({k.replace(".base_layer.", "."): v for k, v in list(params.items()) if ".base_layer." in k})
    for key, t in other.items():
        target = params.get(key) if key in params else params.get(key.replace(".base_layer.", "."))
        if target is None:
            problems.append(f"{PREFIX}{key}: no such parameter in this model")
        elif tuple(target.shape) != tuple(t.shape):
            problems.append(f"{PREFIX}{key}: expected shape {tuple(target.shape)}, found {tuple(t.shape)}")
        else:
            pairs.append((target, t))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AdapterLoadError(f"{file} does not fit this model (it was made for {made_for}):\n  {shown}{more}")
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src.to(dst.dtype))
