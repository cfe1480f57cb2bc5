"""The pi0-style action expert's model config (``policy=pi0``; the model: :mod:`policies.pi0`)."""
from __future__ import annotations

from dataclasses import dataclass

from .vla_config import VLAHeadConfig


@dataclass(frozen=True)
class Pi0Config(VLAHeadConfig):
    """pi0-style action expert (``policies.pi0``): in every layer the action tokens attend to that layer's
    keys/values of the vision-language prefix (computed once per call, a VLM's KV cache) and to themselves."""
