"""Runtime-rule methods: FBCache, CG-Taylor and Sortblock (see :mod:`bac.rules` for how each decides)."""
from __future__ import annotations

from dataclasses import dataclass

from ..rules import CGTaylor, FirstBlockCache, Sortblock
from .registry import register_method


@dataclass(frozen=True)
class FBCacheParams:
    threshold: float = 0.05  # relative L1 change of the first layer's residual that forces a full step

    def __post_init__(self):
        FirstBlockCache(self.threshold)  # validates


@register_method("fbcache", FBCacheParams, static=False)
def fbcache(params, spec, num_steps, calibration):
    """First layer always; the rest when its residual changed by more than ``threshold``."""
    return FirstBlockCache(params.threshold), None


@dataclass(frozen=True)
class CGTaylorParams:
    gate: float = 0.05  # relative L1 error of the first layer's own forecast that forces a full step
    order: int = 1
    warmup: int = 2

    def __post_init__(self):
        CGTaylor(self.gate, self.order, self.warmup)  # validates


@register_method("cg-taylor", CGTaylorParams, static=False)
def cg_taylor(params, spec, num_steps, calibration):
    """First layer always; the rest forecast while the first layer's own Taylor forecast misses by under ``gate``."""
    return CGTaylor(params.gate, params.order, params.warmup), None


@dataclass(frozen=True)
class SortblockParams:
    fraction: float = 0.5  # share of blocks recomputed between full steps
    interval: int = 4
    warmup: int = 2
    order: int = 1

    def __post_init__(self):
        Sortblock(self.fraction, self.interval, self.warmup, self.order)  # validates


@register_method("sortblock", SortblockParams, static=False)
def sortblock(params, spec, num_steps, calibration):
    """All blocks every ``interval`` steps; in between the ``fraction`` whose residual changes most."""
    return Sortblock(params.fraction, params.interval, params.warmup, params.order), None
