"""Step rows: *when* each block is computed, one row of bits per denoiser call.

A row holds one bit set per block: ``RUN`` (compute the block), ``STORE`` (hand the output to the stand-in,
because a later step will stand in for it) and ``NOTIFY`` (pass the output to the schedule, which may then
rewrite the rest of the row); a block without ``RUN`` is filled in by the stand-in (:mod:`bac.standins`). A
:class:`BoundSchedule` is a schedule bound to one model's blocks: :class:`StaticRows` for a
:class:`bac.Plan` (rows precomputed once; the hot path is a list lookup), :class:`AlwaysCompute` for
calibration and FLOP counting, and the runtime rules of :mod:`bac.rules`. ``new_state()`` makes the
per-context state, cleared at every new trajectory. (Formerly ``bac.actions``.)
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from .errors import ConfigError

RUN, STORE, NOTIFY = 1, 2, 4


def rows_from_table(table: Sequence[Sequence[bool]], keeps_history: bool = False) -> tuple[tuple[int, ...], ...]:
    """Per step and block: compute or not, and store when a later skip needs the value.

    With plain reuse only the computation right before a skipped step is
    stored (a retained output cannot be recycled by the allocator, which on
    CPU costs more than the bookkeeping); a forecaster (``keeps_history``)
    gets every computation that precedes some later skip.
    """
    num_steps = len(table)
    num_blocks = len(table[0]) if num_steps else 0
    later_skip = [[False] * num_blocks for _ in range(num_steps)]
    for k in range(num_steps - 2, -1, -1):
        later_skip[k] = [not table[k + 1][i] or later_skip[k + 1][i] for i in range(num_blocks)]
    rows = []
    for k, row in enumerate(table):
        following = table[k + 1] if k + 1 < num_steps else row
        needed = later_skip[k] if keeps_history else [not run for run in following]
        rows.append(tuple((RUN | STORE if needed[i] else RUN) if run else 0 for i, run in enumerate(row)))
    return tuple(rows)


class BoundSchedule:
    """A schedule bound to one model's blocks (see the module docstring)."""

    name = "schedule"
    params: dict = {}
    limit = sys.maxsize  # steps one trajectory may run in a context
    # True: a trajectory must run exactly `limit` steps (a plan's rows are made for that sampler);
    # runtime rules decide step by step, so a shorter run is no error for them
    exact_length = False
    # True: the rows do not depend on the data (never NOTIFY), so what ran is known from the step count
    # alone (:meth:`ran`) and the hot path counts nothing
    static = False
    # the denoiser output's scale per step (a plan's fitted timestep adjustment), or None: unscaled
    scales: "tuple[float, ...] | None" = None

    def new_state(self) -> Any:
        return None

    def ran(self, steps: int, start: int = 0) -> tuple[list[int], list[int]]:
        """Per block, how often rows ``start .. steps - 1`` compute and skip it, the first computing every
        block (a trajectory begun at ``start``; static schedules only)."""
        raise NotImplementedError

    def row(self, state) -> Sequence[int]:
        raise NotImplementedError

    def first_row(self, state) -> Sequence[int]:
        """The row of a trajectory's first step when it is not step 0 (a warm start): every block computed,
        and stored, since no earlier value exists to stand in (static schedules only)."""
        raise ConfigError(f"a trajectory begun after step 0 (a warm start) needs a static plan; {self.name} "
                          "decides at run time from the steps before")

    def notify(self, state, i: int, out: Any) -> None:
        """Block ``i`` (whose bits in the row have ``NOTIFY``) computed ``out`` at ``state.step``."""


class StaticRows(BoundSchedule):
    """Precomputed step rows (from a plan, or every block every step)."""

    exact_length = True
    static = True

    def __init__(self, rows: Sequence[Sequence[int]], limit: int, name: str, params: dict | None = None,
                 scales: Sequence[float] | None = None):
        if any(bits & NOTIFY for row in rows for bits in row):
            raise ValueError("static rows cannot NOTIFY: what runs must not depend on the data")
        self.rows = rows
        self.scales = None if scales is None or all(s == 1.0 for s in scales) else tuple(scales)
        self.limit = limit
        self.name = name
        self.params = dict(params or {})
        # computed[k][i]: how often block i runs in the first k rows
        self._computed = [[0] * len(rows[0])] if rows else [[]]
        for row in rows:
            self._computed.append([c + bool(a & RUN) for c, a in zip(self._computed[-1], row)])

        self._first = (RUN | STORE,) * len(rows[0]) if rows else ()

    def row(self, state) -> Sequence[int]:
        return self.rows[state.step]

    def first_row(self, state) -> Sequence[int]:
        return self._first

    def ran(self, steps: int, start: int = 0) -> tuple[list[int], list[int]]:
        computed = self._computed[steps]
        if start and steps > start:  # rows start+1 .. steps-1 as planned, row start computing every block
            computed = [c - first + 1 for c, first in zip(computed, self._computed[start + 1])]
        elif start:
            computed = [0] * len(computed)
        return list(computed), [max(steps - start, 0) - c for c in computed]


class AlwaysCompute(BoundSchedule):
    """Every block at every step, for any number of steps (calibration, FLOP counting)."""

    name = "always"
    static = True

    def __init__(self, num_blocks: int):
        self._row = (RUN,) * num_blocks

    def row(self, state) -> Sequence[int]:
        return self._row

    def first_row(self, state) -> Sequence[int]:
        return self._row

    def ran(self, steps: int, start: int = 0) -> tuple[list[int], list[int]]:
        return [max(steps - start, 0)] * len(self._row), [0] * len(self._row)
