"""bac.graphs on the core's tiny denoiser: a sampling call traced with a static plan runs the plan's computed
blocks only, equals the eager cached call, leaves no trace in the handle, and counts like the eager call;
runtime rules are refused; the fused sampler's noise can be drawn before the call."""
import pytest
import torch
from torch import nn

import bac
from bac.graphs import GraphCall, trace
from bac.sampling import DrawnNoise, FusedSampler, draw_noise


class Loop(nn.Module):
    """A DDPM sampling call of ``model`` as a function of tensors: (noise [1 + draws, B, H, A], cond)."""

    def __init__(self, model, scheduler):
        super().__init__()
        self.model, self.fused = model, FusedSampler(scheduler)

    def forward(self, noise, cond):
        trajectory, drawn, x = self.fused.start(), DrawnNoise(noise[1:]), noise[0]
        for i, t in enumerate(self.fused.timesteps):
            x = trajectory.step(i, self.model(x, t, cond), x, generator=drawn)
        return x


def _noise(loop, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([draw_noise(shape, g, torch.device("cpu")) for _ in range(1 + loop.fused.noise_draws)])


def test_drawn_noise_is_the_eager_draw(tiny_denoiser, ddpm_scheduler):
    """A DDPM call with its noise drawn up front, in the eager loop's order, equals the eager call."""
    model, scheduler = tiny_denoiser(), ddpm_scheduler(6)
    loop, cond, shape = Loop(model, scheduler), torch.randn(2, 2, 5), (2, 8, 3)
    assert loop.fused.noise_draws == 5  # every step but the last
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x = torch.randn(shape, generator=g)
        trajectory = loop.fused.start()
        for i, t in enumerate(loop.fused.timesteps):
            x = trajectory.step(i, model(x, t, cond), x, generator=g)
        noise = _noise(loop, shape, 4)
        given = noise.clone()
        assert torch.equal(loop(noise, cond), x)
        assert torch.equal(noise, given)  # the steps write into copies of the draws, not into the caller's
    drawn = DrawnNoise(torch.zeros(1, *shape))
    drawn.take(shape, torch.float32)
    with pytest.raises(bac.ConfigError, match="noise draw 2"):
        drawn.take(shape, torch.float32)


def test_traced_plan_equals_eager_and_counts_like_it(tiny_denoiser, ddpm_scheduler):
    model, scheduler = tiny_denoiser(), ddpm_scheduler(6)
    loop, cond = Loop(model, scheduler), torch.randn(2, 2, 5)
    noise = _noise(loop, (2, 8, 3), 0)
    plan = bac.make_plan(model, "uniform", num_steps=6, M=3)
    with bac.accelerate(model, plan, num_steps=6) as handle, torch.no_grad():
        bac.new_trajectory(model)
        eager = loop(noise, cond)
        eager_stats = handle.stats()
        exported = trace(loop, [noise, cond])
        assert handle.stats() == eager_stats  # the trace ran in a scratch context
        graph = GraphCall(exported, [noise, cond], backend="eager")
        # nn.TransformerDecoderLayer's eager inference runs fused kernels the trace decomposes
        assert (graph(noise, cond) - eager).abs().max() <= 1e-6 * eager.abs().max()
        handle.count_graph_call()
        stats = handle.stats()
        assert stats["sampling_calls"] == 2 and stats["denoiser_calls"] == 12
        assert stats["computed"] == 2 * eager_stats["computed"] and stats["last_call"] == eager_stats["last_call"]
    with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=6), num_steps=6):
        full = trace(loop, [noise, cond])

    def attention_calls(program):
        return sum("scaled_dot_product" in str(n.target) or "multi_head_attention" in str(n.target)
                   for n in program.graph.nodes)
    assert attention_calls(exported) < attention_calls(full)  # skipped blocks are not in the graph


def test_runtime_rules_and_other_inputs_are_refused(tiny_denoiser, ddpm_scheduler):
    model, scheduler = tiny_denoiser(), ddpm_scheduler(6)
    loop, cond = Loop(model, scheduler), torch.randn(2, 2, 5)
    noise = _noise(loop, (2, 8, 3), 0)
    with bac.accelerate(model, bac.FirstBlockCache(threshold=0.1), num_steps=6):
        with pytest.raises(bac.ConfigError, match="runtime rule"):
            trace(loop, [noise, cond])
    with pytest.raises(bac.ConfigError, match="backend"):
        GraphCall(trace(loop, [noise, cond]), [noise, cond], backend="tvm")
    with bac.accelerate(model, bac.FirstBlockCache(threshold=0.1), num_steps=6) as handle:
        with pytest.raises(bac.CacheStateError, match="static plan"):
            handle.count_graph_call()
