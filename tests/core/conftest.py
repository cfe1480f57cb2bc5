"""A tiny test-local denoiser of PyTorch decoder layers, its DDPM sampler and sampling loop, for the core tests.

The core tests depend on bac alone (no policy code): the denoiser is built here directly from
``nn.TransformerDecoderLayer``, for which bac has a built-in adapter. Fixtures: ``denoiser_class``,
``tiny_denoiser`` (a seeded factory), ``ddpm_scheduler`` (a factory), ``sample_actions`` (one sampling call),
``tiny_stack`` (model, 12-step sampler, observations), ``calibrated`` (a tiny denoiser, its sampler of the
test module's ``K`` steps and a calibration of it; once per module).
"""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

import bac


class TinyDenoiser(nn.Module):
    """Epsilon predictor ``(noisy actions [B, H, A], timestep, condition [B, To, C]) -> [B, H, A]``.

    Action tokens plus a sinusoidal timestep embedding are the decoder's stream, the linearly embedded
    condition tokens its memory; pre-norm decoder layers (self-attention, cross-attention, FFN of width
    ``4 * width``), a final norm and a linear head.
    """

    def __init__(self, action_dim: int, cond_dim: int, horizon: int, width: int, num_layers: int, heads: int):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.input_emb = nn.Linear(action_dim, width)
        self.cond_emb = nn.Linear(cond_dim, width)
        half = width // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, action_dim)

    def time_emb(self, timestep) -> torch.Tensor:
        """``[1 or B, width]`` sinusoidal features of a timestep (a number, a 0-d or a ``[B]`` tensor)."""
        angles = torch.as_tensor(timestep, device=self.freqs.device).float().reshape(-1, 1) * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, x: torch.Tensor, timestep, cond: torch.Tensor) -> torch.Tensor:
        h = self.input_emb(x) + self.time_emb(timestep)[:, None]
        h = self.decoder(h, self.cond_emb(cond))
        return self.head(self.norm_out(h))


TINY = dict(action_dim=3, cond_dim=5, horizon=8, width=32, num_layers=3, heads=2)


def _tiny_denoiser(**changes) -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser(**{**TINY, **changes}).eval()


def _ddpm_scheduler(num_steps):
    scheduler = DDPMScheduler(num_train_timesteps=num_steps, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def _sample_actions(model, scheduler, obs, seed=0):
    """One sampling call of a denoiser ``model(x, t, cond)``: a seeded reverse-diffusion trajectory."""
    bac.new_trajectory(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((obs.shape[0], model.horizon, model.action_dim), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, obs), t, x, generator=generator).prev_sample
    return x


@pytest.fixture(scope="session")
def denoiser_class():
    """The tiny denoiser's class (``TinyDenoiser``), for tests that subclass it."""
    return TinyDenoiser


@pytest.fixture(scope="session")
def tiny_denoiser():
    """``tiny_denoiser(**changes)``: the tiny denoiser in eval mode, seeded, built from ``TINY`` updated by
    ``changes`` (action_dim=3, cond_dim=5, horizon=8, width=32, num_layers=3, heads=2)."""
    return _tiny_denoiser


@pytest.fixture(scope="session")
def ddpm_scheduler():
    """``ddpm_scheduler(num_steps)``: a DDPM sampler trained on and running ``num_steps`` steps."""
    return _ddpm_scheduler


@pytest.fixture(scope="session")
def sample_actions():
    """``sample_actions(model, scheduler, obs, seed=0)``: one seeded sampling call of ``model(x, t, cond)``."""
    return _sample_actions


@pytest.fixture
def tiny_stack():
    """The tiny denoiser (PyTorch decoder layers), a 12-step DDPM sampler, and observations."""
    return _tiny_denoiser(), _ddpm_scheduler(12), torch.randn(2, 2, 5)


@pytest.fixture(scope="module")
def calibrated(request, tiny_denoiser, ddpm_scheduler, sample_actions):
    model, scheduler = tiny_denoiser(), ddpm_scheduler(request.module.K)
    obs = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(1))
    calibration = bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs], scheduler=scheduler,
                                attention=True)
    return model, scheduler, calibration
