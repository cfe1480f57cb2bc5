"""Delay robustness of asynchronous execution: hold, continue, blend and real-time chunking at fixed latencies.

    python -m benchmarks.realtime_delays --set dpt [--shard 0/2] [--episodes 50] [--out outputs/realtime_delays]
    python -m benchmarks.realtime_delays --set dpt --report      # the JSON and the plots from the logged episodes

As RTC's paper measures it (Black et al., NeurIPS 2025, arXiv 2506.07339, its simulated benchmark): every
chunk takes a fixed latency on the virtual clock (:func:`bac.runtime.constant_latency`), so results do not
depend on this machine's speed and a run is reproducible byte for byte. Cells: a control rate, a latency and
an execution mode; each runs ``--episodes`` seeded episodes per task (seeds 300000 on, the same in every cell:
paired). The modes (:data:`MODES`):

* ``hold``: synchronous: the next chunk is requested when the running one's planned actions are done (lead 0)
  and the robot holds its last action until it arrives;
* ``continue``: naive asynchronous execution, the control loop's default: the next chunk is requested
  ``lead=auto`` ticks ahead (from the latency), the running one goes on meanwhile, and the new one takes over
  from the action for the tick it arrives at;
* ``blend``: ``continue`` with the first :data:`BLEND` actions after a takeover crossfaded from the old chunk;
* ``rtc``: ``continue`` with real-time chunking (``policy.with_rtc()``, the paper's guidance clip 5): the
  actions that run during the delay are frozen, the rest of the overlap inpainted toward the old chunk.

At 0 and 200 ms the ``dpt`` set also runs how RTC combines (:data:`MODES`): ``rtc10`` (clip 10, LeRobot's
default), ``warm1`` (a plain warm start from step 1 instead of RTC), ``warm1-rtc`` (both) and ``uniform2-rtc``
(RTC on uniform caching, M=2); at 200 ms, ``rtc20`` (clip 20) and DDIM-10 with and without RTC; at the other
latencies ``warm1`` and ``warm1-rtc`` (the best combination at 200 ms). The ``vla`` set runs ``warm1`` and
``warm1-rtc`` beside the four modes.

Sets: ``dpt``: the harder suite's DP-T on DDIM-4 (the fewest lossless steps, issue 33's 400-pair table) at
20 Hz with latencies 0, 50, 100, 200, 300 and 400 ms. The simulated env has no wall time: a rate and a latency
set the episodes only through the delay in ticks (``ceil(latency * rate)``), so 10 Hz at 200 ms is 20 Hz at
100 ms, and 40 Hz at 200 ms is 20 Hz at 400 ms, episode for episode (:data:`SAME_TICKS`; checked on 8 episodes
of every mode when this was written). ``vla``: pi0's
flow-matching head (flow-matching Euler, 5 steps as in the paper) on its eight tasks at 20 Hz, 0 and 200 ms.
Per cell: success with a paired interval against the zero-delay loop (``continue`` at 0 ms, the same rate),
seam jumps and jerk (:func:`bac.runtime.control.smoothness`), steps to success. Episodes are logged per shard
(``episodes-<i>.jsonl``, resumable); ``--report`` writes ``<set>.json`` and ``<set>.png``. Recorded:
benchmarks/results/realtime-delays/.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import bac
from bac.envs.instructions import instruction
from bac.envs.metaworld_env import make_vector_env
from bac.envs.tasks import HARD_SUITE
from bac.evaluation.closed_loop import repair
from bac.evaluation.report import paired_difference, success_summary
from bac.evaluation.variants import own_denoiser
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.policy import DiffusionPolicy
from bac.runtime import EnvPool, constant_latency, make_control_env, run_control_episode, summarize_runs

CONTINUE = {"on_late": "continue"}
#: mode -> (the control loop's settings, the view's extras: rtc max_guidance, warm start, uniform caching M)
MODES = {"hold": ({"lead": 0, "on_late": "hold"}, {}), "continue": (CONTINUE, {}),
         "blend": ({**CONTINUE, "blend": 4}, {}), "rtc": (CONTINUE, {"rtc": 5.0}),
         # how RTC combines (the questions), at the headline cells only
         "rtc10": (CONTINUE, {"rtc": 10.0}), "warm1": (CONTINUE, {"warm": 1}),
         "warm1-rtc": (CONTINUE, {"warm": 1, "rtc": 5.0}), "uniform2-rtc": (CONTINUE, {"uniform": 2, "rtc": 5.0}),
         # whether a stronger pull or more denoising steps help (the 200 ms cell only)
         "rtc20": (CONTINUE, {"rtc": 20.0}), "continue-ddim10": (CONTINUE, {"steps": 10}),
         "rtc-ddim10": (CONTINUE, {"steps": 10, "rtc": 5.0})}
MAIN_MODES = ("hold", "continue", "blend", "rtc")
BLEND = MODES["blend"][0]["blend"]
SETS = {
    "dpt": {"checkpoint": "dpt-metaworld-hard", "sampler": ("ddim", 4), "tasks": list(HARD_SUITE),
            "cells": [(20, ms, MAIN_MODES) for ms in (0, 50, 100, 200, 300, 400)]
            + [(20, ms, ("rtc10", "warm1", "warm1-rtc", "uniform2-rtc")) for ms in (0, 200)]
            + [(20, 200, ("rtc20", "continue-ddim10", "rtc-ddim10"))]
            + [(20, ms, ("warm1", "warm1-rtc")) for ms in (50, 100, 300, 400)]},
    "vla": {"checkpoint": "pi0-metaworld", "sampler": ("flow", 5), "tasks": None,
            "cells": [(20, ms, MAIN_MODES + ("warm1", "warm1-rtc")) for ms in (0, 200)]},
}
FIRST_SEED = 300000
#: (rate, latency) cells the issue names that are the same episodes as a 20 Hz cell (the same delay in ticks)
SAME_TICKS = {(10, 0): (20, 0), (10, 200): (20, 100), (40, 0): (20, 0), (40, 200): (20, 400)}


def load(name: str) -> tuple[dict, DiffusionPolicy]:
    spec = SETS[name]
    policy = DiffusionPolicy.load(resolve_checkpoint(spec["checkpoint"])).with_sampler(*spec["sampler"])
    return spec, policy


def cells(spec: dict, policy: DiffusionPolicy, episodes: int) -> list[tuple]:
    tasks = spec["tasks"] or policy.tasks
    return [(hz, ms, mode, task, seed) for hz, ms, modes in spec["cells"] for mode, task, seed in
            itertools.product(modes, tasks, range(FIRST_SEED, FIRST_SEED + episodes))]


def view(policy: DiffusionPolicy, extras: dict) -> DiffusionPolicy:
    """The policy as a mode runs it (a view of its own): uniform caching on a denoiser of its own (the other
    modes' stays uncached), a warm start, RTC."""
    mode_view = policy.with_sampler(policy.sampler.kind, extras.get("steps", policy.sampler.steps))
    if "uniform" in extras:
        mode_view.model = own_denoiser(mode_view.model)
        mode_view.accelerate(bac.make_plan(mode_view.model, "uniform", num_steps=mode_view.sampler.steps,
                                           M=extras["uniform"], scheduler=mode_view.sampler))
    if "warm" in extras:
        mode_view = mode_view.with_warm_start(extras["warm"])
    return mode_view.with_rtc(extras["rtc"]) if "rtc" in extras else mode_view


def run(name: str, out: Path, shard: tuple[int, int], episodes: int) -> None:
    torch.set_num_threads(1)
    spec, policy = load(name)
    modes = {mode for _, _, cell_modes in spec["cells"] for mode in cell_modes}
    views = {mode: view(policy, MODES[mode][1]) for mode in modes}
    log = out / name / f"episodes-{shard[0]}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    repair(log)  # a line cut by a kill: dropped, so the next one starts on a line of its own
    done = {key(r) for r in read(out / name)}
    todo = [c for n, c in enumerate(cells(spec, policy, episodes)) if n % shard[1] == shard[0]]
    started = time.time()
    with EnvPool(make_vector_env) as pool, open(log, "a") as f:
        for n, (hz, ms, mode, task, seed) in enumerate(todo):
            if (hz, ms, mode, task, seed) in done:
                continue
            env = make_control_env(policy, task, pool=pool)
            text = instruction(task, seed, held_out=True) if policy.reads_instructions else None
            trace = run_control_episode(views[mode], env, task, seed=seed, control_hz=hz, instruction=text,
                                        generator=torch.Generator().manual_seed(seed),
                                        latency_model=constant_latency(ms), **MODES[mode][0])
            record = {"control_hz": hz, "latency_ms": ms, "mode": mode, **trace.to_dict()}
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if n % 200 == 0:
                print(f"{n}/{len(todo)} {time.time() - started:.0f}s", flush=True)


def key(record: dict) -> tuple:
    return (record["control_hz"], record["latency_ms"], record["mode"], record["task"], record["seed"])


def read(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("episodes-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that episode runs again
                pass
    return rows


def report(name: str, out: Path) -> dict:
    spec = SETS[name]
    rows = {key(r): r for r in read(out / name)}
    by_cell: dict[tuple, list] = {}
    for (hz, ms, mode, _, _), r in sorted(rows.items()):
        by_cell.setdefault((hz, ms, mode), []).append(r)
    result = {"set": name, "checkpoint": spec["checkpoint"], "sampler": list(spec["sampler"]),
              "modes": {m: {"loop": loop, **extras} for m, (loop, extras) in MODES.items()},
              "first_seed": FIRST_SEED, "cells": [],
              "command": f"python -m benchmarks.realtime_delays --set {name}",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__}}
    for (hz, ms, mode), runs in sorted(by_cell.items()):
        reference = by_cell.get((hz, 0, "continue"), [])
        control = summarize_runs(runs)
        entry = {"control_hz": hz, "latency_ms": ms, "mode": mode, "episodes": len(runs),
                 "success": success_summary(runs), "smoothness": control["smoothness"],
                 "steps_to_success": control["steps_to_success"], "mean_delay_ticks": control["mean_delay_ticks"],
                 "missed_ticks": control["missed_ticks"], "vs_zero_delay": paired_difference(runs, reference)}
        same_latency = {m: by_cell.get((hz, ms, m), []) for m in MODES if m != mode and (hz, ms, m) in by_cell}
        entry["vs_modes"] = {m: paired_difference(runs, other) for m, other in same_latency.items() if other}
        result["cells"].append(entry)
    if name == "dpt":
        result["same_ticks"] = [{"control_hz": hz, "latency_ms": ms, "as": {"control_hz": h, "latency_ms": m}}
                                for (hz, ms), (h, m) in SAME_TICKS.items()]
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{name}.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({c["control_hz"] for c in result["cells"]})
    fig, axes = plt.subplots(2, len(rates), figsize=(4.5 * len(rates), 7), squeeze=False)
    for col, hz in enumerate(rates):
        for mode in MAIN_MODES + ("warm1-rtc",):
            cs = sorted((c for c in result["cells"] if c["control_hz"] == hz and c["mode"] == mode),
                        key=lambda c: c["latency_ms"])
            x = [c["latency_ms"] for c in cs]
            axes[0][col].plot(x, [100 * c["success"]["rate"] for c in cs], marker="o", label=mode)
            axes[1][col].plot(x, [c["smoothness"]["seam_jump_mean"] for c in cs], marker="o", label=mode)
        axes[0][col].set_title(f"{hz} Hz")
        axes[0][col].set_ylabel("success %")
        axes[1][col].set_ylabel("mean seam jump (action norm)")
        axes[1][col].set_xlabel("inference latency (ms)")
        axes[0][col].legend()
    fig.suptitle(f"{result['checkpoint']} {result['sampler'][0]}-{result['sampler'][1]}: delay robustness")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), required=True)
    parser.add_argument("--out", type=Path, default=Path("outputs/realtime_delays"))
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th episode from the i-th")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        result = report(args.set, args.out)
        for c in result["cells"]:
            s = c["smoothness"]
            print(f"{c['control_hz']:>3} Hz {c['latency_ms']:>4} ms {c['mode']:<9} "
                  f"{100 * c['success']['rate']:5.1f}%  Δ0 {100 * c['vs_zero_delay'].get('mean', np.nan):+5.1f}  "
                  f"seam {s['seam_jump_mean']:.3f}  jerk {s['jerk_mean']:.3f}/{s['jerk_p95']:.3f}  "
                  f"steps {c['steps_to_success'] or 0:.0f}")
        return
    index, count = (int(v) for v in args.shard.split("/"))
    run(args.set, args.out, (index, count), args.episodes)


if __name__ == "__main__":
    main()
