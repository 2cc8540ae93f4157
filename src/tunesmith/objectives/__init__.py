"""Objectives: what a run optimises. One module per objective, each a small object the loop calls
(the interface is in base.py); a new objective is a new module here that sets `OBJECTIVE = TheClass`.

    from tunesmith.objectives import make_objective, objective_names
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from ..errors import ConfigError
from .base import Objective
from .losses import IGNORE, classification_loss_sum, lm_loss_sum, lm_token_correct, macro_f1, span_f1

__all__ = ["IGNORE", "Objective", "classification_loss_sum", "default_objective", "lm_loss_sum", "lm_token_correct",
           "macro_f1", "make_objective", "objective_class", "objective_names", "span_f1"]


@cache
def _registry() -> dict[str, type[Objective]]:
    found = {}
    for mod in pkgutil.iter_modules(__path__):
        cls = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "OBJECTIVE", None)
        if cls is not None:
            found[cls.name] = cls
    return dict(sorted(found.items()))


def objective_names() -> tuple[str, ...]:
    return tuple(_registry())


def objective_class(name: str) -> type[Objective]:
    try:
        return _registry()[name]
    except KeyError:
        raise ConfigError(f"objective.type: unknown objective {name!r}; choose auto or one of "
                          f"{', '.join(objective_names())}") from None


def default_objective(fmt: str) -> type[Objective]:
    """The objective `objective.type: auto` picks for a data format."""
    for cls in _registry().values():
        if fmt in cls.default_for:
            return cls
    raise ConfigError(f"no objective trains on {fmt!r} data; set objective.type (one of {', '.join(objective_names())})")


def choose_objective(requested: str, fmt: str) -> type[Objective]:
    """The configured objective (or the format's default), checked against the data format."""
    cls = default_objective(fmt) if requested == "auto" else objective_class(requested)
    if fmt not in cls.formats:
        fits = [n for n, c in _registry().items() if fmt in c.formats]
        raise ConfigError(f"objective.type={cls.name} does not train on {fmt} data (it takes "
                          f"{', '.join(cls.formats)}); for {fmt} data use objective.type: {' or '.join(fits) or 'auto'}")
    return cls


def make_objective(name: str, params: dict | None = None) -> Objective:
    """Rebuild a run's objective from run.json (its name and `params()`)."""
    return objective_class(name)(**(params or {}))
