"""The tuner behind ``python -m bac.tune``: the fastest configuration that keeps closed-loop success.

For a policy, its tasks and optionally a latency budget (``budget_ms``, or a control rate
``rate_hz``), it evaluates every candidate configuration (sampler kind, step count, caching
method and budget, warm start: its start step and variant; the ``methods`` group, ``front`` by default, which always includes DDPM with
all steps as the reference and fewer DDIM steps as the simple alternative) with the evaluator
itself (:func:`bac.evaluation.run.run`): paired closed-loop episodes on *calibration* seeds (from
0, the demonstration range; evaluation seeds start at :data:`EVALUATION_SEED` and are refused)
and interleaved batch-1 latency, measured the way the user deploys (``compile``, ``backend``: each candidate's
calls compiled or exported as they will run, its graphs built before any timed call). Then:

* the Pareto front: candidates no other candidate beats on both success and latency;
* the pick: among candidates within ``budget_ms`` whose pooled success is at most
  ``tolerance_points`` below the reference's, the fastest (median latency). With no such
  candidate, the most successful one within the budget, flagged ``"lossless": false``.

Caching is picked only where it is faster at that success: the search is exhaustive over the
configured candidates, with nothing favouring caching. Outputs in ``out_dir``: the evaluator's
report and episode log (``eval/``, resumable: a killed tuner re-run continues there), ``tune.json``
(every candidate, the front, the pick), ``tuned.json`` with its plan file (load it with
``policy.use_tuned(path)`` or evaluate it with ``python -m bac.eval tuned=<path>``) and ``front.png``.

A control rate is turned into a budget of one control period (``1000 / rate_hz`` ms): with chunked
execution the next chunk is computed while the last action of the current one is executed, so a
call that fits in one period never stalls the robot.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import bac
from bac.configs.settings import FLOAT, check_settings
from bac.configs import CONFIG_DIR
from bac.errors import ConfigError
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.tuned import TunedConfig

from .provenance import settings_digest, checkpoint_digest
from .run import run
from .settings import SETTINGS as EVAL_SETTINGS
from .setup import load_policy

EVALUATION_SEED = 100000  # configs/eval.yaml's first evaluation seed; demonstrations use seeds from 0
REFERENCE = "full"
TUNE_KEYS = ("tolerance_points", "budget_ms", "rate_hz")
SETTINGS = {**EVAL_SETTINGS, "tolerance_points": (FLOAT, 0, False), "budget_ms": (FLOAT, 0, True),
            "rate_hz": (FLOAT, 0, True)}


def check_tune_settings(cfg: DictConfig) -> None:
    check_settings(cfg, SETTINGS, CONFIG_DIR / "tune.yaml")
    if int(cfg.seed) + int(cfg.episodes) > EVALUATION_SEED:
        raise ConfigError(f"settings seed={cfg.seed} episodes={cfg.episodes} reach the evaluation seeds (from "
                          f"{EVALUATION_SEED}); the tuner decides on calibration seeds only, so that the "
                          "evaluation of its pick stays held out")
    if cfg.budget_ms is not None and cfg.rate_hz is not None:
        raise ConfigError("set budget_ms or rate_hz, not both")
    for key in ("budget_ms", "rate_hz"):  # checked here, not after every candidate ran: no call takes 0 ms
        value = cfg.get(key)
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"setting {key} must be a number > 0 (or null: no budget), got {value!r}")
    if cfg.tolerance_points > 100:
        raise ConfigError(f"setting tolerance_points must be <= 100 (success points), got {cfg.tolerance_points!r}")
    if OmegaConf.select(cfg, f"methods.{REFERENCE}", default=None) is None or (
            cfg.run_methods and REFERENCE not in cfg.run_methods):
        raise ConfigError(f"the candidate methods need {REFERENCE!r} (DDPM with all steps): the reference "
                          "the tolerance is measured from")
    for name in cfg.run_methods or cfg.methods.keys():
        cache = OmegaConf.select(cfg, f"methods.{name}.cache", default=None)
        if cache is not None and cache in bac.available_methods() and not bac.method_info(cache).static:
            raise ConfigError(f"candidate {name!r} caches with the runtime rule {cache!r}; a tuned file holds a "
                              "static plan, so the tuner compares static plans and plain samplers only (leave it "
                              "out with run_methods=[...])")


def budget(cfg: DictConfig) -> float | None:
    """The latency budget per policy call in ms (``rate_hz``: one control period)."""
    if cfg.rate_hz is not None:
        return 1000.0 / float(cfg.rate_hz)
    return None if cfg.budget_ms is None else float(cfg.budget_ms)


def pareto_front(candidates: dict[str, dict]) -> list[str]:
    """Names of the candidates that no other candidate matches or beats on both success and latency."""
    def beats(a: dict, b: dict) -> bool:
        return (a["successes"] >= b["successes"] and a["p50_ms"] <= b["p50_ms"]
                and (a["successes"] > b["successes"] or a["p50_ms"] < b["p50_ms"]))

    return sorted((n for n, c in candidates.items() if not any(beats(o, c) for o in candidates.values())),
                  key=lambda n: candidates[n]["p50_ms"])


def pick(candidates: dict[str, dict], tolerance_points: float, budget_ms: float | None) -> tuple[str, bool]:
    """The fastest candidate within the budget whose success is at most ``tolerance_points`` below the
    reference's; else the most successful within the budget (``lossless`` False)."""
    reference = candidates[REFERENCE]["rate"]
    affordable = {n: c for n, c in candidates.items() if budget_ms is None or c["p50_ms"] <= budget_ms}
    if not affordable:
        raise ConfigError(f"no candidate fits the budget of {budget_ms:.2f} ms per call (fastest: "
                          f"{min(c['p50_ms'] for c in candidates.values()):.2f} ms); raise the budget or add "
                          "faster candidates")
    lossless = {n: c for n, c in affordable.items() if 100 * (reference - c["rate"]) <= tolerance_points + 1e-9}
    if lossless:
        return min(lossless, key=lambda n: (lossless[n]["p50_ms"], n)), True
    return max(affordable, key=lambda n: (affordable[n]["rate"], -affordable[n]["p50_ms"])), False


def tune(cfg: DictConfig) -> dict:
    check_tune_settings(cfg)
    out = Path(cfg.out_dir) if cfg.out_dir != "auto" else Path("outputs") / "tune" / (
        f"{Path(str(cfg.checkpoint)).name}-{_digest(cfg)}")
    eval_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in TUNE_KEYS])
    eval_cfg.out_dir = str(out / "eval")
    report = run(eval_cfg)
    candidates = {}
    for name, m in report["methods"].items():
        if "success" not in m:
            raise ConfigError("the tuner needs closed-loop episodes: episodes must be > 0 on a trained checkpoint")
        candidates[name] = {
            "config": m["config"], "plan_file": m["plan_file"], "successes": m["success"]["successes"],
            "episodes": m["success"]["episodes"], "rate": m["success"]["rate"], "p50_ms": m["latency"]["p50_ms"],
            "p95_ms": m["latency"]["p95_ms"], "speedup": m["speedup"], "ideal_speedup": m["ideal_speedup"],
            "evaluations_per_call": m["evaluations_per_call"], "warm_share": m["warm_share"],
            "paired_vs_reference": m["paired_vs_full"],
        }
    limit = budget(cfg)
    chosen, lossless = pick(candidates, float(cfg.tolerance_points), limit)
    front = pareto_front(candidates)
    for name, c in candidates.items():
        c["on_front"] = name in front
    result = {
        "schema": "bac-tune/1",
        "checkpoint": str(cfg.checkpoint),
        "tasks": report["environment"]["tasks"],
        "calibration_seeds": report["environment"]["seeds"],
        "episodes_per_task": report["environment"]["episodes_per_task"],
        "reference": REFERENCE,
        "tolerance_points": float(cfg.tolerance_points),
        "budget_ms": limit,
        "compile": report["compile"],  # how the candidates' calls ran and were timed
        "pick": chosen,
        "lossless": lossless,
        "caching_picked": candidates[chosen]["config"].get("cache") is not None,
        "front": front,
        "candidates": candidates,
        "eval_report": str(out / "eval" / "report.json"),
    }
    (out / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
    write_tuned(cfg, eval_cfg, candidates[chosen], out, limit, result)
    plot_front(candidates, chosen, out / "front.png")
    return result


def write_tuned(cfg: DictConfig, eval_cfg: DictConfig, candidate: dict, out: Path, limit: float | None,
                result: dict) -> Path:
    config = dict(candidate["config"])
    sampler, steps, method = config.pop("sampler"), config.pop("steps"), config.pop("cache")
    warm = config.pop("warm", None)
    plan = None
    if method is not None:
        plan = "plan.json"
        if candidate["plan_file"] is not None:  # a calibrated plan: the evaluator's cached plan file
            shutil.copyfile(candidate["plan_file"], out / plan)
        else:  # an uncalibrated static plan (uniform, taylorseer): the evaluator rebuilds it every run
            policy = load_policy(eval_cfg)[0].with_sampler(sampler, int(steps))
            bac.build_method(method, policy.model, num_steps=int(steps), scheduler=policy.sampler.scheduler,
                             **{k: v for k, v in config.items() if k != "standin"}).schedule.save(out / plan)
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    found = {"successes": candidate["successes"], "episodes": candidate["episodes"], "p50_ms": candidate["p50_ms"],
             "speedup_vs_reference": candidate["speedup"], "lossless": result["lossless"],
             "reference_successes": result["candidates"][REFERENCE]["successes"],
             "calibration_seeds": result["calibration_seeds"], "tasks": result["tasks"]}
    tuned = TunedConfig(sampler, int(steps), method, config, plan,
                        checkpoint_digest(checkpoint) if (checkpoint / "model.safetensors").is_file() else None,
                        float(cfg.tolerance_points), limit, found,
                        **({"warm": warm} if warm is not None else {}))  # a cold pick's file as before
    return tuned.save(out / "tuned.json")


def plot_front(candidates: dict[str, dict], chosen: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in candidates.items():
        caching = c["config"].get("cache") is not None
        ax.scatter(c["speedup"], 100 * c["rate"], marker="o" if caching else "s",
                   color="tab:orange" if caching else "tab:blue", edgecolor="k" if c["on_front"] else "none", s=50)
        ax.annotate(name, (c["speedup"], 100 * c["rate"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((c["speedup"], 100 * c["rate"]) for c in candidates.values() if c["on_front"])
    ax.plot(*zip(*front), color="0.5", lw=1, zorder=0, label="Pareto front")
    c = candidates[chosen]
    ax.scatter(c["speedup"], 100 * c["rate"], marker="*", s=250, color="tab:red", zorder=3, label=f"pick: {chosen}")
    ax.set_xscale("log")
    ax.set_xlabel("speedup over DDPM, all steps (batch 1, median latency)")
    ax.set_ylabel("success % (calibration episodes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _digest(cfg: DictConfig) -> str:
    """What the results depend on (the evaluator's settings digest, weights included, plus the tuner's
    own): ``progress`` or ``latency.*`` do not move the output, so the same run resumes there."""
    tuner = {k: cfg.get(k) for k in TUNE_KEYS}
    text = settings_digest(cfg) + json.dumps(tuner, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
