"""Acceleration methods compared by the evaluator: a sampler plus, optionally, a bac plan.

A method is configured as ``{sampler: ddpm|ddim|dpm, steps: N|auto, plan: <bac plan method>, **plan params}``:
``full`` is the plain sampler, ``ddim`` fewer denoising steps (``steps: auto`` matches
the FLOPs of the ``bac`` method), the caching methods a plan on the full sampler.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import bac
from policies.policy import DiffusionPolicy


@dataclass(frozen=True)
class Method:
    name: str
    sampler: str
    steps: int
    plan_method: str | None = None
    plan_params: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "plan": self.plan_method, **self.plan_params}


def parse_methods(config: Mapping[str, Mapping[str, Any]], selected, default_sampler: str, default_steps: int,
                  auto_steps: int | None = None) -> list[Method]:
    """Methods named in ``selected`` (all if empty), from ``config``; ``auto`` steps resolve to ``auto_steps``."""
    names = list(selected) or list(config)
    unknown = [n for n in names if n not in config]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; configured methods: {sorted(config)}")
    methods = []
    for name in names:
        spec = dict(config[name] or {})
        sampler = spec.pop("sampler", default_sampler)
        steps = spec.pop("steps", default_steps)
        plan_method = spec.pop("plan", None)
        if steps == "auto":
            if auto_steps is None:
                raise ValueError(f"method {name!r} has steps=auto, which needs a bac method to match")
            steps = auto_steps
        if plan_method is not None and plan_method not in bac.plan_methods():
            raise ValueError(f"method {name!r}: unknown plan {plan_method!r}; known: {bac.plan_methods()}")
        if plan_method is None and spec:
            raise ValueError(f"method {name!r}: parameters {sorted(spec)} need a plan")
        methods.append(Method(name, sampler, int(steps), plan_method, spec))
    return methods


def plan_path(directory: Path, method: Method) -> Path:
    params = "-".join(f"{k}{v}" for k, v in sorted(method.plan_params.items()))
    return directory / f"{method.plan_method}-{params}-{method.sampler}{method.steps}.json"


def load_or_make_plan(policy: DiffusionPolicy, method: Method, calibration: bac.Calibration | None,
                      directory: Path, recompute: bool) -> bac.Plan:
    """The method's plan: the cached plan file if it fits, else a new one saved there.

    A cached plan that does not fit the policy or sampler is an error unless ``recompute``.
    """
    path = plan_path(directory, method)
    if path.exists() and not recompute:
        plan = bac.Plan.load(path)
        try:
            plan.check_fits(bac.describe(policy.model), num_steps=policy.num_inference_steps, scheduler=policy.sampler)
        except bac.PlanMismatchError as err:
            raise bac.PlanMismatchError(
                f"cached plan {path} does not fit this policy/sampler: {err}. "
                "Re-run with calibration.recompute=true to replace it."
            ) from err
        return plan
    source = calibration if calibration is not None else policy.model
    plan = bac.make_plan(source, method.plan_method, num_steps=method.steps, scheduler=policy.sampler,
                         **method.plan_params)
    plan.save(path)
    return plan


@contextlib.contextmanager
def applied(policy: DiffusionPolicy, method: Method, plan: bac.Plan | None) -> Iterator[bac.CacheHandle | None]:
    """Set the method's sampler and plan on ``policy`` for the duration of the block."""
    policy.set_sampler(method.sampler, method.steps)
    handle = policy.accelerate(plan) if plan is not None else None
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()
