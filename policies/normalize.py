"""Normalisation, the policy's processor: raw ``observation.state`` and ``action`` to [-1, 1] and back.

A policy keeps one :class:`Normalizer` per feature (``obs_normalizer``, ``action_normalizer``; their
statistics are checkpoint weights): observations are normalised before they condition the denoiser
(:func:`bac.policies.inputs.condition`), sampled actions mapped back with :meth:`Normalizer.inverse`, and
training targets normalised before the loss.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Normalizer(nn.Module):
    """Per-dimension min-max scaling to [-1, 1] (Diffusion Policy's ``limits`` mode)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))

    @torch.no_grad()
    def fit(self, data: np.ndarray | torch.Tensor) -> "Normalizer":
        data = torch.as_tensor(data, dtype=torch.float32).reshape(-1, self.scale.numel())
        low, high = data.min(0).values, data.max(0).values
        span = high - low
        constant = span < 1e-4  # a constant dimension maps to 0
        scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(1e-4))
        self.scale.copy_(scale)
        self.offset.copy_(torch.where(constant, -(low + high) / 2, -1.0 - scale * low))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.offset) / self.scale
