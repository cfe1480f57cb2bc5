"""A policy view's sampling call as one graph (:mod:`bac.graphs`): its sampler's steps and its plan, unrolled.

:class:`SamplingCall` is the sampling loop of :func:`bac.policies.diffusion.sample_chunk` written as a module
of tensors: ``(noise [1 + draws, B, horizon, A], *condition tensors) -> normalised chunk``. The first noise
draw is the starting sample, the others are the draws a stochastic sampler (DDPM) makes at its steps, drawn
by the caller from its generator in the order the eager loop draws them, so a graph call and an eager call
with the same generator see the same noise. :class:`CompiledCall` holds a view's graphs, one per input
shapes, and refuses a call its graphs were not made for. ``DiffusionPolicy.compile_call`` makes one.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

import bac
from bac.errors import ConfigError, PlanMismatchError
from bac.graphs import BACKENDS, GraphCall, OnnxCall, trace
from bac.sampling import DrawnNoise, draw_noise

from .constants import IMAGE_PREFIX, STATE, TASK
from .sampler import Sampler

__all__ = ["CompiledCall", "SamplingCall", "describe_call", "example_observation"]

#: Graphs a view keeps per distinct input shapes (a VLA head's instruction length sets its prefix's shapes).
MAX_GRAPHS = 32


class SamplingCall(nn.Module):
    """``sample_chunk``'s loop as a function of tensors (see the module docstring); ``cond_spec`` rebuilds the
    condition (a tensor, or a VLA head's ``Prefix``) from its tensors."""

    def __init__(self, model: nn.Module, sampler: Sampler, cond_spec: pytree.TreeSpec):
        super().__init__()
        self.model, self.sampler, self.cond_spec = model, sampler, cond_spec

    def forward(self, noise: torch.Tensor, *cond_tensors: torch.Tensor) -> torch.Tensor:
        cond = pytree.tree_unflatten(list(cond_tensors), self.cond_spec)
        fused = self.sampler.fused
        trajectory = fused.start()
        prepared = self.model.prepare(cond, fused.timesteps)
        drawn = DrawnNoise(noise[1:])
        x = noise[0]
        for i, t in enumerate(fused.timesteps):
            x = trajectory.step(i, self.model(x, t, cond, prepared=prepared[i]), x, generator=drawn)
        return x


def describe_call(policy: Any, batch: int) -> dict:
    """What a policy view's graph is made for (stored with an exported call, compared when one is loaded)."""
    handle = bac.get_handle(policy.model)
    config = policy.config.to_dict()
    return {
        "bac": bac.__version__,
        "architecture": policy.architecture,
        "weights": bac.describe(policy.model).weights_digest(),
        "sampler": {"kind": policy.sampler.kind, "steps": policy.sampler.steps},
        "noise_draws": 1 + policy.sampler.fused.noise_draws,
        "plan": handle.plan.to_dict() if handle is not None else None,
        "batch": batch,
        "horizon": policy.horizon,
        "action_dim": policy.action_dim,
        "features": {"input": config.get("input_features"), "output": config.get("output_features")},
    }


def _short(key: str, value: Any) -> str:
    """A description field for a message: a plan by its method, parameters and steps, anything else cut short."""
    if key == "plan" and isinstance(value, dict):
        return f"{value.get('method')} {value.get('params')} ({value.get('num_steps')} steps)"
    if key == "plan" and value is None:
        return "no plan"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def example_observation(policy: Any, batch: int, instruction: str | None = None) -> dict[str, Any]:
    """An observation batch of the shapes a policy call takes: zero state history and images, the task
    ``instruction`` (a VLA head) or the policy's first task."""
    obs: dict[str, Any] = {STATE: torch.zeros(batch, policy.n_obs_steps, policy.state_dim, device=policy.device)}
    for name, feature in policy.input_features.items():
        if name.startswith(IMAGE_PREFIX):
            obs[name] = torch.zeros(batch, *feature.shape, device=policy.device)
    if policy.reads_instructions:
        if instruction is None:
            raise ConfigError("a VLA head's example observation needs an instruction")
        obs[TASK] = [instruction] * batch
    elif TASK in policy.input_features:
        obs[TASK] = policy.tasks[0]
    return obs


def _one_per_length(policy: Any, instructions: Sequence[str]) -> list[str]:
    """One of ``instructions`` per distinct token length (what a VLA head's prefix shapes depend on)."""
    chosen: dict[int, str] = {}
    for text in dict.fromkeys(instructions):
        tokens, _ = policy.language([text])
        chosen.setdefault(tokens.shape[1], text)
    return list(chosen.values())


class CompiledCall:
    """A policy view's sampling calls run as graphs: ``CompiledCall(view, batch_sizes, backend, mode, threads)``.

    Made for the view's sampler and for the plan its denoiser is accelerated with now (or none): a call
    after the handle was removed or rescheduled is a :class:`bac.PlanMismatchError`, a batch size outside
    ``batch_sizes`` a :class:`bac.ConfigError`. A plain condition (DP-T, DiT) has its graphs built here;
    a VLA head's prefix shapes depend on the instruction's length, so its graphs are built here for the
    lengths of ``instructions`` (one per length and batch size), and for any other length on the first
    call with it (at most :data:`MAX_GRAPHS` in all). ``onnx``: serve this exported file (its metadata
    must describe this view) instead of tracing.
    """

    def __init__(self, policy: Any, batch_sizes: Sequence[int], backend: str = "inductor", mode: str | None = None,
                 threads: int | None = None, onnx: str | None = None, instructions: Sequence[str] = ()):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        sizes = tuple(batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ConfigError(f"batch sizes must be positive integers, got {list(sizes)}")
        if onnx is not None and (backend != "onnxruntime" or len(sizes) != 1):
            raise ConfigError("an exported file serves one batch size with backend='onnxruntime'")
        self.model, self.sampler, self.device = policy.model, policy.sampler, policy.device
        self.handle = bac.get_handle(policy.model)
        self.schedule = self.handle.schedule if self.handle is not None else None
        self.plan = self.handle.plan if self.handle is not None else None
        self.batch_sizes, self.backend, self.mode, self.threads = sizes, backend, mode, threads
        self.draws = 1 + policy.sampler.fused.noise_draws
        self.describe = lambda batch: describe_call(policy, batch)
        self.graphs: dict[tuple, Any] = {}
        if onnx is not None:
            self._load(onnx, policy)
        elif not policy.config.is_vla:
            for batch in sizes:
                self._graph(torch.zeros(batch, policy.n_obs_steps, policy.config.cond_dim, device=self.device), batch)
        else:  # a batch's prefix is padded to its longest instruction: one graph per instruction length covers all
            for text in _one_per_length(policy, instructions):
                for batch in sizes:
                    self._graph(policy.condition(example_observation(policy, batch, text)), batch)

    @property
    def build_seconds(self) -> dict:
        """Seconds each graph took to trace and compile (or export and load), by its input shapes."""
        return {str(key[1]): graph.build_seconds for key, graph in self.graphs.items()
                if hasattr(graph, "build_seconds")}

    def _key(self, cond: Any) -> tuple[tuple, list[torch.Tensor], pytree.TreeSpec]:
        leaves, spec = pytree.tree_flatten(cond)
        if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise ConfigError("a compiled call's condition must be made of tensors")
        return (str(spec), tuple(tuple(leaf.shape) for leaf in leaves)), leaves, spec

    def _graph(self, cond: Any, batch: int) -> Any:
        key, leaves, spec = self._key(cond)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        if len(self.graphs) >= MAX_GRAPHS:
            raise ConfigError(f"this compiled call already has {MAX_GRAPHS} graphs (one per condition shape); "
                              f"a new shape {[list(s) for s in key[1]]} would trace another")
        shape = (batch, self.model.horizon, self.model.action_dim)
        noise = torch.zeros((self.draws, *shape), device=self.device)
        inputs = [noise, *leaves]
        exported = trace(SamplingCall(self.model, self.sampler, spec), inputs)
        graph = GraphCall(exported, inputs, self.backend, self.mode, self.threads, metadata=self.describe(batch))
        self.graphs[key] = graph
        return graph

    def _load(self, path: str, policy: Any) -> None:
        call = OnnxCall(path, self.device, self.threads)
        batch = self.batch_sizes[0]
        made, wanted = call.metadata, self.describe(batch)
        differ = sorted(k for k in wanted if k != "bac" and made.get(k) != wanted[k])
        if differ:
            raise PlanMismatchError(
                f"exported call {path} was made for another configuration ({', '.join(differ)} differ): "
                + "; ".join(f"{k}: file {_short(k, made.get(k))} vs this policy {_short(k, wanted[k])}"
                            for k in differ[:3]))
        key = None
        if not policy.config.is_vla:
            key, _, _ = self._key(torch.zeros(batch, policy.n_obs_steps, policy.config.cond_dim))
        self.graphs[key] = call

    def check(self) -> None:
        """Raise :class:`bac.PlanMismatchError` if the view's denoiser is no longer accelerated as it was."""
        handle = bac.get_handle(self.model)
        if handle is not self.handle or (handle is not None and (handle.schedule is not self.schedule
                                                                 or handle.plan is not self.plan)):
            made = "no plan" if self.plan is None else f"plan {self.schedule.name}"
            now = "not accelerated" if handle is None else f"accelerated with {handle.schedule.name}"
            raise PlanMismatchError(f"this compiled call was made for {made}, but the denoiser is now {now} "
                                    "(removed or rescheduled): compile the call again (policy.compile_call)")

    def sample(self, cond: Any, shape: tuple[int, int, int], generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
        """What ``sample_chunk(model, sampler, cond, shape, generator, device)`` returns, from a graph."""
        self.check()
        batch = shape[0]
        if batch not in self.batch_sizes:
            raise ConfigError(f"this call was compiled for batch sizes {list(self.batch_sizes)}, got {batch}: "
                              f"compile_call(batch={sorted({*self.batch_sizes, batch})})")
        key, leaves, _ = self._key(cond)
        graph = self.graphs.get(key) or self.graphs.get(None)  # None: an exported file, which checks its inputs
        if graph is None:
            graph = self._graph(cond, batch)
        noise = torch.stack([draw_noise(shape, generator, device) for _ in range(self.draws)])
        x = graph(noise, *leaves)
        if self.handle is not None:
            self.handle.count_graph_call()
        return x
