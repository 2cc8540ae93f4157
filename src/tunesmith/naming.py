"""Name matching shared by adapters, freezing and heads (PEFT's rules, so configs carry over)."""
from __future__ import annotations

import re
from typing import Sequence, Union

Pattern = Union[str, Sequence[str]]


def matches(name: str, pattern: Pattern | None) -> bool:
    """A list matches exact names or dotted suffixes ('q_proj' ~ 'x.q_proj'); a string is a full-name regex."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: a parameter is inside each of these modules."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches_any_prefix(param_name: str, pattern: Pattern | None) -> bool:
    return any(matches(p, pattern) for p in prefixes(param_name))


HEAD_NAMES = ("lm_head", "classifier", "score", "head", "fc")


def is_head_name(name: str) -> bool:
    """Top-level output heads by convention: 'classifier', 'score', 'lm_head', 'head', 'fc' (or one level in)."""
    parts = name.split(".")
    return parts[0] in HEAD_NAMES and len(parts) <= 2
