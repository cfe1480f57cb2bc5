"""Whole-call graphs benchmark (issue 32): one policy call as one graph, against eager and compiled models.

    python -m benchmarks.bench_graphs [--models shipped,paper] [--batches 1,8] [--repeats 15]
                                      [--configs full,ddim-4,...] [--modes eager,whole_call,...]
                                      [--out outputs/bench_graphs.json]

For the shipped DP-T and the paper-size DP-T (built as benchmarks/bench_core.py builds it), one thread:
every configuration (full DDPM-100, DDIM-2/3/4/5/10, the tuner's pick ``uniform-M2-ddim4``, ``bac-M10`` on
DDPM-100) in every mode:

- ``eager``: ``policy.predict_action_chunk``;
- ``compile_blocks``: ``policy.model.compile_blocks()`` (one graph per branch kind, decisions in Python);
- ``model_compiled``: ``torch.compile(policy.model)``, the sampling loop eager (what a capable user does);
- ``whole_call``: ``policy.compile_call(batch=B)`` (inductor, the call unrolled into one graph);
- ``onnxruntime``: ``policy.compile_call(batch=B, backend="onnxruntime", threads=1)``.

Build times are cold only with an empty inductor cache: run it with ``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``
(kernels shared by the run's graphs are then reused within the run, as they would be for a user). All calls
of one model and batch are timed interleaved (round-robin, rotated each repeat), the whole
``predict_action_chunk`` call each time; medians. Build times are the setup plus the first call. FLOPs
(counted on the eager call, as bench_core counts them) give each cached plan's ideal speedup.
Whole-call graphs of K = 100 steps are built with a cap: inductor's build time grows faster than
linearly in the steps, so it is extrapolated from the two largest few-step builds and skipped above
``--max-build-seconds``; ``--k100-sets`` says for which model/batch sets K = 100 graphs are built at all
(an ONNX export of K = 100 takes many minutes). Results: benchmarks/results/graphs/, rendered into
docs/results/graphs.md by ``python -m benchmarks.render_results``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import bac
from bac.evaluation.timing import summarize
from bac.policies.policy import DiffusionPolicy

from . import bench_core
from .bench_core import _dynamo_counts, _flops, load_policy

DEFAULT_OUT = Path("outputs") / "bench_graphs.json"
_CORE = {c[0]: c for c in bench_core.CONFIGS}
# (name, sampler, steps, method, method params), as in bench_core
CONFIGS = [("ddim-2", "ddim", 2, None, {}) if name == "ddim-2" else _CORE[name]
           for name in ["full", "ddim-2", "ddim-3", "ddim-4", "ddim-5", "ddim-10", "uniform-M2-ddim4", "bac-M10"]]
PICK = "uniform-M2-ddim4"  # the tuner's pick for dpt-metaworld
UNCACHED_EQUIVALENT = {PICK: "ddim-4", "bac-M10": "full"}  # the same sampler and steps, every block computed
MODES = ["eager", "compile_blocks", "model_compiled", "whole_call", "onnxruntime"]
GRAPH_MODES = ("whole_call", "onnxruntime")
#: The calls the headline compares, timed again among themselves only (bench_set's "headline_warm").
HEADLINE_CALLS = [f"{mode}/{name}" for mode in ("eager", "model_compiled", "whole_call", "onnxruntime")
                  for name in (PICK, "ddim-4")]


class Configured:
    """Policies of one model per configuration and mode; cached configurations get their own copy per
    eager mode (a plan and compile_blocks/torch.compile change the denoiser they are applied to)."""

    def __init__(self, policy: DiffusionPolicy, calibration_batch: dict, seed: int):
        self.policy, self.calibration_batch, self.seed = policy, calibration_batch, seed
        self.calibrations: dict[tuple, bac.Calibration] = {}
        self.bases: dict[str, DiffusionPolicy] = {}

    def _base(self, mode: str) -> DiffusionPolicy:
        """The uncached denoiser of ``mode``, shared by every uncached configuration's sampler view."""
        if mode not in self.bases:
            self.bases[mode] = _compiled(copy.deepcopy(self.policy), mode)
        return self.bases[mode]

    def policy_for(self, name: str, mode: str) -> DiffusionPolicy:
        _, sampler, steps, method, params = next(c for c in CONFIGS if c[0] == name)
        if method is None:
            return self._base(mode).with_sampler(sampler, steps)
        p = copy.deepcopy(self.policy).with_sampler(sampler, steps)
        source = p.model
        if bac.needs_calibration(method):
            key = (sampler, steps)
            if key not in self.calibrations:
                self.calibrations[key] = bac.calibrate(p.model, p.predict_action_chunk, [self.calibration_batch],
                                                       seed=self.seed, scheduler=p.sampler.scheduler)
            source = self.calibrations[key]
        p.accelerate(bac.build_method(method, source, num_steps=steps, scheduler=p.sampler.scheduler, **params))
        return _compiled(p, mode)


def _compiled(policy: DiffusionPolicy, mode: str) -> DiffusionPolicy:
    if mode == "compile_blocks":
        policy.model.compile_blocks()
    elif mode == "model_compiled":
        policy.model.compile()  # torch.compile(policy.model), in place, as bench_core's compiled-whole
    return policy


def _power_law_estimate(builds: dict[int, float], steps: int) -> float | None:
    """Build seconds at ``steps`` from the two largest measured step counts (seconds ~ a * K^b, b >= 1)."""
    if len(builds) < 2:
        return None
    (k1, s1), (k2, s2) = sorted(builds.items())[-2:]
    exponent = max(1.0, math.log(s2 / s1) / math.log(k2 / k1))
    return s2 * (steps / k2) ** exponent


def _deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the chunk's largest magnitude."""
    return float((got - want).abs().max() / want.abs().max())


def bench_set(label: str, policy: DiffusionPolicy, batch_size: int, names: list[str], modes: list[str],
              repeats: int, calibrations: dict, args: argparse.Namespace) -> dict:
    seed = args.seed
    # a fresh compiler per set: torch.compile(model) of a cached plan compiles one graph per row pattern, and
    # the earlier sets' graphs of the same forward would count towards dynamo's recompile limit
    torch._dynamo.reset()
    obs = torch.randn(batch_size, policy.n_obs_steps, policy.state_dim, generator=torch.Generator().manual_seed(seed))
    batch = {"observation.state": obs}
    samples = torch.randn(args.calibration_samples, *obs.shape[1:], generator=torch.Generator().manual_seed(seed))
    calibration_batch = {"observation.state": samples}
    if policy.tasks:  # the shipped DP-T is multi-task: its first task, as bench_core does
        batch["task"], calibration_batch["task"] = policy.tasks[0], [policy.tasks[0]] * args.calibration_samples
    configured = Configured(policy, calibration_batch, seed)
    configured.calibrations = calibrations  # one calibration per model, shared by its batch sizes
    generator = lambda: torch.Generator().manual_seed(seed)

    steps_of = {c[0]: c[2] for c in CONFIGS}
    policies: dict[tuple[str, str], DiffusionPolicy] = {}
    setup: dict[tuple[str, str], float] = {}
    build_checks: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    eager_modes = [m for m in modes if m not in GRAPH_MODES]
    for name in names:
        for mode in eager_modes:
            started = time.perf_counter()
            policies[name, mode] = configured.policy_for(name, mode)
            setup[name, mode] = time.perf_counter() - started
    # Whole-call graphs from the eager policy of each configuration (a view sharing its weights and plan),
    # fewest steps first, so K = 100 can be estimated from the few-step builds before it is tried.
    inductor_builds: dict[int, float] = {}
    for name in sorted(names, key=lambda n: steps_of[n]):
        source = policies.get((name, "eager")) or configured.policy_for(name, "eager")
        k = steps_of[name]
        for mode in [m for m in modes if m in GRAPH_MODES]:
            key = f"{mode}/{name}"
            if k > 10 and f"{label}/{batch_size}" not in args.k100_sets:
                skipped[key] = f"K={k} graphs are built for {args.k100_sets} only (--k100-sets)"
                continue
            if mode == "whole_call" and k > 10:
                estimate = _power_law_estimate(inductor_builds, k)
                if estimate is None or estimate > args.max_build_seconds:
                    skipped[key] = (f"inductor build of K={k} not tried: estimated at "
                                    f"{'(no two few-step builds)' if estimate is None else f'{estimate:.0f} s'} "
                                    f"from the K <= 10 builds (power law), over the {args.max_build_seconds:.0f} s cap")
                    continue
            torch._dynamo.utils.counters.clear()
            started = time.perf_counter()
            if mode == "whole_call":
                policies[name, mode] = source.compile_call(batch=batch_size)
            else:
                policies[name, mode] = source.compile_call(batch=batch_size, backend="onnxruntime", threads=1)
            setup[name, mode] = time.perf_counter() - started
            build_checks[key] = _dynamo_counts()
            if mode == "whole_call" and name not in UNCACHED_EQUIVALENT:  # uncached: one build per K
                inductor_builds[k] = setup[name, mode]
            print(f"  built {key}: {setup[name, mode]:.1f} s", flush=True)

    calls = {f"{mode}/{name}": (lambda p=p: p.predict_action_chunk(batch, generator=generator()))
             for (name, mode), p in policies.items()}
    with torch.no_grad():
        flops = {name: _flops(calls[f"eager/{name}"]) for name in names if f"eager/{name}" in calls}
        first_call, outputs = {}, {}
        for key, call in calls.items():  # warm-up: the lazily compiled modes compile here
            torch._dynamo.utils.counters.clear()
            started = time.perf_counter()
            outputs[key] = call()
            first_call[key] = time.perf_counter() - started
            if key.startswith(("compile_blocks/", "model_compiled/")):  # compiled on this first call
                build_checks[key] = _dynamo_counts()
        for call in calls.values():
            call()
        # after warm-up, per call: nothing compiled, no graph break, no recompile
        after_warmup = {}
        for key, call in calls.items():
            torch._dynamo.utils.counters.clear()
            call()
            after_warmup[key] = _dynamo_counts()
        times: dict[str, list[float]] = {key: [] for key in calls}
        order = list(calls)
        started_timing = time.perf_counter()
        for r in range(repeats):
            for key in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - start)
        timing_seconds = time.perf_counter() - started_timing
        # The headline's calls alone, rotated among themselves: a robot calls one configuration again and
        # again, with its weights in the CPU caches; the round-robin above over every configuration evicts
        # them between a configuration's calls, which weighs on small models at batch 1.
        few = [key for key in HEADLINE_CALLS if key in calls]
        warm: dict[str, list[float]] = {key: [] for key in few}
        for r in range(args.headline_repeats if few else 0):  # none: the configurations exclude the headline's
            for key in few[r % len(few):] + few[: r % len(few)]:
                start = time.perf_counter()
                calls[key]()
                warm[key].append(time.perf_counter() - start)

    latency = {key: summarize(t) for key, t in times.items()}
    p50 = {key: value["p50_ms"] for key, value in latency.items()}
    rows: dict[str, dict] = {}
    for key in calls:
        mode, name = key.split("/", 1)
        row = {"p50_ms": p50[key], "p95_ms": latency[key]["p95_ms"], "hz": latency[key]["hz"],
               "setup_seconds": setup.get((name, mode), 0.0), "first_call_seconds": first_call[key],
               "build_seconds": setup.get((name, mode), 0.0) + first_call[key],
               "dynamo_after_warmup": after_warmup[key]}
        if key in build_checks:
            row["dynamo_at_build"] = build_checks[key]
        if f"eager/{name}" in outputs and mode != "eager":
            row["max_relative_deviation_vs_eager"] = _deviation(outputs[key], outputs[f"eager/{name}"])
        if f"eager/{name}" in p50 and mode != "eager":
            row["speedup_vs_eager"] = p50[f"eager/{name}"] / p50[key]
        uncached = UNCACHED_EQUIVALENT.get(name)
        if uncached is not None and name in flops:
            for base, tag in (("full", "full"), (uncached, "uncached_equivalent")):
                if base not in flops:
                    continue
                row[f"ideal_vs_{tag}"] = ideal = flops[base] / flops[name]
                if f"{mode}/{base}" in p50:
                    row[f"speedup_vs_{tag}"] = p50[f"{mode}/{base}"] / p50[key]
                    row[f"measured_over_ideal_vs_{tag}"] = row[f"speedup_vs_{tag}"] / ideal
        rows[key] = row

    result = {
        "model": {"label": label, **policy.model_kwargs, "parameters": sum(p.numel() for p in policy.model.parameters()),
                  "weights": "trained (shipped checkpoint)" if label == "shipped" else "random"},
        "batch": batch_size, "repeats": repeats, "timing_seconds": timing_seconds,
        "flops_per_call": flops, "rows": rows, "skipped": skipped,
        "checks": {
            "graph_breaks_at_build": {k: v["graph_breaks"] for k, v in build_checks.items()},
            "compiled_after_warmup": {k: v for k, v in after_warmup.items() if any(v.values())},
            "max_relative_deviation_whole_call_vs_eager": {
                k.split("/", 1)[1]: r["max_relative_deviation_vs_eager"] for k, r in rows.items()
                if k.startswith("whole_call/") and "max_relative_deviation_vs_eager" in r},
        },
        "headline": _headline(p50, flops),
        # the same comparisons from the headline's calls alone (HEADLINE_CALLS, args.headline_repeats rounds)
        "headline_warm": _headline({key: summarize(t)["p50_ms"] for key, t in warm.items()}, flops),
        "headline_warm_repeats": args.headline_repeats,
    }
    return result


def _headline(p50: dict, flops: dict) -> dict:
    """The pick whole-call compiled (and in ONNX Runtime) against model-compiled DDIM-4: the capable user's
    configuration without this product (torch.compile(model), the fewest lossless DDIM steps)."""
    if PICK not in flops or "ddim-4" not in flops:
        return {}
    ideal = flops["ddim-4"] / flops[PICK]
    pairs = {"whole_call_pick_vs_model_compiled_ddim4": ("whole_call", "model_compiled"),
             "onnxruntime_pick_vs_onnxruntime_ddim4": ("onnxruntime", "onnxruntime"),
             "onnxruntime_pick_vs_model_compiled_ddim4": ("onnxruntime", "model_compiled"),
             "whole_call_pick_vs_whole_call_ddim4": ("whole_call", "whole_call"),
             "eager_pick_vs_eager_ddim4": ("eager", "eager")}
    headline = {"ideal": ideal, "goal_measured_over_ideal_at_least": 0.9}
    for tag, (mode, base) in pairs.items():
        if f"{mode}/{PICK}" in p50 and f"{base}/ddim-4" in p50:
            speedup = p50[f"{base}/ddim-4"] / p50[f"{mode}/{PICK}"]
            headline[tag] = {"speedup": speedup, "measured_over_ideal": speedup / ideal,
                             "pick_ms": p50[f"{mode}/{PICK}"], "ddim4_ms": p50[f"{base}/ddim-4"]}
    return headline


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    torch._dynamo.config.cache_size_limit = 64  # many compiled copies of one module class in one process
    names = [c[0] for c in CONFIGS if c[0] in args.configs]
    results = {}
    for label in args.models:
        policy = load_policy(label)
        calibrations: dict = {}
        for batch_size in args.batches:
            if (label, batch_size) in args.drop:
                continue
            print(f"{label} batch {batch_size}", flush=True)
            results[f"{label}/batch{batch_size}"] = bench_set(label, policy, batch_size, names, args.modes,
                                                               args.repeats, calibrations, args)
            _write(args.out, _report(args, names, results))  # each set as it completes: a long run keeps them
    return _report(args, names, results)


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _report(args: argparse.Namespace, names: list[str], results: dict) -> dict:
    return {
        "benchmark": "graphs",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": 1, "onnxruntime_threads": 1, "repeats": args.repeats, "interleaved": True,
        "batches": args.batches, "configs": {c[0]: {"sampler": c[1], "steps": c[2], "method": c[3], **c[4]}
                                             for c in CONFIGS if c[0] in names},
        "modes": args.modes, "max_build_seconds": args.max_build_seconds, "k100_sets": args.k100_sets,
        "dropped": [f"{label}/batch{b}" for label, b in args.drop],
        "results": results,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
        "host": args.host, "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default (warm if used before)"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_graphs", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shipped,paper")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--drop", default="", help="model/batch sets to leave out, e.g. paper/8")
    parser.add_argument("--k100-sets", default="shipped/1", help="model/batch sets whose K=100 graphs are built")
    parser.add_argument("--max-build-seconds", type=float, default=600.0)
    parser.add_argument("--headline-repeats", type=int, default=200,
                        help="rounds of the headline's calls timed among themselves after the full rotation")
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.k100_sets = [s for s in args.k100_sets.split(",") if s]
    args.configs = args.configs.split(",")
    args.modes = args.modes.split(",")
    unknown = [n for n in args.configs if n not in _names()] + [m for m in args.modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown configurations or modes {unknown}; expected {_names()} and {MODES}")
    args.drop = [(d.split("/")[0], int(d.split("/")[1])) for d in args.drop.split(",") if d]
    report = run(args)
    for key, r in report["results"].items():
        print(f"{key}: median ms of {r['repeats']} interleaved calls (build s)")
        for name in r["flops_per_call"]:
            cells = [f"{r['rows'][f'{m}/{name}']['p50_ms']:8.2f} ({r['rows'][f'{m}/{name}']['build_seconds']:5.1f})"
                     if f"{m}/{name}" in r["rows"] else f"{'-':>16}" for m in args.modes]
            print(f"  {name:<18}" + "".join(cells))
        for which in ("headline", "headline_warm"):
            for tag, value in r[which].items():
                if isinstance(value, dict):
                    print(f"  {which} {tag}: {value['speedup']:.2f}x ({value['measured_over_ideal']:.2f} of ideal "
                          f"{r[which]['ideal']:.2f}x)")
    print(f"report: {args.out}")
    return report


def _names() -> list[str]:
    return [c[0] for c in CONFIGS]


if __name__ == "__main__":
    main()
