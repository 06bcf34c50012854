"""Dataclass configs built from plain dicts, validated before anything is built.

An unknown key is an error that names the key, where it was found and the closest valid names.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

from .registry import closest

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration that cannot be built; the message names the culprit."""


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Light type check/coercion: ints for floats, tuples for lists; errors name the field."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, os.PathLike):  # a pathlib.Path where a path string goes
        return os.fspath(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[C], data: dict[str, Any] | None, where: str) -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ``ConfigError``."""
    data = dict(data or {})
    names = field_names(cls)
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {key!r} in {where}; {closest(key, names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
