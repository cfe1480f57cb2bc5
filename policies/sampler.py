"""A policy's sampler as a value: kind, step count, the diffusers scheduler and its fused step, built once.

A :class:`Sampler` is never changed after :meth:`Sampler.make`; a policy samples with ``policy.sampler`` and
``policy.with_sampler(kind, steps)`` is another policy view with another value, so choosing a sampler never
changes what another caller (a thread, an evaluation variant) samples with. Per-call state (DPM-Solver's
previous step) lives in the call: ``sampler.fused.start()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from bac.errors import ConfigError
from bac.sampling import FusedSampler

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
            "flow": FlowMatchEulerDiscreteScheduler}
FLOW_SAMPLERS = ("flow",)
#: The sampler a policy starts with: all training steps of DDPM, or the head's published default
#: (GR00T N1: 4 Euler steps; pi0: 10; RDT-1B: DPM-Solver++ at 20).
DEFAULT_SAMPLERS = {"gr00t": ("flow", 4), "pi0": ("flow", 10), "rdt": ("dpm", 20)}


@dataclass(frozen=True)
class Sampler:
    """``kind`` (``"ddpm"``, ``"ddim"``, ``"dpm"`` or ``"flow"``) with ``steps`` steps: ``scheduler`` is the
    diffusers scheduler with ``set_timesteps(steps)`` done (what ``scheduler=`` arguments of bac take),
    ``fused`` its :class:`bac.sampling.FusedSampler`. Build one with :meth:`make`."""

    kind: str
    steps: int
    scheduler: Any
    fused: FusedSampler

    @property
    def timesteps(self) -> torch.Tensor:
        return self.fused.timesteps

    @classmethod
    def make(cls, kind: str, steps: int | None, noise_scheduler: Any, is_flow: bool) -> "Sampler":
        """DDPM (all training steps by default), DDIM or DPM-Solver++ (fewer steps) for a policy trained with
        DDPM; flow-matching Euler steps (``"flow"``; steps required) for one trained with flow matching.
        ``noise_scheduler`` is the training schedule the sampler's config comes from."""
        if kind not in SAMPLERS:
            raise ConfigError(f"unknown sampler {kind!r}; expected one of {sorted(SAMPLERS)}")
        if (kind in FLOW_SAMPLERS) != is_flow:
            trained = "flow matching" if is_flow else "DDPM"
            allowed = list(FLOW_SAMPLERS) if is_flow else sorted(set(SAMPLERS) - set(FLOW_SAMPLERS))
            raise ConfigError(f"sampler {kind!r} does not fit a policy trained with {trained}; use one of {allowed}")
        if kind in FLOW_SAMPLERS and steps is None:
            raise ConfigError("a flow-matching sampler needs its number of steps (e.g. with_sampler('flow', 10))")
        train_steps = noise_scheduler.config.num_train_timesteps
        if steps is None:
            steps = train_steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ConfigError(f"sampler steps must be an integer, got {steps!r}")
        if not 1 <= steps <= train_steps:
            raise ConfigError(f"sampler steps must be in [1, {train_steps}], got {steps}")
        scheduler = SAMPLERS[kind].from_config(noise_scheduler.config)
        scheduler.set_timesteps(steps)
        values, counts = scheduler.timesteps.unique(return_counts=True)
        if (counts > 1).any():  # e.g. DPM-Solver++ at 100 of 100 training steps: NaN actions from there on
            raise ConfigError(f"sampler {kind!r} with {steps} steps repeats timestep(s) "
                              f"{values[counts > 1].tolist()} (diffusers' spacing for this step count); "
                              "choose another step count")
        return cls(kind, steps, scheduler, FusedSampler(scheduler))

    def __repr__(self) -> str:
        return f"Sampler({self.kind!r}, steps={self.steps})"
