"""Block adapters for diffusers' transformers (DiT, FLUX and Wan) and one-line caching for their pipelines.

Importing this package registers, for the exact block classes of the installed diffusers, adapters that
route every residual branch through bac's engine, so :func:`bac.calibrate`, :func:`bac.make_plan` and
:func:`bac.accelerate` work on ``DiTTransformer2DModel``, ``FluxTransformer2DModel`` and
``WanTransformer3DModel`` unchanged; :func:`enable_cache`, :func:`disable_cache`, :func:`calibrate` and
:func:`refine` do it in one line on a pipeline, as one hook named ``"bac"`` in the transformer's diffusers
``HookRegistry`` (:mod:`.hook`). An every-step plan is bit-identical to the plain model; a
block configured in a way the adapter does not reproduce is refused with :class:`UnsupportedBlockError`.
For DiT blocks with cross-attention use :func:`adapters_for`. What each adapter caches, and how to use it:
docs/guide/diffusers.md.
"""
from __future__ import annotations

try:
    import diffusers  # noqa: F401  (the core installs without it)
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(f"bac.diffusers needs diffusers: pip install 'bac[diffusers]' ({err})") from err

from ._common import UnsupportedBlockError
from .blocks import ADAPTERS, adapters_for
from .dit import BASIC_BLOCK, BASIC_BLOCK_WITH_CA
from .flux import FLUX_DOUBLE_BLOCK, FLUX_SINGLE_BLOCK
from .pipeline import adjust_timesteps, calibrate, disable_cache, enable_cache, refine
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
    "adjust_timesteps",
    "calibrate",
    "disable_cache",
    "enable_cache",
    "refine",
]
