"""Warm-started sampling calls of a policy view: start 0 is a cold call bit for bit, every cold fallback is
one, rows, views and threads keep their own state, and a warm call runs the sampler's last K - start steps."""
import threading

import pytest
import torch

import bac
from bac.policies.warm import WarmState

from .test_policies import batch, tiny_policy
from .test_vla import observation, tiny_head

OBS = torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(3)) * 0.1


def call(view, obs=OBS, state=None, seed=0, task="push", shift=None):
    return view.predict_action_chunk(batch(obs, task), generator=torch.Generator().manual_seed(seed),
                                     warm_state=state, shift=shift)


VARIANTS = [("plain", None), ("checked", 1e9), ("falcon", 1e9)]  # thresholds that accept any prior


@pytest.mark.parametrize("sampler", [("ddim", 6), ("ddpm", 6), ("dpm", 6)])
@pytest.mark.parametrize("variant,threshold", VARIANTS)
def test_start_zero_and_every_first_call_are_the_cold_call(sampler, variant, threshold):
    policy = tiny_policy("dpt").with_sampler(*sampler)
    cold = call(policy)
    state = WarmState()
    assert torch.equal(call(policy.with_warm_start(0, variant, threshold), state=state), cold)
    assert torch.equal(call(policy.with_warm_start(0, variant, threshold), state=state), cold)  # start 0: always cold
    warm_view, warm_state = policy.with_warm_start(3, variant, threshold), WarmState()
    assert torch.equal(call(warm_view, state=warm_state), cold)  # no earlier chunk
    assert not torch.equal(call(warm_view, state=warm_state), cold)  # begun from the first chunk
    assert warm_state.counts() == {"calls": 2, "warm_calls": 1, "guided_calls": 0,
                                   "evaluations": 6 + (6 - 3 if variant == "plain" else 1 + 6 - 3)}
    assert torch.equal(call(warm_view), cold)  # no state given: cold, nothing kept


def test_flow_heads_warm_start_too():
    head = tiny_head("gr00t", steps=6)
    obs = observation()
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cold = head.predict_action_chunk(obs, generator=generator())
    view, state = head.with_warm_start(2), WarmState()
    assert torch.equal(view.predict_action_chunk(obs, generator=generator(), warm_state=state), cold)
    warm = view.predict_action_chunk(obs, generator=generator(), warm_state=state)
    assert not torch.equal(warm, cold) and state.counts()["evaluations"] == 6 + 4
    changed = {**obs, "task": list(reversed(obs["task"]))}  # another instruction: cold
    assert torch.equal(view.predict_action_chunk(changed, generator=generator(), warm_state=state),
                       head.predict_action_chunk(changed, generator=generator()))


def test_every_invalid_prior_falls_back_to_the_cold_call():
    policy = tiny_policy("dpt").with_sampler("ddim", 6)
    view = policy.with_warm_start(3)

    def primed():
        state = WarmState()
        call(view, state=state, seed=1)
        return state

    assert torch.equal(call(view, state=primed(), shift=16), call(policy))  # late: no overlap (horizon 16)
    assert torch.equal(call(view, state=primed(), task="reach"), call(policy, task="reach"))
    assert torch.equal(call(view, OBS[:1], state=primed()), call(policy, OBS[:1]))  # another batch size
    jumped = OBS + 3.0 / policy.obs_normalizer.scale  # +1.5 on every normalised feature
    assert torch.equal(call(view, jumped, state=primed()), call(policy, jumped))
    assert not torch.equal(call(view, OBS + 0.01, state=primed()), call(policy, OBS + 0.01))  # a small move: warm
    state = primed()
    state.reset()  # a new episode
    assert torch.equal(call(view, state=state), call(policy))


def test_select_action_warm_starts_within_an_episode_and_reset_starts_cold():
    policy = tiny_policy("dpt").with_sampler("ddim", 6)
    view = policy.with_warm_start(2)
    steps = 2 * policy.n_action_steps

    def episode(v):
        v.reset()
        g = torch.Generator().manual_seed(0)
        return torch.stack([v.select_action(batch(OBS[:, -1]), generator=g) for _ in range(steps)])

    cold, warm = episode(policy), episode(view)
    n = policy.n_action_steps
    assert torch.equal(warm[:n], cold[:n]) and not torch.equal(warm[n:], cold[n:])
    assert torch.equal(episode(view), warm)  # reset: the same episode again
    assert view.warm_counts == {"calls": 4, "warm_calls": 2, "guided_calls": 0, "evaluations": 2 * (6 + 4)}
    assert policy.with_warm_start(2).warm_counts["calls"] == 0  # a new view: its own state


def test_a_non_finite_chunk_is_never_a_prior():
    view, state = tiny_policy("dpt").with_sampler("ddim", 6).with_warm_start(3), WarmState()
    call(view, state=state)
    bad = OBS.clone()
    bad[0, :, 5] = 1e30  # finite, far outside the training range: non-finite actions
    with pytest.raises(bac.NonFiniteError):
        call(view, bad, state=state)
    assert state.prior is None  # the next call is cold
    assert torch.equal(call(view, state=state), call(view.with_warm_start(0)))


def test_each_row_warm_starts_from_its_own_prior():
    view = tiny_policy("dpt").with_sampler("ddim", 6).with_warm_start(3)
    state = WarmState()
    call(view, state=state)
    altered = WarmState()
    altered.prior, altered.observation, altered.task = state.prior.clone(), state.observation, state.task
    altered.prior[1] += 0.5
    same, other = call(view, state=state, seed=1), call(view, state=altered, seed=1)
    assert torch.equal(same[0], other[0]) and not torch.equal(same[1], other[1])


def test_threads_with_their_own_state_get_what_they_get_alone():
    view = tiny_policy("dpt").with_sampler("ddim", 6).with_warm_start(2)
    observations = [OBS, OBS * 2]

    def run(obs, out):
        state = WarmState()
        out.extend(call(view, obs, state=state, seed=s) for s in range(4))

    alone = [[], []]
    for obs, out in zip(observations, alone):
        run(obs, out)
    together = [[], []]
    threads = [threading.Thread(target=run, args=(obs, out)) for obs, out in zip(observations, together)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for x, y in zip(alone, together) for a, b in zip(x, y))


def test_a_cached_plan_runs_its_last_rows_on_a_warm_call():
    policy = tiny_policy("dpt").with_sampler("ddim", 6)
    view, state = policy.with_warm_start(2), WarmState()
    with view.accelerate(bac.make_plan(view.model, "every-step", num_steps=6)) as handle:
        first, second = call(view, state=state), call(view, state=state)
        assert handle.stats()["last_call"]["denoiser_calls"] == 4
    plain_state = WarmState()
    assert torch.equal(call(view, state=plain_state), first) and torch.equal(call(view, state=plain_state), second)


def test_bad_warm_settings_are_clear_errors():
    policy = tiny_policy("dpt").with_sampler("ddim", 6)
    for args, message in [((6,), "does not fit a sampler of 6"), ((2, "magic"), "variant must be one of"),
                          ((3, "checked"), "needs threshold"), ((3, "plain", 0.5), "takes no threshold"),
                          ((1, "falcon", 0.5), "begins at a step >= 2"), ((-1,), "start must be"),
                          ((2, "checked", -1.0), "threshold must be a positive")]:
        with pytest.raises(bac.ConfigError, match=message):
            policy.with_warm_start(*args)
    with pytest.raises(bac.ConfigError, match="shift must be"):
        call(policy.with_warm_start(2), state=WarmState(), shift=-1)
    assert policy.with_warm_start(2).with_sampler("ddim", 4).warm is None  # made for another schedule
