"""Caching methods on diffusers' DiT, FLUX and Wan transformers: speedup against deviation, in one run.

    python -m bac.evaluation.bench_diffusers [--models dit flux wan dit-digits] [--steps 20] [--repeats 3] [--device auto]

For each transformer (random weights, built from a config shaped like the
released model, with fewer layers, fewer heads and small latents so that CPU
time allows; the output states the exact configs; and ``dit-digits``, a small
DiT really trained here, see ``eval/digits_dit.py``) it runs, on the same
initial noise and conditioning, full computation, every bac method at a few
settings, and diffusers' own caches (``FirstBlockCacheConfig``,
``TaylorSeerCacheConfig``, ``MagCacheConfig`` calibrated here with its own
``calibrate=True`` mode). Methods are timed interleaved (one sampling call of
each per round, ``--repeats`` rounds, medians, one thread on CPU) and compared
as speedup over full computation from the same run; deviation is the relative
L2 distance and PSNR of the final latents against full computation; the share
of skipped block evaluations is counted by forward hooks on each branch's own
sub-module (attention, FFN), the same way for bac and for diffusers.

Random weights make absolute quality meaningless, and a random transformer's
features change 13-50 % between steps (thresholds tuned on trained models
never fire): compare methods at matched deviation, not at matched threshold.
The trained digits DiT shows how the methods behave on real weights, and its
samples' quality is measured too: the share a digit classifier assigns to the
class they were generated for.

To run diffusers' caches as peers, this benchmark does what their pipelines
do not: ``DiTTransformer2DModel`` gets diffusers' ``CacheMixin`` in a
subclass (it has no ``enable_cache``), every denoiser call runs inside
``transformer.cache_context(...)`` (``DiTPipeline`` sets none, so
FirstBlockCache would raise), and TaylorSeerCache gets explicit block patterns
(its defaults match nothing in DiT or Wan and it would silently do nothing).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import diffusers
import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FirstBlockCacheConfig,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    WanTransformer3DModel,
)

import bac
import bac.diffusers
from bac.evaluation import digits_dit
from bac.evaluation.branch_counts import count_branches
from bac.evaluation.digits_dit import CachingDiT
from bac.evaluation.timing import summarize, synchronize

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_diffusers"

# --- the three transformers and their sampling loops ------------------------------------------------


@dataclass
class Case:
    name: str
    shaped_like: str
    config: dict
    build: Callable[[dict], torch.nn.Module]
    inputs: Callable[[torch.Generator, torch.device], tuple[torch.Tensor, dict]]
    scheduler: Callable[[], Any]
    call: Callable[..., torch.Tensor]
    guidance: float | None = None  # run the transformer twice per step ("cond"/"uncond") when set
    block_patterns: list[str] = field(default_factory=list)  # for diffusers' TaylorSeerCache
    weights: str = "random"
    steps: int | None = None  # sampling steps; None: the --steps option
    quality: Callable[[torch.Tensor, dict], dict] | None = None  # quality measures of the final output
    # fbcache / cg-taylor / FirstBlockCache thresholds: random features change 13-50 % per step, trained ones 0.5-3 %
    thresholds: tuple[float, ...] = (0.3, 0.6, 1.0)
    budgets: tuple[float, ...] | None = None  # deviation budgets of the summary; None: the --budgets option


def _dit_inputs(g, device):
    return torch.randn(1, 4, 8, 8, generator=g).to(device), {"class_labels": torch.tensor([207], device=device)}


def _dit_call(model, x, t, cond):
    return model(x, timestep=t.expand(x.shape[0]).to(x.device), class_labels=cond["class_labels"]).sample[:, :4]


def _flux_inputs(g, device):
    side = 8  # 8 x 8 packed latent tokens (a 128 x 128 image), 16 text tokens
    img_ids = torch.stack([torch.zeros(side * side), torch.arange(side * side) // side, torch.arange(side * side) % side], 1)
    cond = {
        "encoder_hidden_states": torch.randn(1, 16, 4096, generator=g).to(device),
        "pooled_projections": torch.randn(1, 768, generator=g).to(device),
        "img_ids": img_ids.to(device),
        "txt_ids": torch.zeros(16, 3, device=device),
    }
    return torch.randn(1, side * side, 64, generator=g).to(device), cond


def _flux_call(model, x, t, cond):
    return model(x, timestep=(t / 1000).expand(x.shape[0]).to(x.device), **cond).sample


def _wan_inputs(g, device):
    return torch.randn(1, 16, 2, 8, 8, generator=g).to(device), {
        "encoder_hidden_states": torch.randn(1, 16, 4096, generator=g).to(device),
        "negative": torch.randn(1, 16, 4096, generator=g).to(device),
    }


def _wan_call(model, x, t, cond, negative=False):
    text = cond["negative"] if negative else cond["encoder_hidden_states"]
    return model(x, t.expand(x.shape[0]).to(x.device), text).sample


def _digits_build(config):
    return digits_dit.load(digits_dit.DEFAULT_CHECKPOINT, model_class=CachingDiT)


def _digits_inputs(g, device):
    labels = torch.arange(digits_dit.NUM_CLASSES).repeat_interleave(DIGITS_PER_CLASS)
    return torch.randn(len(labels), 1, 16, 16, generator=g).to(device), {"class_labels": labels.to(device)}


def _digits_call(model, x, t, cond):
    return digits_dit.guided_noise(model, x, t, cond["class_labels"], guidance=digits_dit.GUIDANCE)


@functools.cache
def _digit_classifier() -> digits_dit.DigitClassifier:
    return digits_dit.DigitClassifier()


def _digits_quality(images, cond):
    return {"class_accuracy": _digit_classifier().accuracy(images, cond["class_labels"])}


DIGITS_PER_CLASS = 4

CASES = {
    "dit": Case(
        "dit",
        "shaped like DiT-XL/2 (width 1152, 16 heads x 72, patch 2, adaLN-Zero, learned sigma); 8 of 28 layers, 8x8 latent",
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, sample_size=8,
             patch_size=2, num_layers=8, num_embeds_ada_norm=1000, norm_num_groups=32),
        lambda config: CachingDiT(**config),
        _dit_inputs,
        # DPM-Solver++ as in DiT's examples. DDIM's default clip_sample saturates on random weights and makes
        # the trajectory chaotic: every caching method then lands at relative L2 ~1, nothing to compare.
        lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000),
        _dit_call,
        block_patterns=[r"transformer_blocks\.\d+"],
    ),
    "flux": Case(
        "flux",
        "shaped like FLUX.1 (head dim 128, RoPE axes 16/56/56, T5 4096-d text, CLIP 768-d pooled, dual- then single-stream); "
        "6 of 24 heads, 2 of 19 dual and 6 of 38 single blocks, 64 image + 16 text tokens",
        dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=128,
             num_attention_heads=6, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
             axes_dims_rope=(16, 56, 56)),
        lambda config: FluxTransformer2DModel(**config),
        _flux_inputs,
        lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        _flux_call,
        block_patterns=[r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"],
    ),
    "wan": Case(
        "wan",
        "shaped like Wan 2.1 T2V (head dim 128, FFN 5.8x width, 4096-d text, patch 1x2x2, classifier-free guidance as two "
        "calls); 6 of 12 heads, 6 of 30 layers, 2x8x8 latent (32 tokens), 16 text tokens",
        dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=4480, num_layers=6, rope_max_seq_len=1024),
        lambda config: WanTransformer3DModel(**config),
        _wan_inputs,
        lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        _wan_call,
        guidance=5.0,
        block_patterns=[r"blocks\.\d+"],
    ),
    "dit-digits": Case(
        "dit-digits",
        "DiT trained here (eval/digits_dit.py: adaLN-Zero, 6 layers, width 128, 16x16 pixel digits, patch 2); "
        f"50-step DDIM, classifier-free guidance {digits_dit.GUIDANCE} batched into one call, "
        f"{DIGITS_PER_CLASS} samples per class",
        digits_dit.MODEL_CONFIG,
        _digits_build,
        _digits_inputs,
        digits_dit.scheduler_for_sampling,
        _digits_call,
        block_patterns=[r"transformer_blocks\.\d+"],
        weights="trained on scikit-learn's digits (eval/checkpoints/dit-digits)",
        steps=50,
        quality=_digits_quality,
        thresholds=(0.03, 0.08, 0.2),
        budgets=(0.04, 0.1, 0.15),  # 50 deterministic DDIM steps on pixels: no method stays under 0.03 and skips much
    ),
}


@torch.no_grad()
def sample(case: Case, model, x: torch.Tensor, cond: dict, steps: int) -> torch.Tensor:
    """One sampling call as diffusers' pipelines run it, with a cache context around every denoiser call."""
    scheduler = case.scheduler()
    scheduler.set_timesteps(steps, device=x.device)
    bac.new_trajectory(model)
    for i, t in enumerate(scheduler.timesteps):
        context = {"step_index": i, "num_inference_steps": steps}
        with model.cache_context("cond", **context):
            noise = case.call(model, x, t, cond)
        if case.guidance is not None:
            with model.cache_context("uncond", **context):
                uncond = case.call(model, x, t, cond, negative=True)
            noise = uncond + case.guidance * (noise - uncond)
        x = scheduler.step(noise, t, x).prev_sample
    model._reset_stateful_cache()  # what a pipeline's maybe_free_model_hooks does for diffusers' caches
    return x


# --- methods -----------------------------------------------------------------------------------------


@dataclass
class Setting:
    family: str  # method name, and "diffusers:" for diffusers' own caches
    label: str
    enable: Callable[[], Any]
    disable: Callable[[], None]


def bac_settings(case: Case, model, calibration: bac.Calibration, steps: int) -> list[Setting]:
    grid = [
        ("bac", {"M": max(2, steps // 6), "n": 3}),
        ("bac", {"M": max(2, steps // 4), "n": 3}),
        ("bac", {"M": max(2, steps * 2 // 5), "n": 3}),
        ("bac+taylor", {"M": max(2, steps // 4), "n": 3, "standin": "taylor-1"}),
        ("uniform", {"interval": 2}),
        ("uniform", {"interval": 4}),
        ("taylorseer", {"interval": 2, "order": 2}),
        ("taylorseer", {"interval": 4, "order": 2}),
        *[("fbcache", {"threshold": threshold}) for threshold in case.thresholds],
        *[("cg-taylor", {"gate": threshold}) for threshold in case.thresholds],
        ("sortblock", {"fraction": 0.5, "interval": 4}),
        ("sortblock", {"fraction": 0.25, "interval": 4}),
    ]
    settings = []
    for family, params in grid:
        name = family.split("+")[0]
        source = calibration if bac.methods.needs_calibration(name) else model
        method = bac.build_method(name, source, num_steps=steps, **params)  # built once, enabled per call
        label = f"{family} " + " ".join(f"{k}={v}" for k, v in params.items() if k != "standin")
        settings.append(Setting(
            family, label,
            lambda method=method: bac.diffusers.enable_cache(model, method, num_inference_steps=steps),
            lambda: bac.diffusers.disable_cache(model),
        ))
    return settings


def calibrate_magcache(case: Case, model, inputs, steps: int) -> list[float]:
    """MagCache's own calibration run (``calibrate=True``); it prints the ratios, which we read back."""
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            sample(case, model, *inputs, steps)
    finally:
        model.disable_cache()
    for line in printed.getvalue().splitlines():
        if line.startswith("[") and not line.startswith("[MagCache]"):
            return [float(r) for r in ast.literal_eval(line)]
    raise RuntimeError(f"MagCache calibration printed no ratios: {printed.getvalue()[:300]!r}")


def diffusers_settings(case: Case, model, inputs, steps: int) -> tuple[list[Setting], dict]:
    notes = {}
    configs = [
        *[("diffusers:FirstBlockCache", f"threshold={threshold}",
           lambda threshold=threshold: FirstBlockCacheConfig(threshold=threshold)) for threshold in case.thresholds],
        ("diffusers:TaylorSeerCache", "interval=2",
         lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                       taylor_factors_dtype=torch.float32, cache_identifiers=case.block_patterns)),
        ("diffusers:TaylorSeerCache", "interval=4",
         lambda: TaylorSeerCacheConfig(cache_interval=4, disable_cache_before_step=1, max_order=1,
                                       taylor_factors_dtype=torch.float32, cache_identifiers=case.block_patterns)),
    ]
    try:
        ratios = calibrate_magcache(case, model, inputs, steps)
        notes["magcache_ratios"] = ratios
        for threshold, max_skips in ((0.06, 2), (0.24, 4)):
            configs.append((
                "diffusers:MagCache", f"threshold={threshold} max_skip_steps={max_skips}",
                lambda threshold=threshold, max_skips=max_skips: MagCacheConfig(
                    threshold=threshold, max_skip_steps=max_skips, num_inference_steps=steps, mag_ratios=ratios),
            ))
    except Exception as err:  # reported in the output, not hidden
        notes["magcache_error"] = f"{type(err).__name__}: {err}"
    settings = [
        Setting(family, f"{family.split(':')[1]} {label}",
                lambda make=make: model.enable_cache(make()), lambda: model.disable_cache())
        for family, label, make in configs
    ]
    return settings, notes


# --- measurement -------------------------------------------------------------------------------------


def deviation(x: torch.Tensor, reference: torch.Tensor) -> dict:
    x, reference = x.double().cpu(), reference.double().cpu()
    mse = float((x - reference).square().mean())
    peak = float(reference.max() - reference.min())
    return {
        "rel_l2": float((x - reference).norm() / reference.norm()),
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(peak**2 / mse),
    }


def bench_model(case: Case, steps: int, repeats: int, device: torch.device, seed: int, log) -> dict:
    steps = case.steps or steps
    torch.manual_seed(seed)
    model = case.build(case.config).to(device).eval()
    parameters = sum(p.numel() for p in model.parameters())
    inputs = case.inputs(torch.Generator().manual_seed(seed), device)
    log(f"[{case.name}] {parameters / 1e6:.0f} M parameters, {steps} steps: calibrating")
    calibration_inputs = [case.inputs(torch.Generator().manual_seed(seed + 1 + i), device) for i in range(2)]
    calibration = bac.diffusers.calibrate(model, calibration_inputs, sample_fn=lambda xc: sample(case, model, *xc, steps))
    peers, notes = diffusers_settings(case, model, inputs, steps)
    settings = [Setting("full", "full", lambda: None, lambda: None)] + bac_settings(case, model, calibration, steps)
    settings += peers

    # untimed pass: outputs (deviation) and real branch evaluations (skipped share)
    results, reference = [], None
    for setting in settings:
        counts, hooks = count_branches(model)
        setting.enable()
        try:
            out = sample(case, model, *inputs, steps)
        finally:
            setting.disable()
            for h in hooks:
                h.remove()
        reference = out if reference is None else reference
        evaluations = steps * len(counts) * (2 if case.guidance is not None else 1)
        results.append({"family": setting.family, "setting": setting.label,
                        "skipped_share": 1 - sum(counts.values()) / evaluations,
                        **deviation(out, reference), "finite": bool(torch.isfinite(out).all()),
                        **(case.quality(out, inputs[1]) if case.quality else {}), "times": []})
        log(f"  {setting.label:<38} skipped {100 * results[-1]['skipped_share']:5.1f}%  "
            f"rel L2 {results[-1]['rel_l2']:.4f}" + "".join(
                f"  {k} {v:.3f}" for k, v in results[-1].items() if k == "class_accuracy"))
    # timed rounds, interleaved
    for round_index in range(repeats):
        for setting, result in zip(settings, results):
            setting.enable()
            try:
                synchronize(device)
                start = time.perf_counter()
                sample(case, model, *inputs, steps)
                synchronize(device)
                result["times"].append(time.perf_counter() - start)
            finally:
                setting.disable()
        log(f"  round {round_index + 1}/{repeats}: full {1e3 * results[0]['times'][-1]:.0f} ms")
    full_ms = summarize(results[0]["times"])["p50_ms"]
    for result in results:
        result["latency"] = summarize(result.pop("times"))
        result["speedup"] = full_ms / result["latency"]["p50_ms"]
    return {"model": case.name, "shaped_like": case.shaped_like, "weights": case.weights,
            "config": _jsonable(case.config),
            "parameters": parameters, "steps": steps, "guidance_calls_per_step": 2 if case.guidance else 1,
            "budgets": list(case.budgets) if case.budgets else None, "results": results, **notes}


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# --- report ------------------------------------------------------------------------------------------


def matched(results: list[dict], budget: float) -> dict[str, dict]:
    """Per method family, the fastest setting that skips something, with deviation (relative L2) within ``budget``."""
    best = {}
    for r in results:
        if r["family"] == "full" or r["skipped_share"] == 0 or r["rel_l2"] > budget:
            continue
        if r["family"] not in best or r["speedup"] > best[r["family"]]["speedup"]:
            best[r["family"]] = r
    return best


def markdown(report: dict) -> str:
    lines = [f"# Caching methods on diffusers transformers ({report['device']}, {report['threads']} thread(s))", "",
             "On random weights absolute quality is meaningless; compare speedups at matched deviation.", ""]
    for model in report["models"]:
        accuracy = "class_accuracy" in model["results"][0]
        lines += [f"## {model['model']}: {model['shaped_like']}", "",
                  f"Weights: {model['weights']}. {model['parameters'] / 1e6:.1f} M parameters, {model['steps']} steps, "
                  f"{model['guidance_calls_per_step']} denoiser call(s) per step; "
                  f"full computation {model['results'][0]['latency']['p50_ms']:.0f} ms per sampling call.", "",
                  "| method | setting | speedup | skipped | rel. L2 | PSNR dB |" + (" class accuracy |" if accuracy else ""),
                  "|---|---|---|---|---|---|" + ("---|" if accuracy else "")]
        for r in model["results"]:
            lines.append(f"| {r['family']} | {r['setting']} | {r['speedup']:.2f}x | {100 * r['skipped_share']:.0f}% | "
                         f"{r['rel_l2']:.4f} | {r['psnr_db']:.1f} |" + (f" {r['class_accuracy']:.2f} |" if accuracy else ""))
        for budget in model.get("budgets") or report["budgets"]:
            best = matched(model["results"], budget)
            ranked = sorted(best.values(), key=lambda r: -r["speedup"])
            lines += ["", f"Fastest setting per method with relative L2 <= {budget}: " + (", ".join(
                f"{r['setting']} {r['speedup']:.2f}x" for r in ranked) or "none")]
        if "magcache_error" in model:
            lines += ["", f"MagCache could not be calibrated here: {model['magcache_error']}"]
        lines.append("")
    lines += ["Notes: " + report["notes"], ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    columns = min(2, len(models))
    rows = math.ceil(len(models) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.remove()
    for ax, model in zip(axes.flat, models):
        families = sorted({r["family"] for r in model["results"] if r["family"] != "full"})
        for family in families:
            # settings that skipped nothing have zero deviation and no place on a log axis
            points = sorted((r["rel_l2"], r["speedup"]) for r in model["results"]
                            if r["family"] == family and r["rel_l2"] > 0)
            if not points:
                continue
            style = "--" if family.startswith("diffusers:") else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=family)
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("deviation from full computation (relative L2 of final latents)")
        ax.set_ylabel("speedup over full computation")
        weights = "random weights" if model["weights"] == "random" else "trained"
        ax.set_title(f"{model['model']} ({model['steps']} steps, {weights})", fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bac.evaluation.bench_diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.01, 0.03],
                        help="deviation budgets (relative L2) for the matched-deviation summary")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "budgets": args.budgets,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": torch.get_num_threads()},
        "notes": ("weights random except dit-digits (trained here); speedup = median full latency / median method latency from interleaved rounds; "
                  "skipped = share of branch evaluations not run (forward hooks on each branch's attention/FFN "
                  "module); diffusers' caches run with CacheMixin added to DiT, cache_context set on every call "
                  "and explicit TaylorSeerCache block patterns (see the module docstring)"),
        "models": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        report["models"].append(bench_model(CASES[name], args.steps, args.repeats, device, args.seed, print))
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    plot(report, args.out / "speedup_vs_deviation.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
