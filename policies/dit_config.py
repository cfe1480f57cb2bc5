"""The DiT head's model config (``policy=dit``; the model: :mod:`policies.dit`)."""
from __future__ import annotations

from dataclasses import dataclass

from .config_fields import check_transformer


@dataclass(frozen=True)
class DiTConfig:
    """DiT head (``policies.dit.DiTPolicyHead``): adaLN-Zero blocks."""

    width: int = 256
    num_layers: int = 8
    heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_transformer(self)
