"""Where caching errors surge, block by block: each block's used output against full computation, per step.

    python -m benchmarks.block_errors checkpoint=dpt-metaworld tasks=[push] run_methods=[acs,bac] M=5 samples=4

For a policy, a batch of demonstration observations and several caching methods, :func:`block_errors` taps
every block at every denoising step (``bac.accelerate(..., tap=...)``) under full computation and under each
method, on the same seeded sampling call, and measures the relative L2 error of what the block hands on;
:func:`surges` marks the steps where a block's error jumps above its median. Settings are the evaluator's
(Hydra, ``configs/eval.yaml``) plus ``samples`` and ``surge_factor``. The metric, the surge rule, the settings
and the outputs: docs/guide/evaluation.md ("Block errors").
"""
from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import bac
from bac.apps.common import report_errors
from bac.configs.settings import FLOAT, INT, check_settings
from bac.configs import CONFIG_DIR
from bac.envs.collect import collect
from bac.envs.dataset import calibration_observations
from bac.policies.policy import DiffusionPolicy
from bac.recorder import per_sample

from bac.evaluation.provenance import settings_digest
from bac.evaluation.settings import SETTINGS as EVAL_SETTINGS
from bac.evaluation.settings import EvalError, output_dir
from bac.evaluation.setup import image_calibration_batch, prepare
from bac.evaluation.variants import parse_variants

SCHEMA = "bac-block-errors/1"
SURGE_FACTOR = 2.0
OWN_SETTINGS = {"samples": (INT, 1, False), "surge_factor": (FLOAT, 1, False)}
SETTINGS = {**EVAL_SETTINGS, **OWN_SETTINGS}
DEFAULT_METHODS = ["uniform", "acs", "bac"]

ConfigStore.instance().store(name="block_errors", node={
    "defaults": ["eval", {"override methods": "default"}, "_self_"],  # the methods these analyses name
    "run_methods": DEFAULT_METHODS,
    "samples": 8,              # observations per task
    "surge_factor": SURGE_FACTOR,
})


# -- measurement -------------------------------------------------------------------------------------------------
def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``||value - reference|| / ||reference||`` per sample (rows of ``[batch, features]``); 0/0 is 0, x/0 inf."""
    diff = (value - reference).norm(dim=1)
    norm = reference.norm(dim=1)
    zero = torch.where(diff > 0, torch.full_like(diff, float("inf")), torch.zeros_like(diff))
    return torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(norm.dtype).tiny), zero)


class _Tap:
    """``bac.accelerate``'s tap: records every block output (reference) or compares it with the recorded one."""

    def __init__(self, batch_dims: list[int], num_steps: int, reference: dict | None = None):
        self.batch_dims = batch_dims
        self.reference = reference
        self.outputs: dict[tuple[str, int, int], torch.Tensor] = {}
        self.errors: dict[tuple[str, int, int], torch.Tensor] = {}
        self.computed = np.zeros((len(batch_dims), num_steps), dtype=bool)
        self.handle: bac.CacheHandle | None = None

    def __call__(self, i: int, step: int, out: Any, computed: bool) -> None:
        key = (self.handle.active_context, i, step)
        used = per_sample(out, self.batch_dims[i])
        if self.reference is None:
            self.outputs[key] = used.clone()
        else:
            if key not in self.reference:
                raise RuntimeError(f"block {i} ran at step {step} of context {key[0]!r}, which full computation "
                                   "never did: the cached sampling call differs from the full one")
            self.errors[key] = relative_l2(used, self.reference[key]).mean()
        self.computed[i, step] |= computed


def _sampling_call(policy: DiffusionPolicy, method: bac.Method | bac.Plan | bac.Rule, batch: Mapping, seed: int,
                   tap: _Tap) -> torch.Tensor:
    """One seeded sampling call of ``policy`` cached by ``method`` with ``tap``: the whole action chunk."""
    devices = [policy.device.index or 0] if policy.device.type == "cuda" else []
    with bac.accelerate(policy.model, method, num_steps=policy.sampler.steps, scheduler=policy.sampler.scheduler,
                        tap=tap) as handle:
        tap.handle = handle
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            generator = torch.Generator(device=policy.device).manual_seed(seed)
            return policy.predict_action_chunk(batch, generator=generator, num_actions=policy.horizon).float()


def surges(errors: np.ndarray, mask: np.ndarray, factor: float = SURGE_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``[blocks, steps]`` maps of surges (reused steps) and update surges (update steps): a block's
    error above ``factor`` times its median over the steps (docs/guide/evaluation.md, "Block errors")."""
    median = np.median(errors, axis=1, keepdims=True)
    high = errors > factor * median
    return high & ~mask, high & mask


def _mask(schedule: Any, recorded: np.ndarray) -> np.ndarray:
    """The update mask ``[blocks, steps]``: a plan's own table (checked against what ran), else what ran."""
    if isinstance(schedule, bac.Plan):
        table = np.asarray(schedule.step_table(), dtype=bool).T
        if not np.array_equal(table, recorded):
            raise RuntimeError(f"the engine computed other block evaluations than plan {schedule.method!r} says")
        return table
    return recorded


def block_errors(policy: DiffusionPolicy, plans: Mapping[str, bac.Method | bac.Plan | bac.Rule], batch: Mapping,
                 seed: int = 0, surge_factor: float = SURGE_FACTOR) -> dict[str, dict]:
    """Per method of ``plans`` (name -> a :class:`bac.Method`, plan or rule for the policy's current sampler):
    every block's error against full computation at every step, on one seeded sampling call of ``batch``.

    Returns per method: ``errors`` (``[num_blocks, num_steps]`` float array, relative L2 averaged over the
    batch, docs/guide/evaluation.md), ``mask`` (``[num_blocks, num_steps]`` bool, True where the block is
    computed), ``blocks`` (name, kind, layer of each row), ``action_deviation`` (relative L2 of the action
    chunk, mean and max over the batch), per block ``block_mean``, ``block_max``, ``block_median`` over the
    steps and ``block_surges`` / ``block_update_surges`` counts, and the totals ``mean_error``,
    ``mean_error_reused``, ``mean_error_updated``, ``surges``, ``update_surges``, ``skipped_share``,
    ``surge_factor``.
    """
    spec = bac.describe(policy.model)
    num_steps, batch_dims = policy.sampler.steps, spec.batch_dims()
    full = bac.build_method("every-step", policy.model, num_steps=num_steps, scheduler=policy.sampler.scheduler)
    reference = _Tap(batch_dims, num_steps)
    full_actions = _sampling_call(policy, full, batch, seed, reference)
    blocks = [{"name": b.name, "kind": b.kind, "layer": b.layer} for b in spec.blocks]
    results = {}
    for name, method in plans.items():
        schedule = method.schedule if isinstance(method, bac.Method) else method
        tap = _Tap(batch_dims, num_steps, reference.outputs)
        actions = _sampling_call(policy, method, batch, seed, tap)
        if set(tap.errors) != set(reference.outputs):
            raise RuntimeError(f"method {name!r} ran {len(tap.errors)} block evaluations, full computation "
                               f"{len(reference.outputs)}: not the same sampling call")
        errors = np.zeros((len(blocks), num_steps))
        counts = np.zeros((len(blocks), num_steps))
        for (_, i, step), value in tap.errors.items():
            errors[i, step] += float(value)
            counts[i, step] += 1
        errors /= counts
        mask = _mask(schedule, tap.computed)
        surge, update_surge = surges(errors, mask, surge_factor)
        deviation = relative_l2(actions.flatten(1), full_actions.flatten(1))
        results[name] = {
            "method": method.name if isinstance(method, bac.Method) else (getattr(schedule, "method", None)
                                                                            or getattr(schedule, "name", name)),
            "params": dict(getattr(method, "params", None) or {}),
            "blocks": blocks,
            "errors": errors,
            "mask": mask,
            "action_deviation": {"mean": float(deviation.mean()), "max": float(deviation.max())},
            "block_mean": errors.mean(axis=1),
            "block_max": errors.max(axis=1),
            "block_median": np.median(errors, axis=1),
            "block_surges": surge.sum(axis=1),
            "block_update_surges": update_surge.sum(axis=1),
            "surge_steps": surge,
            "update_surge_steps": update_surge,
            "mean_error": float(errors.mean()),
            "mean_error_reused": float(errors[~mask].mean()) if (~mask).any() else 0.0,
            "mean_error_updated": float(errors[mask].mean()),
            "surges": int(surge.sum()),
            "update_surges": int(update_surge.sum()),
            "skipped_share": float(1 - mask.mean()),
            "surge_factor": float(surge_factor),
        }
    return results


def to_json(result: Mapping[str, Any]) -> dict:
    """One method's :func:`block_errors` entry as JSON data (arrays as nested lists; surge maps as step lists)."""
    entry = {}
    for key, value in result.items():
        if key in ("surge_steps", "update_surge_steps"):
            entry[key] = {b["name"]: np.flatnonzero(row).tolist() for b, row in zip(result["blocks"], value)}
        elif isinstance(value, np.ndarray):
            entry[key] = value.tolist()
        else:
            entry[key] = value
    return entry


# -- figure ------------------------------------------------------------------------------------------------------
def figure(results: Mapping[str, Mapping], schedules: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Per method the update steps (plan heatmap) above the error heatmap; one log colour scale for all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, LogNorm

    positive = np.concatenate([r["errors"][r["errors"] > 0] for r in results.values()] + [np.zeros(0)])
    finite = positive[np.isfinite(positive)]
    vmax = float(finite.max()) if finite.size else 1.0
    vmin = max(float(finite.min()) if finite.size else vmax * 1e-3, vmax * 1e-6)
    if vmin >= vmax:
        vmin = vmax / 10
    norm = LogNorm(vmin=vmin, vmax=vmax, clip=True)
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("#f4f4f4")  # zero error (nothing to take the log of)
    first = next(iter(results.values()))
    num_blocks, num_steps = first["errors"].shape
    row = 0.13 * num_blocks + 0.9
    fig, axes = plt.subplots(2 * len(results), 1, figsize=(min(16.0, 4 + 0.1 * num_steps), 2 * row * len(results)),
                             squeeze=False)
    names = [b["name"] for b in first["blocks"]]
    image = None
    for n, (name, result) in enumerate(results.items()):
        plan_ax, error_ax = axes[2 * n, 0], axes[2 * n + 1, 0]
        schedule = schedules.get(name)
        if isinstance(schedule, bac.Plan):
            schedule.heatmap(ax=plan_ax)
        else:
            plan_ax.imshow(result["mask"].astype(float), aspect="auto", interpolation="nearest",
                           cmap=ListedColormap(["#e8e8e8", "#c0392b"]), vmin=0, vmax=1)
            plan_ax.set_yticks(range(num_blocks), names, fontsize=6)
        plan_ax.set_title(f"{name}: update steps (red), {100 * result['skipped_share']:.0f}% of block evaluations "
                          "reused", fontsize=9)
        plan_ax.set_xlabel("")
        errors = np.ma.masked_less_equal(result["errors"], 0)
        image = error_ax.imshow(errors, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        blocks, steps = np.nonzero(result["surge_steps"])
        error_ax.scatter(steps, blocks, marker="x", s=10, c="#2ecc71", linewidths=0.8,
                         label=f"surge (> {result['surge_factor']:g}x median, reused)")
        blocks, steps = np.nonzero(result["update_surge_steps"])
        error_ax.scatter(steps, blocks, marker="+", s=12, c="#3498db", linewidths=0.8,
                         label="update surge (same, update step)")
        error_ax.set_xlim(-0.5, num_steps - 0.5)
        error_ax.set_ylim(num_blocks - 0.5, -0.5)
        error_ax.set_yticks(range(num_blocks), names, fontsize=6)
        error_ax.set_title(f"{name}: relative L2 error vs full computation (mean {result['mean_error']:.3g}, "
                           f"{result['surges']} surges, {result['update_surges']} update surges; action deviation "
                           f"{result['action_deviation']['mean']:.3g})", fontsize=9)
        error_ax.set_xlabel("denoising step (execution order)")
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 0.9, 1 - 0.4 / fig.get_figheight()))
    fig.colorbar(image, cax=fig.add_axes((0.915, 0.3, 0.012, 0.4)),
                 label="relative L2 error (log scale; zero: light grey)")
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the CLI -----------------------------------------------------------------------------------------------------
def observations(cfg: DictConfig, policy: DiffusionPolicy, task: str) -> dict:
    """``samples`` observations of ``task`` from its demonstrations, drawn with ``seed`` (not the calibration's)."""
    samples = int(cfg.samples)
    if policy.cameras:
        obs_cfg = OmegaConf.merge(cfg, {"calibration": {"seed": int(cfg.seed)}})
        return image_calibration_batch(obs_cfg, policy, [task], samples)
    path = collect(task, int(cfg.calibration.episodes), progress=False)
    obs = calibration_observations(path, samples, seed=int(cfg.seed), n_obs_steps=policy.n_obs_steps)
    return {"observation.state": torch.as_tensor(obs, dtype=torch.float32), "task": [task] * samples}


def _check(cfg: DictConfig) -> None:
    check_settings(cfg, SETTINGS, CONFIG_DIR / "eval.yaml")
    if int(cfg.seed) == int(cfg.calibration.seed):
        raise EvalError(f"seed={cfg.seed} is the calibration's seed: measure on other observations than the plans "
                        "were calibrated on (pick another seed)")
    config = OmegaConf.to_container(cfg.methods, resolve=True)
    variants = parse_variants(config, cfg.run_methods, "ddpm", 1, auto_steps=1)  # names and parameters only
    plain = [v.name for v in variants if v.method is None and cfg.run_methods]
    budgeted = [v.name for v in variants if v.budgeted and cfg.run_methods]
    if plain:
        raise EvalError(f"method(s) {plain} do not cache: block errors compare caching methods with full "
                        "computation (the reference, always run)")
    if budgeted:
        raise EvalError(f"method(s) {budgeted} are budget plans, made from latency measured by bac.eval; "
                        "evaluate their plan files with bac.eval")


def run(cfg: DictConfig) -> dict:
    """The CLI's work: prepare the policy and plans as ``bac.eval`` does, measure per task, write JSON and figures."""
    try:
        _check(cfg)
    except ValueError as err:
        raise EvalError(str(err)) from err
    eval_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in OWN_SETTINGS])
    if not cfg.run_methods:  # every caching variant of the set
        config = OmegaConf.to_container(cfg.methods, resolve=True)
        eval_cfg.run_methods = [v.name for v in parse_variants(config, [], "ddpm", 1, auto_steps=1)
                                if v.method is not None and not v.budgeted]
        if not eval_cfg.run_methods:
            raise EvalError("the method set has no caching variant to compare")
    setup = prepare(eval_cfg)
    policy, variants = setup.policy, [v for v in setup.variants if v.name in setup.built]
    digest = hashlib.sha256(json.dumps([settings_digest(eval_cfg), int(cfg.samples), float(cfg.surge_factor)])
                            .encode()).hexdigest()[:10]
    out = output_dir(eval_cfg, "block_errors", digest)
    out.mkdir(parents=True, exist_ok=True)
    samplers = {}
    for variant in variants:  # one full reference per sampler a variant caches
        samplers.setdefault((variant.sampler, variant.steps), []).append(variant)
    tasks, figures = {}, {}
    for task in setup.tasks:
        batch = observations(cfg, policy, task)
        results, schedules = {}, {}
        for (sampler, steps), group in samplers.items():
            built = {v.name: setup.built[v.name] for v in group}
            results |= block_errors(policy.with_sampler(sampler, steps), built, batch, seed=int(cfg.seed),
                                    surge_factor=float(cfg.surge_factor))
            schedules |= {name: method.schedule for name, method in built.items()}
        for (sampler, steps), group in samplers.items():
            name = f"block_errors-{task}.png" if len(samplers) == 1 else f"block_errors-{task}-{sampler}{steps}.png"
            chosen = {v.name: results[v.name] for v in group}
            figure(chosen, schedules, out / name, title=f"{Path(str(cfg.checkpoint)).name}, {task}, {sampler} "
                   f"{steps} steps, {cfg.samples} observations, seed {cfg.seed}")
            figures.setdefault(task, []).append(name)
        tasks[task] = {"methods": {name: to_json(r) for name, r in results.items()}}
    summary = {}
    for variant in variants:
        entries = [tasks[t]["methods"][variant.name] for t in tasks]
        summary[variant.name] = {
            "config": variant.describe(),
            "mean_error": float(np.mean([e["mean_error"] for e in entries])),
            "mean_error_reused": float(np.mean([e["mean_error_reused"] for e in entries])),
            "mean_error_updated": float(np.mean([e["mean_error_updated"] for e in entries])),
            "surges": int(sum(e["surges"] for e in entries)),
            "update_surges": int(sum(e["update_surges"] for e in entries)),
            "action_deviation": float(np.mean([e["action_deviation"]["mean"] for e in entries])),
            "skipped_share": float(np.mean([e["skipped_share"] for e in entries])),
        }
    result = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.block_errors " + " ".join(sys.argv[1:]),
        "out_dir": str(out),
        "policy": {"checkpoint": str(cfg.checkpoint), "architecture": policy.architecture, "trained": setup.trained},
        "sampler": {"kind": setup.base_sampler, "steps": setup.base_steps},
        "settings": {"samples": int(cfg.samples), "seed": int(cfg.seed), "surge_factor": float(cfg.surge_factor),
                     "observations": f"demonstrations ({int(cfg.calibration.episodes)} per task), seed {cfg.seed}"},
        "calibration": {key: c.facts() for key, c in setup.calibrations.items()} or None,
        "metric": "relative L2 ||used - full|| / ||full|| per sample, mean over the batch, per block and step; "
                  "used: the computed output at update steps, the stand-in at reused steps",
        "surge": f"a block's error above {float(cfg.surge_factor):g}x its median over the steps at a step where it "
                 "is reused (update_surges: the same at update steps)",
        "summary": summary,
        "tasks": tasks,
        "figures": figures,
    }
    (out / "block_errors.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


@hydra.main(config_path=str(CONFIG_DIR), config_name="block_errors", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(f"{'method':<16}{'mean err':>10}{'reused':>10}{'updated':>10}{'surges':>8}{'upd.surg':>9}{'action dev':>12}"
          f"{'skipped':>9}")
    for name, s in result["summary"].items():
        print(f"{name:<16}{s['mean_error']:10.4f}{s['mean_error_reused']:10.4f}{s['mean_error_updated']:10.4f}"
              f"{s['surges']:8d}{s['update_surges']:9d}{s['action_deviation']:12.4f}{100 * s['skipped_share']:8.1f}%")
    print(f"block errors: {result['out_dir']}/block_errors.json")


if __name__ == "__main__":
    main()
