"""Block adapters for diffusers' transformers: DiT, FLUX and Wan.

Importing this package registers, for the exact block classes of the
installed diffusers, adapters that route every residual branch through bac's
engine, so :func:`bac.describe`, :func:`bac.calibrate`, :func:`bac.make_plan`
and :func:`bac.accelerate` work on ``DiTTransformer2DModel``,
``FluxTransformer2DModel`` and ``WanTransformer3DModel`` unchanged::

    import bac, bac.diffusers

    calibration = bac.calibrate(transformer, sample, calibration_inputs)
    plan = bac.make_plan(calibration, "bac", M=10, n=5)
    with bac.accelerate(transformer, plan) as handle:
        ...

and :func:`enable_cache` / :func:`disable_cache` / :func:`calibrate` /
:func:`refine` (:mod:`bac.diffusers.pipeline`) do it in one line on a pipeline,
with any method of :func:`bac.available_methods`.

Every replacement forward computes exactly what diffusers' forward computes
(an every-step plan is bit-identical to the plain model); a block configured
in a way the adapter does not reproduce is refused with
:class:`UnsupportedBlockError` when the model is described, calibrated or
accelerated, never silently computed differently.

=============================  ==========================  ========================================
block class                    branches (key: kind)        cached feature
=============================  ==========================  ========================================
BasicTransformerBlock (DiT)    sa: sa, [ca: ca], ffn: ffn  gated residual incl. adaLN-Zero modulation
FluxTransformerBlock           attn: sa, ff: ffn,          (image, text) gated joint-attention
                               ff_context: ffn             residuals; each stream's gated FFN
FluxSingleTransformerBlock     attn_mlp: ffn               gated parallel attention + MLP (one matmul)
WanTransformerBlock            sa: sa, ca: ca, ffn: ffn    gated residuals incl. modulation
=============================  ==========================  ========================================

The registered adapter for ``BasicTransformerBlock`` declares DiT's branches
(``sa``, ``ffn``). For blocks with cross-attention use :func:`adapters_for`,
which picks the adapter per block class and checks every layer up front.
"""
from __future__ import annotations

from ._common import UnsupportedBlockError
from .blocks import ADAPTERS, adapters_for
from .dit import BASIC_BLOCK, BASIC_BLOCK_WITH_CA
from .flux import FLUX_DOUBLE_BLOCK, FLUX_SINGLE_BLOCK
from .pipeline import calibrate, disable_cache, enable_cache, refine
from .wan import WAN_BLOCK

__all__ = [
    "ADAPTERS",
    "BASIC_BLOCK",
    "BASIC_BLOCK_WITH_CA",
    "FLUX_DOUBLE_BLOCK",
    "FLUX_SINGLE_BLOCK",
    "UnsupportedBlockError",
    "WAN_BLOCK",
    "adapters_for",
    "calibrate",
    "disable_cache",
    "enable_cache",
    "refine",
]
