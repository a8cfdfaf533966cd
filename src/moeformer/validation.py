"""Config validation machinery: typed fields, dotted-key errors, dicts to nested dataclasses.

Generic only: the rules of one kind of component (MLA's fields, MoE counts) live with its config in
:mod:`moeformer.model_config`. This module imports nothing from moeformer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value; ``key`` is its dotted path, e.g. ``model.attention.n_heads``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}", self.message)


def check_field_types(obj: Any) -> None:
    """Check every field against its annotation (int, float, bool, str, Literal, Optional)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f.name, f"expected {_describe(hints[f.name])}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value}")


def probability(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(name, f"must be in [0, 1), got {value}")


def from_dict(cls: type[T], data: Any, prefix: str) -> T:
    """Build dataclass ``cls`` from a (TOML) mapping, recursing into nested dataclasses.

    Errors carry the dotted key under ``prefix``; unknown keys list the allowed ones.
    """
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{prefix}.{key}", f"unknown key; allowed keys: {allowed}")
        nested = _dataclass_in(hints[key])
        if nested is not None and value is not None:
            value = from_dict(nested, value, f"{prefix}.{key}")
        kwargs[key] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}", "missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in ``hint`` (``X`` or ``X | None``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
