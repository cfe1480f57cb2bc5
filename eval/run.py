"""The evaluator's main job behind ``python -m bac.eval``: success and control frequency for every method.

Data path: load the policy checkpoint -> calibration observations from the
demonstrations -> load or calibrate the plans (cached under ``plan_cache``)
-> seeded, paired, vectorised rollouts per task and method (appended as JSON
lines, resumable) -> interleaved batch-1 latency -> report JSON, Markdown table
and plots in the output directory.

Only the orchestration lives here: the settings and output folder in :mod:`.settings`, what a run starts
from in :mod:`.setup`, the digests and package versions in :mod:`.provenance`, the budget plans in
:mod:`.budget`.
"""
from __future__ import annotations

import importlib
import json
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

import bac
from bac.envs.metaworld_env import make_vector_env
from bac.envs.video import video_path, write_video
from bac.policies.policy import DiffusionPolicy
from bac.runtime import EnvPool, record_episode

from . import report as reporting
from . import shards
from .budget import budget_plans
from .closed_loop import run_task
from .latency import CAPABLE_USER, PREFIX, WARM_CALL, WARM_CALL_EVALUATIONS, measure_latency, per_call
from .provenance import package_versions, settings_digest
from .realtime import check_realtime_settings
from .settings import RECORDED_SETTINGS, EvalError, claim_out_dir, output_dir
from .setup import FlopCount, Setup, count_flops, episode_instructions, prepare, run_instructions
from .timing import summarize
from .variants import Compilation, applied, torch_compile_unavailable, wave_sizes


# Names this module held while it doubled as a library: deprecated here, each in its own module now.
# ``weights_digest`` is ``provenance.checkpoint_digest`` now: bac.adapters.weights_digest is the model's.
MOVED = {
    "weights_digest": "provenance.checkpoint_digest",
    "SETTINGS": "settings", "UNTRAINED": "settings", "check_eval_settings": "settings", "apply_threads": "settings",
    "load_policy": "setup", "resolve_tasks": "setup", "INSTRUCTION_SETS": "setup", "calibration_settings": "setup",
    "calibration_batch": "setup", "image_calibration_batch": "setup", "load_or_calibrate": "setup",
    "tuned_variant": "setup",
    "budget_path": "budget",
}

def __getattr__(name: str):
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home, _, new_name = MOVED[name].partition(".")
    new = f"bac.evaluation.{home}.{new_name or name}"
    warnings.warn(f"bac.evaluation.run.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"bac.evaluation.{home}"), new_name or name)


def run(cfg: DictConfig) -> dict:
    check_realtime_settings(cfg)  # realtime.* are the main job's settings too: a typo there is refused as well
    setup = prepare(cfg)  # every other setting is checked first, before any work (eval/preflight.py)
    out = output_dir(cfg)
    try:
        made, budgets = budget_plans(cfg, setup.policy, setup.variants, setup.built, setup.calibrations,
                                     setup.latency_batch, out)
    except (ValueError, bac.PlanMismatchError) as err:
        raise EvalError(str(err)) from err
    built = {**setup.built, **made}
    counted = count_flops(setup, setup.variants, built)

    claim_out_dir(cfg, out, settings_digest(cfg), RECORDED_SETTINGS)
    # Compiled calls are built for every batch size the run calls with: its waves, and batch 1 (latency, videos).
    episodes = int(cfg.episodes) if setup.trained else 0
    with Compilation(cfg.compile, cfg.backend, [1, *wave_sizes(episodes, int(cfg.num_envs))],
                     run_instructions(cfg, setup.policy, setup.tasks)) as compilation:
        return closed_loop(cfg, setup, out, built, budgets, counted, compilation)


def closed_loop(cfg: DictConfig, setup: Setup, out: Path, built: dict[str, bac.Method], budgets: dict,
                counted: FlopCount, compilation: Compilation) -> dict:
    """The episodes of this run's (or shard's) cells, then, once every shard's are logged, the report."""
    variants = counted.variants

    # Closed-loop success, paired over seeds; a shard runs its share of the cells (eval/shards.py).
    seeds = list(range(int(cfg.seed), int(cfg.seed) + int(cfg.episodes)))
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    cells = [(task, v.name) for task in setup.tasks for v in variants]
    mine = set(shards.shard_cells(cells, index, count))
    seconds = dict(setup.seconds)
    if setup.trained and cfg.episodes > 0:
        logged = shards.logged_episodes(out)
        log_path = shards.log_path(out, index, count)
        by_name = {v.name: v for v in variants}
        start = time.perf_counter()
        with EnvPool(make_vector_env) as envs:  # one set of environments per task, shared by every method
            for task, name in (cell for cell in cells if cell in mine):
                with applied(setup.policy, by_name[name], built.get(name), compilation) as (policy, _):
                    run_task(policy, task, name, seeds, log_path, num_envs=int(cfg.num_envs),
                             max_episode_steps=cfg.max_episode_steps, progress=cfg.progress,
                             instructions=episode_instructions(cfg, policy, task), envs=envs, logged=logged)
        seconds["rollouts"] = time.perf_counter() - start
        left = shards.missing(out, cells, seeds)
        if count > 1 and (left or not shards.claim_report(out)):  # another shard still runs, or reports
            print(f"[bac.eval] shard {index} of {count} done in {out}; {left} episodes of other shards to go"
                  + ("" if left else "; another shard writes the report"))
            return {"out_dir": str(out), "shard": {"index": index, "count": count, "episodes_left": left}}
    try:
        return report(cfg, setup, out, built=built, budgets=budgets, counted=counted, seeds=seeds, seconds=seconds,
                      compilation=compilation)
    finally:
        if count > 1:
            shards.release_report(out)


def report(cfg: DictConfig, setup: Setup, out: Path, *, built: dict[str, bac.Method], budgets: dict,
           counted: FlopCount, seeds: list[int], seconds: dict, compilation: Compilation) -> dict:
    """Latency of every variant (interleaved, batch 1) and the report of the episodes logged in ``out``.

    ``built``: every caching variant's method (``budgets``: what the budget plans were made for); ``counted``:
    the variants (steps resolved) and their FLOPs; ``seconds``: the run's wall time per phase so far;
    ``compilation``: how the calls run."""
    policy, variants = setup.policy, counted.variants
    episodes: dict[str, list[dict]] = {v.name: [] for v in variants}
    if setup.trained and cfg.episodes > 0:
        logged = {(e["task"], e["method"], e["seed"]): e for e in shards.logged_episodes(out)}
        for v in variants:
            episodes[v.name] = [logged[(task, v.name, seed)] for task in setup.tasks for seed in seeds]
    videos = save_videos(cfg, policy, variants, built, setup.tasks, out, compilation) \
        if setup.trained and cfg.video else []

    # the capable user's torch.compile(model) rows, unless torch.compile cannot compile here (said, not hidden)
    capable_user = bool(cfg.latency.get("capable_user", False))
    capable_user_skipped = torch_compile_unavailable(cfg.device) if capable_user else None
    if capable_user_skipped:
        capable_user = False
        print(f"[bac.eval] the capable user's configuration is not timed: {capable_user_skipped}", file=sys.stderr)
    start = time.perf_counter()
    latencies = measure_latency(policy, variants, built, setup.latency_batch, repeats=int(cfg.latency.repeats),
                                warmup=int(cfg.latency.warmup), threads=int(cfg.latency.threads),
                                compilation=compilation, capable_user=capable_user)
    seconds = {**seconds, "latency": time.perf_counter() - start}
    build_seconds = compilation.build_seconds()
    prefix_times = latencies.pop(PREFIX, None)
    compiled_baselines = {v.name: latencies.pop(CAPABLE_USER.format(v.name)) for v in variants
                          if CAPABLE_USER.format(v.name) in latencies}
    warm = {v.name: warm_starts(v, episodes[v.name], latencies, counted) for v in variants if v.warm is not None}
    reference = "full" if "full" in latencies else variants[0].name
    full_p50 = float(np.median(latencies[reference]))
    result = {
        "schema": reporting.REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bac.eval " + " ".join(sys.argv[1:]),
        "out_dir": str(out),
        "policy": {"checkpoint": str(cfg.checkpoint), "architecture": policy.architecture, "trained": setup.trained,
                   "tasks": policy.tasks, "model": policy.model_kwargs,
                   "training_step": policy.provenance.get("step")},
        "environment": {"benchmark": "Meta-World v3, goal-observable, " + (
                            f"images ({', '.join(policy.cameras)}) and instructions ({cfg.instructions})"
                            if policy.cameras else "state observations"), "tasks": setup.tasks,
                        "episodes_per_task": int(cfg.episodes) if setup.trained else 0,
                        "seeds": [int(cfg.seed), int(cfg.seed) + int(cfg.episodes) - 1] if cfg.episodes > 0 else [],
                        "noise_seed": "per wave of num_envs episodes: its first episode seed"},
        "sampler": {"kind": setup.base_sampler, "steps": setup.base_steps},
        "calibration": {key: c.facts() | {"from": "demonstrations", "inputs": setup.calibration_inputs,
                                          "file_dir": str(setup.plan_dir)}
                        for key, c in setup.calibrations.items()} or None,
        "compile": {"mode": compilation.mode, "backend": compilation.backend,
                    "batch_sizes": compilation.batch_sizes if compilation.mode == "whole" else None},
        "latency_settings": {"batch": 1, "threads": int(cfg.latency.threads), "repeats": int(cfg.latency.repeats),
                             "warmup": int(cfg.latency.warmup), "device": str(policy.device), "interleaved": True},
        "reference_method": reference,
        # A VLA head's vision-language prefix runs once per call and caching never touches it: its share of a
        # call bounds the end-to-end speedup (the speedups below are end to end).
        "prefix": None if prefix_times is None else {
            "latency": summarize(prefix_times), "share_of_reference": float(np.median(prefix_times)) / full_p50},
        "videos": videos,
        # this invocation's wall time per phase (a resumed run counts only the episodes it ran)
        "wall_seconds": {key: round(value, 2) for key, value in seconds.items()},
        "threads": torch.get_num_threads(),
        "methods": {},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0]},
        "packages": package_versions(),
    }
    for variant in variants:
        calls = warm.get(variant.name)  # a warm-started variant's, per call: between its cold and its warm call
        flops = calls["flops_per_call"] if calls else int(counted.flops[variant.name])
        entry = {
            "config": variant.describe(),
            "plan_file": None if (plan := setup.plan_file(variant, out)) is None else str(plan),
            "latency": summarize(latencies[variant.name]),
            "speedup": full_p50 / float(np.median(latencies[variant.name])),
            "flops_per_call": flops,
            # FLOPs of the reference (full computation of the base sampler, or the first method) per call
            "ideal_speedup": (counted.full_flops if reference == "full" else counted.flops[reference]) / flops,
            "skipped_share": counted.skipped[variant.name],
            "evaluations_per_call": calls["evaluations_per_call"] if calls else float(variant.steps),
            "warm_share": calls["warm_share"] if calls else 0.0,
        }
        if calls:
            entry["warm"] = calls
        if compilation.mode == "whole":  # seconds its graphs took to build, for every batch size and thread count
            entry["graph_build_seconds"] = build_seconds.get(variant.name, 0.0)
        if variant.name in budgets:
            entry["budget"] = budgets[variant.name]
            matched = variant.params.get("match")
            if matched in episodes and episodes[variant.name]:  # the claim to check: as good at equal latency
                entry["paired_vs_matched"] = {"method": matched, **reporting.paired_difference(
                    episodes[variant.name], episodes[matched])}
        if prefix_times is not None:
            entry["prefix_share"] = float(np.median(prefix_times)) / float(np.median(latencies[variant.name]))
        if episodes[variant.name]:
            entry["success"] = reporting.success_summary(episodes[variant.name])
            entry["per_task"] = {t: reporting.success_summary([e for e in episodes[variant.name] if e["task"] == t])
                                 for t in setup.tasks}
            entry["paired_vs_full"] = reporting.paired_difference(episodes[variant.name], episodes[reference])
        result["methods"][variant.name] = entry
    # the tuner passes its evaluation no tolerance_points (it applies its own): the evaluator's default then
    result["verdict"] = reporting.verdict(result["methods"], reference, float(cfg.get("tolerance_points", 2.0)))
    result["capable_user"] = reporting.capable_user(result["methods"], compiled_baselines, reference,
                                                    float(cfg.get("tolerance_points", 2.0)))
    if capable_user_skipped:
        result["capable_user_not_timed"] = capable_user_skipped
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(reporting.markdown(result))
    bac_plan = next((built[v.name].schedule for v in variants if v.method == "bac"), None)
    result["plots"] = reporting.plots(result, latencies, out, bac_plan)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def warm_starts(variant, episodes: list[dict], latencies: dict[str, list[float]], counted: FlopCount) -> dict:
    """A warm-started variant's calls: what its episodes' calls did (:func:`reporting.call_counts`; without
    episodes, every call as the warm one), both measured calls, and its latency and FLOPs per call on the line
    between them at its mean evaluations per call (``latencies[variant.name]`` becomes that; the warm call's
    samples are taken out of ``latencies``)."""
    steps = variant.steps
    cold, warm = latencies[variant.name], latencies.pop(WARM_CALL.format(variant.name))
    made = latencies.pop(WARM_CALL_EVALUATIONS.format(variant.name))
    warm_call_evaluations = sum(made) / len(made)
    calls = reporting.call_counts(episodes)
    evaluations = calls["evaluations_per_call"] if calls else warm_call_evaluations
    latencies[variant.name] = per_call(cold, warm, steps, warm_call_evaluations, evaluations)
    cold_flops, warm_flops = counted.flops[variant.name], counted.warm_flops[variant.name]
    return {
        "setting": variant.warm.describe(),
        "calls": calls,  # None: no episodes
        "evaluations_per_call": evaluations,
        "warm_share": calls["warm_share"] if calls else 1.0,
        "cold_call": summarize(cold) | {"evaluations": steps, "flops": cold_flops},
        "warm_call": summarize(warm) | {"evaluations": warm_call_evaluations, "flops": warm_flops},
        "flops_per_call": round(per_call([cold_flops], [warm_flops], steps, variant.warm.warm_evaluations(steps),
                                         evaluations)[0]),
        "per_call": "latency and FLOPs linear in denoiser evaluations between the cold and the warm call, at "
                    + ("the episodes' mean evaluations per call" if calls else "the warm call's (no episodes)"),
    }


def save_videos(cfg: DictConfig, policy: DiffusionPolicy, variants: list, built: dict, tasks: list[str],
                out: Path, compilation: Compilation) -> list[dict]:
    """One rollout GIF per variant and task (``video=true``): the first evaluation seed, at batch 1.

    Existing videos are kept, so a resumed run records only what is missing.
    """
    settings, records = cfg.video_settings, []
    for variant in variants:
        for task in tasks:
            path = video_path(out, variant.name, task)
            record = {"method": variant.name, "task": task, "seed": int(cfg.seed), "path": str(path)}
            if path.exists():
                records.append(record)
                continue
            with applied(policy, variant, built.get(variant.name), compilation) as (view, _):
                generator = torch.Generator(device=policy.device).manual_seed(int(cfg.seed))
                result, frames = record_episode(view, task, int(cfg.seed), make_env=make_vector_env, generator=generator,
                                                max_episode_steps=cfg.max_episode_steps,
                                                camera_name=str(settings.camera), size=int(settings.size))
            write_video(frames, path, fps=float(settings.fps))
            records.append(record | result)
    return records
