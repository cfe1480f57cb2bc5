"""The evaluator behind ``python -m bac.eval``: success and control frequency for every method.

Data path: load the policy checkpoint -> calibration observations from the
demonstrations -> load or calibrate the plans (cached next to the checkpoint)
-> seeded, paired, vectorised rollouts per task and method (appended as JSON
lines, resumable) -> interleaved batch-1 latency -> report JSON, Markdown table
and plots in the output directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import bac
from bac.envs.collect import collect
from bac.envs.dataset import calibration_observations
from bac.envs.metaworld_env import ALL_TASKS
from bac.policies.policy import DiffusionPolicy

from . import report as reporting
from .closed_loop import run_task
from .latency import flops_per_call, measure_latency, summarize
from .methods import applied, load_or_make_schedule, parse_methods, plan_path

REPO = Path(__file__).resolve().parents[1]
UNTRAINED = "untrained:"


class EvalError(Exception):
    """A bad setting: reported as one clear line and a non-zero exit."""


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def weights_digest(checkpoint: Path) -> str:
    """Short SHA-256 of a checkpoint's weights: retrained weights of the same shape get a new one."""
    digest = hashlib.sha256()
    with open(checkpoint / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_policy(cfg: DictConfig) -> tuple[DiffusionPolicy, Path, bool]:
    """The policy to evaluate, where its plans are cached, and whether it is trained.

    Plans and calibration of a checkpoint live in ``<checkpoint>/plans/<weights digest>/``:
    their fit check compares the model's structure only, so a retrained checkpoint of the
    same shape must not find (and silently reuse) the plans of its predecessor.
    """
    if str(cfg.checkpoint).startswith(UNTRAINED):
        name = str(cfg.checkpoint)[len(UNTRAINED):]
        config_path = REPO / "configs" / "policy" / f"{name}.yaml"
        if not config_path.exists():
            raise EvalError(f"unknown policy config {name!r} (no {config_path.relative_to(REPO)})")
        spec = OmegaConf.load(config_path)
        tasks = list(cfg.untrained_tasks)
        torch.manual_seed(0)  # deterministic random weights, so cached plans stay valid
        policy = DiffusionPolicy(spec.architecture, OmegaConf.to_container(spec.model), obs_dim=39, action_dim=4,
                                 tasks=tasks, provenance={"untrained": name})
        obs = np.concatenate([calibration_observations(collect(t, cfg.calibration.episodes, progress=False), 256)
                              for t in tasks])
        policy.obs_normalizer.fit(obs)  # actions keep the identity normalisation: Meta-World's are in [-1, 1]
        return policy.to(cfg.device).eval(), REPO / "outputs" / "eval" / f"untrained-{name}" / "plans", False
    directory = _resolve(cfg.checkpoint)
    try:
        policy = DiffusionPolicy.load(directory, device=cfg.device)
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    return policy, directory / "plans" / weights_digest(directory), True


def resolve_tasks(cfg: DictConfig, policy: DiffusionPolicy) -> list[str]:
    tasks = list(cfg.tasks)
    if tasks == ["suite"]:
        tasks = list(policy.tasks)
    for task in tasks:
        if task not in ALL_TASKS:
            raise EvalError(f"unknown task {task!r}; Meta-World tasks include {', '.join(ALL_TASKS[:8])}, ...")
        if policy.tasks and task not in policy.tasks:
            raise EvalError(f"the policy was trained on {policy.tasks}, not on {task!r}")
    if not tasks:
        raise EvalError("no tasks to evaluate")
    return tasks


def calibration_batch(cfg: DictConfig, policy: DiffusionPolicy) -> tuple[torch.Tensor, list[str]]:
    """Calibration observations from the demonstrations (never from evaluation episodes), spread over tasks."""
    tasks = policy.tasks or [cfg.tasks[0]]
    per_task = -(-int(cfg.calibration.samples) // len(tasks))
    obs, names = [], []
    for task in tasks:
        path = collect(task, cfg.calibration.episodes, progress=False)
        obs.append(calibration_observations(path, per_task, seed=cfg.calibration.seed, n_obs_steps=policy.n_obs_steps))
        names += [task] * per_task
    return torch.as_tensor(np.concatenate(obs), dtype=torch.float32), names


def load_or_calibrate(cfg: DictConfig, policy: DiffusionPolicy, plan_dir: Path,
                      batch: tuple[torch.Tensor, list[str]]) -> bac.Calibration:
    path = plan_dir / (f"calibration-{policy.sampler_kind}{policy.num_inference_steps}"
                       f"-n{cfg.calibration.samples}-seed{cfg.calibration.seed}.safetensors")
    if path.exists() and not cfg.calibration.recompute:
        calibration = bac.Calibration.load(path)
        fingerprint = bac.describe(policy.model).fingerprint
        if calibration.fingerprint != fingerprint or calibration.scheduler != bac.scheduler_id(policy.sampler):
            raise EvalError(f"cached calibration {path} was made for another policy or sampler; "
                            "re-run with calibration.recompute=true to replace it")
        return calibration
    obs, names = batch
    task = names if len(policy.tasks) > 1 else None
    calibration = bac.calibrate(policy.model, lambda o: policy.predict_action(o, task), [obs],
                                seed=cfg.calibration.seed, scheduler=policy.sampler)
    calibration.save(path)
    return calibration


def settings_digest(cfg: DictConfig) -> str:
    keys = ("checkpoint", "tasks", "episodes", "seed", "sampler", "methods", "run_methods", "calibration", "M", "n")
    relevant = {k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in keys}
    relevant["calibration"] = {k: v for k, v in relevant["calibration"].items() if k != "recompute"}
    checkpoint = _resolve(str(cfg.checkpoint))
    if (checkpoint / "model.safetensors").is_file():  # a retrained checkpoint is another run
        relevant["weights"] = weights_digest(checkpoint)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


def output_dir(cfg: DictConfig) -> Path:
    if cfg.out_dir != "auto":
        return Path(cfg.out_dir)
    name = str(cfg.checkpoint).replace(UNTRAINED, "untrained-").rstrip("/").split("/")[-1]
    return REPO / "outputs" / "eval" / f"{name}-{settings_digest(cfg)}"


def _versions() -> dict:
    names = ("torch", "diffusers", "gymnasium", "metaworld", "mujoco", "numpy", "hydra-core", "bac")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run(cfg: DictConfig) -> dict:
    policy, plan_dir, trained = load_policy(cfg)
    tasks = resolve_tasks(cfg, policy)
    try:
        policy.set_sampler(cfg.sampler.kind, cfg.sampler.steps)
    except ValueError as err:
        raise EvalError(str(err)) from err
    base_sampler, base_steps = policy.sampler_kind, policy.num_inference_steps
    method_config = OmegaConf.to_container(cfg.methods, resolve=True)
    demo_obs = calibration_batch(cfg, policy)

    try:
        methods = parse_methods(method_config, cfg.run_methods, base_sampler, base_steps, auto_steps=base_steps)
        needs_calibration = any(m.cache_method and bac.methods.needs_calibration(m.cache_method) for m in methods)
        calibration = load_or_calibrate(cfg, policy, plan_dir, demo_obs) if needs_calibration else None
        plans: dict[str, bac.Plan | bac.Method] = {}
        for method in methods:
            if method.cache_method is not None:
                if (method.sampler, method.steps) != (base_sampler, base_steps):
                    raise EvalError(f"method {method.name!r}: caching runs on the base sampler "
                                    f"({base_sampler}, {base_steps} steps)")
                policy.set_sampler(method.sampler, method.steps)
                plans[method.name] = load_or_make_schedule(policy, method, calibration, plan_dir,
                                                           cfg.calibration.recompute)
    except (ValueError, bac.PlanMismatchError) as err:
        raise EvalError(str(err)) from err

    latency_obs = demo_obs[0][:1].to(policy.device)  # batch 1: one demonstration observation
    latency_task = demo_obs[1][0] if len(policy.tasks) > 1 else None
    per_step, flops, skipped = flops_per_call(policy, methods, plans, latency_obs, latency_task)
    auto = [m.name for m in methods if method_config[m.name].get("steps") == "auto"]
    if auto:  # as many steps as the bac method costs
        if "bac" not in plans:
            raise EvalError(f"method(s) {auto} have steps=auto, which needs the 'bac' method in the same run")
        matched = max(1, round(flops["bac"] / per_step))
        methods = [dataclasses.replace(m, steps=matched) if m.name in auto else m for m in methods]
        flops |= {name: matched * per_step for name in auto}
    full_flops = base_steps * per_step

    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    digest = settings_digest(cfg)
    if run_file.exists() and json.loads(run_file.read_text()).get("digest") != digest:
        raise EvalError(f"{out} holds a run with other settings; pick another out_dir (or out_dir=auto)")
    run_file.write_text(json.dumps({"digest": digest, "config": OmegaConf.to_container(cfg, resolve=True)}, indent=1))

    # Closed-loop success, paired over seeds.
    episodes: dict[str, list[dict]] = {m.name: [] for m in methods}
    seeds = range(int(cfg.seed), int(cfg.seed) + int(cfg.episodes))
    log_path = out / "episodes.jsonl"
    if trained and cfg.episodes > 0:
        for task in tasks:
            task_arg = task if len(policy.tasks) > 1 else None
            for method in methods:
                with applied(policy, method, plans.get(method.name)):
                    episodes[method.name] += run_task(
                        lambda obs, g: policy.predict_action(obs, task_arg, generator=g), task, method.name, seeds,
                        log_path, n_obs_steps=policy.n_obs_steps, num_envs=int(cfg.num_envs), device=policy.device,
                        max_episode_steps=cfg.max_episode_steps, progress=cfg.progress,
                    )

    latencies = measure_latency(policy, methods, plans, latency_obs, latency_task, repeats=int(cfg.latency.repeats),
                                warmup=int(cfg.latency.warmup), threads=int(cfg.latency.threads))
    reference = "full" if "full" in latencies else methods[0].name
    full_p50 = float(np.median(latencies[reference]))
    result = {
        "schema": reporting.REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bac.eval " + " ".join(sys.argv[1:]),
        "out_dir": str(out),
        "policy": {"checkpoint": str(cfg.checkpoint), "architecture": policy.architecture, "trained": trained,
                   "tasks": policy.tasks, "model": policy.model_kwargs,
                   "training_step": policy.provenance.get("step")},
        "environment": {"benchmark": "Meta-World v3, goal-observable, state observations", "tasks": tasks,
                        "episodes_per_task": int(cfg.episodes) if trained else 0,
                        "seeds": [int(cfg.seed), int(cfg.seed) + int(cfg.episodes) - 1] if cfg.episodes > 0 else [],
                        "noise_seed": "per wave of num_envs episodes: its first episode seed"},
        "sampler": {"kind": base_sampler, "steps": base_steps},
        "calibration": (calibration.facts() | {"from": "demonstrations", "file_dir": str(plan_dir)})
        if calibration else None,
        "latency_settings": {"batch": 1, "threads": int(cfg.latency.threads), "repeats": int(cfg.latency.repeats),
                             "warmup": int(cfg.latency.warmup), "device": str(policy.device), "interleaved": True},
        "reference_method": reference,
        "methods": {},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0]},
        "packages": _versions(),
    }
    for method in methods:
        entry = {
            "config": method.describe(),
            "plan_file": str(plan_path(plan_dir, method)) if method.plan_file else None,
            "latency": summarize(latencies[method.name]),
            "speedup": full_p50 / float(np.median(latencies[method.name])),
            "flops_per_call": int(flops[method.name]),
            "ideal_speedup": full_flops / flops[method.name],
            "skipped_share": skipped[method.name],
        }
        if episodes[method.name]:
            entry["success"] = reporting.success_summary(episodes[method.name])
            entry["per_task"] = {t: reporting.success_summary([e for e in episodes[method.name] if e["task"] == t])
                                 for t in tasks}
            entry["paired_vs_full"] = reporting.paired_difference(episodes[method.name], episodes[reference])
        result["methods"][method.name] = entry
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(reporting.markdown(result))
    bac_plan = next((plans[m.name] for m in methods if m.cache_method == "bac" and m.plan_file), None)
    result["plots"] = reporting.plots(result, latencies, out, bac_plan)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
