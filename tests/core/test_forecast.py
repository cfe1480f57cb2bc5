"""Forecast-aware ACS (exact DP on Gram matrices), the Gram statistic of calibration, rescheduling, refinement."""
import itertools

import numpy as np
import pytest
import torch

import bac
from bac import PlanMismatchError
from bac.forecast import schedule_error

K = 10  # the calibrated fixture's step count

pytestmark = pytest.mark.usefixtures("one_thread")


def simulated_error(r: np.ndarray, steps, order: int) -> float:
    """Mean squared error per feature of the stand-in, step by step, as the engine's stand-ins compute it."""
    total, history = 0.0, []
    for t in range(len(r)):
        if t in steps:
            history.append(t)
            continue
        u = history[-1]
        forecast = r[u]
        if order == 1 and len(history) > 1:
            p = history[-2]
            forecast = r[u] + (t - u) / (u - p) * (r[u] - r[p])
        total += float(np.mean((r[t] - forecast) ** 2))
    return total


@pytest.mark.parametrize("order", [0, 1])
def test_dynamic_program_is_exact_against_every_schedule(order):
    rng = np.random.default_rng(order)
    for _ in range(6):
        k, d = int(rng.integers(2, 8)), 5
        r = np.cumsum(rng.normal(size=(k, d)), axis=0) + 0.3 * rng.normal(size=(k, d))  # a drifting feature
        gram = r @ r.T / d
        errors = bac.forecast_errors(gram, order)
        for m in range(1, k + 1):
            candidates = [(0,) + c for c in itertools.combinations(range(1, k), m - 1)]
            best = min(simulated_error(r, c, order) for c in candidates)
            steps = bac.forecast_schedule(gram, m, order)
            assert steps[0] == 0 and len(steps) == m == len(set(steps))
            assert simulated_error(r, steps, order) == pytest.approx(best, abs=1e-9)
            assert schedule_error(gram, steps, order) == pytest.approx(best, abs=1e-9)
            assert errors[m - 1] == pytest.approx(best, abs=1e-9)
    assert errors[-1] == 0  # every step computed: nothing to stand in


def test_linear_features_are_forecast_without_error_but_not_reused():
    r = np.outer(np.arange(8.0), np.ones(4)) + 1.0  # the feature moves on a straight line
    gram = r @ r.T / 4
    assert bac.forecast_errors(gram, 1)[1] == pytest.approx(0, abs=1e-12)  # two updates extrapolate exactly
    assert bac.forecast_errors(gram, 0)[1] > 1


def test_bad_gram_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        bac.forecast_schedule(np.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="NaN"):
        bac.forecast_schedule(np.full((3, 3), np.nan), 2)
    with pytest.raises(ValueError, match="num_updates"):
        bac.forecast_schedule(np.eye(3), 4)


def test_calibration_records_gram_matrices_consistent_with_mse(calibrated, tmp_path):
    _, _, calibration = calibrated
    gram = calibration.gram_matrices()
    assert gram.shape == (len(calibration.blocks), K, K)
    diag = np.diagonal(gram, axis1=1, axis2=2)
    implied_mse = diag[:, :, None] + diag[:, None, :] - 2 * gram  # |a - b|^2 = <a,a> + <b,b> - 2 <a,b>
    np.testing.assert_allclose(implied_mse, calibration.matrix("mse"), rtol=1e-5, atol=1e-8)  # mse: float32
    loaded = bac.Calibration.load(calibration.save(tmp_path / "calibration.safetensors"))
    np.testing.assert_array_equal(loaded.gram, gram)


def test_forecast_acs_plans_for_its_stand_in(calibrated):
    _, _, calibration = calibrated
    linear = bac.build_method("forecast-acs", calibration, M=4, order=1)
    reuse = bac.build_method("forecast-acs", calibration, M=4, order=0)
    assert linear.standin.describe() == {"standin": "taylor-1"} and reuse.standin is bac.REUSE
    grams = calibration.gram_matrices()
    for block, gram in zip(linear.schedule.blocks, grams):
        assert len(block.update_steps) == 4
        assert schedule_error(gram, block.update_steps, 1) == pytest.approx(bac.forecast_errors(gram, 1)[3])
    # order 0 is ACS on the MSE metric: the same optimum
    acs = bac.make_plan(calibration, "acs", M=4, metric="mse")
    for ours, theirs, gram in zip(reuse.schedule.blocks, acs.blocks, grams):
        assert schedule_error(gram, ours.update_steps, 0) == pytest.approx(schedule_error(gram, theirs.update_steps, 0))


def test_allocation_shares_the_same_total_and_removes_more_error(calibrated):
    _, _, calibration = calibrated
    grams = calibration.gram_matrices()
    even = bac.build_method("forecast-acs", calibration, M=4)
    shared = bac.build_method("forecast-acs", calibration, M=4, allocate=True)
    counts = [len(b.update_steps) for b in shared.schedule.blocks]
    assert sum(counts) == 4 * len(grams) and len(set(counts)) > 1

    def total(method):
        return sum(schedule_error(g, b.update_steps, 1) for g, b in zip(grams, method.schedule.blocks))

    assert total(shared) <= total(even) + 1e-12


def test_a_calibration_without_gram_matrices_is_refused_clearly(calibrated, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    _, _, calibration = calibrated
    path = calibration.save(tmp_path / "calibration.safetensors")
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    arrays = load_file(str(path))
    del arrays["gram"]  # a file written before bac recorded it
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata=metadata)
    old = bac.Calibration.load(tmp_path / "old.safetensors")
    assert old.gram is None
    bac.make_plan(old, "bac", M=4)  # everything else still plans
    with pytest.raises(PlanMismatchError, match="no Gram matrices .* recalibrate"):
        bac.build_method("forecast-acs", old, M=4)


# --- rescheduling a handle ----------------------------------------------------------------------------


def test_reschedule_follows_another_step_count_and_keeps_the_statistics(tiny_denoiser, ddpm_scheduler,
                                                                          sample_actions):
    model, obs = tiny_denoiser(), torch.randn(2, 2, 5)
    short, long = ddpm_scheduler(6), ddpm_scheduler(9)
    references = {s: sample_actions(model, s, obs) for s in (short, long)}
    every = {n: bac.build_method("every-step", model, num_steps=n) for n in (6, 9)}
    with bac.accelerate(model, every[6], num_steps=6) as handle:
        assert torch.equal(sample_actions(model, short, obs), references[short])
        handle.reschedule(every[9], num_steps=9)
        assert torch.equal(sample_actions(model, long, obs), references[long])
        stats = handle.stats()
        assert stats["num_steps"] == 9 and stats["denoiser_calls"] == 15
        assert stats["computed"] == 15 * len(stats["per_block"])
        with pytest.raises(ValueError, match="keeps the handle's stand-in"):
            handle.reschedule(bac.build_method("taylorseer", model, num_steps=9), num_steps=9)
        with pytest.raises(ValueError, match="runtime rule"):
            handle.reschedule(bac.FirstBlockCache(0.1), num_steps=9)
        with pytest.raises(PlanMismatchError):
            handle.reschedule(every[9], num_steps=6)  # checked as accelerate checks it


# --- output-aware refinement --------------------------------------------------------------------------


def test_refine_keeps_the_update_counts_and_lowers_the_real_deviation(tiny_denoiser, ddpm_scheduler,
                                                                        sample_actions):
    model, scheduler = tiny_denoiser(), ddpm_scheduler(12)
    inputs = [torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    start = bac.build_method("taylorseer", model, num_steps=12, interval=4, order=1)

    def sample(obs):
        return sample_actions(model, scheduler, obs)

    refined = bac.refine(model, start, sample, inputs, rounds=2)
    assert refined.name == "taylorseer+refined" and refined.standin.describe() == start.standin.describe()
    params = refined.schedule.params
    assert params["deviation_after"] <= params["deviation_before"] and params["candidates"] > 1
    for before, after in zip(start.schedule.blocks, refined.schedule.blocks):
        assert len(after.update_steps) == len(before.update_steps) and after.update_steps[0] == 0

    def deviation(method):  # the refined plan, re-run on the same inputs, has the deviation it reports
        references = [sample(x) for x in inputs]
        with bac.accelerate(model, method, num_steps=12):
            outputs = [sample(x) for x in inputs]
        error = sum(float((o - r).double().square().sum()) for o, r in zip(outputs, references))
        return (error / sum(float(r.double().square().sum()) for r in references)) ** 0.5

    assert deviation(refined) == pytest.approx(params["deviation_after"], rel=1e-6)
    assert deviation(start) == pytest.approx(params["deviation_before"], rel=1e-6)
    assert refined.schedule.model["weights"] == bac.describe(model).weights_digest()
    capped = bac.refine(model, bac.build_method("acs", bac.calibrate(model, sample, inputs[:1]), M=4), sample, inputs,
                        max_candidates=5)
    assert capped.schedule.params["candidates"] <= 5
    with pytest.raises(TypeError, match="static plan"):
        bac.refine(model, bac.build_method("fbcache", model), sample, inputs)
    with pytest.raises(ValueError, match="at least one input"):
        bac.refine(model, start, sample, [])
    draws = iter(range(100))
    with pytest.raises(ValueError, match="different outputs for the same input"):
        bac.refine(model, start, lambda obs: sample_actions(model, scheduler, obs, seed=next(draws)), inputs)


def test_a_calibration_restricted_to_a_coarser_grid_keeps_those_steps_statistics(calibrated, tmp_path):
    import dataclasses

    _, scheduler, calibration = calibrated
    assert calibration.timesteps is None  # a bare model: bac.calibrate does not know the sampler's timesteps
    with pytest.raises(PlanMismatchError, match="does not record its sampler's timesteps"):
        calibration.for_timesteps([9, 7])
    timed = dataclasses.replace(calibration, timesteps=np.arange(K - 1, -1, -1.0))  # 9, 8, ..., 0
    coarse = timed.for_timesteps([9.0, 7.0, 5.0, 1.0])
    index = [0, 2, 4, 8]
    assert coarse.num_steps == 4 and coarse.timesteps.tolist() == [9, 7, 5, 1]
    for metric in bac.METRICS:
        np.testing.assert_array_equal(coarse.matrix(metric), calibration.matrix(metric)[:, index][:, :, index])
    np.testing.assert_array_equal(coarse.gram, calibration.gram[:, index][:, :, index])
    l1 = coarse.matrix("l1")
    np.testing.assert_allclose(coarse.reuse_error, [m[np.triu_indices(4, 1)].mean() for m in l1])
    assert len(bac.make_plan(coarse, "bac", M=2).blocks[0].update_steps) >= 2
    loaded = bac.Calibration.load(timed.save(tmp_path / "timed.safetensors"))
    np.testing.assert_array_equal(loaded.timesteps, timed.timesteps)
    for bad in ([9.0, 6.5], [7.0, 9.0], []):  # not on the grid, out of order, nothing
        with pytest.raises(PlanMismatchError, match="calibrate at"):
            timed.for_timesteps(bad)
