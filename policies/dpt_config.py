"""DP-T's model config (``policy=dpt``; the model: :mod:`policies.dpt`)."""
from __future__ import annotations

from dataclasses import dataclass

from .config_fields import check_transformer


@dataclass(frozen=True)
class DPTConfig:
    """DP-T (``policies.dpt.TransformerForDiffusion``): decoder layers with causal self-attention."""

    width: int = 256
    num_layers: int = 8
    heads: int = 4
    dropout: float = 0.1
    causal_attn: bool = True

    def __post_init__(self) -> None:
        check_transformer(self)
