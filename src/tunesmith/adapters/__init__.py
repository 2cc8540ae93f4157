"""Adapters: LoRA / DoRA, IA3 and bottleneck adapters that wrap base layers, in PEFT's file format."""
from .config import AdapterTargets, BottleneckConfig, IA3Config, LoraConfig, config_from_dict, config_to_dict
from .inject import InjectionReport, find_targets
from .layer import AdapterLayer
from .manage import (
    active_adapters, adapter_configs, adapter_layers, add_adapter, combine_adapters, delete_adapter,
    disable_adapters, mark_trainable, merge_adapters, merge_and_unload, set_active_adapters, unload,
    unmerge_adapters,
)
from .peft_format import load_adapter, load_adapters, read_adapter_config, save_adapter, save_adapters


def apply_lora(model, targets="all-linear", name: str = "default", **options) -> InjectionReport:
    """Shortcut: add a LoRA adapter (options are LoraConfig fields), freeze the base, return the report."""
    return add_adapter(model, LoraConfig(targets=targets, **options), name)


__all__ = [
    "AdapterLayer", "AdapterTargets", "BottleneckConfig", "IA3Config", "InjectionReport", "LoraConfig",
    "active_adapters", "adapter_configs", "adapter_layers", "add_adapter", "apply_lora", "combine_adapters",
    "config_from_dict", "config_to_dict", "delete_adapter", "disable_adapters", "find_targets", "load_adapter",
    "load_adapters", "save_adapters",
    "mark_trainable", "merge_adapters", "merge_and_unload", "read_adapter_config", "save_adapter",
    "set_active_adapters", "unload", "unmerge_adapters",
]
