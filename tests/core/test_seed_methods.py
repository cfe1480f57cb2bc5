"""ERTACache and ProfilingDiT: exactness at every step, their plan files, their fits against the formulas."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

import bac
from bac.attention import AttentionProbe, attention_focus, received_attention
from bac.methods.ertacache import profiled_steps, rectification
from bac.methods.profiling import recompute_steps
from bac.sampling import DrawnNoise, FusedSampler

K = 10


@pytest.fixture(scope="module")
def profiled(tiny_denoiser, ddpm_scheduler, sample_actions):
    """A tiny denoiser, its K-step sampler, a calibration with the attention profile, and an input."""
    model, scheduler = tiny_denoiser(), ddpm_scheduler(K)
    obs = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(1))
    calibration = bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs], scheduler=scheduler,
                                attention=True)
    return model, scheduler, calibration, torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(2))


def cached_sample(model, method, scheduler, obs, sample_actions):
    with bac.accelerate(model, method, num_steps=K, scheduler=scheduler):
        return sample_actions(model, scheduler, obs)


@pytest.mark.parametrize("name, params", [("ertacache", {"threshold": 0.0}),
                                          ("ertacache", {"threshold": 0.0, "terms": 0}),
                                          ("profiling-dit", {"share": 0.0}),
                                          ("profiling-dit", {"share": 1.0, "warmup": K})])
def test_every_step_plans_are_bit_identical(profiled, sample_actions, name, params):
    model, scheduler, calibration, obs = profiled
    method = bac.build_method(name, calibration, **params)
    assert method.schedule.skipped_count() == 0
    assert torch.equal(cached_sample(model, method, scheduler, obs, sample_actions),
                       sample_actions(model, scheduler, obs))


def test_calibrating_with_the_attention_profile_changes_no_statistic(profiled, tiny_denoiser, sample_actions):
    model, scheduler, profiled_calibration, _ = profiled
    obs = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(1))
    plain = bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs], scheduler=scheduler)
    assert plain.focus is None
    for metric in bac.METRICS:
        assert np.array_equal(plain.matrix(metric), profiled_calibration.matrix(metric))
    assert np.array_equal(plain.gram, profiled_calibration.gram)
    kinds = [b.kind for b in profiled_calibration.blocks]
    focus = profiled_calibration.focus
    assert all(np.isnan(f) == (kind == "ffn") for f, kind in zip(focus, kinds))
    assert all(0 <= f <= 1 for f in focus[~np.isnan(focus)])


def test_calibration_file_keeps_the_profile(profiled, tmp_path):
    calibration = profiled[2]
    loaded = bac.Calibration.load(calibration.save(tmp_path / "c.safetensors"))
    assert np.array_equal(loaded.focus, calibration.focus, equal_nan=True)


@pytest.mark.parametrize("name", ["ertacache", "profiling-dit"])
def test_plan_files_keep_the_fit_and_refuse_another_model(profiled, tiny_denoiser, sample_actions, tmp_path, name):
    model, scheduler, calibration, obs = profiled
    method = bac.build_method(name, calibration, **({"threshold": 0.3} if name == "ertacache" else {"share": 0.67}))
    assert method.schedule.skipped_count() > 0
    loaded = bac.Plan.load(method.schedule.save(tmp_path / "plan.json"))
    assert loaded == method.schedule
    # the loaded plan alone brings its stand-in: the same output as the built method
    assert torch.equal(cached_sample(model, loaded, scheduler, obs, sample_actions),
                       cached_sample(model, method, scheduler, obs, sample_actions))
    with pytest.raises(bac.PlanMismatchError, match="weights"):
        bac.accelerate(tiny_denoiser(width=32).requires_grad_(False).apply(_perturb), loaded, num_steps=K)
    with pytest.raises(bac.PlanMismatchError):
        bac.accelerate(tiny_denoiser(num_layers=2), loaded, num_steps=K)


def _perturb(module):
    if isinstance(module, nn.Linear):
        module.weight.data.add_(0.01)


# --- ERTACache -----------------------------------------------------------------------------------------


def test_profiled_schedule_follows_the_whole_residual_distance():
    # two blocks whose residuals turn by a known angle per step: |r_t - r_c|^2 / |r_t|^2 = 2 - 2 cos(angle)
    angles = np.array([0.0, 0.05, 0.1, 0.3, 0.35, 1.0])
    r = np.stack([np.cos(angles), np.sin(angles)], 1)
    gram = np.stack([r @ r.T, 4 * r @ r.T])
    steps = profiled_steps(gram, threshold=0.15, warmup=1)
    distance = lambda c, t: math.sqrt(2 - 2 * math.cos(angles[t] - angles[c]))  # noqa: E731
    expected, last = [0], 0
    for t in range(1, len(angles)):
        if distance(last, t) > 0.15:
            expected.append(t)
            last = t
    assert steps == expected == [0, 3, 5]
    assert profiled_steps(gram, 0.15, warmup=3)[:3] == [0, 1, 2]


def test_rectification_recovers_an_exact_linear_residual():
    # r_3 = 0.7 r_2 + 0.2 r_0 exactly: the closed-form fit finds the coefficients
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 50))
    r[3] = 0.7 * r[2] + 0.2 * r[0]
    r[1] = r[0]
    gram = (r @ r.T / 50)[None]
    (fits,) = rectification(gram, [0, 2], terms=2)
    c, a, b = fits["3"]
    assert c == 2 and a == pytest.approx(0.7, abs=1e-6) and b == pytest.approx(0.2, abs=1e-6)
    assert fits["1"][0] == 0 and fits["1"][1] == pytest.approx(1.0) and fits["1"][2] == 0.0  # one value before
    (scalar,) = rectification(gram, [0, 2], terms=1)
    assert scalar["3"][2] == 0.0 and scalar["3"][1] == pytest.approx(float(r[3] @ r[2] / (r[2] @ r[2])))


def test_linear_standin_hands_on_the_fitted_combination(profiled):
    model, scheduler, calibration, obs = profiled
    method = bac.build_method("ertacache", calibration, threshold=0.3)
    plan = method.schedule
    computed = plan.blocks[0].update_steps
    skipped = next(t for t in range(K) if t not in computed and len([s for s in computed if s < t]) >= 2)
    c, p = [s for s in computed if s < skipped][-2:][::-1]
    _, a, b = plan.params["rectification"][plan.blocks[0].name][str(skipped)]
    seen = {}

    def tap(i, step, out, was_computed):
        if i == 0:
            seen[step] = out.clone()

    with bac.accelerate(model, method, num_steps=K, tap=tap):
        bac.new_trajectory(model)
        x = torch.randn(3, 8, 3)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t, obs), t, x).prev_sample
    assert torch.allclose(seen[skipped], a * seen[c] + b * seen[p], atol=1e-6)


def test_adjusted_flow_step_equals_the_formula(tiny_denoiser):
    """A flow-matching Euler step with the plan's scale s: x + (sigma_next - sigma) * s * v."""
    model = tiny_denoiser()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    plan = bac.make_plan(model, "uniform", num_steps=4, M=2)  # steps 0 and 2 computed
    scales = [1.0, 0.8, 1.0, 1.3]
    adjusted = dataclasses.replace(plan, params={**plan.params, "step_scales": scales})
    sampler, obs, sigmas = FusedSampler(scheduler), torch.randn(2, 2, 5), scheduler.sigmas
    start = torch.randn(2, 8, 3)

    with torch.no_grad():
        samples, outputs = [start], []
        with bac.accelerate(model, adjusted, num_steps=4) as handle:
            handle.new_trajectory()
            trajectory = sampler.start()
            for i, t in enumerate(sampler.timesteps):
                outputs.append(model(samples[i], t, obs))
                samples.append(trajectory.step(i, outputs[i], samples[i]))
        with bac.accelerate(model, plan, num_steps=4) as handle:  # the unadjusted outputs on the same samples
            handle.new_trajectory()
            for i, t in enumerate(sampler.timesteps):
                v = model(samples[i], t, obs)
                assert torch.allclose(outputs[i], scales[i] * v, atol=1e-6)  # the engine scaled the output
                formula = samples[i] + (sigmas[i + 1] - sigmas[i]) * scales[i] * v
                assert torch.allclose(samples[i + 1], formula, atol=1e-6), i


def test_adjust_timesteps_fits_the_least_squares_scale(profiled, sample_actions):
    model, scheduler, calibration, obs = profiled
    two = bac.make_plan(model, "uniform", num_steps=2, M=1)  # step 1 reuses step 0
    s2 = DDPMScheduler(num_train_timesteps=2, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    s2.set_timesteps(2)
    method = bac.Method("uniform", two)
    adjusted = bac.adjust_timesteps(model, method, lambda o: sample_actions(model, s2, o), [obs])
    scales = adjusted.schedule.params["step_scales"]
    assert scales[0] == 1.0 and adjusted.params["adjusted"] is True
    # by hand: the state after step 0 is the same cached or not; at step 1 the fit is <v_full, v> / <v, v>
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((obs.shape[0], model.horizon, model.action_dim), generator=generator)
        t0, t1 = s2.timesteps
        with bac.accelerate(model, method, num_steps=2):
            bac.new_trajectory(model)
            v0 = model(x, t0, obs)
            x1 = s2.step(v0, t0, x, generator=generator).prev_sample
            cached = model(x1, t1, obs).double()
        full = model(x1, t1, obs).double()
    assert scales[1] == pytest.approx(float((full * cached).sum() / cached.square().sum()), rel=1e-5)
    assert scales[1] != 1.0


def test_malformed_fits_in_a_plan_file_are_refused(profiled, tmp_path):
    calibration = profiled[2]
    plan = bac.build_method("ertacache", calibration, threshold=0.3).schedule
    data = plan.to_dict()
    name = plan.blocks[0].name
    first_skip = next(iter(data["params"]["rectification"][name]))
    data["params"]["rectification"][name][first_skip] = [K + 5, 1.0, 0.0]
    with pytest.raises(bac.PlanMismatchError, match="rectification"):
        bac.Plan.from_dict(data).fitted_standin()
    data = plan.to_dict()
    data["params"]["step_scales"] = [1.0] * (K - 1)
    with pytest.raises(bac.PlanMismatchError, match="step_scales"):
        bac.accelerate(profiled[0], bac.Plan.from_dict(data), num_steps=K)
    with pytest.raises(bac.ConfigError, match="comes with its plan"):
        bac.make_standin("linear")
    with pytest.raises(ValueError):
        bac.build_method("ertacache", calibration, terms=3)


# --- ProfilingDiT ---------------------------------------------------------------------------------------


def test_received_attention_matches_torch_attention():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    probabilities = torch.softmax((q @ k.transpose(-2, -1) / 2).masked_fill(~mask, -math.inf), -1)
    assert torch.allclose(received_attention(q, k, mask), probabilities.mean((1, 2)), atol=1e-6)
    assert torch.allclose(received_attention(q, k).sum(-1), torch.ones(2))
    # the probe records it for SDPA and nn.MultiheadAttention
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        plain = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mha(x, x, x, need_weights=False)[0])
        with AttentionProbe() as probe:
            probed = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mha(x, x, x, need_weights=False)[0])
        weights = mha(x, x, x, need_weights=True)[1]
    # SDPA runs as it would; nn.MultiheadAttention leaves its fused path under any TorchFunctionMode (last bits
    # differ), which is why calibration profiles attention in a pass of its own
    assert torch.equal(plain[0], probed[0]) and torch.allclose(plain[1], probed[1], atol=1e-6)
    assert torch.allclose(probe.received[0], probabilities.mean((1, 2)), atol=1e-6)
    assert torch.allclose(probe.received[1], weights.mean(1), atol=1e-6)


def test_foreground_ratio_by_hand():
    # 4 keys; the set's mean attention [0.4, 0.27, 0.23, 0.1] puts keys 0 and 1 above uniform (the foreground)
    a = torch.tensor([[0.5, 0.3, 0.1, 0.1]])  # high on keys 0, 1: ratio 1
    b = torch.tensor([[0.4, 0.4, 0.1, 0.1]])  # high on keys 0, 1: ratio 1
    c = torch.tensor([[0.3, 0.1, 0.5, 0.1]])  # high on keys 0, 2: ratio 1/2
    other = torch.tensor([[0.9, 0.1]])  # another key set (cross-attention): its own foreground, key 0
    (ra, na), (rb, nb), (rc, nc), (rf, nf), (ro, no) = attention_focus([a, b, c, None, other])
    assert (ra, na) == (1.0, 1) and (rb, nb) == (1.0, 1) and (rc, nc) == (0.5, 1) and nf == 0 and (ro, no) == (1.0, 1)


def test_recompute_steps_follow_the_released_schedule_and_the_papers_decreasing_one():
    assert recompute_steps(50, 6, 6, 6) == list(range(6)) + list(range(6, 50, 6))
    steps = recompute_steps(50, 6, 12, 2)
    gaps = np.diff([s for s in steps if s >= 6])
    assert steps[:7] == list(range(7)) and gaps[0] >= gaps[-1] and gaps[-1] <= 3 and all(np.diff(gaps) <= 0)


def test_profiling_dit_caches_the_lowest_scoring_layers(profiled):
    calibration = profiled[2]
    method = bac.build_method("profiling-dit", calibration, share=0.34, warmup=2, interval=3)
    plan = method.schedule
    focus = plan.params["focus"]
    (cached,) = plan.params["cached_layers"]
    assert focus[str(cached)] == min(focus.values())
    for block in plan.blocks:
        expected = [0, 1, 2, 5, 8] if block.layer == cached else list(range(K))
        assert list(block.update_steps) == expected, block.name
    by_threshold = bac.build_method("profiling-dit", calibration, threshold=max(focus.values()) + 1e-6).schedule
    assert by_threshold.params["cached_layers"] == sorted(int(layer) for layer in focus)


def test_profiling_dit_needs_the_attention_profile(profiled):
    with pytest.raises(bac.ConfigError, match="attention=True"):
        bac.build_method("profiling-dit", dataclasses.replace(profiled[2], focus=None))


def test_a_traced_call_bakes_in_the_rectification_and_the_output_scales(profiled):
    """One graph per call (bac.graphs): an adjusted ERTACache plan traced equals the eager cached call."""
    from bac.graphs import GraphCall, trace
    model, scheduler, calibration, obs = profiled
    method = bac.build_method("ertacache", calibration, threshold=0.3)
    plan = method.schedule
    scales = [1.0 if all(row) else 0.9 + 0.01 * k for k, row in enumerate(plan.step_table())]
    adjusted = bac.Method("ertacache", dataclasses.replace(plan, params={**plan.params, "step_scales": scales}))
    sampler = FusedSampler(scheduler)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, noise, cond):  # DDPM: every draw given up front, as bac.graphs needs
            trajectory, drawn, x = sampler.start(), DrawnNoise(noise[1:]), noise[0]
            for i, t in enumerate(sampler.timesteps):
                x = trajectory.step(i, self.model(x, t, cond), x, generator=drawn)
            return x

    loop, x = Loop(), torch.randn(1 + sampler.noise_draws, 3, 8, 3)
    with bac.accelerate(model, adjusted, num_steps=K), torch.no_grad():
        bac.new_trajectory(model)
        eager = loop(x, obs)
        graph = GraphCall(trace(loop, [x, obs]), [x, obs], backend="eager")
        assert (graph(x, obs) - eager).abs().max() <= 1e-5 * eager.abs().max()
    with bac.accelerate(model, method, num_steps=K), torch.no_grad():
        bac.new_trajectory(model)
        assert not torch.allclose(loop(x, obs), eager)  # the scales changed the call
