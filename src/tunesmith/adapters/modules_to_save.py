"""Modules an adapter trains in full (a new head, say): each adapter owns its copy, the original stays as it was.

PEFT's ModulesToSaveWrapper semantics and state-dict layout, so files and behaviour carry over:

    <name>.original_module.*              the base module: never trained, what disabled adapters run
    <name>.modules_to_save.<adapter>.*    the adapter's own copy: trained, saved as <name>.* in the file

forward runs the copy of the active adapter that owns one, else the original. A copy is a deep copy of the
module alone, so it shares no tensor with the rest of the model: training a tied lm_head through
modules_to_save leaves the input embeddings as they are (as in PEFT).
"""
from __future__ import annotations

import copy
from typing import Iterable

from torch import nn

from ..errors import AdapterStateError

_OWN = ("original_module", "modules_to_save", "module_name", "active_adapters", "disabled")


class ModulesToSave(nn.Module):
    """Wraps one module trained in full by some adapters; see the module docstring."""

    def __init__(self, original_module: nn.Module, module_name: str = "") -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.module_name = module_name
        self.active_adapters: list[str] = []  # at most one owner of a copy: the one that runs
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN or name.startswith("__"):
                raise
            return getattr(self.module_in_use, name)  # e.g. .weight, .out_features (PEFT does the same)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    @property
    def module_in_use(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, or the original when disabled or none owns one."""
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def add(self, adapter: str, source: nn.Module | None = None) -> None:
        """Give `adapter` its own copy of the original module (or of `source`, e.g. another adapter's copy)."""
        if adapter in self.modules_to_save:
            raise AdapterStateError(f"{self.module_name}: adapter {adapter!r} already has its own copy of this module")
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module if source is None else source)

    def delete(self, adapter: str) -> None:
        if adapter in self.modules_to_save:
            del self.modules_to_save[adapter]
        self.active_adapters = [n for n in self.active_adapters if n != adapter]

    def owner(self, names: Iterable[str]) -> str | None:
        """Which of `names` owns a copy of this module (None: none does). Two owners cannot run together."""
        owners = [n for n in names if n in self.modules_to_save]
        if len(owners) > 1:
            raise AdapterStateError(
                f"{self.module_name}: adapters {owners} each train their own copy of this module, and only one copy can "
                "run at a time; use one of them at a time (PEFT has the same rule)")
        return owners[0] if owners else None

    def set_active(self, names: Iterable[str]) -> None:
        owner = self.owner(names)
        self.active_adapters = [] if owner is None else [owner]

    def forward(self, *args, **kwargs):
        return self.module_in_use(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}"
