"""The noise scheduler's config: how a policy is trained to denoise (DDPM or flow matching).

The noise scheduler is the training-time diffusers scheduler (``policy.noise_scheduler``); the samplers a
policy runs at inference derive from it. Stored as ``config.json``'s ``noise_scheduler``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from bac.errors import ConfigError

from .config_fields import is_kind, typed_fields

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample")  # the training loss regresses the noise, or the clean actions (RDT)


@dataclass(frozen=True)
class NoiseSchedulerConfig:
    """diffusers' ``DDPMScheduler`` settings the policy is trained with (samplers derive from it)."""

    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if not is_kind(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ConfigError(f"noise_scheduler.num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        if not is_kind(self.clip_sample, bool):
            raise ConfigError(f"noise_scheduler.clip_sample must be true or false, got {self.clip_sample!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"noise_scheduler.beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"noise_scheduler.prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")

    kind = "ddpm"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # no "kind": the format of every checkpoint saved before flow matching


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Rectified-flow training (pi0, GR00T): ``x_s = (1 - s) x_0 + s noise``, the model predicts the velocity
    ``noise - x_0`` at ``timestep = s * num_train_timesteps``; sampled with diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (``shift``). ``s`` is drawn as pi0 draws it in training,
    ``s = 0.001 + 0.999 * Beta(1.5, 1)`` (more weight on the noisy end)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    kind: str = "flow_matching"

    def __post_init__(self) -> None:
        if self.kind != "flow_matching":
            raise ConfigError(f"noise_scheduler.kind must be 'flow_matching', got {self.kind!r}")
        if not is_kind(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ConfigError(f"noise_scheduler.num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        if not is_kind(self.shift, float) or self.shift <= 0:
            raise ConfigError(f"noise_scheduler.shift must be a positive number, got {self.shift!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def noise_scheduler_config(data: Mapping[str, Any] | NoiseSchedulerConfig | FlowMatchingConfig | None,
                           complete: bool = False) -> NoiseSchedulerConfig | FlowMatchingConfig:
    """``{"kind": "flow_matching", ...}`` is flow matching; a mapping without ``kind`` is DDPM (every saved DDPM config)."""
    if isinstance(data, (NoiseSchedulerConfig, FlowMatchingConfig)):
        return data
    data = data or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"noise_scheduler must be a mapping, got {type(data).__name__}")
    if data.get("kind") == "flow_matching":
        return FlowMatchingConfig(**typed_fields(FlowMatchingConfig, data, "noise_scheduler", complete))
    if "kind" in data:
        raise ConfigError(f"noise_scheduler.kind must be 'flow_matching' (or absent for DDPM), got {data['kind']!r}")
    return NoiseSchedulerConfig(**typed_fields(NoiseSchedulerConfig, data, "noise_scheduler", complete))
