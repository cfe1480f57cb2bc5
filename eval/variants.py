"""Variants: the configurations the evaluator compares, each a sampler plus, optionally, a bac caching method.

A variant is configured (``configs/methods/*.yaml``) as ``{sampler: ddpm|ddim|dpm|flow, steps: N|auto,
cache: <bac method>, **its parameters, warm: {start: S, variant: plain|checked|falcon, threshold: T, jump: J}}``: ``full`` is the plain sampler, ``ddim`` fewer
denoising steps (``steps: auto`` matches the FLOPs of the ``bac`` variant, ``steps: auto:<name>`` those
of the variant ``<name>``), the caching
variants any of :func:`bac.available_methods` on the full sampler (``standin: taylor-1``
replaces a method's stand-in), and ``warm`` warm-starts each call after an episode's first from the last
chunk (:class:`bac.policies.warm.WarmStart`; only ``start`` is required); ``rtc: {max_guidance: B}`` (or ``{}``)
adds real-time chunking (:class:`bac.policies.rtc.RealTimeChunking`; ``mode=realtime`` only, where calls overlap
the running chunk). Plans of calibrated methods are cached as plan files next to
the calibration; the others are rebuilt every run (they are a few list operations).

A *budget* variant (``{budget: {match: bac}}``, ``{budget: {latency_ms: 40}}`` or
``{budget: {control_hz: 20}}``, optional ``n``, ``metric``, ``headroom``) is the plan of
:func:`bac.plan_for_budget` on this machine: per-block update counts for a latency measured
here (``match``: the measured latency of another variant of the same sampler). Its plan
depends on this machine's timings, so it is made in every run and saved with the report.

How the variants' policy calls run (settings ``compile`` and ``backend``, :class:`Compilation`): eagerly
(``none``), with DP-T's branches compiled (``blocks``), or each call as one graph with the variant's plan baked
in (``whole``: ``torch.compile``, or exported to ONNX and run in ONNX Runtime).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

import bac
from bac import graphs
from bac.errors import ConfigError
from bac.policies.policy import DiffusionPolicy
from bac.policies.rtc import RealTimeChunking
from bac.policies.warm import WarmStart


@dataclass(frozen=True)
class Variant:
    """One compared configuration: ``sampler`` with ``steps``, cached by ``method`` (``None``: no caching),
    warm-started as ``warm`` says (``None``: every call cold)."""

    name: str
    sampler: str
    steps: int
    method: str | None = None
    params: dict = field(default_factory=dict)
    warm: WarmStart | None = None
    rtc: RealTimeChunking | None = None

    def describe(self) -> dict:
        """The configuration as a report shows it (a variant without warm starts or real-time chunking as
        before they existed)."""
        warm = {} if self.warm is None else {"warm": self.warm.describe()}
        rtc = {} if self.rtc is None else {"rtc": self.rtc.describe()}
        return {"sampler": self.sampler, "steps": self.steps, "cache": self.method, **self.params, **warm, **rtc}

    @property
    def budgeted(self) -> bool:
        """A :func:`bac.plan_for_budget` plan, made on this machine in every run."""
        return self.method == BUDGET

    @property
    def calibrated(self) -> bool:
        return self.method is not None and (self.budgeted or bac.needs_calibration(self.method))

    @property
    def keeps_plan_file(self) -> bool:
        """Whether the variant's plan comes from a calibration and is cached as a plan file."""
        return self.calibrated and not self.budgeted


BUDGET = "budget"
BUDGET_TARGETS = ("match", "latency_ms", "control_hz")
BUDGET_OPTIONS = ("n", "metric", "headroom")


def parse_budget(name: str, spec: Mapping[str, Any]) -> dict:
    """A budget variant's parameters: exactly one target of :data:`BUDGET_TARGETS`, options of :data:`BUDGET_OPTIONS`."""
    target = dict(spec.pop(BUDGET) or {})
    targets = [k for k in BUDGET_TARGETS if k in target]
    unknown = sorted(set(target) - set(BUDGET_TARGETS)) + sorted(set(spec) - set(BUDGET_OPTIONS))
    if len(targets) != 1 or unknown:
        raise ValueError(f"method {name!r}: a budget needs exactly one of {list(BUDGET_TARGETS)} "
                         f"(and may set {list(BUDGET_OPTIONS)}); got {sorted(target)}"
                         + (f", unknown {unknown}" if unknown else ""))
    return {**target, **spec}


WARM_KEYS = ("start", "variant", "threshold", "jump")


def parse_warm(name: str, spec: Any, steps: int, method: str | None) -> WarmStart | None:
    """A variant's ``warm`` block (``None``: cold), checked against its steps and caching method."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "start" not in spec or set(spec) - set(WARM_KEYS):
        raise ValueError(f"method {name!r}: warm must be {{start: S, variant: plain|checked|falcon, threshold: T, "
                         f"jump: J}} (start required), got {spec!r}")
    if method is not None and not bac.method_info(method).static:
        raise ValueError(f"method {name!r}: a warm call begins after step 0, where the runtime rule {method!r} "
                         "cannot start: warm-start a static plan, or no caching")
    try:
        warm = WarmStart(**spec)
        warm.check(int(steps))
    except ConfigError as err:
        raise ValueError(f"method {name!r}: {err}") from err
    return warm


RTC_KEYS = ("max_guidance",)


def parse_rtc(name: str, spec: Any, warm: WarmStart | None) -> RealTimeChunking | None:
    """A variant's ``rtc`` block (``None``: none; ``{}``: the paper's settings), checked."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or set(spec) - set(RTC_KEYS):
        raise ValueError(f"method {name!r}: rtc must be {{max_guidance: B}} or {{}} (the paper's clip 5), got {spec!r}")
    if warm is not None and warm.variant != "plain":
        raise ValueError(f"method {name!r}: real-time chunking combines with plain warm starts, not {warm.variant!r}")
    try:
        return RealTimeChunking(**spec)
    except ConfigError as err:
        raise ValueError(f"method {name!r}: {err}") from err


def flops_target(steps: Any) -> str | None:
    """The variant whose FLOPs ``steps`` asks to match: ``auto`` -> ``bac``, ``auto:<name>`` -> ``<name>``."""
    if not isinstance(steps, str) or not (steps == "auto" or steps.startswith("auto:")):
        return None
    return steps.partition(":")[2] or "bac"


def parse_variants(config: Mapping[str, Mapping[str, Any]], selected, default_sampler: str, default_steps: int,
                   auto_steps: int | None = None) -> list[Variant]:
    """Variants named in ``selected`` (all if empty), from ``config``; ``auto`` steps resolve to ``auto_steps``."""
    names = list(selected) or list(config)
    unknown = [n for n in names if n not in config]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; configured methods: {sorted(config)}")
    variants = []
    for name in names:
        spec = dict(config[name] or {})
        sampler = spec.pop("sampler", default_sampler)
        steps = spec.pop("steps", default_steps)
        method = spec.pop("cache", None)
        warm = spec.pop("warm", None)
        rtc = spec.pop("rtc", None)
        if flops_target(steps) is not None:
            if warm is not None:
                raise ValueError(f"method {name!r}: a warm start begins at a step of its schedule: give steps "
                                 f"(not {steps})")
            if auto_steps is None:
                raise ValueError(f"method {name!r} has steps={steps}, which needs a method to match")
            steps = auto_steps
        if BUDGET in spec:
            if method is not None:
                raise ValueError(f"method {name!r}: a budget plan is its own method; drop cache={method!r}")
            if warm is not None or rtc is not None:  # its plan is made for the latency of a cold, unguided call
                raise ValueError(f"method {name!r}: a budget plan is made for cold, unguided calls; drop "
                                 + ("warm" if warm is not None else "rtc"))
            variants.append(Variant(name, sampler, int(steps), BUDGET, parse_budget(name, spec)))
            continue
        if method is None and spec:
            raise ValueError(f"method {name!r}: parameters {sorted(spec)} need a cache method")
        if method is not None:
            bac.method_params(method, **{k: v for k, v in spec.items() if k != "standin"})  # names and values
            if "standin" in spec:
                bac.make_standin(spec["standin"])
        warm = parse_warm(name, warm, steps, method)
        variants.append(Variant(name, sampler, int(steps), method, spec, warm, parse_rtc(name, rtc, warm)))
    return variants


def plan_path(directory: Path, variant: Variant) -> Path:
    params = "-".join(f"{k}{v}" for k, v in sorted(variant.params.items()) if k != "standin")
    return directory / f"{variant.method}-{params}-{variant.sampler}{variant.steps}.json"


def load_or_build(policy: DiffusionPolicy, variant: Variant, calibration: bac.Calibration | None,
                  directory: Path, recompute: bool) -> bac.Method:
    """The variant's caching method; a calibrated plan comes from its cached plan file when that fits.

    ``policy`` samples with the variant's sampler (``policy.with_sampler(variant.sampler, variant.steps)``).
    A cached plan that does not fit the policy or sampler is an error unless ``recompute``.
    """
    source = calibration if calibration is not None else policy.model
    method = bac.build_method(variant.method, source, num_steps=variant.steps, scheduler=policy.sampler.scheduler,
                              **variant.params)
    if not variant.keeps_plan_file:
        return method
    path = plan_path(directory, variant)
    if path.exists() and not recompute:
        plan = bac.Plan.load(path)
        try:
            plan.check_fits(bac.describe(policy.model), num_steps=policy.sampler.steps,
                            scheduler=policy.sampler.scheduler)
        except bac.PlanMismatchError as err:
            raise bac.PlanMismatchError(
                f"cached plan {path} does not fit this policy/sampler: {err}. "
                "Re-run with calibration.recompute=true to replace it."
            ) from err
        return dataclasses.replace(method, schedule=plan, standin=plan.fitted_standin() or method.standin)
    method.schedule.save(path)
    return method


#: The ``torch.compile`` backend of ``backend=torch``. Tests set ``aot_eager``: inductor takes seconds per graph.
TORCH_COMPILER = "inductor"


def torch_compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` (:data:`TORCH_COMPILER`) cannot compile on ``device`` here, or ``None`` if it can."""
    return graphs.torch_compile_unavailable(device, TORCH_COMPILER)


def wave_sizes(episodes: int, num_envs: int) -> list[int]:
    """The batch sizes a closed-loop run calls the policy with: its waves are slices of ``num_envs`` seeds,
    the last one shorter when ``num_envs`` does not divide ``episodes`` (finished episodes stay in their wave)."""
    sizes = {min(num_envs, episodes)} if episodes > 0 else set()
    if episodes > num_envs and episodes % num_envs:
        sizes.add(episodes % num_envs)
    return sorted(sizes)


def own_denoiser(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules sharing its parameters and buffers: it can hold a handle of its own."""
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


class Compilation:
    """How the variants' policy calls run (settings ``compile`` and ``backend``; :data:`bac.graphs.COMPILE_MODES`).

    ``whole``: each variant's view is compiled (``view.compile_call``) once per run for ``batch_sizes`` and
    the threads torch runs with when it is first used (inductor and ONNX Runtime fix their thread count when
    they build). A compiled call is bound to the handle it was made with, so the view gets a denoiser of its own
    that shares the weights (:func:`own_denoiser`) and keeps its handle until :meth:`close`: the episodes and
    every interleaved latency repeat call the same graphs, built once. ``blocks``: DP-T's branches are compiled
    while a variant's block runs (:func:`applied`).
    """

    def __init__(self, mode: str = "none", backend: str = "torch", batch_sizes: Sequence[int] = (1,),
                 instructions: Sequence[str] = ()):
        self.mode, self.backend, self.batch_sizes = mode, backend, sorted(set(batch_sizes))
        self.instructions = list(instructions)  # a VLA head's graphs are built for their token lengths
        self._views: dict[tuple, tuple[str, Any, DiffusionPolicy, bac.CacheHandle | None]] = {}

    def view(self, policy: DiffusionPolicy, variant: Variant,
             method: bac.Method | None) -> tuple[DiffusionPolicy, bac.CacheHandle | None]:
        """``variant``'s compiled view of ``policy`` cached by ``method`` (built on first use) and its handle."""
        threads = torch.get_num_threads()
        key = (variant.name, id(method), threads)
        if key not in self._views:
            view = sampling_view(policy, variant)
            view.model = own_denoiser(view.model)
            handle = view.accelerate(method) if method is not None else None
            backend = "onnxruntime" if self.backend == "onnxruntime" else TORCH_COMPILER
            compiled = view.compile_call(self.batch_sizes, backend=backend, threads=threads,
                                         instructions=self.instructions)
            self._views[key] = (variant.name, method, compiled, handle)  # method kept: its id is in the key
        return self._views[key][2:]

    def build_seconds(self) -> dict[str, float]:
        """Seconds each variant's graphs took to build (trace and compile, or export and load), all together."""
        seconds: dict[str, float] = {}
        for name, _, view, _ in self._views.values():
            seconds[name] = seconds.get(name, 0.0) + sum(view.graph.build_seconds.values())
        return seconds

    def close(self) -> None:
        """Remove the handles of the compiled views."""
        for _, _, _, handle in self._views.values():
            if handle is not None:
                handle.remove()
        self._views.clear()

    def __enter__(self) -> "Compilation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sampling_view(policy: DiffusionPolicy, variant: Variant) -> DiffusionPolicy:
    """A view of ``policy`` (sharing its weights) sampling with ``variant``'s sampler, warm-started and with
    real-time chunking as it says."""
    view = policy.with_sampler(variant.sampler, variant.steps)
    view = view if variant.warm is None else view.with_warm_start(**variant.warm.describe())
    return view if variant.rtc is None else view.with_rtc(**variant.rtc.describe())


@contextlib.contextmanager
def applied(policy: DiffusionPolicy, variant: Variant, method: bac.Method | None,
            compilation: Compilation | None = None) -> Iterator[tuple[DiffusionPolicy, bac.CacheHandle | None]]:
    """``(view, handle)`` for the block: ``view`` samples with the variant's sampler (``policy.with_sampler``,
    sharing its weights; ``policy`` itself is left as it is) and ``handle`` caches its denoiser with ``method``
    (``None``: no caching), removed when the block ends. ``compilation`` (``None``: eager): ``whole``, the
    variant's compiled view (:meth:`Compilation.view`, kept beyond the block); ``blocks``, DP-T's branches
    compiled while the block runs. A warm-started variant's view (:func:`sampling_view`) keeps its own
    :attr:`~bac.policies.policy.DiffusionPolicy.warm_counts`."""
    if compilation is not None and compilation.mode == "whole":
        yield compilation.view(policy, variant, method)
        return
    view = sampling_view(policy, variant)
    handle = view.accelerate(method) if method is not None else None
    blocks = compilation is not None and compilation.mode == "blocks"
    try:
        if blocks:  # the shared denoiser's branches: eager again when the block ends
            view.model.compile_blocks(backend=TORCH_COMPILER)
        yield view, handle
    finally:
        if blocks:
            view.model.compile_blocks(False)
        if handle is not None:
            handle.remove()
