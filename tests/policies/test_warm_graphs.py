"""Warm-started calls as whole-call graphs (CompiledCall.runner): a compiled warm view runs every segment of
a warm call (the warm start, the check step, the cold fallback, Falcon's candidates) as graphs built by
compile_call, and each call equals the eager warm view's call, across consecutive calls with a WarmState,
with and without a cached plan. DP-T with the traced graph run as is (``eager``) is bit-identical (as in
test_graph_call); the flow head's fused attention kernels are decomposed by the trace (within 1e-6)."""
import pytest
import torch

import bac
from bac.errors import ConfigError
from bac.policies.warm import WarmState

from .test_graph_call import _close
from .test_policies import batch, tiny_policy
from .test_vla import INSTRUCTIONS, observation, tiny_head

OBS = torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(3)) * 0.1
STEPS, START, CALLS = 5, 2, 4
ACCEPT, REJECT = 1e9, 1e-9  # thresholds: every prior accepted (warm), none (the cold fallback after the check)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _calls(view, state):
    """CALLS consecutive calls of one stream, the observation moving a little (warm after the first)."""
    return [view.predict_action_chunk(batch(OBS + 0.01 * n), generator=_generator(n), warm_state=state)
            for n in range(CALLS)]


def _plan(policy):
    return bac.make_plan(policy.model, "uniform", num_steps=STEPS, M=2, scheduler=policy.sampler)


# Each path once: a warm start, the check step then a warm start or the cold fallback (uncached: going on
# after the check step, DPM-Solver's next step taking its data prediction; with a plan: the cold call again,
# with DDPM's draws of the check step), Falcon's candidates kept.
CASES = [("ddim", "plain", None, False), ("ddim", "plain", None, True), ("ddim", "checked", ACCEPT, True),
         ("ddim", "checked", REJECT, False), ("ddim", "falcon", ACCEPT, False), ("ddim", "falcon", REJECT, True),
         ("ddpm", "plain", None, False), ("ddpm", "checked", REJECT, True), ("dpm", "plain", None, True),
         ("dpm", "checked", REJECT, False)]


@pytest.mark.parametrize("kind,variant,threshold,cached", CASES)
def test_warm_graph_calls_equal_the_eager_warm_calls(kind, variant, threshold, cached):
    """Each of CALLS calls equal, all graphs built up front (none traced during the calls), the same warm
    decisions; DDPM's draws and DPM-Solver's first-order first step included."""
    policy = tiny_policy("dpt").with_sampler(kind, STEPS)
    handle = policy.accelerate(_plan(policy)) if cached else None
    view = policy.with_warm_start(START, variant, threshold)
    eager_state, graph_state = WarmState(), WarmState()
    eager = _calls(view, eager_state)
    eager_stats = handle.stats() if cached else None
    compiled = view.compile_call(batch=2, backend="eager")
    built = dict(compiled.graph.graphs)
    assert len(built) == len(compiled.graph.segments())
    for got, want in zip(_calls(compiled, graph_state), eager):
        assert torch.equal(got, want)
    assert compiled.graph.graphs == built
    assert graph_state.counts() == eager_state.counts() and eager_state.warm_calls == (
        0 if threshold == REJECT else CALLS - 1)
    if cached:  # the graph calls counted as the eager calls, but a check step followed by a warm start
        stats = handle.stats()
        unseen = eager_state.warm_calls if variant != "plain" else 0
        assert stats["sampling_calls"] == 2 * eager_stats["sampling_calls"] - unseen
        assert stats["denoiser_calls"] == 2 * eager_stats["denoiser_calls"] - unseen
        handle.remove()


def test_falcon_candidates_from_every_step_with_a_plan():
    """Falcon begins at the latest accepted candidate: with a threshold between the candidates' distances the
    begin step varies; every call equal under a cached plan."""
    policy = tiny_policy("dpt").with_sampler("ddim", 6)
    handle = policy.accelerate(bac.make_plan(policy.model, "uniform", num_steps=6, M=2, scheduler=policy.sampler))
    view = policy.with_warm_start(4, "falcon", 0.2)
    compiled = view.compile_call(batch=2, backend="eager")
    assert {(s.begin, s.end, s.origin) for s in compiled.graph.segments()} == {
        (0, 6, 0), (0, 1, 0), *((k, 6, k) for k in range(1, 5))}
    eager_state, graph_state = WarmState(), WarmState()
    for got, want in zip(_calls(compiled, graph_state), _calls(view, eager_state)):
        assert torch.equal(got, want)
    assert graph_state.counts() == eager_state.counts()
    handle.remove()


def test_flow_head_warm_graph_calls_equal_the_eager_ones():
    head = tiny_head("gr00t", steps=4)
    view = head.with_warm_start(2)
    compiled = view.compile_call(batch=2, backend="aot_eager", instructions=INSTRUCTIONS[1:2])  # the longest
    built = dict(compiled.graph.graphs)
    obs = observation()
    eager_state, graph_state = WarmState(), WarmState()
    for n in range(3):
        moved = {**obs, "observation.state": obs["observation.state"] + 0.01 * n}
        want = view.predict_action_chunk(moved, generator=_generator(n), warm_state=eager_state)
        _close(compiled.predict_action_chunk(moved, generator=_generator(n), warm_state=graph_state), want, 1e-6)
    assert graph_state.counts() == eager_state.counts() and eager_state.warm_calls == 2
    assert compiled.graph.graphs == built


def test_a_compiled_warm_views_cold_call_is_the_compiled_cold_call():
    """The first call of a stream (and every call without a WarmState) equals the compiled cold view's call,
    though Falcon's cold graph also returns its candidates."""
    policy = tiny_policy("dpt").with_sampler("ddpm", 3)
    cold = policy.compile_call(batch=2, backend="eager")
    warm = policy.with_warm_start(START, "falcon", ACCEPT).compile_call(batch=2, backend="eager")
    want = cold.predict_action_chunk(batch(OBS), generator=_generator(0))
    assert torch.equal(warm.predict_action_chunk(batch(OBS), generator=_generator(0), warm_state=WarmState()), want)
    assert torch.equal(warm.predict_action_chunk(batch(OBS), generator=_generator(0)), want)


def test_warm_views_refuse_onnxruntime_and_other_batch_sizes():
    policy = tiny_policy("dpt").with_sampler("ddim", STEPS)
    with pytest.raises(ConfigError, match="onnxruntime.*warm2"):
        policy.with_warm_start(START).compile_call(batch=1, backend="onnxruntime")
    compiled = policy.with_warm_start(START).compile_call(batch=2, backend="eager")
    state = WarmState()
    compiled.predict_action_chunk(batch(OBS), generator=_generator(0), warm_state=state)
    with pytest.raises(ConfigError, match="batch sizes"):
        compiled.predict_action_chunk(batch(OBS[:1]), generator=_generator(0), warm_state=state)
