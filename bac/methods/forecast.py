"""Forecast-aware ACS (``forecast-acs``): per-block update steps planned for the stand-in really used.

See :mod:`bac.forecast`: the exact dynamic program over the calibration's Gram
matrices, for reuse (``order=0``) or linear extrapolation (``order=1``, the
:class:`bac.Taylor` stand-in). With ``allocate=True`` the same total number of
updates (``M`` per block on average) is shared out between blocks where it
removes the most squared error (an exact multiple-choice knapsack over every
block's error curve, :func:`bac.allocate_updates`), instead of ``M`` each.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..allocation import allocate_updates
from ..checks import check_number
from ..errors import ConfigError
from ..forecast import ORDERS, forecast_errors, forecast_schedule
from ..standins import REUSE, Taylor
from .registry import register_method


@dataclass(frozen=True)
class ForecastACSParams:
    M: int = 10  # updates per block (on average, with allocate)
    order: int = 1  # stand-in the schedule is planned for: 0 reuse, 1 linear extrapolation
    allocate: bool = False  # share M x blocks updates between blocks by their error curves

    def __post_init__(self):
        check_number("M (updates per block)", self.M, 1, integer=True)
        check_number("order", self.order, 0, max(ORDERS), integer=True)
        if not isinstance(self.allocate, bool):
            raise ConfigError(f"allocate must be true or false, not {self.allocate!r}")


@register_method("forecast-acs", ForecastACSParams, needs_calibration=True)
def forecast_acs(params, spec, num_steps, calibration):
    """Per-block update steps of least squared stand-in error (exact DP on Gram matrices), reuse or Taylor-1."""
    check_number("M (updates per block)", params.M, 1, num_steps, integer=True)
    grams = calibration.gram_matrices()
    if params.allocate:
        gains = [-forecast_errors(g, params.order) for g in grams]
        counts = allocate_updates(gains, [1] * len(grams), params.M * len(grams))
    else:
        counts = [params.M] * len(grams)
    steps = {b.name: forecast_schedule(g, m, params.order) for b, g, m in zip(spec.blocks, grams, counts)}
    return steps, (Taylor(1) if params.order == 1 else REUSE)
