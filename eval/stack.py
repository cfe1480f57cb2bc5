"""A DP-T-shaped denoiser built from PyTorch's own decoder layers, and its DDPM sampling loop.

Used by the core benchmark and tests: it exercises the built-in
``nn.TransformerDecoderLayer`` adapter with the paper's DP-T geometry
(8 pre-norm layers, width 256, 4 heads, 16 action tokens, 2 observation
steps) without depending on the project's trained policies.
"""
from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from torch import nn

import bac


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000.0) / (half - 1)))
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class DecoderStackDenoiser(nn.Module):
    """Epsilon predictor: action tokens attend causally to themselves and to condition tokens."""

    def __init__(
        self,
        action_dim: int = 10,
        obs_dim: int = 20,
        horizon: int = 16,
        n_obs_steps: int = 2,
        width: int = 256,
        num_layers: int = 8,
        heads: int = 4,
        norm_first: bool = True,
        batch_first: bool = True,
    ):
        super().__init__()
        self.horizon, self.action_dim, self.batch_first = horizon, action_dim, batch_first
        self.input_emb = nn.Linear(action_dim, width)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, horizon, width))
        self.time_emb = SinusoidalEmbedding(width)
        self.obs_emb = nn.Linear(obs_dim, width)
        self.cond_pos_emb = nn.Parameter(0.02 * torch.randn(1, 1 + n_obs_steps, width))
        self.cond_encoder = nn.Sequential(nn.Linear(width, 4 * width), nn.Mish(), nn.Linear(4 * width, width))
        layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=batch_first, norm_first=norm_first
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(horizon), persistent=False)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, action_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device).expand(batch)
        cond = torch.cat([self.time_emb(timestep)[:, None], self.obs_emb(obs)], dim=1) + self.cond_pos_emb
        memory = self.cond_encoder(cond)
        x = self.input_emb(sample) + self.pos_emb
        if not self.batch_first:
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        x = self.decoder(x, memory, tgt_mask=self.causal_mask, tgt_is_causal=True)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(self.ln_f(x))


def ddpm_scheduler(num_steps: int = 100) -> DDPMScheduler:
    """Diffusion Policy's noise schedule: squared-cosine betas, clipped samples, epsilon prediction."""
    scheduler = DDPMScheduler(
        num_train_timesteps=num_steps, beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon"
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def sample_actions(
    denoiser: DecoderStackDenoiser, scheduler: DDPMScheduler, obs: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """One sampling call: a full reverse-diffusion trajectory from seeded noise."""
    bac.new_trajectory(denoiser)
    generator = torch.Generator(device=obs.device).manual_seed(seed)
    shape = (obs.shape[0], denoiser.horizon, denoiser.action_dim)
    x = torch.randn(shape, generator=generator, device=obs.device)
    for t in scheduler.timesteps:
        eps = denoiser(x, t, obs)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
