"""Budget variants: :func:`bac.plan_for_budget` plans made on this machine for the evaluator's runs.

The cost model is measured once per sampler (probe plans, timed at batch 1 like the latency
table), the target latency resolved (``match``: another variant's measured latency with the same
timer, so "equal measured latency" means equal on this machine in this run), then the plan made,
measured and, if the prediction was off, refit (see :mod:`bac.budget`).

A modelled run (``realtime.latency_ms``) measures nothing: its episodes give every call the modelled
latency whatever its plan, so its plans are made for that model (:func:`modelled_cost`) and are the
same on any machine under any load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

import bac
from bac.budget import budget_ms
from bac.policies.policy import Batch, DiffusionPolicy

from .variants import Variant


def build_budgeted(policy: DiffusionPolicy, variants: list[Variant], built: dict[str, bac.Method],
                   calibrations: dict[str, bac.Calibration], batch: Batch, *, threads: int, repeats: int,
                   warmup: int, control_hz: float | None = None, actions_per_chunk: int | None = None,
                   modelled_ms: float | None = None) -> tuple[dict[str, bac.Method], dict[str, dict]]:
    """The method of every budget variant and what each plan was made for (``built``: the other variants'
    methods, which a ``match`` budget reads; left as it is).

    ``control_hz``: the rate of a ``{control_hz: target}`` budget (the realtime evaluator's current rate);
    ``actions_per_chunk``: the actions a chunk runs at a control-rate budget (default ``n_action_steps``);
    ``modelled_ms``: a modelled run's latency per call: the plans are made for :func:`modelled_cost`, nothing timed.
    """
    made: dict[str, bac.Method] = {}
    info: dict[str, dict] = {}
    costs: dict[str, tuple] = {}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator(device=policy.device)
    try:
        for variant in (v for v in variants if v.budgeted):
            view = policy.with_sampler(variant.sampler, variant.steps)
            key = f"{variant.sampler}{variant.steps}"
            calibration = calibrations[key]
            if modelled_ms is not None:
                cost, timer = modelled_cost(calibration, modelled_ms), None
            else:
                if key not in costs:
                    timer = bac.plan_timer(view.model, _seeded_call(view, batch, generator),
                                           scheduler=view.sampler.scheduler, repeats=repeats, warmup=warmup)
                    costs[key] = (*bac.BlockCost.measure(timer, calibration), timer)
                cost, points, timer = costs[key]
            params = dict(variant.params)
            target: dict = {}
            if "match" in params:
                other = _plan_of(params.pop("match"), variant, variants, {**built, **made}, calibration)
                if timer is None:  # modelled: the matched plan takes the modelled latency, as every plan does
                    target["latency_ms"] = matched = modelled_ms
                else:
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
            try:
                chosen = bac.plan_for_budget(calibration, cost=cost, timer=timer, **target, **params)
            except bac.BudgetError as err:
                if modelled_ms is None:
                    raise
                budget = budget_ms(**target, headroom=params.get("headroom", 0.5))
                raise bac.BudgetError(
                    f"method {variant.name!r}: its budget of {budget:g} ms is below the modelled latency "
                    f"realtime.latency_ms={modelled_ms:g}, which every call takes whatever its plan: no plan fits. "
                    f"Lower realtime.latency_ms, raise the budget, or leave the method out") from err
            made[variant.name] = bac.Method("budget", chosen.plan, params=dict(chosen.plan.params))
            info[variant.name] = {"target": variant.params, **chosen.describe()}
            if "match" in variant.params:
                info[variant.name]["matched_ms"] = matched
    finally:
        torch.set_num_threads(previous_threads)
    return made, info


def modelled_cost(calibration: bac.Calibration, latency_ms: float) -> bac.BlockCost:
    """The cost model of a modelled run: a call takes ``latency_ms`` whatever it computes (the latency model its
    episodes run with, :func:`bac.runtime.constant_latency`). A budget it meets gets the every-step plan (skipping
    buys no time); one below it has no plan."""
    return bac.BlockCost(float(latency_ms), {b.name: 0.0 for b in calibration.blocks}, calibration.num_steps,
                         "modelled")


def _seeded_call(policy: DiffusionPolicy, batch: Batch, generator: torch.Generator):
    """One sampling call of ``policy`` on ``batch``, its noise seeded alike every time (what the timer runs)."""
    return lambda: policy.predict_action_chunk(batch, generator=generator.manual_seed(0))


def budget_path(out: Path, variant: Variant) -> Path:
    """Where a run saves the plan of a budget variant (beside it, ``.budget.json``: what it was made for)."""
    return out / "plans" / f"{variant.name}.json"


def budget_plans(cfg: DictConfig, policy: DiffusionPolicy, variants: list[Variant], built: dict[str, bac.Method],
                 calibrations: dict, batch: Batch, out: Path, control_hz: float | None = None,
                 actions_per_chunk: int | None = None,
                 modelled_ms: float | None = None) -> tuple[dict[str, bac.Method], dict[str, dict]]:
    """The budget variants' methods, made (and saved in ``out``) or, when resuming a run, reloaded; and what each
    was made for. The other arguments are :func:`build_budgeted`'s (``cfg``: its ``latency`` settings)."""
    budgeted = [v for v in variants if v.budgeted]
    saved = {v.name: budget_path(out, v) for v in budgeted}
    if budgeted and all(path.exists() for path in saved.values()):  # a resumed run keeps the plans its episodes used
        made, info = {}, {}
        for variant in budgeted:
            record = json.loads(saved[variant.name].with_suffix(".budget.json").read_text())
            made[variant.name] = bac.Method("budget", bac.Plan.load(saved[variant.name]), params=record["params"])
            info[variant.name] = record["budget"] | {"reloaded": True}
        return made, info
    made, info = build_budgeted(policy, variants, built, calibrations, batch, threads=int(cfg.latency.threads),
                                repeats=int(cfg.latency.repeats), warmup=int(cfg.latency.warmup),
                                control_hz=control_hz, actions_per_chunk=actions_per_chunk, modelled_ms=modelled_ms)
    for variant in budgeted:
        made[variant.name].schedule.save(saved[variant.name])
        saved[variant.name].with_suffix(".budget.json").write_text(json.dumps(
            {"params": made[variant.name].params, "budget": info[variant.name]}, indent=1))
    return made, info


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
