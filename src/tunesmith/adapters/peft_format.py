"""Write and read adapter folders in PEFT's format: adapter_model.safetensors + adapter_config.json.

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
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from .. import __version__
from ..errors import AdapterLoadError
from ..io import atomic_directory, atomic_write_bytes, atomic_write_text
from .config import AdapterConfig, BottleneckConfig, IA3Config, LoraConfig
from .inject import candidate_modules
from .manage import adapter_configs, adapter_layers, base_parameters, internal_prefixes, saved_modules

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."
ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                    "lora_magnitude_vector", "ia3_l", "adapter_down.weight", "adapter_down.bias",
                    "adapter_up.weight", "adapter_up.bias")
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "bottleneck": "BOTTLENECK"}
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "regression": "SEQ_CLS",
              "token_classification": "TOKEN_CLS"}
"""The trainer's task -> PEFT's task_type (regression is SEQ_CLS with one label, as in transformers)."""
AUTO_CLASSES = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
                ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
                ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"))
"""transformers' auto-class tables -> the task_type whose AutoPeftModelFor<Task> class builds that model."""
PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
"""Heads PEFT's class for a task_type adds to modules_to_save on load: it then needs their tensors in the file."""


# -- identity of the base model --------------------------------------------------------------------
def base_model_name(model: nn.Module) -> str | None:
    """Where the base model came from, as `from_pretrained` loads it (PEFT's AutoPeftModel* classes do): a local
    folder as an absolute path (a relative one loads only from where it was typed), anything else as it is."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    if name and Path(str(name)).expanduser().exists():
        return str(Path(str(name)).expanduser().resolve())
    return name


def peft_task_type(model: nn.Module, task: str | None = None, trained_in_full: Sequence[str] = ()) -> str | None:
    """PEFT's task_type: which AutoPeftModelFor<Task> (and AutoModelFor<Task>) rebuilds this model. From the
    trainer's task when given, else from the model class.

    None where PEFT could not load the adapter under that task_type: for a model no transformers auto class
    builds (tunesmith's backbone + TaskModel head, a vision net), PEFT would build another architecture and
    load the adapter into nothing; and a classifier task_type makes PEFT load the head from the file, so the
    adapter must train it (`trained_in_full`, the modules it saves whole). Plain PeftModel loading is unaffected.
    """
    from transformers.models.auto import modeling_auto
    cls, task_type = type(model).__name__, None
    for mapping, from_class in AUTO_CLASSES:
        builds = getattr(modeling_auto, mapping, {}).values()  # class names, or tuples of them
        if any(cls == v or (isinstance(v, (tuple, list)) and cls in v) for v in builds):
            task_type = TASK_TYPES.get(task or "", from_class)
            break
    heads = [n for n in candidate_modules(model) if n.endswith(PEFT_HEADS.get(task_type, ()))]  # PEFT's match
    return None if any(n not in trained_in_full for n in heads) else task_type


def base_model_hash(model: nn.Module) -> str | None:
    """sha256 over the base weights (names, shapes, bytes), leaving out adapters and the modules they train
    in full (a new head); None while adapters are merged into the weights."""
    if any(layer.merged_adapters for _, layer in adapter_layers(model)):
        return None
    internal = internal_prefixes(model)
    base = [(n, p) for n, p in sorted(model.state_dict().items()) if not n.startswith(internal)]
    # The weights change only in place (merge, an optimizer step) or by replacement, both of which show in
    # the tensors' storage pointers and version counters: repeated saves (checkpoints) skip the rehash.
    key = tuple((n, p.data_ptr(), p._version) for n, p in base)
    cached = model.__dict__.get("_tunesmith_base_hash")
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    from ..models.quantize import dequantized
    for name, p in base:
        name = name.replace(".base_layer.", ".")
        p = dequantized(p)  # a quantized base (QLoRA) hashes as the float weights it stands for
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    model.__dict__["_tunesmith_base_hash"] = (key, h.hexdigest())
    return h.hexdigest()


# -- saving -----------------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s live tensors under PEFT's file keys: what a save writes and a load must find. Its layers'
    tensors, the biases its `bias` option trains, and its own copies of the modules it trains in full."""
    bias = getattr(adapter_configs(model)[name], "bias", "none")
    out: dict[str, torch.Tensor] = {}
    for layer_name, layer in adapter_layers(model):
        if name not in layer.configs:
            continue
        for suffix, t in layer.adapter_state(name).items():
            out[f"{PREFIX}{layer_name}.{suffix}"] = t
        if bias != "none" and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{PREFIX}{layer_name}.base_layer.bias"] = layer.base_layer.bias
    if bias == "all":
        for pname, p in base_parameters(model):
            if pname.endswith("bias"):
                out.setdefault(PREFIX + pname, p)
    for module_name, module in saved_modules(model):
        if name in module.modules_to_save:
            for key, t in module.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{module_name}.{key}"] = t
    return out


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (copies, contiguous, on CPU)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in adapter_tensors(model, name).items()}


def _peft_config(model: nn.Module, name: str, task: str | None = None) -> dict:
    config = adapter_configs(model)[name]
    layers = {n: layer for n, layer in adapter_layers(model) if name in layer.configs}
    all_names = list(candidate_modules(model))
    ff = {n for n, layer in layers.items() if getattr(layer, "feedforward", False)}
    targets, feedforward = _short_names(set(layers), all_names), _short_names(ff, all_names)
    if any("." in t for t in targets) or not set(feedforward) <= set(targets):
        targets, feedforward = sorted(layers), sorted(ff)  # PEFT wants feedforward within targets
    saved = [n for n, module in saved_modules(model) if name in module.modules_to_save]  # its own copies
    d = {"peft_type": PEFT_TYPES[config.kind], "target_modules": targets, "modules_to_save": saved or None,
         "base_model_name_or_path": base_model_name(model), "inference_mode": True,
         "task_type": peft_task_type(model, task, saved), "exclude_modules": None, "revision": None}
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
    config = _peft_config(model, name, (metadata or {}).get("task"))
    tensors = adapter_state_dict(model, name)
    header = {"format": "pt", "tunesmith_version": __version__, "adapter_name": name,
              "base_model": str(config["base_model_name_or_path"] or ""), "base_model_hash": base_model_hash(model) or "",
              "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    header.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(folder / WEIGHTS, st_save(tensors, metadata=header))
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _require_known(model: nn.Module, name: str) -> None:
    if name not in adapter_configs(model):
        raise AdapterLoadError(f"no adapter named {name!r} to save; this model has {sorted(adapter_configs(model)) or 'none'}")


# -- reading ----------------------------------------------------------------------------------------
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


def config_from_peft(d: dict, targets: list[str] | str, modules_to_save: list[str] | None = None) -> AdapterConfig:
    """Our config for a PEFT adapter_config.json dict, targeting exactly `targets`, training `modules_to_save`
    in full (default: the dict's own list)."""
    ptype = str(d.get("peft_type", "")).upper()
    saved = d.get("modules_to_save") if modules_to_save is None else modules_to_save
    common = dict(targets=targets, modules_to_save=list(dict.fromkeys(saved)) if saved else None)
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


def split_key(key: str, file: Path) -> tuple[str, str]:
    """(module, adapter suffix) of a file key; suffix '' for a full tensor (modules_to_save, biases, embeddings)."""
    if not key.startswith(PREFIX):
        raise AdapterLoadError(f"{file}: key {key!r} does not start with {PREFIX!r}; this is not a PEFT adapter file")
    rest = key[len(PREFIX):].replace(".modules_to_save.", ".")
    for suffix in ADAPTER_SUFFIXES:
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    return rest, ""
