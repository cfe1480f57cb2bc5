"""The denoising process in normalised action space: one sampling call, the training loss, the training schedule.

These are functions of the denoiser (``policy.model``) and read-only schedules, so calls running at the same
time share nothing they write: a sampling call takes its own trajectory from the sampler value.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

import bac

from .config import PolicyConfig
from .sampler import Sampler


def sample_chunk(model: nn.Module, sampler: Sampler, cond: Any, shape: tuple[int, int, int],
                 generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A normalised action chunk ``shape`` = ``[B, horizon, action_dim]`` denoised from Gaussian noise drawn
    from ``generator``, conditioned on ``cond``, with ``sampler``'s steps (one trajectory of its own)."""
    bac.new_trajectory(model)
    fused = sampler.fused
    trajectory = fused.start()  # multistep solvers keep per-call state in it
    prepared = model.prepare(cond, fused.timesteps)  # per-call invariants, computed once
    x = torch.randn(shape, generator=generator, device=device)
    for i, t in enumerate(fused.timesteps):
        x = trajectory.step(i, model(x, t, cond, prepared=prepared[i]), x, generator=generator)
    return x


def training_loss(model: nn.Module, noise_scheduler: Any, config: PolicyConfig, target: torch.Tensor, cond: Any,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The MSE of the denoiser's prediction on a noised normalised chunk ``target`` ``[B, horizon, A]``:
    of the noise (or of ``target`` for ``prediction_type="sample"``) for a DDPM policy, of the velocity
    ``noise - target`` for a flow-matching one."""
    device = target.device
    noise = torch.randn(target.shape, generator=generator, device=device)
    train_steps = config.noise_scheduler.num_train_timesteps
    if config.is_flow:
        # pi0's time distribution: s = 0.001 + 0.999 * Beta(1.5, 1), drawn as U ** (1 / 1.5) (Beta(a, 1)'s inverse CDF)
        u = torch.rand(target.shape[0], generator=generator, device=device)
        s = (0.001 + 0.999 * u ** (1 / 1.5))[:, None, None]
        noisy = (1 - s) * target + s * noise
        return nn.functional.mse_loss(model(noisy, s.flatten() * train_steps, cond), noise - target)
    steps = torch.randint(0, train_steps, (target.shape[0],), generator=generator, device=device)
    noisy = noise_scheduler.add_noise(target, noise, steps)
    goal = target if config.noise_scheduler.prediction_type == "sample" else noise
    return nn.functional.mse_loss(model(noisy, steps, cond), goal)


def training_scheduler(config: PolicyConfig) -> Any:
    """The diffusers noise schedule a policy was trained with (DDPM, or flow matching's Euler schedule); the
    samplers take their config from it."""
    if config.is_flow:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.noise_scheduler.num_train_timesteps,
                                               shift=config.noise_scheduler.shift)
    return DDPMScheduler(**config.noise_scheduler.to_dict())
