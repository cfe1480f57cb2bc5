"""Whole-call graphs (bac.graphs, DiffusionPolicy.compile_call): a policy call traced once with its sampler
and static plan baked in equals the eager call, for every architecture, sampler kind and a cached plan; it
compiles into one graph with no graph break and no recompile; ONNX Runtime runs it; what does not fit is
refused.

Tolerances (relative to the chunk's largest magnitude): the traced graph run as is (``eager`` backend) and
``aot_eager`` are bit-identical to the eager DP-T call, and within 1e-6 for the modules whose eager inference
runs fused kernels (nn.MultiheadAttention's fast path); inductor and ONNX Runtime fuse and reorder
float32 operations, so they agree to within 1e-5 x the chunk's magnitude per call at these step counts
(observed at most about 2e-6 on these tiny models).
"""
import pytest
import torch
from torch._dynamo.utils import counters

import bac
from bac.graphs import GraphCall, OnnxCall, trace

from .test_policies import batch, tiny_policy
from .test_vla import INSTRUCTIONS, observation, tiny_head

RTOL = 1e-5  # inductor / ONNX Runtime against eager, relative to the chunk's largest magnitude
HEAD_SAMPLERS = {"gr00t": ("flow", 4), "pi0": ("flow", 3), "rdt": ("dpm", 4)}


def _chunk(policy, obs, seed=0):
    return policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(seed))


def _close(got, want, rtol=RTOL):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rtol * scale, (got - want).abs().max().item() / scale


def _same(got, want, architecture):
    """DP-T's branches are functional ops the trace keeps as they are: bit-identical. nn.MultiheadAttention
    (DiT) and the heads' modules run fused inference kernels eagerly that the trace decomposes."""
    if architecture == "dpt":
        assert torch.equal(got, want)
    else:
        _close(got, want, 1e-6)


def _policy(architecture, kind, steps):
    if architecture in HEAD_SAMPLERS:
        return tiny_head(architecture).with_sampler(kind, steps), observation(2)
    return tiny_policy(architecture).with_sampler(kind, steps), batch(torch.randn(2, 2, 39))


CASES = [("dpt", "ddim", 4), ("dpt", "ddpm", 5), ("dpt", "dpm", 4), ("dit", "ddim", 3), ("dit", "ddpm", 4),
         *[(arch, kind, steps) for arch, (kind, steps) in HEAD_SAMPLERS.items()]]


@pytest.mark.parametrize("architecture,kind,steps", CASES)
def test_whole_call_equals_eager_with_and_without_a_plan(architecture, kind, steps):
    """aot_eager: every architecture and sampler kind (DDPM draws noise at its steps: the graph takes it as
    an input, drawn from the same generator), uncached and with a uniform plan; equal (see _same), and the graph
    call is counted in the handle's statistics as the eager call is."""
    policy, obs = _policy(architecture, kind, steps)
    eager = _chunk(policy, obs)
    graphed = policy.compile_call(batch=2, backend="aot_eager")
    _same(_chunk(graphed, obs), eager, architecture)
    plan = bac.make_plan(policy.model, "uniform", num_steps=steps, M=2, scheduler=policy.sampler)
    with policy.accelerate(plan) as handle:
        cached_eager = _chunk(policy, obs)
        eager_stats = handle.stats()
        graphed = policy.compile_call(batch=2, backend="aot_eager")
        _same(_chunk(graphed, obs), cached_eager, architecture)
        stats = handle.stats()
        assert stats["sampling_calls"] == 2 and stats["denoiser_calls"] == 2 * steps
        assert stats["computed"] == 2 * eager_stats["computed"] and stats["last_call"] == eager_stats["last_call"]
    assert not torch.equal(cached_eager, eager)


def test_one_graph_no_break_no_recompile():
    """The plan is in the graph, not in guards: after the build, cached calls compile nothing more."""
    policy, obs = _policy("dpt", "ddim", 6)
    plan = bac.make_plan(policy.model, "uniform", num_steps=6, M=3)
    with policy.accelerate(plan):
        counters.clear()
        graphed = policy.compile_call(batch=2, backend="aot_eager")
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in range(3):
                _chunk(graphed, obs, seed)
        assert sum(counters["stats"].values()) == 0 and not counters["recompiles"]


def test_skipped_blocks_are_not_in_the_graph():
    """Fewer operations in the traced graph of a plan that skips blocks than in the full call's."""
    policy, _ = _policy("dpt", "ddim", 4)
    full = policy.compile_call(batch=1, backend="eager")
    plan = bac.make_plan(policy.model, "uniform", num_steps=4, M=2)
    with policy.accelerate(plan):
        cached = policy.compile_call(batch=1, backend="eager")
    ops = [len([n for n in next(iter(v.graph.graphs.values()))._compiled._orig_mod.graph.nodes
                if n.op == "call_function"]) for v in (full, cached)]
    assert ops[1] < 0.8 * ops[0]


@pytest.mark.parametrize("architecture,kind,steps", [("dpt", "ddim", 4), ("dit", "ddpm", 3), ("gr00t", "flow", 3)])
def test_inductor_and_onnxruntime_match_eager(architecture, kind, steps):
    policy, obs = _policy(architecture, kind, steps)
    plan = bac.make_plan(policy.model, "uniform", num_steps=steps, M=2, scheduler=policy.sampler)
    with policy.accelerate(plan):
        eager = _chunk(policy, obs)
        for backend in ("inductor", "onnxruntime"):
            _close(_chunk(policy.compile_call(batch=2, backend=backend), obs), eager)


def test_exported_file_is_served_and_checked(tmp_path):
    """export_onnx writes the call with its description; compile_call(onnx=...) serves it after checking
    that the file describes this view (weights, sampler, plan, batch)."""
    policy, obs = _policy("dpt", "ddim", 4)
    plan = bac.make_plan(policy.model, "uniform", num_steps=4, M=2)
    path = tmp_path / "call.onnx"
    with policy.accelerate(plan):
        eager = _chunk(policy, obs)
        policy.export_onnx(path, batch=2)
        served = policy.compile_call(batch=2, backend="onnxruntime", onnx=path)
        _close(_chunk(served, obs), eager)
        meta = OnnxCall(path).metadata
        assert meta["sampler"] == {"kind": "ddim", "steps": 4} and meta["plan"] == plan.to_dict()
        assert meta["batch"] == 2 and meta["noise_draws"] == 1
        with pytest.raises(bac.PlanMismatchError, match="batch"):
            policy.compile_call(batch=1, backend="onnxruntime", onnx=path)
    with pytest.raises(bac.PlanMismatchError, match="plan"):
        policy.compile_call(batch=2, backend="onnxruntime", onnx=path)  # no plan now
    with pytest.raises(bac.PlanMismatchError, match="sampler"):
        policy.with_sampler("ddim", 5).compile_call(batch=2, backend="onnxruntime", onnx=path)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(bac.CheckpointError, match="bad.onnx"):
        OnnxCall(tmp_path / "bad.onnx")


def test_vla_graphs_are_built_for_the_instruction_lengths_up_front(tmp_path):
    """A VLA head's prefix shapes follow the batch's longest instruction: compile_call(instructions=...)
    builds one graph per token length and batch size, and calls with those instructions build nothing more;
    an exported VLA call serves its instruction's length and refuses another."""
    policy = tiny_head("gr00t").with_sampler("flow", 3)
    graphed = policy.compile_call(batch=[1, 2], backend="aot_eager", instructions=INSTRUCTIONS)
    lengths = {policy.language([text])[0].shape[1] for text in INSTRUCTIONS}
    assert len(graphed.graph.graphs) == 2 * len(lengths) == 6
    for texts in (INSTRUCTIONS[:2], INSTRUCTIONS[1:], [INSTRUCTIONS[2]] * 2):
        obs = observation(2, instructions=texts)
        _close(_chunk(graphed, obs), _chunk(policy, obs), 1e-6)
    assert len(graphed.graph.graphs) == 6
    path = tmp_path / "head.onnx"
    with pytest.raises(bac.ConfigError, match="instruction="):
        policy.export_onnx(path, batch=1)
    policy.export_onnx(path, batch=1, instruction=INSTRUCTIONS[0])
    served = policy.compile_call(batch=1, backend="onnxruntime", onnx=path)
    obs = observation(1, instructions=[INSTRUCTIONS[0]])
    _close(_chunk(served, obs), _chunk(policy, obs))
    with pytest.raises(bac.ConfigError, match="traced for"):
        _chunk(served, observation(1, instructions=[INSTRUCTIONS[2]]))


def test_what_does_not_fit_is_refused():
    policy, obs = _policy("dpt", "ddim", 4)
    plan = bac.make_plan(policy.model, "uniform", num_steps=4, M=2)
    handle = policy.accelerate(plan)
    graphed = policy.compile_call(batch=2, backend="aot_eager")
    with pytest.raises(bac.ConfigError, match=r"batch sizes \[2\], got 1"):
        graphed.predict_action_chunk(batch(torch.randn(1, 2, 39)))
    handle.remove()
    with pytest.raises(bac.PlanMismatchError, match="compile the call again"):
        graphed.predict_action_chunk(obs)
    rule = bac.build_method("fbcache", policy.model, num_steps=4)
    with policy.accelerate(rule), pytest.raises(bac.ConfigError, match="runtime rule"):
        policy.compile_call(batch=2, backend="aot_eager")
    with pytest.raises(bac.ConfigError, match="backend"):
        policy.compile_call(backend="tensorrt")
    with pytest.raises(bac.ConfigError, match="batch sizes"):
        policy.compile_call(batch=0)
    assert policy.with_sampler("ddim", 4).graph is None  # another view samples eagerly


def test_graph_call_checks_its_inputs():
    module = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    call = GraphCall(trace(module, [x]), [x], backend="eager")
    assert torch.equal(call(x), module(x).detach())
    with pytest.raises(bac.ConfigError, match=r"shape.*\[4, 3\]"):
        call(torch.randn(5, 3))
    with pytest.raises(bac.ConfigError, match="tensors only"):
        trace(module, [3.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_whole_call_on_gpu():
    """mode='reduce-overhead' replays one CUDA graph per call; each call's output survives the next replay."""
    policy = tiny_policy("dpt").with_sampler("ddim", 6).to("cuda")
    obs = batch(torch.randn(1, 2, 39))
    plan = bac.make_plan(policy.model, "uniform", num_steps=6, M=3)
    with policy.accelerate(plan):
        eager = [policy.predict_action_chunk(obs, generator=torch.Generator("cuda").manual_seed(s)) for s in range(3)]
        graphed = policy.compile_call(batch=1, mode="reduce-overhead")
        outs = [graphed.predict_action_chunk(obs, generator=torch.Generator("cuda").manual_seed(s)) for s in range(3)]
    for got, want in zip(outs, eager):
        _close(got, want, 1e-4)
