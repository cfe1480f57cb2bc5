"""A tuned configuration: the sampler settings and the caching plan ``python -m bac.tune`` picked.

A JSON file (``tuned.json``) next to its plan file::

    {"format": "bac-tuned/1", "sampler": "ddim", "steps": 5, "method": "bac", "params": {"M": 2, "n": 5},
     "plan": "plan.json", "weights": "<weights digest of the calibrated model>", "tolerance_points": 2.0,
     "budget_ms": null, "found": {...what the tuner measured...}}

``method`` and ``plan`` are ``null`` when caching did not win (the pick is a plain sampler). A warm-started
pick adds ``"warm": {"start": ..., "variant": ..., "threshold": ..., "jump": ...}`` (docs/guide/warm-starts.md);
a cold pick has no ``warm`` field.
One line applies it: ``policy.use_tuned("outputs/tune/.../tuned.json")`` (or
:meth:`TunedConfig.apply`); the plan is checked against the policy's model, weights and
sampler as any plan is. Every problem with the file is a :class:`bac.ConfigError` naming the file
and the field.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bac
from bac.errors import ConfigError

from .warm import WarmStart

FORMAT = "bac-tuned/1"
_FIELDS = {"format": str, "sampler": str, "steps": int, "method": (str, type(None)), "params": dict,
           "plan": (str, type(None)), "weights": (str, type(None)), "tolerance_points": (int, float),
           "budget_ms": (int, float, type(None)), "found": dict, "warm": (dict, type(None))}


@dataclass(frozen=True)
class TunedConfig:
    sampler: str
    steps: int
    method: str | None = None
    params: dict = field(default_factory=dict)
    plan: str | None = None  # the plan file, relative to the tuned file
    weights: str | None = None  # digest of the weights the plan was calibrated on
    tolerance_points: float = 2.0
    budget_ms: float | None = None
    found: dict = field(default_factory=dict)  # what the tuner measured (success, latency, candidates)
    warm: dict | None = None  # a warm-started pick's WarmStart fields (None: cold calls)
    path: Path | None = field(default=None, compare=False)  # where it was read from

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"format": FORMAT, **{k: v for k, v in asdict(self).items()
                                     if k != "path" and not (k == "warm" and v is None)}}
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TunedConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tuned configuration {path} does not exist (python -m bac.tune writes tuned.json)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"tuned configuration {path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"tuned configuration {path} must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ConfigError(f"{path}: field 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {unknown}; expected {sorted(_FIELDS)}")
        for name in ("sampler", "steps"):
            if name not in data:
                raise ConfigError(f"{path}: field {name!r} is missing")
        for name, kinds in _FIELDS.items():
            value = data.get(name)
            if name in data and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise ConfigError(f"{path}: field {name!r} has the wrong type ({type(value).__name__}: {value!r})")
        if data["steps"] < 1:
            raise ConfigError(f"{path}: field 'steps' must be >= 1, got {data['steps']}")
        if data.get("method") is not None:
            params = {k: v for k, v in data.get("params", {}).items() if k != "standin"}
            try:
                bac.method_params(data["method"], **params)
                if "standin" in data.get("params", {}):
                    bac.make_standin(data["params"]["standin"])
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{path}: fields 'method'/'params': {err}") from err
        if (data.get("method") is None) != (data.get("plan") is None):
            raise ConfigError(f"{path}: fields 'method' and 'plan' must both be set or both be null")
        if data.get("plan") is not None and not (path.parent / data["plan"]).is_file():
            raise ConfigError(f"{path}: field 'plan' names {path.parent / data['plan']}, which does not exist")
        if data.get("warm") is not None:
            try:
                WarmStart(**data["warm"]).check(data["steps"])
            except (ConfigError, TypeError) as err:
                raise ConfigError(f"{path}: field 'warm': {err}") from err
        data.pop("format")
        return cls(**data, path=path)

    def warm_start(self) -> WarmStart | None:
        return WarmStart(**self.warm) if self.warm is not None else None

    def plan_path(self) -> Path | None:
        if self.plan is None:
            return None
        return (self.path.parent if self.path is not None else Path(".")) / self.plan

    def load_plan(self) -> bac.Plan | None:
        path = self.plan_path()
        return bac.Plan.load(path) if path is not None else None

    def method_for(self, policy: Any) -> bac.Method | None:
        """The caching method to accelerate ``policy`` with (``None``: no caching), its stand-in included.

        The stand-in is the one the tuner measured: ``params["standin"]`` when set, else the method's
        own (``taylorseer`` forecasts; the calibrated plans reuse, or use the stand-in fitted into the plan).
        Call after the sampler is set.
        """
        plan = self.load_plan()
        if plan is None:
            return None
        params = {k: v for k, v in self.params.items() if k != "standin"}
        try:
            if "standin" in self.params:
                standin = bac.make_standin(self.params["standin"])
            elif bac.needs_calibration(self.method):  # the plan's fitted stand-in (ERTACache's), else reuse
                standin = plan.fitted_standin() or bac.REUSE
            else:  # an uncalibrated static method (uniform, taylorseer): its builder names its stand-in
                standin = bac.build_method(self.method, policy.model, num_steps=self.steps, scheduler=policy.sampler.scheduler,
                                           **params).standin
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{self.path}: fields 'method'/'params' ({self.method!r}, {self.params}): {err}") from err
        return bac.Method(self.method, plan, standin, dict(self.params))

    def apply(self, policy: Any) -> bac.CacheHandle | None:
        """Set ``policy``'s sampler and accelerate it with the plan; returns the handle (``None``: no caching).

        ``policy`` is a :class:`bac.policies.policy.DiffusionPolicy` (``make_sampler``, ``accelerate``); the
        plan is checked against its model, weights and sampler (:class:`bac.PlanMismatchError`).
        """
        policy.sampler, policy.graph = policy.make_sampler(self.sampler, self.steps), None
        policy.warm = self.warm_start()  # select_action warm-starts from its own state (reset: cold)
        policy.reset()
        method = self.method_for(policy)
        return policy.accelerate(method) if method is not None else None
