"""TaylorSeer: every block on a fixed interval, Taylor forecasts in between."""
from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_number
from ..errors import ConfigError
from ..standins import Taylor
from .registry import register_method, same_steps


@dataclass(frozen=True)
class TaylorSeerParams:
    interval: int = 4
    order: int = 2  # 1: linear extrapolation; 2: second order
    warmup: int = 1  # leading steps computed in full

    def __post_init__(self):
        check_number("interval", self.interval, 1, integer=True)
        check_number("order", self.order, 1, 2, integer=True)
        check_number("warmup", self.warmup, 1, integer=True)


@register_method("taylorseer", TaylorSeerParams)
def taylorseer(params, spec, num_steps, calibration):
    """TaylorSeer: every block computed in the first ``warmup`` steps and then every ``interval`` steps."""
    if num_steps is None:
        raise ConfigError("taylorseer makes a static plan and needs num_steps, the sampler's step count")
    warmup, interval = params.warmup, params.interval
    steps = sorted(set(range(min(warmup, num_steps))) | set(range(warmup, num_steps, interval)))
    return same_steps(spec.blocks, steps), Taylor(params.order)
