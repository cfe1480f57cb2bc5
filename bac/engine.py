"""The caching engine: routes every block through a runner that computes or stands in.

A forward pre-hook on the denoiser advances the step counter of the active context and takes that step's
row of actions from the schedule (:mod:`bac.actions`); each block's runner then computes the block or returns
the stand-in's value (:mod:`bac.standins`). State is per thread and per context (one per
classifier-free-guidance branch), cleared by :func:`new_trajectory`; the batch shape and the number of
denoiser calls per sampling call are checked (:class:`bac.CacheStateError`). How it works, and what each
check catches: docs/guide/core.md ("Inside the engine").
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .actions import NOTIFY, RUN, STORE, AlwaysCompute, BoundSchedule, StaticRows, actions_from_table
from .adapters import LayerAdapter, ModelSpec, describe
from .checks import check_number
from .errors import CacheStateError
from .flops import executed_flops
from .methods import Method
from .plan import Plan
from .rules import Rule
from .standins import REUSE, Standin, make_standin

# observer(block_index, fn, args, kwargs) -> output; used by calibration and FLOP counting.
Observer = Callable[[int, Callable[..., Any], tuple, dict], Any]
# tap(block_index, step, output, computed) -> None: sees the output every block hands on, computed or stood in.
Tap = Callable[[int, int, Any, bool], None]


class StepOverflowError(CacheStateError):
    """The denoiser ran more steps in one sampling call than the schedule covers."""


class _Context:
    __slots__ = ("name", "schedule", "step", "row", "cache", "rule_state", "computed", "skipped", "shape", "done")

    def __init__(self, name: str, schedule: BoundSchedule, num_blocks: int):
        self.name = name
        self.schedule = schedule
        # Per-block totals. A static schedule's runners count nothing: its trajectories are folded in
        # here from the rows they ran when they end (reset); a runtime rule's runners count each block.
        self.computed = [0] * num_blocks
        self.skipped = [0] * num_blocks
        self.step = -1
        self.reset()

    def counts(self) -> tuple[list[int], list[int]]:
        """Computed and skipped totals per block, the current trajectory included (for a static schedule,
        from its rows: a step interrupted inside the model counts as run whole)."""
        if not self.schedule.static or self.step < 0:
            return self.computed, self.skipped
        computed, skipped = self.schedule.ran(self.step + 1)
        return [a + b for a, b in zip(self.computed, computed)], [a + b for a, b in zip(self.skipped, skipped)]

    def reset(self) -> None:
        if self.schedule.static and self.step >= 0:
            self.computed, self.skipped = self.counts()
        self.step = -1
        self.done = -1  # step of the last denoiser call that returned (an interrupted call leaves it behind)
        self.shape = None  # the first tensor input's shape at step 0: what the cached values are for
        self.row = None
        self.cache: list[Any] = [None] * len(self.computed)
        self.rule_state = self.schedule.new_state()


class _ThreadRecord:
    """One thread's contexts and call counters (kept for the handle's statistics)."""

    __slots__ = ("contexts", "fresh", "closed", "trajectories", "calls", "mark")

    def __init__(self):
        self.contexts: dict[str, _Context] = {}
        self.fresh = True
        self.closed = False  # the current trajectory's length was checked (end_trajectory)
        self.trajectories = 0
        self.calls = 0
        self.mark = ([], [], 0, 0)


class _PerThread(threading.local):
    """What the hot path reads: the calling thread's active context and observer."""

    def __init__(self, handle: "CacheHandle"):
        self.record = _ThreadRecord()
        self.observer = handle.observer
        with handle._lock:
            handle._records.append(self.record)
        self.state = handle._context_state("default", self.record)
        self.record.mark = handle._counts([self.record])


class CacheHandle:
    """An accelerated model: statistics, trajectory control, and :meth:`remove`.

    Made by :func:`accelerate`; usable as a context manager that removes itself.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        schedule: BoundSchedule,
        standin: Standin = REUSE,
        plan: Plan | None = None,
        observer: Observer | None = None,
        tap: Tap | None = None,
    ):
        if getattr(model, "_bac_handle", None) is not None:
            raise RuntimeError(f"{type(model).__name__} is already accelerated; call handle.remove() first")
        self.model = model
        self.spec = spec
        self.schedule = schedule
        self.standin = standin
        self.plan = plan
        self.observer = observer
        self.tap = tap
        self._lock = threading.Lock()
        self._records: list[_ThreadRecord] = []
        self._local = _PerThread(self)
        self.block_flops: list[int] | None = None
        self.call_flops: int | None = None

        runners = [self._make_runner(i) for i in range(len(spec.blocks))]
        if tap is not None:  # wrapped only when asked for: the plain runners stay the hot path
            runners = [self._tapped(i, runner) for i, runner in enumerate(runners)]
        start, installed = 0, []
        try:
            for _, layer, adapter in spec.layers:
                end = start + len(adapter.branches)
                adapter.install(layer, runners[start:end])
                installed.append((layer, adapter))
                start = end
        except BaseException:
            for layer, adapter in installed:  # leave the model as it was
                adapter.uninstall(layer)
            raise
        self._hook = model.register_forward_pre_hook(self._advance, with_kwargs=True)
        self._done_hook = model.register_forward_hook(self._finish)
        model._bac_handle = self

    # -- hot path --------------------------------------------------------------------
    def _make_runner(self, i: int) -> Callable[..., Any]:
        """Block ``i``'s runner: ``runner(fn, *args, **kwargs)`` computes ``fn`` or stands in for it.

        ``runner.gated(apply, fn, *args, **kwargs)`` is for a branch whose output is
        ``apply(fn(...))`` with ``apply`` known exactly at every step (an adaLN gate of the
        timestep): it returns ``apply`` of the computed value or, at a skipped step, of the
        stand-in's value when the stand-in forecasts (:attr:`bac.Taylor.recomputes_gate`);
        reuse returns the gated value last handed on, as every reuse cache does. Rules,
        taps and observers always see the gated value, what the block hands on.
        """
        local = self._local
        store, fill = self.standin.store, self.standin.fill  # fixed for the handle's lifetime
        ungated = getattr(self.standin, "recomputes_gate", False)

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

        def stand_in(apply, state):
            value = fill(state.cache, i, state.step)
            return apply(value) if ungated and apply is not None else value

        if self.schedule.static:  # rows never NOTIFY; counts come from the rows (_Context.counts)
            def run_static_gated(apply, fn, *args, **kwargs):
                state = local.state
                action = state.row[i]
                if action & RUN:
                    if local.observer is None:  # the hot path: no call beyond the block's own
                        raw = fn(*args, **kwargs)
                        out = raw if apply is None else apply(raw)
                    else:
                        raw, out = observed(apply, fn, args, kwargs)
                    if action & STORE:
                        store(state.cache, i, state.step, raw if ungated else out)
                    return out
                return stand_in(apply, state)

            def run_static(fn, *args, **kwargs):
                return run_static_gated(None, fn, *args, **kwargs)

            run_static.gated = run_static_gated
            return run_static

        def run_gated(apply, fn, *args, **kwargs):
            state = local.state
            action = state.row[i]
            if action & RUN:
                if local.observer is None:  # the hot path: no call beyond the block's own
                    raw = fn(*args, **kwargs)
                    out = raw if apply is None else apply(raw)
                else:
                    raw, out = observed(apply, fn, args, kwargs)
                if action & STORE:
                    store(state.cache, i, state.step, raw if ungated else out)
                if action & NOTIFY:
                    state.schedule.notify(state, i, out)
                state.computed[i] += 1
                return out
            state.skipped[i] += 1
            return stand_in(apply, state)

        def run(fn, *args, **kwargs):
            return run_gated(None, fn, *args, **kwargs)

        run.gated = run_gated
        return run

    def _tapped(self, i: int, runner: Callable[..., Any]) -> Callable[..., Any]:
        local, tap = self._local, self.tap

        def run_tapped_gated(apply, fn, *args, **kwargs):
            out = runner.gated(apply, fn, *args, **kwargs)
            state = local.state
            tap(i, state.step, out, bool(state.row[i] & RUN))
            return out

        def run_tapped(fn, *args, **kwargs):
            return run_tapped_gated(None, fn, *args, **kwargs)

        run_tapped.gated = run_tapped_gated
        return run_tapped

    def _advance(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        local = self._local
        state = local.state
        step = state.step + 1
        if step >= state.schedule.limit:
            raise StepOverflowError(
                f"the schedule covers {state.schedule.limit} denoising steps but step {step + 1} was requested "
                f"in context {state.name!r}: mark each sampling call with handle.new_trajectory() "
                "(or bac.new_trajectory(model)), give each classifier-free-guidance branch its own "
                "handle.context(name), or make the schedule for this sampler's step count"
            )
        shape = _input_shape(args, kwargs)
        if step == 0:
            state.shape = shape
        elif shape != state.shape:
            expected = state.shape
            self._restart(local.record)  # the cached values are unusable; the next call starts afresh
            raise CacheStateError(
                f"the denoiser's input has shape {_shape_text(shape)} at step {step} of this sampling call "
                f"(context {state.name!r}), but the call started with shape {_shape_text(expected)}, which the "
                "cached block outputs are for (another batch size in the middle of a trajectory?). Call "
                "handle.new_trajectory() (or bac.new_trajectory(model)) at the start of every sampling call; "
                "this thread's cache has been cleared"
            )
        state.step = step
        state.row = state.schedule.row(state)
        record = local.record
        record.calls += 1
        if record.fresh:
            record.fresh = False
            record.trajectories += 1

    def _finish(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._local.state
        state.done = state.step  # this call returned: a trajectory that stops here ended, not broke off

    # -- control ---------------------------------------------------------------------
    def _context_state(self, name: str, record: _ThreadRecord | None = None) -> _Context:
        contexts = (record or self._local.record).contexts
        if name not in contexts:
            contexts[name] = _Context(name, self.schedule, len(self.spec.blocks))
        return contexts[name]

    def _restart(self, record: _ThreadRecord) -> None:
        for state in record.contexts.values():
            state.reset()
        record.fresh = True
        record.closed = False
        record.mark = self._counts([record])

    def _short_runs(self, record: _ThreadRecord) -> dict[str, int]:
        """Contexts of ``record``'s trajectory that ran 1 to K-1 steps of a K-step plan, and did not break off."""
        if record.closed or not self.schedule.exact_length:
            return {}
        limit = self.schedule.limit
        return {name: s.step + 1 for name, s in record.contexts.items() if 0 <= s.step < limit - 1 and s.done == s.step}

    def _short_error(self, short: dict[str, int], when: str) -> CacheStateError:
        ran = ", ".join(f"{n} in context {name!r}" for name, n in short.items())
        return CacheStateError(
            f"{when} ran {ran} of the plan's {self.schedule.limit} denoising steps, so only the plan's first rows "
            "were used: the sampler runs fewer steps than the plan was made for. Make the plan for this sampler's "
            "step count, and pass num_steps= (the sampler's step count) to bac.accelerate to check it up front"
        )

    def new_trajectory(self) -> None:
        """Start a new sampling call in this thread: every context restarts at step 0 with an empty cache.

        Raises :class:`bac.CacheStateError` if the previous call ran fewer
        denoiser calls than a static plan covers (docs/guide/core.md, "Inside the engine");
        the new call has started all the same, so a retry goes through.
        """
        record = self._local.record
        short = self._short_runs(record)
        self._restart(record)
        if short:
            raise self._short_error(short, "the previous sampling call")

    def end_trajectory(self) -> None:
        """Mark the end of this thread's sampling call and check its length now.

        Raises :class:`bac.CacheStateError` if a context ran fewer denoiser calls
        than the plan covers; either way the call counts as checked, so the next
        :meth:`new_trajectory` or :meth:`remove` does not report it again. The
        cached values stay until the next :meth:`new_trajectory`. Optional:
        without it the check happens at the next ``new_trajectory`` or ``remove``.
        """
        record = self._local.record
        short = self._short_runs(record)
        record.closed = True
        if short:
            raise self._short_error(short, "this sampling call")

    def reschedule(self, schedule: Plan | Rule | Method, *, num_steps: int | None = None, scheduler: Any = None,
                   allow_other_weights: bool = False) -> None:
        """Use ``schedule`` (e.g. the same method made for another step count) from the next sampling call on.

        Checked as :func:`accelerate` checks it. Every thread's trajectory restarts (call it between
        sampling calls); the statistics so far are kept. The stand-in must be the one the handle was
        made with, and a static plan cannot replace a runtime rule or the reverse (the runners are
        built for one of them): remove the handle and accelerate again for that.
        """
        bound, chosen, plan = _bind(self.spec, schedule, None, num_steps, scheduler, allow_other_weights)
        if chosen.describe() != self.standin.describe() or bound.static != self.schedule.static:
            raise ValueError(
                f"reschedule keeps the handle's stand-in ({self.standin.describe()['standin']}) and "
                f"{'static plan' if self.schedule.static else 'runtime rule'}; got "
                f"{chosen.describe()['standin']} and {'a static plan' if bound.static else 'a runtime rule'}: "
                "remove the handle and call bac.accelerate instead"
            )
        with self._lock:
            for record in self._records:
                for state in record.contexts.values():
                    state.reset()  # folds the finished trajectory's counts in under the old schedule
                    state.schedule = bound
                    state.rule_state = bound.new_state()
                record.fresh, record.closed = True, False
            self.schedule, self.plan = bound, plan

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Run this thread's denoiser calls with the separate cache state ``name`` (e.g. one per CFG branch)."""
        local = self._local
        previous = local.state
        local.state = self._context_state(name)
        try:
            yield
        finally:
            local.state = previous

    def drop_context(self, name: str) -> bool:
        """Forget this thread's context ``name`` and its cached values (a server's disconnected client).

        Contexts otherwise live as long as their thread, so a long-running server that names one per
        client would keep every departed client's cache. Its block counts stay in :meth:`stats` (added
        to this thread's ``"default"`` context). Returns whether the context existed; dropping the
        active context or ``"default"`` is an error.
        """
        local = self._local
        if name == "default" or name == local.state.name:
            raise ValueError(f"cannot drop context {name!r}: it is "
                             f"{'the default context' if name == 'default' else 'active in this thread'}")
        record = local.record
        state = record.contexts.get(name)
        if state is None:
            return False
        computed, skipped = state.counts()
        default = self._context_state("default", record)
        default.computed = [a + b for a, b in zip(default.computed, computed)]
        default.skipped = [a + b for a, b in zip(default.skipped, skipped)]
        del record.contexts[name]
        return True

    @property
    def active_context(self) -> str:
        """Name of this thread's active context."""
        return self._local.state.name

    @property
    def step(self) -> int:
        """Step index of this thread's last denoiser call in its active context (-1 before the first)."""
        return self._local.state.step

    def steps_run(self) -> dict[str, int]:
        """Denoiser calls of this thread's current trajectory, per context that ran any."""
        return {name: state.step + 1 for name, state in self._local.record.contexts.items() if state.step >= 0}

    def remove(self) -> None:
        """Restore the model exactly as it was.

        Then raises :class:`bac.CacheStateError` if this thread's last sampling
        call ran fewer denoiser calls than the plan covers (the model is
        restored all the same). Leaving ``with accelerate(...)`` on an
        exception restores without that check, so the exception is not masked.
        """
        self._remove(check=True)

    def _remove(self, check: bool) -> None:
        if getattr(self.model, "_bac_handle", None) is not self:
            return
        short = self._short_runs(self._local.record) if check else {}
        for _, layer, adapter in self.spec.layers:
            adapter.uninstall(layer)
        self._hook.remove()
        self._done_hook.remove()
        del self.model._bac_handle
        for record in self._records:
            for state in record.contexts.values():
                state.reset()
        if short:
            raise self._short_error(short, "the last sampling call")

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._remove(check=exc_type is None)

    # -- measurement -----------------------------------------------------------------
    def measure_flops(self, *args, **kwargs) -> dict[str, int]:
        """Count FLOPs of one full denoiser call per block (``torch.utils.flop_counter``).

        Runs the model once on ``args``/``kwargs`` with every block computed, in a
        scratch context, so the current trajectory is not disturbed.
        """
        counts = [0] * len(self.spec.blocks)

        def count(i, fn, fn_args, fn_kwargs):
            before = mode.get_total_flops()
            out = fn(*fn_args, **fn_kwargs)
            counts[i] += mode.get_total_flops() - before
            return out

        local, record = self._local, self._local.record
        saved = (local.state, local.observer, record.fresh, record.trajectories, record.calls)
        local.state = _Context("flops", AlwaysCompute(len(counts)), len(counts))
        local.observer = count
        try:
            with FlopCounterMode(display=False) as mode, torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            local.state, local.observer, record.fresh, record.trajectories, record.calls = saved
        self.block_flops = counts
        self.call_flops = mode.get_total_flops()
        return {block.name: c for block, c in zip(self.spec.blocks, counts)} | {"total": self.call_flops}

    def _counts(self, records: list[_ThreadRecord] | None = None) -> tuple[list[int], list[int], int, int]:
        records = list(self._records) if records is None else records
        counts = [s.counts() for r in records for s in r.contexts.values()]
        num_blocks = len(self.spec.blocks)
        computed = [sum(c) for c in zip(*(c for c, _ in counts))] or [0] * num_blocks
        skipped = [sum(c) for c in zip(*(s for _, s in counts))] or [0] * num_blocks
        return computed, skipped, sum(r.trajectories for r in records), sum(r.calls for r in records)

    def stats(self) -> dict:
        """What ran and what was skipped, per block and per sampling call (all threads), and FLOPs saved.

        ``last_call`` is the calling thread's current (or last) sampling call.
        """
        computed, skipped, trajectories, calls = self._counts()
        record = self._local.record
        this_computed, this_skipped, _, this_calls = self._counts([record])
        mark_computed, mark_skipped, _, mark_calls = record.mark
        total_computed, total_skipped = sum(computed), sum(skipped)
        evaluations = total_computed + total_skipped
        stats: dict[str, Any] = {
            "method": self.schedule.name,
            "params": dict(self.schedule.params),
            **self.standin.describe(),
            "num_steps": self.schedule.limit if self.schedule.limit < sys.maxsize else None,
            "num_blocks": len(computed),
            "sampling_calls": trajectories,
            "denoiser_calls": calls,
            "computed": total_computed,
            "skipped": total_skipped,
            "skipped_share": total_skipped / evaluations if evaluations else 0.0,
            "last_call": {
                "denoiser_calls": this_calls - mark_calls,
                "computed": sum(this_computed) - sum(mark_computed),
                "skipped": sum(this_skipped) - sum(mark_skipped),
            },
            "per_block": {
                block.name: {"kind": block.kind, "layer": block.layer, "computed": c, "skipped": s}
                for block, c, s in zip(self.spec.blocks, computed, skipped)
            },
        }
        if self.block_flops is not None:
            block_total = sum(self.block_flops)
            non_block = self.call_flops - block_total
            executed = executed_flops(self.call_flops, self.block_flops, computed, calls)
            full = calls * self.call_flops
            stats["flops"] = {
                "per_call_full": self.call_flops,
                "per_call_blocks": block_total,
                "per_call_non_block": non_block,
                "per_block": dict(zip((b.name for b in self.spec.blocks), self.block_flops)),
                "executed": executed,
                "full": full,
                "saved_share": 1 - executed / full if full else 0.0,
                "ideal_speedup": full / executed if executed else 1.0,
            }
        return stats

    def summary(self) -> str:
        """The statistics as a short human-readable report."""
        s = self.stats()
        lines = [
            f"bac [{s['method']}] {s['num_blocks']} blocks, {s['num_steps'] or '?'} steps per sampling call",
            f"  sampling calls {s['sampling_calls']}, denoiser calls {s['denoiser_calls']}",
            f"  block evaluations: computed {s['computed']}, skipped {s['skipped']} "
            f"({100 * s['skipped_share']:.1f}% skipped); last call computed {s['last_call']['computed']}, "
            f"skipped {s['last_call']['skipped']}",
        ]
        if "flops" in s:
            f = s["flops"]
            lines.append(
                f"  FLOPs per denoiser call {f['per_call_full'] / 1e6:.1f} M "
                f"({100 * f['per_call_blocks'] / max(f['per_call_full'], 1):.1f}% in blocks); "
                f"saved {100 * f['saved_share']:.1f}%, ideal speedup {f['ideal_speedup']:.2f}x"
            )
        width = max(len(name) for name in s["per_block"])
        for name, b in s["per_block"].items():
            lines.append(f"    {name:<{width}}  {b['kind']:<3}  computed {b['computed']:>6}  skipped {b['skipped']:>6}")
        return "\n".join(lines)


def accelerate(
    model: nn.Module,
    schedule: Plan | Rule | Method,
    *,
    standin: str | Standin | None = None,
    num_steps: int | None = None,
    scheduler: Any = None,
    adapters: Mapping[type, LayerAdapter] | None = None,
    allow_other_weights: bool = False,
    tap: Tap | None = None,
) -> CacheHandle:
    """Cache ``model``'s blocks; returns a :class:`CacheHandle`.

    ``schedule`` says when each block runs: a :class:`bac.Plan` (static), a
    runtime rule (:class:`bac.FirstBlockCache`, :class:`bac.CGTaylor`,
    :class:`bac.Sortblock`), or a :class:`bac.Method` built by name with
    :func:`bac.build_method`, which carries its own stand-in. ``standin`` says
    what stands in for a skipped block of a plan or rule: the last value
    (default, ``"reuse"``) or a Taylor forecast (``"taylor-1"``, ``"taylor-2"``,
    :class:`bac.Taylor`).

    ``num_steps`` and ``scheduler`` (the sampler's step count and scheduler, or
    its description) are checked against what a plan was made for; a runtime
    rule needs ``num_steps`` so that a sampling call that runs longer (a missed
    :func:`new_trajectory`, CFG branches sharing one context) is an error.
    Without ``num_steps``, a sampler that runs fewer steps than a plan covers
    is reported when its sampling call is over (docs/guide/core.md, "Inside the engine").
    Call ``handle.new_trajectory()`` (or ``bac.new_trajectory(model)``) at the
    start of every sampling call; ``handle.remove()`` undoes everything.

    A plan made from a calibration must be applied to the weights it was
    calibrated on (their digest is compared; the weights are hashed once per call
    of ``accelerate``), else
    :class:`bac.PlanMismatchError`; ``allow_other_weights=True`` applies it
    anyway (e.g. a plan calibrated on one checkpoint, knowingly reused for a
    fine-tuned one). Uncalibrated plans (``every-step``, ``uniform``,
    ``taylorseer``) fit any weights.

    ``tap(block_index, step, output, computed)``, for inspection (e.g. the
    error of every block's output against full computation,
    :mod:`benchmarks.block_errors`), is called after every block
    evaluation with the output the block hands on to the model: the value it
    computed (``computed=True``) or its stand-in's value at a skipped step
    (``computed=False``). ``step`` is the step index in the calling thread's
    active context (:attr:`CacheHandle.active_context` names it; every
    context is tapped, :meth:`CacheHandle.measure_flops`' scratch context
    ``"flops"`` too). The tap must not modify ``output``. Without a tap the
    runners are not wrapped, so it costs nothing when unused.
    """
    spec = describe(model, adapters)
    bound, chosen, plan = _bind(spec, schedule, standin, num_steps, scheduler, allow_other_weights)
    return CacheHandle(model, spec, bound, chosen, plan=plan, tap=tap)


def _bind(spec: ModelSpec, schedule: Plan | Rule | Method, standin: str | Standin | None, num_steps: int | None,
          scheduler: Any, allow_other_weights: bool) -> tuple[BoundSchedule, Standin, Plan | None]:
    """The bound schedule, stand-in and plan (if static) of ``schedule`` on ``spec``, every fit checked."""
    if isinstance(schedule, Method):
        if standin is not None:
            raise ValueError(f"method {schedule.name!r} already has its stand-in ({schedule.standin!r})")
        schedule, standin = schedule.schedule, schedule.standin
    if isinstance(schedule, Plan):
        schedule.check_fits(spec, num_steps=num_steps, scheduler=scheduler, allow_other_weights=allow_other_weights)
        chosen = make_standin(standin or REUSE)
        rows = actions_from_table(schedule.step_table(), chosen.keeps_history)
        return StaticRows(rows, schedule.num_steps, schedule.method, schedule.params), chosen, schedule
    if isinstance(schedule, Rule):
        check_number(f"num_steps (a runtime rule, {schedule.name}, needs the sampler's step count)", num_steps, 1,
                     integer=True)
        chosen = make_standin(standin or schedule.standin or REUSE)
        return schedule.bind(spec, num_steps), chosen, None
    raise TypeError(f"schedule must be a bac.Plan, a runtime rule or a bac.Method, not {type(schedule).__name__}")


def _input_shape(args: tuple, kwargs: dict) -> torch.Size | None:
    """Shape of a denoiser call's first tensor argument (positional, else keyword); ``None`` if it has none."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value.shape
    return None


def _shape_text(shape: torch.Size | None) -> str:
    return "(no tensor)" if shape is None else str(list(shape))


def get_handle(model: nn.Module) -> CacheHandle | None:
    """The :class:`CacheHandle` accelerating ``model``, or ``None`` if it is not accelerated."""
    return getattr(model, "_bac_handle", None)


def new_trajectory(model: nn.Module) -> None:
    """Mark the start of a sampling call on ``model``; does nothing if it is not accelerated.

    Policies call this at the top of their sampling function so that caching
    needs no other cooperation from the caller. Raises
    :class:`bac.CacheStateError` if the previous call ran fewer steps than the
    plan covers (:meth:`CacheHandle.new_trajectory`).
    """
    handle = get_handle(model)
    if handle is not None:
        handle.new_trajectory()
