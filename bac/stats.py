"""What an accelerated model ran: computed and skipped blocks per block and per sampling call, FLOPs, a summary.

:class:`HandleStats` reads every thread's records (:mod:`bac.state`) and never touches the hot path; a
:class:`bac.CacheHandle` delegates ``stats()``, ``summary()`` and ``measure_flops()`` to it.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .adapters import ModelSpec
from .flops import executed_flops
from .rows import AlwaysCompute, BoundSchedule
from .standins import Standin
from .state import Context, ThreadRecord, ThreadStates, totals


class HandleStats:
    """Statistics of one accelerated model over all its threads, and its FLOPs once measured."""

    def __init__(self, spec: ModelSpec, threads: ThreadStates):
        self.spec = spec
        self.threads = threads
        self.block_flops: list[int] | None = None
        self.call_flops: int | None = None

    def totals(self, records: list[ThreadRecord] | None = None) -> tuple[list[int], list[int], int, int]:
        """Computed and skipped per block, sampling calls and denoiser calls of ``records`` (default: all)."""
        computed, skipped, trajectories, calls = totals(list(self.threads.records) if records is None else records)
        num_blocks = len(self.spec.blocks)
        return computed or [0] * num_blocks, skipped or [0] * num_blocks, trajectories, calls

    def stats(self, schedule: BoundSchedule, standin: Standin) -> dict:
        """See :meth:`bac.CacheHandle.stats`."""
        computed, skipped, trajectories, calls = self.totals()
        record = self.threads.local.record
        this_computed, this_skipped, _, this_calls = self.totals([record])
        mark_computed, mark_skipped, _, mark_calls = record.mark
        total_computed, total_skipped = sum(computed), sum(skipped)
        evaluations = total_computed + total_skipped
        stats: dict[str, Any] = {
            "method": schedule.name,
            "params": dict(schedule.params),
            **standin.describe(),
            "num_steps": schedule.limit if schedule.limit < sys.maxsize else None,
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
            stats["flops"] = self._flops(computed, calls)
        return stats

    def _flops(self, computed: list[int], calls: int) -> dict:
        block_total = sum(self.block_flops)
        executed = executed_flops(self.call_flops, self.block_flops, computed, calls)
        full = calls * self.call_flops
        return {
            "per_call_full": self.call_flops,
            "per_call_blocks": block_total,
            "per_call_non_block": self.call_flops - block_total,
            "per_block": dict(zip((b.name for b in self.spec.blocks), self.block_flops)),
            "executed": executed,
            "full": full,
            "saved_share": 1 - executed / full if full else 0.0,
            "ideal_speedup": full / executed if executed else 1.0,
        }

    def summary(self, schedule: BoundSchedule, standin: Standin) -> str:
        """See :meth:`bac.CacheHandle.summary`."""
        s = self.stats(schedule, standin)
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

    def measure_flops(self, model: nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
        """See :meth:`bac.CacheHandle.measure_flops`: every block computed, in a scratch context."""
        counts = [0] * len(self.spec.blocks)

        def count(i, fn, fn_args, fn_kwargs):
            before = mode.get_total_flops()
            out = fn(*fn_args, **fn_kwargs)
            counts[i] += mode.get_total_flops() - before
            return out

        local, record = self.threads.local, self.threads.local.record
        saved = (local.state, local.observer, record.fresh, record.trajectories, record.calls)
        local.state = Context("flops", AlwaysCompute(len(counts)), len(counts))
        local.observer = count
        try:
            with FlopCounterMode(display=False) as mode, torch.no_grad():
                model(*args, **kwargs)
        finally:
            local.state, local.observer, record.fresh, record.trajectories, record.calls = saved
        self.block_flops = counts
        self.call_flops = mode.get_total_flops()
        return {block.name: c for block, c in zip(self.spec.blocks, counts)} | {"total": self.call_flops}
