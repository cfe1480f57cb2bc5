"""``python -m bac.eval mode=realtime``: the compared methods driving one robot at fixed control rates.

The closed-loop table (``mode=closed_loop``) stops the world while a chunk is sampled; here the
robot keeps moving (:func:`bac.runtime.run_control_episode`): each method runs every episode
seed at every rate of ``realtime.control_hz``, the next chunk sampled while the current one
executes, on the clock ``realtime.clock`` (``virtual``: deterministic, the env advances by each
chunk's measured compute time, or ``realtime.latency_ms``; ``wall``: real time, the inference on a
worker thread beside the env). Budget variants (``{budget: {control_hz: target}}``) get a
:func:`bac.plan_for_budget` plan for each rate's deadline.

Before the episodes, each method's batch-1 latency is measured (interleaved, as in the closed-loop
report), then, for ``realtime.lead=auto``, each method at each rate runs a warm-up of
``realtime.warmup_calls`` policy calls inside the control loop (:func:`warm_up`: episodes not logged, on the
run's clock, with the episodes' settings), and its lead is :func:`bac.runtime.auto_lead` of the slowest of
them: calls inside the loop run slower than back-to-back benchmark calls, and their tail is what misses
deadlines. ``warmup_calls=0`` sizes the lead from the batch-1 samples instead. The leads a run starts with
are recorded in its folder (``leads.json``, with each warm-up's latency summary) and read back when it
resumes, so a resumed run's episodes run with the leads its first episodes had.

A modelled run (``realtime.latency_ms`` set) derives everything from the model, nothing from this
machine's timing, so that two runs log the same episodes byte for byte whatever else the host runs:
``lead=auto`` is :func:`bac.runtime.auto_lead` of the modelled latency, and the budget plans are made
for a cost model in which every call takes that latency (:func:`bac.evaluation.budget.modelled_cost`).
The latency measured before the episodes is then only reported, and there is no warm-up.

Episodes are paired: every
method sees the same seeds, noise and envs at every rate; results are appended per episode to
``episodes.jsonl`` (resumable, like the closed-loop log). Report (``out_dir``, default
``outputs/realtime/<checkpoint>-<settings hash>``): ``report.json``, ``report.md`` (with the seam jumps, jerk
and steps to success of :func:`bac.runtime.summarize_runs`) and ``realtime.png`` (achieved rate and deadline
misses per method and rate).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

import bac
from bac.configs import CONFIG_DIR
from bac.files import write_atomic
from bac.envs.metaworld_env import make_vector_env
from bac.runtime import (EnvPool, VirtualClock, WallClock, auto_lead, constant_latency, make_control_env,
                         run_control_episode, summarize_runs)
from bac.runtime.control import ON_LATE

from . import report as reporting
from .budget import budget_plans
from .closed_loop import read_episodes, repair
from .latency import measure_latency
from .provenance import package_versions, settings_digest
from .settings import EvalError, claim_out_dir, output_dir
from .setup import count_flops, episode_instructions, prepare, run_instructions
from .timing import summarize
from .variants import Compilation, applied

REPORT_SCHEMA = "bac.realtime/1"
CLOCKS = {"virtual": VirtualClock, "wall": WallClock}


# Upper bounds on what sizes a run's work: every rate runs every method on every seed, and a virtual clock
# steps tick by tick through each chunk's latency (latency_ms * control_hz / 1000 ticks).
MAX_RATES = 16
MAX_CONTROL_HZ = 1000.0  # a tick per millisecond
MAX_LATENCY_MS = 60_000.0  # a minute per chunk
MAX_WARMUP_CALLS = 10_000  # per method and rate; on a wall clock each takes a chunk's planned actions of real time
LEADS_FILE = "leads.json"  # the leads a run's episodes start with, read back when it resumes


def check_realtime_settings(cfg: DictConfig) -> None:
    """Every ``realtime.*`` setting, checked before any work: its kind, its range, the bounds on what sizes the
    run and the settings that depend on each other. A bad one is an :class:`EvalError` naming the setting and
    the value. What depends on the policy (its horizon) is :func:`check_realtime_for_policy`'s."""
    rt = cfg.get("realtime")
    known = list(OmegaConf.load(CONFIG_DIR / "eval.yaml").realtime)
    if not isinstance(rt, DictConfig):
        raise EvalError(f"realtime must be the block of settings {known}, got {rt!r}")
    unknown = sorted(set(rt) - set(known))
    if unknown:
        raise EvalError(f"unknown setting realtime.{unknown[0]} (eval.yaml's realtime block has {', '.join(known)})")
    _check_rates(rt.control_hz)
    if not isinstance(rt.clock, str) or rt.clock not in CLOCKS:
        raise EvalError(f"realtime.clock must be one of {sorted(CLOCKS)}, got {rt.clock!r}")
    if rt.latency_ms is not None:
        if not _is_number(rt.latency_ms) or not 0 <= rt.latency_ms <= MAX_LATENCY_MS:
            raise EvalError(f"realtime.latency_ms (a modelled latency) must be null or a number of ms in "
                            f"[0, {MAX_LATENCY_MS:g}], got {rt.latency_ms!r}")
        if rt.clock != "virtual":
            raise EvalError("realtime.latency_ms (a modelled latency) needs realtime.clock=virtual: a wall clock "
                            "measures the real one")
    if not isinstance(rt.on_late, str) or rt.on_late not in ON_LATE:
        raise EvalError(f"realtime.on_late must be one of {list(ON_LATE)}, got {rt.on_late!r}")
    if not isinstance(rt.adapt_lead, bool):
        raise EvalError(f"realtime.adapt_lead must be true or false, got {rt.adapt_lead!r}")
    _check_integer("realtime.blend", rt.blend, 0, "actions crossfaded after a takeover")
    _check_integer("realtime.warmup_calls", rt.warmup_calls, 0, "in-loop policy calls that size lead=auto; "
                   "0: the batch-1 latency does", high=MAX_WARMUP_CALLS)
    if rt.execute_steps is not None:
        _check_integer("realtime.execute_steps", rt.execute_steps, 1,
                       "actions planned per chunk; null: the policy's n_action_steps", "null or ")
    if rt.lead != "auto":
        _check_integer("realtime.lead", rt.lead, 0, "ticks before a chunk's planned end", "auto or ")
        if rt.execute_steps is not None and rt.lead > rt.execute_steps:
            raise EvalError(f"realtime.lead={rt.lead} is over realtime.execute_steps={rt.execute_steps}: a chunk is "
                            "requested at most its planned actions before its end")


def check_realtime_for_policy(cfg: DictConfig, policy) -> None:
    """The ``realtime.*`` settings bounded by the policy's horizon (after :func:`check_realtime_settings`).
    ``policy``: the policy or its :class:`~bac.policies.config.PolicyConfig` (``config.json``, no weights
    loaded): only its ``horizon`` and ``n_action_steps`` are read."""
    rt, horizon = cfg.realtime, int(policy.horizon)
    execute_steps = policy.n_action_steps if rt.execute_steps is None else int(rt.execute_steps)
    if execute_steps > horizon:
        raise EvalError(f"realtime.execute_steps={execute_steps} is over the policy's horizon of {horizon} actions")
    if rt.blend > horizon:
        raise EvalError(f"realtime.blend={rt.blend} is over the policy's horizon of {horizon} actions")
    if rt.lead != "auto" and rt.lead > execute_steps:
        raise EvalError(f"realtime.lead={rt.lead} is over the {execute_steps} actions planned per chunk "
                        "(realtime.execute_steps, or the policy's n_action_steps)")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_integer(name: str, value, low: int, meaning: str, alternative: str = "", high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise EvalError(f"{name} must be {alternative}an integer {bound} ({meaning}), got {value!r}")


def warms_up(rt: DictConfig) -> bool:
    """Whether the leads come from a warm-up in the loop: ``lead=auto`` on measured latency, ``warmup_calls > 0``
    (a modelled latency sizes the lead from the model: nothing is measured). A run recorded before the setting
    existed (its run.json) had none."""
    return rt.lead == "auto" and rt.latency_ms is None and int(rt.get("warmup_calls", 0)) > 0


def _check_rates(rates) -> None:
    """``realtime.control_hz``: a list of distinct positive rates, bounded (each one runs every method and seed)."""
    if not isinstance(rates, (list, ListConfig)):
        hint = f": write realtime.control_hz=[{rates}]" if _is_number(rates) else ""
        raise EvalError(f"realtime.control_hz must be a list of rates in Hz, got {rates!r}{hint}")
    if not 1 <= len(rates) <= MAX_RATES:
        raise EvalError(f"realtime.control_hz must list 1 to {MAX_RATES} rates, got {len(rates)}")
    for rate in rates:
        if not _is_number(rate) or not 0 < rate <= MAX_CONTROL_HZ:
            raise EvalError(f"realtime.control_hz: each rate must be a number in (0, {MAX_CONTROL_HZ:g}] Hz, "
                            f"got {rate!r}")
    names = [f"{rate:g}" for rate in rates]  # the report's keys
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise EvalError(f"realtime.control_hz lists {repeated[0]} Hz twice: each rate is run once")


@dataclass
class _Methods:
    """The compared methods at every rate, as the episodes and the report use them. Each rate has its own
    built methods (the budget variants' plans are made for that rate's deadline) and its own leads."""

    rates: list[float]
    execute_steps: int
    variants: list  # with steps resolved by the last rate's FLOPs count
    built: dict[float, dict]  # rate -> method -> built cache plan
    budgets: dict[float, dict]  # rate -> budget method -> its plan's budget summary
    flops: dict[float, dict]  # rate -> method -> FLOPs per call
    latencies: dict[float, dict]  # rate -> method -> batch-1 latency samples (s), measured before the episodes
    leads: dict[float, dict]  # rate -> method -> the lead its episodes start with
    warmups: dict[float, dict]  # rate -> method -> its warm-up's summary (Warmup.summary), None without one


def run_realtime(cfg: DictConfig) -> dict:
    """``mode=realtime`` (the module docstring): the methods prepared per rate, the episodes not yet logged,
    the report."""
    check_realtime_settings(cfg)
    setup = prepare(cfg)
    check_realtime_for_policy(cfg, setup.policy)
    if not setup.trained:
        raise EvalError("mode=realtime runs episodes: it needs a trained checkpoint")
    if int(cfg.shard.count) > 1:
        raise EvalError("mode=realtime is not sharded (its methods share the machine's timing): use shard.count=1")
    rates = [float(r) for r in cfg.realtime.control_hz]
    digest = realtime_digest(cfg)
    out = output_dir(cfg, "realtime", digest)  # auto: outputs/realtime/<checkpoint>-<digest>
    claim_out_dir(cfg, out, digest)
    # the control loop calls at batch 1; a VLA head's graphs for the run's instruction lengths are built here,
    # not inside a timed chunk
    with Compilation(cfg.compile, cfg.backend, [1], run_instructions(cfg, setup.policy, setup.tasks)) as compilation, \
            EnvPool(make_vector_env) as pool:
        methods = _prepare_methods(cfg, setup, rates, out, compilation, pool)
        done = _run_episodes(cfg, setup, methods, out / "episodes.jsonl", compilation, pool)
    result = _report(cfg, setup, methods, done, out)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")  # written before the plot can fail
    (out / "report.md").write_text(markdown(result))
    result["plots"] = plot(result, out)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _prepare_methods(cfg: DictConfig, setup, rates: list[float], out: Path, compilation: Compilation,
                     pool: EnvPool) -> _Methods:
    """Build, count and time every method at every rate (``compilation``: as the episodes run) and settle the
    leads its episodes start with, before any episode."""
    rt = cfg.realtime
    execute_steps = int(rt.execute_steps) if rt.execute_steps is not None else setup.policy.n_action_steps
    modelled_ms = float(rt.latency_ms) if rt.latency_ms is not None else None
    built, budgets = {}, {}
    try:
        for rate in rates:
            made, budgets[rate] = budget_plans(cfg, setup.policy, setup.variants, setup.built, setup.calibrations,
                                               setup.latency_batch, out / f"{rate:g}hz", control_hz=rate,
                                               actions_per_chunk=execute_steps, modelled_ms=modelled_ms)
            built[rate] = {**setup.built, **made}
    except (ValueError, bac.PlanMismatchError) as err:
        raise EvalError(str(err)) from err
    # each rate's count resolves steps: auto from the variants the previous rate's count resolved
    flops, variants = {}, setup.variants
    for rate in rates:
        counted = count_flops(setup, variants, built[rate])
        flops[rate], variants = counted.flops, counted.variants
    # Batch-1 latency per method and rate: reported, and (warmup_calls=0) the lead each method requests chunks with.
    latencies = {rate: measure_latency(setup.policy, variants, built[rate], setup.latency_batch,
                                       repeats=int(cfg.latency.repeats), warmup=int(cfg.latency.warmup),
                                       threads=int(cfg.latency.threads), compilation=compilation)
                 for rate in rates}
    methods = _Methods(rates, execute_steps, variants, built, budgets, flops, latencies, {}, {})
    recorded = read_leads(out / LEADS_FILE, methods)
    if recorded is not None:  # a resumed run keeps the leads its first episodes ran with
        methods.leads, methods.warmups = recorded
        return methods
    for rate in rates:
        methods.leads[rate], methods.warmups[rate] = {}, {}
        for v in variants:
            lead = _lead(rt.lead, modelled_ms, latencies[rate][v.name], rate, execute_steps)
            warmup = _warm_up(cfg, setup, methods, rate, v, lead, compilation, pool) if warms_up(rt) else None
            methods.leads[rate][v.name] = warmup.lead if warmup else lead
            methods.warmups[rate][v.name] = warmup.summary() if warmup else None
    write_leads(out / LEADS_FILE, methods)
    return methods


def _lead(lead, modelled_ms: float | None, measured_s: list[float], rate: float, execute_steps: int) -> int:
    """The lead a method's episodes start with before any warm-up: as set, or ``auto`` from the modelled latency
    when there is one (a modelled run derives nothing from this machine's timing), else from the batch-1
    latency measured here (with a warm-up, the lead its episodes start from)."""
    if lead != "auto":
        return int(lead)
    latencies_ms = [modelled_ms] if modelled_ms is not None else [1e3 * s for s in measured_s]
    return auto_lead(latencies_ms, rate, execute_steps)


@dataclass
class Warmup:
    """A warm-up's in-loop call latencies (ms) and the lead they size."""

    latencies_ms: list[float]
    lead: int

    def summary(self) -> dict:
        """The latency summary every report uses (:func:`bac.evaluation.timing.summarize`: ``repeats`` is the
        number of calls) and the lead."""
        return {"latency": summarize([ms / 1e3 for ms in self.latencies_ms]), "lead": self.lead}


def warm_up(policy, env_for: Callable[[str], object], tasks: list[str], seeds: Iterable[int], calls: int, *,
            control_hz: float, execute_steps: int, instruction: Callable[[str, int], str | None] | None = None,
            **loop) -> Warmup:
    """``lead=auto`` from ``calls`` policy calls made the way the control loop makes them: episodes of
    :func:`bac.runtime.run_control_episode` (``env_for(task)``; each task an equal share of the calls, one task
    after the other, so that a pooled env is built once per task; one seed of ``seeds`` per episode, its noise
    seeded from it; ``loop``: the loop's other settings, its clock among them), each episode's first chunk
    left out (the robot waits for it: no deadline, and the first call's one-off costs). Calls between env steps
    (and, on a wall clock, beside them) run slower than back-to-back ones, which is why they size the lead.

    The lead is :func:`bac.runtime.auto_lead` of the slowest call: the ticks it took plus one of margin. Not a
    percentile: the misses this is for are the rare call (one in several hundred: 1 tick in about 3,000 at
    40 Hz) slower than the lead allows, the very tail a percentile of a few hundred samples leaves out.
    Ends after ``calls`` calls or when ``seeds`` run out; an :class:`EvalError` when no episode had a call
    after its first."""
    latencies: list[float] = []
    seeds = iter(seeds)
    for n, task in enumerate(tasks, 1):
        share = calls * n // len(tasks)  # the calls made once this task's turn is over
        while len(latencies) < share and (seed := next(seeds, None)) is not None:
            generator = torch.Generator(device=policy.device).manual_seed(int(seed))
            trace = run_control_episode(policy, env_for(task), task, seed=int(seed), control_hz=control_hz,
                                        execute_steps=execute_steps, generator=generator,
                                        instruction=instruction(task, seed) if instruction else None, **loop)
            latencies += trace.latencies_ms[1:]
    if not latencies:
        raise EvalError("the warm-up's episodes had no policy call after their first chunk (episodes too short: "
                        "raise max_episode_steps), so none sized lead=auto; or set realtime.warmup_calls=0")
    latencies = latencies[:calls]
    return Warmup(latencies, auto_lead(latencies, control_hz, execute_steps))


def _warm_up(cfg: DictConfig, setup, methods: _Methods, rate: float, variant, lead: int, compilation: Compilation,
             pool: EnvPool) -> Warmup:
    """:func:`warm_up` of ``variant`` at ``rate`` as its episodes run (its lead from the batch-1 latency, the
    run's clock and loop settings, batch 1 with ``latency.threads`` threads), on seeds after the run's (held
    out from its episodes), at most one episode per call."""
    rt, calls = cfg.realtime, int(cfg.realtime.warmup_calls)
    instructions = {task: episode_instructions(cfg, setup.policy, task) for task in setup.tasks}
    first_seed = int(cfg.seed) + int(cfg.episodes)
    with applied(setup.policy, variant, methods.built[rate].get(variant.name), compilation) as (view, _), \
            CLOCKS[rt.clock]() as clock, _torch_threads(int(cfg.latency.threads)):
        return warm_up(view, lambda task: make_control_env(setup.policy, task, max_episode_steps=cfg.max_episode_steps,
                                                           pool=pool),
                       setup.tasks, range(first_seed, first_seed + calls), calls, control_hz=rate,
                       execute_steps=methods.execute_steps,
                       instruction=lambda task, seed: instructions[task](seed) if instructions[task] else None,
                       clock=clock, lead=lead, adapt_lead=bool(rt.adapt_lead), on_late=rt.on_late,
                       blend=int(rt.blend), max_steps=cfg.max_episode_steps)


def write_leads(path: Path, methods: _Methods) -> None:
    """The leads (and warm-up summaries) per rate and method, written whole (a crash leaves none: they are
    measured again)."""
    record = {f"{rate:g}": {name: {"lead": lead, "warmup": methods.warmups[rate][name]}
                            for name, lead in methods.leads[rate].items()} for rate in methods.rates}
    write_atomic(path, json.dumps({"rates": record}, indent=1) + "\n")


def read_leads(path: Path, methods: _Methods) -> tuple[dict, dict] | None:
    """``(leads, warmups)`` recorded in ``path`` when the run began (``None``: none recorded); a record that
    lacks a rate or method of this run, or holds a lead out of ``[0, execute_steps]``, is an :class:`EvalError`."""
    if not path.is_file():
        return None
    leads, warmups = {}, {}
    try:
        rates = json.loads(path.read_text())["rates"]
        for rate in methods.rates:
            leads[rate], warmups[rate] = {}, {}
            for v in methods.variants:
                entry = rates[f"{rate:g}"][v.name]
                lead = entry["lead"]
                if isinstance(lead, bool) or not isinstance(lead, int) or not 0 <= lead <= methods.execute_steps:
                    raise ValueError(f"lead {lead!r} of {v.name} at {rate:g} Hz is not in [0, {methods.execute_steps}]")
                leads[rate][v.name], warmups[rate][v.name] = lead, entry.get("warmup")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvalError(f"{path} does not hold this run's leads ({type(err).__name__}: {err}); delete it to measure "
                        "them again (the episodes logged so far ran with the leads it held)") from err
    return leads, warmups


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` while the block runs (batch 1, as on a robot)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _seeds(cfg: DictConfig) -> range:
    return range(int(cfg.seed), int(cfg.seed) + int(cfg.episodes))


def _run_episodes(cfg: DictConfig, setup, methods: _Methods, log_path: Path, compilation: Compilation,
                  pool: EnvPool) -> dict:
    """Every (task, rate, method, seed) episode not yet in ``log_path``, each appended as it ends (a run
    resumes where it stopped); returns every episode by that key."""
    done = {(e["task"], e["control_hz"], e["method"], e["seed"]): e for e in read_episodes(log_path)}
    total = len(setup.tasks) * len(_seeds(cfg)) * len(methods.rates) * len(methods.variants)
    repair(log_path)
    # batch 1 with latency.threads threads, as on a robot: the latencies measured before
    with _torch_threads(int(cfg.latency.threads)), open(log_path, "a") as log, \
            tqdm(total=total, initial=len(done), disable=not cfg.progress, desc="realtime", leave=False) as bar:
        for task in setup.tasks:
            instructions = episode_instructions(cfg, setup.policy, task)
            env = make_control_env(setup.policy, task, max_episode_steps=cfg.max_episode_steps, pool=pool)
            # every method and rate on one seed before the next: drift hits all alike
            for seed, rate, variant in itertools.product(_seeds(cfg), methods.rates, methods.variants):
                key = (task, rate, variant.name, seed)
                if key in done:
                    continue
                trace = episode(cfg, setup.policy, env, task, seed, rate, variant, methods.built[rate],
                                methods.leads[rate][variant.name], methods.execute_steps, instructions,
                                compilation)
                record = {"task": task, "control_hz": rate, "method": variant.name, **trace}
                _append(log, record)
                done[key] = record
                bar.update(1)
    return done


def _append(log, record: dict) -> None:
    """One episode, on disk before the next starts: a crash loses at most the episode that was running."""
    log.write(json.dumps(record) + "\n")
    log.flush()
    os.fsync(log.fileno())


def _report(cfg: DictConfig, setup, methods: _Methods, done: dict, out: Path) -> dict:
    """``report.json``'s content (before its plots)."""
    policy = setup.policy
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bac.eval " + " ".join(sys.argv[1:]),
        "out_dir": str(out),
        "policy": {"checkpoint": str(cfg.checkpoint), "architecture": policy.architecture,
                   "horizon": policy.horizon, "n_action_steps": policy.n_action_steps},
        "tasks": setup.tasks,
        "seeds": [int(cfg.seed), int(cfg.seed) + int(cfg.episodes) - 1] if cfg.episodes > 0 else [],
        "sampler": {"kind": setup.base_sampler, "steps": setup.base_steps},
        "settings": {**OmegaConf.to_container(cfg.realtime, resolve=True), "execute_steps": methods.execute_steps,
                     "threads": int(cfg.latency.threads)},
        "compile": {"mode": str(cfg.compile), "backend": str(cfg.backend)},
        "rates": {f"{rate:g}": _rate_report(setup.tasks, _seeds(cfg), methods, rate, done) for rate in methods.rates},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": sys.version.split()[0]},
        "packages": package_versions(),
    }


def _rate_report(tasks: list[str], seeds: range, methods: _Methods, rate: float, done: dict) -> dict:
    """Every method's entry at ``rate``, each paired with ``full`` on the same tasks and seeds."""
    reference = [done[(t, rate, "full", s)] for t in tasks for s in seeds if (t, rate, "full", s) in done]
    report = {}
    for variant in methods.variants:
        name = variant.name
        runs = [done[(t, rate, name, s)] for t in tasks for s in seeds]
        entry = {
            "config": variant.describe(),
            "lead": methods.leads[rate][name],
            "largest_lead": max(int(r["lead"]) for r in runs),  # with adapt_lead: raised in the loop
            "latency_before_episodes": summarize(methods.latencies[rate][name]),
            "warmup": methods.warmups[rate][name],  # in-loop calls that sized the lead (None: no warm-up)
            "flops_per_call": int(methods.flops[rate][name]),
            "control": summarize_runs(runs),
            "success": reporting.success_summary(runs),
            "per_task": {t: reporting.success_summary([r for r in runs if r["task"] == t]) for t in tasks},
        }
        warm = entry["control"].get("warm")  # a warm-started method's calls, counted by the control loop
        entry["evaluations_per_call"] = warm["evaluations_per_call"] if warm else float(variant.steps)
        if reference and name != "full":
            entry["paired_vs_full"] = reporting.paired_difference(runs, reference)
        if name in methods.budgets[rate]:
            entry["budget"] = methods.budgets[rate][name]
        report[name] = entry
    return report


def episode(cfg: DictConfig, policy, env, task: str, seed: int, rate: float, variant, built: dict, lead: int,
            execute_steps: int, instructions, compilation: Compilation) -> dict:
    """One paired control episode of ``variant`` at ``rate``: its noise seeded from the episode seed, its calls
    run as ``compilation`` says."""
    rt = cfg.realtime
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    latency_model = constant_latency(float(rt.latency_ms)) if rt.latency_ms is not None else None
    with applied(policy, variant, built.get(variant.name), compilation) as (view, _), \
            CLOCKS[rt.clock]() as clock:
        trace = run_control_episode(view, env, task, seed=seed, control_hz=rate, clock=clock, generator=generator,
                                    execute_steps=execute_steps, lead=lead, adapt_lead=bool(rt.adapt_lead),
                                    on_late=rt.on_late, blend=int(rt.blend),
                                    instruction=instructions(seed) if instructions is not None else None,
                                    max_steps=cfg.max_episode_steps, latency_model=latency_model)
    return trace.to_dict()


def realtime_digest(cfg: DictConfig) -> str:
    """The closed-loop settings digest plus the control loop's settings (another rate or clock is another run).
    ``warmup_calls`` is in it only when a warm-up sizes the leads (:func:`warms_up`): a run without one keeps
    the digest (and the folder) of runs made before the setting existed."""
    realtime = OmegaConf.to_container(cfg.realtime, resolve=True)
    if not warms_up(cfg.realtime):
        realtime.pop("warmup_calls", None)
    extra = json.dumps(realtime, sort_keys=True)
    return hashlib.sha256(f"{settings_digest(cfg)}|realtime|{extra}".encode()).hexdigest()[:10]


def lead_raised(entry: dict) -> str:
    """``→N`` when the loop raised a method's lead to N in some episode (``adapt_lead``)."""
    largest = entry.get("largest_lead", entry["lead"])
    return f"→{largest}" if largest > entry["lead"] else ""


def _ms(x) -> str:
    return _figure(x, ".1f")


def _figure(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _smoothness_cells(smooth: dict | None) -> str:
    """``seam mean / p95 | jerk mean / p95`` (dashes for episodes logged before smoothness was recorded)."""
    smooth = smooth or {}
    return " | ".join(f"{_figure(smooth.get(f'{kind}_mean'), '.3f')} / {_figure(smooth.get(f'{kind}_p95'), '.3f')}"
                      for kind in ("seam_jump", "jerk"))


def _lead_source(report: dict) -> str:
    """How ``lead=auto`` was sized, for the settings line."""
    s = report["settings"]
    if s["lead"] != "auto":
        return ""
    if s.get("latency_ms") is not None:
        return ", from the modelled latency"
    warmups = [m["warmup"] for methods in report["rates"].values() for m in methods.values() if m.get("warmup")]
    if warmups:
        calls = sorted({w["latency"]["repeats"] for w in warmups})
        count = f"{calls[0]}" if len(calls) == 1 else f"{calls[0]}–{calls[-1]}"
        return f", from the slowest of {count} in-loop calls of a warm-up per method and rate"
    return ", from the slowest batch-1 call measured before the episodes"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Real-time control: {report['policy']['checkpoint']} on {', '.join(report['tasks'])}", "",
             f"Clock {s['clock']}" + (f" (modelled latency {s['latency_ms']} ms)" if s.get("latency_ms") is not None
                                      else " (each chunk's measured compute time)" if s["clock"] == "virtual" else "")
             + f"; {s['execute_steps']} actions planned per chunk of {report['policy']['horizon']}; late chunks: "
             f"{s['on_late']}; blend {s['blend']}; lead {s['lead']}" + _lead_source(report)
             + (" (raised after a slower chunk)" if s.get("adapt_lead") else "")
             + f"; {s['threads']} thread(s), batch 1. "
             f"Seeds {report['seeds'][0]}–{report['seeds'][1]}, paired across methods and rates. Latency "
             "percentiles after each episode's first chunk (nearest rank; see notes); misses are control ticks "
             "without a planned action, after the first chunk. Seam jump: the executed action's change where a "
             "new chunk takes over (mean / p95 over the takeovers); jerk: its second difference (mean / mean of "
             "the episodes' p95); steps: the mean steps of the successful episodes.", ""]
    for rate, methods in report["rates"].items():
        lines += [f"## {rate} Hz (a chunk of {s['execute_steps']} actions lasts "
                  f"{1000 * s['execute_steps'] / float(rate):.0f} ms)", "",
                  "| method | success % (95% CI) | Δ vs full (paired 95% CI), McNemar p "
                  "| chunk ms p50 / p95 / p99 / max (n) | lead, mean delay (ticks) | missed ticks (late chunks) "
                  "| achieved Hz | first action ms | seam jump mean / p95 | jerk mean / p95 | steps to success |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in methods.items():
            c, succ = m["control"], m["success"]
            lat = c["latency_ms"]
            paired = m.get("paired_vs_full")
            delta = "—" if not paired or not paired.get("pairs") else (
                f"{100 * paired['mean']:+.1f} ({100 * paired['ci95'][0]:+.1f}, {100 * paired['ci95'][1]:+.1f}), "
                f"{paired['mcnemar_p']:.2g}")
            budget = m.get("budget")
            label = name + (f" ({budget['budget_ms']:.0f} ms budget)" if budget else "")
            lines.append(
                f"| {label} | {100 * succ['rate']:.1f} "
                f"({100 * succ['wilson95'][0]:.1f}–{100 * succ['wilson95'][1]:.1f}) "
                f"| {delta} | {_ms(lat['p50'])} / {_ms(lat['p95'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} "
                f"({lat['samples']}) | {m['lead']}{lead_raised(m)}, {c['mean_delay_ticks'] or 0:.2f} "
                f"| {c['missed_ticks']} "
                f"({c['late_chunks']}) | {c['achieved_hz']:.1f} | {1000 * c['time_to_first_action_s']:.0f} "
                f"| {_smoothness_cells(c.get('smoothness'))} | {_figure(c.get('steps_to_success'), '.0f')} |")
        warm = [f"{name} {m['evaluations_per_call']:.2f}" for name, m in methods.items() if "warm" in m["config"]]
        if warm:
            lines += ["", "Denoiser evaluations per call of the warm-started methods (every call of the episodes): "
                          + ", ".join(warm) + "."]
        notes = sorted({n for m in methods.values() for n in m["control"]["notes"]})
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines.append("")
    lines.append(f"Machine: {report['machine']['platform']}; torch {report['packages'].get('torch')}.")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[str]:
    """``realtime.png``: achieved control rate and deadline-miss rate per method, grouped by target rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(report["rates"])
    names = list(report["rates"][rates[0]])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        x = np.arange(len(rates)) + (i - (len(names) - 1) / 2) * width
        control = [report["rates"][r][name]["control"] for r in rates]
        left.bar(x, [c["achieved_hz"] for c in control], width, label=name)
        right.bar(x, [100 * (c["miss_rate"] or 0) for c in control], width, label=name)
    for ax, title in ((left, "achieved control rate (Hz)"), (right, "deadline misses (% of ticks)")):
        ax.set_xticks(np.arange(len(rates)), [f"{r} Hz target" for r in rates])
        ax.set_title(title)
    left.scatter(np.arange(len(rates)), [float(r) for r in rates], marker="_", s=2000, color="k", label="target")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = out / "realtime.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
