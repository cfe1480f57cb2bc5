"""The registry of diffusers block adapters: which adapter reproduces which block class.

Importing this module registers, for the exact block classes of the installed
diffusers, the adapters of :mod:`bac.diffusers.dit`, :mod:`.flux` and :mod:`.wan`
with :func:`bac.register_adapter`.
"""
from __future__ import annotations

from torch import nn

from ..adapters import LayerAdapter, register_adapter
from ._common import CheckedOverride, UnsupportedBlockError
from .dit import BASIC_BLOCK, BasicTransformerBlock, basic_block_adapter
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
