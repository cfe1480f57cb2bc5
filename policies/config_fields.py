"""Type checks shared by every policy config dataclass: scalar fields read from ``config.json`` strictly."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping

from bac.errors import ConfigError


def is_kind(value: Any, kind: type) -> bool:
    """``isinstance`` without the surprises: a bool is no int, a float is finite, an int is a float."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def typed_fields(cls, data: Mapping[str, Any], where: str, complete: bool = False) -> dict[str, Any]:
    """Check ``data`` against a dataclass of scalar fields: no unknown keys, right types; defaults fill gaps
    unless ``complete`` (every field must be present)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {known}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if complete or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
                raise ConfigError(f"{where}: missing field {f.name!r}" + (
                    f" (a saved config lists every field of {cls.__name__}; a default could differ from "
                    "what the weights were trained with)" if complete else ""))
            continue
        value, kind = data[f.name], hints[f.name]
        if kind is tuple and isinstance(value, list):  # JSON has lists only
            value = tuple(value)
        if not is_kind(value, kind):
            raise ConfigError(f"{where}.{f.name} must be {kind.__name__}, got {value!r}")
        values[f.name] = float(value) if kind is float else value
    return values


def check_transformer(config) -> None:
    """The fields every transformer model config has: ``width``, ``num_layers``, ``heads``, ``dropout``."""
    name = type(config).__name__
    for key in ("width", "num_layers", "heads"):
        if not is_kind(getattr(config, key), int) or getattr(config, key) < 1:
            raise ConfigError(f"{name}.{key} must be a positive int, got {getattr(config, key)!r}")
    if config.width % config.heads:
        raise ConfigError(f"{name}: width {config.width} is not divisible by heads {config.heads}")
    if not is_kind(config.dropout, float) or not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"{name}.dropout must be in [0, 1), got {config.dropout!r}")
