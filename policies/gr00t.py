"""A GR00T-style action head (after GR00T N1's flow-matching DiT), written from the paper's description.

The sequence is the state token followed by the action tokens. Blocks alternate: even blocks
cross-attend from that sequence to the vision-language tokens of the prefix, odd blocks self-attend;
each is followed by a GELU FFN. The flow-matching timestep enters every branch through adaLN-Zero
(shift, scale and a zero-initialised gate per branch, as in ``policies.dit``), so each cached feature
is a gated residual branch. Trained with flow matching; 4 Euler steps by default, as GR00T N1.

Per-call work: the vision-language keys/values of every cross-attention block do not depend on the
denoising step, so :meth:`GR00THead.prepare` projects them once per policy call, with the timestep
embeddings of every step.
"""
from __future__ import annotations

import torch
from torch import nn

import bac

from .dpt import SinusoidalEmbedding
from .vla import Attention, FeedForward, Prefix, VLAHead, modulate


class GR00TBlock(nn.Module):
    """adaLN-Zero attention (self or cross) + FFN."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.attn_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(width, dropout)
        self.mlp_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        for modulation in (self.attn_modulation, self.mlp_modulation):
            nn.init.zeros_(modulation[1].weight)
            nn.init.zeros_(modulation[1].bias)

    def attention_branch(self, x: torch.Tensor, c: torch.Tensor, kv=None, mask=None) -> torch.Tensor:
        shift, scale, gate = self.attn_modulation(c).chunk(3, dim=-1)
        return gate[:, None] * self.attn(modulate(self.norm1(x), shift, scale), kv, mask)

    def mlp_branch(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mlp_modulation(c).chunk(3, dim=-1)
        return gate[:, None] * self.mlp(modulate(self.norm2(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor, kv=None, mask=None) -> torch.Tensor:
        x = x + self.attention_branch(x, c, kv, mask)
        return x + self.mlp_branch(x, c)


class GR00TCrossBlock(GR00TBlock):
    """Cross-attention to the vision-language tokens (``kv``: their keys/values, ``mask``: the key mask)."""


class GR00TSelfBlock(GR00TBlock):
    """Self-attention over the state and action tokens."""


bac.register_adapter(GR00TCrossBlock, bac.BranchAttributes({"attention_branch": "ca", "mlp_branch": "ffn"}))
bac.register_adapter(GR00TSelfBlock, bac.BranchAttributes({"attention_branch": "sa", "mlp_branch": "ffn"}))


class GR00THead(VLAHead):
    """Velocity predictor ``(noisy actions [B, H, A], timestep, Prefix) -> [B, H, A]``."""

    def __init__(self, action_dim: int, state_dim: int, horizon: int, n_obs_steps: int, width: int = 128,
                 num_layers: int = 6, heads: int = 4, dropout: float = 0.0, cameras=("corner3",),
                 image_size: int = 84, crop_pad: int = 4):
        super().__init__(action_dim, state_dim, horizon, n_obs_steps, width, cameras, image_size)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, 1 + horizon, width))
        self.time_emb = nn.Sequential(SinusoidalEmbedding(width), nn.Linear(width, width), nn.SiLU(),
                                      nn.Linear(width, width))
        self.blocks = nn.ModuleList((GR00TCrossBlock if i % 2 == 0 else GR00TSelfBlock)(width, heads, dropout)
                                    for i in range(num_layers))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, action_dim)
        for zero in (self.out_modulation[1], self.head):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def _context(self, prefix: Prefix) -> tuple[list, torch.Tensor]:
        tokens, mask = prefix.vision_language()
        kv = [block.attn.keys_values(tokens) if isinstance(block, GR00TCrossBlock) else None for block in self.blocks]
        return kv, mask

    def prepare(self, prefix: Prefix, timesteps: torch.Tensor) -> list[dict]:
        """Per step ``i``: ``{"c": timestep embedding [B, W], "kv": per-block context keys/values, "mask"}``;
        the keys/values are projected once and shared by every step."""
        kv, mask = self._context(prefix)
        times = self.time_emb(timesteps.to(prefix.vision.device))
        return [{"c": t[None].expand(prefix.batch, -1), "kv": kv, "mask": mask} for t in times]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float, prefix: Prefix,
                prepared: dict | None = None) -> torch.Tensor:
        if prepared is None:
            batch = sample.shape[0]
            timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
            kv, mask = self._context(prefix)
            prepared = {"c": self.time_emb(timestep), "kv": kv, "mask": mask}
        c = prepared["c"]
        x = torch.cat([prefix.state, self.input_emb(sample)], 1) + self.pos_emb
        for block, kv in zip(self.blocks, prepared["kv"]):
            x = block(x, c, kv, prepared["mask"]) if kv is not None else block(x, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=-1)
        return self.head(modulate(self.norm_out(x[:, 1:]), shift, scale))
