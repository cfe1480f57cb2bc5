"""One-line caching for diffusers pipelines and transformers.

::

    import bac.diffusers

    calibration = bac.diffusers.calibrate(pipe, [dict(class_labels=[1, 2], num_inference_steps=50)])
    bac.diffusers.enable_cache(pipe, "bac", calibration=calibration, M=10, n=5)
    image = pipe(class_labels=[3], num_inference_steps=50).images[0]
    bac.diffusers.disable_cache(pipe)

* Each pipeline call starts a new trajectory (every cache context cleared).
* The transformer's ``cache_context(name)``, which diffusers' FLUX and Wan
  pipelines enter around each denoiser call ("cond" / "uncond"), selects
  bac's context of that name, so classifier-free guidance that runs the
  transformer twice per step keeps separate cache state per branch. Guidance
  batched into one call (DiT) needs nothing.
* A method is built for one step count: ``num_inference_steps`` (default: the
  pipeline's own default, or the plan's / calibration's). A pipeline call that
  asks for another count is refused before it runs.
* On a bare transformer there is no pipeline call to hook: call
  ``bac.new_trajectory(transformer)`` at the start of each sampling loop.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable

from torch import nn

from ..adapters import describe
from ..calibration import Calibration
from ..engine import CacheHandle, accelerate
from ..errors import CacheStateError, PlanMismatchError
from ..methods import Method, build_method, needs_calibration
from ..plan import Plan
from ..recorder import calibrate as calibrate_model
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
        handle = getattr(transformer, "_bac_handle", None)
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
    if sample_fn is None:
        if pipe is None:
            raise TypeError("calibrating a bare transformer needs sample_fn, which runs one sampling loop per input")
        sample_fn = lambda kwargs: pipe(**kwargs)  # noqa: E731
    with _bac_contexts(transformer):
        return calibrate_model(
            transformer,
            sample_fn,
            inputs,
            seed=seed,
            scheduler=pipe.scheduler if pipe is not None else None,
            adapters=adapters_for(transformer),
        )


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
    its file). Returns the :class:`bac.CacheHandle` (statistics, FLOPs).
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
        source = calibration if calibration is not None else describe(transformer, adapters)
        method = build_method(method, source, num_steps=wanted, **params)
    elif params:
        raise ValueError(f"parameters {sorted(params)} only apply to a method given by name")
    planned = method.num_steps  # a Plan's (or a static Method's) step count; None for runtime rules
    if planned is not None and num_inference_steps is not None and planned != num_inference_steps:
        raise PlanMismatchError(f"the plan was made for {planned} steps, not num_inference_steps={num_inference_steps}")
    steps = planned or wanted
    if steps is None:
        raise ValueError("pass num_inference_steps: the number of denoiser calls per sampling loop")
    scheduler = pipe.scheduler if pipe is not None else None
    handle = accelerate(transformer, method, num_steps=steps, scheduler=scheduler, adapters=adapters)
    stack = contextlib.ExitStack()
    stack.enter_context(_bac_contexts(transformer))
    original_class = None
    if pipe is not None:
        original_class = type(pipe)
        pipe.__class__ = _caching_class(original_class)
    transformer._bac_diffusers = (handle, stack, pipe, original_class, steps)
    return handle


def disable_cache(target: Any) -> None:
    """Undo :func:`enable_cache`: the transformer and pipeline compute exactly as before."""
    _, transformer = _split(target)
    state = transformer.__dict__.pop("_bac_diffusers", None)
    if state is None:
        return
    handle, stack, pipe, original_class, _ = state
    try:
        handle.remove()  # may report a bare transformer's short sampling loop, after restoring it
    finally:
        stack.close()
        if pipe is not None:
            pipe.__class__ = original_class


_CACHING_CLASSES: dict[type, type] = {}


def _caching_class(cls: type) -> type:
    """A subclass of the pipeline class whose calls each start a new trajectory (same name)."""
    if cls not in _CACHING_CLASSES:
        signature = inspect.signature(cls.__call__)

        def __call__(self, *args, **kwargs):
            handle, _, _, _, steps = self.transformer._bac_diffusers
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            asked = bound.arguments.get("num_inference_steps", steps)
            if asked != steps:
                raise PlanMismatchError(
                    f"caching was enabled for {steps} denoising steps, this call asks for num_inference_steps={asked}; "
                    "call bac.diffusers.enable_cache again for that step count"
                )
            handle.new_trajectory()
            result = cls.__call__(self, *args, **kwargs)
            ran = handle.steps_run()
            try:
                handle.end_trajectory()  # checked here, so the next call or disable_cache does not report it again
            except CacheStateError as err:
                raise PlanMismatchError(
                    f"the plan covers {steps} denoiser calls per context, the pipeline ran {ran}") from err
            return result

        _CACHING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _CACHING_CLASSES[cls]
