"""ERTACache's timestep adjustment: a per-step scale of the denoiser output at cached steps, fitted on the
cached model's own trajectories (:mod:`bac.methods.ertacache`, part 3).

A cached step's output ``v`` misses the full model's ``v_full``; the sampler multiplies that miss by the
step's interval (the paper's step amplification). :func:`adjust_timesteps` runs ``method`` on calibration
inputs and, at every step that skips a block, also runs the full model on the same sample (a scratch context
whose first row computes every block), and fits ``s = <v_full, v> / <v, v>`` summed over inputs, samples and
guidance branches. The result's plan records the scales (``params["step_scales"]``): the engine multiplies
the denoiser's output by ``s`` at those steps, which in a flow-matching Euler step is the interval scaled by
``s``. The scales are fitted in one pass along the unadjusted cached trajectories.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .adapters import LayerAdapter, describe
from .engine import accelerate, output_tensor
from .errors import ConfigError, ConfigTypeError, NonFiniteError
from .methods import Method
from .plan import Plan


def adjust_timesteps(
    model: nn.Module,
    method: Method,
    sample_fn: Callable[[Any], Any],
    inputs: Iterable[Any],
    *,
    adapters: Mapping[type, LayerAdapter] | None = None,
) -> Method:
    """``method`` with its plan's output scale fitted at every step that skips a block (see the module
    docstring); ``sample_fn(x)`` runs one sampling call for input ``x``, as for :func:`bac.refine`.

    Returns a :class:`bac.Method` of the same name and stand-in whose plan's params add ``step_scales`` (1.0 at
    steps that compute every block, and where the fit is not positive: a cached output pointing away from the
    full one is no interval to scale); its parameters record ``adjusted: True``.
    """
    if not isinstance(method, Method) or not isinstance(method.schedule, Plan):
        raise ConfigTypeError("adjust_timesteps fits a static plan: pass a bac.Method built from a plan")
    inputs = list(inputs)
    if not inputs:
        raise ConfigError("adjust_timesteps needs at least one input")
    plan = method.schedule
    spec = describe(model, adapters)
    plan.check_fits(spec)
    params = {k: v for k, v in plan.params.items() if k != "step_scales"}
    unadjusted = dataclasses.replace(plan, params=params)
    skipping = [not all(row) for row in plan.step_table()]
    dots, norms = [0.0] * plan.num_steps, [0.0] * plan.num_steps
    nested = [False]

    with torch.no_grad(), accelerate(model, Method(method.name, unadjusted, method.standin),
                                     num_steps=plan.num_steps, adapters=adapters) as handle:
        def fit(module, args, kwargs, output):
            step = handle.step
            if nested[0] or not skipping[step]:
                return None
            nested[0] = True
            try:
                with handle.scratch("full output", start=step):
                    full = output_tensor(module(*args, **kwargs)).double()
            finally:
                nested[0] = False
            cached = output_tensor(output).double()
            dots[step] += float((full * cached).sum())
            norms[step] += float(cached.square().sum())
            return None

        hook = model.register_forward_hook(fit, with_kwargs=True)
        try:
            for x in inputs:
                handle.new_trajectory()
                sample_fn(x)
        finally:
            hook.remove()
    fitted = [dots[k] / norms[k] if skipping[k] and norms[k] > 0 else 1.0 for k in range(plan.num_steps)]
    if not all(torch.isfinite(torch.tensor(fitted))):
        raise NonFiniteError("adjust_timesteps: the fitted output scales are not finite (NaN or inf outputs?)")
    # a fit <= 0 (the cached output points away from the full one) is no interval: that step is left as it is
    scales = [s if s > 0 else 1.0 for s in fitted]
    adjusted = dataclasses.replace(plan, params={**params, "step_scales": [round(s, 6) for s in scales]})
    return Method(method.name, adjusted, method.standin, {**method.params, "adjusted": True})
