"""The two seed methods' mechanisms on trained weights: ERTACache's rectification and ProfilingDiT's block split.

    python -m benchmarks.seed_methods checkpoint=dpt-metaworld-hard tasks=[hard] samples=2
    python -m benchmarks.seed_methods checkpoint=pi0-metaworld tasks=[suite]
    python -m benchmarks.seed_methods case=dit-digits                # the digits DiT of bench_diffusers

For one model, on its evaluation sampler (the checkpoint's own, as ``bac.eval`` runs it, or ``sampler.*``), every
cached sampling call is compared with full computation on the same seeded call (relative L2 of each
observation's action chunk, or image, mean over the observations):

1. **ERTACache** (:mod:`bac.methods.ertacache`) at a few thresholds (by default the ones whose profiled schedule
   computes about ``fractions`` of the steps; ``thresholds`` gives them): the same schedule with plain reuse
   (``terms=0``), ``a * r_c`` (1), ``a * r_c + b * r_p`` (2), and 2 with the timestep adjustment
   (:func:`bac.adjust_timesteps`) fitted on the calibration inputs. The paper's "feature shift" claim: the
   rectification lowers the deviation of the same schedule (``ratio_terms2_terms0`` < 1).
2. **ProfilingDiT** (:mod:`bac.methods.profiling`) for every ``shares`` x ``intervals`` setting: the per-layer
   attention focus scores, and the deviation of one recomputation schedule applied to the lowest-scoring layers
   (the method: background), the highest-scoring layers of the same count (foreground) and ``draws`` seeded
   random layer sets of that count. The paper's claim: caching background-focused blocks deviates less.

A policy is prepared as ``bac.eval`` prepares it (its calibration, with the attention profile, on the
demonstration observations); the observations compared are ``samples`` per task, drawn from the
demonstrations with ``seed`` (not the calibration's, as in :mod:`benchmarks.block_errors`). ``case=dit-digits``
runs ``benchmarks.bench_diffusers``' trained digits DiT instead (50 DDIM steps, guidance batched into one call):
calibrated on two noise inputs (seeds ``calibration.seed + 1, + 2``), compared on the input of seed ``seed``
(40 images); the other policy settings do not apply. Writes ``seed_methods.json`` and ``seed_methods.md`` to
``out_dir`` (``auto``: ``outputs/seed_methods/<model>-<settings digest>``).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import bac
from bac.apps.common import report_errors
from bac.configs import CONFIG_DIR
from bac.configs.settings import FLOAT, INT, SEQ, STR, check_settings
from bac.methods.ertacache import profiled_steps
from bac.methods.profiling import layer_scores
from bac.policies.policy import DiffusionPolicy

from bac.evaluation.provenance import settings_digest
from bac.evaluation.settings import SETTINGS as EVAL_SETTINGS
from bac.evaluation.settings import EvalError, output_dir
from bac.evaluation.setup import prepare
from benchmarks.block_errors import observations, relative_l2

SCHEMA = "bac-seed-methods/1"
CASES = ("dit-digits",)
OWN_SETTINGS = {"samples": (INT, 1, False), "fractions": (SEQ, None, False), "thresholds": (SEQ, None, True),
                "shares": (SEQ, None, False), "intervals": (SEQ, None, False), "draws": (INT, 1, False),
                "draw_seed": (INT, 0, False), "case": (STR, None, True)}
SETTINGS = {**EVAL_SETTINGS, **OWN_SETTINGS}
THRESHOLD_GRID = np.round(np.geomspace(1e-4, 10.0, 151), 6)  # the thresholds searched for the wanted fractions
ERTA_WARMUP = 1  # the method's default: step 0 computed

ConfigStore.instance().store(name="seed_methods", node={
    "defaults": ["eval", {"override methods": "quick"}, "_self_"],
    # prepare() calibrates (with the attention profile) for this variant, on the base sampler
    "methods": {"profiling-dit": {"cache": "profiling-dit"}},
    "run_methods": ["profiling-dit"],
    "samples": 2,                    # observations per task
    "fractions": [0.3, 0.5, 0.7],   # ERTACache: thresholds whose schedule computes about these shares of steps
    "thresholds": None,              # ...or these thresholds
    "shares": [0.25, 0.5],           # ProfilingDiT: shares of the layers cached (at most half: see layer_sets)
    "intervals": [2, 6],             # ProfilingDiT: recomputation intervals of the cached layers
    "draws": 8,                      # random layer sets per ProfilingDiT setting
    "draw_seed": 0,
    "case": None,                    # dit-digits: bench_diffusers' trained digits DiT instead of the checkpoint
})


# -- what is measured --------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """A model with its calibration (attention profile included), and its sampling calls on fixed inputs."""
    name: str
    calibration: bac.Calibration
    sample: Callable[[bac.Method | bac.Plan | None], torch.Tensor]  # cached (None: full) call, outputs [N, ...]
    adjust: Callable[[bac.Method], bac.Method]  # ERTACache's timestep adjustment fitted on calibration inputs
    facts: dict


def deviation(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 of each observation's output (action chunk, image) from full computation's, mean over them."""
    return float(relative_l2(output.flatten(1).double(), reference.flatten(1).double()).mean())


def choose_thresholds(calibration: bac.Calibration, fractions: list[float], warmup: int = ERTA_WARMUP) -> list[float]:
    """Per wanted share of computed steps, the threshold (of :data:`THRESHOLD_GRID`) whose profiled schedule comes
    closest to it (the smaller threshold on a tie); each distinct schedule once, in the order of ``fractions``."""
    gram = calibration.gram_matrices()
    counts = [len(profiled_steps(gram, float(t), warmup)) for t in THRESHOLD_GRID]
    chosen, seen = [], set()
    for fraction in fractions:
        index = min(range(len(counts)), key=lambda i: (abs(counts[i] - fraction * calibration.num_steps), i))
        if counts[index] not in seen:
            seen.add(counts[index])
            chosen.append(float(THRESHOLD_GRID[index]))
    return chosen


def ertacache_rows(subject: Subject, thresholds: list[float], reference: torch.Tensor) -> list[dict]:
    """Per threshold: the computed steps and the deviation with terms 0, 1, 2 and 2 with adjusted timesteps."""
    rows = []
    for threshold in thresholds:
        methods = {f"terms{terms}": bac.build_method("ertacache", subject.calibration, threshold=threshold,
                                                     warmup=ERTA_WARMUP, terms=terms) for terms in (0, 1, 2)}
        methods["terms2_adjusted"] = subject.adjust(methods["terms2"])
        steps = methods["terms0"].schedule.blocks[0].update_steps
        if any(m.schedule.blocks[0].update_steps != steps for m in methods.values()):
            raise RuntimeError(f"ertacache threshold {threshold}: the schedule changed with terms")
        deviations, refused = {}, None
        for name, method in methods.items():
            try:
                deviations[name] = deviation(subject.sample(method), reference)
            except bac.PlanMismatchError as err:  # a fitted scale the engine refuses (<= 0): recorded, not measured
                deviations[name], refused = None, str(err)
        scales = methods["terms2_adjusted"].schedule.params["step_scales"]
        rows.append({"threshold": threshold, "computed_steps": list(steps),
                     "computed_share": len(steps) / subject.calibration.num_steps, "deviation": deviations,
                     "ratio_terms2_terms0": ratio(deviations["terms2"], deviations["terms0"]),
                     "ratio_adjusted_terms0": ratio(deviations["terms2_adjusted"], deviations["terms0"]),
                     "step_scales": {str(k): s for k, s in enumerate(scales) if s != 1.0},
                     **({"adjusted_refused": refused} if refused else {})})
    return rows


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def layer_sets(scores: dict[int, float], count: int, draws: int, seed: int) -> dict[str, Any]:
    """The ``count`` lowest-scoring layers (background), the ``count`` highest (foreground) and ``draws`` seeded
    random sets of ``count`` layers, among the layers with a score. More than half of them would make the
    background and foreground sets share layers: refused."""
    ranked = [layer for _, layer in sorted((s, layer) for layer, s in scores.items() if np.isfinite(s))]
    if not 1 <= count <= len(ranked) // 2:
        raise EvalError(f"a layer set of {count} of the {len(ranked)} profiled layers: the background and "
                        f"foreground sets must be disjoint and not empty (1 to {len(ranked) // 2} layers; "
                        "pick another share)")
    rng = random.Random(seed)
    return {"background": sorted(ranked[:count]), "foreground": sorted(ranked[-count:]),
            "random": [sorted(rng.sample(ranked, count)) for _ in range(draws)]}


def caching_layers(calibration: bac.Calibration, schedule: list[int], layers: list[int], params: dict) -> bac.Plan:
    """The plan that computes the blocks of ``layers`` at ``schedule``'s steps only, the others at every step."""
    every = list(range(calibration.num_steps))
    steps = {b.name: schedule if b.layer in layers else every for b in calibration.blocks}
    return bac.Plan.from_steps(calibration, steps, calibration.num_steps, "profiling-dit",
                               {**params, "cached_layers": layers}, scheduler=calibration.scheduler)


def profiling_rows(subject: Subject, shares: list[float], intervals: list[int], draws: int, seed: int,
                   reference: torch.Tensor) -> list[dict]:
    """Per (share, interval): the method's schedule on background, foreground and random layer sets."""
    calibration = subject.calibration
    scores = layer_scores(calibration, calibration.focus)
    rows = []
    for share, interval in itertools.product(shares, intervals):
        method = bac.build_method("profiling-dit", calibration, share=share, interval=interval)
        plan = method.schedule
        cached = plan.params["cached_layers"]
        sets = layer_sets(scores, len(cached), draws, seed)
        if sets["background"] != cached:
            raise RuntimeError(f"profiling-dit cached layers {cached}, the lowest-scoring are {sets['background']}")
        schedule = next(b.update_steps for b in plan.blocks if b.layer in cached)
        params = {k: v for k, v in plan.params.items() if k != "cached_layers"}

        def cached_on(layers: list[int]) -> dict:
            plan_for = caching_layers(calibration, list(schedule), layers, params)
            return {"layers": layers, "deviation": deviation(subject.sample(plan_for), reference)}

        measured = {"background": {"layers": cached, "deviation": deviation(subject.sample(method), reference)},
                    "foreground": cached_on(sets["foreground"])}
        random_rows = [cached_on(layers) for layers in sets["random"]]
        values = np.array([r["deviation"] for r in random_rows])
        rows.append({
            "share": share, "interval": interval, "layers_cached": len(cached), "recompute_steps": list(schedule),
            "skipped_share": plan.skipped_count() / (len(plan.blocks) * plan.num_steps),
            **measured,
            "random": {"draws": random_rows, "mean": float(values.mean()), "std": float(values.std()),
                       "min": float(values.min()), "max": float(values.max())},
            "background_below_foreground": measured["background"]["deviation"] < measured["foreground"]["deviation"],
        })
    return rows


def measure(subject: Subject, thresholds: list[float] | None, fractions: list[float], shares: list[float],
            intervals: list[int], draws: int, draw_seed: int) -> dict:
    """Both checks on ``subject``: its JSON entry (see the module docstring)."""
    calibration = subject.calibration
    if calibration.focus is None:
        raise EvalError("the calibration has no attention profile: calibrate with attention=True")
    reference = subject.sample(None)
    chosen = thresholds if thresholds is not None else choose_thresholds(calibration, fractions)
    scores = layer_scores(calibration, calibration.focus)
    return {
        **subject.facts,
        "num_steps": calibration.num_steps,
        "observations": int(reference.shape[0]),
        "focus": {b.name: (float(f) if np.isfinite(f) else None) for b, f in zip(calibration.blocks, calibration.focus)},
        "layer_scores": {str(layer): (s if np.isfinite(s) else None) for layer, s in sorted(scores.items())},
        "ertacache": ertacache_rows(subject, chosen, reference),
        "profiling": profiling_rows(subject, shares, intervals, draws, draw_seed, reference),
    }


# -- the subjects: a policy, or the digits DiT --------------------------------------------------------------------
def seeded(seed: int, call: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return call()


def policy_subject(policy: DiffusionPolicy, calibration: bac.Calibration, batch: dict, calibration_batch: dict,
                   seed: int, facts: dict) -> Subject:
    """``policy`` on ``batch``: seeded sampling calls (the same noise for every method)."""
    def call() -> torch.Tensor:
        generator = torch.Generator(device=policy.device).manual_seed(seed)
        return policy.predict_action_chunk(batch, generator=generator, num_actions=policy.horizon).float()

    def sample(method):
        with torch.no_grad():
            if method is None:
                return seeded(seed, call)
            with bac.accelerate(policy.model, method, num_steps=policy.sampler.steps,
                                scheduler=policy.sampler.scheduler):
                return seeded(seed, call)

    def adjust(method):
        return seeded(calibration.seed, lambda: bac.adjust_timesteps(policy.model, method, policy.predict_action_chunk,
                                                                     [calibration_batch]))

    return Subject(facts["name"], calibration, sample, adjust, facts)


def digits_subject(seed: int, calibration_seed: int) -> Subject:
    """``bench_diffusers``' trained digits DiT: calibrated on two inputs, sampled on the input of ``seed``."""
    from benchmarks import bench_diffusers

    case = bench_diffusers.CASES["dit-digits"]
    model = case.build(case.config).eval()
    steps = case.steps

    def run(x):
        return bench_diffusers.sample(case, model, x, steps)

    calibration_inputs = [case.inputs(calibration_seed + 1 + i, torch.device("cpu")) for i in range(2)]
    calibration = bac.diffusers.calibrate(model, calibration_inputs, sample_fn=run, attention=True)
    evaluation = case.inputs(seed, torch.device("cpu"))

    def sample(method):
        if method is None:
            return run(evaluation)
        bac.diffusers.enable_cache(model, method, num_inference_steps=steps)
        try:
            return run(evaluation)
        finally:
            bac.diffusers.disable_cache(model)

    def adjust(method):
        return bac.diffusers.adjust_timesteps(model, method, calibration_inputs, sample_fn=run)

    facts = {"name": "dit-digits", "model": case.shaped_like, "weights": case.weights,
             "sampler": {"kind": "ddim", "steps": steps},
             "inputs": f"noise of seed {seed}, {evaluation[0].shape[0]} images; calibration: seeds "
                       f"{calibration_seed + 1} and {calibration_seed + 2}"}
    return Subject("dit-digits", calibration, sample, adjust, facts)


# -- the CLI -----------------------------------------------------------------------------------------------------
def _check(cfg: DictConfig) -> None:
    check_settings(cfg, SETTINGS, CONFIG_DIR / "eval.yaml")
    if int(cfg.seed) == int(cfg.calibration.seed):
        raise EvalError(f"seed={cfg.seed} is the calibration's seed: measure on other observations than the plans "
                        "were calibrated on (pick another seed)")
    if cfg.case is not None and cfg.case not in CASES:
        raise EvalError(f"case={cfg.case}: one of {list(CASES)}, or null (the checkpoint's policy)")
    numbers = {"fractions": (cfg.fractions, 0.0, 1.0), "shares": (cfg.shares, 0.0, 1.0),
               "thresholds": (cfg.thresholds or [], 0.0, None), "intervals": (cfg.intervals, 1, None)}
    for key, (values, low, high) in numbers.items():
        integer = key == "intervals"
        for value in values:
            wrong = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
            if wrong or value < low or (high is not None and value > high):
                raise EvalError(f"{key} must be {'integers' if integer else 'numbers'} >= {low}"
                                f"{f' and <= {high}' if high is not None else ''}, got {list(values)}")
        if key != "thresholds" and not values:
            raise EvalError(f"{key} is empty")


def subject_for(cfg: DictConfig) -> tuple[Subject, str]:
    """The subject the settings name, and the folder name its outputs go to under ``auto``."""
    if cfg.case is not None:
        torch.set_num_threads(int(cfg.threads or torch.get_num_threads()))
        return digits_subject(int(cfg.seed), int(cfg.calibration.seed)), str(cfg.case)
    eval_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in OWN_SETTINGS])
    setup = prepare(eval_cfg)
    policy = setup.policy
    (calibration,) = setup.calibrations.values()
    batches = [observations(cfg, policy, task) for task in setup.tasks]
    batch = {key: (torch.cat([b[key] for b in batches]) if isinstance(batches[0][key], torch.Tensor)
                   else [v for b in batches for v in b[key]]) for key in batches[0]}
    facts = {"name": Path(str(cfg.checkpoint)).name, "checkpoint": str(cfg.checkpoint),
             "architecture": policy.architecture, "trained": setup.trained,
             "sampler": {"kind": policy.sampler.kind, "steps": policy.sampler.steps},
             "inputs": f"{int(cfg.samples)} observations per task of {setup.tasks} from the demonstrations "
                       f"({int(cfg.calibration.episodes)} per task), seed {cfg.seed}; calibration: "
                       f"{setup.calibration_inputs}", "calibration": calibration.facts()}
    name = str(cfg.checkpoint).rstrip("/").split("/")[-1]
    return policy_subject(policy, calibration, batch, setup.demo_obs, int(cfg.seed), facts), name


def run(cfg: DictConfig) -> dict:
    """The CLI's work: the subject, both checks, the JSON and Markdown files."""
    try:
        _check(cfg)
    except ValueError as err:
        raise EvalError(str(err)) from err
    subject, name = subject_for(cfg)
    own = {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in OWN_SETTINGS}
    digest = hashlib.sha256(json.dumps([settings_digest(cfg), own], sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cfg.out_dir) if cfg.out_dir != "auto" else Path("outputs") / "seed_methods" / f"{name}-{digest}"
    out.mkdir(parents=True, exist_ok=True)
    thresholds = [float(t) for t in cfg.thresholds] if cfg.thresholds is not None else None
    model = measure(subject, thresholds, [float(f) for f in cfg.fractions], [float(s) for s in cfg.shares],
                    [int(i) for i in cfg.intervals], int(cfg.draws), int(cfg.draw_seed))
    result = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.seed_methods " + " ".join(sys.argv[1:]),
        "out_dir": str(out),
        "settings": {**own, "seed": int(cfg.seed), "calibration": OmegaConf.to_container(cfg.calibration)},
        "metric": "relative L2 ||cached - full|| / ||full|| of each observation's output (action chunk; image), "
                  "mean over the observations, on the same seeded sampling call",
        "models": {subject.name: model},
    }
    (out / "seed_methods.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "seed_methods.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """Both tables per model: ERTACache's terms at each threshold, ProfilingDiT's layer sets per setting."""
    lines = []
    for name, model in result["models"].items():
        sampler = model["sampler"]
        scores = ", ".join(f"{layer}: {'-' if s is None else f'{s:.3f}'}" for layer, s in model["layer_scores"].items())
        lines += [f"## {name} ({sampler['kind']}-{sampler['steps']}, {model['observations']} observations)", "",
                  f"Layer focus scores: {scores}", "",
                  "| ERTACache threshold | computed steps | terms 0 | terms 1 | terms 2 | terms 2 + adjusted | "
                  "terms2 / terms0 |", "|---|---|---|---|---|---|---|"]
        for row in model["ertacache"]:
            d = row["deviation"]
            r = row["ratio_terms2_terms0"]
            cells = " | ".join("refused" if d[k] is None else f"{d[k]:.4f}"
                               for k in ("terms0", "terms1", "terms2", "terms2_adjusted"))
            lines.append(f"| {row['threshold']:.4g} | {len(row['computed_steps'])}/{model['num_steps']} | {cells} | "
                         f"{'-' if r is None else f'{r:.2f}'} |")
        lines += ["", "| ProfilingDiT share, interval | layers | skipped | background (layers) | foreground (layers) | "
                      "random: mean ± std (min-max) |", "|---|---|---|---|---|---|"]
        for row in model["profiling"]:
            bg, fg, rnd = row["background"], row["foreground"], row["random"]
            lines.append(f"| {row['share']:g}, {row['interval']} | {row['layers_cached']} | "
                         f"{100 * row['skipped_share']:.0f}% | {bg['deviation']:.4f} {bg['layers']} | "
                         f"{fg['deviation']:.4f} {fg['layers']} | {rnd['mean']:.4f} ± {rnd['std']:.4f} "
                         f"({rnd['min']:.4f}-{rnd['max']:.4f}) |")
        lines.append("")
    return "\n".join(lines)


@hydra.main(config_path=str(CONFIG_DIR), config_name="seed_methods", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(markdown(result))
    print(f"seed methods: {result['out_dir']}/seed_methods.json")


if __name__ == "__main__":
    main()
