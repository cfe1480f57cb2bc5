"""Warm starts in the core: a trajectory begun at step i of the sampler (bit for bit diffusers' own
``set_begin_index``), the forward process to step i, the data prediction, and a static plan's rows run from i."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import bac
from bac.sampling import FusedSampler

KINDS = [(DDIMScheduler, {}), (DDPMScheduler, {}), (DPMSolverMultistepScheduler, {}),
         (DPMSolverMultistepScheduler, {"solver_type": "heun"}), (FlowMatchEulerDiscreteScheduler, {})]


def _scheduler(cls, options, steps, begin):
    scheduler = cls(**options)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler


def _diffusers_noised(scheduler, x0, noise, i):
    t = scheduler.timesteps[i][None]
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


@pytest.mark.parametrize("cls,options", KINDS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("steps", [4, 10])
def test_a_trajectory_begun_at_any_step_is_diffusers_with_set_begin_index(cls, options, steps):
    x0, noise = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    for begin in range(steps):
        reference = _scheduler(cls, options, steps, begin)
        fused = FusedSampler(_scheduler(cls, options, steps, 0))
        start = fused.noised(begin, x0, noise)
        assert torch.equal(start, _diffusers_noised(reference, x0, noise, begin))
        mine, theirs = fused.start(begin), start.clone()
        x, g1, g2 = start, torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for i in range(begin, steps):
            x = mine.step(i, torch.sin(1.3 * x + i), x, generator=g1)
            theirs = reference.step(torch.sin(1.3 * theirs + i), reference.timesteps[i], theirs,
                                    generator=g2).prev_sample
        assert torch.equal(x, theirs), (begin, (x - theirs).abs().max())


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_the_data_prediction_is_the_schedulers_pred_original_sample(cls, prediction):
    scheduler = cls(prediction_type=prediction, clip_sample=False)
    scheduler.set_timesteps(6)
    fused = FusedSampler(scheduler)
    x, out = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(fused.predict_x0(i, out, x), expected, rtol=1e-5, atol=1e-5)


def test_flow_and_dpm_data_predictions():
    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(5)
    x, v = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    for i in range(5):
        torch.testing.assert_close(FusedSampler(flow).predict_x0(i, v, x), x - flow.sigmas[i] * v)
    dpm = DPMSolverMultistepScheduler()
    dpm.set_timesteps(5)
    fused = FusedSampler(dpm)
    for i in range(5):
        dpm._step_index = i
        torch.testing.assert_close(fused.predict_x0(i, v, x), dpm.convert_model_output(v, sample=x))


def test_a_begin_outside_the_schedule_is_refused():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    for begin in (-1, 4, 1.5, True):
        with pytest.raises(bac.ConfigError, match="begins at a step index"):
            FusedSampler(scheduler).start(begin)


@torch.no_grad()
def _run(model, scheduler, obs, x, begin):
    fused = FusedSampler(scheduler)
    bac.new_trajectory(model, begin)
    trajectory = fused.start(begin)
    for i in range(begin, fused.num_steps):
        x = trajectory.step(i, model(x, fused.timesteps[i], obs), x)
    return x


def test_an_every_step_plan_begun_late_is_bit_identical_to_no_caching(tiny_stack):
    model, _, obs = tiny_stack
    scheduler = DDIMScheduler(num_train_timesteps=12)
    scheduler.set_timesteps(6)
    x = torch.randn(2, 8, 3)
    expected = _run(model, scheduler, obs, x, 2)
    with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=6), num_steps=6) as handle:
        assert torch.equal(_run(model, scheduler, obs, x, 2), expected)
        assert handle.stats()["last_call"]["denoiser_calls"] == 4


def test_a_plan_begun_late_computes_every_block_first_then_follows_its_rows(tiny_stack):
    model, _, obs = tiny_stack
    scheduler = DDIMScheduler(num_train_timesteps=12)
    scheduler.set_timesteps(6)
    plan = bac.make_plan(model, "uniform", num_steps=6, M=2)  # every block at steps 0 and 3
    table = plan.step_table()
    ffn_runs = []
    hooks = [layer.linear1.register_forward_hook(lambda *a: ffn_runs.append(1)) for layer in model.decoder.layers]
    try:
        with bac.accelerate(model, plan, num_steps=6) as handle:
            _run(model, scheduler, obs, torch.randn(2, 8, 3), 1)
            stats = handle.stats()
    finally:
        for hook in hooks:
            hook.remove()
    blocks = len(table[0])
    planned_after = sum(sum(row) for row in table[2:])
    assert stats["last_call"] == {"denoiser_calls": 5, "computed": blocks + planned_after,
                                  "skipped": 5 * blocks - blocks - planned_after}
    assert len(ffn_runs) == len(model.decoder.layers) * 2  # step 1 (the first) and step 3 (planned)


def test_a_runtime_rule_cannot_begin_late_and_an_abandoned_call_is_not_short(tiny_stack):
    model, scheduler, obs = tiny_stack
    with bac.accelerate(model, bac.FirstBlockCache(threshold=0.1), num_steps=12) as handle:
        with pytest.raises(bac.ConfigError, match="static plan"):
            handle.new_trajectory(start=3)
    with bac.accelerate(model, bac.make_plan(model, "uniform", num_steps=12, M=3), num_steps=12) as handle:
        with pytest.raises(bac.ConfigError, match="begins at a step"):
            handle.new_trajectory(start=12)
        handle.new_trajectory()
        model(torch.randn(2, 8, 3), scheduler.timesteps[0], obs)  # one step of twelve
        with pytest.raises(bac.CacheStateError, match="ran 1 in context"):
            handle.new_trajectory(start=4)
        model(torch.randn(2, 8, 3), scheduler.timesteps[4], obs)
        bac.abandon_trajectory(model)  # the check step of a warm start stops there on purpose
        handle.new_trajectory(start=4)
