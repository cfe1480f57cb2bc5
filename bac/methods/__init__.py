"""Caching methods by name: one registry (:mod:`bac.methods.registry`) and the built-in methods.

Each method is *when* a block runs (a static plan or a runtime rule) plus *what stands in* for a block that
does not run; :func:`build_method` makes one by name, and any method takes ``standin="taylor-1"`` (or
``"taylor-2"``, ``"reuse"``) to replace its stand-in. The table of every built-in method:
docs/guide/caching-methods.md ("Every method").
"""
from . import ertacache, forecast, plans, profiling, runtime_rules, taylorseer  # noqa: F401  (the built-in methods)
from .registry import (
    Method,
    MethodInfo,
    available_methods,
    build_method,
    make_plan,
    method_info,
    method_params,
    needs_calibration,
    register_method,
)

__all__ = [
    "Method",
    "MethodInfo",
    "available_methods",
    "build_method",
    "make_plan",
    "method_info",
    "method_params",
    "needs_calibration",
    "register_method",
]
