"""Batch-1 latency of one policy call per method, interleaved in one process, and FLOPs per call."""
from __future__ import annotations

import time

import numpy as np
import torch

import bac
from bac.policies.policy import DiffusionPolicy

from .methods import Method, applied


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    policy: DiffusionPolicy,
    methods: list[Method],
    schedules: dict[str, bac.Plan | bac.Method],
    obs: torch.Tensor,
    task: str | None,
    *,
    repeats: int,
    warmup: int,
    threads: int,
) -> dict[str, list[float]]:
    """Seconds per ``predict_action`` call at batch 1; methods take turns, the first one rotating."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator(device=policy.device).manual_seed(0)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    try:
        for method in methods:
            with applied(policy, method, schedules.get(method.name)):
                for _ in range(warmup):
                    policy.predict_action(obs, task, generator=generator)
        for r in range(repeats):
            shift = r % len(methods)
            for method in methods[shift:] + methods[:shift]:
                with applied(policy, method, schedules.get(method.name)):
                    _synchronize(policy.device)
                    start = time.perf_counter()
                    policy.predict_action(obs, task, generator=generator)
                    _synchronize(policy.device)
                    times[method.name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return times


def summarize(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "repeats": int(ms.size),
        "hz": float(1e3 / np.median(ms)),
    }


def flops_per_call(policy: DiffusionPolicy, methods: list[Method], schedules: dict[str, bac.Plan | bac.Method],
                   obs: torch.Tensor, task: str | None) -> tuple[int, dict[str, int], dict[str, float]]:
    """FLOPs of one full denoiser call (measured), and per method FLOPs and skipped share of one policy call.

    Static plans are counted from the plan; runtime rules decide from the data, so they are
    counted from what one policy call on ``obs`` really computed.
    """
    probe = bac.make_plan(policy.model, "every-step", num_steps=1)
    cond = policy.condition(obs, task)
    sample = torch.zeros(obs.shape[0], policy.horizon, policy.action_dim, device=policy.device)
    with bac.accelerate(policy.model, probe) as handle:
        per_block = handle.measure_flops(sample, policy.sampler.timesteps[0], cond)
    total = per_block.pop("total")
    non_block = total - sum(per_block.values())
    flops, skipped = {}, {}
    for method in methods:
        schedule = schedules.get(method.name)
        plan = schedule.schedule if isinstance(schedule, bac.Method) else schedule
        if schedule is None:
            computed = {name: method.steps for name in per_block}
        elif isinstance(plan, bac.Plan):
            computed = {b.name: len(b.update_steps) for b in plan.blocks}
        else:
            with applied(policy, method, schedule) as handle:
                policy.predict_action(obs, task, generator=torch.Generator(device=policy.device).manual_seed(0))
                computed = {name: b["computed"] for name, b in handle.stats()["per_block"].items()}
        flops[method.name] = method.steps * non_block + sum(n * per_block[name] for name, n in computed.items())
        skipped[method.name] = 1 - sum(computed.values()) / (method.steps * len(per_block))
    return total, flops, skipped
