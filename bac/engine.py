"""The caching engine: routes every block through a runner that computes or stands in.

Hot path. A forward pre-hook on the denoiser advances the step counter of the
active context and asks the schedule (:mod:`bac.rules`) for that step's row of
actions, one bit set per block: ``RUN``, ``STORE`` (a later step stands in for
this value) and ``NOTIFY`` (a runtime rule looks at the value). Each block's
runner then does one list lookup: compute the block, or return the stand-in's
value (the stored residual, or a forecast, see :mod:`bac.forecast`). For a
static plan nothing is allocated or decided on the host from tensor values, so
every policy call costs the same and latency percentiles stay tight.

State. Each *context* (``"default"``, or one per classifier-free-guidance
branch via :meth:`CacheHandle.context`) has its own step counter, cache and
rule state. :meth:`CacheHandle.new_trajectory` (or :func:`new_trajectory` on
the model) marks the start of a sampling call and clears every context.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .adapters import LayerAdapter, ModelSpec, describe
from .forecast import REUSE, Reuse, Taylor
from .plan import Plan
from .rules import NOTIFY, RUN, STORE, AlwaysCompute, BoundSchedule, Rule, StaticRows, actions_from_table

# observer(block_index, fn, args, kwargs) -> output; used by calibration and FLOP counting.
Observer = Callable[[int, Callable[..., Any], tuple, dict], Any]


class StepOverflowError(RuntimeError):
    """The denoiser ran more steps in one sampling call than the schedule covers."""


class _Context:
    __slots__ = ("name", "schedule", "step", "row", "cache", "rule_state", "computed", "skipped")

    def __init__(self, name: str, schedule: BoundSchedule, num_blocks: int):
        self.name = name
        self.schedule = schedule
        self.computed = [0] * num_blocks
        self.skipped = [0] * num_blocks
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.row = None
        self.cache: list[Any] = [None] * len(self.computed)
        self.rule_state = self.schedule.new_state()


class CacheHandle:
    """An accelerated model: statistics, trajectory control, and :meth:`remove`.

    Made by :func:`accelerate`; usable as a context manager that removes itself.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        schedule: BoundSchedule,
        standin: Reuse | Taylor = REUSE,
        plan: Plan | None = None,
        observer: Observer | None = None,
    ):
        if getattr(model, "_bac_handle", None) is not None:
            raise RuntimeError(f"{type(model).__name__} is already accelerated; call handle.remove() first")
        self.model = model
        self.spec = spec
        self.schedule = schedule
        self.standin = standin
        self.plan = plan
        self.observer = observer
        self._contexts: dict[str, _Context] = {}
        self.state = self._context_state("default")
        self._trajectories = 0
        self._calls = 0
        self._fresh = True
        self._mark = self._counts()
        self.block_flops: list[int] | None = None
        self.call_flops: int | None = None

        runners = [self._make_runner(i) for i in range(len(spec.blocks))]
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
        self._hook = model.register_forward_pre_hook(self._advance)
        model._bac_handle = self

    # -- hot path --------------------------------------------------------------------
    def _make_runner(self, i: int) -> Callable[..., Any]:
        handle = self
        store, fill = self.standin.store, self.standin.fill  # fixed for the handle's lifetime

        def run(fn, *args, **kwargs):
            state = handle.state
            action = state.row[i]
            if action & RUN:
                observer = handle.observer
                out = fn(*args, **kwargs) if observer is None else observer(i, fn, args, kwargs)
                if action & STORE:
                    store(state.cache, i, state.step, out)
                if action & NOTIFY:
                    state.schedule.notify(state, i, out)
                state.computed[i] += 1
                return out
            state.skipped[i] += 1
            return fill(state.cache, i, state.step)

        return run

    def _advance(self, module: nn.Module, args: tuple) -> None:
        state = self.state
        step = state.step + 1
        if step >= state.schedule.limit:
            raise StepOverflowError(
                f"the schedule covers {state.schedule.limit} denoising steps but step {step + 1} was requested "
                f"in context {state.name!r}: mark each sampling call with handle.new_trajectory() "
                "(or bac.new_trajectory(model)), give each classifier-free-guidance branch its own "
                "handle.context(name), or make the schedule for this sampler's step count"
            )
        state.step = step
        state.row = state.schedule.row(state)
        self._calls += 1
        if self._fresh:
            self._fresh = False
            self._trajectories += 1

    # -- control ---------------------------------------------------------------------
    def _context_state(self, name: str) -> _Context:
        if name not in self._contexts:
            self._contexts[name] = _Context(name, self.schedule, len(self.spec.blocks))
        return self._contexts[name]

    def new_trajectory(self) -> None:
        """Start a new sampling call: every context restarts at step 0 with an empty cache."""
        for state in self._contexts.values():
            state.reset()
        self._fresh = True
        self._mark = self._counts()

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Run denoiser calls with the separate cache state ``name`` (e.g. one per CFG branch)."""
        previous = self.state
        self.state = self._context_state(name)
        try:
            yield
        finally:
            self.state = previous

    @property
    def step(self) -> int:
        """Step index of the last denoiser call in the active context (-1 before the first)."""
        return self.state.step

    def steps_run(self) -> dict[str, int]:
        """Denoiser calls of the current trajectory, per context that ran any."""
        return {name: state.step + 1 for name, state in self._contexts.items() if state.step >= 0}

    def remove(self) -> None:
        """Restore the model exactly as it was."""
        if getattr(self.model, "_bac_handle", None) is not self:
            return
        for _, layer, adapter in self.spec.layers:
            adapter.uninstall(layer)
        self._hook.remove()
        del self.model._bac_handle
        for state in self._contexts.values():
            state.reset()

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

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

        saved = (self.state, self.observer, self._fresh, self._trajectories, self._calls)
        self.state = _Context("flops", AlwaysCompute(len(counts)), len(counts))
        self.observer = count
        try:
            with FlopCounterMode(display=False) as mode, torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            self.state, self.observer, self._fresh, self._trajectories, self._calls = saved
        self.block_flops = counts
        self.call_flops = mode.get_total_flops()
        return {block.name: c for block, c in zip(self.spec.blocks, counts)} | {"total": self.call_flops}

    def _counts(self) -> tuple[list[int], list[int], int, int]:
        computed = [sum(c) for c in zip(*(s.computed for s in self._contexts.values()))]
        skipped = [sum(c) for c in zip(*(s.skipped for s in self._contexts.values()))]
        return computed, skipped, self._trajectories, self._calls

    def stats(self) -> dict:
        """What ran and what was skipped, per block and per sampling call, and FLOPs saved."""
        computed, skipped, trajectories, calls = self._counts()
        mark_computed, mark_skipped, _, mark_calls = self._mark
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
                "denoiser_calls": calls - mark_calls,
                "computed": total_computed - sum(mark_computed),
                "skipped": total_skipped - sum(mark_skipped),
            },
            "per_block": {
                block.name: {"kind": block.kind, "layer": block.layer, "computed": c, "skipped": s}
                for block, c, s in zip(self.spec.blocks, computed, skipped)
            },
        }
        if self.block_flops is not None:
            block_total = sum(self.block_flops)
            non_block = self.call_flops - block_total
            executed = calls * non_block + sum(c * f for c, f in zip(computed, self.block_flops))
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
    schedule: "Plan | Rule | Method",
    *,
    forecast: Reuse | Taylor | None = None,
    num_steps: int | None = None,
    scheduler: Any = None,
    adapters: Mapping[type, LayerAdapter] | None = None,
) -> CacheHandle:
    """Cache ``model``'s blocks; returns a :class:`CacheHandle`.

    ``schedule`` says when each block runs: a :class:`bac.Plan` (static), a
    runtime rule (:class:`bac.FirstBlockCache`, :class:`bac.CGTaylor`,
    :class:`bac.Sortblock`), or a :class:`bac.Method` built by name with
    :func:`bac.build_method`, which carries its own stand-in. ``forecast`` says
    what stands in for a skipped block: the last value (default) or
    :class:`bac.Taylor`.

    ``num_steps`` and ``scheduler`` (the sampler's step count and scheduler, or
    its description) are checked against what a plan was made for; a runtime
    rule needs ``num_steps`` so that a sampling call that runs longer (a missed
    :func:`new_trajectory`, CFG branches sharing one context) is an error.
    Call ``handle.new_trajectory()`` (or ``bac.new_trajectory(model)``) at the
    start of every sampling call; ``handle.remove()`` undoes everything.
    """
    from .methods import Method

    if isinstance(schedule, Method):
        if forecast is not None:
            raise ValueError(f"method {schedule.name!r} already has its stand-in ({schedule.forecast!r})")
        schedule, forecast = schedule.schedule, schedule.forecast
    spec = describe(model, adapters)
    if isinstance(schedule, Plan):
        schedule.check_fits(spec, num_steps=num_steps, scheduler=scheduler)
        standin = forecast or REUSE
        rows = actions_from_table(schedule.step_table(), standin.keeps_history)
        bound = StaticRows(rows, schedule.num_steps, schedule.method, schedule.params)
        return CacheHandle(model, spec, bound, standin, plan=schedule)
    if isinstance(schedule, Rule):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"a runtime rule ({schedule.name}) needs num_steps, the sampler's step count")
        standin = forecast or schedule.forecast or REUSE
        return CacheHandle(model, spec, schedule.bind(spec, num_steps), standin)
    raise TypeError(f"schedule must be a bac.Plan, a runtime rule or a bac.Method, not {type(schedule).__name__}")


def new_trajectory(model: nn.Module) -> None:
    """Mark the start of a sampling call on ``model``; does nothing if it is not accelerated.

    Policies call this at the top of their sampling function so that caching
    needs no other cooperation from the caller.
    """
    handle = getattr(model, "_bac_handle", None)
    if handle is not None:
        handle.new_trajectory()
