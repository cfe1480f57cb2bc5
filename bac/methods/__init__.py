"""Caching methods by name: one registry (:mod:`bac.methods.registry`) and the built-in methods.

================  =========================================  ====================================
method            when a block runs                          what stands in
================  =========================================  ====================================
``bac``           static plan: block-wise ACS + BUA          last value
``acs``           static plan: block-wise ACS                last value
``unified-acs``   static plan: one ACS schedule              last value
``forecast-acs``  static plan: exact DP on the squared       last value (``order=0``) or linear
                  error of the stand-in really used          extrapolation (``order=1``)
``uniform``       static plan: every N steps                 last value
``every-step``    every step                                 (nothing skipped)
``taylorseer``    every ``interval`` steps (after warm-up)   Taylor forecast, ``order`` 1 or 2
``fbcache``       first layer always; the rest when its      last value
                  residual changed more than ``threshold``
``cg-taylor``     first layer always; the rest when its own  Taylor forecast
                  Taylor forecast missed by ``gate`` or more
``sortblock``     all every ``interval`` steps; in between   linear extrapolation
                  the ``fraction`` that changes most
================  =========================================  ====================================

A static plan can then be refined against the model's real output with :func:`bac.refine`
(``<method>+refined``).

Any method takes ``standin="taylor-1"`` (or ``"taylor-2"``, ``"reuse"``) to replace its stand-in.
"""
from . import forecast, plans, runtime_rules, taylorseer  # noqa: F401  (register the built-in methods)
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
