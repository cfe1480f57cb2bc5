"""Acceleration methods compared by the evaluator: a sampler plus, optionally, a bac caching method.

A method is configured as ``{sampler: ddpm|ddim|dpm, steps: N|auto, cache: <bac method>, **its params}``:
``full`` is the plain sampler, ``ddim`` fewer denoising steps (``steps: auto`` matches
the FLOPs of the ``bac`` method), the caching methods any of :func:`bac.available_methods`
on the full sampler. Plain plan methods (``bac``, ``acs``, ``uniform``, ...) are cached as
plan files next to the checkpoint; the others (forecasts, runtime rules) are built per run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import bac
from bac.policies.policy import DiffusionPolicy


@dataclass(frozen=True)
class Method:
    name: str
    sampler: str
    steps: int
    cache_method: str | None = None
    cache_params: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "cache": self.cache_method, **self.cache_params}

    @property
    def plan_file(self) -> bool:
        """Whether the method is a plain plan, cached as a plan file."""
        return self.cache_method in bac.plan_methods() and "forecast" not in self.cache_params


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
        cache_method = spec.pop("cache", None)
        if steps == "auto":
            if auto_steps is None:
                raise ValueError(f"method {name!r} has steps=auto, which needs a bac method to match")
            steps = auto_steps
        if cache_method is not None and cache_method not in bac.available_methods():
            raise ValueError(f"method {name!r}: unknown cache method {cache_method!r}; "
                             f"known: {bac.available_methods()}")
        if cache_method is None and spec:
            raise ValueError(f"method {name!r}: parameters {sorted(spec)} need a cache method")
        methods.append(Method(name, sampler, int(steps), cache_method, spec))
    return methods


def plan_path(directory: Path, method: Method) -> Path:
    params = "-".join(f"{k}{v}" for k, v in sorted(method.cache_params.items()))
    return directory / f"{method.cache_method}-{params}-{method.sampler}{method.steps}.json"


def load_or_make_schedule(policy: DiffusionPolicy, method: Method, calibration: bac.Calibration | None,
                          directory: Path, recompute: bool) -> bac.Plan | bac.Method:
    """The method's schedule: for a plain plan the cached plan file if it fits, else a new one saved there.

    A cached plan that does not fit the policy or sampler is an error unless ``recompute``.
    """
    source = calibration if calibration is not None else policy.model
    if not method.plan_file:
        return bac.build_method(method.cache_method, source, num_steps=method.steps, scheduler=policy.sampler,
                                **method.cache_params)
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
    plan = bac.make_plan(source, method.cache_method, num_steps=method.steps, scheduler=policy.sampler,
                         **method.cache_params)
    plan.save(path)
    return plan


@contextlib.contextmanager
def applied(policy: DiffusionPolicy, method: Method,
            schedule: bac.Plan | bac.Method | None) -> Iterator[bac.CacheHandle | None]:
    """Set the method's sampler and caching schedule on ``policy`` for the duration of the block."""
    policy.set_sampler(method.sampler, method.steps)
    handle = policy.accelerate(schedule) if schedule is not None else None
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()
