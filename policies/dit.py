"""A DiT-style action head: action tokens conditioned through adaLN-Zero modulation.

The timestep embedding plus an embedding of the observation history form one
condition vector ``c``. In every block, ``c`` sets the shift and scale of the
(affine-free) norms and the gate of each residual branch; the gates start at
zero, so every block starts as the identity (DiT's adaLN-Zero). Each branch
owns its modulation (DiT's single 6·width projection split in two, which is
the same function), so a skipped branch skips its modulation too, and the
cached feature is the *gated* residual branch, as bac requires.
"""
from __future__ import annotations

import torch
from torch import nn

import bac

from .dpt import SinusoidalEmbedding


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.attn_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.mlp_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        for modulation in (self.attn_modulation, self.mlp_modulation):
            nn.init.zeros_(modulation[1].weight)
            nn.init.zeros_(modulation[1].bias)

    def attention_branch(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.attn_modulation(c).chunk(3, dim=-1)
        h = _modulate(self.norm1(x), shift, scale)
        return gate[:, None] * self.attn(h, h, h, need_weights=False)[0]

    def mlp_branch(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mlp_modulation(c).chunk(3, dim=-1)
        return gate[:, None] * self.mlp(_modulate(self.norm2(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attention_branch(x, c)
        return x + self.mlp_branch(x, c)


bac.register_adapter(DiTBlock, bac.BranchAttributes({"attention_branch": "sa", "mlp_branch": "ffn"}))


class DiTPolicyHead(nn.Module):
    """Epsilon predictor ``(noisy actions [B, H, A], timestep, condition [B, To, C]) -> [B, H, A]``."""

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int = 16,
        n_obs_steps: int = 2,
        width: int = 256,
        num_layers: int = 8,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.horizon, self.action_dim, self.cond_dim, self.n_obs_steps = horizon, action_dim, cond_dim, n_obs_steps
        self.input_emb = nn.Linear(action_dim, width)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, horizon, width))
        self.time_emb = nn.Sequential(SinusoidalEmbedding(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.obs_emb = nn.Sequential(nn.Linear(n_obs_steps * cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(width, heads, dropout) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, action_dim)
        for zero in (self.out_modulation[1], self.head):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def prepare(self, cond: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The condition vector for every step of one sampling call, ``[K, B, width]``, computed once
        (the observation embedding is the same at every step); pass ``prepared=result[i]``."""
        times = self.time_emb(timesteps.to(cond.device))
        return times[:, None] + self.obs_emb(cond.flatten(1))[None]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, cond: torch.Tensor,
                prepared: torch.Tensor | None = None) -> torch.Tensor:
        if prepared is None:
            batch = sample.shape[0]
            timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
            c = self.time_emb(timestep) + self.obs_emb(cond.flatten(1))
        else:
            c = prepared
        x = self.input_emb(sample) + self.pos_emb
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=-1)
        return self.head(_modulate(self.norm_out(x), shift, scale))
