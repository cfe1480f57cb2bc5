"""An RDT-style action head (after RDT-1B's diffusion transformer), written from the paper's description.

The sequence is a timestep token, the state token and the action tokens, with learned position
embeddings. Every layer is three pre-RMSNorm residual branches: self-attention over the sequence,
cross-attention to a condition that alternates by layer (language tokens in even layers, image tokens
in odd ones, as RDT alternates its language and image conditions), and a GELU FFN. The timestep
enters only as a token (no adaLN). Trained as DDPM with 1000 steps predicting the clean actions
(RDT's ``prediction_type="sample"``); DPM-Solver++ at 20 steps by default, as RDT-1B samples.

Per-call work: the condition keys/values of every layer are projected once per policy call
(:meth:`RDTHead.prepare`), with the timestep tokens of every step.
"""
from __future__ import annotations

import torch
from torch import nn

import bac

from .dpt import SinusoidalEmbedding
from .vla import Attention, FeedForward, Prefix, VLAHead


class RDTBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.cross_attn = Attention(width, heads)
        self.norm3 = nn.RMSNorm(width, eps=1e-6)
        self.mlp = FeedForward(width, dropout)

    def sa(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def ca(self, x: torch.Tensor, kv, mask) -> torch.Tensor:
        return self.cross_attn(self.norm2(x), kv, mask)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm3(x))

    def forward(self, x: torch.Tensor, kv, mask) -> torch.Tensor:
        x = x + self.sa(x)
        x = x + self.ca(x, kv, mask)
        return x + self.ffn(x)


bac.register_adapter(RDTBlock, bac.BranchAttributes({"sa": "sa", "ca": "ca", "ffn": "ffn"}))


class RDTHead(VLAHead):
    """Clean-action predictor ``(noisy actions [B, H, A], timestep, Prefix) -> [B, H, A]``."""

    def __init__(self, action_dim: int, state_dim: int, horizon: int, n_obs_steps: int, width: int = 128,
                 num_layers: int = 6, heads: int = 4, dropout: float = 0.0, cameras=("corner3",),
                 image_size: int = 84, crop_pad: int = 4):
        super().__init__(action_dim, state_dim, horizon, n_obs_steps, width, cameras, image_size)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, 2 + horizon, width))
        self.time_emb = nn.Sequential(SinusoidalEmbedding(width), nn.Linear(width, width), nn.SiLU(),
                                      nn.Linear(width, width))
        self.blocks = nn.ModuleList(RDTBlock(width, heads, dropout) for _ in range(num_layers))
        self.norm_out = nn.RMSNorm(width, eps=1e-6)
        self.head = nn.Linear(width, action_dim)

    def _conditions(self, prefix: Prefix) -> list[tuple]:
        """Per layer: the keys/values and key mask of its condition (language, image, language, ...)."""
        out = []
        for i, block in enumerate(self.blocks):
            if i % 2 == 0:
                out.append((block.cross_attn.keys_values(prefix.language), prefix.language_mask))
            else:
                out.append((block.cross_attn.keys_values(prefix.vision), None))
        return out

    def prepare(self, prefix: Prefix, timesteps: torch.Tensor) -> list[dict]:
        """Per step: ``{"time": the timestep token [B, 1, W], "conditions": per-layer keys/values and mask}``."""
        conditions = self._conditions(prefix)
        times = self.time_emb(timesteps.to(prefix.vision.device).float())
        return [{"time": t[None, None].expand(prefix.batch, 1, -1), "conditions": conditions} for t in times]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float, prefix: Prefix,
                prepared: dict | None = None) -> torch.Tensor:
        if prepared is None:
            batch = sample.shape[0]
            timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
            prepared = {"time": self.time_emb(timestep.float())[:, None], "conditions": self._conditions(prefix)}
        x = torch.cat([prepared["time"], prefix.state, self.input_emb(sample)], 1) + self.pos_emb
        for block, (kv, mask) in zip(self.blocks, prepared["conditions"]):
            x = block(x, kv, mask)
        return self.head(self.norm_out(x[:, 2:]))
