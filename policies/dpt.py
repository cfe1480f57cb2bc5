"""DP-T: the transformer denoiser of Diffusion Policy (Chi et al., 2023), written from the paper.

Encoder-decoder. Condition tokens are a sinusoidal timestep token plus one token
per observation step, with learned position embeddings, passed through a small
MLP condition encoder. The decoder is a stack of pre-norm layers (PyTorch's
``nn.TransformerDecoderLayer``, as in the reference implementation) with causal
self-attention over the action tokens, cross-attention to the condition tokens
and a GELU FFN; then a final norm and a linear head. bac caches its blocks
through the built-in adapter for ``nn.TransformerDecoderLayer``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Diffusion Policy's timestep embedding; frequencies precomputed once."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * (-math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TransformerForDiffusion(nn.Module):
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
        dropout: float = 0.1,
        causal_attn: bool = True,
    ):
        super().__init__()
        self.horizon, self.action_dim, self.cond_dim, self.n_obs_steps = horizon, action_dim, cond_dim, n_obs_steps
        self.input_emb = nn.Linear(action_dim, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, width))
        self.time_emb = SinusoidalEmbedding(width)
        self.cond_obs_emb = nn.Linear(cond_dim, width)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, width))
        self.cond_encoder = nn.Sequential(nn.Linear(width, 4 * width), nn.Mish(), nn.Linear(4 * width, width))
        layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        mask = nn.Transformer.generate_square_subsequent_mask(horizon) if causal_attn else None
        self.register_buffer("causal_mask", mask, persistent=False)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, action_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, name) is not None:
                    nn.init.normal_(getattr(module, name), std=0.02)
            for name in ("in_proj_bias", "bias_k", "bias_v"):
                if getattr(module, name) is not None:
                    nn.init.zeros_(getattr(module, name))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        tokens = torch.cat([self.time_emb(timestep)[:, None], self.cond_obs_emb(cond)], dim=1)
        memory = self.cond_encoder(tokens + self.cond_pos_emb)
        x = self.input_emb(sample) + self.pos_emb
        x = self.decoder(x, memory, tgt_mask=self.causal_mask, tgt_is_causal=self.causal_mask is not None)
        return self.head(self.ln_f(x))
