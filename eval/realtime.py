"""``python -m bac.eval mode=realtime``: the compared methods driving one robot at fixed control rates.

The closed-loop table (``mode=closed_loop``) stops the world while a chunk is sampled; here the
robot keeps moving (:func:`bac.runtime.run_control_episode`): each method runs every episode
seed at every rate of ``realtime.control_hz``, the next chunk sampled while the current one
executes, on the clock ``realtime.clock`` (``virtual``: deterministic, the env advances by each
chunk's measured compute time, or ``realtime.latency_ms``; ``wall``: real time, the inference on a
worker thread beside the env). Budget variants (``{budget: {control_hz: target}}``) get a
:func:`bac.plan_for_budget` plan for each rate's deadline.

Before the episodes, each method's batch-1 latency is measured (interleaved, as in the closed-loop
report) and sets its ``lead`` (``realtime.lead=auto``: :func:`bac.runtime.auto_lead` of those samples),
so a chunk is requested early enough for its p100 of the warm-up samples.

A modelled run (``realtime.latency_ms`` set) derives everything from the model, nothing from this
machine's timing, so that two runs log the same episodes byte for byte whatever else the host runs:
``lead=auto`` is :func:`bac.runtime.auto_lead` of the modelled latency, and the budget plans are made
for a cost model in which every call takes that latency (:func:`bac.evaluation.budget.modelled_cost`).
The latency measured before the episodes is then only reported.

Episodes are paired: every
method sees the same seeds, noise and envs at every rate; results are appended per episode to
``episodes.jsonl`` (resumable, like the closed-loop log). Report (``out_dir``, default
``outputs/realtime/<checkpoint>-<settings hash>``): ``report.json``, ``report.md`` and ``realtime.png``
(achieved rate and deadline misses per method and rate).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

import bac
from bac.configs import CONFIG_DIR
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


def _check_integer(name: str, value, low: int, meaning: str, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EvalError(f"{name} must be {alternative}an integer >= {low} ({meaning}), got {value!r}")


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
    with Compilation(cfg.compile, cfg.backend, [1], run_instructions(cfg, setup.policy, setup.tasks)) as compilation:
        methods = _prepare_methods(cfg, setup, rates, out, compilation)
        done = _run_episodes(cfg, setup, methods, out / "episodes.jsonl", compilation)
    result = _report(cfg, setup, methods, done, out)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")  # written before the plot can fail
    (out / "report.md").write_text(markdown(result))
    result["plots"] = plot(result, out)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _prepare_methods(cfg: DictConfig, setup, rates: list[float], out: Path, compilation: Compilation) -> _Methods:
    """Build, count and time every method at every rate (``compilation``: as the episodes run), before any
    episode."""
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
    # Batch-1 latency per method and rate: reported, and (unless modelled) the lead each method requests chunks with.
    latencies = {rate: measure_latency(setup.policy, variants, built[rate], setup.latency_batch,
                                       repeats=int(cfg.latency.repeats), warmup=int(cfg.latency.warmup),
                                       threads=int(cfg.latency.threads), compilation=compilation)
                 for rate in rates}
    leads = {rate: {v.name: _lead(rt.lead, modelled_ms, latencies[rate][v.name], rate, execute_steps)
                    for v in variants} for rate in rates}
    return _Methods(rates, execute_steps, variants, built, budgets, flops, latencies, leads)


def _lead(lead, modelled_ms: float | None, measured_s: list[float], rate: float, execute_steps: int) -> int:
    """The lead a method's episodes start with: as set, or ``auto`` from the modelled latency when there is one
    (a modelled run derives nothing from this machine's timing), else from the latency measured here."""
    if lead != "auto":
        return int(lead)
    latencies_ms = [modelled_ms] if modelled_ms is not None else [1e3 * s for s in measured_s]
    return auto_lead(latencies_ms, rate, execute_steps)


def _seeds(cfg: DictConfig) -> range:
    return range(int(cfg.seed), int(cfg.seed) + int(cfg.episodes))


def _run_episodes(cfg: DictConfig, setup, methods: _Methods, log_path: Path, compilation: Compilation) -> dict:
    """Every (task, rate, method, seed) episode not yet in ``log_path``, each appended as it ends (a run
    resumes where it stopped); returns every episode by that key."""
    done = {(e["task"], e["control_hz"], e["method"], e["seed"]): e for e in read_episodes(log_path)}
    total = len(setup.tasks) * len(_seeds(cfg)) * len(methods.rates) * len(methods.variants)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.latency.threads))  # batch 1, as on a robot: the latencies measured before
    repair(log_path)
    try:
        with EnvPool(make_vector_env) as pool, open(log_path, "a") as log, \
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
    finally:
        torch.set_num_threads(previous_threads)
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
    """The closed-loop settings digest plus the control loop's settings (another rate or clock is another run)."""
    extra = json.dumps(OmegaConf.to_container(cfg.realtime, resolve=True), sort_keys=True)
    return hashlib.sha256(f"{settings_digest(cfg)}|realtime|{extra}".encode()).hexdigest()[:10]


def lead_raised(entry: dict) -> str:
    """``→N`` when the loop raised a method's lead to N in some episode (``adapt_lead``)."""
    largest = entry.get("largest_lead", entry["lead"])
    return f"→{largest}" if largest > entry["lead"] else ""


def _ms(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Real-time control: {report['policy']['checkpoint']} on {', '.join(report['tasks'])}", "",
             f"Clock {s['clock']}" + (f" (modelled latency {s['latency_ms']} ms)" if s.get("latency_ms") is not None
                                      else " (each chunk's measured compute time)" if s["clock"] == "virtual" else "")
             + f"; {s['execute_steps']} actions planned per chunk of {report['policy']['horizon']}; late chunks: "
             f"{s['on_late']}; blend {s['blend']}; lead {s['lead']}"
             + (" (raised after a slower chunk)" if s.get("adapt_lead") else "")
             + f"; {s['threads']} thread(s), batch 1. "
             f"Seeds {report['seeds'][0]}–{report['seeds'][1]}, paired across methods and rates. Latency "
             "percentiles after each episode's first chunk (nearest rank; see notes); misses are control ticks "
             "without a planned action, after the first chunk.", ""]
    for rate, methods in report["rates"].items():
        lines += [f"## {rate} Hz (a chunk of {s['execute_steps']} actions lasts "
                  f"{1000 * s['execute_steps'] / float(rate):.0f} ms)", "",
                  "| method | success % (95% CI) | Δ vs full (paired 95% CI), McNemar p "
                  "| chunk ms p50 / p95 / p99 / max (n) | lead, mean delay (ticks) | missed ticks (late chunks) "
                  "| achieved Hz | first action ms |",
                  "|---|---|---|---|---|---|---|---|"]
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
                f"({c['late_chunks']}) | {c['achieved_hz']:.1f} | {1000 * c['time_to_first_action_s']:.0f} |")
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
