"""Static plan methods: the paper's BAC (block-wise ACS + BUA), its ablations, and uniform caching.

==============  ==================================================  ===========
method          update steps                                        calibration
==============  ==================================================  ===========
``every-step``  every block at every step (no caching)              no
``uniform``     all blocks together, ``M`` evenly spaced or every   no
                ``interval`` steps (FORA-like)
``unified-acs`` one ACS schedule for all blocks, from ``reference``  yes
``acs``         ACS on each block's own matrix (no BUA)              yes
``bac``         block-wise ACS, then BUA over the top-``n`` blocks   yes
==============  ==================================================  ===========
"""
from __future__ import annotations

from dataclasses import dataclass

from ..acs import acs_schedule
from ..bua import bubbling_union
from ..calibration import METRICS
from ..checks import check_number
from ..errors import ConfigError
from .registry import register_method, same_steps


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _check_budget(M: int, num_steps: int) -> int:
    check_number("M (updates per block)", M, 1, num_steps, integer=True)
    return int(M)


@dataclass(frozen=True)
class EveryStepParams:
    pass


@register_method("every-step", EveryStepParams)
def every_step(params, spec, num_steps, calibration):
    """Every block at every step: bit-identical to no caching."""
    return same_steps(spec.blocks, range(num_steps)), None


@dataclass(frozen=True)
class UniformParams:
    M: int | None = None  # updates per block, evenly spaced
    interval: int | None = None  # or: an update every `interval` steps

    def __post_init__(self):
        if (self.M is None) == (self.interval is None):
            raise ConfigError("uniform needs exactly one of M (updates per block) or interval")
        if self.interval is not None:
            check_number("interval", self.interval, 1, integer=True)
        else:
            check_number("M (updates per block)", self.M, 1, integer=True)


@register_method("uniform", UniformParams)
def uniform(params, spec, num_steps, calibration):
    """All blocks update together: every ``interval`` steps, or at M evenly spaced steps."""
    if params.interval is not None:
        steps = range(0, num_steps, int(params.interval))
    else:
        m = _check_budget(params.M, num_steps)
        steps = [i * num_steps // m for i in range(m)]
    return same_steps(spec.blocks, steps), None


@dataclass(frozen=True)
class UnifiedACSParams:
    M: int = 10
    metric: str = "cosine"
    reference: str = "mean"  # a block's name, or the mean of all blocks' matrices

    def __post_init__(self):
        check_number("M (updates per block)", self.M, 1, integer=True)
        _check_metric(self.metric)


@register_method("unified-acs", UnifiedACSParams, needs_calibration=True)
def unified_acs(params, spec, num_steps, calibration):
    """One ACS schedule for all blocks, from ``reference``: a block's name or ``"mean"`` of all blocks."""
    matrices = calibration.matrix(params.metric)
    if params.reference == "mean":
        matrix = matrices.mean(axis=0)
    else:
        names = [b.name for b in spec.blocks]
        if params.reference not in names:
            raise ConfigError(f"reference block {params.reference!r} is not one of the model's blocks")
        matrix = matrices[names.index(params.reference)]
    steps = acs_schedule(matrix, _check_budget(params.M, num_steps), params.metric == "cosine")
    return same_steps(spec.blocks, steps), None


@dataclass(frozen=True)
class ACSParams:
    M: int = 10
    metric: str = "cosine"

    def __post_init__(self):
        check_number("M (updates per block)", self.M, 1, integer=True)
        _check_metric(self.metric)


def _blockwise(spec, num_steps, calibration, M: int, metric: str) -> dict[str, list[int]]:
    m, maximize = _check_budget(M, num_steps), metric == "cosine"
    return {b.name: acs_schedule(s, m, maximize) for b, s in zip(spec.blocks, calibration.matrix(metric))}


@register_method("acs", ACSParams, needs_calibration=True)
def blockwise_acs(params, spec, num_steps, calibration):
    """ACS on each block's own matrix (the paper's ablation without BUA)."""
    return _blockwise(spec, num_steps, calibration, params.M, params.metric), None


@dataclass(frozen=True)
class BACParams:
    M: int = 10  # updates per block before BUA
    n: int = 5  # BUA top-n blocks by reuse error; 0 disables BUA
    metric: str = "cosine"

    def __post_init__(self):
        check_number("M (updates per block)", self.M, 1, integer=True)
        check_number("n (BUA top-n)", self.n, 0, integer=True)
        _check_metric(self.metric)


@register_method("bac", BACParams, needs_calibration=True)
def bac(params, spec, num_steps, calibration):
    """Block-wise ACS, then BUA over the top-n blocks by reuse error."""
    steps = _blockwise(spec, num_steps, calibration, params.M, params.metric)
    errors = {b.name: float(e) for b, e in zip(spec.blocks, calibration.reuse_error)}
    return bubbling_union(steps, spec.blocks, errors, params.n), None
