"""Runtime rules: schedules that decide *when* blocks run from the values computed in the current call.

* :class:`FirstBlockCache` (FBCache / TeaCache-like), :class:`CGTaylor` and
  :class:`Sortblock`.

A rule is a small configuration object; :meth:`Rule.bind` makes the bound
schedule (:class:`bac.rows.BoundSchedule`) for one model, whose
``new_state()`` is the per-context state, cleared at every new trajectory.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from .adapters import ModelSpec
from .checks import check_number
from .errors import PlanMismatchError
from .rows import NOTIFY, RUN, STORE, BoundSchedule
from .standins import Reuse, Taylor, TaylorSeries, relative_l1


class Rule:
    """A runtime rule's configuration; :meth:`bind` makes its schedule for one model."""

    name = "rule"
    standin: Reuse | Taylor | None = None  # the stand-in the rule is meant for (None: reuse)

    @property
    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "standin"}

    def bind(self, spec: ModelSpec, limit: int) -> BoundSchedule:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


def _probe(spec: ModelSpec) -> int:
    """Number of leading blocks forming the first layer (the probe of whole-model rules)."""
    first = spec.blocks[0].layer
    count = sum(1 for b in spec.blocks if b.layer == first)
    if count == len(spec.blocks):
        raise PlanMismatchError("a whole-model rule needs at least two layers: the first is the probe, the rest "
                                "are cached")
    return count


class _ProbeState:
    __slots__ = ("row", "outputs", "reference")

    def __init__(self, num_blocks: int):
        self.row = [RUN] * num_blocks
        self.outputs: list = []
        self.reference = None


class _WholeModelRule(BoundSchedule):
    """Shared mechanics of FBCache and CG-Taylor: the first layer (probe) always runs, then one decision.

    The probe's blocks are always computed and notify; after the last of them
    :meth:`decide` says whether the remaining blocks run (and are stored) or
    are all filled in by the stand-in.
    """

    def __init__(self, rule: Rule, spec: ModelSpec, limit: int):
        self.name, self.params, self.limit = rule.name, rule.params, limit
        self.num_blocks = len(spec.blocks)
        self.probe = _probe(spec)
        self.main_residual = spec.layers[0][2].main_residual  # the first layer's adapter says which stream
        self._start = (RUN | NOTIFY,) * self.probe + (RUN | STORE,) * (self.num_blocks - self.probe)
        self._skip_rest = (0,) * (self.num_blocks - self.probe)

    def new_state(self) -> _ProbeState:
        return _ProbeState(self.num_blocks)

    def row(self, state) -> Sequence[int]:
        rule_state = state.rule_state
        rule_state.row[:] = self._start
        rule_state.outputs = []
        return rule_state.row

    def notify(self, state, i: int, out: Any) -> None:
        rule_state = state.rule_state
        rule_state.outputs.append(out)
        if i + 1 < self.probe:
            return
        if not self.decide(state, rule_state):
            rule_state.row[self.probe:] = self._skip_rest

    def decide(self, state, rule_state: _ProbeState) -> bool:
        """True: compute the remaining blocks at this step."""
        raise NotImplementedError


class FirstBlockCache(Rule):
    """FBCache / TeaCache-like: skip the remaining blocks while the first layer's residual barely changes.

    Every step the first layer's blocks are computed; if the relative L1
    change of the layer's residual on the main stream (its adapter's
    :meth:`~bac.LayerAdapter.main_residual`: for FLUX the image stream, as in
    diffusers) against the last fully computed step is at most ``threshold``, every other
    block stands in (its cached residual; their sum is the cached residual of
    the remaining layers, as in diffusers' ``FirstBlockCache``), otherwise the
    step runs in full.
    """

    name = "fbcache"

    def __init__(self, threshold: float = 0.05):
        check_number("threshold", threshold, 0.0)
        self.threshold = float(threshold)

    def bind(self, spec: ModelSpec, limit: int) -> BoundSchedule:
        return _FirstBlockCacheSchedule(self, spec, limit)


class _FirstBlockCacheSchedule(_WholeModelRule):
    def decide(self, state, rule_state: _ProbeState) -> bool:
        residual = self.main_residual(rule_state.outputs)
        if rule_state.reference is not None and relative_l1(residual, rule_state.reference) <= self.params["threshold"]:
            return False
        rule_state.reference = residual
        return True


class CGTaylor(Rule):
    """Confidence-gated Taylor forecasting of the whole model.

    The first layer is always computed. Its own Taylor forecast (order
    ``order``, from its values at fully computed steps) is compared with what
    it really computed: if the relative L1 error of the forecast layer
    residual on the main stream (as for :class:`FirstBlockCache`) is below ``gate``, every other
    block is forecast (by linearity, the sum of their forecasts is the Taylor
    forecast of the last block's output residual); otherwise the step runs in
    full and every history is updated. The first ``warmup`` steps run in full.
    """

    name = "cg-taylor"

    def __init__(self, gate: float = 0.05, order: int = 1, warmup: int = 2):
        check_number("gate", gate, 0.0)
        check_number("warmup", warmup, 1, integer=True)
        self.gate = float(gate)
        self.order = order
        self.warmup = warmup
        self.standin = Taylor(order)

    def bind(self, spec: ModelSpec, limit: int) -> BoundSchedule:
        return _CGTaylorSchedule(self, spec, limit)


class _CGTaylorSchedule(_WholeModelRule):
    def new_state(self) -> _ProbeState:
        state = super().new_state()
        state.reference = [TaylorSeries(self.params["order"]) for _ in range(self.probe)]
        return state

    def decide(self, state, rule_state: _ProbeState) -> bool:
        series = rule_state.reference
        if state.step >= self.params["warmup"]:
            forecast = self.main_residual([s.predict(state.step) for s in series])
            if relative_l1(forecast, self.main_residual(rule_state.outputs)) < self.params["gate"]:
                return False
        for s, out in zip(series, rule_state.outputs):
            s.update(state.step, out)
        return True


class Sortblock(Rule):
    """Recompute the blocks whose residuals change most; extrapolate the rest.

    Every ``interval`` steps (and during the first ``warmup`` steps) all
    blocks run, and each block's residual change per step since its previous
    computation (relative L1) is measured. In between, the ``fraction`` of
    blocks with the largest change is recomputed and the others are
    extrapolated linearly (``order=1``) or with a second-order Taylor series.
    """

    name = "sortblock"

    def __init__(self, fraction: float = 0.5, interval: int = 4, warmup: int = 2, order: int = 1):
        check_number("fraction", fraction, 0.0, 1.0)
        check_number("interval", interval, 1, integer=True)
        check_number("warmup", warmup, 1, integer=True)
        self.fraction = float(fraction)
        self.interval = interval
        self.warmup = warmup
        self.order = order
        self.standin = Taylor(order)

    def bind(self, spec: ModelSpec, limit: int) -> BoundSchedule:
        return _SortblockSchedule(self, spec, limit)


class _SortState:
    __slots__ = ("row", "last", "last_step", "change")

    def __init__(self, num_blocks: int):
        self.row: Sequence[int] = ()
        self.last: list = [None] * num_blocks
        self.last_step = [0] * num_blocks
        self.change = [math.inf] * num_blocks


class _SortblockSchedule(BoundSchedule):
    def __init__(self, rule: Sortblock, spec: ModelSpec, limit: int):
        self.name, self.params, self.limit = rule.name, rule.params, limit
        self.num_blocks = len(spec.blocks)
        self.recomputed = math.ceil(rule.fraction * self.num_blocks)
        self._full = (RUN | STORE | NOTIFY,) * self.num_blocks

    def new_state(self) -> _SortState:
        return _SortState(self.num_blocks)

    def row(self, state) -> Sequence[int]:
        rule_state, step = state.rule_state, state.step
        warmup, interval = self.params["warmup"], self.params["interval"]
        if step < warmup or (step - warmup) % interval == 0:
            rule_state.row = self._full
        elif (step - warmup) % interval == 1:  # first step after a full one: re-rank
            ranked = sorted(range(self.num_blocks), key=lambda i: (-rule_state.change[i], i))
            chosen = set(ranked[: self.recomputed])
            rule_state.row = tuple(RUN | STORE | NOTIFY if i in chosen else 0 for i in range(self.num_blocks))
        return rule_state.row

    def notify(self, state, i: int, out: Any) -> None:
        rule_state = state.rule_state
        if rule_state.last[i] is not None:
            distance = state.step - rule_state.last_step[i]
            rule_state.change[i] = relative_l1(out, rule_state.last[i]) / distance
        rule_state.last[i], rule_state.last_step[i] = out, state.step
