"""Command-line overrides: 'section.key=value' strings applied to a raw config dict before it is validated.

A text field takes its value as written (paths with spaces, ' #' or ':'); other values are read as YAML."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import yaml

from .errors import ConfigError


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply command-line 'section.key=value' strings to a raw config dict (see `parse_override`)."""
    return set_values(data, dict(parse_override(item) for item in overrides))


def set_values(data: dict, values: dict[str, Any]) -> dict:
    """A copy of the raw config dict with {'section.key': value} set: values are used as they are, never
    re-parsed (code passes values; only the command line has a syntax)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for path, value in values.items():
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """'section.key=value' -> ('section.key', value). A text field takes the value as written, so a path may
    hold spaces, ' #' or ':' (wrap it in quotes to keep surrounding spaces); `null` clears an optional field;
    numbers, booleans, and lists or mappings ([q_proj, v_proj], {a: 1}) are read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. training.lr=2e-4")
    path, raw = item.split("=", 1)
    path, text = path.strip(), raw.strip()
    annotation = _field_annotation(path.split("."))
    if _takes_list_of_text(annotation) and text and not text.startswith(("[", "{")) and text not in ("null", "~"):
        return path, [_unquoted(text)]  # one item, as written: data.weak.functions=my rules #2.yaml
    if _takes_text(annotation) and not text.startswith(("[", "{")):
        if text in ("null", "~") and type(None) in typing.get_args(annotation):
            return path, None
        return path, _unquoted(text)
    try:
        return path, yaml.safe_load(raw) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot read {raw!r} ({getattr(e, 'problem', e)}); quote text values") from None


def _field_annotation(keys: list[str]) -> Any:
    """The annotated type of config field section.key (section.sub.key for a nested section like data.weak; for
    the adapter: of any adapter kind), or None."""
    if len(keys) < 2:
        return None
    if keys[0] == "adapter":
        from .adapters.config import KINDS
        if len(keys) != 2:
            return None
        if keys[1] == "kind":
            return str
        return next((typing.get_type_hints(c)[keys[1]] for c in KINDS.values() if keys[1] in typing.get_type_hints(c)),
                    None)
    from .config import RunConfig
    annotation: Any = RunConfig
    for key in keys:
        cls = next((a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)), None)
        if cls is None:
            return None
        annotation = typing.get_type_hints(cls).get(key)
    return annotation


def _unquoted(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def _takes_list_of_text(annotation: Any) -> bool:
    """A list of text (data.weak.functions), optional or not, that takes no single text (unlike targets)."""
    if _takes_text(annotation):
        return False
    lists = [a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is list]
    return any(typing.get_args(a) == (str,) for a in lists)


def _takes_text(annotation: Any) -> bool:
    """A str field, an optional one, a text-or-list one (targets), or a choice of words."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    return str in args
