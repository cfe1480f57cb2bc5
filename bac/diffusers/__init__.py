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

and :func:`enable_cache` / :func:`disable_cache` / :func:`calibrate`
(:mod:`bac.diffusers.pipeline`) do it in one line on a pipeline, with any
method of :func:`bac.available_methods`.

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

from torch import nn

from ..adapters import LayerAdapter, register_adapter
from ._common import CheckedOverride, UnsupportedBlockError
from .dit import BASIC_BLOCK, BASIC_BLOCK_WITH_CA, BasicTransformerBlock, basic_block_adapter
from .flux import FLUX_DOUBLE_BLOCK, FLUX_SINGLE_BLOCK, FluxSingleTransformerBlock, FluxTransformerBlock
from .wan import WAN_BLOCK, WanTransformerBlock

ADAPTERS: dict[type, CheckedOverride] = {
    BasicTransformerBlock: BASIC_BLOCK,
    FluxTransformerBlock: FLUX_DOUBLE_BLOCK,
    FluxSingleTransformerBlock: FLUX_SINGLE_BLOCK,
    WanTransformerBlock: WAN_BLOCK,
}

for _cls, _adapter in ADAPTERS.items():
    register_adapter(_cls, _adapter)

from .pipeline import calibrate, disable_cache, enable_cache  # noqa: E402  (needs the adapters registered)


def adapters_for(model: nn.Module) -> dict[type, LayerAdapter]:
    """The adapters that reproduce ``model``'s diffusers blocks, every layer checked now.

    Pass the result as ``adapters=`` to :func:`bac.describe`, :func:`bac.calibrate`
    and :func:`bac.accelerate` (and use the described spec for
    :func:`bac.make_plan`). It is only needed for ``BasicTransformerBlock`` with
    cross-attention, but is safe for every model: it raises
    :class:`UnsupportedBlockError` naming the first layer that no adapter
    reproduces, or when one block class appears in two configurations that
    need different branch lists.
    """
    chosen: dict[type, LayerAdapter] = {}
    where: dict[type, str] = {}
    for path, module in model.named_modules():
        cls = type(module)
        if cls not in ADAPTERS:
            continue
        try:
            adapter = basic_block_adapter(module) if cls is BasicTransformerBlock else ADAPTERS[cls]
            adapter.check(module)
        except UnsupportedBlockError as err:
            raise UnsupportedBlockError(f"{path or type(model).__name__}: {err}") from None
        if cls in chosen and chosen[cls] is not adapter:
            raise UnsupportedBlockError(
                f"{path} and {where[cls]} are both {cls.__name__} but need different branch lists "
                f"({[k for k, _ in adapter.branches]} vs {[k for k, _ in chosen[cls].branches]}); "
                "bac declares branches per block class"
            )
        chosen.setdefault(cls, adapter)
        where.setdefault(cls, path)
    return chosen


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
]
