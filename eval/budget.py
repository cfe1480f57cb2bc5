"""Budget variants: :func:`bac.plan_for_budget` plans made on this machine for the evaluator's runs.

The cost model is measured once per sampler (probe plans, timed at batch 1 like the latency
table), the target latency resolved (``match``: another variant's measured latency with the same
timer, so "equal measured latency" means equal on this machine in this run), then the plan made,
measured and, if the prediction was off, refit (see :mod:`bac.budget`).
"""
from __future__ import annotations

import torch

import bac
from bac.policies.policy import Batch, DiffusionPolicy

from .variants import Variant


def build_budgeted(policy: DiffusionPolicy, variants: list[Variant], built: dict[str, bac.Method],
                   calibrations: dict[str, bac.Calibration], batch: Batch, *, threads: int, repeats: int,
                   warmup: int, control_hz: float | None = None,
                   actions_per_chunk: int | None = None) -> dict[str, dict]:
    """Make the plan of every budget variant (added to ``built``); returns what each plan was made for.

    ``control_hz``: the rate of a ``{control_hz: target}`` budget (the realtime evaluator's current rate);
    ``actions_per_chunk``: the actions a chunk runs at a control-rate budget (default ``n_action_steps``).
    """
    info: dict[str, dict] = {}
    costs: dict[str, tuple] = {}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator(device=policy.device)
    try:
        for variant in (v for v in variants if v.budgeted):
            policy.set_sampler(variant.sampler, variant.steps)
            key = f"{variant.sampler}{variant.steps}"
            calibration = calibrations[key]
            if key not in costs:
                timer = bac.plan_timer(policy.model,
                                       lambda: policy.predict_action_chunk(batch, generator=generator.manual_seed(0)),
                                       scheduler=policy.sampler, repeats=repeats, warmup=warmup)
                costs[key] = (*bac.BlockCost.measure(timer, calibration), timer)
            cost, points, timer = costs[key]
            params = dict(variant.params)
            target: dict = {}
            if "match" in params:
                other = _plan_of(params.pop("match"), variant, variants, built, calibration)
                target["latency_ms"] = matched = timer([other])[0]
                # the matched plan is a measured point in the regime the budget plan will run in
                counts = {b.name: len(b.update_steps) for b in other.blocks}
                cost = cost.refit(points[-2:] + [(counts, matched)])
            elif "latency_ms" in params:
                target["latency_ms"] = float(params.pop("latency_ms"))
            else:
                rate = params.pop("control_hz")
                if rate == "target" and control_hz is None:
                    raise ValueError(f"method {variant.name!r}: control_hz: target is each rate of mode=realtime; "
                                     "give a rate (or latency_ms) here")
                target |= {"control_hz": float(control_hz if rate == "target" else rate),
                           "actions_per_chunk": actions_per_chunk or policy.n_action_steps}
            chosen = bac.plan_for_budget(calibration, cost=cost, timer=timer, **target, **params)
            built[variant.name] = bac.Method("budget", chosen.plan, params=dict(chosen.plan.params))
            info[variant.name] = {"target": variant.params, **chosen.describe()}
            if "match" in variant.params:
                info[variant.name]["matched_ms"] = matched
    finally:
        torch.set_num_threads(previous_threads)
    return info


def _plan_of(name: str, variant: Variant, variants: list[Variant], built: dict[str, bac.Method],
             calibration: bac.Calibration) -> bac.Plan:
    """The plan of variant ``name`` (the every-step plan of a variant without caching), on ``variant``'s sampler."""
    other = next((v for v in variants if v.name == name), None)
    if other is None or (other.sampler, other.steps) != (variant.sampler, variant.steps):
        raise ValueError(f"method {variant.name!r} matches the latency of {name!r}, which must be a method of the "
                         f"same run on the same sampler ({variant.sampler}-{variant.steps})")
    if other.name not in built:
        return bac.make_plan(calibration, "every-step", num_steps=variant.steps)
    schedule = built[other.name].schedule
    if not isinstance(schedule, bac.Plan):
        raise ValueError(f"method {variant.name!r} matches {name!r}, a runtime rule: its latency depends on the "
                         "data; match a static plan or give latency_ms")
    return schedule
