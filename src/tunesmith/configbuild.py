"""Build a config dataclass from plain data (parsed YAML, JSON, dotted overrides) by its annotations.

One builder for every config section, the adapter included: each value is checked and converted to its
field's annotated type (so `r: "16"` and `r: 16` give the same int), then the dataclass's `__post_init__`
checks ranges and cross-field rules. Errors name the key: `training.lr: expected a number, got 'fast'`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union

from .errors import ConfigError, closest

T = TypeVar("T")


def key_path(where: str, key: object) -> str:
    """`where.key`, or just `key` at the top (an adapter config is built on its own, then prefixed)."""
    return f"{where}.{key}" if where else str(key)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (YAML reads '2e-4' as text, an override
    `r='16'` too); a ConfigError names `where` and what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping {{name: value}}, got {value!r}")
        return {coerce(k, args[0], where): coerce(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        return _to_int(value, where)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if dataclasses.is_dataclass(tp):  # a nested section (data.weak): a mapping of its own fields
        return value if isinstance(value, tp) else build(tp, value, where)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
        as_float = float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if as_float != int(as_float):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(as_float)


def check_keys(cls: type, data: dict, where: str) -> None:
    """Every key must be a field of `cls`; the error names the nearest one."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = closest(str(key), names, n=1)
            hint = f"; did you mean {key_path(where, near[0])}?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{key_path(where, key)}: unknown key{hint}")


def build(cls: type[T], data: Any, where: str = "") -> T:
    """A `cls` instance from a mapping of its fields (None: all defaults), each value coerced to its
    annotation. Errors from `cls.__post_init__` pass through unchanged: they already name their field."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of keys, got {data!r}")
    check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    return cls(**{key: coerce(value, hints[key], key_path(where, key)) for key, value in data.items()})
