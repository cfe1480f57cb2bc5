"""An accelerated model's state: where the model keeps its handle, and the cache per thread and context.

A *context* (:class:`Context`) is one trajectory's step counter, row, cached values and rule state:
``"default"``, or one per classifier-free-guidance branch. Each thread has its own contexts
(:class:`ThreadRecord`); :class:`ThreadStates` makes them on a thread's first call and keeps every
thread's record for the statistics. The hot path reads :attr:`ThreadStates.local`: the calling
thread's active context and observer.

:func:`get_handle` is the one place that reads the attribute the handle is kept in, so that
:mod:`bac.adapters` can ask whether a model is accelerated without importing the engine.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from .rows import BoundSchedule

_ATTRIBUTE = "_bac_handle"

# observer(block_index, fn, args, kwargs) -> output; used by calibration and FLOP counting.
Observer = Callable[[int, Callable[..., Any], tuple, dict], Any]


def get_handle(model: Any) -> Any:
    """The :class:`bac.CacheHandle` accelerating ``model``, or ``None`` if it is not accelerated."""
    return getattr(model, _ATTRIBUTE, None)


def attach(model: Any, handle: Any) -> None:
    """Record ``handle`` on ``model`` (the handle checked that it has none)."""
    setattr(model, _ATTRIBUTE, handle)


def detach(model: Any, handle: Any) -> bool:
    """Forget ``handle`` on ``model``; returns ``False`` (and does nothing) if it is not ``model``'s handle."""
    if get_handle(model) is not handle:
        return False
    delattr(model, _ATTRIBUTE)
    return True


class Context:
    """One context's trajectory: step, row, cached values, rule state, and per-block totals."""

    __slots__ = ("name", "schedule", "step", "row", "cache", "rule_state", "computed", "skipped", "shape", "done",
                 "start", "scale")

    def __init__(self, name: str, schedule: BoundSchedule, num_blocks: int, start: int = 0):
        self.name = name
        self.schedule = schedule
        # Per-block totals. A static schedule's runners count nothing: its trajectories are folded in
        # here from the rows they ran when they end (reset); a runtime rule's runners count each block.
        self.computed = [0] * num_blocks
        self.skipped = [0] * num_blocks
        self.step = -1
        self.start = 0
        self.scale = 1.0  # the denoiser output's scale at this step (bac.rows.BoundSchedule.scales)
        self.reset(start=start)

    def counts(self) -> tuple[list[int], list[int]]:
        """Computed and skipped totals per block, the current trajectory included (for a static schedule,
        from its rows: a step interrupted inside the model counts as run whole)."""
        if not self.schedule.static or self.step < 0:
            return self.computed, self.skipped
        computed, skipped = self.schedule.ran(self.step + 1, self.start)
        return [a + b for a, b in zip(self.computed, computed)], [a + b for a, b in zip(self.skipped, skipped)]

    def add_counts(self, computed: list[int], skipped: list[int]) -> None:
        self.computed = [a + b for a, b in zip(self.computed, computed)]
        self.skipped = [a + b for a, b in zip(self.skipped, skipped)]

    def reset(self, schedule: BoundSchedule | None = None, start: int = 0) -> None:
        """Start a new trajectory (under ``schedule`` from now on, if given) whose first denoiser call is step
        ``start`` (a warm start: the plan's rows from there, its first one computing every block); the
        totals so far are kept."""
        if self.schedule.static and self.step >= 0:
            self.computed, self.skipped = self.counts()
        if schedule is not None:
            self.schedule = schedule
        self.start = start
        self.step = start - 1
        self.done = -1  # step of the last denoiser call that returned (an interrupted call leaves it behind)
        self.shape = None  # the first tensor input's shape at step 0: what the cached values are for
        self.row = None
        self.cache: list[Any] = [None] * len(self.computed)
        self.rule_state = self.schedule.new_state()


class ThreadRecord:
    """One thread's contexts and call counters (kept for the handle's statistics)."""

    __slots__ = ("contexts", "fresh", "closed", "trajectories", "calls", "mark", "start")

    def __init__(self):
        self.start = 0  # the current trajectory's first step (a warm start's, else 0)
        self.contexts: dict[str, Context] = {}
        self.fresh = True
        self.closed = False  # the current trajectory's length was checked (end_trajectory)
        self.trajectories = 0
        self.calls = 0
        self.mark: tuple = ([], [], 0, 0)  # totals() when the current trajectory started (stats' "last_call")

    def short_runs(self, schedule: BoundSchedule) -> dict[str, int]:
        """Contexts of this trajectory that ran 1 to K-1 steps of a K-step plan, and did not break off."""
        if self.closed or not schedule.exact_length:
            return {}
        limit = schedule.limit
        return {name: s.step + 1 for name, s in self.contexts.items()
                if s.start <= s.step < limit - 1 and s.done == s.step}

    def restart(self, start: int = 0) -> None:
        """Start a new trajectory in every context, at step ``start`` (see :meth:`Context.reset`)."""
        self.start = start
        for state in self.contexts.values():
            state.reset(start=start)
        self.fresh = True
        self.closed = False
        self.mark = totals([self])


def totals(records: list[ThreadRecord]) -> tuple[list[int], list[int], int, int]:
    """Computed and skipped per block (empty lists for no context), sampling calls and denoiser calls."""
    counts = [s.counts() for r in records for s in r.contexts.values()]
    computed = [sum(c) for c in zip(*(c for c, _ in counts))]
    skipped = [sum(c) for c in zip(*(s for _, s in counts))]
    return computed, skipped, sum(r.trajectories for r in records), sum(r.calls for r in records)


class PerThread(threading.local):
    """What the hot path reads: the calling thread's active context and observer (made on first use)."""

    def __init__(self, threads: "ThreadStates"):
        self.record = ThreadRecord()
        self.observer = threads.observer
        self.state = threads.context("default", self.record)
        self.record.mark = totals([self.record])
        with threads.lock:
            threads.records.append(self.record)


class ThreadStates:
    """Every thread's contexts under one schedule: made on first use, restarted, rescheduled."""

    def __init__(self, schedule: BoundSchedule, num_blocks: int, observer: Observer | None = None):
        self.schedule = schedule
        self.num_blocks = num_blocks
        self.observer = observer  # every thread's observer until it sets its own
        self.lock = threading.Lock()
        self.records: list[ThreadRecord] = []
        self.local = PerThread(self)

    def context(self, name: str, record: ThreadRecord | None = None) -> Context:
        """The context ``name`` of ``record`` (default: the calling thread's), made on first use."""
        record = record or self.local.record
        contexts = record.contexts
        if name not in contexts:
            contexts[name] = Context(name, self.schedule, self.num_blocks, record.start)
        return contexts[name]

    def reschedule(self, schedule: BoundSchedule) -> None:
        """Run every thread's next trajectory under ``schedule`` (the totals so far are kept)."""
        with self.lock:
            for record in self.records:
                for state in record.contexts.values():
                    state.reset(schedule)  # folds the finished trajectory's counts in under the old schedule
                record.fresh, record.closed = True, False
            self.schedule = schedule

    def reset(self) -> None:
        """Clear every thread's cached values (the model is restored)."""
        with self.lock:
            for record in self.records:
                for state in record.contexts.values():
                    state.reset()
