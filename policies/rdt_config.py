"""The RDT-style head's model config (``policy=rdt``; the model: :mod:`policies.rdt`)."""
from __future__ import annotations

from dataclasses import dataclass

from .vla_config import VLAHeadConfig


@dataclass(frozen=True)
class RDTConfig(VLAHeadConfig):
    """RDT-style head (``policies.rdt``): [timestep, state, actions] tokens; each layer self-attends, then
    cross-attends to the language tokens (even layers) or the image tokens (odd layers); DDPM."""
