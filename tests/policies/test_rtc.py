"""Real-time chunking: without guidance and delay a plain call bit for bit, the frozen prefix returned unchanged,
the guided step the paper's formula, exact on a caching plan that computes every block, refused where it cannot run."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import bac
from bac.errors import ConfigError
from bac.policies.rtc import Guide, RealTimeChunking, prefix_weights
from bac.policies.warm import WarmState
from bac.sampling import FusedSampler

from .test_policies import batch, tiny_policy
from .test_vla import observation, tiny_head

OBS = torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(3)) * 0.1
HORIZON = 16


def call(view, state=None, seed=0, shift=None, delay=None, obs=OBS):
    return view.predict_action_chunk(batch(obs), generator=torch.Generator().manual_seed(seed), num_actions=HORIZON,
                                     warm_state=state, shift=shift, delay=delay)


def two_calls(view, shift=4, delay=3):
    """(first chunk, second chunk, state) of one stream: the second call continues the first."""
    state = WarmState()
    first = call(view, state)
    return first, call(view, state, seed=1, shift=shift, delay=delay), state


@pytest.mark.parametrize("sampler", [("ddim", 4), ("ddpm", 5), ("dpm", 4)])
def test_no_guidance_and_no_delay_is_the_plain_call(sampler):
    policy = tiny_policy("dpt").with_sampler(*sampler)
    first, second, state = two_calls(policy.with_rtc(max_guidance=0), delay=0)
    assert torch.equal(first, call(policy))  # no earlier chunk: a plain call
    assert torch.equal(second, call(policy, seed=1))
    assert state.counts() == {"calls": 2, "warm_calls": 0, "guided_calls": 1, "evaluations": 2 * sampler[1]}
    # without guidance only the frozen prefix is the last chunk's
    _, frozen, _ = two_calls(policy.with_rtc(max_guidance=0), delay=3)
    assert torch.equal(frozen[:, 3:], call(policy, seed=1)[:, 3:])


@pytest.mark.parametrize("shift,delay", [(4, 3), (0, 5), (8, 0), (12, 9)])
def test_the_frozen_prefix_is_returned_unchanged(shift, delay):
    policy = tiny_policy("dpt").with_sampler("ddim", 4)
    first, second, _ = two_calls(policy.with_rtc(), shift, delay)
    frozen = min(delay, HORIZON - shift)  # the last chunk has actions for the overlap only
    assert torch.equal(second[:, :frozen], first[:, shift:shift + frozen])
    if shift + frozen < HORIZON:  # past the prefix the actions are sampled (pulled toward the last chunk, not copied)
        assert not torch.equal(second[:, frozen], first[:, shift + frozen])


def test_guidance_pulls_the_overlap_toward_the_last_chunk():
    policy = tiny_policy("dpt").with_sampler("ddim", 4)
    first, guided, _ = two_calls(policy.with_rtc(), shift=4, delay=0)
    plain = call(policy, seed=1)
    overlap = slice(0, 8)  # the soft mask's region worth pulling: its weights are largest there
    assert (guided[:, overlap] - first[:, 4:12]).norm() < 0.8 * (plain[:, overlap] - first[:, 4:12]).norm()


def test_a_flow_head_is_guided_and_freezes_its_prefix():
    head = tiny_head("pi0", steps=5)
    obs = observation()
    view, state = head.with_rtc(), WarmState()
    first = view.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0), num_actions=8, warm_state=state)
    second = view.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1), num_actions=8,
                                       warm_state=state, shift=2, delay=2)
    assert torch.equal(second[:, :2], first[:, 2:4]) and state.guided_calls == 1
    changed = {**obs, "task": list(reversed(obs["task"]))}  # another instruction: no prior, a plain call
    assert torch.equal(view.predict_action_chunk(changed, generator=torch.Generator().manual_seed(1), warm_state=state,
                                                 shift=2, delay=2),
                       head.predict_action_chunk(changed, generator=torch.Generator().manual_seed(1)))


def test_the_guided_step_is_the_papers_flow_formula():
    """pi0's convention (tau = 1 - sigma, v = -u): v' = v + min(beta, (1 - tau) / (tau r^2)) * g, g = e^T d x0 / d x."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(5)
    fused = FusedSampler(scheduler)
    g = torch.Generator().manual_seed(0)
    linear, bias = torch.randn(3, 3, generator=g) * 0.3, torch.randn(3, generator=g)
    denoise = lambda x: x @ linear.T + bias  # noqa: E731  a hand-built velocity field
    x, target = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    weights = prefix_weights(4, 1, 3)
    rtc = RealTimeChunking(5.0)
    guide = Guide(target, weights, fused, rtc.scales(fused))
    for i in range(5):
        sigma = float(scheduler.sigmas[i])
        tau = 1 - sigma
        u = denoise(x)
        x0 = x - sigma * u
        error = weights[None, :, None] * (target - x0)
        pull = error - sigma * error @ linear  # e^T (I - sigma * linear)
        r2 = (1 - tau) ** 2 / (tau ** 2 + (1 - tau) ** 2)
        weight = 5.0 if tau == 0 else min(5.0, (1 - tau) / (tau * r2))
        torch.testing.assert_close(guide(i, x, denoise), u - weight * pull, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: DDPMScheduler(num_train_timesteps=100), lambda: DDPMScheduler(num_train_timesteps=100,
                                                                         prediction_type="sample"),
    lambda: DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction"),
    lambda: DPMSolverMultistepScheduler(num_train_timesteps=100), lambda: FlowMatchEulerDiscreteScheduler()])
def test_shift_output_moves_the_data_prediction_by_the_change(make):
    scheduler = make()
    scheduler.set_timesteps(4)
    fused = FusedSampler(scheduler)
    g = torch.Generator().manual_seed(1)
    x, out, change = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    for i in range(4):
        moved = fused.predict_x0(i, fused.shift_output(i, out, change), x)
        torch.testing.assert_close(moved, fused.predict_x0(i, out, x) + change, rtol=1e-4, atol=1e-4)


def test_prefix_weights_are_the_papers_soft_mask():
    weights = prefix_weights(16, 3, 10)
    assert torch.equal(weights[:3], torch.ones(3)) and torch.equal(weights[10:], torch.zeros(6))
    c = (10 - 3) / (10 - 3 + 1)
    assert weights[3].item() == pytest.approx(c * math.expm1(c) / (math.e - 1))
    assert (weights[3:11].diff() < 0).all()  # decaying over the overlap
    for bad in [(16, 5, 4), (16, -1, 4), (8, 2, 9)]:
        with pytest.raises(ConfigError, match="delay <= overlap <= horizon"):
            prefix_weights(*bad)


@pytest.mark.parametrize("architecture", ["dpt", "dit"])
def test_rtc_on_a_plan_computing_every_block_is_exact(architecture):
    policy = tiny_policy(architecture).with_sampler("ddim", 4)
    view = policy.with_rtc()
    _, reference, _ = two_calls(view)
    plan = bac.make_plan(policy.model, "every-step", num_steps=4, scheduler=policy.sampler)
    with policy.accelerate(plan):
        _, cached, _ = two_calls(view)
    assert torch.equal(cached, reference)
    # a plan that reuses blocks: their kept values are constants of the guided step (no stale graph is followed)
    uniform = bac.make_plan(policy.model, "uniform", num_steps=4, M=2, scheduler=policy.sampler)
    with policy.accelerate(uniform) as handle:
        _, reused, _ = two_calls(view)
        assert handle.stats()["last_call"]["skipped"] > 0
    assert torch.isfinite(reused).all() and not torch.equal(reused, reference)


def test_rtc_combines_with_a_plain_warm_start_only():
    policy = tiny_policy("dpt").with_sampler("ddim", 4)
    view = policy.with_warm_start(1).with_rtc()
    first, second, state = two_calls(view)
    assert torch.equal(second[:, :3], first[:, 4:7])
    assert state.counts() == {"calls": 2, "warm_calls": 1, "guided_calls": 1, "evaluations": 4 + 3}
    with pytest.raises(ConfigError, match="plain warm starts"):
        policy.with_warm_start(2, "checked", 0.5).with_rtc()
    with pytest.raises(ConfigError, match="plain warm starts"):
        policy.with_rtc().with_warm_start(2, "falcon", 0.5)


def test_bad_settings_are_refused():
    policy = tiny_policy("dpt").with_sampler("ddim", 4)
    for bad in (-1.0, float("nan"), "5", True):
        with pytest.raises(ConfigError, match="max_guidance"):
            policy.with_rtc(bad)
    view, state = policy.with_rtc(), WarmState()
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="delay"):
            call(view, state, delay=bad)
    with pytest.raises(ConfigError, match="real-time chunking"):
        view.compile_call(backend="eager")
    with pytest.raises(ConfigError, match="before compile_call"):
        policy.compile_call(backend="eager").with_rtc()
