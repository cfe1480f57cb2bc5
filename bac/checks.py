"""Argument checks shared by the core: one wording for every bad number."""
from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import ConfigError


def check_number(name: str, value: Any, low: float, high: float = math.inf, integer: bool = False) -> None:
    """Raise :class:`bac.ConfigError` (a ``ValueError``) unless ``value`` is a number (an integer if ``integer``)
    in ``[low, high]``.

    Booleans, strings and NaN are refused; NumPy scalars are numbers.
    """
    kind = numbers.Integral if integer else numbers.Real
    valid = not isinstance(value, bool) and isinstance(value, kind)
    if not valid or value != value or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {what} in [{low}, {high}], got {value!r}")
