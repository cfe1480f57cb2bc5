"""A policy view (or the deprecated in-place set_sampler) sampling with another sampler than the one its shared
denoiser is accelerated for: a bac.PlanMismatchError before any denoiser call, never a silently wrong chunk."""
import contextlib

import pytest
import torch

import bac
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy

STEPS = 4


def tiny_policy():
    torch.manual_seed(0)
    config = PolicyConfig.build("dpt", {"width": 32, "num_layers": 2, "heads": 2}, state_dim=39, action_dim=4,
                                tasks=["reach"])
    policy = DiffusionPolicy(config)
    policy.obs_normalizer.fit(torch.randn(100, 39))
    return policy.eval().with_sampler("ddim", STEPS)


def batch():
    return {"observation.state": torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(0)),
            "task": ["reach", "reach"]}


def count_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


# (how the sampling policy gets its sampler, what the error names); the denoiser is accelerated for DDIM-4
MISFITS = {
    "view, fewer steps": (lambda p: p.with_sampler("ddim", STEPS - 1), "runs 3 denoising steps"),
    "view, more steps": (lambda p: p.with_sampler("ddim", STEPS + 2), "runs 6 denoising steps"),
    "view, another scheduler": (lambda p: p.with_sampler("dpm", STEPS), "DPMSolverMultistepScheduler"),
    "set_sampler, fewer steps": (lambda p: p.set_sampler("ddim", 2), "runs 2 denoising steps"),
    "set_sampler, another scheduler": (lambda p: p.set_sampler("ddpm", STEPS), "DDPMScheduler"),
}


def accelerated_method(policy, kind):
    spec = bac.describe(policy.model)
    if kind == "plan":
        return bac.build_method("uniform", spec, num_steps=STEPS, M=2, scheduler=policy.sampler.scheduler)
    return bac.build_method("fbcache", spec, threshold=0.1)


def sampler_of(policy, misfit):
    make, _ = MISFITS[misfit]
    with pytest.warns(DeprecationWarning) if "set_sampler" in misfit else contextlib.nullcontext():
        return make(policy)


# a runtime rule decides step by step: fewer steps than it was bound for fit it (the next test)
@pytest.mark.parametrize("misfit, kind", [(m, k) for m in MISFITS for k in ("plan", "rule")
                                          if k == "plan" or "fewer" not in m])
def test_a_sampler_that_does_not_fit_the_accelerated_schedule_is_refused_before_any_denoiser_call(misfit, kind):
    policy = tiny_policy()
    with policy.accelerate(accelerated_method(policy, kind)):
        sampling = sampler_of(policy, misfit)
        calls = count_calls(policy.model)
        for _ in range(2):  # a refusal is not remembered as a fit
            with pytest.raises(bac.PlanMismatchError, match=MISFITS[misfit][1]):
                sampling.predict_action_chunk(batch())
        assert calls == []  # refused before the denoiser ran


@pytest.mark.parametrize("misfit", [m for m in MISFITS if "fewer" in m])
def test_fewer_steps_than_a_runtime_rule_was_bound_for_fit_it(misfit):
    policy = tiny_policy()
    with policy.accelerate(accelerated_method(policy, "rule")) as handle:
        sampling = sampler_of(policy, misfit)
        assert torch.isfinite(sampling.predict_action_chunk(batch())).all()
        assert handle.stats()["denoiser_calls"] == sampling.sampler.steps


def test_the_sampler_it_was_accelerated_for_samples_as_before_and_a_reaccelerated_view_fits():
    policy = tiny_policy()
    spec = bac.describe(policy.model)
    plan = bac.make_plan(spec, "uniform", num_steps=STEPS, M=2, scheduler=policy.sampler.scheduler)
    with policy.accelerate(plan):
        same = policy.with_sampler("ddim", STEPS)  # another Sampler value of the same kind and steps
        first = policy.predict_action_chunk(batch(), generator=torch.Generator().manual_seed(1))
        again = same.predict_action_chunk(batch(), generator=torch.Generator().manual_seed(1))
        assert torch.equal(first, again)
    view = policy.with_sampler("ddim", STEPS + 2)
    with view.accelerate(bac.make_plan(spec, "uniform", num_steps=STEPS + 2, M=2,
                                       scheduler=view.sampler.scheduler)) as handle:
        view.predict_action_chunk(batch())
        assert handle.stats()["sampling_calls"] == 1
        with pytest.raises(bac.PlanMismatchError, match="runs 4 denoising steps"):
            policy.predict_action_chunk(batch())  # now the original policy is the one that does not fit
