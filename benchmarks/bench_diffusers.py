"""Caching methods on diffusers' DiT, FLUX and Wan, against diffusers' own caches at their best settings.

    python -m benchmarks.bench_diffusers [--models dit flux wan dit-digits flux-pipeline wan-pipeline]
        [--steps 20] [--repeats 3] [--grid case] [--device auto] [--out DIR] [--resume]

Six cases (random-weight transformers shaped like the released models, the digits DiT trained here, and the
real tiny FLUX and Wan pipelines), each on the same noise and conditioning for every method: every method of
this project and its peers (diffusers' caches, cache-dit's DBCache) over grids of settings, fewer sampler
steps and torch.compile (with full and fewer steps), timed interleaved, compared at matched deviation
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
import os
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import cache_dit
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
from cache_dit.caching.patch_functors import DiTPatchFunctor
from cache_dit.envs import ENV as CACHE_DIT_ENV

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
    family: str  # method name; "diffusers:" / "cache-dit:" and the cache's name for the peers' caches
    params: dict  # the method's parameters, or the cache config's
    enable: Callable[[], Any]
    disable: Callable[[], None]
    info: dict = field(default_factory=dict)  # recorded with the result (a refinement's time and deviations)
    steps: int | None = None  # sampling steps; None: the case's
    target: Any = None  # what a sampling call runs on; None: the case's (a bare loop's compiled transformer)
    compiled: bool = False  # runs torch.compile'd code: one untimed call before the timed rounds

    @property
    def label(self) -> str:
        return label(self.family, self.params)


PEER_PREFIXES = ("diffusers:", "cache-dit:")
# the families that are neither this project's nor a peer's, and their side
SIDES = {"full": "full", "fewer-steps": "fewer-steps", "compile": "compile", "compile+fewer-steps": "compile"}


def side(family: str) -> str:
    """Which side of the comparison a family is on: "full", "peer", "fewer-steps", "compile" or "project"."""
    return "peer" if family.startswith(PEER_PREFIXES) else SIDES.get(family, "project")


def label(family: str, params: dict) -> str:
    """A setting's name in the report: "taylorseer interval=4 order=1", "MagCache threshold=0.06 max_skip_steps=2"."""
    return " ".join([family.removeprefix("diffusers:")] + [f"{k}={v}" for k, v in params.items() if k != "standin"])


ABBREVIATIONS = {"interval": "i", "order": "o", "threshold": "t", "gate": "t", "fraction": "f",
                 "cache_interval": "i", "max_order": "o", "disable_cache_before_step": "w", "max_skip_steps": "s",
                 "residual_order": "o", "steps": "n", "residual_diff_threshold": "t", "max_warmup_steps": "w",
                 "taylorseer_order": "o"}


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
                ("fbcache", {"threshold": case.thresholds[-1]}),
                ("ertacache", {"threshold": case.thresholds[-1]}),
                ("profiling-dit", {"share": 0.5, "interval": 2})]
    if grid == "full":
        taylorseer = [("taylorseer", {"interval": i, "order": 1}) for i in range(2, 7)]
        taylorseer += [("taylorseer", {"interval": i, "order": 2}) for i in (2, 3, 4)]
        # long intervals at every phase (the warm-up moves the computed steps: 0-1, 2, 8, 14, ... for 6/2)
        taylorseer += [("taylorseer", {"interval": i, "order": 1, "warmup": w}) for i in (6, 7, 8, 9) for w in (2, 3, 4)]
        # the tightest budget: the early steps, whose errors the sampler carries furthest, all computed
        taylorseer += [("taylorseer", {"interval": i, "order": 1, "warmup": w}) for i in (2, 3, 4) for w in (20, 25, 30)]
        forecast = [("forecast-acs", {"M": m, "order": 1}) for m in (max(2, steps // 5), third, max(2, steps // 2))]
        forecast += [("forecast-acs", {"M": third, "order": 1, "allocate": True})]
        # ERTACache's threshold is a relative L2 distance of the whole residual, on fbcache's scale
        erta = [("ertacache", {"threshold": t}) for t in sorted({0.02, 0.05, *case.thresholds[1:]})]
        erta += [("ertacache", {"threshold": case.thresholds[1], "terms": 0})]  # the same schedule, unrectified
        profiling = [("profiling-dit", {"share": share, "interval": interval})
                     for share in (0.34, 0.5, 0.67, 1.0) for interval in (3, 6)]
    else:
        taylorseer = [("taylorseer", {"interval": 2, "order": 2}), ("taylorseer", {"interval": 4, "order": 2})]
        forecast = [("forecast-acs", {"M": third, "order": 1})]
        erta = [("ertacache", {"threshold": t}) for t in case.thresholds[:2]]
        profiling = [("profiling-dit", {"share": 0.5, "interval": 3}), ("profiling-dit", {"share": 1.0, "interval": 3})]
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
        *erta,
        *profiling,
    ]


def adjust_grid(case: Case, grid: str) -> list[tuple[str, dict]]:
    """The ERTACache plans whose timestep adjustment is fitted (each also in :func:`bac_grid`)."""
    if grid == "tiny":
        return [("ertacache", {"threshold": case.thresholds[-1]})]
    if grid == "full":
        return [("ertacache", {"threshold": t}) for t in sorted({0.03, 0.05, case.thresholds[2]})]
    return [("ertacache", {"threshold": case.thresholds[0]})]


def adjusted_settings(case: Case, target, model, calibration: bac.Calibration, steps: int, grid: str,
                      inputs: list, log) -> list[Setting]:
    """ERTACache with its timestep adjustment (:func:`bac.diffusers.adjust_timesteps`) fitted on ``inputs``
    (not the evaluation inputs), each a family ``ertacache+adjusted``; the fitting time goes with the result."""
    settings = []
    for family, params in adjust_grid(case, grid):
        method = build(family, model, calibration, steps, params)
        started = time.perf_counter()
        adjusted = bac.diffusers.adjust_timesteps(target, method, inputs,
                                                  sample_fn=lambda x: sample(case, target, x, steps))
        seconds = time.perf_counter() - started
        scales = [s for s in adjusted.schedule.params["step_scales"] if s != 1.0]
        log(f"  adjusted ertacache {short_label(params)} in {seconds:.0f} s: {len(scales)} steps scaled, "
            f"{min(scales, default=1):.3f} to {max(scales, default=1):.3f}")
        settings.append(bac_setting("ertacache+adjusted", params, target, adjusted, steps,
                                    {"adjustment": {"seconds": seconds, "scaled_steps": len(scales)}}))
    return settings


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


def fewer_steps_grid(steps: int, grid: str) -> list[int]:
    """Step counts below the case's own, for the simple alternative: fewer sampler steps."""
    if grid == "tiny":
        return [max(1, steps // 2)]
    fractions = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8) if grid == "full" else (0.25, 0.4, 0.5, 0.7)
    return sorted({n for n in (round(steps * f) for f in fractions) if 1 <= n < steps})


def alternative_settings(case: Case, target, model, steps: int, grid: str) -> list[Setting]:
    """Fewer sampler steps, and ``torch.compile(transformer)`` (default mode) with full and fewer steps: the
    capable user. One compiled module serves every compile setting; a pipeline samples with it as its
    ``transformer`` while a compile setting is enabled, a bare loop calls it directly. No cache is enabled
    with it: a setting enables either."""
    fewer = fewer_steps_grid(steps, grid)
    settings = [Setting("fewer-steps", {"steps": n}, lambda: None, lambda: None, steps=n) for n in fewer]
    compiled = torch.compile(model)
    if case.pipeline is not None:
        enable, disable, loop_target = (lambda: setattr(target, "transformer", compiled),
                                        lambda: setattr(target, "transformer", model), None)
    else:
        enable, disable, loop_target = lambda: None, lambda: None, compiled
    settings.append(Setting("compile", {}, enable, disable, target=loop_target, compiled=True))
    settings += [Setting("compile+fewer-steps", {"steps": n}, enable, disable, steps=n, target=loop_target,
                         compiled=True) for n in fewer]
    return settings


def _quiet_cache_dit() -> None:
    """cache-dit logs every enable and disable (info, warnings) on its own handlers: errors only."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


CACHE_DIT_FAMILIES = ("cache-dit:DBCache", "cache-dit:DBCache+TaylorSeer")


def cache_dit_grid(steps: int, grid: str, thresholds: tuple[float, ...], blocks: int) -> list[tuple[str, dict]]:
    """(family, parameters) of cache-dit's DBCache, without and with its TaylorSeer calibrator: first (Fn) and
    last (Bn) blocks always computed, the residual-difference threshold (the case's, which span how much its
    first blocks change per step, as for FirstBlockCache), steps computed before caching starts and the
    calibrator's order. Settings that would compute every block (Fn + Bn >= ``blocks``) are left out."""
    warmup = max(1, steps // 12)
    if grid == "tiny":
        dbcache = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=thresholds[-1],
                       max_warmup_steps=1)
        return [(CACHE_DIT_FAMILIES[0], dbcache), (CACHE_DIT_FAMILIES[1], {**dbcache, "taylorseer_order": 1})]

    def settings(fn_bn, warmups, orders=(None,)):
        return [(CACHE_DIT_FAMILIES[order is not None],
                 dict(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=t, max_warmup_steps=w,
                      **({} if order is None else {"taylorseer_order": order})))
                for fn, bn in fn_bn for w in warmups for order in orders for t in thresholds if fn + bn < blocks]

    if grid == "small":
        return settings([(1, 0)], [warmup]) + settings([(1, 0)], [warmup], orders=(1,))
    return (settings([(1, 0), (2, 0), (1, 1)], [warmup]) + settings([(1, 0)], [8])
            + settings([(1, 0), (1, 1)], [warmup], orders=(1,)) + settings([(1, 0)], [warmup], orders=(2,)))


def _cache_dit_blocks(model) -> list[torch.nn.ModuleList]:
    """The block lists cache-dit caches on (those of its own adapters for DiT, FLUX and Wan)."""
    if isinstance(model, FluxTransformer2DModel):
        return [model.transformer_blocks, model.single_transformer_blocks]
    return [model.blocks] if isinstance(model, WanTransformer3DModel) else [model.transformer_blocks]


def cache_dit_settings(case: Case, target, model, steps: int, grid: str) -> tuple[list[Setting], dict]:
    """cache-dit's DBCache over :func:`cache_dit_grid`: on a pipeline through cache-dit's own adapter for it;
    on a bare transformer through cache-dit's transformer-only path (FLUX, Wan: its registered adapters) or,
    for DiT (the subclass with diffusers' CacheMixin, which cache-dit's class-name registry does not
    recognise), a ``BlockAdapter`` built as cache-dit's own DiT adapter is, with its ``DiTPatchFunctor``.
    Classifier-free guidance as two calls per step (Wan, the pipelines, cond first) is declared with
    ``enable_separate_cfg``; the digits DiT batches it into one call. Checked once here first: a failure is
    recorded in the notes, not raised."""
    separate_cfg = case.guidance is not None or case.pipeline is not None
    notes = {"cache_dit_separate_cfg": separate_cfg}
    blocks = min(len(b) for b in _cache_dit_blocks(model))
    grid_settings = cache_dit_grid(steps, grid, case.thresholds, blocks)

    def enable(params: dict) -> None:
        params = dict(params)
        order = params.pop("taylorseer_order", None)
        config = cache_dit.DBCacheConfig(**params, num_inference_steps=steps, enable_separate_cfg=separate_cfg)
        calibrator = None if order is None else cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
        attributes[0], submodules[0] = dict(model.__dict__), dict(model._modules)
        if case.pipeline is not None:
            handle[0] = target
        elif isinstance(model, (FluxTransformer2DModel, WanTransformer3DModel)):
            handle[0] = model
        else:  # its patch functor skips classes defined outside diffusers unless told (cache-dit's switch)
            with mock.patch.object(CACHE_DIT_ENV, "CACHE_DIT_PATCH_FUNCTOR_DISABLE_DIFFUSERS_CHECK", True):
                handle[0] = cache_dit.BlockAdapter(transformer=model, blocks=model.transformer_blocks,
                                                   forward_pattern=cache_dit.ForwardPattern.Pattern_3,
                                                   patch_functor=DiTPatchFunctor())
        _quiet_cache_dit()
        cache_dit.enable_cache(handle[0], cache_config=config, calibrator_config=calibrator)

    def disable() -> None:
        cache_dit.disable_cache(handle[0])
        # cache-dit leaves the patched forward (and the patch's marks) on the transformer, over whatever forward
        # was there (a diffusers hook registry's), its block lists re-registered last (it swaps them per call)
        # and DiT's first embedder hoisted into the transformer: restore the attributes and the submodules as
        # they were (bac's plans check the parameters' names and order)
        for name in set(model.__dict__) - set(attributes[0]):
            del model.__dict__[name]
        model.__dict__.update(attributes[0])
        model._modules.clear()
        model._modules.update(submodules[0])

    handle, attributes, submodules = [None], [{}], [{}]
    settings = [Setting(family, p, lambda p=p: enable(p), disable) for family, p in grid_settings]
    if not settings:
        notes["cache_dit_error"] = f"no DBCache setting leaves a block to cache ({blocks} blocks)"
        return [], notes
    try:
        settings[0].enable()
        try:
            sample(case, target, case.inputs(0, next(model.parameters()).device), 1)
        finally:
            settings[0].disable()
    except Exception as err:  # reported in the output, not hidden
        notes["cache_dit_error"] = f"{type(err).__name__}: {err}"
        return [], notes
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
    """Untimed pass: each setting's output (deviation from the first setting's, full computation at the
    case's steps), its transformer calls and real branch evaluations, counted; the skipped share is the
    share of the full run's branch evaluations not run (fewer steps skip whole calls). Returns the results
    and the full run's transformer calls per sampling call. Compiled settings compile here, untimed."""
    results, reference, full_calls = [], None, None
    for setting in settings:
        counts, counters = count_branches(model)
        calls = [0]  # transformer calls: every branch runs once per call unless skipped
        counters.append(model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)))
        setting.enable()
        try:
            out = sample(case, target if setting.target is None else setting.target, input, setting.steps or steps)
        finally:
            setting.disable()
            for counter in reversed(counters):
                counter.remove()
        reference = out if reference is None else reference
        full_calls = full_calls or calls[0]
        results.append({"family": setting.family, "setting": setting.label, "params": setting.params,
                        "transformer_calls": calls[0],
                        "skipped_share": 1 - sum(counts.values()) / (full_calls * len(counts)),
                        **deviation(out, reference), "finite": bool(torch.isfinite(out).all()),
                        **(case.quality(out, input) if case.quality else {}), **setting.info, "times": []})
        log(f"  {setting.label:<60} skipped {100 * results[-1]['skipped_share']:5.1f}%  "
            f"rel L2 {results[-1]['rel_l2']:.4f}" + "".join(
                f"  {k} {v:.3f}" for k, v in results[-1].items() if k == "class_accuracy"))
    return results, full_calls


def time_interleaved(case: Case, target, settings: list[Setting], results: list[dict], input, steps: int,
                     repeats: int, device: torch.device, log) -> None:
    """``repeats`` rounds of one timed sampling call per setting; latency medians and speedups into ``results``.
    A compiled setting first runs one untimed call as it is timed (without evaluate's counters, which its
    compiled code guards on); the graphs dynamo compiles during its timed calls are counted into its result
    (``compilations_while_timed``: 0 unless a recompilation was timed)."""
    graphs = torch._dynamo.utils.counters["stats"]
    for setting, result in zip(settings, results):
        if setting.compiled:
            result["compilations_while_timed"] = 0
            setting.enable()
            try:
                sample(case, target if setting.target is None else setting.target, input, setting.steps or steps)
            finally:
                setting.disable()
    for round_index in range(repeats):
        for setting, result in zip(settings, results):
            setting.enable()
            try:
                compiled_before = graphs["unique_graphs"]
                synchronize(device)
                start = time.perf_counter()
                sample(case, target if setting.target is None else setting.target, input, setting.steps or steps)
                synchronize(device)
                result["times"].append(time.perf_counter() - start)
                if setting.compiled:
                    result["compilations_while_timed"] += graphs["unique_graphs"] - compiled_before
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
    calibration = bac.diffusers.calibrate(target, calibration_inputs, attention=True,  # ProfilingDiT's profile
                                          sample_fn=lambda x: sample(case, target, x, steps))
    settings = [Setting("full", {}, lambda: None, lambda: None)]
    settings += bac_settings(case, target, model, calibration, steps, grid)
    notes = {}
    refine_inputs = calibration_inputs[:1]
    if case.refine_inputs is not None:
        refine_inputs = case.refine_inputs(calibration_inputs)
        notes["refine_inputs"] = (case.refine_inputs.__doc__ or "").strip() or "a subset of the calibration inputs"
        settings += refined_settings(case, target, model, calibration, steps, grid, refine_inputs, log)
    settings += adjusted_settings(case, target, model, calibration, steps, grid, refine_inputs, log)
    peers, peer_notes = diffusers_settings(case, target, model, inputs, steps, grid)
    settings += peers
    notes.update(peer_notes)
    peers, peer_notes = cache_dit_settings(case, target, model, steps, grid)
    settings += peers
    notes.update(peer_notes)
    settings += alternative_settings(case, target, model, steps, grid)
    for name in ("magcache_error", "seacache_error", "cache_dit_error"):
        if name in notes:
            log(f"  {name}: {notes[name]}")

    results, calls = evaluate(case, target, model, settings, inputs, steps, log)
    time_interleaved(case, target, settings, results, inputs, steps, repeats, device, log)
    for r in results:
        if r.get("compilations_while_timed"):
            log(f"  {r['setting']}: recompiled while timed ({r['compilations_while_timed']} graphs)")
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    return {"model": case.name, "shaped_like": case.shaped_like, "weights": case.weights,
            "pipeline": type(target).__name__ if case.pipeline else None,
            "transformer": type(model).__name__, "config": json.loads(json.dumps(config, default=str)),
            "parameters": parameters, "steps": steps, "grid": grid,
            "guidance_calls_per_step": calls // steps, "budgets": budgets, "results": results,
            "matched": {str(budget): summary(results, budget) for budget in budgets}, **notes}


# --- report ------------------------------------------------------------------------------------------


def matched(results: list[dict], budget: float) -> dict[str, dict]:
    """Per method family, the fastest setting with deviation (relative L2) within ``budget`` that skips
    something (compiled full steps: that compiles)."""
    best = {}
    for r in results:
        if r["family"] == "full" or (r["skipped_share"] == 0 and r["family"] != "compile") or r["rel_l2"] > budget:
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
    """Within ``budget``: the fastest setting per family; the best of this project's methods, of the peers
    (diffusers' caches and cache-dit) and of diffusers' caches alone; the ratio of the project's best speedup
    to the peers' best, where a side with no setting within the budget counts as full computation, 1.0x
    (``full_computation``: the sides that had none); and the fastest fewer-steps and compiled settings
    (never project rows)."""
    best = sorted(matched(results, budget).values(), key=lambda r: -r["speedup"])

    def first(condition):
        return next((r for r in best if condition(r["family"])), None)

    project, peer = first(lambda f: side(f) == "project"), first(lambda f: side(f) == "peer")
    return {"fastest": [_brief(r) for r in best], "best_project": _brief(project), "best_peer": _brief(peer),
            "best_diffusers": _brief(first(lambda f: f.startswith("diffusers:"))),
            "ratio": (project["speedup"] if project else 1.0) / (peer["speedup"] if peer else 1.0),
            "full_computation": [name for name, r in (("project", project), ("peer", peer)) if r is None],
            "fewer_steps": _brief(first(lambda f: side(f) == "fewer-steps")),
            "compile": _brief(first(lambda f: side(f) == "compile"))}


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
        lines += ["", "Best of this project against the best peer (diffusers' caches, cache-dit), fewer steps and "
                      "torch.compile, within each deviation budget (a side with nothing within it: full "
                      "computation, 1.0x):", "",
                  "| rel. L2 <= | project best | best peer | ratio | fewer steps best | compile best |",
                  "|---|---|---|---|---|---|"]
        for budget, s in model["matched"].items():
            cells = [f"{r['setting']} {r['speedup']:.2f}x ({r['rel_l2']:.4f})" if r else "full computation 1.00x"
                     for r in (s["best_project"], s["best_peer"])]
            cells.append(f"{s['ratio']:.2f}")
            cells += [f"{r['setting']} {r['speedup']:.2f}x ({r['rel_l2']:.4f})" if r else "none"
                      for r in (s["fewer_steps"], s["compile"])]
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
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
        recompiled = [r["setting"] for r in model["results"] if r.get("compilations_while_timed")]
        if recompiled:
            lines += ["", "Recompiled while timed: " + ", ".join(recompiled)]
        for name, peer in (("magcache_error", "MagCache"), ("seacache_error", "SeaCache"),
                           ("cache_dit_error", "cache-dit")):
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


PEER_COLORS = ("black", "darkgoldenrod", "navy", "teal", "indigo", "chocolate", "darkslategray",
               "saddlebrown")  # none of tab10's
ALTERNATIVE_STYLES = {"fewer-steps": ("dimgray", ":", "^"), "compile": ("magenta", "-.", "D"),
                      "compile+fewer-steps": ("darkmagenta", "-.", "v")}  # color, line, marker


def plot(report: dict, path: Path) -> None:
    """Speedup against deviation, one panel per model: every setting as a labelled marker, each family's
    front (its best speedup at each deviation) as a line, the peers' caches dashed, fewer steps dotted,
    torch.compile dash-dotted, budgets dotted."""
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
        ours = [f for f in families if side(f) == "project"]
        peers = [f for f in families if side(f) == "peer"]
        styles = {**{f: (plt.get_cmap("tab10")(i % 10), "-", "o") for i, f in enumerate(ours)},
                  **{f: (PEER_COLORS[i % len(PEER_COLORS)], "--", "s") for i, f in enumerate(peers)},
                  **ALTERNATIVE_STYLES}
        for family in families:
            # settings that skipped nothing have zero deviation and no place on a log axis
            points = [r for r in model["results"] if r["family"] == family and r["rel_l2"] > 0]
            if not points:
                continue
            color, line, marker = styles[family]
            front = _front([(r["rel_l2"], r["speedup"]) for r in points])
            ax.plot([p[0] for p in front], [p[1] for p in front], line, color=color, lw=1.2, label=family)
            ax.scatter([r["rel_l2"] for r in points], [r["speedup"] for r in points], s=14, color=color,
                       marker=marker, zorder=3)
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
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, dpi=130, format=path.suffix.lstrip("."))
    plt.close(fig)
    os.replace(partial, path)


def write_atomic(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all (a run stopped mid-write leaves the previous file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"--resume: {path} is not a report ({err}); remove it or choose another --out")
    if not isinstance(report, dict) or not isinstance(report.get("models"), list):
        raise SystemExit(f"--resume: {path} has no list of models; remove it or choose another --out")
    return report


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
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases of --out's report.json run with the same options, run the others")
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
                  "latency from interleaved rounds; skipped = share of the full run's branch evaluations not run "
                  "(counted on each branch's attention/FFN module, under any cache's hooks; fewer steps skip whole "
                  "transformer calls); the best project method is the fastest of this project's families within "
                  "the budget, the best peer the fastest of diffusers' caches and cache-dit's DBCache over their "
                  "grids, a side with none within the budget full computation (1.0x); fewer steps and "
                  "torch.compile (default mode, compiled untimed) are neither; refined plans are refined on inputs apart from the "
                  "evaluation inputs; diffusers' caches run with CacheMixin added to DiT, cache_context with step "
                  "and noise level on every call of the sampling loops, explicit TaylorSeerCache patterns and "
                  "SeaCache visual latents for DiT and FLUX (see the module docstring)"),
        "models": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    grid = None if args.grid == "case" else args.grid
    # a case is kept on --resume only if recorded with every option that changes its results
    options = {"steps": args.steps, "repeats": args.repeats, "grid": args.grid, "seed": args.seed,
               "threads": args.threads, "budgets": args.budgets, "device": str(device)}
    if args.resume and (args.out / "report.json").exists():
        report["models"] = read_report(args.out / "report.json")["models"]
    for name in args.models:
        recorded = next((i for i, m in enumerate(report["models"]) if m["model"] == name), None)
        if recorded is not None and report["models"][recorded].get("options") == options:
            print(f"[{name}] recorded in {args.out / 'report.json'} with the same options: kept")
            continue
        model = {**bench_model(CASES[name], args.steps, args.repeats, device, args.seed, print,
                               budgets=tuple(args.budgets), grid=grid), "options": options}
        if recorded is None:
            report["models"].append(model)
        else:
            report["models"][recorded] = model
        write_atomic(args.out / "report.json", json.dumps(report, indent=1) + "\n")
    write_atomic(args.out / "report.md", markdown(report))
    plot(report, args.out / "speedup_vs_deviation.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
