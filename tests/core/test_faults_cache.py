"""Cached state is checked against what it was stored for: the batch shape, and the plan's step count."""
import pytest
import torch
from torch import nn

import bac

K = 12  # the plan's steps

pytestmark = pytest.mark.usefixtures("one_thread")


# (method, parameters): a plan with reuse, a plan with Taylor forecasts, a runtime rule; every-step for exactness
METHODS = {
    "every-step": {},
    "bac": {"M": 4, "n": 2},
    "taylorseer": {"interval": 3, "order": 2},
    "fbcache": {"threshold": 10.0},
}


def method(name, calibration):
    return bac.build_method(name, calibration, num_steps=K, **METHODS[name])


def observations(batch):
    return torch.randn(batch, 2, 5, generator=torch.Generator().manual_seed(batch))


@torch.no_grad()
def partial_call(model, scheduler, obs, steps):
    """The first ``steps`` denoiser calls of a sampling call (as a loop broken off in the middle)."""
    x = torch.randn(obs.shape[0], model.horizon, model.action_dim, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps[:steps]:
        x = scheduler.step(model(x, t, obs), t, x).prev_sample
    return x


@torch.no_grad()
def loop_without_marking(model, scheduler, obs, seed=0):
    """A whole sampling loop that does not call bac.new_trajectory."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((obs.shape[0], model.horizon, model.action_dim), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, obs), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (4, 2)])
def test_batch_size_change_mid_trajectory_is_an_error_and_the_next_call_is_clean(
        name, before, after, calibrated, sample_actions):
    model, scheduler, calibration = calibrated
    obs_after = observations(after)
    uncached = sample_actions(model, scheduler, obs_after)
    with bac.accelerate(model, method(name, calibration), num_steps=K) as fresh:
        expected = sample_actions(model, scheduler, obs_after)  # the method's output from a clean start
        fresh_stats = fresh.stats()["last_call"]
    if name == "every-step":
        assert torch.equal(expected, uncached)
    with bac.accelerate(model, method(name, calibration), num_steps=K) as handle:
        bac.new_trajectory(model)
        partial_call(model, scheduler, observations(before), steps=4)
        x = torch.zeros(after, model.horizon, model.action_dim)
        with pytest.raises(bac.CacheStateError) as caught, torch.no_grad():
            model(x, scheduler.timesteps[4], obs_after)
        message = str(caught.value)
        assert f"shape [{after}, 8, 3] at step 4" in message and f"started with shape [{before}, 8, 3]" in message
        assert "new_trajectory()" in message
        assert handle.step == -1  # the broken-off trajectory is gone, not left half-way
        assert torch.equal(sample_actions(model, scheduler, obs_after), expected)  # after new_trajectory()
        assert handle.stats()["last_call"] == fresh_stats
        # the same once more, and without marking the new call: the cleared context restarts at step 0
        bac.new_trajectory(model)
        partial_call(model, scheduler, observations(before), steps=4)
        with pytest.raises(bac.CacheStateError), torch.no_grad():
            model(x, scheduler.timesteps[4], obs_after)
        assert torch.equal(loop_without_marking(model, scheduler, obs_after), expected)


def test_a_batch_of_one_is_not_broadcast_onto_two(calibrated):
    """The silent case: residuals cached for one sample would broadcast onto both samples of a batch of 2."""
    model, scheduler, calibration = calibrated
    with bac.accelerate(model, method("bac", calibration), num_steps=K), torch.no_grad():
        for k in range(3):
            model(torch.zeros(1, 8, 3), scheduler.timesteps[k], observations(1))
        with pytest.raises(bac.CacheStateError, match=r"shape \[2, 8, 3\] at step 3"):
            model(torch.zeros(2, 8, 3), scheduler.timesteps[3], observations(2))


def test_shapes_are_checked_for_keyword_calls_and_per_context(calibrated):
    model, scheduler, calibration = calibrated
    ts = scheduler.timesteps
    with bac.accelerate(model, method("bac", calibration), num_steps=K) as handle, torch.no_grad():
        for k in range(3):  # classifier-free guidance: two contexts, same shapes
            with handle.context("cond"):
                model(x=torch.zeros(2, 8, 3), timestep=ts[k], cond=observations(2))
            with handle.context("uncond"):
                model(x=torch.zeros(2, 8, 3), timestep=ts[k], cond=observations(2))
        with handle.context("uncond"), pytest.raises(bac.CacheStateError, match="context 'uncond'"):
            model(x=torch.zeros(1, 8, 3), timestep=ts[3], cond=observations(1))
        with handle.context("cond"):
            assert handle.step == -1  # the whole broken-off call was cleared, both branches
        handle.new_trajectory()  # and is not reported as a short call afterwards
        with handle.context("cond"):
            model(x=torch.zeros(1, 8, 3), timestep=ts[0], cond=observations(1))
            assert handle.step == 0
        with pytest.raises(bac.CacheStateError, match="ran 1 in context 'cond'"):
            handle.end_trajectory()  # this probe is a short call itself


def test_another_horizon_is_another_shape(calibrated):
    """What is compared is the whole shape of the first tensor argument (the noisy sample)."""
    model, scheduler, calibration = calibrated
    ts = scheduler.timesteps
    with bac.accelerate(model, method("every-step", calibration), num_steps=K), torch.no_grad():
        model(torch.zeros(2, 8, 3), ts[0], observations(2))
        with pytest.raises(bac.CacheStateError, match=r"shape \[2, 7, 3\]"):
            model(torch.zeros(2, 7, 3), ts[1], observations(2))  # another horizon is another shape too


# -- sampling calls shorter than the plan ---------------------------------------------------------


def test_a_sampler_with_fewer_steps_than_the_plan_is_reported_at_the_next_call(calibrated, sample_actions,
                                                                                ddpm_scheduler):
    model, _, calibration = calibrated
    ten = ddpm_scheduler(10)
    obs = observations(2)
    handle = bac.accelerate(model, method("bac", calibration))  # no num_steps: nothing to check up front
    try:
        sample_actions(model, ten, obs)  # runs the plan's first 10 rows
        with pytest.raises(bac.CacheStateError) as caught:
            sample_actions(model, ten, obs)
        message = str(caught.value)
        assert "ran 10 in context 'default' of the plan's 12 denoising steps" in message
        assert "num_steps=" in message
        assert handle.step == -1  # the new call started all the same: it is reported once
        sample_actions(model, ddpm_scheduler(K), obs)  # a full call is fine ...
        sample_actions(model, ddpm_scheduler(K), obs)  # ... and so is the next one
        assert handle.stats()["sampling_calls"] == 3  # the refused call never reached the denoiser
    finally:
        handle.remove()  # the last call ran in full: nothing to report
    assert not hasattr(model, "_bac_handle")


def test_leaving_the_with_block_reports_a_short_last_call_and_restores_the_model(calibrated, sample_actions,
                                                                                 ddpm_scheduler):
    model, _, calibration = calibrated
    obs = observations(2)
    reference = sample_actions(model, ddpm_scheduler(10), obs)
    with pytest.raises(bac.CacheStateError, match="the last sampling call ran 10"):
        with bac.accelerate(model, method("bac", calibration)):
            sample_actions(model, ddpm_scheduler(10), obs)
    assert not hasattr(model, "_bac_handle") and not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(sample_actions(model, ddpm_scheduler(10), obs), reference)
    # an exception leaving the block is not masked by the check
    with pytest.raises(KeyError, match="from the body"):
        with bac.accelerate(model, method("bac", calibration)):
            sample_actions(model, ddpm_scheduler(10), obs)
            raise KeyError("from the body")
    assert not hasattr(model, "_bac_handle")


def test_end_trajectory_checks_at_once_and_reports_once(calibrated, sample_actions, ddpm_scheduler):
    model, _, calibration = calibrated
    with bac.accelerate(model, method("taylorseer", calibration)) as handle:
        sample_actions(model, ddpm_scheduler(K), observations(2))
        handle.end_trajectory()  # a full call
        sample_actions(model, ddpm_scheduler(5), observations(2))
        with pytest.raises(bac.CacheStateError, match="this sampling call ran 5"):
            handle.end_trajectory()
        assert handle.steps_run() == {"default": 5}  # the counts stay readable
        handle.new_trajectory()  # already reported: no second error
    # every context is checked: a branch that ran short is named, a full one is not
    with bac.accelerate(model, method("bac", calibration)) as handle, torch.no_grad():
        handle.new_trajectory()
        for k in range(K):
            with handle.context("cond"):
                model(torch.zeros(2, 8, 3), k, observations(2))
            if k < 7:
                with handle.context("uncond"):
                    model(torch.zeros(2, 8, 3), k, observations(2))
        with pytest.raises(bac.CacheStateError, match="ran 7 in context 'uncond' of") as caught:
            handle.end_trajectory()
        assert "'cond'" not in str(caught.value)


def test_interrupted_calls_stats_and_runtime_rules_are_not_reported(calibrated, sample_actions, ddpm_scheduler):
    model, _, calibration = calibrated
    obs = observations(2)

    class Interrupt(Exception):
        pass

    calls = []

    def interrupt_at_call_4(module, args, out):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupt("Ctrl-C in the middle of the model")

    with bac.accelerate(model, method("bac", calibration)) as handle:
        hook = model.decoder.layers[1].register_forward_hook(interrupt_at_call_4)
        try:
            with pytest.raises(Interrupt):
                sample_actions(model, ddpm_scheduler(K), obs)
        finally:
            hook.remove()
        sample_actions(model, ddpm_scheduler(K), obs)  # the interrupted call is not "a sampler with 4 steps"
        bac.new_trajectory(model)
        partial_call(model, ddpm_scheduler(K), obs, steps=3)
        assert handle.stats()["last_call"]["denoiser_calls"] == 3  # read mid-call: no error
        handle.summary()
        partial_call(model, ddpm_scheduler(K), obs, steps=K - 3)  # ... and the call goes on to the end
    # a runtime rule decides per step: a shorter sampler is no mistake
    with bac.accelerate(model, method("fbcache", calibration), num_steps=K):
        sample_actions(model, ddpm_scheduler(6), obs)
        sample_actions(model, ddpm_scheduler(6), obs)
    # and num_steps still refuses the plan up front, before anything runs
    with pytest.raises(bac.PlanMismatchError, match="made for 12 denoising steps, the sampler runs 10"):
        bac.accelerate(model, method("bac", calibration), num_steps=10)


def test_calibration_and_flop_counting_use_their_own_schedules(calibrated, sample_actions, ddpm_scheduler):
    model, _, calibration = calibrated
    with bac.accelerate(model, method("bac", calibration), num_steps=K) as handle:
        handle.measure_flops(torch.zeros(2, 8, 3), torch.tensor(1), observations(2))  # one call, not a trajectory
        sample_actions(model, ddpm_scheduler(K), observations(2))
    other = bac.calibrate(model, lambda o: sample_actions(model, ddpm_scheduler(5), o), [observations(2)])
    assert other.num_steps == 5


class Head(nn.Module):
    """Two encoder layers and the model's first input is a 2-D tensor: the checked shape is [batch, features]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, t):
        return self.encoder(self.inp(x)[:, None] + t)[:, 0]


def test_step_overflow_is_a_cache_state_error():
    model = Head().eval()
    with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=2)), torch.no_grad():
        model(torch.zeros(3, 3), 0.0)
        model(torch.zeros(3, 3), 1.0)
        with pytest.raises(bac.CacheStateError, match="covers 2 denoising steps"):
            model(torch.zeros(3, 3), 2.0)
        assert issubclass(bac.StepOverflowError, bac.CacheStateError)
