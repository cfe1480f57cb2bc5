"""Batch-1 latency of one policy call per method, interleaved in one process, and FLOPs per call."""
from __future__ import annotations

import time

import numpy as np
import torch

import bac
from policies.policy import DiffusionPolicy

from .methods import Method, applied


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    policy: DiffusionPolicy,
    methods: list[Method],
    plans: dict[str, bac.Plan],
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
            with applied(policy, method, plans.get(method.name)):
                for _ in range(warmup):
                    policy.predict_action(obs, task, generator=generator)
        for r in range(repeats):
            shift = r % len(methods)
            for method in methods[shift:] + methods[:shift]:
                with applied(policy, method, plans.get(method.name)):
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


def flops_per_call(policy: DiffusionPolicy, methods: list[Method], plans: dict[str, bac.Plan], obs: torch.Tensor,
                   task: str | None) -> tuple[int, dict[str, int]]:
    """FLOPs of one full denoiser call (measured), and of one policy call per method."""
    probe = bac.make_plan(policy.model, "every-step", num_steps=1)
    cond = policy.condition(obs, task)
    sample = torch.zeros(obs.shape[0], policy.horizon, policy.action_dim, device=policy.device)
    with bac.accelerate(policy.model, probe) as handle:
        per_block = handle.measure_flops(sample, policy.sampler.timesteps[0], cond)
    total = per_block.pop("total")
    non_block = total - sum(per_block.values())
    result = {}
    for method in methods:
        plan = plans.get(method.name)
        if plan is None:
            result[method.name] = method.steps * total
        else:
            result[method.name] = method.steps * non_block + sum(
                len(b.update_steps) * per_block[b.name] for b in plan.blocks
            )
    return total, result
