"""Caching methods by name: *when* a block runs (a schedule) plus *what stands in* (reuse or forecast).

Every plan method (:func:`bac.register_plan_method`: ``bac``, ``acs``,
``unified-acs``, ``uniform``, ``every-step``) is a method, with reuse by
default or a Taylor forecast (``forecast="taylor", order=1|2``). Methods
that are not plain plans are registered here with :func:`register_method`:

==============  =========================================  ====================================
method          when a block runs                          what stands in
==============  =========================================  ====================================
``taylorseer``  every ``interval`` steps (after warm-up)   Taylor forecast, ``order`` 1 or 2
``fbcache``     first layer always; the rest when its      last value
                residual changed more than ``threshold``
``cg-taylor``   first layer always; the rest when its own  Taylor forecast
                Taylor forecast missed by ``gate`` or more
``sortblock``   all every ``interval`` steps; in between   linear extrapolation
                the ``fraction`` that changes most
==============  =========================================  ====================================

Adding a method is one registered builder; nothing else changes::

    @bac.register_method("my-method")
    def _mine(spec, num_steps, calibration, interval: int = 3):
        return MyRule(interval), bac.Taylor(1)
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .adapters import ModelSpec, describe
from .calibration import Calibration
from .forecast import REUSE, Reuse, Taylor, make_forecast
from .plan import Plan, scheduler_id
from .rules import CGTaylor, FirstBlockCache, Rule, Sortblock, check_number
from .schedulers import make_plan, needs_calibration as plan_needs_calibration, plan_methods


@dataclass(frozen=True)
class Method:
    """A schedule and its stand-in, ready for :func:`bac.accelerate`."""

    name: str
    schedule: Plan | Rule
    forecast: Reuse | Taylor = REUSE
    params: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int | None:
        """The step count a plan fixes (``None`` for runtime rules)."""
        return self.schedule.num_steps if isinstance(self.schedule, Plan) else None

    def describe(self) -> dict:
        return {"method": self.name, **self.params, **self.forecast.describe()}


Builder = Callable[..., tuple]
_METHODS: dict[str, tuple[Builder, bool]] = {}


def register_method(name: str, needs_calibration: bool = False):
    """Register ``fn(spec, num_steps, calibration, **params) -> (schedule, stand-in)`` as method ``name``."""

    def decorator(fn: Builder) -> Builder:
        if name in plan_methods():
            raise ValueError(f"{name!r} is already a plan method")
        _METHODS[name] = (fn, needs_calibration)
        return fn

    return decorator


def available_methods() -> list[str]:
    """Every method name :func:`build_method` accepts."""
    return sorted(set(_METHODS) | set(plan_methods()))


def needs_calibration(name: str) -> bool:
    """Whether method ``name`` is built from a :class:`bac.Calibration`."""
    if name in _METHODS:
        return _METHODS[name][1]
    if name not in plan_methods():
        raise ValueError(f"unknown caching method {name!r}; available: {available_methods()}")
    return plan_needs_calibration(name)


def _parameters(fn: Builder) -> dict[str, Any]:
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[3:]}


def build_method(
    name: str,
    source: Calibration | ModelSpec | nn.Module,
    *,
    num_steps: int | None = None,
    scheduler: Any = None,
    **params: Any,
) -> Method:
    """Build method ``name`` for a model (or its spec, or a calibration of it).

    Plan methods take their own parameters plus ``forecast`` (``None`` or
    ``"taylor"``) and ``order``; they need ``num_steps`` unless ``source`` is
    a calibration, which fixes it. Registered methods take theirs (see the
    module docstring) and build static plans for ``num_steps`` where their
    schedule is static.
    """
    if name in _METHODS:
        fn, calibrated = _METHODS[name]
        accepted = _parameters(fn)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(f"method {name!r} takes parameters {sorted(accepted)}, not {unknown}")
        calibration = source if isinstance(source, Calibration) else None
        if calibrated and calibration is None:
            raise ValueError(f"method {name!r} needs a Calibration (bac.calibrate)")
        if calibration is not None:
            num_steps = calibration.num_steps if num_steps is None else num_steps
        elif isinstance(source, nn.Module):
            source = describe(source)
        schedule, standin = fn(source, num_steps, calibration, **params)
        if isinstance(schedule, Plan) and scheduler is not None:
            schedule = dataclasses.replace(schedule, scheduler=scheduler_id(scheduler))
        recorded = {**{k: v for k, v in accepted.items() if v is not None}, **params}
        return Method(name, schedule, standin, recorded)
    if name not in plan_methods():
        raise ValueError(f"unknown caching method {name!r}; available: {available_methods()}")
    forecast = params.pop("forecast", None)
    order = params.pop("order", 1)
    plan = make_plan(source, name, num_steps=num_steps, scheduler=scheduler, **params)
    return Method(name, plan, make_forecast(forecast, order), dict(plan.params))


@register_method("taylorseer")
def _taylorseer(spec, num_steps, calibration, interval: int = 4, order: int = 2, warmup: int = 1):
    """TaylorSeer: every block computed in the first ``warmup`` steps and then every ``interval`` steps."""
    check_number("num_steps (the sampler's step count)", num_steps, 1, integer=True)
    check_number("interval", interval, 1, integer=True)
    check_number("warmup", warmup, 1, integer=True)
    steps = sorted(set(range(min(warmup, num_steps))) | set(range(warmup, num_steps, interval)))
    params = {"interval": interval, "order": order, "warmup": warmup}
    plan = Plan.from_steps(spec, {b.name: steps for b in spec.blocks}, num_steps, "taylorseer", params)
    return plan, Taylor(order)


@register_method("fbcache")
def _fbcache(spec, num_steps, calibration, threshold: float = 0.05):
    return FirstBlockCache(threshold), REUSE


@register_method("cg-taylor")
def _cg_taylor(spec, num_steps, calibration, gate: float = 0.05, order: int = 1, warmup: int = 2):
    rule = CGTaylor(gate, order, warmup)
    return rule, rule.forecast


@register_method("sortblock")
def _sortblock(spec, num_steps, calibration, fraction: float = 0.5, interval: int = 4, warmup: int = 2,
               order: int = 1):
    rule = Sortblock(fraction, interval, warmup, order)
    return rule, rule.forecast
