"""Whole-call graphs on one GPU (issue 32): CUDA-graph whole call vs eager vs torch.compile(model).

    python -m benchmarks.gpu_graphs [--out outputs/gpu_graphs.json] [--repeats 50] [--budget-seconds 270]
    python -m benchmarks.gpu_graphs --dry-run      # the same on CPU: 2 repeats, aot_eager, no CUDA graphs

Few-step configurations only, batch 1: the paper-size DP-T (DDIM-4 and the tuner's pick, uniform M=2 on
DDIM-4) and the three shipped VLA heads (gr00t, pi0 on flow-4; rdt on DPM-Solver-4; each uncached and with a
uniform M=2 plan). Modes: ``eager`` (``predict_action_chunk``), ``model_compiled`` (``torch.compile`` of
the denoiser, the sampling loop eager; uncached only) and ``cuda_graph`` (``compile_call(batch=1,
mode="reduce-overhead")``: the whole call replayed as one CUDA graph). Absolute ms and Hz (medians of
interleaved calls, synchronised), build seconds, the whole call's deviation from eager, and the deviation
of fp16/bf16 from fp32 actions under ``torch.autocast`` (a plain ``.to(dtype)`` of the denoiser does not run:
the sampler's tables and the time embedding's input stay float32). Then it runs the CUDA-graph test
(``pytest tests/policies/test_graph_call.py -k cuda``) and writes its outcome. Sections that would
start after ``--budget-seconds`` are skipped and listed, so a run stays under 5 minutes.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import bac
from bac.evaluation.timing import summarize, synchronize
from bac.policies.policy import DiffusionPolicy

from .bench_core import load_policy

DEFAULT_OUT = Path("outputs") / "gpu_graphs.json"
CHECKPOINTS = Path(__file__).resolve().parents[1] / "policies" / "checkpoints"
HEADS = {"gr00t": ("flow", 4), "pi0": ("flow", 4), "rdt": ("dpm", 4)}
REPO = Path(__file__).resolve().parents[1]


def observation(policy: DiffusionPolicy, device: str) -> dict:
    """A batch-1 observation: the DP-T's state history (and task), or a head's state, camera images and an
    instruction from its language cache (as tests/policies/test_vla.py builds them)."""
    g = torch.Generator().manual_seed(0)
    if not policy.config.is_vla:
        obs = {"observation.state": torch.randn(1, policy.n_obs_steps, policy.state_dim, generator=g).to(device)}
        return obs | ({"task": policy.tasks[0]} if policy.tasks else {})
    features = policy.config.to_dict()["input_features"]
    obs = {"observation.state": torch.randn(1, policy.n_obs_steps, policy.state_dim, generator=g).to(device),
           "task": [next(iter(policy.language.entries))]}
    for key, spec in features.items():
        if spec["type"] == "image":
            obs[key] = torch.rand(1, *spec["shape"], generator=g).to(device)
    return obs


def configurations(label: str, policy: DiffusionPolicy) -> dict[str, DiffusionPolicy]:
    """Uncached and cached (uniform M=2) views, each with its own denoiser (a plan is applied to it)."""
    kind, steps = ("ddim", 4) if label == "paper-dpt" else HEADS[label]
    plain = policy.with_sampler(kind, steps)
    cached = copy.deepcopy(policy).with_sampler(kind, steps)
    cached.accelerate(bac.make_plan(cached.model, "uniform", num_steps=steps, M=2, scheduler=cached.sampler))
    name = f"{kind}-{steps}"
    return {name: plain, f"uniform-M2-{name}": cached}


def bench_model(label: str, policy: DiffusionPolicy, device: str, repeats: int, dry_run: bool) -> dict:
    obs = observation(policy, device)
    backend = "aot_eager" if dry_run else "inductor"  # the dry run checks the plumbing, not the kernels
    generator = lambda: torch.Generator(device).manual_seed(0)
    calls, build, views = {}, {}, configurations(label, policy)
    for name, view in views.items():
        calls[f"eager/{name}"] = view
        started = time.perf_counter()
        graphed = view.compile_call(batch=1, backend=backend, mode=None if dry_run else "reduce-overhead")
        build[f"cuda_graph/{name}"] = time.perf_counter() - started
        calls[f"cuda_graph/{name}"] = graphed
        if bac.get_handle(view.model) is None:
            compiled = copy.deepcopy(view)
            compiled.model.compile(backend=backend)
            calls[f"model_compiled/{name}"] = compiled
    with torch.no_grad():
        outputs = {}
        for key, p in calls.items():  # the first call builds what is lazy (a head's prefix graph, torch.compile)
            started = time.perf_counter()
            outputs[key] = p.predict_action_chunk(obs, generator=generator())
            synchronize(device)
            build[key] = build.get(key, 0.0) + time.perf_counter() - started
        times = {key: [] for key in calls}
        order = list(calls)
        for r in range(repeats):
            for key in order[r % len(order):] + order[: r % len(order)]:
                synchronize(device)
                start = time.perf_counter()
                calls[key].predict_action_chunk(obs, generator=generator())
                synchronize(device)
                times[key].append(time.perf_counter() - start)
        precision = {}
        for name, view in views.items():
            reference = outputs[f"eager/{name}"]
            for dtype in (torch.float16, torch.bfloat16):
                with torch.autocast(torch.device(device).type, dtype=dtype):
                    half = view.predict_action_chunk(obs, generator=generator())
                precision[f"{name}/{str(dtype).removeprefix('torch.')}"] = _deviation(half.float(), reference)
    rows = {}
    for key, t in times.items():
        mode, name = key.split("/", 1)
        rows[key] = {**summarize(t), "build_seconds": build[key]}
        if mode != "eager":
            rows[key]["max_relative_deviation_vs_eager"] = _deviation(outputs[key], outputs[f"eager/{name}"])
            rows[key]["speedup_vs_eager"] = rows[f"eager/{name}"]["p50_ms"] / rows[key]["p50_ms"]
    return {"rows": rows, "precision_max_relative_deviation_vs_fp32": precision,
            "parameters": sum(p.numel() for p in policy.model.parameters())}


def _deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def cuda_graph_test() -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/policies/test_graph_call.py",
               "-k", "cuda"]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=240)
    return {"command": " ".join(command[2:]), "returncode": done.returncode,
            "seconds": time.perf_counter() - started, "summary": (done.stdout.strip().splitlines() or [""])[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_graphs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--budget-seconds", type=float, default=270.0,
                        help="start no further model after this many seconds (the test still runs)")
    parser.add_argument("--dry-run", action="store_true", help="on CPU: 2 repeats, aot_eager, no CUDA graphs")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_graphs needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "--dry-run checks the script on CPU")
    device = "cpu" if args.dry_run else "cuda"
    repeats = 2 if args.dry_run else args.repeats
    started = time.perf_counter()
    results, skipped = {}, []
    for label in ["paper-dpt", *HEADS]:
        if time.perf_counter() - started > args.budget_seconds:
            skipped.append(label)
            continue
        policy = load_policy("paper") if label == "paper-dpt" else DiffusionPolicy.load(CHECKPOINTS / f"{label}-metaworld")
        print(f"{label} ...", flush=True)
        results[label] = bench_model(label, policy.to(device).eval(), device, repeats, args.dry_run)
        for key, row in results[label]["rows"].items():
            print(f"  {key:<36}{row['p50_ms']:9.2f} ms {row['hz']:8.1f} Hz  build {row['build_seconds']:6.1f} s", flush=True)
    report = {
        "benchmark": "gpu_graphs", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "batch": 1, "repeats": repeats, "interleaved": True, "results": results, "skipped_over_budget": skipped,
        "precision_method": "torch.autocast(dtype) around the eager call, against the float32 call's actions",
        "cuda_graph_test": cuda_graph_test(),
        "seconds": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.version.cuda if device == "cuda" else None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"CUDA-graph test: {report['cuda_graph_test']['summary']}; report: {args.out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
