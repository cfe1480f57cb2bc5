"""Schedulers: the Adaptive Caching Scheduler, the Bubbling Union Algorithm, and plan methods.

Plan methods are plug-ins registered by name (:func:`register_plan_method`);
:func:`make_plan` builds a :class:`bac.Plan` with any of them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from .adapters import KINDS, Block, ModelSpec, describe
from .calibration import METRICS, Calibration
from .plan import Plan

# --- ACS ------------------------------------------------------------------------------


def acs_schedule(similarity, num_updates: int, maximize: bool = True) -> list[int]:
    """The exact Adaptive Caching Scheduler on one K x K matrix.

    Chooses update steps 0 = c_1 < ... < c_M (M = ``num_updates``) that
    maximise (or, with ``maximize=False`` for a distance, minimise) the total
    score sum_m sum_{t=c_m}^{c_{m+1}-1} S[c_m, t], by dynamic programming in
    O(M K^2). ``M = 1`` gives ``[0]``; ``M = K`` gives every step.

    Ties: among exactly equal optimal schedules the result has the earliest
    last update step, then the earliest second-to-last, and so on (it is the
    smallest when the step lists are compared from their ends); e.g. a constant
    matrix gives ``[0, 1, ..., M-1]``.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square K x K matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity matrix contains NaN or inf")
    k = s.shape[0]
    if isinstance(num_updates, bool) or not isinstance(num_updates, (int, np.integer)) or not 1 <= num_updates <= k:
        raise ValueError(f"num_updates must be an integer in [1, {k}], got {num_updates!r}")
    score = s if maximize else -s
    prefix = np.cumsum(score, axis=1)
    # cost[a, b] = sum_{t=a..b} score[a, t] for b >= a; -inf marks an empty segment.
    before = np.concatenate([[0.0], prefix[np.arange(1, k), np.arange(k - 1)]])
    cost = np.where(np.triu(np.ones((k, k), dtype=bool)), prefix - before[:, None], -np.inf)
    best = cost[0].copy()  # best[i]: steps 0..i covered by m segments, the last ending at i
    choices = []
    for _ in range(1, num_updates):
        # candidate[j, i]: m-1 segments cover 0..j, the new one covers j+1..i.
        candidate = best[:-1, None] + cost[1:, :]
        choice = np.argmax(candidate, axis=0)  # first maximum: the smallest j
        best = np.concatenate([[-np.inf], candidate[choice[1:], np.arange(1, k)]])
        choices.append(choice)
    steps, i = [], k - 1
    for choice in reversed(choices):
        i = int(choice[i])
        steps.append(i + 1)
    return [0] + steps[::-1]


# --- BUA ------------------------------------------------------------------------------


def _as_block(block: Any) -> tuple[str, str, int]:
    if isinstance(block, (tuple, list)):
        name, kind, layer = block
    else:
        name, kind, layer = block.name, block.kind, block.layer
    if kind not in KINDS:
        raise ValueError(f"block {name!r} has kind {kind!r}; expected one of {KINDS}")
    return str(name), kind, int(layer)


def bubbling_union(
    update_steps: Mapping[str, Sequence[int]],
    blocks: Sequence[Any],
    reuse_error: Mapping[str, float],
    top_n: int,
) -> dict[str, list[int]]:
    """The Bubbling Union Algorithm.

    Takes the ``top_n`` blocks with the largest reuse error (ties: the earlier
    block in execution order) and adds to each one's update steps those of
    every FFN block in the same or a deeper layer, so an upstream block is
    recomputed before a downstream FFN consumes its stale output. The FFNs'
    own (input) schedules are what bubble up. ``top_n = 0`` returns the input
    schedules unchanged. Returns every block's sorted update steps.
    """
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 0:
        raise ValueError(f"top_n must be a non-negative integer, got {top_n!r}")
    described = [_as_block(b) for b in blocks]
    for name, _, _ in described:
        if name not in update_steps:
            raise KeyError(f"no update steps for block {name!r}")
        if name not in reuse_error:
            raise KeyError(f"no reuse error for block {name!r}")
    result = {name: sorted(set(int(s) for s in update_steps[name])) for name, _, _ in described}
    ranked = sorted(range(len(described)), key=lambda i: (-float(reuse_error[described[i][0]]), i))
    for i in ranked[:top_n]:
        name, _, layer = described[i]
        bubbled = set(result[name])
        for other, kind, other_layer in described:
            if kind == "ffn" and other_layer >= layer:
                bubbled.update(int(s) for s in update_steps[other])
        result[name] = sorted(bubbled)
    return result


# --- plan methods ---------------------------------------------------------------------

PlanMethod = Callable[..., dict]
_PLAN_METHODS: dict[str, tuple[PlanMethod, bool]] = {}


def register_plan_method(name: str, needs_calibration: bool):
    """Register ``fn(blocks, num_steps, calibration, **params) -> {block name: steps}`` as a plan method."""

    def decorator(fn: PlanMethod) -> PlanMethod:
        _PLAN_METHODS[name] = (fn, needs_calibration)
        return fn

    return decorator


def plan_methods() -> list[str]:
    return sorted(_PLAN_METHODS)


def needs_calibration(method: str) -> bool:
    """Whether the registered plan ``method`` is built from a :class:`Calibration`."""
    if method not in _PLAN_METHODS:
        raise ValueError(f"unknown plan method {method!r}; registered: {plan_methods()}")
    return _PLAN_METHODS[method][1]


def _check_metric(metric: str) -> bool:
    """Validate ``metric``; return whether the ACS maximises it."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return metric == "cosine"


def _check_budget(M: Any, num_steps: int) -> int:
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or not 1 <= M <= num_steps:
        raise ValueError(f"M (updates per block) must be an integer in [1, {num_steps}], got {M!r}")
    return int(M)


@register_plan_method("every-step", needs_calibration=False)
def _every_step(blocks, num_steps, calibration):
    return {b.name: list(range(num_steps)) for b in blocks}


@register_plan_method("uniform", needs_calibration=False)
def _uniform(blocks, num_steps, calibration, M: int | None = None, interval: int | None = None):
    """All blocks update together: every ``interval`` steps, or at M evenly spaced steps."""
    if (M is None) == (interval is None):
        raise ValueError("uniform needs exactly one of M (updates per block) or interval")
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}")
        steps = list(range(0, num_steps, int(interval)))
    else:
        m = _check_budget(M, num_steps)
        steps = [i * num_steps // m for i in range(m)]
    return {b.name: steps for b in blocks}


@register_plan_method("unified-acs", needs_calibration=True)
def _unified_acs(blocks, num_steps, calibration, M: int = 10, metric: str = "cosine", reference: str = "mean"):
    """One ACS schedule for all blocks, from ``reference``: a block's name or ``"mean"`` of all blocks."""
    maximize = _check_metric(metric)
    matrices = calibration.matrix(metric)
    if reference == "mean":
        matrix = matrices.mean(axis=0)
    else:
        names = [b.name for b in blocks]
        if reference not in names:
            raise ValueError(f"reference block {reference!r} is not one of the model's blocks")
        matrix = matrices[names.index(reference)]
    steps = acs_schedule(matrix, _check_budget(M, num_steps), maximize)
    return {b.name: steps for b in blocks}


@register_plan_method("acs", needs_calibration=True)
def _blockwise_acs(blocks, num_steps, calibration, M: int = 10, metric: str = "cosine"):
    """ACS on each block's own matrix (the paper's ablation without BUA)."""
    maximize = _check_metric(metric)
    m = _check_budget(M, num_steps)
    return {b.name: acs_schedule(s, m, maximize) for b, s in zip(blocks, calibration.matrix(metric))}


@register_plan_method("bac", needs_calibration=True)
def _bac(blocks, num_steps, calibration, M: int = 10, n: int = 5, metric: str = "cosine"):
    """Block-wise ACS, then BUA over the top-n blocks by reuse error."""
    steps = _blockwise_acs(blocks, num_steps, calibration, M=M, metric=metric)
    errors = {b.name: float(e) for b, e in zip(blocks, calibration.reuse_error)}
    return bubbling_union(steps, blocks, errors, n)


def _defaults(fn: PlanMethod) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[3:]
    return {p.name: p.default for p in params}


def make_plan(
    source: Calibration | ModelSpec | nn.Module,
    method: str = "bac",
    *,
    num_steps: int | None = None,
    scheduler: Any = None,
    **params: Any,
) -> Plan:
    """Build a plan with the registered ``method`` and its ``params``.

    ``source`` is a :class:`Calibration` (required by calibrated methods, and
    it fixes the step count) or, for ``every-step`` and ``uniform``, a model or
    its :class:`ModelSpec` together with ``num_steps``.
    """
    if method not in _PLAN_METHODS:
        raise ValueError(f"unknown plan method {method!r}; registered: {plan_methods()}")
    fn, needs_calibration = _PLAN_METHODS[method]
    defaults = _defaults(fn)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"plan method {method!r} takes parameters {sorted(defaults)}, not {unknown}")
    if isinstance(source, nn.Module):
        source = describe(source)
    calibration = source if isinstance(source, Calibration) else None
    if needs_calibration and calibration is None:
        raise ValueError(f"plan method {method!r} needs a Calibration (bac.calibrate), not a model")
    if calibration is not None:
        if num_steps is not None and num_steps != calibration.num_steps:
            raise ValueError(f"calibration covers {calibration.num_steps} steps, not {num_steps}")
        num_steps = calibration.num_steps
        scheduler = scheduler if scheduler is not None else calibration.scheduler
    if num_steps is None:
        raise ValueError(f"plan method {method!r} needs num_steps when no calibration is given")
    blocks: tuple[Block, ...] = source.blocks
    steps = fn(blocks, num_steps, calibration, **params)
    recorded = {**{k: v for k, v in defaults.items() if v is not None}, **params}
    return Plan.from_steps(
        source,
        steps,
        num_steps,
        method,
        recorded,
        scheduler=scheduler,
        calibration=calibration.facts() if calibration else None,
    )
