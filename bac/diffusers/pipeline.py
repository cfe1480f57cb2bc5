"""One-line caching for diffusers pipelines and transformers.

::

    import bac.diffusers

    calibration = bac.diffusers.calibrate(pipe, [dict(class_labels=[1, 2], num_inference_steps=50)])
    bac.diffusers.enable_cache(pipe, "bac", calibration=calibration, M=10, n=5)
    image = pipe(class_labels=[3], num_inference_steps=50).images[0]
    bac.diffusers.disable_cache(pipe)

bac sits in the transformer's diffusers ``HookRegistry`` as the hook ``"bac"`` (:mod:`.hook`): each
pipeline call is a new trajectory, the transformer's ``cache_context(name)`` selects bac's context of that
name (classifier-free guidance), and a method follows, or is planned again for, each call's step count
where it can, and is refused with what to do where it cannot. Other diffusers hooks compose with it; a
diffusers cache on the same model is refused. Step counts, guidance, hooks and bare transformers:
docs/guide/diffusers.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from typing import Any, Callable

import torch
from diffusers.models.cache_utils import CacheMixin
from torch import nn

from ..adapters import describe
from ..adjust import adjust_timesteps as adjust_model_timesteps
from ..calibration import Calibration
from ..engine import CacheHandle, accelerate
from ..errors import CacheStateError, ConfigError, ConfigTypeError, PlanMismatchError
from ..methods import Method, available_methods, build_method, needs_calibration
from ..plan import Plan
from ..recorder import calibrate as calibrate_model
from ..refine import refine as refine_plan
from ..rules import Rule
from .blocks import adapters_for
from .hook import (
    HOOK_NAME,
    BacCache,
    BacHook,
    PipelineCalls,
    bac_hook,
    contexts_hooked,
    host_timesteps,
    refuse_diffusers_caches,
    registry_of,
)


def _split(target: Any) -> tuple[Any, nn.Module]:
    """(pipeline or None, transformer) of a pipeline or a bare transformer."""
    if isinstance(target, nn.Module):
        return None, target
    transformer = getattr(target, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise ConfigTypeError(f"{type(target).__name__} is neither a transformer nor a pipeline with a .transformer")
    if getattr(target, "transformer_2", None) is not None:
        raise ConfigError(
            f"{type(target).__name__} has two transformers (Wan 2.2's two-stage denoising); bac.diffusers caches "
            "pipelines with one transformer: accelerate each stage's transformer with bac.accelerate instead"
        )
    return target, transformer


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
        raise ConfigTypeError(f"{doing} a bare transformer needs sample_fn, which runs one sampling loop per input")

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
    attention: bool = False,
) -> Calibration:
    """Record every block's residual over full sampling calls (see :func:`bac.calibrate`; ``attention=True``
    profiles attention too, for ProfilingDiT).

    On a pipeline, each input is the keyword arguments of one pipeline call,
    ``pipe(**kwargs)``. On a bare transformer, ``sample_fn(input)`` runs one
    sampling loop. With classifier-free guidance run as two denoiser calls
    per step inside ``transformer.cache_context("cond" / "uncond")``, each
    branch counts as its own trajectory.
    """
    pipe, transformer = _split(target)
    sample_fn = _sampler(pipe, sample_fn, "calibrating")
    with contexts_hooked(transformer):
        calibration = calibrate_model(
            transformer,
            sample_fn,
            inputs,
            seed=seed,
            scheduler=pipe.scheduler if pipe is not None else None,
            adapters=adapters_for(transformer),
            attention=attention,
        )
    timesteps = _timesteps(pipe)  # the last call's: every call ran calibration.num_steps steps (checked)
    if timesteps is not None and len(timesteps) == calibration.num_steps:
        calibration = dataclasses.replace(calibration, timesteps=timesteps)
    return calibration


def _timesteps(pipe: Any):
    """The timesteps the pipeline's scheduler was last set to, as float64 on the host (None without a pipeline)."""
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return None if timesteps is None else host_timesteps(timesteps)


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
    with contexts_hooked(transformer):
        return refine_plan(transformer, method, sample_fn, inputs, rounds=rounds, max_candidates=max_candidates,
                           adapters=adapters_for(transformer), log=log)


def adjust_timesteps(
    target: Any,
    method: Method,
    inputs: list[Any],
    *,
    sample_fn: Callable[[Any], Any] | None = None,
) -> Method:
    """:func:`bac.adjust_timesteps` on a pipeline or a bare transformer: ``method``'s plan with ERTACache's
    output scale fitted at every cached step. Inputs are as for :func:`calibrate`."""
    pipe, transformer = _split(target)
    sample_fn = _sampler(pipe, sample_fn, "adjusting timesteps of")
    with contexts_hooked(transformer):
        return adjust_model_timesteps(transformer, method, sample_fn, inputs, adapters=adapters_for(transformer))


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
    (docs/guide/diffusers.md, "Step counts"). bac joins the transformer's diffusers
    ``HookRegistry`` as the hook ``"bac"``; a diffusers cache on the transformer is refused
    ("Hooks and trajectories"). Returns the :class:`bac.CacheHandle` (statistics, FLOPs).
    """
    pipe, transformer = _split(target)
    if bac_hook(transformer) is not None:
        raise CacheStateError("bac caching is already enabled on this transformer; call disable_cache first")
    refuse_diffusers_caches(transformer, "bac.diffusers.enable_cache")
    adapters = adapters_for(transformer)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    if isinstance(method, (os.PathLike,)) or (isinstance(method, str) and method.endswith(".json")):
        method = Plan.load(method)
    wanted = num_inference_steps or (calibration.num_steps if calibration is not None else None)
    wanted = wanted or (_default_steps(pipe) if pipe is not None else None)
    if isinstance(method, str):
        if needs_calibration(method) and calibration is None:
            raise ConfigError(
                f"method {method!r} is planned from a calibration: pass calibration=bac.diffusers.calibrate(pipe, ...)"
            )
    elif params:
        raise ConfigError(f"parameters {sorted(params)} only apply to a method given by name")
    planned = method.num_steps if not isinstance(method, str) else None  # a Plan's (or static Method's) count
    if planned is not None and num_inference_steps is not None and planned != num_inference_steps:
        raise PlanMismatchError(f"the plan was made for {planned} steps, not num_inference_steps={num_inference_steps}")
    steps = planned or wanted
    if steps is None:
        raise ConfigError("pass num_inference_steps: the number of denoiser calls per sampling call")
    source = calibration if calibration is not None else describe(transformer, adapters)
    replan = pipe is not None and isinstance(method, str) and needs_calibration(method) and \
        calibration.timesteps is not None
    for_steps = _method_for_steps(method, source, params, replan)
    first = for_steps(steps) or for_steps(calibration.num_steps)  # re-planned at the first call for another count
    scheduler = pipe.scheduler if pipe is not None else None
    handle = accelerate(transformer, first, num_steps=first.num_steps or steps, scheduler=scheduler, adapters=adapters,
                        step_hooks=False)  # bac's registry hook drives the steps
    undo = contextlib.ExitStack()  # what removing bac's hook undoes, last first
    undo.callback(handle.remove)  # last: it may report a short last sampling call after restoring the model
    try:
        calls = PipelineCalls(handle, pipe, first.num_steps or steps, for_steps)
        if isinstance(transformer, CacheMixin):  # diffusers' enable_cache now refuses a second cache
            undo.callback(_restore_cache_config(transformer))
            transformer._cache_config = BacCache()
        registry_of(transformer).register_hook(BacHook(transformer, calls, undo), HOOK_NAME)
    except BaseException:
        undo.close()
        raise
    return handle


def _restore_cache_config(transformer: nn.Module) -> Callable[[], None]:
    """Undo setting ``transformer._cache_config`` (None before: a diffusers cache is refused first)."""
    if "_cache_config" in vars(transformer):
        return lambda: setattr(transformer, "_cache_config", None)
    return lambda: vars(transformer).pop("_cache_config", None)


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
    """Undo :func:`enable_cache`: bac's hook leaves the transformer's ``HookRegistry`` (other hooks stay, in
    their order), and the transformer and pipeline compute exactly as before. Raises
    :class:`bac.CacheStateError` after restoring if a bare transformer's last sampling loop ran short."""
    _, transformer = _split(target)
    hook = bac_hook(transformer)
    if hook is None:
        return
    refuse_diffusers_caches(transformer, "bac.diffusers.disable_cache")  # its hooks would wrap bac's blocks
    registry_of(transformer).remove_hook(HOOK_NAME, recurse=False)  # the hook undoes the rest
    if hook.report is not None:
        raise hook.report
