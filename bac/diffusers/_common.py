"""Pieces shared by the diffusers block adapters."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from ..adapters import ForwardOverride, forward_replaced
from ..errors import ConfigError


class UnsupportedBlockError(ConfigError):
    """A diffusers block is configured in a way its bac adapter does not reproduce exactly."""


class CheckedOverride(ForwardOverride):
    """A :class:`bac.ForwardOverride` that refuses layers it cannot reproduce bit for bit.

    ``check(adapter, layer)`` raises :class:`UnsupportedBlockError` for such a
    layer; :func:`bac.describe` (and so calibration and acceleration) runs it on
    every adapted layer before anything is changed.
    """

    def __init__(
        self,
        branches: Sequence[tuple[str, str]],
        forward: Callable[..., Any],
        check: Callable[["CheckedOverride", nn.Module], None],
        width: Callable[[nn.Module], int],
        description: str,
        main_residual: Callable[[Sequence[Any]], list] | None = None,
    ):
        super().__init__(branches, forward, 0, width, main_residual)
        self._check = check
        self.description = description

    def check(self, layer: nn.Module) -> None:
        """Raise :class:`UnsupportedBlockError` if this adapter would compute something else than ``layer``."""
        self._check(self, layer)

    def __repr__(self) -> str:
        return f"<bac.diffusers adapter: {self.description}, branches {list(self.branches)}>"


def require_plain(layer: nn.Module, bypassed: Sequence[str] = ()) -> None:
    """Refuse a layer whose forward is already replaced, or whose bypassed sub-modules are hooked.

    The adapter replaces ``layer.forward`` on the instance, so an instance
    ``forward`` already there (diffusers' hook registry, another accelerator)
    would be clobbered. Sub-modules named in ``bypassed`` are the ones whose
    own ``forward`` the replacement does not call (it calls their children
    instead): a hook or patched forward on them would silently be skipped.
    """
    name = type(layer).__name__
    if forward_replaced(layer):
        raise UnsupportedBlockError(
            f"{name} already has a replaced forward (a diffusers hook such as enable_cache, group offloading or "
            "another accelerator?); remove it before using bac on this model"
        )
    for attr in bypassed:
        module = getattr(layer, attr)
        if forward_replaced(module) or module._forward_hooks or module._forward_pre_hooks:
            raise UnsupportedBlockError(
                f"{name}.{attr} has a forward hook or a replaced forward; bac's adapter computes {attr} "
                "from its sub-modules and would skip the hook: remove it before using bac on this model"
            )


class Lazy:
    """A value computed on first use: per-layer modulation shared by several branches.

    The adaLN modulation (shift/scale/gate of every branch of a layer) is
    computed by whichever branch of the layer runs first in a denoiser call,
    so a layer whose branches are all reused computes nothing at all.
    """

    __slots__ = ("fn", "args", "value")

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn = fn
        self.args = args
        self.value = None

    def __call__(self) -> Any:
        if self.value is None:
            self.value = self.fn(*self.args)
        return self.value
