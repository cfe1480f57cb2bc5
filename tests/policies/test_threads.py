"""Threads sharing one policy: each call keeps its own sampler state, so every sampler kind, with or without a
caching plan, gives each thread exactly the actions it gets alone; ``with_sampler`` views sample side by side.

The denoiser calls of the two threads are forced to alternate (a barrier before every denoiser call), the
interleaving under which per-call state kept on a shared policy goes wrong (issue 30: DPM-Solver++ raised
"step(1) follows step(1)" or returned other actions)."""
import sys
import threading
import time

import pytest
import torch

import bac
from bac.policies.config import PolicyConfig
from bac.policies.language import TOKEN_DIM, LanguageCache
from bac.policies.policy import DiffusionPolicy

CALLS = 10  # sampling calls per thread
INSTRUCTIONS = ["open the faucet", "close the faucet"]
SIZE = 32


def tiny_dpt() -> DiffusionPolicy:
    torch.manual_seed(0)
    config = PolicyConfig.build("dpt", {"width": 32, "num_layers": 2, "heads": 2}, state_dim=6, action_dim=3,
                                tasks=["push"], horizon=8, n_obs_steps=2, n_action_steps=4)
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():  # give every branch some signal
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 6))
    policy.action_normalizer.fit(torch.rand(100, 3) * 2 - 1)
    return policy.eval()


def tiny_flow_head() -> DiffusionPolicy:
    """A GR00T-style flow-matching head, as tests/policies/test_vla.py builds it."""
    torch.manual_seed(0)
    settings = {"width": 32, "num_layers": 2, "heads": 2, "image_size": SIZE, "crop_pad": 2}
    config = PolicyConfig.build("gr00t", settings, state_dim=4, action_dim=4, tasks=INSTRUCTIONS,
                                noise_scheduler={"kind": "flow_matching"}, state_keys=["hand_pos", "gripper"],
                                horizon=8, n_obs_steps=1, n_action_steps=4)
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 4))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    g = torch.Generator().manual_seed(0)
    policy.language = LanguageCache({text: torch.randn(3 + i, TOKEN_DIM, generator=g)
                                     for i, text in enumerate(INSTRUCTIONS)})
    return policy.eval()


def observations(policy: DiffusionPolicy, seed: int) -> list[dict]:
    """``CALLS`` batches of one observation history each (thread ``seed``'s inputs)."""
    g = torch.Generator().manual_seed(seed)
    state = [torch.randn(1, policy.n_obs_steps, policy.state_dim, generator=g) for _ in range(CALLS)]
    if not policy.config.is_vla:
        return [{"observation.state": s, "task": "push"} for s in state]
    camera = "observation.images." + policy.cameras[0]
    return [{"observation.state": s, camera: torch.rand(1, 3, SIZE, SIZE, generator=g), "task": INSTRUCTIONS[seed % 2]}
            for s in state]


def run_calls(policy: DiffusionPolicy, seed: int) -> list[torch.Tensor]:
    """``CALLS`` sampling calls on one generator seeded with ``seed`` (the noise continues across calls)."""
    generator = torch.Generator().manual_seed(seed)
    return [policy.predict_action_chunk(batch, generator=generator) for batch in observations(policy, seed)]


def in_threads(jobs) -> list:
    """Run each job in its own thread, started together; the results, any error re-raised."""
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    threads_per_op = torch.get_num_threads()

    def target(i):
        try:
            # torch's thread count for this OS thread too (its first op would otherwise run on the default
            # count: another reduction order, other bits than the same call alone)
            torch.set_num_threads(threads_per_op)
            start.wait(timeout=60)
            results[i] = jobs[i]()
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


class Alternate:
    """A forward pre-hook on the shared denoiser that makes the threads' denoiser calls alternate."""

    def __init__(self, model: torch.nn.Module, threads: int = 2):
        self.barrier = threading.Barrier(threads)
        self.hook = model.register_forward_pre_hook(self.wait)

    def wait(self, module, args) -> None:
        self.barrier.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def uniform_plan(policy: DiffusionPolicy) -> bac.Method:
    sampler = policy.sampler
    return bac.build_method("uniform", policy.model, num_steps=sampler.steps, scheduler=sampler.scheduler, M=2)


CASES = {  # name: (policy, sampler kind, steps)
    "ddpm": (tiny_dpt, "ddpm", 10),
    "ddim": (tiny_dpt, "ddim", 6),
    "dpm": (tiny_dpt, "dpm", 6),  # the failing case
    "flow": (tiny_flow_head, "flow", 4),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("planned", [False, True], ids=["no-plan", "plan"])
@pytest.mark.parametrize("case", CASES)
def test_two_threads_sharing_a_policy_get_the_actions_each_gets_alone(case, planned):
    build, kind, steps = CASES[case]
    policy = build().with_sampler(kind, steps)
    handle = policy.accelerate(uniform_plan(policy)) if planned else None
    alone = [run_calls(policy, seed) for seed in (1, 2)]
    with Alternate(policy.model):
        together = in_threads([lambda seed=seed: run_calls(policy, seed) for seed in (1, 2)])
    for own, shared in zip(alone, together):
        assert all(torch.equal(a, b) for a, b in zip(own, shared))
    assert not torch.equal(together[0][0], together[1][0])  # the threads really sampled different things
    if handle is not None:
        stats = handle.stats()
        assert stats["sampling_calls"] == 4 * CALLS and stats["skipped"] > 0
        handle.remove()


def select_actions(policy: DiffusionPolicy, seed: int) -> list[torch.Tensor]:
    """An episode of ``select_action`` calls (the view's own queue and history) on one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    g = torch.Generator().manual_seed(100 + seed)
    policy.reset()
    return [policy.select_action({"observation.state": torch.randn(1, policy.state_dim, generator=g), "task": "push"},
                                 generator=generator) for _ in range(2 * CALLS)]


@pytest.mark.usefixtures("one_thread")
def test_views_with_different_samplers_sample_side_by_side():
    """DDIM and DPM-Solver++ views of one policy (the same step count, so their denoiser calls alternate)."""
    policy = tiny_dpt()
    views = [policy.with_sampler("ddim", 6), policy.with_sampler("dpm", 6)]
    alone = [select_actions(view, seed) for seed, view in enumerate(views)]
    with Alternate(policy.model):
        together = in_threads([lambda v=v, s=s: select_actions(v, s) for s, v in enumerate(views)])
    for own, shared in zip(alone, together):
        assert all(torch.equal(a, b) for a, b in zip(own, shared))
    assert policy.sampler.kind == "ddpm" and policy.chunk_due  # the viewed policy is untouched


@pytest.mark.usefixtures("one_thread")
def test_views_with_different_step_counts_sample_side_by_side():
    """DDPM at 10 steps and DPM-Solver++ at 4, free-running: the threads switch at every denoiser call."""
    policy = tiny_dpt()
    views = [policy.with_sampler("ddpm", 10), policy.with_sampler("dpm", 4)]
    alone = [run_calls(view, seed) for seed, view in enumerate(views)]
    hook = policy.model.register_forward_pre_hook(lambda module, args: time.sleep(0))  # offer a switch
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        together = in_threads([lambda v=v, s=s: run_calls(v, s) for s, v in enumerate(views)])
    finally:
        sys.setswitchinterval(interval)
        hook.remove()
    for own, shared in zip(alone, together):
        assert all(torch.equal(a, b) for a, b in zip(own, shared))
