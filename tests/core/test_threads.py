"""One accelerated model, several threads: each thread has its own cache state."""
import threading

import pytest
import torch

import bac


def lockstep_sample(model, scheduler, obs, seed, barrier=None):
    """A seeded sampling call; with a barrier, every denoiser call waits for the other thread's."""
    bac.new_trajectory(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((obs.shape[0], model.horizon, model.action_dim), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            if barrier is not None:
                barrier.wait(timeout=60)
            x = scheduler.step(model(x, t, obs), t, x, generator=generator).prev_sample
    return x


def run_in_threads(fns):
    results, errors = [None] * len(fns), []

    def target(i):
        try:
            results[i] = fns[i]()
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_two_threads_interleaving_denoiser_calls_get_their_own_trajectories(tiny_stack, ddpm_scheduler):
    model, _, obs = tiny_stack
    schedulers = [ddpm_scheduler(12), ddpm_scheduler(12)]
    plan = bac.make_plan(model, "uniform", num_steps=12, M=4)  # skipped steps reuse cached residuals
    with bac.accelerate(model, plan, num_steps=12) as handle:
        alone = [lockstep_sample(model, schedulers[i], obs[i:i + 1], seed=i) for i in range(2)]
        barrier = threading.Barrier(2)
        together = run_in_threads([
            lambda i=i: lockstep_sample(model, schedulers[i], obs[i:i + 1], seed=i, barrier=barrier) for i in range(2)
        ])
        stats = handle.stats()
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
    assert stats["sampling_calls"] == 4 and stats["denoiser_calls"] == 48  # every thread's calls counted
    assert stats["skipped_share"] == plan.skipped_count() / (len(plan.blocks) * 12)
    assert not torch.equal(together[0], together[1])  # the two threads really sampled different things


def test_context_and_new_trajectory_act_on_the_calling_thread_only(tiny_stack):
    model, scheduler, obs = tiny_stack
    with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=12), num_steps=12) as handle:
        with torch.no_grad():
            model(torch.zeros(1, model.horizon, model.action_dim), scheduler.timesteps[0], obs[:1])
        assert handle.step == 0
        seen = run_in_threads([lambda: (handle.step, handle.active_context)])
        assert seen == [(-1, "default")]  # another thread starts fresh
        with handle.context("uncond"):
            assert run_in_threads([lambda: handle.active_context]) == ["default"]
            assert handle.active_context == "uncond"
        run_in_threads([handle.new_trajectory])
        assert handle.step == 0  # the other thread's new trajectory left this one alone
        # ... and did not report this thread's call, which ran 1 of the plan's 12 steps: removing does
        with pytest.raises(bac.CacheStateError, match="ran 1 in context 'default' of the plan's 12"):
            handle.remove()
