"""The method registry: every caching method by name, with typed parameters.

A method is *when* each block runs (update steps that become a static :class:`bac.Plan`, or a runtime
:class:`bac.Rule`) plus *what stands in* for a block that does not run (:class:`bac.Reuse` or
:class:`bac.Taylor`). It declares its name, whether it needs a :class:`bac.Calibration`, and its parameters
as a frozen dataclass (validated in ``__post_init__``), whose field names are the Hydra configs' and
:func:`build_method`'s keywords. Adding a method is one file: docs/guide/caching-methods.md ("Adding a
method").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..adapters import ModelSpec, describe
from ..calibration import Calibration
from ..checks import check_number
from ..errors import ConfigError, ConfigTypeError, PlanMismatchError
from ..plan import Plan
from ..rules import Rule
from ..standins import REUSE, Standin, make_standin

# builder(params, spec, num_steps, calibration) -> (update steps per block name | Rule, stand-in or None[, fitted])
# where `fitted` (a static method's profile or fit: JSON data) joins the plan's params, so a plan file carries it
Builder = Callable[[Any, Any, "int | None", "Calibration | None"], tuple]


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, parameter dataclass, calibration need and builder."""

    name: str
    params: type
    needs_calibration: bool
    static: bool  # builds update steps (a plan) rather than a runtime rule
    build: Builder
    needs_attention: bool = False  # its calibration must profile attention (bac.calibrate(..., attention=True))

    @property
    def summary(self) -> str:
        return (self.build.__doc__ or "").strip().split("\n")[0]

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(self.params)}


@dataclass(frozen=True)
class Method:
    """A method built for one model: its schedule and stand-in, ready for :func:`bac.accelerate`."""

    name: str
    schedule: Plan | Rule
    standin: Standin = REUSE
    params: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int | None:
        """The step count a plan fixes (``None`` for runtime rules)."""
        return self.schedule.num_steps if isinstance(self.schedule, Plan) else None

    def describe(self) -> dict:
        return {"method": self.name, **self.params, **self.standin.describe()}


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, params: type, needs_calibration: bool = False, static: bool = True,
                    needs_attention: bool = False):
    """Register ``fn(params, spec, num_steps, calibration) -> (schedule, stand-in[, fitted])`` as method ``name``.

    ``params`` is a dataclass whose fields (with defaults) are the method's
    parameters. A ``static`` method's schedule is a dict of update steps per
    block name (made into a :class:`bac.Plan` for ``num_steps``); otherwise it
    is a :class:`bac.Rule`. A stand-in of ``None`` means the rule's own
    (``rule.standin``), the plan's fitted one, or reuse. ``fitted`` (JSON data: a profile, a fit) joins the
    plan's params, so a plan file carries it. ``needs_attention``: the calibration must profile attention.
    """
    if not dataclasses.is_dataclass(params) or not isinstance(params, type):
        raise ConfigTypeError(f"method {name!r}: params must be a dataclass type, not {params!r}")
    missing = [f.name for f in dataclasses.fields(params) if f.default is dataclasses.MISSING]
    if missing:
        raise ConfigTypeError(f"method {name!r}: every parameter needs a default, {missing} have none")

    def decorator(fn: Builder) -> Builder:
        if name in _METHODS:
            raise ConfigError(f"caching method {name!r} is already registered")
        _METHODS[name] = MethodInfo(name, params, needs_calibration, static, fn, needs_attention)
        return fn

    return decorator


def available_methods() -> list[str]:
    """Every method name :func:`build_method` accepts."""
    return sorted(_METHODS)


def method_info(name: str) -> MethodInfo:
    """The registration of method ``name`` (parameters, calibration need, summary)."""
    if name not in _METHODS:
        raise ConfigError(f"unknown caching method {name!r}; available: {available_methods()}")
    return _METHODS[name]


def needs_calibration(name: str) -> bool:
    """Whether method ``name`` is built from a :class:`bac.Calibration`."""
    return method_info(name).needs_calibration


def method_params(name: str, **values: Any) -> Any:
    """Method ``name``'s parameter dataclass with ``values`` (an unknown name is an error listing the known)."""
    info = method_info(name)
    known = info.defaults()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"method {name!r} takes parameters {sorted(known)}, not {unknown}")
    return info.params(**values)


def build_method(
    name: str,
    source: Calibration | ModelSpec | nn.Module,
    *,
    num_steps: int | None = None,
    scheduler: Any = None,
    standin: str | Standin | None = None,
    **params: Any,
) -> Method:
    """Build method ``name`` for a model (or its :class:`bac.ModelSpec`, or a calibration of it).

    ``params`` are the method's (see :func:`method_params`); ``standin``
    (``"reuse"``, ``"taylor-1"``, ``"taylor-2"`` or a stand-in) replaces the
    method's own. Static schedules need ``num_steps`` unless ``source`` is a
    calibration, which fixes it; ``scheduler`` (default: the calibration's) is
    recorded in the plan and checked when it is applied. A plan of a method
    that needs a calibration records the calibration's weights digest and
    refuses other weights (see :meth:`bac.Plan.check_fits`).
    """
    info = method_info(name)
    values = method_params(name, **params)
    calibration = source if isinstance(source, Calibration) else None
    if info.needs_calibration and calibration is None:
        raise ConfigError(f"method {name!r} needs a Calibration (bac.calibrate), not a model")
    if isinstance(source, nn.Module):
        source = describe(source)
    if calibration is not None:
        if info.needs_calibration and num_steps is not None and num_steps != calibration.num_steps:
            raise PlanMismatchError(f"calibration covers {calibration.num_steps} steps, not {num_steps}")
        num_steps = calibration.num_steps if num_steps is None else num_steps
        scheduler = calibration.scheduler if scheduler is None else scheduler
    if info.static and num_steps is None:
        raise ConfigError(f"method {name!r} makes a static plan and needs num_steps when no calibration is given")
    if num_steps is not None:
        check_number("num_steps (the sampler's step count)", num_steps, 1, integer=True)
    schedule, own_standin, *fitted = info.build(values, source, num_steps, calibration)
    recorded = {k: v for k, v in dataclasses.asdict(values).items() if v is not None}
    if info.static and isinstance(schedule, Mapping):
        # only a plan planned from calibration statistics depends on the weights they were recorded on
        weights = calibration.weights if calibration is not None and info.needs_calibration else None
        schedule = Plan.from_steps(
            source, schedule, num_steps, name, {**recorded, **(fitted[0] if fitted else {})}, scheduler=scheduler,
            calibration=calibration.facts() if calibration else None, weights=weights,
        )
        own_standin = own_standin or schedule.fitted_standin()
    elif info.static or not isinstance(schedule, Rule):
        wanted = "update steps per block" if info.static else "a bac.Rule"
        raise ConfigTypeError(f"method {name!r} built {type(schedule).__name__}, not {wanted}")
    chosen = make_standin(standin) if standin is not None else own_standin or getattr(schedule, "standin", None)
    return Method(name, schedule, chosen or REUSE, recorded)


def make_plan(
    source: Calibration | ModelSpec | nn.Module,
    method: str = "bac",
    *,
    num_steps: int | None = None,
    scheduler: Any = None,
    **params: Any,
) -> Plan:
    """The static plan of ``method`` (see :func:`build_method`); a runtime rule is an error."""
    built = build_method(method, source, num_steps=num_steps, scheduler=scheduler, **params)
    if not isinstance(built.schedule, Plan):
        raise ConfigError(f"method {method!r} is a runtime rule, not a static plan: use bac.build_method")
    return built.schedule


def same_steps(blocks: Sequence[Any], steps: Sequence[int]) -> dict[str, list[int]]:
    """The same update steps for every block."""
    return {b.name: list(steps) for b in blocks}
