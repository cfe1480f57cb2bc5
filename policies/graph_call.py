"""A policy view's sampling call as one graph (:mod:`bac.graphs`): its sampler's steps and its plan, unrolled.

:class:`SamplingCall` is the sampling loop of :func:`bac.policies.diffusion.sample_chunk` written as a module
of tensors: ``(noise [1 + draws, B, horizon, A], *condition tensors) -> normalised chunk``. The first noise
draw is the starting sample, the others are the draws a stochastic sampler (DDPM) makes at its steps, drawn
by the caller from its generator in the order the eager loop draws them, so a graph call and an eager call
with the same generator see the same noise. :class:`CompiledCall` holds a view's graphs, one per input
shapes, and refuses a call its graphs were not made for. ``DiffusionPolicy.compile_call`` makes one.

A warm-started view (:mod:`bac.policies.warm`) runs a call in pieces, each a :class:`Segment` of the
sampler's steps; :class:`SamplingCall` traces one segment, and :meth:`CompiledCall.runner` runs them with
the eager runner's protocol (:class:`GraphRunner`). docs/guide/graphs.md, "Warm-started calls".
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

import bac
from bac.errors import ConfigError, PlanMismatchError
from bac.graphs import BACKENDS, GraphCall, OnnxCall, trace
from bac.sampling import DrawnNoise, draw_noise

from .constants import IMAGE_PREFIX, STATE, TASK
from .sampler import Sampler

__all__ = ["CompiledCall", "GraphRunner", "SamplingCall", "Segment", "describe_call", "example_observation"]

#: Distinct condition shapes a view keeps graphs for (a VLA head's instruction length sets its prefix's shapes).
MAX_GRAPHS = 32


class Segment(NamedTuple):
    """Steps ``begin .. end - 1`` of a trajectory begun at step ``origin`` (``origin < begin``: going on
    with one, what a warm call's cold fallback does after its check step)."""

    begin: int
    end: int
    origin: int


def noise_draws(sampler: Sampler, begin: int, end: int) -> int:
    """The noise draws steps ``begin .. end - 1`` make. A stochastic sampler draws at every step but, for
    DDPM, a last step at t = 0 (the only timestep that can be 0, timesteps descending)."""
    steps, draws = sampler.steps, sampler.fused.noise_draws
    if draws not in (0, steps - 1, steps):
        raise ConfigError(f"sampler {sampler!r} draws noise at {draws} of its {steps} steps; a graph of part of "
                          "its steps supports samplers drawing at all steps or all but the last")
    return 0 if draws == 0 else sum(i < steps - 1 or draws == steps for i in range(begin, end))


class SamplingCall(nn.Module):
    """``sample_chunk``'s loop as a function of tensors (see the module docstring); ``cond_spec`` rebuilds the
    condition (a tensor, or a VLA head's ``Prefix``) from its tensors.

    ``segment`` (default: the whole call) runs part of the steps: ``noise`` is then the sample entering step
    ``begin`` and the segment's draws. ``kept`` steps also return their input sample and model output (a warm
    call's check step and Falcon's candidates), and with ``carry`` (DPM-Solver) a segment that stops early
    returns its last data prediction, which a segment going on with the trajectory takes as its last input.
    The output is the sample, or with any of these ``[sample, (prediction), x_i, output_i, ...]`` stacked.
    """

    def __init__(self, model: nn.Module, sampler: Sampler, cond_spec: pytree.TreeSpec,
                 segment: Segment | None = None, kept: frozenset = frozenset(), carry: bool = False):
        super().__init__()
        self.model, self.sampler, self.cond_spec = model, sampler, cond_spec
        self.segment = segment or Segment(0, sampler.steps, 0)
        self.kept, self.carry = kept, carry

    def forward(self, noise: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        leaves = self.cond_spec.num_leaves
        cond = pytree.tree_unflatten(list(tensors[:leaves]), self.cond_spec)
        fused, (begin, end, origin) = self.sampler.fused, self.segment
        trajectory = fused.start(origin)
        if origin < begin:  # going on with a trajectory: DPM-Solver's next step reads the last data prediction
            trajectory.last = begin - 1
            if self.carry:
                trajectory.prev_x0 = tensors[leaves]
        prepared = self.model.prepare(cond, fused.timesteps)
        drawn = DrawnNoise(noise[1:])
        x, extras = noise[0], []
        for i in range(begin, end):
            out = self.model(x, fused.timesteps[i], cond, prepared=prepared[i])
            if i in self.kept:
                extras += [x, out]
            x = trajectory.step(i, out, x, generator=drawn)
        if self.carry and end < fused.num_steps:
            extras.insert(0, trajectory.prev_x0)
        return torch.stack([x, *extras]) if extras else x


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
    call with it (at most :data:`MAX_GRAPHS` shapes in all). ``onnx``: serve this exported file (its metadata
    must describe this view) instead of tracing. A warm-started view (``view.warm``) also has a graph built
    here for every segment its calls can run (:meth:`segments`), which :meth:`runner` runs; ONNX Runtime
    serves cold calls only.
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
        if getattr(policy, "rtc", None) is not None:
            raise ConfigError(f"real-time chunking ({policy.rtc.name}) is not compiled: its guided steps take a "
                              "vector-Jacobian product through the denoiser, run eagerly (compile the view without "
                              "with_rtc, or run it eagerly)")
        self.warm = policy.warm if policy.warm is not None and policy.warm.start else None  # start 0: all cold
        if self.warm is not None and backend == "onnxruntime":
            raise ConfigError(f"backend='onnxruntime' serves cold calls only; a warm-started view ({self.warm.name}) "
                              "runs a call as several graphs: use a torch backend, or compile the view "
                              "without warm starts")
        self.model, self.sampler, self.device = policy.model, policy.sampler, policy.device
        self.handle = bac.get_handle(policy.model)
        self.schedule = self.handle.schedule if self.handle is not None else None
        self.plan = self.handle.plan if self.handle is not None else None
        self.batch_sizes, self.backend, self.mode, self.threads = sizes, backend, mode, threads
        self.cold = Segment(0, policy.sampler.steps, 0)
        # A segment graph cannot take the handle's cached block values from the one before it, so with a plan
        # a warm call's cold fallback runs the whole cold call again instead of going on after its check step.
        self.resumes = self.handle is None
        self.carry = policy.sampler.kind == "dpm"  # DPM-Solver's step after the check step reads its prediction
        #: steps whose input sample and model output a segment returns: the check step's, Falcon's candidates
        self.kept = frozenset()
        if self.warm is not None and self.warm.variant != "plain":
            self.kept = frozenset(range(1 if self.warm.variant == "checked" else self.warm.start + 1))
        self.describe = lambda batch: describe_call(policy, batch)
        self.graphs: dict[tuple, Any] = {}
        if onnx is not None:
            self._load(onnx, policy)
            return
        if not policy.config.is_vla:
            examples = [(torch.zeros(batch, policy.n_obs_steps, policy.config.cond_dim, device=self.device), batch)
                        for batch in sizes]
        else:  # a batch's prefix is padded to its longest instruction: one graph per instruction length covers all
            examples = [(policy.condition(example_observation(policy, batch, text)), batch)
                        for text in _one_per_length(policy, instructions) for batch in sizes]
        for cond, batch in examples:
            for segment in self.segments():
                self._graph(cond, batch, segment)

    def segments(self) -> list[Segment]:
        """Every segment a call of this view can run: the cold call, and for a warm start with ``start`` s
        of K steps, ``plain``: s..K-1; ``checked``: the check step 0, its cold fallback 1..K-1 (or with a
        plan the cold call again) and s..K-1; ``falcon``: the same with k..K-1 for each k in 1..s."""
        if self.warm is None:
            return [self.cold]
        steps, start = self.cold.end, self.warm.start
        if self.warm.variant == "plain":
            return [self.cold, Segment(start, steps, start)]
        fallback = Segment(1, steps, 0) if self.resumes else self.cold
        begins = [start] if self.warm.variant == "checked" else range(1, start + 1)
        return list(dict.fromkeys([self.cold, Segment(0, 1, 0), fallback,
                                   *(Segment(begin, steps, begin) for begin in begins)]))

    @property
    def build_seconds(self) -> dict:
        """Seconds each graph took to trace and compile (or export and load), by its input shapes (and the
        steps of a warm call's segment)."""
        return {self._name(key): graph.build_seconds for key, graph in self.graphs.items()
                if hasattr(graph, "build_seconds")}

    def _name(self, key: tuple) -> str:
        _, shapes, segment = key
        if segment == self.cold:
            return str(shapes)
        resumed = " resumed" if segment.origin < segment.begin else ""
        return f"{shapes} steps {segment.begin}-{segment.end - 1}{resumed}"

    def _key(self, cond: Any, segment: Segment) -> tuple[tuple, list[torch.Tensor], pytree.TreeSpec]:
        leaves, spec = pytree.tree_flatten(cond)
        if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise ConfigError("a compiled call's condition must be made of tensors")
        return (str(spec), tuple(tuple(leaf.shape) for leaf in leaves), segment), leaves, spec

    def _graph(self, cond: Any, batch: int, segment: Segment) -> Any:
        key, leaves, spec = self._key(cond, segment)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        shapes = {known[:2] for known in self.graphs}
        if key[:2] not in shapes and len(shapes) >= MAX_GRAPHS:
            raise ConfigError(f"this compiled call already has graphs for {MAX_GRAPHS} condition shapes; "
                              f"a new shape {[list(s) for s in key[1]]} would trace another")
        shape = (batch, self.model.horizon, self.model.action_dim)
        noise = torch.zeros((1 + noise_draws(self.sampler, segment.begin, segment.end), *shape), device=self.device)
        carried = [torch.zeros(shape, device=self.device)] if self.carry and segment.origin < segment.begin else []
        inputs = [noise, *leaves, *carried]
        module = SamplingCall(self.model, self.sampler, spec, segment, self.kept, self.carry)
        exported = trace(module, inputs, start=segment.begin)
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
            key, _, _ = self._key(torch.zeros(batch, policy.n_obs_steps, policy.config.cond_dim), self.cold)
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

    def _check_batch(self, batch: int) -> None:
        if batch not in self.batch_sizes:
            raise ConfigError(f"this call was compiled for batch sizes {list(self.batch_sizes)}, got {batch}: "
                              f"compile_call(batch={sorted({*self.batch_sizes, batch})})")

    def sample(self, cond: Any, shape: tuple[int, int, int], generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
        """What ``sample_chunk(model, sampler, cond, shape, generator, device)`` returns, from a graph."""
        self.check()
        self._check_batch(shape[0])
        key, leaves, _ = self._key(cond, self.cold)
        graph = self.graphs.get(key) or self.graphs.get(None)  # None: an exported file, which checks its inputs
        if graph is None:
            graph = self._graph(cond, shape[0], self.cold)
        draws = 1 + noise_draws(self.sampler, 0, self.cold.end)
        noise = torch.stack([draw_noise(shape, generator, device) for _ in range(draws)])
        x, _, _ = self.unpack(graph(noise, *leaves), self.cold)
        if self.handle is not None:
            self.handle.count_graph_call()
        return x

    def unpack(self, out: torch.Tensor, segment: Segment) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """A segment graph's output as (sample, last data prediction or None, [(step, x_step, output), ...])."""
        kept = [i for i in range(segment.begin, segment.end) if i in self.kept]
        carried = self.carry and segment.end < self.cold.end
        if not kept and not carried:
            return out, None, []
        rest = out[1 + carried:]
        return out[0], out[1] if carried else None, [(i, rest[2 * n], rest[2 * n + 1]) for n, i in enumerate(kept)]

    def runner(self, cond: Any, generator: torch.Generator | None) -> GraphRunner:
        """A warm call's runner (:data:`bac.policies.warm.Runner`) running this view's segment graphs."""
        self.check()
        return GraphRunner(self, cond, generator)


class GraphRunner:
    """``runner(x, begin, end=None, keep=None, resume=False) -> x``, the eager ``StepRunner``'s protocol, run by
    a :class:`CompiledCall`'s segment graphs (traced on first use if the call did not build one up front).

    Each segment draws its steps' noise from ``generator`` in the eager order. ``keep`` sees the steps a
    warm call reads (the view's ``kept`` ones). ``handle.stats()`` counts a call once, at its segment that
    reaches the last step, as a trajectory from its first step: a check step followed by a warm start is not
    counted (the eager call counts it as a trajectory of one step).
    """

    def __init__(self, call: CompiledCall, cond: Any, generator: torch.Generator | None):
        self.call, self.cond, self.generator = call, cond, generator
        self.leaves = pytree.tree_leaves(cond)
        # the trajectory so far: its first step, the sample entering it, the draws made, DPM-Solver's prediction
        self.origin, self.first, self.drawn, self.carried = None, None, [], None

    def __call__(self, x: torch.Tensor, begin: int, end: int | None = None, keep: Any = None,
                 resume: bool = False) -> torch.Tensor:
        call = self.call
        call._check_batch(x.shape[0])
        end = call.cold.end if end is None else end
        if resume and self.origin is None:
            raise ConfigError("resume=True goes on with a trajectory, but this runner has run none")
        if not resume:
            self.origin, self.first, self.drawn, self.carried = begin, x, [], None
        draws = [draw_noise(x.shape, self.generator, x.device)
                 for _ in range(noise_draws(call.sampler, begin, end))]
        self.drawn = self.drawn + draws
        if not resume:
            segment, inputs = Segment(begin, end, begin), [torch.stack([x, *draws]), *self.leaves]
        elif call.resumes:
            carried = [self.carried] if self.carried is not None else []
            segment, inputs = Segment(begin, end, self.origin), [torch.stack([x, *draws]), *self.leaves, *carried]
        else:  # the trajectory again from its first step, with the same draws (see CompiledCall.__init__)
            segment, inputs = Segment(self.origin, end, self.origin), [torch.stack([self.first, *self.drawn]),
                                                                       *self.leaves]
        x, self.carried, kept = call.unpack(call._graph(self.cond, x.shape[0], segment)(*inputs), segment)
        if keep is not None:
            for step, sample, output in kept:
                if step >= begin:  # a run again from the first step: the steps before begin were seen
                    keep(step, sample, output)
        if end == call.cold.end and call.handle is not None:
            call.handle.count_graph_call(start=self.origin)
        return x
