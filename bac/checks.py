"""Argument checks shared by the core and the commands: one wording for every bad number and device."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

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


def check_device(name: Any) -> torch.device:
    """The torch device ``name`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``), refused with a :class:`bac.ConfigError`
    unless this torch build and machine have it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"setting device: {name!r} is not a torch device ({err}); use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("a CPU-only build of torch" if torch.version.cuda is None
                   else f"a CUDA build of torch {torch.__version__}, but no GPU is visible")
            raise ConfigError(f"setting device={name}: this is {why}, so CUDA is not available here; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"setting device={name}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"setting device={name}: this torch build or machine has no MPS; use device=cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"setting device={name}: bac runs on cpu, cuda or mps")
    return device
