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
    return StepRunner(model, sampler, cond, generator)(torch.randn(shape, generator=generator, device=device), 0)


class StepRunner:
    """One sampling call's denoising steps, run in pieces (a warm start, :mod:`bac.policies.warm`):
    ``runner(x, begin, end=None, keep=None, resume=False)`` runs steps ``begin .. end - 1`` on ``x`` in a new
    trajectory begun at ``begin`` (the denoiser's cache handle too), or with ``resume`` goes on with it."""

    def __init__(self, model: nn.Module, sampler: Sampler, cond: Any, generator: torch.Generator | None):
        self.model, self.fused, self.cond, self.generator = model, sampler.fused, cond, generator
        self.prepared = None
        self.trajectory = None
        self.guide = None  # real-time chunking's guidance (bac.policies.rtc.Guide), set per call

    def __call__(self, x: torch.Tensor, begin: int, end: int | None = None, keep: Any = None,
                 resume: bool = False) -> torch.Tensor:
        fused, model, cond = self.fused, self.model, self.cond
        if not resume:
            if self.trajectory is not None:  # a warm start's check step: that trajectory stops there on purpose
                bac.abandon_trajectory(model)
            bac.new_trajectory(model, begin)
            self.trajectory = fused.start(begin)  # multistep solvers keep per-call state in it
        if self.prepared is None:
            self.prepared = model.prepare(cond, fused.timesteps)  # per-call invariants, computed once
        trajectory, prepared, timesteps = self.trajectory, self.prepared, fused.timesteps
        for i in range(begin, fused.num_steps if end is None else end):
            if self.guide is None:
                out = model(x, timesteps[i], cond, prepared=prepared[i])
            else:
                out = self.guide(i, x, lambda sample: model(sample, timesteps[i], cond, prepared=prepared[i]))
            if keep is not None:
                keep(i, x, out)
            x = trajectory.step(i, out, x, generator=self.generator)
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
