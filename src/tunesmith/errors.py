"""Errors that speak to the user: what was wrong, where, and how to fix it."""
from __future__ import annotations

import difflib
from typing import Iterable


class TunesmithError(Exception):
    """Base class for every error tunesmith raises on purpose."""


class ConfigError(TunesmithError, ValueError):
    """A config value is missing, mistyped or out of range."""


class TargetNotFoundError(TunesmithError, ValueError):
    """An adapter target matched no module (or only modules it cannot wrap)."""


class AdapterLoadError(TunesmithError, ValueError):
    """An adapter file is corrupt or does not fit the model it is loaded into."""


class AdapterStateError(TunesmithError, RuntimeError):
    """An adapter operation is impossible in the model's current state."""


def closest(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates most similar to `word` (case-insensitive), best first."""
    cands = sorted(set(candidates))
    lower = {c.lower(): c for c in cands}
    hits = difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.5)
    return [lower[h] for h in hits]
