"""Adapters: LoRA / DoRA, IA3 and bottleneck adapters that wrap base layers, in PEFT's file format."""
from .config import AdapterTargets, BottleneckConfig, IA3Config, LoraConfig, config_from_dict, config_to_dict
from .combine import combine_adapters
from .inject import InjectionReport, find_modules_to_save, find_targets
from .layer import AdapterLayer
from .manage import (
    active_adapters, adapter_configs, adapter_layers, add_adapter, delete_adapter, disable_adapters, mark_trainable,
    merge_adapters, merge_and_unload, saved_modules, set_active_adapters, unload, unmerge_adapters,
)
from .modules_to_save import ModulesToSave
from .peft_format import read_adapter_config, save_adapter, save_adapters
from .peft_load import load_adapter, load_adapters


def apply_lora(model, targets="all-linear", name: str = "default", **options) -> InjectionReport:
    """Shortcut: add a LoRA adapter (options are LoraConfig fields), freeze the base, return the report."""
    return add_adapter(model, LoraConfig(targets=targets, **options), name)


__all__ = [
    "AdapterLayer", "AdapterTargets", "BottleneckConfig", "IA3Config", "InjectionReport", "LoraConfig",
    "ModulesToSave", "active_adapters", "adapter_configs", "adapter_layers", "add_adapter", "apply_lora",
    "combine_adapters", "config_from_dict", "config_to_dict", "delete_adapter", "disable_adapters",
    "find_modules_to_save", "find_targets", "load_adapter", "load_adapters", "save_adapters",
    "mark_trainable", "merge_adapters", "merge_and_unload", "read_adapter_config", "save_adapter",
    "saved_modules", "set_active_adapters", "unload", "unmerge_adapters",
]
