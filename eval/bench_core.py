"""Core benchmark: engine overhead and BAC speedup on the paper-size DP-T, batch 1, one thread.

    python -m bac.evaluation.bench_core [--repeats 15] [--out eval/results/bench_core.json]

Three identical copies of the policy are timed interleaved in one process
(full computation, an every-step plan, a calibrated ``bac`` plan), each timing
one whole policy call (100 DDPM steps including the diffusers scheduler and
normalisation), and compared as ratios of medians; the denoiser calls alone
are timed the same way. The ideal speedup is full FLOPs over the FLOPs
the plan executes (``torch.utils.flop_counter``); measured/ideal shows how much
of it survives the work caching cannot remove (embeddings, condition encoder,
head, scheduler, Python dispatch). The cost of the policy's input and output
finiteness guards is reported alone, as a share of a full and of a ``bac`` call.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import torch

import bac
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy

from .timing import summarize

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_core.json"


def _time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(repeats: int, steps: int, M: int, n: int, calibration_samples: int, seed: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    # DP-T at the paper's size: 8 pre-norm layers, width 256, 4 heads, 16 action tokens, 2 observation steps.
    config = PolicyConfig.build("dpt", {"width": 256, "num_layers": 8, "heads": 4}, state_dim=39, action_dim=4)
    full = DiffusionPolicy(config).eval()
    full.set_sampler("ddpm", steps)
    scheduler = full.sampler
    obs = torch.randn(1, 2, 39)

    started = time.perf_counter()
    calibration = bac.calibrate(full.model, full.predict_action_chunk,
                                [{"observation.state": torch.randn(calibration_samples, 2, 39)}],
                                seed=seed, scheduler=scheduler)
    calibration_seconds = time.perf_counter() - started
    plans = {
        "every-step": bac.make_plan(full.model, "every-step", num_steps=steps),
        "bac": bac.make_plan(calibration, "bac", M=M, n=n),
    }
    policies = {"full": full} | {name: copy.deepcopy(full) for name in plans}
    handles = {name: policies[name].accelerate(plan) for name, plan in plans.items()}
    x = torch.zeros(1, 16, 4)
    cond = full.condition({"observation.state": obs})
    flops = handles["bac"].measure_flops(x, scheduler.timesteps[0], cond)
    call_flops = flops.pop("total")

    @torch.no_grad()
    def denoiser_only(model):
        """The policy call's denoiser evaluations alone, without scheduler and normalisation."""
        bac.new_trajectory(model)
        for t in scheduler.timesteps:
            model(x, t, cond)

    def policy_call(policy):
        return policy.predict_action_chunk({"observation.state": obs}, generator=torch.Generator().manual_seed(seed))

    calls = {name: (lambda p=policy: policy_call(p)) for name, policy in policies.items()}
    calls |= {f"{name}/denoiser-only": (lambda m=policy.model: denoiser_only(m)) for name, policy in policies.items()}
    outputs = {name: call() for name, call in calls.items()}  # warm-up, and outputs for the deviation
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for r in range(repeats):
        for name in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            times[name].append(_time_call(calls[name]))
    # The part of a policy call no plan can skip: the scheduler's own update.
    scheduler_ms = 1e3 * statistics.median(
        _time_call(lambda: [scheduler.step(x, t, x) for t in scheduler.timesteps]) for _ in range(5)
    )

    # The policy's finiteness guards (input state and sampled chunk, once per call), timed alone; the engine's
    # per-step input-shape check is part of engine_overhead (every-step plan vs no engine).
    chunk = outputs["full"]

    def guards():
        for _ in range(1000):
            bool(torch.isfinite(obs).all()) and bool(torch.isfinite(chunk).all())

    guard_us = 1e3 * statistics.median(_time_call(guards) for _ in range(5))  # ms per 1000 calls = us per call

    latency = {name: summarize(t) for name, t in times.items()}
    full_ms = latency["full"]["p50_ms"]
    bac_plan = plans["bac"]
    ideal = bac_plan.ideal_speedup(flops, call_flops)
    measured = full_ms / latency["bac"]["p50_ms"]
    measured_denoiser = latency["full/denoiser-only"]["p50_ms"] / latency["bac/denoiser-only"]["p50_ms"]
    stats = handles["bac"].stats()
    deviation = (outputs["bac"] - outputs["full"]).norm() / outputs["full"].norm()
    return {
        "benchmark": "core",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "class": "bac.policies.dpt.TransformerForDiffusion (nn.TransformerDecoderLayer, pre-norm, GELU)",
            "layers": 8, "width": 256, "heads": 4, "action_tokens": 16, "obs_steps": 2, "obs_dim": 39,
            "parameters": sum(p.numel() for p in full.model.parameters()),
            "weights": "random (latency depends on the plan, not on the weights)",
        },
        "sampler": {"scheduler": "DDPMScheduler squaredcos_cap_v2", "steps": steps},
        "plan": {"method": "bac", "M": M, "n": n, "metric": "cosine",
                 "calibration_samples": calibration_samples, "calibration_seconds": round(calibration_seconds, 2),
                 "computed_block_evaluations": bac_plan.computed_count(),
                 "skipped_share": bac_plan.skipped_count() / (bac_plan.computed_count() + bac_plan.skipped_count())},
        "latency_per_policy_call": latency,
        "engine_overhead": latency["every-step"]["p50_ms"] / full_ms - 1,
        "guards": {"finiteness_checks_us_per_policy_call": guard_us,
                   "share_of_full_call": guard_us / (1e3 * full_ms),
                   "share_of_bac_call": guard_us / (1e3 * latency["bac"]["p50_ms"])},
        "speedup": measured,
        "ideal_speedup": ideal,
        "measured_over_ideal": measured / ideal,
        "denoiser_only": {
            "speedup": measured_denoiser,
            "measured_over_ideal": measured_denoiser / ideal,
            "engine_overhead": latency["every-step/denoiser-only"]["p50_ms"]
            / latency["full/denoiser-only"]["p50_ms"] - 1,
        },
        "flops_per_denoiser_call": call_flops,
        "block_flops_share": sum(flops.values()) / call_flops,
        "scheduler_ms_per_policy_call": scheduler_ms,
        "engine_stats_skipped_share": stats["skipped_share"],
        "relative_l2_deviation_of_actions": float(deviation),
        "goals": {"engine_overhead_at_most": 0.03, "measured_over_ideal_at_least": 0.9},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": 1,
                    "torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bac.evaluation.bench_core", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--M", type=int, default=10)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = run(args.repeats, args.steps, args.M, args.n, args.calibration_samples, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lat = report["latency_per_policy_call"]
    print(f"policy call, batch 1, 1 thread, {args.steps} steps (median of {args.repeats}, interleaved):")
    for name, l in lat.items():
        print(f"  {name:<24} {l['p50_ms']:8.1f} ms  (p95 {l['p95_ms']:.1f})")
    print(f"engine overhead (every-step vs full): {100 * report['engine_overhead']:+.2f}%  (goal <= 3%)")
    print(f"bac M={args.M} n={args.n}: speedup {report['speedup']:.2f}x, ideal {report['ideal_speedup']:.2f}x, "
          f"measured/ideal {report['measured_over_ideal']:.2f}  (goal >= 0.9)")
    d = report["denoiser_only"]
    print(f"  denoiser calls alone (no scheduler): speedup {d['speedup']:.2f}x, measured/ideal "
          f"{d['measured_over_ideal']:.2f}, engine overhead {100 * d['engine_overhead']:+.2f}%")
    print(f"  skipped {100 * report['plan']['skipped_share']:.1f}% of block evaluations; "
          f"scheduler alone {report['scheduler_ms_per_policy_call']:.1f} ms per call; report: {args.out}")
    return report


if __name__ == "__main__":
    main()
