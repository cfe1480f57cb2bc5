"""One-line caching for diffusers pipelines and transformers.

::

    import bac.diffusers

    calibration = bac.diffusers.calibrate(pipe, [dict(class_labels=[1, 2], num_inference_steps=50)])
    bac.diffusers.enable_cache(pipe, "bac", calibration=calibration, M=10, n=5)
    image = pipe(class_labels=[3], num_inference_steps=50).images[0]
    bac.diffusers.disable_cache(pipe)

Each pipeline call starts a new trajectory; the transformer's ``cache_context(name)`` selects bac's context
of that name (classifier-free guidance); a method follows, or is planned again for, each call's
``num_inference_steps`` where it can, and is refused with what to do where it cannot. Step counts, guidance
and bare transformers: docs/guide/diffusers.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import describe
from ..calibration import Calibration
from ..engine import CacheHandle, accelerate, get_handle
from ..errors import CacheStateError, PlanMismatchError
from ..methods import Method, available_methods, build_method, needs_calibration
from ..plan import Plan
from ..recorder import calibrate as calibrate_model
from ..refine import refine as refine_plan
from ..rules import Rule
from .blocks import adapters_for


def _split(target: Any) -> tuple[Any, nn.Module]:
    """(pipeline or None, transformer) of a pipeline or a bare transformer."""
    if isinstance(target, nn.Module):
        return None, target
    transformer = getattr(target, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"{type(target).__name__} is neither a transformer nor a pipeline with a .transformer")
    if getattr(target, "transformer_2", None) is not None:
        raise ValueError(
            f"{type(target).__name__} has two transformers (Wan 2.2's two-stage denoising); bac.diffusers caches "
            "pipelines with one transformer: accelerate each stage's transformer with bac.accelerate instead"
        )
    return target, transformer


@contextlib.contextmanager
def _bac_contexts(transformer: nn.Module):
    """Make ``transformer.cache_context(name)`` also select bac's cache context ``name``.

    Transformers without diffusers' cache mix-in (DiT) get the method too while bac is enabled.
    """
    original = getattr(transformer, "cache_context", None) or (lambda name, **kwargs: contextlib.nullcontext())

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs):
        handle = get_handle(transformer)
        with original(name, **kwargs), (handle.context(name) if handle is not None else contextlib.nullcontext()):
            yield

    transformer.cache_context = cache_context
    try:
        yield
    finally:
        transformer.__dict__.pop("cache_context", None)


def _default_steps(pipe: Any) -> int | None:
    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    default = parameter.default if parameter is not None else None
    return default if isinstance(default, int) else None


def _sampler(pipe: Any, sample_fn: Callable[[Any], Any] | None, doing: str) -> Callable[[Any], Any]:
    """``sample_fn``, or one pipeline call per input (its keyword arguments) on a pipeline.

    A ``generator`` among the keyword arguments is copied for each call, so an input run again (refinement
    runs each input once per candidate) draws the same noise, and the caller's generator is left as it was.
    """
    if sample_fn is not None:
        return sample_fn
    if pipe is None:
        raise TypeError(f"{doing} a bare transformer needs sample_fn, which runs one sampling loop per input")

    def fresh(generator):
        if isinstance(generator, (list, tuple)):
            return [fresh(g) for g in generator]
        if isinstance(generator, torch.Generator):
            return torch.Generator(generator.device).set_state(generator.get_state())
        return generator

    return lambda kwargs: pipe(**{**kwargs, **({"generator": fresh(kwargs["generator"])} if "generator" in kwargs
                                               else {})})


def calibrate(
    target: Any,
    inputs: list[Any],
    *,
    sample_fn: Callable[[Any], Any] | None = None,
    seed: int = 0,
) -> Calibration:
    """Record every block's residual over full sampling calls (see :func:`bac.calibrate`).

    On a pipeline, each input is the keyword arguments of one pipeline call,
    ``pipe(**kwargs)``. On a bare transformer, ``sample_fn(input)`` runs one
    sampling loop. With classifier-free guidance run as two denoiser calls
    per step inside ``transformer.cache_context("cond" / "uncond")``, each
    branch counts as its own trajectory.
    """
    pipe, transformer = _split(target)
    sample_fn = _sampler(pipe, sample_fn, "calibrating")
    with _bac_contexts(transformer):
        calibration = calibrate_model(
            transformer,
            sample_fn,
            inputs,
            seed=seed,
            scheduler=pipe.scheduler if pipe is not None else None,
            adapters=adapters_for(transformer),
        )
    timesteps = _timesteps(pipe)  # the last call's: every call ran calibration.num_steps steps (checked)
    if timesteps is not None and len(timesteps) == calibration.num_steps:
        calibration = dataclasses.replace(calibration, timesteps=timesteps)
    return calibration


def _timesteps(pipe: Any):
    """The timesteps the pipeline's scheduler was last set to, as float64 on the host (None without a pipeline)."""
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return None if timesteps is None else torch.as_tensor(timesteps).detach().double().cpu().numpy()


def refine(
    target: Any,
    method: Method,
    inputs: list[Any],
    *,
    sample_fn: Callable[[Any], Any] | None = None,
    rounds: int = 2,
    max_candidates: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Method:
    """:func:`bac.refine` on a pipeline or a bare transformer: ``method``'s plan with update steps moved
    to lower the deviation of the real output from full computation on ``inputs``.

    Inputs are as for :func:`calibrate` (keyword arguments of one pipeline call, or
    ``sample_fn``'s inputs on a bare transformer); the pipeline's ``cache_context``
    names select bac's contexts, as under :func:`enable_cache`.
    """
    pipe, transformer = _split(target)
    sample_fn = _sampler(pipe, sample_fn, "refining")
    with _bac_contexts(transformer):
        return refine_plan(transformer, method, sample_fn, inputs, rounds=rounds, max_candidates=max_candidates,
                           adapters=adapters_for(transformer), log=log)


def enable_cache(
    target: Any,
    method: str | Method | Plan | os.PathLike = "bac",
    *,
    calibration: Calibration | os.PathLike | str | None = None,
    num_inference_steps: int | None = None,
    **params: Any,
) -> CacheHandle:
    """Cache a diffusers pipeline's transformer (or a bare transformer) with ``method``.

    ``method`` is a method name (:func:`bac.available_methods`: ``bac``, ``taylorseer``,
    ``fbcache``, ...) with its ``params``, a :class:`bac.Method`, a
    :class:`bac.Plan` or the path of a plan file. Calibrated methods (``bac``,
    ``acs``, ``unified-acs``) need ``calibration`` (from :func:`calibrate`, or
    its file). ``num_inference_steps`` is the step count the method is built for
    first (default: the calibration's, the plan's, or the pipeline's own); a
    pipeline call with another count rebuilds or re-plans it where it can
    (docs/guide/diffusers.md, "Step counts"). Returns the :class:`bac.CacheHandle`
    (statistics, FLOPs).
    """
    pipe, transformer = _split(target)
    if getattr(transformer, "_bac_diffusers", None) is not None:
        raise RuntimeError("bac caching is already enabled on this transformer; call disable_cache first")
    adapters = adapters_for(transformer)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    if isinstance(method, (os.PathLike,)) or (isinstance(method, str) and method.endswith(".json")):
        method = Plan.load(method)
    wanted = num_inference_steps or (calibration.num_steps if calibration is not None else None)
    wanted = wanted or (_default_steps(pipe) if pipe is not None else None)
    if isinstance(method, str):
        if needs_calibration(method) and calibration is None:
            raise ValueError(
                f"method {method!r} is planned from a calibration: pass calibration=bac.diffusers.calibrate(pipe, ...)"
            )
    elif params:
        raise ValueError(f"parameters {sorted(params)} only apply to a method given by name")
    planned = method.num_steps if not isinstance(method, str) else None  # a Plan's (or static Method's) count
    if planned is not None and num_inference_steps is not None and planned != num_inference_steps:
        raise PlanMismatchError(f"the plan was made for {planned} steps, not num_inference_steps={num_inference_steps}")
    steps = planned or wanted
    if steps is None:
        raise ValueError("pass num_inference_steps: the number of denoiser calls per sampling call")
    source = calibration if calibration is not None else describe(transformer, adapters)
    replan = pipe is not None and isinstance(method, str) and needs_calibration(method) and \
        calibration.timesteps is not None
    for_steps = _method_for_steps(method, source, params, replan)
    first = for_steps(steps) or for_steps(calibration.num_steps)  # re-planned at the first call for another count
    scheduler = pipe.scheduler if pipe is not None else None
    handle = accelerate(transformer, first, num_steps=first.num_steps or steps, scheduler=scheduler, adapters=adapters)
    stack = contextlib.ExitStack()
    stack.enter_context(_bac_contexts(transformer))
    original_class = None
    if pipe is not None:
        original_class = type(pipe)
        pipe.__class__ = _caching_class(original_class)
    enabled = _Enabled(handle, stack, pipe, original_class, first.num_steps or steps, for_steps)
    if replan:  # prepended: runs before the engine starts the step
        stack.callback(transformer.register_forward_pre_hook(enabled.at_first_call, prepend=True).remove)
    transformer._bac_diffusers = enabled
    return handle


class _Enabled:
    """What :func:`enable_cache` changed, and how to make its method for another step count."""

    def __init__(self, handle, stack, pipe, original_class, steps, for_steps):
        self.handle, self.stack, self.pipe, self.original_class = handle, stack, pipe, original_class
        self.steps, self.for_steps = steps, for_steps
        self.pending: int | None = None  # a step count to re-plan for once the call's timesteps are set

    def follow(self, steps: int) -> None:
        """At the start of a pipeline call: the method for ``steps`` denoising steps (refused when it is fixed
        to another count; a calibrated plan that needs the call's timesteps is made at its first denoiser call)."""
        self.pending = None
        if steps == self.steps:
            return
        made = self.for_steps(steps)
        if made is None:
            self.pending = steps
        else:
            self._use(made, steps)

    def at_first_call(self, module: nn.Module, args: tuple) -> None:
        if self.pending is not None:
            steps, self.pending = self.pending, None
            self._use(self.for_steps(steps, _timesteps(self.pipe)), steps)

    def _use(self, made: Any, steps: int) -> None:
        scheduler = self.pipe.scheduler if self.pipe is not None else None
        self.handle.reschedule(made, num_steps=steps, scheduler=scheduler)
        self.steps = steps


def _method_for_steps(method: Any, source: Calibration | Any, params: dict,
                      replan: bool = False) -> Callable[..., Any]:
    """``for_steps(K, timesteps=None)``: ``method`` made for K denoising steps, or
    :class:`bac.PlanMismatchError` when it is fixed to another count (a plan object or file, a calibrated
    method without a pipeline's timesteps). With ``replan``, a method planned from a calibration is planned
    again from the calibrated steps at the call's ``timesteps`` (``None`` until they are known)."""
    if isinstance(method, str) and needs_calibration(method) and replan:
        plans = {tuple(source.timesteps): build_method(method, source, **params)}

        def replanned(steps: int, timesteps=None) -> Method | None:
            if steps == source.num_steps:
                return plans[tuple(source.timesteps)]
            if timesteps is None:
                return None
            if tuple(timesteps) not in plans:
                try:
                    plans[tuple(timesteps)] = build_method(method, source.for_timesteps(timesteps), **params)
                except ValueError as err:  # M larger than the new step count, timesteps not covered
                    raise PlanMismatchError(f"re-planning {method!r} for {steps} steps from its {source.num_steps}-"
                                            f"step calibration: {err}") from None
            return plans[tuple(timesteps)]

        return replanned
    if isinstance(method, str) and needs_calibration(method):
        return _fixed(build_method(method, source, **params),
                      f"{method!r} is planned from a calibration of {source.num_steps} steps: calibrate at that "
                      "many steps and call bac.diffusers.enable_cache again")
    if isinstance(method, Method) and isinstance(method.schedule, Rule):
        return lambda steps, timesteps=None: method  # a runtime rule decides per step, whatever the count
    if isinstance(method, Method) and needs_calibration_of(method):
        return _fixed(method, f"method {method.name!r} is planned from a calibration of {method.num_steps} steps: "
                              "calibrate at that many steps and call bac.diffusers.enable_cache again")
    if isinstance(method, Plan):
        return _fixed(method, "a plan is made for one step count: pass the method by name to follow each call's "
                              "count, or call bac.diffusers.enable_cache again with a plan for that count")
    name, standin = (method, None) if isinstance(method, str) else (method.name, method.standin)
    params = params if isinstance(method, str) else method.params
    built: dict[int, Method] = {} if isinstance(method, str) else {method.num_steps: method}

    def for_steps(steps: int, timesteps=None) -> Method:  # a schedule that does not depend on the count
        if steps not in built:
            built[steps] = build_method(name, source, num_steps=steps, standin=standin, **params)
        return built[steps]

    return for_steps


def _fixed(made: Any, why: str) -> Callable[..., Any]:
    def for_steps(steps: int, timesteps=None) -> Any:
        if steps != made.num_steps:
            raise PlanMismatchError(f"caching is made for {made.num_steps} denoising steps, not "
                                    f"num_inference_steps={steps}; {why}")
        return made

    return for_steps


def needs_calibration_of(method: Method) -> bool:
    """Whether a built method's schedule came from a calibration (or is not a registered method at all)."""
    return method.name not in available_methods() or needs_calibration(method.name)


def disable_cache(target: Any) -> None:
    """Undo :func:`enable_cache`: the transformer and pipeline compute exactly as before."""
    _, transformer = _split(target)
    state = transformer.__dict__.pop("_bac_diffusers", None)
    if state is None:
        return
    try:
        state.handle.remove()  # may report a bare transformer's short sampling loop, after restoring it
    finally:
        state.stack.close()
        if state.pipe is not None:
            state.pipe.__class__ = state.original_class


_CACHING_CLASSES: dict[type, type] = {}


def _caching_class(cls: type) -> type:
    """A subclass of the pipeline class whose calls each start a new trajectory (same name)."""
    if cls not in _CACHING_CLASSES:
        signature = inspect.signature(cls.__call__)

        def __call__(self, *args, **kwargs):
            enabled = self.transformer._bac_diffusers
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            enabled.follow(bound.arguments.get("num_inference_steps", enabled.steps))  # before anything runs
            handle = enabled.handle
            handle.new_trajectory()
            result = cls.__call__(self, *args, **kwargs)
            ran = handle.steps_run()
            try:
                handle.end_trajectory()  # checked here, so the next call or disable_cache does not report it again
            except CacheStateError as err:
                raise PlanMismatchError(
                    f"the plan covers {enabled.steps} denoiser calls per context, the pipeline ran {ran}") from err
            return result

        _CACHING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _CACHING_CLASSES[cls]
