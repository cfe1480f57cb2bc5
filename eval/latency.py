"""Batch-1 latency of one policy call per method, interleaved in one process, and FLOPs per call.

A warm-started method is timed at two points: its cold call (every step: an episode's first call, or one that
cannot warm-start) under its own name, and its warm call (:data:`WARM_CALL`: a caller-kept
:class:`~bac.policies.warm.WarmState` primed with one call on the same observation). Its latency per call is
the line between the two, by denoiser evaluations, at the mean evaluations per call its episodes made
(:func:`per_call`); its FLOPs likewise (:func:`flops_per_call` counts both points)."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import bac
from bac.flops import executed_flops
from bac.policies.constants import STATE
from bac.policies.policy import Batch, DiffusionPolicy
from bac.policies.warm import WarmState

from .timing import synchronize
from . import variants
from .variants import Compilation, Variant, applied


PREFIX = "vision-language prefix"
#: The key of an uncached method's latency with its denoiser under ``torch.compile``: what a capable user
#: deploys without bac (the whole model compiled, the sampling loop in Python).
CAPABLE_USER = "{} + torch.compile(model)"
#: The keys of a warm-started method's warm calls: their seconds, and the denoiser evaluations each made.
WARM_CALL = "{} (warm call)"
WARM_CALL_EVALUATIONS = "{} (warm call evaluations)"


def capable_user_view(policy: DiffusionPolicy, method: Variant) -> DiffusionPolicy:
    """``method`` (uncached) with the whole denoiser ``torch.compile``-d, as a user would run it without bac;
    the policy's own denoiser stays as it is."""
    view = policy.with_sampler(method.sampler, method.steps)
    view.model = torch.compile(view.model, dynamic=False, backend=variants.TORCH_COMPILER)
    return view


def measure_latency(
    policy: DiffusionPolicy,
    methods: list[Variant],
    schedules: dict[str, bac.Method],
    batch: Batch,
    *,
    repeats: int,
    warmup: int,
    threads: int,
    compilation: Compilation | None = None,
    capable_user: bool = False,
) -> dict[str, list[float]]:
    """Seconds per ``predict_action_chunk(batch)`` call (a batch of 1); methods take turns, the first one rotating.
    ``compilation``: how the calls run (:func:`applied`; ``None``: eagerly). A compiled call's graphs are built
    in its warm-up (at least one call), never in a timed call.

    For a policy that reads images, also :data:`PREFIX`: the seconds of ``policy.condition(batch)`` alone
    (the observation prefix a VLA head encodes once per call), timed in the same rotation. ``capable_user``:
    also every uncached cold method as :data:`CAPABLE_USER` (:func:`capable_user_view`), in the same rotation.
    A warm-started method's warm call is timed right after its cold call (:data:`WARM_CALL`, with the
    evaluations each made under :data:`WARM_CALL_EVALUATIONS`).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator(device=policy.device).manual_seed(0)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    warm_states = {m.name: WarmState() for m in methods if m.warm is not None}  # kept across the rotation
    times |= {key.format(name): [] for name in warm_states for key in (WARM_CALL, WARM_CALL_EVALUATIONS)}
    if policy.cameras:
        times[PREFIX] = []
    compiled = compilation is not None and compilation.mode != "none"
    baselines = {CAPABLE_USER.format(m.name): capable_user_view(policy, m)
                 for m in methods if capable_user and schedules.get(m.name) is None and m.warm is None}
    times |= {name: [] for name in baselines}

    def timed(view: DiffusionPolicy, name: str, state: WarmState | None = None) -> None:
        synchronize(policy.device)
        start = time.perf_counter()
        view.predict_action_chunk(batch, generator=generator, warm_state=state)
        synchronize(policy.device)
        times[name].append(time.perf_counter() - start)

    try:
        for method in methods:
            with applied(policy, method, schedules.get(method.name), compilation) as (view, _):
                for _ in range(max(warmup, 1) if compiled else warmup):
                    view.predict_action_chunk(batch, generator=generator)
                if method.name in warm_states:  # the first call on this observation primes the warm ones
                    view.predict_action_chunk(batch, generator=generator, warm_state=warm_states[method.name])
        for view in baselines.values():  # torch.compile compiles on the first calls: never in a timed one
            for _ in range(max(warmup, 2)):
                view.predict_action_chunk(batch, generator=generator)
        for r in range(repeats):
            shift = r % len(methods)
            for method in methods[shift:] + methods[:shift]:
                with applied(policy, method, schedules.get(method.name), compilation) as (view, _):
                    timed(view, method.name)
                    if method.name in warm_states:
                        state = warm_states[method.name]
                        evaluations = state.evaluations
                        timed(view, WARM_CALL.format(method.name), state)
                        times[WARM_CALL_EVALUATIONS.format(method.name)].append(state.evaluations - evaluations)
                baseline = CAPABLE_USER.format(method.name)
                if baseline in baselines:
                    timed(baselines[baseline], baseline)
            if policy.cameras:
                with torch.no_grad():
                    synchronize(policy.device)
                    start = time.perf_counter()
                    policy.condition(batch)
                    synchronize(policy.device)
                    times[PREFIX].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return times


def per_call(cold: list[float], warm: list[float], steps: int, warm_evaluations: float,
             evaluations: float) -> list[float]:
    """Per repeat, the cost of a call of ``evaluations`` denoiser evaluations on the line through the cold call
    (``steps`` evaluations, ``cold``) and the warm call (``warm_evaluations``, ``warm``); the cold call where
    the warm one made as many evaluations (it fell back cold)."""
    if warm_evaluations >= steps:
        return list(cold)
    share = (steps - evaluations) / (steps - warm_evaluations)
    return [c + (w - c) * share for c, w in zip(cold, warm)]


def warm_computed(computed: dict[str, int], plan: bac.Plan | None, steps: int, method: Variant) -> dict[str, int]:
    """Per block, the evaluations of a warm call that begins at ``method.warm.start`` (after the cold step 0
    for checked and falcon; falcon may begin earlier, so this is its fewest): the plan's first row computes
    every block, its later rows as planned."""
    warm = method.warm
    check_step = warm.variant != "plain"
    if plan is None:
        return {name: steps - warm.start + check_step for name in computed}
    return {b.name: 1 + sum(s > warm.start for s in b.update_steps) + (check_step and 0 in b.update_steps)
            for b in plan.blocks}


def flops_per_call(policy: DiffusionPolicy, methods: list[Variant], schedules: dict[str, bac.Method],
                   batch: Batch) -> tuple[int, dict[str, int], dict[str, float], Callable[[int], int], dict[str, int]]:
    """FLOPs of one full denoiser call (measured), per method FLOPs and skipped share of one policy call,
    the FLOPs of the per-call work for a step count (``prepare_flops(steps)``: the condition, a VLA head's
    vision-language prefix included, and ``model.prepare``), and per warm-started method the FLOPs of its
    warm call (the cold call's are its FLOPs).

    Static plans are counted from the plan; runtime rules decide from the data, so they are
    counted from what one policy call on ``batch`` really computed.
    """
    probe = bac.make_plan(policy.model, "every-step", num_steps=1)
    with torch.no_grad():
        cond = policy.condition(batch)
    size = len(batch[STATE])
    sample = torch.zeros(size, policy.horizon, policy.action_dim, device=policy.device)
    timestep = policy.sampler.timesteps[:1]  # the policy's own (base) sampler
    # The denoiser as the policy calls it: the condition encoded once per call (prepare), not per step.
    with bac.accelerate(policy.model, probe) as handle, torch.no_grad():
        per_block = handle.measure_flops(sample, timestep[0], cond, prepared=policy.model.prepare(cond, timestep)[0])
    total = per_block.pop("total")

    def prepare_flops(steps: int) -> int:
        with FlopCounterMode(display=False) as mode, torch.no_grad():
            policy.model.prepare(policy.condition(batch), torch.zeros(steps, device=policy.device))
        return mode.get_total_flops()

    flops, skipped, warm_flops = {}, {}, {}
    for method in methods:
        schedule = schedules.get(method.name)
        plan = schedule.schedule if schedule is not None else None
        if schedule is None:
            computed = {name: method.steps for name in per_block}
        elif isinstance(plan, bac.Plan):
            computed = {b.name: len(b.update_steps) for b in plan.blocks}
        else:
            with applied(policy, method, schedule) as (view, handle):
                view.predict_action_chunk(batch, generator=torch.Generator(device=policy.device).manual_seed(0))
                computed = {name: b["computed"] for name, b in handle.stats()["per_block"].items()}
        flops[method.name] = executed_flops(total, list(per_block.values()), [computed[name] for name in per_block],
                                            method.steps) + prepare_flops(method.steps)
        skipped[method.name] = 1 - sum(computed.values()) / (method.steps * len(per_block))
        if method.warm is not None:
            warm = warm_computed(computed, plan, method.steps, method)
            warm_flops[method.name] = executed_flops(total, list(per_block.values()), [warm[name] for name in per_block],
                                                     method.warm.warm_evaluations(method.steps)) \
                + prepare_flops(method.steps)
    return total, flops, skipped, prepare_flops, warm_flops
