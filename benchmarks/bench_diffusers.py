"""Caching methods on diffusers' DiT, FLUX and Wan, against diffusers' own caches at their best settings.

    python -m benchmarks.bench_diffusers [--models dit flux wan dit-digits flux-pipeline wan-pipeline]
        [--steps 20] [--repeats 3] [--grid case] [--device auto] [--out DIR]

Six cases (random-weight transformers shaped like the released models, the digits DiT trained here, and the
real tiny FLUX and Wan pipelines), each on the same noise and conditioning for every method: every method of
this project and diffusers' caches over grids of settings, timed interleaved, compared at matched deviation
from full computation. To run diffusers' caches as peers, the benchmark gives them what their pipelines do
not (``CacheMixin`` on DiT, a ``cache_context`` with step and noise level, explicit TaylorSeerCache
patterns, SeaCache visual latents). What runs, how it is measured, and those peer adaptations:
docs/guide/diffusers.md ("The benchmark against diffusers' own caches").
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import inspect
import io
import json
import logging
import math
import platform
import re
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
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    WanTransformer3DModel,
)
from diffusers.utils.torch_utils import unwrap_module

import bac
import bac.diffusers
from benchmarks import digits_dit
from benchmarks.branch_counts import count_branches
from benchmarks.digits_dit import CachingDiT
from bac.evaluation.timing import summarize, synchronize
from benchmarks.tiny_pipelines import call_kwargs, tiny_flux_pipeline, tiny_wan_pipeline

DEFAULT_OUT = Path("outputs") / "bench_diffusers"
DEFAULT_BUDGETS = (0.005, 0.01, 0.03)
GRIDS = ("full", "small", "tiny")  # settings per method: dit-digits' full grid, random weights' small one, tests'

# --- the cases: transformers with their sampling loops, and real pipelines ----------------------------


@dataclass
class Case:
    name: str
    shaped_like: str
    config: dict  # the transformer's constructor arguments (pipelines: empty, they build their own)
    build: Callable[[dict], Any]  # the transformer; with ``pipeline``, the pipeline
    inputs: Callable[[int, torch.device], Any]  # the input of one sampling call, from a seed
    scheduler: Callable[[], Any] | None = None  # the sampling loop's (cases without ``pipeline``)
    call: Callable[..., torch.Tensor] | None = None  # one denoiser call of the sampling loop
    pipeline: str | None = None  # "flux" / "wan": a sampling call is the tiny real pipeline's own call
    guidance: float | None = None  # the loop runs the transformer twice per step ("cond"/"uncond") when set
    block_patterns: list[str] = field(default_factory=list)  # TaylorSeerCache on whole blocks
    module_patterns: list[str] = field(default_factory=list)  # TaylorSeerCache on the attention / FFN modules
    sea_vision: Callable | None = None  # SeaCache's raw_vision_callback; None: diffusers' own adapter (Wan)
    weights: str = "random"
    steps: int | None = None  # sampling steps; None: the --steps option
    quality: Callable[[torch.Tensor, Any], dict] | None = None  # quality measures of the final output
    # fbcache / cg-taylor / FirstBlockCache thresholds: random features change far more per step than trained
    # ones (docs/guide/diffusers.md), so the random-weight cases need larger thresholds than diffusers' defaults
    thresholds: tuple[float, ...] = (0.3, 0.6, 1.0)
    budgets: tuple[float, ...] | None = None  # deviation budgets of the summary; None: the --budgets option
    grid: str = "small"  # settings per method (GRIDS)
    # calibration inputs -> the inputs output-aware refinement runs on (never the evaluation inputs); None: none
    refine_inputs: Callable[[list], list] | None = None


def _forward_arguments(module, args, kwargs) -> dict:
    module = unwrap_module(module)
    return inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments


def _dit_raw_vision(module, args, kwargs) -> list[torch.Tensor] | None:
    """SeaCache's visual latents of a DiT call: each sample's [C, H, W] latent as (C, T=1, H, W)."""
    latents = _forward_arguments(module, args, kwargs).get("hidden_states")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        return None
    return [latent.unsqueeze(1) for latent in latents]


def _flux_raw_vision(module, args, kwargs) -> list[torch.Tensor] | None:
    """SeaCache's visual latents of a FLUX call: each sample's packed image tokens [N, C] laid out on their
    (row, column) grid from ``img_ids``, as (C, T=1, H, W)."""
    arguments = _forward_arguments(module, args, kwargs)
    tokens, ids = arguments.get("hidden_states"), arguments.get("img_ids")
    if not isinstance(tokens, torch.Tensor) or not isinstance(ids, torch.Tensor) or tokens.ndim != 3:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    rows, columns = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * columns != tokens.shape[1]:
        return None
    return [t.reshape(rows, columns, -1).permute(2, 0, 1).unsqueeze(1) for t in tokens]


def _dit_inputs(seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g).to(device), {"class_labels": torch.tensor([207], device=device)}


def _dit_call(model, x, t, cond):
    return model(x, timestep=t.expand(x.shape[0]).to(x.device), class_labels=cond["class_labels"]).sample[:, :4]


def _flux_inputs(seed, device):
    g = torch.Generator().manual_seed(seed)
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


def _wan_inputs(seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 8, 8, generator=g).to(device), {
        "encoder_hidden_states": torch.randn(1, 16, 4096, generator=g).to(device),
        "negative": torch.randn(1, 16, 4096, generator=g).to(device),
    }


def _wan_call(model, x, t, cond, negative=False):
    text = cond["negative"] if negative else cond["encoder_hidden_states"]
    return model(x, t.expand(x.shape[0]).to(x.device), text).sample


def _digits_build(config):
    return digits_dit.load(digits_dit.DEFAULT_CHECKPOINT, model_class=CachingDiT)


def _digits_inputs(seed, device):
    labels = torch.arange(digits_dit.NUM_CLASSES).repeat_interleave(DIGITS_PER_CLASS)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return noise.to(device), {"class_labels": labels.to(device)}


def _digits_call(model, x, t, cond):
    return digits_dit.guided_noise(model, x, t, cond["class_labels"], guidance=digits_dit.GUIDANCE)


def _digits_refine_inputs(calibration_inputs):
    """every 4th sample of the first calibration input: one per class"""
    x, cond = calibration_inputs[0]
    return [(x[::DIGITS_PER_CLASS], {k: v[::DIGITS_PER_CLASS] for k, v in cond.items()})]


@functools.cache
def _digit_classifier() -> digits_dit.DigitClassifier:
    return digits_dit.DigitClassifier()


def _digits_quality(images, input):
    return {"class_accuracy": _digit_classifier().accuracy(images, input[1]["class_labels"])}


def _seed_input(seed, device):
    return seed  # a pipeline call's input is the seed of its call_kwargs (a fresh generator per call)


DIGITS_PER_CLASS = 4
DIT_MODULES = [r"transformer_blocks\.\d+\.(attn1|ff)"]
FLUX_BLOCKS = [r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]
# a single-stream block's MLP output only exists mixed with attention's in proj_out: forecast all three
FLUX_MODULES = [r"transformer_blocks\.\d+\.(attn|ff|ff_context)",
                r"single_transformer_blocks\.\d+\.(attn|proj_mlp|proj_out)"]
WAN_MODULES = [r"blocks\.\d+\.(attn1|attn2|ffn)"]
PIPELINE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 1.0)  # spans how much the tiny pipelines' first blocks change per step

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
        scheduler=lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000),
        call=_dit_call,
        block_patterns=[r"transformer_blocks\.\d+"],
        module_patterns=DIT_MODULES,
        sea_vision=_dit_raw_vision,
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
        scheduler=lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        call=_flux_call,
        block_patterns=FLUX_BLOCKS,
        module_patterns=FLUX_MODULES,
        sea_vision=_flux_raw_vision,
    ),
    "wan": Case(
        "wan",
        "shaped like Wan 2.1 T2V (head dim 128, FFN 5.8x width, 4096-d text, patch 1x2x2, classifier-free guidance as two "
        "calls); 6 of 12 heads, 6 of 30 layers, 2x8x8 latent (32 tokens), 16 text tokens",
        dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=4480, num_layers=6, rope_max_seq_len=1024),
        lambda config: WanTransformer3DModel(**config),
        _wan_inputs,
        scheduler=lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        call=_wan_call,
        guidance=5.0,
        block_patterns=[r"blocks\.\d+"],
        module_patterns=WAN_MODULES,
    ),
    "dit-digits": Case(
        "dit-digits",
        "DiT trained here (benchmarks/digits_dit.py: adaLN-Zero, 6 layers, width 128, 16x16 pixel digits, patch 2); "
        f"50-step DDIM, classifier-free guidance {digits_dit.GUIDANCE} batched into one call, "
        f"{DIGITS_PER_CLASS} samples per class",
        digits_dit.MODEL_CONFIG,
        _digits_build,
        _digits_inputs,
        scheduler=digits_dit.scheduler_for_sampling,
        call=_digits_call,
        block_patterns=[r"transformer_blocks\.\d+"],
        module_patterns=DIT_MODULES,
        sea_vision=_dit_raw_vision,
        weights="trained on scikit-learn's digits (benchmarks/checkpoints/dit-digits)",
        steps=50,
        quality=_digits_quality,
        thresholds=(0.01, 0.03, 0.08, 0.2),
        budgets=(0.015, 0.04, 0.10),
        grid="full",
        refine_inputs=_digits_refine_inputs,
    ),
    "flux-pipeline": Case(
        "flux-pipeline",
        "diffusers' FluxPipeline end to end (CLIP + T5 text encoders, 2x2 latent packing, FLUX.1-dev's dynamic-shift "
        "flow-matching scheduler, true CFG 2.0 with a negative prompt as two transformer calls per step), tiny random "
        "modules (benchmarks.tiny_pipelines: 2 dual- + 2 single-stream blocks, 2 heads x 8, 16 image + 8 text "
        "tokens); 2 prompts, 16x16 pixels, latent output",
        {},
        lambda config: tiny_flux_pipeline(),
        _seed_input,
        pipeline="flux",
        thresholds=PIPELINE_THRESHOLDS,
        block_patterns=FLUX_BLOCKS,
        module_patterns=FLUX_MODULES,
        sea_vision=_flux_raw_vision,
    ),
    "wan-pipeline": Case(
        "wan-pipeline",
        "diffusers' WanPipeline (Wan 2.1 T2V) end to end (UMT5 text encoder, UniPC flow-matching scheduler, CFG 3.0 "
        "with a negative prompt as two transformer calls per step), tiny random modules "
        "(benchmarks.tiny_pipelines: 2 blocks, 2 heads x 12, 3x4x4 = 48 latent + 8 text tokens); "
        "2 prompts, 5 frames of 16x16 pixels, latent output",
        {},
        lambda config: tiny_wan_pipeline(),
        _seed_input,
        pipeline="wan",
        thresholds=PIPELINE_THRESHOLDS,
        block_patterns=[r"blocks\.\d+"],
        module_patterns=WAN_MODULES,
    ),
}


def _sigma(scheduler, index: int, t) -> float:
    """The step's noise level as flow matching's sigma in [0, 1], which SeaCache's filter expects: the
    scheduler's own on flow-matching schedulers, sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)) of the cumulative
    alpha a on DDPM-type ones (the same noisy sample, rescaled)."""
    if hasattr(scheduler, "alphas_cumprod"):
        a = float(scheduler.alphas_cumprod[int(t)])
        return (1 - a) ** 0.5 / (a**0.5 + (1 - a) ** 0.5)
    return float(scheduler.sigmas[index])


@torch.no_grad()
def sample(case: Case, target, input, steps: int) -> torch.Tensor:
    """One sampling call: the pipeline's own (``input``: the seed of its ``call_kwargs``), or a loop as
    diffusers' pipelines run it (``input``: noise and conditioning), with a cache context around every
    denoiser call."""
    if case.pipeline is not None:
        return target(**call_kwargs(case.pipeline, num_inference_steps=steps, seed=input), return_dict=False)[0]
    model, (x, cond) = target, input
    scheduler = case.scheduler()
    scheduler.set_timesteps(steps, device=x.device)
    bac.new_trajectory(model)
    for i, t in enumerate(scheduler.timesteps):
        context = {"step_index": i, "num_inference_steps": steps, "sigma": _sigma(scheduler, i, t)}
        with model.cache_context("cond", **context):
            noise = case.call(model, x, t, cond)
        if case.guidance is not None:
            with model.cache_context("uncond", **context):
                uncond = case.call(model, x, t, cond, negative=True)
            noise = uncond + case.guidance * (noise - uncond)
        x = scheduler.step(noise, t, x).prev_sample
    model._reset_stateful_cache()  # what a pipeline's maybe_free_model_hooks does for diffusers' caches
    return x


# --- settings ----------------------------------------------------------------------------------------


@dataclass
class Setting:
    family: str  # method name; "diffusers:" and the cache's name for diffusers' own caches
    params: dict  # the method's parameters, or the cache config's
    enable: Callable[[], Any]
    disable: Callable[[], None]
    info: dict = field(default_factory=dict)  # recorded with the result (a refinement's time and deviations)

    @property
    def label(self) -> str:
        return label(self.family, self.params)


def label(family: str, params: dict) -> str:
    """A setting's name in the report: "taylorseer interval=4 order=1", "MagCache threshold=0.06 max_skip_steps=2"."""
    return " ".join([family.removeprefix("diffusers:")] + [f"{k}={v}" for k, v in params.items() if k != "standin"])


ABBREVIATIONS = {"interval": "i", "order": "o", "threshold": "t", "gate": "t", "fraction": "f",
                 "cache_interval": "i", "max_order": "o", "disable_cache_before_step": "w", "max_skip_steps": "s",
                 "residual_order": "o"}


def short_label(params: dict) -> str:
    """A setting's parameters in a few characters, for the plot: "i=4 o=1", "M=12 n=3", "t=0.08"."""
    parts = []
    for key, value in params.items():
        if key == "standin" or value is False:
            continue
        parts.append("alloc" if value is True else f"{ABBREVIATIONS.get(key, key)}={value}")
    return " ".join(parts)


def bac_grid(case: Case, steps: int, grid: str) -> list[tuple[str, dict]]:
    """(family, parameters) of this project's methods; ``name+taylor`` is ``name`` with the Taylor-1 stand-in."""
    third = max(2, round(steps / 3))
    if grid == "tiny":
        return [("bac", {"M": max(2, steps // 2), "n": 2}), ("taylorseer", {"interval": 2, "order": 1}),
                ("forecast-acs", {"M": max(2, steps // 2), "order": 1}),
                ("fbcache", {"threshold": case.thresholds[-1]})]
    if grid == "full":
        taylorseer = [("taylorseer", {"interval": i, "order": 1}) for i in range(2, 7)]
        taylorseer += [("taylorseer", {"interval": i, "order": 2}) for i in (2, 3, 4)]
        forecast = [("forecast-acs", {"M": m, "order": 1}) for m in (max(2, steps // 5), third, max(2, steps // 2))]
        forecast += [("forecast-acs", {"M": third, "order": 1, "allocate": True})]
    else:
        taylorseer = [("taylorseer", {"interval": 2, "order": 2}), ("taylorseer", {"interval": 4, "order": 2})]
        forecast = [("forecast-acs", {"M": third, "order": 1})]
    return [
        ("bac", {"M": max(2, steps // 6), "n": 3}),
        ("bac", {"M": max(2, steps // 4), "n": 3}),
        ("bac", {"M": max(2, steps * 2 // 5), "n": 3}),
        ("bac+taylor", {"M": max(2, steps // 4), "n": 3, "standin": "taylor-1"}),
        ("uniform", {"interval": 2}),
        ("uniform", {"interval": 4}),
        *taylorseer,
        *forecast,
        *[("fbcache", {"threshold": threshold}) for threshold in case.thresholds],
        *[("cg-taylor", {"gate": threshold}) for threshold in case.thresholds],
        ("sortblock", {"fraction": 0.5, "interval": 4}),
        ("sortblock", {"fraction": 0.25, "interval": 4}),
    ]


def refine_grid(steps: int, grid: str) -> list[tuple[str, dict]]:
    """The plans that output-aware refinement starts from (each also in :func:`bac_grid`)."""
    if grid == "tiny":
        return [("taylorseer", {"interval": 2, "order": 1})]
    if grid == "full":
        return [*[("taylorseer", {"interval": i, "order": 1}) for i in (3, 4, 5)],
                ("forecast-acs", {"M": max(2, round(steps / 3)), "order": 1})]
    return [("taylorseer", {"interval": 4, "order": 2}), ("forecast-acs", {"M": max(2, round(steps / 3)), "order": 1})]


def build(family: str, model, calibration: bac.Calibration, steps: int, params: dict) -> bac.Method:
    name = family.split("+")[0]
    source = calibration if bac.methods.needs_calibration(name) else model
    return bac.build_method(name, source, num_steps=steps, **params)


def bac_setting(family: str, params: dict, target, method: bac.Method, steps: int, info: dict | None = None) -> Setting:
    """A setting that enables ``method`` (built once) on the pipeline or bare transformer ``target``."""
    return Setting(family, params,
                   lambda: bac.diffusers.enable_cache(target, method, num_inference_steps=steps),
                   lambda: bac.diffusers.disable_cache(target), info or {})


def bac_settings(case: Case, target, model, calibration: bac.Calibration, steps: int, grid: str) -> list[Setting]:
    return [bac_setting(family, params, target, build(family, model, calibration, steps, params), steps)
            for family, params in bac_grid(case, steps, grid)]


REFINE_CANDIDATES = 150  # caps a block-wise plan's refinement (about 4 candidates per update step per block)


def refined_settings(case: Case, target, model, calibration: bac.Calibration, steps: int, grid: str,
                     inputs: list, log) -> list[Setting]:
    """Output-aware refinement (:func:`bac.diffusers.refine`, 2 rounds, at most ``REFINE_CANDIDATES``
    candidates) of :func:`refine_grid`'s plans on
    ``inputs`` (not the evaluation inputs), each a family ``<method>+refined``; its wall time and its
    deviation before and after, on ``inputs``, go with the result."""
    settings = []
    for family, params in refine_grid(steps, grid):
        method = build(family, model, calibration, steps, params)
        started = time.perf_counter()
        refined = bac.diffusers.refine(target, method, inputs, sample_fn=lambda x: sample(case, target, x, steps),
                                       rounds=2, max_candidates=REFINE_CANDIDATES)
        seconds = time.perf_counter() - started
        plan = refined.schedule.params
        info = {"refinement": {"seconds": seconds, "from": label(family, params),
                               "deviation_before": plan["deviation_before"], "deviation_after": plan["deviation_after"],
                               "candidates": plan["candidates"]}}
        log(f"  refined {family} {short_label(params)} in {seconds:.0f} s: deviation on the refinement inputs "
            f"{plan['deviation_before']:.4f} -> {plan['deviation_after']:.4f} ({plan['candidates']} candidates)")
        settings.append(bac_setting(refined.name, params, target, refined, steps, info))
    return settings


def diffusers_grid(steps: int, grid: str, thresholds: tuple[float, ...]) -> dict[str, list[dict]]:
    """Per diffusers cache, the config parameters tried (TaylorSeerCache's for both pattern sets)."""
    if grid == "tiny":
        taylor = [dict(cache_interval=2, max_order=1, disable_cache_before_step=1)]
        return {"FirstBlockCache": [dict(threshold=thresholds[-1])], "TaylorSeerCache": taylor,
                "MagCache": [dict(threshold=0.24, max_skip_steps=4)],
                "SeaCache": [dict(threshold=0.5, residual_order=1)]}
    if grid == "small":
        taylor = [dict(cache_interval=i, max_order=1, disable_cache_before_step=1) for i in (2, 4)]
        return {"FirstBlockCache": [dict(threshold=t) for t in thresholds], "TaylorSeerCache": taylor,
                "MagCache": [dict(threshold=t, max_skip_steps=s) for t, s in ((0.06, 2), (0.24, 4))],
                "SeaCache": [dict(threshold=t, residual_order=1) for t in (0.1, 0.5)]}
    taylor = [dict(cache_interval=i, max_order=o, disable_cache_before_step=1) for i in range(2, 7) for o in (1, 2)]
    taylor += [dict(cache_interval=i, max_order=o, disable_cache_before_step=2) for i in (3, 4) for o in (1, 2)]
    return {"FirstBlockCache": [dict(threshold=t) for t in thresholds], "TaylorSeerCache": taylor,
            "MagCache": [dict(threshold=t, max_skip_steps=s) for t, s in ((0.02, 1), (0.06, 2), (0.12, 3), (0.24, 4))],
            "SeaCache": [dict(threshold=t, residual_order=o) for t in (0.05, 0.1, 0.25, 0.5) for o in (0, 1)]}


def calibrate_magcache(case: Case, target, model, input, steps: int) -> list[float]:
    """MagCache's own calibration run (``calibrate=True``); it prints the ratios, which we read back."""
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            sample(case, target, input, steps)
    finally:
        model.disable_cache()
    for line in printed.getvalue().splitlines():
        if line.startswith("[") and not line.startswith("[MagCache]"):
            return [float(r) for r in ast.literal_eval(line)]
    raise RuntimeError(f"MagCache calibration printed no ratios: {printed.getvalue()[:300]!r}")


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def check_seacache(case: Case, target, model, input, steps: int) -> str | None:
    """None when SeaCache caches on this case as designed; else why not. Where it lacks what it needs
    (the step and noise level in ``cache_context``, visual latents), SeaCache warns and runs "fail-open",
    computing every block: that is an error here, not a setting that skips nothing."""
    logger = logging.getLogger("diffusers.hooks.sea_cache")
    handler, level = _Messages(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever diffusers' verbosity
    try:
        model.enable_cache(SeaCacheConfig(threshold=1.0, raw_vision_callback=case.sea_vision))
        sample(case, target, input, steps)
    except Exception as err:  # reported in the output, not hidden
        return f"{type(err).__name__}: {err}"
    finally:
        if model.is_cache_enabled:
            model.disable_cache()
        logger.removeHandler(handler)
        logger.setLevel(level)
    failed = [m for m in handler.messages if "fail-open" in m or "running full" in m]
    return "; ".join(dict.fromkeys(failed)) or None


def _check_patterns(model, patterns: list[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not any(re.fullmatch(pattern, name) for name in names):
            raise ValueError(f"TaylorSeerCache pattern {pattern!r} matches no module of {type(model).__name__}")


def diffusers_settings(case: Case, target, model, input, steps: int, grid: str) -> tuple[list[Setting], dict]:
    """diffusers' caches over :func:`diffusers_grid`, each enabled on the transformer; MagCache calibrated
    and SeaCache checked here first (a failure is recorded in the notes, not raised)."""
    grids, notes = diffusers_grid(steps, grid, case.thresholds), {}
    configs: list[tuple[str, dict, Callable[[dict], Any]]] = []
    configs += [("diffusers:FirstBlockCache", p, lambda p: FirstBlockCacheConfig(**p))
                for p in grids["FirstBlockCache"]]
    for kind, patterns in (("blocks", case.block_patterns), ("modules", case.module_patterns)):
        _check_patterns(model, patterns)
        configs += [(f"diffusers:TaylorSeerCache/{kind}", p,
                     lambda p, patterns=patterns: TaylorSeerCacheConfig(
                         **p, taylor_factors_dtype=torch.float32, cache_identifiers=patterns))
                    for p in grids["TaylorSeerCache"]]
    try:
        ratios = calibrate_magcache(case, target, model, input, steps)
        notes["magcache_ratios"] = ratios
        configs += [("diffusers:MagCache", p,
                     lambda p: MagCacheConfig(**p, num_inference_steps=steps, mag_ratios=ratios))
                    for p in grids["MagCache"]]
    except Exception as err:  # reported in the output, not hidden
        notes["magcache_error"] = f"{type(err).__name__}: {err}"
    error = check_seacache(case, target, model, input, steps)
    if error is None:
        configs += [("diffusers:SeaCache", p, lambda p: SeaCacheConfig(**p, raw_vision_callback=case.sea_vision))
                    for p in grids["SeaCache"]]
    else:
        notes["seacache_error"] = error
    settings = [Setting(family, p, lambda p=p, make=make: model.enable_cache(make(p)), lambda: model.disable_cache())
                for family, p, make in configs]
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


def evaluate(case: Case, target, model, settings: list[Setting], input, steps: int, log) -> tuple[list[dict], int]:
    """Untimed pass: each setting's output (deviation from the first setting's, full computation) and
    real branch evaluations (skipped share); and the transformer calls per sampling call."""
    results, reference = [], None
    for setting in settings:
        counts, counters = count_branches(model)
        calls = [0]  # transformer calls: every branch runs once per call unless skipped
        counters.append(model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)))
        setting.enable()
        try:
            out = sample(case, target, input, steps)
        finally:
            setting.disable()
            for counter in reversed(counters):
                counter.remove()
        reference = out if reference is None else reference
        results.append({"family": setting.family, "setting": setting.label, "params": setting.params,
                        "skipped_share": 1 - sum(counts.values()) / (calls[0] * len(counts)),
                        **deviation(out, reference), "finite": bool(torch.isfinite(out).all()),
                        **(case.quality(out, input) if case.quality else {}), **setting.info, "times": []})
        log(f"  {setting.label:<60} skipped {100 * results[-1]['skipped_share']:5.1f}%  "
            f"rel L2 {results[-1]['rel_l2']:.4f}" + "".join(
                f"  {k} {v:.3f}" for k, v in results[-1].items() if k == "class_accuracy"))
    return results, calls[0]  # the same for every setting


def time_interleaved(case: Case, target, settings: list[Setting], results: list[dict], input, steps: int,
                     repeats: int, device: torch.device, log) -> None:
    """``repeats`` rounds of one timed sampling call per setting; latency medians and speedups into ``results``."""
    for round_index in range(repeats):
        for setting, result in zip(settings, results):
            setting.enable()
            try:
                synchronize(device)
                start = time.perf_counter()
                sample(case, target, input, steps)
                synchronize(device)
                result["times"].append(time.perf_counter() - start)
            finally:
                setting.disable()
        log(f"  round {round_index + 1}/{repeats}: full {1e3 * results[0]['times'][-1]:.0f} ms")
    full_ms = summarize(results[0]["times"])["p50_ms"]
    for result in results:
        result["latency"] = summarize(result.pop("times"))
        result["speedup"] = full_ms / result["latency"]["p50_ms"]


def bench_model(case: Case, steps: int, repeats: int, device: torch.device, seed: int, log,
                budgets: tuple[float, ...] = DEFAULT_BUDGETS, grid: str | None = None) -> dict:
    """One case: every setting's deviation, skipped share and speedup, and the matched-deviation summary
    for the case's budgets (else ``budgets``). ``grid`` (GRIDS) overrides the case's grid size."""
    steps, grid = case.steps or steps, grid or case.grid
    if grid not in GRIDS:
        raise ValueError(f"grid {grid!r}: one of {GRIDS}")
    budgets = list(case.budgets or budgets)
    torch.manual_seed(seed)
    target = case.build(case.config).to(device)
    if case.pipeline is not None:
        model = target.transformer
        target.set_progress_bar_config(disable=True)
    else:
        model = target.eval()
    parameters = sum(p.numel() for p in model.parameters())
    inputs = case.inputs(seed, device)
    calibration_inputs = [case.inputs(seed + 1 + i, device) for i in range(2)]
    log(f"[{case.name}] {parameters / 1e6:.2f} M transformer parameters, {steps} steps, {grid} grid: calibrating")
    calibration = bac.diffusers.calibrate(target, calibration_inputs,
                                          sample_fn=lambda x: sample(case, target, x, steps))
    settings = [Setting("full", {}, lambda: None, lambda: None)]
    settings += bac_settings(case, target, model, calibration, steps, grid)
    notes = {}
    if case.refine_inputs is not None:
        refine_inputs = case.refine_inputs(calibration_inputs)
        notes["refine_inputs"] = (case.refine_inputs.__doc__ or "").strip() or "a subset of the calibration inputs"
        settings += refined_settings(case, target, model, calibration, steps, grid, refine_inputs, log)
    peers, peer_notes = diffusers_settings(case, target, model, inputs, steps, grid)
    settings += peers
    notes.update(peer_notes)
    for name in ("magcache_error", "seacache_error"):
        if name in notes:
            log(f"  {name}: {notes[name]}")

    results, calls = evaluate(case, target, model, settings, inputs, steps, log)
    time_interleaved(case, target, settings, results, inputs, steps, repeats, device, log)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    return {"model": case.name, "shaped_like": case.shaped_like, "weights": case.weights,
            "pipeline": type(target).__name__ if case.pipeline else None,
            "transformer": type(model).__name__, "config": json.loads(json.dumps(config, default=str)),
            "parameters": parameters, "steps": steps, "grid": grid,
            "guidance_calls_per_step": calls // steps, "budgets": budgets, "results": results,
            "matched": {str(budget): summary(results, budget) for budget in budgets}, **notes}


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


def _brief(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {"family": r["family"], "setting": r["setting"], "speedup": r["speedup"], "rel_l2": r["rel_l2"],
            "skipped_share": r["skipped_share"]}


def summary(results: list[dict], budget: float) -> dict:
    """Within ``budget``: the fastest setting per family, the best of this project's methods (every family
    but full and diffusers'), the best of diffusers' caches, and the ratio of their speedups."""
    best = sorted(matched(results, budget).values(), key=lambda r: -r["speedup"])
    project = next((r for r in best if not r["family"].startswith("diffusers:")), None)
    peer = next((r for r in best if r["family"].startswith("diffusers:")), None)
    return {"fastest": [_brief(r) for r in best], "best_project": _brief(project), "best_diffusers": _brief(peer),
            "ratio": project["speedup"] / peer["speedup"] if project and peer else None}


def markdown(report: dict) -> str:
    lines = [f"# Caching methods on diffusers transformers ({report['device']}, {report['threads']} thread(s))", "",
             "On random weights absolute quality is meaningless; compare speedups at matched deviation.", ""]
    for model in report["models"]:
        accuracy = "class_accuracy" in model["results"][0]
        runs = f"{model['pipeline']} end to end" if model.get("pipeline") else "sampling loop"
        lines += [f"## {model['model']}: {model['shaped_like']}", "",
                  f"Weights: {model['weights']}. {runs}; {model['parameters'] / 1e6:.2f} M transformer parameters, "
                  f"{model['steps']} steps, {model['guidance_calls_per_step']} transformer call(s) per step; "
                  f"full computation {model['results'][0]['latency']['p50_ms']:.0f} ms per sampling call.", "",
                  "| method | setting | speedup | skipped | rel. L2 | PSNR dB |" + (" class accuracy |" if accuracy else ""),
                  "|---|---|---|---|---|---|" + ("---|" if accuracy else "")]
        for r in model["results"]:
            lines.append(f"| {r['family']} | {r['setting']} | {r['speedup']:.2f}x | {100 * r['skipped_share']:.0f}% | "
                         f"{r['rel_l2']:.4f} | {r['psnr_db']:.1f} |" + (f" {r['class_accuracy']:.2f} |" if accuracy else ""))
        lines += ["", "Best of this project against the best of diffusers' caches, within each deviation budget:", "",
                  "| rel. L2 <= | best project method | speedup | rel. L2 "
                  "| best diffusers cache | speedup | rel. L2 | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for budget, s in model["matched"].items():
            cells = []
            for r in (s["best_project"], s["best_diffusers"]):
                cells += [r["setting"], f"{r['speedup']:.2f}x", f"{r['rel_l2']:.4f}"] if r else ["none", "", ""]
            ratio = f"{s['ratio']:.2f}" if s["ratio"] is not None else "n/a"
            lines.append(f"| {budget} | " + " | ".join(cells) + f" | {ratio} |")
        for budget, s in model["matched"].items():
            lines += ["", f"Fastest setting per method with relative L2 <= {budget}: " + (", ".join(
                f"{r['setting']} {r['speedup']:.2f}x" for r in s["fastest"]) or "none")]
        refined = [r for r in model["results"] if "refinement" in r]
        if refined:
            lines += ["", f"Output-aware refinement (2 rounds) on {model['refine_inputs']}, "
                          "not the evaluation inputs: " +
                      "; ".join(f"{r['refinement']['from']} {r['refinement']['deviation_before']:.4f} -> "
                                f"{r['refinement']['deviation_after']:.4f} in {r['refinement']['seconds']:.0f} s"
                                for r in refined)]
        for name, peer in (("magcache_error", "MagCache"), ("seacache_error", "SeaCache")):
            if name in model:
                lines += ["", f"{peer} could not run here: {model[name]}"]
        lines.append("")
    lines += ["Notes: " + report["notes"], ""]
    return "\n".join(lines)


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both deviation (lower) and speedup (higher), by deviation."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


PEER_COLORS = ("black", "darkgoldenrod", "navy", "teal", "indigo", "chocolate")  # none of tab10's


def plot(report: dict, path: Path) -> None:
    """Speedup against deviation, one panel per model: every setting as a labelled marker, each family's
    front (its best speedup at each deviation) as a line, diffusers' caches dashed, budgets dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    columns = min(2, len(models))
    rows = math.ceil(len(models) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(9 * columns, 6.5 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.remove()
    for ax, model in zip(axes.flat, models):
        families = sorted({r["family"] for r in model["results"] if r["family"] != "full"})
        ours = [f for f in families if not f.startswith("diffusers:")]
        peers = [f for f in families if f.startswith("diffusers:")]
        colors = {**{f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(ours)},
                  **{f: PEER_COLORS[i % len(PEER_COLORS)] for i, f in enumerate(peers)}}
        for family in ours + peers:
            # settings that skipped nothing have zero deviation and no place on a log axis
            points = [r for r in model["results"] if r["family"] == family and r["rel_l2"] > 0]
            if not points:
                continue
            peer, color = family.startswith("diffusers:"), colors[family]
            front = _front([(r["rel_l2"], r["speedup"]) for r in points])
            ax.plot([p[0] for p in front], [p[1] for p in front], "--" if peer else "-", color=color, lw=1.2,
                    label=family)
            ax.scatter([r["rel_l2"] for r in points], [r["speedup"] for r in points], s=14, color=color,
                       marker="s" if peer else "o", zorder=3)
            for r in points:
                ax.annotate(short_label(r["params"]), (r["rel_l2"], r["speedup"]), xytext=(3, 2),
                            textcoords="offset points", fontsize=5, color=color)
        for budget in model["budgets"]:
            ax.axvline(budget, color="black", ls=":", lw=0.9)
            ax.annotate(f"{budget}", (budget, 1.0), xytext=(2, -10), textcoords="offset points", fontsize=6)
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("deviation from full computation (relative L2 of final latents)")
        ax.set_ylabel("speedup over full computation")
        weights = "random weights" if model["weights"] == "random" else "trained"
        ax.set_title(f"{model['model']} ({model['steps']} steps, {weights})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20,
                        help="sampling steps of the cases that set none (dit-digits: 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", default="case", choices=["case", *GRIDS],
                        help="settings per method: each case's own (full on dit-digits, small elsewhere), "
                             "or one for all")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                        help="deviation budgets (relative L2) of the summary, for cases without their own")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "grid": args.grid, "budgets": args.budgets,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": torch.get_num_threads()},
        "notes": ("weights random except dit-digits (trained here); speedup = median full latency / median method "
                  "latency from interleaved rounds; skipped = share of branch evaluations not run (counted on each "
                  "branch's attention/FFN module, under any cache's hooks); the best project method is the "
                  "fastest of every family but full and diffusers' within the budget, the best diffusers cache the "
                  "fastest of diffusers' caches over their grids; refined plans are refined on inputs apart from the "
                  "evaluation inputs; diffusers' caches run with CacheMixin added to DiT, cache_context with step "
                  "and noise level on every call of the sampling loops, explicit TaylorSeerCache patterns and "
                  "SeaCache visual latents for DiT and FLUX (see the module docstring)"),
        "models": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    grid = None if args.grid == "case" else args.grid
    for name in args.models:
        report["models"].append(bench_model(CASES[name], args.steps, args.repeats, device, args.seed, print,
                                            budgets=tuple(args.budgets), grid=grid))
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    plot(report, args.out / "speedup_vs_deviation.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
