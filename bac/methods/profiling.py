"""ProfilingDiT (arXiv 2504.03140): layers profiled as background-focused are cached, the rest always computed.

The paper profiles where each transformer block's attention goes: a block is *foreground-focused* when the
tokens it attends to most overlap the foreground, and such blocks are computed at every step while
*background-focused* blocks reuse their last residual (output minus input, the whole block) between
recomputations; the first steps, where consecutive predictions differ most, are computed in full.

Here the profile is part of the calibration (``bac.calibrate(..., attention=True)``, :mod:`bac.attention`):
per block the mean ratio ``|high-attention keys & foreground| / |foreground|`` (the paper's R_attn), where a
block's high-attention keys receive more than uniform attention and the *foreground* is the keys the model
as a whole attends to above uniform (averaged over every block attending to that key set). The paper's
foreground is a segmentation (SAM2 on the predicted noise) that a model-agnostic core cannot run; "what the
model attends to" is the definition that fits every model, and for a policy it is the issue's: what the
action tokens attend to. A layer's score is the mean over its attention branches; a layer without attention
is always computed.

Schedule: every block is computed in the first ``warmup`` steps; then cached layers are recomputed every
``interval`` steps, the interval shrinking linearly to ``min_interval`` by the last step (the paper's
Eq. 14-15; equal values give the released code's fixed interval). The cached layers are the lowest-scoring
``share`` of the layers, or, with ``threshold`` (the paper's tau), every layer scoring below it. The scores
and the split travel in the plan file (``params["focus"]``, ``params["cached_layers"]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checks import check_number
from ..errors import ConfigError
from .registry import register_method

WARMUP_SHARE = 0.12  # the released code's default: 6 of 50 steps computed in full


@dataclass(frozen=True)
class ProfilingDiTParams:
    share: float = 0.6  # layers cached: the lowest-scoring share (the released lists cache 60-70 %)
    threshold: float | None = None  # when set, replaces share: layers scoring below it are cached
    warmup: int | None = None  # leading steps computed in full; None: 12 % of the steps, at least 1
    interval: int = 6  # recomputation interval of cached layers right after the warm-up
    min_interval: int | None = None  # interval reached at the last step (None: interval, a fixed one)

    def __post_init__(self):
        check_number("share", self.share, 0.0, 1.0)
        if self.threshold is not None:
            check_number("threshold", self.threshold, 0.0, 1.0)
        if self.warmup is not None:
            check_number("warmup", self.warmup, 1, integer=True)
        check_number("interval", self.interval, 1, integer=True)
        if self.min_interval is not None:
            check_number("min_interval", self.min_interval, 1, self.interval, integer=True)


def layer_scores(spec, focus: np.ndarray) -> dict[int, float]:
    """Per layer, the mean foreground ratio of its attention branches (NaN: no branch attends)."""
    by_layer: dict[int, list[float]] = {}
    for block, value in zip(spec.blocks, focus):
        by_layer.setdefault(block.layer, [])
        if np.isfinite(value):
            by_layer[block.layer].append(float(value))
    return {layer: float(np.mean(v)) if v else math.nan for layer, v in by_layer.items()}


def recompute_steps(num_steps: int, warmup: int, interval: int, min_interval: int) -> list[int]:
    """The warm-up steps, then a cached layer's recomputations: step ``s`` once ``s - last >= T_s``, with
    ``T_s`` falling linearly from ``interval`` at the end of the warm-up to ``min_interval`` at the last step."""
    steps = list(range(min(warmup, num_steps)))
    last, span = warmup - interval, max(num_steps - 1 - warmup, 1)
    for s in range(warmup, num_steps):
        gap = round(interval - (interval - min_interval) * (s - warmup) / span)
        if s - last >= gap:
            steps.append(s)
            last = s
    return steps


@register_method("profiling-dit", ProfilingDiTParams, needs_calibration=True, needs_attention=True)
def profiling_dit(params, spec, num_steps, calibration):
    """ProfilingDiT: background-focused layers cached on an interval after a warm-up, the rest always computed."""
    if calibration.focus is None:
        raise ConfigError("profiling-dit needs an attention profile: calibrate with attention=True "
                          "(bac.calibrate / bac.diffusers.calibrate)")
    scores = layer_scores(spec, calibration.focus)
    ranked = sorted((s, layer) for layer, s in scores.items() if math.isfinite(s))
    if not ranked:
        raise ConfigError("profiling-dit: no block's attention was seen in calibration (the model's attention does "
                          "not go through torch's scaled_dot_product_attention or multi_head_attention_forward)")
    if params.threshold is not None:
        cached = {layer for s, layer in ranked if s < params.threshold}
    else:
        cached = {layer for _, layer in ranked[:math.floor(params.share * len(scores) + 1e-9)]}
    warmup = params.warmup if params.warmup is not None else max(1, round(WARMUP_SHARE * num_steps))
    sparse = recompute_steps(num_steps, warmup, params.interval, params.min_interval or params.interval)
    steps = {b.name: sparse if b.layer in cached else list(range(num_steps)) for b in spec.blocks}
    fitted = {"focus": {str(layer): round(s, 6) for layer, s in sorted(scores.items()) if math.isfinite(s)},
              "cached_layers": sorted(cached)}
    return steps, None, fitted
