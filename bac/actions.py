"""Deprecated alias of :mod:`bac.rows` (step rows), kept for one release: in a robot project an "action" is
a robot command, so the engine's bit rows are called rows. ``actions_from_table`` is
:func:`bac.rows.rows_from_table`; every other name is unchanged.
"""
import warnings

from . import rows

_NAMES = {"NOTIFY": "NOTIFY", "RUN": "RUN", "STORE": "STORE", "AlwaysCompute": "AlwaysCompute",
          "BoundSchedule": "BoundSchedule", "StaticRows": "StaticRows", "actions_from_table": "rows_from_table"}


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"bac.actions.{name} is deprecated: use bac.rows.{_NAMES[name]}", DeprecationWarning, stacklevel=2)
    return getattr(rows, _NAMES[name])
