"""A DiffusionModel's LoRA in the files diffusers loads, written beside tunesmith's PEFT-format adapter folder.

  pytorch_lora_weights.safetensors   the pipeline file: keys `unet.<module>.lora_A.weight`,
                                     `text_encoder.<module>.lora_B.weight`, ... (what
                                     `StableDiffusionPipeline.save_lora_weights` writes):
                                         pipe.load_lora_weights(folder)
  unet_lora.safetensors              the UNet alone, keys without a prefix (what `unet.save_lora_adapter` writes):
                                         unet.load_lora_adapter(folder, prefix=None,
                                                                weight_name="unet_lora.safetensors", use_safetensors=True)

Each file's safetensors header carries `lora_adapter_metadata`: the PEFT LoraConfig (exact module names,
rank and alpha per module) that diffusers builds the adapter from. Without it diffusers assumes alpha = rank
(scale 1) and the outputs would differ whenever alpha != r.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..adapters import adapter_configs, adapter_layers
from ..errors import AdapterStateError
from ..io import atomic_write_bytes

PIPELINE_FILE = "pytorch_lora_weights.safetensors"
UNET_FILE = "unet_lora.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def component_layers(model: nn.Module, name: str = "default") -> dict[str, dict[str, nn.Module]]:
    """{component (unet, text_encoder, ...): {module name inside it: LoRA layer}} for adapter `name`."""
    config = adapter_configs(model).get(name)
    if config is None:
        raise AdapterStateError(f"no adapter named {name!r}; this model has {sorted(adapter_configs(model)) or 'none'}")
    if config.kind != "lora" or config.modules_to_save or getattr(config, "bias", "none") != "none":
        raise AdapterStateError("diffusers' LoRA files hold LoRA factors only: the adapter must be kind=lora with no "
                                "modules_to_save and bias=none")
    out: dict[str, dict[str, nn.Module]] = {}
    for full, layer in adapter_layers(model):
        if name in layer.configs:
            component, _, inner = full.partition(".")
            out.setdefault(component, {})[inner] = layer
    return out


def lora_config_dict(layers: dict[str, nn.Module], name: str = "default") -> dict:
    """PEFT LoraConfig kwargs for one component: exact target names, the commonest rank / alpha, and anchored
    rank_pattern / alpha_pattern entries for the modules that differ."""
    ranks = {n: layer.r[name] for n, layer in layers.items()}
    alphas = {n: layer.alpha[name] for n, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = next(iter(layers.values())).configs[name]

    def exact(n: str) -> str:
        return "^" + n.replace(".", r"\.")  # PEFT matches '(.*\.)?(key)$': anchored, this module only

    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers), "lora_dropout": config.dropout,
            "bias": "none", "use_rslora": config.use_rslora, "use_dora": config.use_dora, "init_lora_weights": True,
            "rank_pattern": {exact(n): v for n, v in ranks.items() if v != r},
            "alpha_pattern": {exact(n): v for n, v in alphas.items() if v != alpha}}


def component_tensors(layers: dict[str, nn.Module], name: str = "default") -> dict[str, torch.Tensor]:
    """{'<module>.lora_A.weight': tensor, ...} for one component (copies on CPU)."""
    out = {}
    for module, layer in layers.items():
        for suffix, t in layer.adapter_state(name).items():
            out[f"{module}.{suffix}"] = t.detach().cpu().contiguous().clone()
    return out


def _file_bytes(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    return st_save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})


def write_diffusers_lora(model: nn.Module, folder: Path, name: str = "default") -> list[Path]:
    """Write PIPELINE_FILE (and UNET_FILE when the UNet has LoRA layers) into `folder`, each file atomically."""
    parts = component_layers(model, name)
    tensors, metadata = {}, {}
    for component, layers in parts.items():
        tensors.update({f"{component}.{k}": v for k, v in component_tensors(layers, name).items()})
        metadata.update({f"{component}.{k}": v for k, v in lora_config_dict(layers, name).items()})
    written = [atomic_write_bytes(folder / PIPELINE_FILE, _file_bytes(tensors, metadata))]
    if "unet" in parts:
        written.append(atomic_write_bytes(folder / UNET_FILE, _file_bytes(component_tensors(parts["unet"], name),
                                                                          lora_config_dict(parts["unet"], name))))
    return written
