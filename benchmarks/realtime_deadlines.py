"""Deadline misses after warm-up at 40 Hz: the harder suite's DP-T with ``lead=auto`` from in-loop calls.

    python -m benchmarks.realtime_deadlines [--ticks 3000] [--warmup-calls 300] [--clocks virtual wall]
                                            [--out outputs/realtime_deadlines.json]

The bar (issue 34): 0 missed ticks after warm-up over at least 3,000 ticks at 40 Hz, on the virtual clock with
each chunk's measured latency and on the wall clock, on a quiet host. The policy: ``dpt-metaworld-hard`` on
DDIM-4 (the fewest lossless steps), batch 1, one torch thread, on CPU. For each clock, in turn:

1. the warm-up: ``--warmup-calls`` policy calls made in the control loop on that clock
   (:func:`bac.evaluation.realtime.warm_up`, the evaluator's rule: episodes of the harder suite's tasks, an equal
   share of the calls each, seeds from :data:`WARMUP_SEED`, each episode's first chunk left out), whose slowest
   call sizes the lead (``bac.runtime.auto_lead``);
2. the measured episodes with that lead (the evaluator's other defaults: ``on_late=continue``,
   ``adapt_lead=true``, blend 0), the tasks in turn with seeds from :data:`FIRST_SEED`, until at least
   ``--ticks`` ticks ran.

Misses are counted as the evaluator counts them (``bac.runtime.summarize_runs``: control ticks without a planned
action, after each episode's first chunk, the one the robot waits for). Per clock the JSON holds the ticks,
missed ticks, late chunks, chunk latency percentiles (nearest rank), the lead (and the largest the loop raised
it to), the warm-up's latency summary, the achieved rate, overruns (wall clock) and the success rate. The wall
clock's run takes real time: the warm-up about ``calls * 8 / 40`` s, the episodes ``ticks / 40`` s and more.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from bac.envs.metaworld_env import make_vector_env
from bac.envs.tasks import HARD_SUITE
from bac.evaluation.realtime import CLOCKS, warm_up
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.policy import DiffusionPolicy
from bac.runtime import EnvPool, make_control_env, run_control_episode, summarize_runs

CHECKPOINT = "dpt-metaworld-hard"
SAMPLER = ("ddim", 4)
CONTROL_HZ = 40.0
FIRST_SEED = 300000  # the measured episodes
WARMUP_SEED = 290000  # the warm-up's episodes: held out from the measured ones
LOOP = {"on_late": "continue", "adapt_lead": True, "blend": 0}  # the evaluator's defaults (configs/eval.yaml)


def measure(policy: DiffusionPolicy, envs: Callable[[str], Any], clock_name: str, ticks: int,
            warmup_calls: int) -> dict:
    """The warm-up, then episodes until ``ticks`` ticks ran, on one clock (``envs(task)``: the task's pooled env)."""
    tasks = list(HARD_SUITE)
    execute_steps = policy.n_action_steps
    began = time.perf_counter()
    with CLOCKS[clock_name]() as clock:
        warmup = warm_up(policy, envs, tasks, range(WARMUP_SEED, WARMUP_SEED + warmup_calls), warmup_calls,
                         control_hz=CONTROL_HZ, execute_steps=execute_steps, clock=clock, lead="auto", **LOOP)
        warmed = time.perf_counter()
        traces = []
        for seed, task in zip(itertools.count(FIRST_SEED), itertools.cycle(tasks)):
            if sum(t.ticks for t in traces) >= ticks:
                break
            traces.append(run_control_episode(policy, envs(task), task, seed=seed, control_hz=CONTROL_HZ,
                                              clock=clock, generator=torch.Generator().manual_seed(seed),
                                              execute_steps=execute_steps, lead=warmup.lead, **LOOP))
    summary = summarize_runs(traces)
    return {
        "clock": clock_name, "ticks": summary["ticks"], "episodes": summary["episodes"],
        "seeds": [FIRST_SEED, FIRST_SEED + len(traces) - 1],
        "missed_ticks": summary["missed_ticks"], "late_chunks": summary["late_chunks"],
        "miss_rate": summary["miss_rate"], "latency_ms": summary["latency_ms"],
        "lead": warmup.lead, "largest_lead": max(t.lead for t in traces),  # adapt_lead raises it after a slower chunk
        "warmup": warmup.summary(), "achieved_hz": summary["achieved_hz"], "overruns": summary["overruns"],
        "success_rate": summary["success_rate"], "notes": summary["notes"],
        "warmup_s": warmed - began, "episodes_s": time.perf_counter() - warmed,
    }


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=3000, help="at least this many measured ticks per clock")
    parser.add_argument("--warmup-calls", type=int, default=300, help="in-loop calls that size the lead")
    parser.add_argument("--clocks", nargs="+", choices=sorted(CLOCKS), default=["virtual", "wall"])
    parser.add_argument("--out", type=Path, default=Path("outputs/realtime_deadlines.json"))
    args = parser.parse_args()
    if args.ticks < 1 or args.warmup_calls < 1:
        parser.error("--ticks and --warmup-calls must be at least 1")
    torch.set_num_threads(1)  # batch 1 on one thread, as the evaluator's latency.threads default
    policy = DiffusionPolicy.load(resolve_checkpoint(CHECKPOINT)).with_sampler(*SAMPLER)
    with EnvPool(make_vector_env) as pool:  # one env per task, reused by every episode of it
        envs = lambda task: make_control_env(policy, task, pool=pool)  # noqa: E731
        clocks = [measure(policy, envs, name, args.ticks, args.warmup_calls) for name in args.clocks]
    result = {"checkpoint": CHECKPOINT, "sampler": list(SAMPLER), "control_hz": CONTROL_HZ,
              "execute_steps": policy.n_action_steps, "horizon": policy.horizon, "tasks": list(HARD_SUITE),
              "first_seed": FIRST_SEED, "warmup_seed": WARMUP_SEED,
              "warmup_calls": args.warmup_calls, "min_ticks": args.ticks, "loop": LOOP, "threads": 1,
              "clocks": clocks, "command": "python -m benchmarks.realtime_deadlines " + " ".join(sys.argv[1:]),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for c in clocks:
        lat = c["latency_ms"]
        print(f"{c['clock']:>7}: {c['missed_ticks']} missed ticks ({c['late_chunks']} late chunks) in {c['ticks']} "
              f"ticks, {c['episodes']} episodes; lead {c['lead']} (raised to {c['largest_lead']}) from the warm-up's "
              f"max {c['warmup']['latency']['max_ms']:.1f} ms; chunk ms p50 / p99 / max {ms(lat['p50'])} / "
              f"{ms(lat['p99'])} / {ms(lat['max'])}; achieved {c['achieved_hz']:.1f} Hz, {c['overruns']} overruns")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
