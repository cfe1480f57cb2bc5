"""The caching engine: routes every block through a runner that computes or reuses.

Hot path. A forward pre-hook on the denoiser advances the step counter of the
active context and points it at that step's precomputed row of actions (one per
block: REUSE, COMPUTE, or COMPUTE_AND_STORE). Each block's runner then does one
list lookup: return the stored residual, or compute it and, only if the next
step reuses it, store it. Storing only then matters on CPU: a retained output
cannot be recycled by the allocator, which costs more than the bookkeeping.
Nothing is allocated, decided on the host from tensor values, or scanned per
step, so every policy call costs the same and latency percentiles stay tight.

State. Each *context* (``"default"``, or one per classifier-free-guidance
branch via :meth:`CacheHandle.context`) has its own step counter and cache.
:meth:`CacheHandle.new_trajectory` (or :func:`new_trajectory` on the model)
marks the start of a sampling call and clears every context.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .adapters import LayerAdapter, ModelSpec, describe
from .plan import Plan

# observer(block_index, fn, args, kwargs) -> output; used by calibration and FLOP counting.
Observer = Callable[[int, Callable[..., Any], tuple, dict], Any]


REUSE, COMPUTE, COMPUTE_AND_STORE = 0, 1, 2


def actions_from_table(table: Sequence[Sequence[bool]]) -> tuple[tuple[int, ...], ...]:
    """Per step and block: reuse, compute, or compute and store because the next step reuses."""
    rows = []
    for k, row in enumerate(table):
        following = table[k + 1] if k + 1 < len(table) else row
        rows.append(tuple(COMPUTE_AND_STORE if run and not following[i] else int(run) for i, run in enumerate(row)))
    return tuple(rows)


class StepOverflowError(RuntimeError):
    """The denoiser ran more steps in one sampling call than the plan covers."""


class _Context:
    __slots__ = ("name", "rows", "limit", "step", "row", "cache", "computed", "skipped")

    def __init__(self, name: str, rows: Sequence[Sequence[int]], limit: int, num_blocks: int):
        self.name = name
        self.rows = rows
        self.limit = limit
        self.computed = [0] * num_blocks
        self.skipped = [0] * num_blocks
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.row = None
        self.cache: list[Any] = [None] * len(self.computed)


class _AlwaysCompute(Sequence):
    """Rows of a plan that computes every block at every step, for any step count."""

    def __init__(self, num_blocks: int):
        self._row = (COMPUTE,) * num_blocks

    def __getitem__(self, step):
        return self._row

    def __len__(self) -> int:
        return sys.maxsize


class CacheHandle:
    """An accelerated model: statistics, trajectory control, and :meth:`remove`.

    Made by :func:`accelerate`; usable as a context manager that removes itself.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        rows: Sequence[Sequence[int]],
        limit: int,
        plan: Plan | None = None,
        observer: Observer | None = None,
    ):
        if getattr(model, "_bac_handle", None) is not None:
            raise RuntimeError(f"{type(model).__name__} is already accelerated; call handle.remove() first")
        self.model = model
        self.spec = spec
        self.plan = plan
        self.observer = observer
        self._rows = rows
        self._limit = limit
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

        def run(fn, *args, **kwargs):
            state = handle.state
            action = state.row[i]
            if action:
                observer = handle.observer
                out = fn(*args, **kwargs) if observer is None else observer(i, fn, args, kwargs)
                if action == COMPUTE_AND_STORE:
                    state.cache[i] = out
                state.computed[i] += 1
                return out
            state.skipped[i] += 1
            return state.cache[i]

        return run

    def _advance(self, module: nn.Module, args: tuple) -> None:
        state = self.state
        step = state.step + 1
        if step >= state.limit:
            raise StepOverflowError(
                f"the plan covers {state.limit} denoising steps but step {step + 1} was requested "
                f"in context {state.name!r}: mark each sampling call with handle.new_trajectory() "
                "(or bac.new_trajectory(model)), or make a plan for this sampler's step count"
            )
        state.step = step
        state.row = state.rows[step]
        self._calls += 1
        if self._fresh:
            self._fresh = False
            self._trajectories += 1

    # -- control ---------------------------------------------------------------------
    def _context_state(self, name: str) -> _Context:
        if name not in self._contexts:
            self._contexts[name] = _Context(name, self._rows, self._limit, len(self.spec.blocks))
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
        self.state = _Context("flops", _AlwaysCompute(len(counts)), 1, len(counts))
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
            "method": self.plan.method if self.plan else "calibration",
            "num_steps": self.plan.num_steps if self.plan else None,
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
    plan: Plan,
    *,
    num_steps: int | None = None,
    scheduler: Any = None,
    adapters: Mapping[type, LayerAdapter] | None = None,
) -> CacheHandle:
    """Cache ``model``'s blocks according to ``plan``; returns a :class:`CacheHandle`.

    ``num_steps`` and ``scheduler`` (the sampler's step count and scheduler, or
    its description) are checked against what the plan was made for when given.
    Call ``handle.new_trajectory()`` (or ``bac.new_trajectory(model)``) at the
    start of every sampling call; ``handle.remove()`` undoes everything.
    """
    spec = describe(model, adapters)
    plan.check_fits(spec, num_steps=num_steps, scheduler=scheduler)
    return CacheHandle(model, spec, actions_from_table(plan.step_table()), plan.num_steps, plan=plan)


def new_trajectory(model: nn.Module) -> None:
    """Mark the start of a sampling call on ``model``; does nothing if it is not accelerated.

    Policies call this at the top of their sampling function so that caching
    needs no other cooperation from the caller.
    """
    handle = getattr(model, "_bac_handle", None)
    if handle is not None:
        handle.new_trajectory()
