"""Output-aware refinement: improve a static plan by the deviation of the model's real output.

ACS and forecast-aware ACS score each block by its own feature error on the uncached trajectory; what a
user sees is the sampler's output, after errors have propagated through downstream blocks and steps.
:func:`refine` puts the cached model in the loop on a few calibration inputs and moves update steps while
the output's deviation from full computation falls, keeping every block's update count (and so the
plan's cost). The refined plan depends on the weights (recorded) and the inputs: check it on others. The
search: docs/guide/caching-methods.md ("Refining a plan against the real output").
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapters import LayerAdapter, describe
from .checks import check_number
from .engine import accelerate
from .errors import ConfigError, ConfigTypeError
from .methods import Method
from .plan import Plan

MOVES = (-1, 1, -2, 2)


def refine(
    model: nn.Module,
    method: Method,
    sample_fn: Callable[[Any], Any],
    inputs: Iterable[Any],
    *,
    rounds: int = 2,
    max_candidates: int | None = None,
    adapters: Mapping[type, LayerAdapter] | None = None,
    log: Callable[[str], None] | None = None,
) -> Method:
    """``method``'s plan with update steps moved to lower the output deviation on ``inputs``.

    ``sample_fn(x)`` runs one full sampling call for input ``x`` and returns its
    output (a tensor or a tuple of tensors); the model is accelerated around it and
    a new trajectory starts before each call. It must draw the same noise whenever it
    is given the same input (checked: an error otherwise). The result is a :class:`bac.Method`
    named ``<method>+refined`` with the same stand-in and per-block update counts;
    its plan's params record the deviation before and after and the number of
    candidates tried. ``max_candidates`` caps the candidates tried (each costs one
    cached sampling call per input; a block-wise plan has about four per update step
    of every block in each round).
    """
    if not isinstance(method, Method) or not isinstance(method.schedule, Plan):
        raise ConfigTypeError("refine improves a static plan: pass a bac.Method built from a plan (bac.build_method)")
    check_number("rounds", rounds, 1, integer=True)
    if max_candidates is not None:
        check_number("max_candidates", max_candidates, 1, integer=True)
    limit = max_candidates if max_candidates is not None else float("inf")
    inputs = list(inputs)
    if not inputs:
        raise ConfigError("refine needs at least one input")
    plan, spec = method.schedule, describe(model, adapters)
    plan.check_fits(spec)
    k = plan.num_steps

    def outputs(candidate: Plan | None) -> list[torch.Tensor]:
        if candidate is None:
            return [_flat(sample_fn(x)) for x in inputs]
        with torch.no_grad(), accelerate(model, Method(method.name, candidate, method.standin), num_steps=k,
                                         adapters=adapters) as handle:
            results = []
            for x in inputs:
                handle.new_trajectory()
                results.append(_flat(sample_fn(x)))
            return results

    with torch.no_grad():
        reference = outputs(None)
        if not all(torch.equal(a, b) for a, b in zip(outputs(None), reference)):
            raise ConfigError("sample_fn gives different outputs for the same input (unseeded noise, or a generator "
                              "consumed by the first call?): refinement compares outputs, so seed each call from its "
                              "input")
    norm = sum(float(r.square().sum()) for r in reference) ** 0.5

    def deviation(steps: dict[str, list[int]]) -> float:
        candidate = Plan.from_steps(spec, steps, k, plan.method, plan.params, scheduler=plan.scheduler)
        error = sum(float((o - r).square().sum()) for o, r in zip(outputs(candidate), reference))
        return error**0.5 / norm if norm > 0 else float(error > 0)

    steps = {b.name: sorted(b.update_steps) for b in plan.blocks}
    groups = _groups(steps)
    best = start = deviation(steps)
    tried = 1
    for round_index in range(rounds):
        improved = False
        for group in groups:
            index = 1
            while index < len(steps[group[0]]) and tried < limit:  # step 0 stays: nothing stands in before it
                current = steps[group[0]]
                for move in MOVES:
                    moved = current[index] + move
                    if moved <= 0 or moved >= k or moved in current or tried >= limit:
                        continue
                    trial = sorted(current[:index] + current[index + 1:] + [moved])
                    candidate = {**steps, **{name: trial for name in group}}
                    value = deviation(candidate)
                    tried += 1
                    if value < best:
                        steps, best, improved = candidate, value, True
                        break
                index += 1
        if log is not None:
            log(f"refine round {round_index + 1}: deviation {start:.4g} -> {best:.4g} ({tried} candidates)")
        if not improved or tried >= limit:
            break
    params = {**plan.params, "refined_from": plan.method, "deviation_before": start, "deviation_after": best,
              "candidates": tried}
    refined = Plan.from_steps(spec, steps, k, f"{plan.method}+refined", params, scheduler=plan.scheduler,
                              calibration=plan.calibration, weights=spec.weights_digest())
    return Method(f"{method.name}+refined", refined, method.standin, {**method.params, "refined": True})


def _groups(steps: Mapping[str, Sequence[int]]) -> list[list[str]]:
    """All blocks as one group when they share their update steps, else one group per block."""
    names = list(steps)
    if all(list(steps[n]) == list(steps[names[0]]) for n in names):
        return [names]
    return [[n] for n in names]


def _flat(output: Any) -> torch.Tensor:
    """A sampling call's output as one float64 vector on the CPU (a tensor, a tuple of tensors, or an object
    with ``.images`` / ``.frames`` / ``.sample`` as diffusers' pipelines return)."""
    for attr in ("images", "frames", "sample"):
        if hasattr(output, attr):
            output = getattr(output, attr)
            break
    parts = output if isinstance(output, (tuple, list)) else (output,)
    tensors = [torch.as_tensor(p).detach().double().cpu().reshape(-1) for p in parts if p is not None]
    if not tensors:
        raise ConfigTypeError(f"sample_fn returned {type(output).__name__}, not a tensor or tensors")
    return torch.cat(tensors)
