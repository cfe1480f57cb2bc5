"""The hot path: each block's runner computes the block or returns its stand-in's value.

An adapter routes a block through its runner: ``runner(fn, *args, **kwargs)`` computes ``fn`` or stands in
for it, as the calling thread's active context's row says (:mod:`bac.rows`). One runner is built in layers:
the plain runner, which for a static plan is the whole hot path (a row lookup and the block's own call);
around it, for a runtime rule, the step that hands the output to the rule and counts it; around that, a
tap if one was asked for. How the engine uses them: docs/guide/core.md ("Inside the engine").
"""
from __future__ import annotations

from typing import Any, Callable

from .rows import NOTIFY, RUN, STORE
from .standins import Standin
from .state import PerThread

Runner = Callable[..., Any]
# runner.gated(apply, fn, *args, **kwargs): see make_runner
GatedRunner = Callable[..., Any]
# tap(block_index, step, output, computed) -> None: sees the output every block hands on, computed or stood in.
Tap = Callable[[int, int, Any, bool], None]


def make_runner(i: int, local: PerThread, standin: Standin, static: bool, tap: Tap | None = None) -> Runner:
    """Block ``i``'s runner: ``runner(fn, *args, **kwargs)`` computes ``fn`` or stands in for it.

    ``runner.gated(apply, fn, *args, **kwargs)`` is for a branch whose output is
    ``apply(fn(...))`` with ``apply`` known exactly at every step (an adaLN gate of the
    timestep): it returns ``apply`` of the computed value or, at a skipped step, of the
    stand-in's value when the stand-in forecasts (:attr:`bac.Taylor.recomputes_gate`);
    reuse returns the gated value last handed on, as every reuse cache does. Rules,
    taps and observers always see the gated value, what the block hands on.

    ``static``: the rows never ``NOTIFY`` and the counts come from the rows
    (:meth:`bac.state.Context.counts`), so the plain runner is all there is. Without a
    tap the runner is not wrapped, so a tap costs nothing when unused.
    """
    gated = _plain(i, local, standin)
    if not static:
        gated = _notified_and_counted(i, local, gated)
    if tap is not None:
        gated = _tapped(i, local, tap, gated)

    def run(fn, *args, **kwargs):
        return gated(None, fn, *args, **kwargs)

    run.gated = gated
    return run


def _plain(i: int, local: PerThread, standin: Standin) -> GatedRunner:
    """Compute the block if its bits in the row say ``RUN`` (and ``STORE`` the value), else stand in."""
    store, fill = standin.store, standin.fill  # fixed for the handle's lifetime
    ungated = getattr(standin, "recomputes_gate", False)

    def observed(apply, fn, args, kwargs):  # (value to store, value to hand on), under an observer
        observer = local.observer
        if apply is None:
            out = observer(i, fn, args, kwargs)
            return out, out
        raws = []

        def gated_fn(*fn_args, **fn_kwargs):
            raws.append(fn(*fn_args, **fn_kwargs))
            return apply(raws[-1])

        out = observer(i, gated_fn, args, kwargs)
        return raws[-1], out

    def run_gated(apply, fn, *args, **kwargs):
        state = local.state
        bits = state.row[i]
        if bits & RUN:
            if local.observer is None:  # the hot path: no call beyond the block's own
                raw = fn(*args, **kwargs)
                out = raw if apply is None else apply(raw)
            else:
                raw, out = observed(apply, fn, args, kwargs)
            if bits & STORE:  # kept cut from autograd (see _constant), inline: the hot path
                kept = raw if ungated else out
                store(state.cache, i, state.step, kept.detach() if getattr(kept, "requires_grad", False) else kept)
            return out
        value = fill(state.cache, i, state.step)
        return apply(value) if ungated and apply is not None else value

    return run_gated


def _constant(value: Any) -> Any:
    """A value to keep for later steps, cut from the autograd graph: a guided step (real-time chunking's
    vector-Jacobian product) differentiates through the blocks it computes, and a reused or forecast value is
    a constant of the step that reads it (its graph is freed with its own step's backward)."""
    return value.detach() if getattr(value, "requires_grad", False) else value


def _notified_and_counted(i: int, local: PerThread, gated: GatedRunner) -> GatedRunner:
    """A runtime rule's runner: the computed output goes to the rule (``NOTIFY``) and each evaluation is counted."""

    def run_gated(apply, fn, *args, **kwargs):
        state = local.state
        bits = state.row[i]
        if not bits & RUN:
            state.skipped[i] += 1
            return gated(apply, fn, *args, **kwargs)
        out = gated(apply, fn, *args, **kwargs)
        if bits & NOTIFY:
            state.schedule.notify(state, i, _constant(out))
        state.computed[i] += 1
        return out

    return run_gated


def _tapped(i: int, local: PerThread, tap: Tap, gated: GatedRunner) -> GatedRunner:
    def run_gated(apply, fn, *args, **kwargs):
        out = gated(apply, fn, *args, **kwargs)
        state = local.state
        tap(i, state.step, out, bool(state.row[i] & RUN))
        return out

    return run_gated
