"""What real-time chunking's guidance costs per call: plain and guided calls, eager and compiled, with caching.

    python -m benchmarks.rtc_latency [--checkpoint dpt-metaworld-hard] [--sampler ddim 4] [--repeats 40] \
        [--out outputs/rtc_latency.json]

One policy call at batch 1, one torch thread, every configuration timed in the same interleaved rotation
(medians; compilation and the first calls are warm-up, never timed). A guided call continues a previous chunk
(``shift`` 7, ``delay`` 4: the 200 ms cell at 20 Hz of benchmarks/realtime_delays.py), so every step takes the
vector-Jacobian product. Configurations:

* ``plain`` / ``rtc``: eager;
* ``plain + torch.compile(model)`` / ``rtc + torch.compile(model)``: the capable user's, the denoiser compiled
  (inductor; the guided call differentiates through the compiled denoiser, AOTAutograd's backward);
* ``plain whole-call graph``: the call as one graph (``compile_call``; RTC views refuse it);
* ``uniform-M2 + rtc``: RTC on a uniform caching plan (M=2): the product runs through computed blocks only;
* ``warm1 + rtc``: begun from the previous chunk at step 1 (3 guided steps), the best mode of the delay study.

Recorded: benchmarks/results/realtime-delays/rtc-latency.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import bac
from bac.evaluation.variants import own_denoiser
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.policy import DiffusionPolicy
from bac.policies.warm import WarmState

SHIFT, DELAY = 7, 4


def configurations(policy: DiffusionPolicy) -> dict[str, tuple[DiffusionPolicy, bool]]:
    """name -> (view, guided)."""
    compiled = policy.with_sampler(policy.sampler.kind, policy.sampler.steps)
    compiled.model = torch.compile(own_denoiser(compiled.model), dynamic=False)
    cached = policy.with_sampler(policy.sampler.kind, policy.sampler.steps)
    cached.model = own_denoiser(cached.model)
    cached.accelerate(bac.make_plan(cached.model, "uniform", num_steps=policy.sampler.steps, M=2,
                                    scheduler=policy.sampler))
    return {"plain": (policy, False), "rtc": (policy.with_rtc(), True),
            "plain + torch.compile(model)": (compiled, False), "rtc + torch.compile(model)": (compiled.with_rtc(), True),
            "plain whole-call graph": (policy.compile_call(1), False), "uniform-M2 + rtc": (cached.with_rtc(), True),
            "warm1 + rtc": (policy.with_warm_start(1).with_rtc(), True)}


def timed_call(view: DiffusionPolicy, guided: bool, batch: dict, previous: torch.Tensor) -> float:
    kwargs = {}
    if guided:
        state = WarmState()
        state.prior, state.observation, state.task = previous, view.obs_normalizer(batch["observation.state"][:, -1]), \
            batch["task"]
        kwargs = {"warm_state": state, "shift": SHIFT, "delay": DELAY}
    start = time.perf_counter()
    view.predict_action_chunk(batch, num_actions=view.horizon, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="dpt-metaworld-hard")
    parser.add_argument("--sampler", nargs=2, default=["ddim", "4"])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("outputs/rtc_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = DiffusionPolicy.load(resolve_checkpoint(args.checkpoint)).with_sampler(args.sampler[0],
                                                                                    int(args.sampler[1]))
    g = torch.Generator().manual_seed(0)
    batch = {"observation.state": torch.randn(1, policy.n_obs_steps, policy.state_dim, generator=g) * 0.1,
             "task": policy.tasks[0]}
    previous = policy.action_normalizer(policy.predict_action_chunk(batch, num_actions=policy.horizon))
    views = configurations(policy)
    times: dict[str, list[float]] = {name: [] for name in views}
    for repeat in range(args.warmup + args.repeats):
        for name, (view, guided) in views.items():
            seconds = timed_call(view, guided, batch, previous)
            if repeat >= args.warmup:
                times[name].append(seconds)
    plain = statistics.median(times["plain"])
    result = {"checkpoint": args.checkpoint, "sampler": args.sampler, "batch": 1, "threads": 1,
              "repeats": args.repeats, "shift": SHIFT, "delay": DELAY,
              "command": "python -m benchmarks.rtc_latency " + " ".join(sys.argv[1:]),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
              "p50_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
              "vs_plain": {name: statistics.median(t) / plain for name, t in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name in views:
        print(f"{name:<32} {result['p50_ms'][name]:7.2f} ms  {result['vs_plain'][name]:.2f}x plain")


if __name__ == "__main__":
    main()
