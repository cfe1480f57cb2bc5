"""The GR00T-style head's model config (``policy=gr00t``; the model: :mod:`policies.gr00t`)."""
from __future__ import annotations

from dataclasses import dataclass

from .vla_config import VLAHeadConfig


@dataclass(frozen=True)
class GR00TConfig(VLAHeadConfig):
    """GR00T-style head (``policies.gr00t``): a DiT over [state, actions], alternating cross-attention to the
    vision-language tokens and self-attention, timestep through adaLN; flow matching."""
