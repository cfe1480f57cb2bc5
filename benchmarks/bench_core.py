"""Core benchmark: what one policy call costs, per configuration, eager and compiled.

    python -m benchmarks.bench_core [--repeats 15] [--models shipped,paper] [--batches 1,50] [--no-compile]

For the shipped DP-T and the paper-size DP-T (random weights: latency depends on the plan, not on the
weights), one thread, at batch 1 and 50: the reference implementation (diffusers' ``scheduler.step``, the
condition encoder at every step, PyTorch's layers), the policy's own per-call executor with every kind of
plan, and the same compiled (``compiled/*``, ``compiled-whole/*``). Configurations are timed interleaved in
one process, so ratios are within one run; FLOPs give each one's ideal speedup; compiled configurations
must compile nothing after warm-up. The configurations in full: docs/guide/evaluation.md ("The core
benchmark").
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
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bac
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy

from bac.evaluation.timing import summarize

DEFAULT_OUT = Path("outputs") / "bench_core.json"
SHIPPED = Path(__file__).resolve().parents[1] / "policies" / "checkpoints" / "dpt-metaworld"
# (name, sampler, steps, method, method params)
CONFIGS = [
    ("full", "ddpm", 100, None, {}),
    ("every-step", "ddpm", 100, "every-step", {}),
    ("bac-M10", "ddpm", 100, "bac", {"M": 10, "n": 5}),
    ("uniform-M10", "ddpm", 100, "uniform", {"M": 10}),
    ("ddim-3", "ddim", 3, None, {}),
    ("ddim-4", "ddim", 4, None, {}),
    ("ddim-5", "ddim", 5, None, {}),
    ("ddim-10", "ddim", 10, None, {}),
    ("bac-M3-ddim10", "ddim", 10, "bac", {"M": 3, "n": 5}),
    ("uniform-M3-ddim10", "ddim", 10, "uniform", {"M": 3}),
    ("bac-M2-ddim5", "ddim", 5, "bac", {"M": 2, "n": 5}),
    ("uniform-M3-ddim5", "ddim", 5, "uniform", {"M": 3}),
    ("uniform-M2-ddim4", "ddim", 4, "uniform", {"M": 2}),
]
REFERENCE = [("reference/full", "ddpm", 100), ("reference/ddim-3", "ddim", 3), ("reference/ddim-4", "ddim", 4),
             ("reference/ddim-5", "ddim", 5), ("reference/ddim-10", "ddim", 10)]
COMPILED = ["full", "bac-M10", "ddim-4", "ddim-5", "bac-M3-ddim10", "uniform-M2-ddim4"]
COMPILED_WHOLE = ["full", "ddim-5"]


def load_policy(label: str) -> DiffusionPolicy:
    """``shipped`` (the six-task DP-T checkpoint) or ``paper`` (the paper's 8 x 256 DP-T, random weights: latency
    depends on the plan, not on the weights)."""
    if label == "shipped":
        return DiffusionPolicy.load(SHIPPED)
    if label == "paper":
        config = PolicyConfig.build("dpt", {"width": 256, "num_layers": 8, "heads": 4}, state_dim=39, action_dim=4)
        return DiffusionPolicy(config).eval()
    raise SystemExit(f"unknown model {label!r}; expected shipped or paper")


def reference_call(policy: DiffusionPolicy, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """The policy's sampling written with diffusers and PyTorch's modules only (no executor, no bac)."""
    model, sampler = policy.model, policy.sampler.scheduler  # the reference policy's own copy (bench_model)
    cond = policy.condition(batch)
    mask = nn.Transformer.generate_square_subsequent_mask(model.horizon)
    sampler.set_timesteps(policy.sampler.steps)
    x = torch.randn((cond.shape[0], model.horizon, model.action_dim), generator=generator)
    for t in sampler.timesteps:
        timestep = t.reshape(-1).expand(cond.shape[0])
        memory = model.cond_encoder(torch.cat([model.time_emb(timestep)[:, None], model.cond_obs_emb(cond)], dim=1)
                                    + model.cond_pos_emb)
        h = model.input_emb(x) + model.pos_emb
        for layer in model.decoder.layers:
            h = nn.TransformerDecoderLayer.forward(layer, h, memory, tgt_mask=mask, tgt_is_causal=True)
        x = sampler.step(model.head(model.ln_f(h)), t, x, generator=generator).prev_sample
    return policy.action_normalizer.inverse(x[:, : policy.n_action_steps])


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"frames_compiled": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}


def bench_model(label: str, policy: DiffusionPolicy, obs: torch.Tensor, repeats: int, compile_: bool,
                calibration_samples: int, seed: int) -> dict:
    batch = {"observation.state": obs, "task": policy.tasks[0]} if policy.tasks else {"observation.state": obs}
    generator = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  the same noise for every call
    calls, policies = {}, {}
    calibrations: dict[tuple, bac.Calibration] = {}

    def configured(sampler: str, steps: int, method: str | None, params: dict, compiled: str | None):
        p = copy.deepcopy(policy).with_sampler(sampler, steps)  # its own weights: the cache or compiled blocks
        if method is not None:
            source = p.model
            if bac.needs_calibration(method):
                key = (sampler, steps)
                if key not in calibrations:
                    calib_batch = {**batch, "observation.state": torch.randn(calibration_samples, *obs.shape[1:],
                                                                              generator=torch.Generator().manual_seed(seed))}
                    if "task" in batch:
                        calib_batch["task"] = [batch["task"]] * calibration_samples
                    calibrations[key] = bac.calibrate(p.model, p.predict_action_chunk, [calib_batch], seed=seed,
                                                      scheduler=p.sampler.scheduler)
                source = calibrations[key]
            p.accelerate(bac.build_method(method, source, num_steps=steps, scheduler=p.sampler.scheduler, **params))
        if compiled == "blocks":
            p.model.compile_blocks()
        elif compiled == "whole":
            p.model.compile()
        return p

    for name, sampler, steps, method, params in CONFIGS:
        policies[name] = configured(sampler, steps, method, params, None)
    for name, sampler, steps in REFERENCE:
        policies[name] = copy.deepcopy(policy).with_sampler(sampler, steps)
    if compile_:
        spec = {c[0]: c for c in CONFIGS}
        for name in COMPILED:
            policies[f"compiled/{name}"] = configured(*spec[name][1:], "blocks")
        for name in COMPILED_WHOLE:
            policies[f"compiled-whole/{name}"] = configured(*spec[name][1:], "whole")
    for name, p in policies.items():
        if name.startswith("reference/"):
            calls[name] = lambda p=p: reference_call(p, batch, generator())
        else:
            calls[name] = lambda p=p: p.predict_action_chunk(batch, generator=generator())

    with torch.no_grad():
        flops = {name: _flops(call) for name, call in calls.items() if not name.startswith("compiled")}
        started = time.perf_counter()
        outputs = {name: call() for name, call in calls.items()}  # warm-up (compiles), outputs for deviations
        warmup_seconds = time.perf_counter() - started
        for call in calls.values():
            call()
        torch._dynamo.utils.counters.clear()
        times: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        for r in range(repeats):
            for name in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        dynamo_after_warmup = _dynamo_counts()
        # The engine's overhead, resolved better than the many-way interleaving above can: full and an
        # every-step plan alone, alternating, as a median of per-pair ratios.
        pair_ratios = []
        for r in range(3 * repeats):
            pair = [("full", 0.0), ("every-step", 0.0)]
            measured = {}
            for name, _ in pair if r % 2 else pair[::-1]:
                start = time.perf_counter()
                calls[name]()
                measured[name] = time.perf_counter() - start
            pair_ratios.append(measured["every-step"] / measured["full"])

    # The policy's finiteness guards (input state and sampled chunk, once per call), timed alone.
    chunk = outputs["full"]
    started = time.perf_counter()
    for _ in range(1000):
        bool(torch.isfinite(obs).all()) and bool(torch.isfinite(chunk).all())
    guard_us = 1e3 * (time.perf_counter() - started)  # ms per 1000 calls = us per call

    latency = {name: summarize(t) for name, t in times.items()}
    p50 = {name: l["p50_ms"] for name, l in latency.items()}
    reference = outputs["reference/full"]
    rows = {}
    for name in calls:
        base = name.split("/", 1)[1] if name.startswith("compiled") else name
        f = flops.get(name, flops.get(base))
        rows[name] = {
            "p50_ms": p50[name], "p95_ms": latency[name]["p95_ms"], "hz": latency[name]["hz"],
            "speedup_vs_reference_full": p50["reference/full"] / p50[name],
            "speedup_vs_full": p50["full"] / p50[name],
            "flops_per_call": f,
            "ideal_vs_reference_full": flops["reference/full"] / f,
            "ideal_vs_full": flops["full"] / f,
            "relative_l2_deviation_vs_reference_full": float((outputs[name] - reference).norm() / reference.norm()),
        }
        rows[name]["measured_over_ideal_vs_full"] = rows[name]["speedup_vs_full"] / rows[name]["ideal_vs_full"]
        rows[name]["measured_over_ideal_vs_reference_full"] = (rows[name]["speedup_vs_reference_full"]
                                                               / rows[name]["ideal_vs_reference_full"])
    result = {
        "model": {"label": label, **policy.model_kwargs, "parameters": sum(p.numel() for p in policy.model.parameters()),
                  "weights": "trained (shipped checkpoint)" if label == "shipped" else "random"},
        "configs": {name: {"sampler": s, "steps": k, "method": m, **prm} for name, s, k, m, prm in CONFIGS},
        "latency": latency,
        "rows": rows,
        "engine_overhead_every_step": p50["every-step"] / p50["full"] - 1,
        "engine_overhead_every_step_ab": {"median_pair_ratio_minus_1": statistics.median(pair_ratios) - 1,
                                          "pairs": len(pair_ratios)},
        "executor_speedup_full": p50["reference/full"] / p50["full"],
        "executor_speedup_ddim5": p50["reference/ddim-5"] / p50["ddim-5"],
        "warmup_seconds": warmup_seconds,
        "guards": {"finiteness_checks_us_per_policy_call": guard_us,
                   "share_of_full_call": guard_us / (1e3 * p50["full"]),
                   "share_of_bac_call": guard_us / (1e3 * p50["bac-M10"])},
    }
    if compile_:
        result["compiled"] = {
            "dynamo_during_timed_repeats": dynamo_after_warmup,
            "speedup_eager_to_compiled": {n: p50[n] / p50[f"compiled/{n}"] for n in COMPILED},
            "speedup_eager_to_compiled_whole": {n: p50[n] / p50[f"compiled-whole/{n}"] for n in COMPILED_WHOLE},
            "bac_over_full_eager": p50["full"] / p50["bac-M10"],
            "bac_over_full_compiled_blocks": p50["compiled/full"] / p50["compiled/bac-M10"],
            "bac_over_full_compiled_whole": p50["compiled-whole/full"] / p50["compiled/bac-M10"],
        }
        c = result["compiled"]
        c["compiled_ratio_share_of_eager"] = c["bac_over_full_compiled_whole"] / c["bac_over_full_eager"]
    return result


def run(repeats: int, models: list[str], batches: list[int], compile_: bool, calibration_samples: int,
        seed: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    results = {}
    for label in models:
        policy = load_policy(label)
        for batch in batches:  # compiled configurations at batch 1 only (the real-time case)
            obs = torch.randn(batch, policy.n_obs_steps, policy.state_dim, generator=torch.Generator().manual_seed(seed))
            key = label if batch == 1 else f"{label}/batch{batch}"
            results[key] = bench_model(label, policy, obs, repeats, compile_ and batch == 1, calibration_samples, seed)
            results[key]["batch"] = batch
    return {
        "benchmark": "core",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batches": batches, "threads": 1, "repeats": repeats, "interleaved": True,
        "models": results,
        "goals": {"engine_overhead_at_most": 0.03, "measured_over_ideal_at_least": 0.9,
                  "compiled_ratio_share_of_eager_at_least": 0.9, "dynamo_after_warmup": 0},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_core", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default="shipped,paper")
    parser.add_argument("--batches", default="1,50", help="batch sizes (the closed-loop evaluator steps 50 envs)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = run(args.repeats, args.models.split(","), [int(b) for b in args.batches.split(",")], not args.no_compile, args.calibration_samples, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for label, r in report["models"].items():
        print(f"{label} DP-T, batch {r['batch']}, 1 thread, median of {args.repeats} interleaved calls:")
        print(f"  {'configuration':<28}{'ms':>9}{'x ref':>8}{'x full':>8}{'ideal':>8}{'meas/ideal':>11}")
        for name, row in r["rows"].items():
            print(f"  {name:<28}{row['p50_ms']:9.2f}{row['speedup_vs_reference_full']:8.2f}"
                  f"{row['speedup_vs_full']:8.2f}{row['ideal_vs_full']:8.2f}{row['measured_over_ideal_vs_full']:11.2f}")
        ab = r["engine_overhead_every_step_ab"]
        print(f"  engine overhead (every-step vs full): {100 * r['engine_overhead_every_step']:+.2f}% in the table, "
              f"{100 * ab['median_pair_ratio_minus_1']:+.2f}% over {ab['pairs']} A/B pairs  (goal <= 3%)")
        if "compiled" in r:
            c = r["compiled"]
            print(f"  compiled: dynamo after warm-up {c['dynamo_during_timed_repeats']}; bac/full eager "
                  f"{c['bac_over_full_eager']:.2f}x, compiled {c['bac_over_full_compiled_whole']:.2f}x vs whole-model "
                  f"compiled full ({100 * c['compiled_ratio_share_of_eager']:.0f}% of eager; goal >= 90%)")
    print(f"report: {args.out}")
    return report


if __name__ == "__main__":
    main()
