"""Plans for a latency budget: per-block update counts chosen for a target call latency or control rate.

BAC's ``M`` gives every block the same number of updates; a robot has a deadline instead, and blocks differ
both in what an update costs and in what it buys. :func:`plan_for_budget` spends the budget where it buys
the most ACS score: a cost model measured on the target machine (:class:`BlockCost`), an exact knapsack over
the per-block ACS scores (:func:`bac.allocate_updates`), ACS schedules and BUA at those counts, and a
measured check that refits the model and remakes the plan when it is off. Costs are the machine's: keep a
budget plan for the machine it was made on. The algorithm: docs/guide/realtime.md ("Plans for a deadline").
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .acs import acs_schedule, acs_scores
from .allocation import BudgetError, allocate_updates
from .bua import bubbling_union
from .calibration import METRICS, Calibration
from .checks import check_number
from .errors import ConfigError
from .plan import Plan

#: ``timer(plans) -> latency in ms of one sampling call under each plan`` (medians of interleaved repeats).
PlanTimer = Callable[[Sequence[Plan]], Sequence[float]]


@dataclass(frozen=True)
class BlockCost:
    """Latency model of one sampling call: ``fixed_ms + sum_b block_ms[b] * updates_b`` (milliseconds)."""

    fixed_ms: float
    block_ms: dict[str, float]
    num_steps: int
    source: str = "given"  # "measured", "refit" or "given"

    def predict(self, updates: dict[str, int]) -> float:
        """Predicted latency of a call with ``updates[b]`` evaluations of block ``b``."""
        missing = sorted(set(self.block_ms) - set(updates))
        if missing:
            raise ConfigError(f"no update count for blocks {missing[:4]}")
        return self.fixed_ms + sum(self.block_ms[b] * updates[b] for b in self.block_ms)

    def predict_plan(self, plan: Plan) -> float:
        return self.predict({b.name: len(b.update_steps) for b in plan.blocks})

    def to_dict(self) -> dict:
        return {"fixed_ms": self.fixed_ms, "block_ms": dict(self.block_ms), "num_steps": self.num_steps,
                "source": self.source}

    @classmethod
    def measure(cls, timer: PlanTimer, source: Calibration, groups: str = "kind") -> tuple["BlockCost", list]:
        """Measure the cost model on this machine from a few probe plans of ``source``'s blocks.

        Probes: every block at every step; per group of blocks (``groups="kind"``: all SA, all CA, all
        FFN blocks; ``"block"``: each block alone), that group at step 0 only and the others at every
        step; and two sparse plans, every block at step 0 only and every block at ``max(2, K // 10)``
        evenly spaced steps. The least-squares fit of all probes gives the blocks' relative costs
        (equal within a group); the sparse probes then fix ``fixed_ms`` and the scale (:meth:`refit`),
        because a call is not exactly linear in its updates (a dense call keeps more in cache) and budget
        plans live in the sparse regime. Returns the model and the ``(updates, measured_ms)`` points.
        """
        if groups not in ("kind", "block"):
            raise ConfigError(f"groups must be 'kind' or 'block', got {groups!r}")
        k = source.num_steps
        if k < 2:
            raise ConfigError("a cost model needs a sampler of at least 2 steps (one step cannot be cached)")
        names = [b.name for b in source.blocks]
        keys = [b.kind if groups == "kind" else b.name for b in source.blocks]
        members = {key: [n for n, g in zip(names, keys) if g == key] for key in dict.fromkeys(keys)}
        sparse = max(2, k // 10)
        probes = [{n: k for n in names}]
        probes += [{n: (1 if n in group else k) for n in names} for group in members.values()]
        probes += [{n: 1 for n in names}, {n: sparse for n in names}]
        steps = {1: [0], k: list(range(k)), sparse: [i * k // sparse for i in range(sparse)]}
        plans = [Plan.from_steps(source, {n: steps[c] for n, c in counts.items()}, k, "cost-probe",
                                 scheduler=source.scheduler) for counts in probes]
        measured = [float(t) for t in timer(plans)]
        points = list(zip(probes, measured))
        # columns: fixed, then each group's updates (its blocks share one per-update cost)
        design = np.array([[1.0] + [sum(counts[n] for n in group) for group in members.values()]
                           for counts in probes])
        solution, *_ = np.linalg.lstsq(design, np.array(measured), rcond=None)
        block_ms = {n: max(float(c), 1e-6) for group, c in zip(members.values(), solution[1:]) for n in group}
        return cls(float(solution[0]), block_ms, k, "measured").refit(points[-2:], source="measured"), points

    def refit(self, points: Sequence[tuple[dict[str, int], float]], source: str = "refit") -> "BlockCost":
        """Least squares on ``fixed_ms`` and one scale of every block cost over measured ``(updates, ms)`` points.

        The block costs keep their ratios (the probes measured them); what drifts between the probes
        and real plans (other threads, caches warm or cold, the plan's bookkeeping) moves the two
        parameters of the fit."""
        design = np.array([[1.0, sum(self.block_ms[b] * counts[b] for b in self.block_ms)] for counts, _ in points])
        times = np.array([ms for _, ms in points])
        if len(points) == 1 or np.ptp(design[:, 1]) == 0:  # one distinct plan: keep the scale, move fixed_ms
            fixed, scale = float(np.mean(times - design[:, 1])), 1.0
        else:
            (fixed, scale), *_ = np.linalg.lstsq(design, times, rcond=None)
        scale = max(float(scale), 1e-6)
        return replace(self, fixed_ms=float(fixed), block_ms={b: c * scale for b, c in self.block_ms.items()},
                       source=source)


@dataclass(frozen=True)
class BudgetPlan:
    """What :func:`plan_for_budget` made: the plan, its predicted (and measured) latency, the model behind it."""

    plan: Plan
    budget_ms: float
    predicted_ms: float
    cost: BlockCost
    updates: dict[str, int]  # per block, after BUA
    measured_ms: float | None = None
    history: list = field(default_factory=list)  # one entry per plan tried: predicted, measured, cost source
    deadline_ms: float | None = None
    slowest_ms: float | None = None  # the slowest measured call (a timer that keeps its samples)

    @property
    def fits(self) -> bool | None:
        """Whether the measured median is within the budget and the slowest call within the deadline
        (``None`` when nothing was measured)."""
        if self.measured_ms is None:
            return None
        late = self.deadline_ms is not None and self.slowest_ms is not None and self.slowest_ms > self.deadline_ms
        return self.measured_ms <= self.budget_ms and not late

    def describe(self) -> dict:
        return {"budget_ms": self.budget_ms, "predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms,
                "deadline_ms": self.deadline_ms, "slowest_ms": self.slowest_ms,
                "fits": self.fits, "updates": self.updates, "cost": self.cost.to_dict(), "history": self.history,
                "computed_share": self.plan.computed_count() / (len(self.plan.blocks) * self.plan.num_steps)}


def budget_ms(latency_ms: float | None = None, control_hz: float | None = None, actions_per_chunk: int | None = None,
              headroom: float = 0.5) -> float:
    """The latency budget of one sampling call: ``latency_ms`` as given, or the time ``actions_per_chunk``
    actions take at ``control_hz`` times ``headroom`` (the share left for the tail latency and the
    control loop's own work; a chunk computed while the previous one executes must arrive within it).
    The default, 0.5, leaves room for calls inside a control loop running slower than back to back and
    for their tail on a busy host; 0.75 missed ticks (measured: docs/results/control-loop.md)."""
    if (latency_ms is None) == (control_hz is None):
        raise ConfigError("give exactly one of latency_ms or control_hz")
    if latency_ms is not None:
        check_number("latency_ms", latency_ms, 1e-9)
        return float(latency_ms)
    check_number("control_hz", control_hz, 1e-9)
    if actions_per_chunk is None:
        raise ConfigError("control_hz needs actions_per_chunk (the actions executed from each chunk)")
    check_number("actions_per_chunk", actions_per_chunk, 1, integer=True)
    check_number("headroom", headroom, 1e-9, 1.0)
    return 1000.0 * actions_per_chunk / control_hz * headroom


def plan_for_budget(
    calibration: Calibration,
    *,
    latency_ms: float | None = None,
    control_hz: float | None = None,
    actions_per_chunk: int | None = None,
    headroom: float = 0.5,
    cost: BlockCost | None = None,
    timer: PlanTimer | None = None,
    n: int = 5,
    metric: str = "cosine",
    tolerance: float = 0.1,
    max_refits: int = 3,
    resolution: int = 2000,
    deadline_ms: float | None = None,
) -> BudgetPlan:
    """The plan with the most ACS score whose predicted call latency fits the budget (docs/guide/realtime.md).

    Budget: ``latency_ms``, or ``control_hz`` with ``actions_per_chunk`` (see :func:`budget_ms`).
    ``cost``: a :class:`BlockCost` for this machine; without it ``timer`` measures one
    (:meth:`BlockCost.measure`). ``timer`` (e.g. :func:`plan_timer`): also measures the chosen
    plan; a measurement more than ``tolerance`` (relative) from the prediction, or over the budget,
    refits the model on every point so far and remakes the plan, at most ``max_refits`` times
    (:attr:`BudgetPlan.fits` says whether the last one's measurement is within the budget). ``n``: BUA's
    top-n (0: per-block ACS only). A budget below one update per block raises
    :class:`BudgetError`; a budget above full computation gives the every-step plan.

    ``deadline_ms`` (with ``control_hz``: the time ``actions_per_chunk`` actions take): a bound on the
    plan's *tail*. The budget bounds the median; when a ``timer`` that keeps its samples
    (:func:`plan_timer`) measures the plan's slowest call over the deadline, the budget shrinks by
    that ratio and the plan is remade (a refit, at most ``max_refits`` in all): a robot sizes its
    chunk schedule by the tail, and calls on a busy CPU spread far beyond their median.
    """
    budget = budget_ms(latency_ms, control_hz, actions_per_chunk, headroom)
    deadline_ms = _deadline(deadline_ms, budget, control_hz, actions_per_chunk)
    _check_search_options(metric, n, tolerance, max_refits, resolution)
    cost, points = _cost_model(calibration, cost, timer)
    planner = _Planner(calibration, metric, n, resolution)
    return _search(planner, cost, points, budget, deadline_ms, timer, tolerance, max_refits)


def _deadline(deadline_ms: float | None, budget: float, control_hz: float | None,
              actions_per_chunk: int | None) -> float | None:
    """The bound on a call's tail: as given, or with ``control_hz`` the time a chunk's actions take; not below the budget."""
    if deadline_ms is None and control_hz is not None:
        deadline_ms = 1000.0 * actions_per_chunk / control_hz
    if deadline_ms is not None:
        check_number("deadline_ms", deadline_ms, budget)
    return deadline_ms


def _check_search_options(metric: str, n: int, tolerance: float, max_refits: int, resolution: int) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {METRICS}")
    check_number("n (BUA top-n)", n, 0, integer=True)
    check_number("tolerance", tolerance, 0)
    check_number("max_refits", max_refits, 0, integer=True)
    check_number("resolution", resolution, 10, integer=True)


def _cost_model(calibration: Calibration, cost: BlockCost | None, timer: PlanTimer | None) -> tuple[BlockCost, list]:
    """``cost``, or one measured by ``timer``, checked to cover the calibration; and the points measured so far."""
    points: list = []
    if cost is None:
        if timer is None:
            raise ConfigError("plan_for_budget needs cost= (a BlockCost) or timer= to measure one on this machine")
        cost, points = BlockCost.measure(timer, calibration)
    names = [b.name for b in calibration.blocks]
    if sorted(cost.block_ms) != sorted(names) or cost.num_steps != calibration.num_steps:
        raise ConfigError(f"the cost model covers {len(cost.block_ms)} blocks and {cost.num_steps} steps; the "
                          f"calibration has {len(names)} blocks and {calibration.num_steps} steps")
    return cost, points


def _search(planner: _Planner, cost: BlockCost, points: list, budget: float, deadline_ms: float | None,
            timer: PlanTimer | None, tolerance: float, max_refits: int) -> BudgetPlan:
    """Make the plan; with a timer, measure it and refit the model (on every point) and remake the plan while
    the model is off, the plan overshoots the budget or its tail the deadline, at most ``max_refits`` times."""
    history: list = []
    while True:
        try:
            plan, updates = planner.fit(cost, budget)
        except BudgetError:
            fastest = planner.fastest_updates()
            if timer is None or any(counts == fastest for counts, _ in points):
                raise
            # the model says nothing fits; ask the machine before refusing
            points.append((fastest, float(timer([planner.fastest_probe()])[0])))
            cost = cost.refit(points)
            continue
        predicted = cost.predict(updates)
        entry = {"predicted_ms": predicted, "measured_ms": None, "cost_source": cost.source}
        history.append(entry)
        measured, tail = _measure(timer, plan, updates, points, entry)
        late = deadline_ms is not None and tail is not None and tail > deadline_ms
        # refit when the model is off, or when the plan, measured, overshoots the budget (the contract)
        off = measured is not None and (abs(measured - predicted) > tolerance * predicted or measured > budget)
        if not (off or late) or len(history) > max_refits:
            return BudgetPlan(plan, budget, predicted, cost, updates, measured, history, deadline_ms, tail)
        if late:  # the tail, not the median, misses the deadline: ask for a faster median
            budget *= deadline_ms / tail
            entry["shrunk_budget_to_ms"] = budget
        if off:
            cost = cost.refit(points)


def _measure(timer: PlanTimer | None, plan: Plan, updates: dict, points: list,
             entry: dict) -> tuple[float | None, float | None]:
    """The plan's measured median and slowest call (None without a timer, or from a timer that keeps no samples),
    recorded in the history ``entry``; the median joins the fit's ``points``."""
    if timer is None:
        return None, None
    measured = entry["measured_ms"] = float(timer([plan])[0])
    points.append((updates, measured))
    samples = getattr(timer, "samples", None)
    if not samples:
        return measured, None
    tail = entry["slowest_ms"] = float(max(samples[0]))
    return measured, tail


class _Planner:
    """The plan search over one calibration: its per-block ACS scores, read once; :meth:`fit` gives the plan
    with the most score that a cost model predicts within a budget."""

    def __init__(self, calibration: Calibration, metric: str, n: int, resolution: int):
        self.calibration, self.metric, self.n, self.resolution = calibration, metric, n, resolution
        self.names = [b.name for b in calibration.blocks]
        self.matrices = calibration.matrix(metric)
        self.maximize = metric == "cosine"
        self.gains = [acs_scores(m, self.maximize) for m in self.matrices]
        self.errors = {b.name: float(e) for b, e in zip(calibration.blocks, calibration.reuse_error)}

    def fastest_updates(self) -> dict[str, int]:
        """The update counts of the fastest plan: every block once."""
        return {name: 1 for name in self.names}

    def fastest_probe(self) -> Plan:
        """The fastest plan (every block at step 0), to time."""
        return Plan.from_steps(self.calibration, {name: [0] for name in self.names}, self.calibration.num_steps,
                               "cost-probe", scheduler=self.calibration.scheduler)

    def fit(self, cost: BlockCost, budget: float) -> tuple[Plan, dict[str, int]]:
        """The best plan within ``budget`` by ``cost`` and its per-block update counts (:class:`BudgetError`
        when not even one update per block fits)."""
        k = self.calibration.num_steps
        spare = budget - cost.fixed_ms
        minimum = sum(cost.block_ms.values())
        if spare < minimum:
            raise BudgetError(f"a budget of {budget:.1f} ms is below this model's fastest plan on this machine: "
                              f"{cost.fixed_ms + minimum:.1f} ms (fixed {cost.fixed_ms:.1f} ms plus one update of "
                              f"every block); raise the budget or run fewer sampler steps")
        if cost.fixed_ms + k * minimum <= budget:  # full computation fits
            steps = {name: list(range(k)) for name in self.names}
        else:
            unit = spare / self.resolution
            steps = self._largest_fitting([max(1, math.ceil(cost.block_ms[name] / unit)) for name in self.names],
                                          budget)
        params = {"latency_ms": round(budget, 3), "n": self.n, "metric": self.metric}
        plan = Plan.from_steps(self.calibration, steps, k, "budget", params, scheduler=self.calibration.scheduler,
                               calibration=self.calibration.facts(), weights=self.calibration.weights)
        return plan, {name: len(steps[name]) for name in self.names}

    def _largest_fitting(self, units: list[int], budget: float) -> dict[str, list[int]]:
        """The schedules of the largest allocation, in ``units`` of ``resolution`` per block update, whose plan fits.

        BUA adds updates the allocation did not pay for: bisect for the largest allocation budget whose plan,
        BUA included, fits (one update per block always fits: BUA only adds step 0 then)."""
        low, high = sum(units), self.resolution
        best, spent = self._schedules(units, low)
        if spent > self.resolution:
            raise BudgetError(f"with BUA (n={self.n}) no plan fits {budget:.1f} ms; try n=0 or a larger budget")
        while low < high:
            middle = (low + high + 1) // 2
            steps, spent = self._schedules(units, middle)
            if spent <= self.resolution:
                low, best = middle, steps
            else:
                high = middle - 1
        return best

    def _schedules(self, units: list[int], allowed: int) -> tuple[dict[str, list[int]], int]:
        """ACS schedules at the counts the allocation gives within ``allowed`` units, BUA applied; their units."""
        counts = allocate_updates(self.gains, units, allowed)
        steps = {name: acs_schedule(m, c, self.maximize) for name, m, c in zip(self.names, self.matrices, counts)}
        steps = bubbling_union(steps, self.calibration.blocks, self.errors, self.n)
        return steps, sum(u * len(steps[name]) for u, name in zip(units, self.names))


def plan_timer(model: nn.Module, run_call: Callable[[], Any], *, scheduler: Any = None, repeats: int = 7,
               warmup: int = 2) -> PlanTimer:
    """A :data:`PlanTimer` for ``model``: ``run_call()`` (one whole sampling call, e.g. a policy's
    ``predict_action_chunk`` on a batch-1 observation) under each plan, the plans interleaved in
    every repeat, the median of ``repeats`` after ``warmup`` rounds (all of them in ``timer.samples``).
    CUDA is synchronised around each call. Set the thread count you will run with
    (``torch.set_num_threads(1)`` for batch 1) before timing."""
    from .engine import accelerate

    check_number("repeats", repeats, 1, integer=True)
    check_number("warmup", warmup, 0, integer=True)
    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timer(plans: Sequence[Plan]) -> list[float]:
        times: list[list[float]] = [[] for _ in plans]
        timer.samples = times  # every repeat of the last call's plans: the tail plan_for_budget checks
        for round_ in range(warmup + repeats):
            for i, plan in enumerate(plans):
                with accelerate(model, plan, num_steps=plan.num_steps, scheduler=scheduler):
                    sync()
                    start = time.perf_counter()
                    run_call()
                    sync()
                    elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[i].append(1000.0 * elapsed)
        return [statistics.median(t) for t in times]

    return timer
