"""Plans for a latency budget: the exact allocator against brute force, the cost model, refits, the plans."""
import itertools

import numpy as np
import pytest
import torch

import bac
from bac.acs import acs_schedule

K = 10


def brute_force(gains, costs, budget):
    best, best_counts = -np.inf, None
    for counts in itertools.product(*[range(1, len(g) + 1) for g in gains]):
        if sum(c * m for c, m in zip(costs, counts)) <= budget:
            value = sum(g[m - 1] for g, m in zip(gains, counts))
            if value > best + 1e-12:
                best, best_counts = value, counts
    return best, best_counts


@pytest.mark.parametrize("seed", range(40))
def test_allocation_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    blocks, k = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    # general gains (not concave, not even monotone): the DP must not rely on either
    gains = [rng.normal(size=k) if seed % 2 else np.cumsum(rng.random(k)) for _ in range(blocks)]
    costs = [int(c) for c in rng.integers(1, 6, size=blocks)]
    budget = int(rng.integers(sum(costs), sum(costs) * k + 3))
    counts = bac.allocate_updates(gains, costs, budget)
    value, _ = brute_force(gains, costs, budget)
    assert sum(c * m for c, m in zip(costs, counts)) <= budget
    assert all(1 <= m <= k for m in counts)
    assert sum(g[m - 1] for g, m in zip(gains, counts)) == pytest.approx(value)


def test_allocation_prefers_cheap_blocks_with_big_gains():
    gains = [[0.0, 5.0, 6.0], [0.0, 1.0, 1.5]]  # block 0 gains much more from a second update
    assert bac.allocate_updates(gains, [1, 1], 3) == [2, 1]
    assert bac.allocate_updates(gains, [3, 1], 5) == [1, 2]  # ... unless it costs three times as much
    assert bac.allocate_updates(gains, [1, 1], 100) == [3, 3]


def test_allocation_refuses_a_budget_below_one_update_each():
    with pytest.raises(bac.BudgetError, match="over the budget"):
        bac.allocate_updates([[1.0, 2.0], [1.0, 2.0]], [2, 2], 3)
    with pytest.raises(ValueError, match="block cost"):
        bac.allocate_updates([[1.0]], [0], 3)


@pytest.mark.parametrize("maximize", [True, False])
def test_acs_scores_are_the_scores_of_acs_schedules(maximize):
    rng = np.random.default_rng(3)
    s = rng.random((7, 7))
    scores = bac.acs_scores(s, maximize)

    def score(steps):
        bounds = list(steps) + [7]
        total = sum(s[a, t] for a, b in zip(bounds, bounds[1:]) for t in range(a, b))
        return total if maximize else -total

    assert len(scores) == 7
    for m in range(1, 8):
        assert scores[m - 1] == pytest.approx(score(acs_schedule(s, m, maximize)))


def linear_timer(cost):
    """A fake machine whose calls cost exactly ``cost`` (a BlockCost); records what it timed."""
    calls = []

    def timer(plans):
        calls.append(len(plans))
        return [cost.predict_plan(p) for p in plans]

    timer.calls = calls
    return timer


def true_cost(calibration, fixed=5.0, per_kind=None):
    per_kind = per_kind or {"sa": 1.0, "ca": 1.5, "ffn": 2.0}
    return bac.BlockCost(fixed, {b.name: per_kind[b.kind] for b in calibration.blocks}, calibration.num_steps)


def test_cost_measurement_recovers_a_linear_machine(calibrated):
    _, _, calibration = calibrated
    truth = true_cost(calibration)
    measured, points = bac.BlockCost.measure(linear_timer(truth), calibration)
    assert measured.fixed_ms == pytest.approx(truth.fixed_ms)
    assert measured.block_ms == pytest.approx(truth.block_ms)
    assert len(points) == 1 + 3 + 2  # full, one probe per kind, two sparse plans


def test_budget_plan_fits_and_spends_the_budget(calibrated):
    _, _, calibration = calibrated
    cost = true_cost(calibration)
    full = cost.predict({b.name: K for b in calibration.blocks})
    previous = 0
    for share in (0.3, 0.5, 0.8):
        chosen = bac.plan_for_budget(calibration, latency_ms=share * full, cost=cost)
        assert chosen.predicted_ms <= share * full
        assert chosen.plan.method == "budget" and chosen.plan.num_steps == K
        assert chosen.updates == {b.name: len(b.update_steps) for b in chosen.plan.blocks}
        assert chosen.plan.computed_count() > previous  # more budget, more updates
        previous = chosen.plan.computed_count()
    everything = bac.plan_for_budget(calibration, latency_ms=full, cost=cost)
    assert everything.plan.computed_count() == len(calibration.blocks) * K


def test_budget_plan_beats_uniform_updates_in_the_acs_objective(calibrated):
    """Exactness in use: at the predicted latency of ACS with the same M for all blocks, the budget plan's
    summed ACS score is at least as high (the uniform allocation is one of the plans it chose among)."""
    _, _, calibration = calibrated
    cost = true_cost(calibration)
    matrices = calibration.matrix("cosine")
    for m in (2, 4, 6):
        uniform = bac.make_plan(calibration, "acs", M=m)
        chosen = bac.plan_for_budget(calibration, latency_ms=cost.predict_plan(uniform), cost=cost, n=0,
                                     resolution=10_000)
        assert chosen.predicted_ms <= cost.predict_plan(uniform) + 1e-9
        score = sum(bac.acs_scores(s)[len(b.update_steps) - 1] for s, b in zip(matrices, chosen.plan.blocks))
        assert score >= sum(bac.acs_scores(s)[m - 1] for s in matrices) - 1e-9


def test_budget_plan_with_bua_still_fits(calibrated):
    _, _, calibration = calibrated
    cost = true_cost(calibration)
    budget = 0.4 * cost.predict({b.name: K for b in calibration.blocks})
    with_bua = bac.plan_for_budget(calibration, latency_ms=budget, cost=cost, n=3)
    acs_only = bac.plan_for_budget(calibration, latency_ms=budget, cost=cost, n=0)
    assert with_bua.predicted_ms <= budget and acs_only.predicted_ms <= budget
    assert with_bua.plan.params["n"] == 3


def test_control_rate_sets_the_budget(calibrated):
    _, _, calibration = calibrated
    cost = true_cost(calibration)
    chosen = bac.plan_for_budget(calibration, control_hz=100, actions_per_chunk=8, headroom=0.5, cost=cost)
    assert chosen.budget_ms == pytest.approx(40.0)  # 8 actions at 100 Hz = 80 ms, half of it
    with pytest.raises(bac.ConfigError, match="actions_per_chunk"):
        bac.plan_for_budget(calibration, control_hz=100, cost=cost)
    with pytest.raises(bac.ConfigError, match="exactly one"):
        bac.plan_for_budget(calibration, control_hz=100, latency_ms=3, cost=cost)


def test_a_budget_below_the_fastest_plan_is_a_clear_error(calibrated):
    _, _, calibration = calibrated
    cost = true_cost(calibration)
    fastest = cost.predict({b.name: 1 for b in calibration.blocks})
    with pytest.raises(bac.BudgetError, match="fastest plan"):
        bac.plan_for_budget(calibration, latency_ms=fastest - 0.1, cost=cost)
    with pytest.raises(bac.ConfigError, match="cost="):
        bac.plan_for_budget(calibration, latency_ms=100)


def test_a_cost_model_of_another_model_is_refused(calibrated):
    _, _, calibration = calibrated
    cost = true_cost(calibration)
    other = bac.BlockCost(cost.fixed_ms, dict(list(cost.block_ms.items())[:-1]), K)
    with pytest.raises(bac.ConfigError, match="blocks"):
        bac.plan_for_budget(calibration, latency_ms=1000, cost=other)


def test_refits_when_the_machine_differs_from_the_model(calibrated):
    _, _, calibration = calibrated
    believed = true_cost(calibration)
    # the real machine: blocks 1.6x dearer, less fixed cost
    real = bac.BlockCost(2.0, {b: 1.6 * c for b, c in believed.block_ms.items()}, K)
    budget = 0.5 * real.predict({b.name: K for b in calibration.blocks})
    timer = linear_timer(real)
    chosen = bac.plan_for_budget(calibration, latency_ms=budget, cost=believed, timer=timer, tolerance=0.05)
    first = chosen.history[0]
    assert abs(first["measured_ms"] - first["predicted_ms"]) > 0.05 * first["predicted_ms"]
    assert len(chosen.history) >= 2 and chosen.cost.source == "refit"
    assert chosen.measured_ms == pytest.approx(chosen.predicted_ms, rel=0.05)
    assert chosen.fits
    assert chosen.measured_ms <= budget


def test_measured_plans_apply_to_their_model(calibrated, sample_actions):
    """The timer measures real calls under the plans; the chosen plan applies to the calibrated model only."""
    model, scheduler, calibration = calibrated
    obs = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(2))
    torch.set_num_threads(1)
    timer = bac.plan_timer(model, lambda: sample_actions(model, scheduler, obs), scheduler=scheduler, repeats=2,
                           warmup=1)
    cost, points = bac.BlockCost.measure(timer, calibration)
    assert cost.source == "measured" and len(points) == 6 and all(ms > 0 for _, ms in points)
    full_ms = points[0][1]
    chosen = bac.plan_for_budget(calibration, latency_ms=0.6 * full_ms, cost=cost, timer=timer, max_refits=1)
    assert chosen.measured_ms is not None and len(chosen.history) in (1, 2)
    with bac.accelerate(model, chosen.plan, num_steps=K, scheduler=scheduler) as handle:
        sample_actions(model, scheduler, obs)
        assert handle.stats()["computed"] == chosen.plan.computed_count()
    other = type(model)(**{**dict(action_dim=3, cond_dim=5, horizon=8, width=32, num_layers=3, heads=2)})
    with pytest.raises(bac.PlanMismatchError, match="weights"):
        bac.accelerate(other, chosen.plan, num_steps=K, scheduler=scheduler)


def test_a_budget_the_model_calls_impossible_is_checked_on_the_machine(calibrated):
    """A cost model measured under load says even the fastest plan is over budget; the machine, asked, says
    it fits: the plan is made from the refit model instead of refused."""
    _, _, calibration = calibrated
    believed = true_cost(calibration, fixed=50.0)
    real = true_cost(calibration, fixed=20.0)
    fastest = real.predict({b.name: 1 for b in calibration.blocks})
    timer = linear_timer(real)
    chosen = bac.plan_for_budget(calibration, latency_ms=fastest + 10, cost=believed, timer=timer)
    assert chosen.fits and chosen.measured_ms <= fastest + 10
    with pytest.raises(bac.BudgetError, match="fastest plan"):  # and a budget the machine cannot meet is refused
        bac.plan_for_budget(calibration, latency_ms=fastest - 1, cost=believed, timer=timer)


def test_sparse_probes_fix_the_regime_budget_plans_run_in(calibrated):
    """On a machine whose dense calls cost more per update than sparse ones (not linear), the model is exact
    where budget plans live: at every block once and at K // 10 updates each."""
    _, _, calibration = calibrated
    truth = true_cost(calibration)

    def timer(plans):
        out = []
        for plan in plans:
            updates = plan.computed_count()
            dense = updates / (len(plan.blocks) * plan.num_steps)
            out.append(truth.predict_plan(plan) * (1 + 0.5 * dense))  # +50 % at full computation
        return out

    cost, points = bac.BlockCost.measure(timer, calibration)
    for counts, ms in points[-2:]:
        assert cost.predict(counts) == pytest.approx(ms)


def test_a_measured_plan_over_the_budget_is_remade(calibrated):
    """Within the tolerance of its prediction but over the budget: refit and remade, so the plan fits."""
    _, _, calibration = calibrated
    believed = true_cost(calibration)
    real = true_cost(calibration, fixed=believed.fixed_ms + 10.0)  # 10 ms more per call than believed
    budget = 0.3 * real.predict({b.name: K for b in calibration.blocks})
    chosen = bac.plan_for_budget(calibration, latency_ms=budget, cost=believed, timer=linear_timer(real),
                                 tolerance=1.0)
    assert chosen.history[0]["measured_ms"] > budget and len(chosen.history) == 2
    assert chosen.fits and chosen.measured_ms <= budget


def test_a_tail_over_the_deadline_shrinks_the_budget(calibrated):
    """Calls spread to 1.8x their median (a busy CPU): the median budget of a control rate is not enough; the
    plan's slowest measured call must fit the deadline (the time its actions take)."""
    _, _, calibration = calibrated
    cost = true_cost(calibration)

    def timer(plans):
        medians = [cost.predict_plan(p) for p in plans]
        timer.samples = [[0.9 * m, m, 1.8 * m] for m in medians]
        return medians

    full = cost.predict({b.name: K for b in calibration.blocks})
    hz = 1000 * 8 / (0.8 * full)  # 8 actions take 80 % of a full call
    chosen = bac.plan_for_budget(calibration, control_hz=hz, actions_per_chunk=8, headroom=0.75, cost=cost,
                                 timer=timer)
    assert chosen.deadline_ms == pytest.approx(0.8 * full)
    assert chosen.history[0]["slowest_ms"] > chosen.deadline_ms and "shrunk_budget_to_ms" in chosen.history[0]
    assert chosen.slowest_ms <= chosen.deadline_ms and chosen.fits
    assert chosen.budget_ms < 0.75 * chosen.deadline_ms
    no_samples = bac.plan_for_budget(calibration, control_hz=hz, actions_per_chunk=8, headroom=0.75, cost=cost,
                                     timer=linear_timer(cost))  # a timer without samples: the median only
    assert no_samples.slowest_ms is None and no_samples.budget_ms == pytest.approx(0.75 * 0.8 * full)
