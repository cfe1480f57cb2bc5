"""A diffusion policy: denoiser, normalisation, diffusers noise schedules, checkpoints.

``predict_action(obs_history)`` runs one sampling call (it marks the start of a
trajectory for bac's cache) and returns the chunk of actions to execute.
Checkpoints are a directory with ``model.safetensors`` (EMA weights and the
normalisation statistics) and ``config.json`` (architecture, normalisation
shapes, tasks, noise schedule, provenance); nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from safetensors.torch import load_file, save_file
from torch import nn

import bac

from .checkpointing import check_fits
from .dit import DiTPolicyHead
from .dpt import TransformerForDiffusion

ARCHITECTURES = {"dpt": TransformerForDiffusion, "dit": DiTPolicyHead}
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
CHECKPOINT_FORMAT = "bac-policy/1"
DEFAULT_NOISE = {
    "num_train_timesteps": 100,
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
    "prediction_type": "epsilon",
}


class Normalizer(nn.Module):
    """Per-dimension min-max scaling to [-1, 1] (Diffusion Policy's ``limits`` mode)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))

    @torch.no_grad()
    def fit(self, data: np.ndarray | torch.Tensor) -> "Normalizer":
        data = torch.as_tensor(data, dtype=torch.float32).reshape(-1, self.scale.numel())
        low, high = data.min(0).values, data.max(0).values
        span = high - low
        constant = span < 1e-4  # a constant dimension maps to 0
        scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(1e-4))
        self.scale.copy_(scale)
        self.offset.copy_(torch.where(constant, -(low + high) / 2, -1.0 - scale * low))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.offset) / self.scale


class DiffusionPolicy(nn.Module):
    def __init__(
        self,
        architecture: str,
        model: dict,
        obs_dim: int,
        action_dim: int,
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        tasks: Sequence[str] = (),
        noise_scheduler: dict | None = None,
        provenance: dict | None = None,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
        if not 1 <= n_action_steps <= horizon:
            raise ValueError(f"n_action_steps must be in [1, horizon={horizon}], got {n_action_steps}")
        self.architecture, self.model_kwargs = architecture, dict(model)
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.tasks = list(tasks)
        self.noise_config = {**DEFAULT_NOISE, **(noise_scheduler or {})}
        self.provenance = dict(provenance or {})
        cond_dim = obs_dim + (len(self.tasks) if len(self.tasks) > 1 else 0)
        self.model = ARCHITECTURES[architecture](
            action_dim=action_dim, cond_dim=cond_dim, horizon=horizon, n_obs_steps=n_obs_steps, **self.model_kwargs
        )
        self.obs_normalizer = Normalizer(obs_dim)
        self.action_normalizer = Normalizer(action_dim)
        self.noise_scheduler = DDPMScheduler(**self.noise_config)
        self.set_sampler("ddpm")

    # -- configuration -----------------------------------------------------------------
    def config(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "architecture": self.architecture,
            "model": self.model_kwargs,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "horizon": self.horizon,
            "n_obs_steps": self.n_obs_steps,
            "n_action_steps": self.n_action_steps,
            "tasks": self.tasks,
            "noise_scheduler": self.noise_config,
            "provenance": self.provenance,
        }

    def set_sampler(self, kind: str = "ddpm", steps: int | None = None) -> "DiffusionPolicy":
        """Sample with DDPM (all training steps by default), DDIM or DPM-Solver++ (fewer steps)."""
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; expected one of {sorted(SAMPLERS)}")
        steps = steps or self.noise_config["num_train_timesteps"]
        if not 1 <= steps <= self.noise_config["num_train_timesteps"]:
            raise ValueError(f"sampler steps must be in [1, {self.noise_config['num_train_timesteps']}], got {steps}")
        self.sampler = SAMPLERS[kind].from_config(self.noise_scheduler.config)
        self.sampler_kind, self.num_inference_steps = kind, steps
        self.sampler.set_timesteps(steps)
        return self

    @property
    def device(self) -> torch.device:
        return self.obs_normalizer.scale.device

    # -- inputs ----------------------------------------------------------------------
    def _task_indices(self, task, batch: int) -> torch.Tensor | None:
        """Task names (one, or one per sample) or a tensor of task indices -> indices; None if single-task."""
        if len(self.tasks) <= 1:
            names = [] if task is None or isinstance(task, torch.Tensor) else [task] if isinstance(task, str) else task
            if any(name != self.tasks[0] for name in names) if self.tasks else names:
                raise ValueError(f"this policy was trained on {self.tasks or 'no named task'} only, not {task!r}")
            return None
        if task is None:
            raise ValueError(f"this policy is conditioned on the task; pass task= one of {self.tasks}")
        if isinstance(task, torch.Tensor):
            indices = task.to(self.device).reshape(-1)
            if indices.numel() != batch or indices.min() < 0 or indices.max() >= len(self.tasks):
                raise ValueError(f"task indices must be {batch} values in [0, {len(self.tasks)})")
            return indices
        names = [task] * batch if isinstance(task, str) else list(task)
        if len(names) != batch:
            raise ValueError(f"{len(names)} task names for a batch of {batch}")
        unknown = sorted(set(names) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this policy knows {self.tasks}")
        return torch.tensor([self.tasks.index(n) for n in names], device=self.device)

    def condition(self, obs: torch.Tensor | np.ndarray, task: str | Sequence[str] | None = None) -> torch.Tensor:
        """Normalised observation history (plus task one-hot) as the denoiser's condition ``[B, To, C]``."""
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        expected = (self.n_obs_steps, self.obs_dim)
        if obs.ndim != 3 or tuple(obs.shape[1:]) != expected:
            raise ValueError(f"observation history must have shape [batch, {expected[0]}, {expected[1]}], got {list(obs.shape)}")
        if not torch.isfinite(obs).all():
            raise ValueError("observation contains NaN or inf")
        cond = self.obs_normalizer(obs)
        tasks = self._task_indices(task, obs.shape[0])
        if tasks is not None:
            onehot = nn.functional.one_hot(tasks, len(self.tasks)).to(cond.dtype)
            cond = torch.cat([cond, onehot[:, None].expand(-1, self.n_obs_steps, -1)], dim=-1)
        return cond

    # -- training and inference ------------------------------------------------------
    def compute_loss(self, obs: torch.Tensor, actions: torch.Tensor, task=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE on a batch of (observation history, action chunk)."""
        cond = self.condition(obs, task)
        target = self.action_normalizer(actions.to(self.device))
        noise = torch.randn(target.shape, generator=generator, device=self.device)
        steps = torch.randint(0, self.noise_config["num_train_timesteps"], (target.shape[0],),
                              generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(target, noise, steps)
        return nn.functional.mse_loss(self.model(noisy, steps, cond), noise)

    @torch.no_grad()
    def predict_action(
        self,
        obs: torch.Tensor | np.ndarray,
        task: str | Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One sampling call: the ``[B, n_action_steps, action_dim]`` actions to execute next."""
        cond = self.condition(obs, task)
        bac.new_trajectory(self.model)
        self.sampler.set_timesteps(self.num_inference_steps)  # multistep solvers keep per-call state
        x = torch.randn((cond.shape[0], self.horizon, self.action_dim), generator=generator, device=self.device)
        for t in self.sampler.timesteps:
            x = self.sampler.step(self.model(x, t, cond), t, x, generator=generator).prev_sample
        return self.action_normalizer.inverse(x[:, : self.n_action_steps])

    def accelerate(self, schedule: bac.Plan | bac.Rule | bac.Method) -> bac.CacheHandle:
        """``bac.accelerate`` on the denoiser with a plan, rule or named method, checked against this sampler."""
        return bac.accelerate(self.model, schedule, num_steps=self.num_inference_steps, scheduler=self.sampler)

    # -- checkpoints -----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config(), indent=1) + "\n")
        return directory

    @classmethod
    def from_config(cls, config: dict) -> "DiffusionPolicy":
        config = dict(config)
        if config.pop("format", None) != CHECKPOINT_FORMAT:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint config")
        return cls(**config)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             expect: dict[str, Any] | None = None) -> "DiffusionPolicy":
        """Load a checkpoint directory; ``expect`` (e.g. ``{"architecture": "dpt"}``) must match its config."""
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{directory} is not a policy checkpoint (needs config.json and model.safetensors)")
        config = json.loads(config_path.read_text())
        for key, value in (expect or {}).items():
            if config.get(key) != value:
                raise ValueError(f"checkpoint {directory} has {key}={config.get(key)!r}, expected {value!r}")
        policy = cls.from_config(config)
        policy.load_weights(load_file(str(weights_path)))
        return policy.to(device).eval()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict, naming every missing, unexpected or mis-shaped tensor."""
        check_fits(self, state, f"this {self.architecture} policy")
        self.load_state_dict(state)
