"""Caching methods by name: schedules (static plans, runtime rules) and stand-ins (reuse, Taylor forecasts)."""
import math

import pytest
import torch
from torch import nn

import bac
from bac.standins import TaylorSeries, relative_l1

K = 12  # the sampler's steps

# the methods of the exhaustive_settings fixture
EXHAUSTIVE_METHODS = ("acs", "bac", "cg-taylor", "ertacache", "every-step", "fbcache", "forecast-acs",
                      "profiling-dit", "sortblock", "taylorseer", "unified-acs", "uniform")
SKIPPING_METHODS = tuple(m for m in EXHAUSTIVE_METHODS if m != "every-step")
# The sub-module that does the work of each branch of nn.TransformerDecoderLayer: counted independently.
WITNESS = {"sa": "self_attn", "ca": "multihead_attn", "ffn": "linear1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_method_is_registered(exhaustive_settings, skipping_settings):
    assert EXHAUSTIVE_METHODS == tuple(sorted(exhaustive_settings(K)))
    assert bac.available_methods() == sorted(exhaustive_settings(K))
    assert SKIPPING_METHODS == tuple(sorted(skipping_settings))


def build(name, calibration, **params):
    return bac.build_method(name, calibration, num_steps=K, **params)


def count_witnesses(model):
    """Forward hooks counting how often each block's main sub-module really ran."""
    counts, hooks = {}, []
    for index, layer in enumerate(model.decoder.layers):
        for kind, attr in WITNESS.items():
            key = f"decoder.layers.{index}.{kind}"
            counts[key] = 0
            hooks.append(getattr(layer, attr).register_forward_hook(
                lambda *a, key=key: counts.__setitem__(key, counts[key] + 1)))
    return counts, hooks


@pytest.mark.parametrize("name", EXHAUSTIVE_METHODS)
def test_exhaustive_settings_are_bit_identical_and_remove_restores(name, calibrated, sample_actions,
                                                                  exhaustive_settings):
    model, scheduler, calibration = calibrated
    obs = torch.randn(3, 2, 5)
    reference = sample_actions(model, scheduler, obs)
    with bac.accelerate(model, build(name, calibration, **exhaustive_settings(K)[name]), num_steps=K) as handle:
        cached = sample_actions(model, scheduler, obs)
        stats = handle.stats()
    assert torch.equal(cached, reference)
    assert stats["skipped"] == 0 and stats["computed"] == K * len(calibration.blocks)
    assert torch.equal(sample_actions(model, scheduler, obs), reference)


@pytest.mark.parametrize("name", SKIPPING_METHODS)
def test_skipped_evaluations_are_really_skipped_and_reported(name, calibrated, sample_actions, skipping_settings):
    model, scheduler, calibration = calibrated
    obs = torch.randn(3, 2, 5)
    reference = sample_actions(model, scheduler, obs)
    counts, hooks = count_witnesses(model)
    try:
        with bac.accelerate(model, build(name, calibration, **skipping_settings[name]), num_steps=K) as handle:
            cached = [sample_actions(model, scheduler, obs, seed=s) for s in (0, 1)]
            stats = handle.stats()
    finally:
        for h in hooks:
            h.remove()
    assert {key: b["computed"] for key, b in stats["per_block"].items()} == counts
    assert stats["computed"] + stats["skipped"] == 2 * K * len(counts)
    assert stats["skipped"] >= K  # a real share is skipped
    assert stats["sampling_calls"] == 2 and stats["method"] == name
    assert torch.isfinite(cached[0]).all() and not torch.equal(cached[0], reference)


def test_static_method_skips_exactly_what_its_plan_says(calibrated, sample_actions):
    model, scheduler, calibration = calibrated
    method = build("taylorseer", calibration, interval=3, warmup=2)
    assert method.schedule.update_steps()["decoder.layers.0.sa"] == [0, 1, 2, 5, 8, 11]
    with bac.accelerate(model, method, num_steps=K) as handle:
        sample_actions(model, scheduler, torch.randn(1, 2, 5))
        assert handle.stats()["skipped"] == method.schedule.skipped_count()


def test_whole_model_rules_keep_the_first_layer_and_skip_the_rest(calibrated, sample_actions):
    model, scheduler, calibration = calibrated
    blocks = len(calibration.blocks)
    for name, params in [("fbcache", {"threshold": math.inf}), ("cg-taylor", {"gate": math.inf, "warmup": 2})]:
        with bac.accelerate(model, build(name, calibration, **params), num_steps=K) as handle:
            sample_actions(model, scheduler, torch.randn(1, 2, 5))
            stats = handle.stats()
        full_steps = 1 if name == "fbcache" else 2
        assert all(stats["per_block"][f"decoder.layers.0.{kind}"]["skipped"] == 0 for kind in WITNESS)
        assert stats["skipped"] == (K - full_steps) * (blocks - 3)


def test_sortblock_recomputes_the_top_fraction_between_full_steps(calibrated, sample_actions):
    model, scheduler, calibration = calibrated
    blocks = len(calibration.blocks)  # 9
    with bac.accelerate(model, build("sortblock", calibration, fraction=0.34, interval=4, warmup=2),
                        num_steps=K) as handle:
        sample_actions(model, scheduler, torch.randn(1, 2, 5))
        stats = handle.stats()
    full_steps = [0, 1, 2, 6, 10]
    assert stats["computed"] == len(full_steps) * blocks + (K - len(full_steps)) * math.ceil(0.34 * blocks)


def test_fbcache_threshold_separates_full_and_cached_steps(calibrated, sample_actions):
    model, scheduler, calibration = calibrated
    obs = torch.randn(1, 2, 5)
    skipped = []
    for threshold in (0.0, 0.2, 10.0):
        with bac.accelerate(model, bac.FirstBlockCache(threshold), num_steps=K) as handle:
            sample_actions(model, scheduler, obs)
            skipped.append(handle.stats()["skipped"])
    assert skipped[0] == 0 and skipped[0] <= skipped[1] <= skipped[2] and skipped[2] > 0


# --- Taylor forecasting ---------------------------------------------------------------------------


def test_taylor_series_extrapolates_polynomials():
    linear = TaylorSeries(1)
    for step in (0, 2, 3):
        linear.update(step, torch.tensor([1.0 + 0.5 * step, -step]))
    assert torch.allclose(linear.predict(7), torch.tensor([4.5, -7.0]))
    quadratic, first = TaylorSeries(2), TaylorSeries(1)
    for step in (0, 1, 2, 3):
        value = torch.tensor(float(step) ** 2)
        quadratic.update(step, value)
        first.update(step, value)
    assert abs(quadratic.predict(4) - 16) < abs(first.predict(4) - 16)
    pair = TaylorSeries(1)
    pair.update(0, (torch.zeros(2), None))
    pair.update(1, (torch.ones(2), None))
    forecast = pair.predict(3)
    assert torch.equal(forecast[0], torch.full((2,), 3.0)) and forecast[1] is None


class Ramp(nn.Module):
    """A layer whose one branch is linear in its time input: a Taylor forecast of order 1 is exact."""

    def __init__(self):
        super().__init__()
        self.direction = nn.Parameter(torch.randn(4))

    def branch(self, t):
        return t * self.direction

    def forward(self, x, t):
        return x + self.branch(t)


class RampStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Ramp(), Ramp()])

    def forward(self, x, t):
        for layer in self.layers:
            x = layer(x, t)
        return x


def test_taylor_stand_in_uses_the_step_index_and_reuse_does_not():
    bac.register_adapter(Ramp, bac.BranchAttributes({"branch": "ffn"}))
    torch.manual_seed(0)
    model = RampStack()
    times = [torch.tensor(2.0 * k) for k in range(8)]  # t = 2 k: linear in the step index

    def run():
        bac.new_trajectory(model)
        with torch.no_grad():
            return [model(torch.zeros(4), t) for t in times]

    reference = run()
    plan = bac.make_plan(model, "uniform", num_steps=8, interval=3)
    with bac.accelerate(model, plan, standin=bac.Taylor(1)):
        forecast = run()
    with bac.accelerate(model, plan):
        reused = run()
    # steps 1-2 follow the single value of step 0 (a one-point series is reuse); from step 4 the line is known
    assert all(torch.equal(forecast[k], reference[0]) for k in (1, 2))
    assert all(torch.allclose(forecast[k], reference[k], atol=1e-5) for k in (3, 4, 5, 6, 7))
    assert torch.equal(reused[2], reference[0]) and torch.equal(reused[5], reference[3])


# --- contexts, errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fbcache", "cg-taylor", "sortblock", "taylorseer"])
def test_guidance_branches_keep_separate_state(name, calibrated, skipping_settings):
    model, scheduler, calibration = calibrated
    method = build(name, calibration, **skipping_settings[name])
    obs_a, obs_b = torch.randn(1, 2, 5), 3 * torch.randn(1, 2, 5)
    x0 = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(4))

    @torch.no_grad()
    def loop(handle, branches):
        handle.new_trajectory()
        xs = {name: x0.clone() for name in branches}
        outs = {name: [] for name in branches}
        for t in scheduler.timesteps:
            for branch, obs in branches.items():
                with handle.context(branch):
                    out = model(xs[branch], t, obs)
                outs[branch].append(out)
                xs[branch] = xs[branch] - 0.05 * out
        return outs

    with bac.accelerate(model, method, num_steps=K) as handle:
        together = loop(handle, {"cond": obs_a, "uncond": obs_b})
        alone = loop(handle, {"cond": obs_a})
        assert handle.stats()["skipped"] > 0
    assert all(torch.equal(a, b) for a, b in zip(together["cond"], alone["cond"]))


def test_runtime_rules_need_a_step_count_and_overflow_is_an_error(calibrated, sample_actions):
    model, scheduler, calibration = calibrated
    with pytest.raises(ValueError, match="num_steps"):
        bac.accelerate(model, bac.FirstBlockCache(0.1))
    with bac.accelerate(model, bac.Sortblock(), num_steps=K - 1):
        with pytest.raises(bac.StepOverflowError, match=f"covers {K - 1}"):
            sample_actions(model, scheduler, torch.randn(1, 2, 5))


@pytest.mark.parametrize("name, params, message", [
    ("fbcache", {"threshold": -1}, "threshold"),
    ("cg-taylor", {"order": 3}, "order"),
    ("sortblock", {"fraction": 1.5}, "fraction"),
    ("taylorseer", {"interval": 0}, "interval"),
    ("fbcache", {"M": 3}, "takes parameters"),
    ("bac", {"standin": "spline"}, "stand-in"),
    ("nope", {}, "unknown caching method"),
])
def test_bad_method_parameters_are_clear_errors(name, params, message, calibrated):
    _, _, calibration = calibrated
    with pytest.raises(ValueError, match=message):
        bac.build_method(name, calibration, num_steps=K, **params)


def test_calibrated_methods_need_a_calibration(calibrated):
    model, _, _ = calibrated
    with pytest.raises(ValueError, match="Calibration"):
        bac.build_method("bac", model, num_steps=K)


def test_relative_l1_over_tuples():
    a, b = (torch.ones(3), torch.zeros(2)), (torch.full((3,), 2.0), torch.ones(2))
    assert relative_l1(a, b) == pytest.approx((3 + 2) / (6 + 2))


def test_whole_model_rules_need_two_layers():
    bac.register_adapter(Ramp, bac.BranchAttributes({"branch": "ffn"}))
    model = nn.Sequential(Ramp())
    with pytest.raises(ValueError, match="two layers"):
        bac.accelerate(model, bac.CGTaylor(), num_steps=3)
