"""What every entry point shares: errors as one line, and Hydra's config folder.

A :class:`~bac.errors.BacError` (a bad setting, file or input) is printed as ``error: ...`` on
stderr with exit status 2; ``BAC_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) re-raises it with
its traceback. Any other exception is a bug and always keeps its traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from bac.errors import BacError

EXIT_USER_ERROR = 2


def debug_requested() -> bool:
    return os.environ.get("BAC_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def report_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point: a :class:`BacError` becomes one stderr line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BacError as err:
            if debug_requested():
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
