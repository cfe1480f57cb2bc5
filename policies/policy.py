"""A diffusion policy with LeRobot's interface: denoiser, normalisation, diffusers noise schedules, checkpoints.

:class:`DiffusionPolicy` has ``PreTrainedPolicy``'s interface without depending on LeRobot: ``reset()``,
``predict_action_chunk(batch)`` (one sampling call on the observation history) and ``select_action(batch)``
(the next action for the current observation, from a queue of ``n_action_steps``). A batch is a dict of the
features of :attr:`PolicyConfig.input_features`; a bad one raises :class:`bac.DataError` naming the feature.
Checkpoints are ``model.safetensors`` + ``config.json``, checked on load (:mod:`bac.policies.checkpointing`).
The interface in full: docs/guide/policies.md ("The policy interface").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

import bac
from bac.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from bac.sampling import FusedSampler

from .checkpointing import CheckpointNotFoundError, check_fits, nonfinite_tensors, read_weights, save_weights
from .config import ACTION, IMAGE_PREFIX, STATE, TASK, WEIGHTS_FILE, PolicyConfig, PolicyFeature, read_config
from .dit import DiTPolicyHead
from .dpt import TransformerForDiffusion
from .features import next_history
from .gr00t import GR00THead
from .language import CACHE_FILE, LanguageCache
from .pi0 import Pi0Head
from .rdt import RDTHead
from .vla import random_shift

ARCHITECTURES = {"dpt": TransformerForDiffusion, "dit": DiTPolicyHead, "gr00t": GR00THead, "rdt": RDTHead,
                 "pi0": Pi0Head}
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
            "flow": FlowMatchEulerDiscreteScheduler}
FLOW_SAMPLERS = ("flow",)
#: The sampler a policy starts with: all training steps of DDPM, or the head's published default
#: (GR00T N1: 4 Euler steps; pi0: 10; RDT-1B: DPM-Solver++ at 20).
DEFAULT_SAMPLERS = {"gr00t": ("flow", 4), "pi0": ("flow", 10), "rdt": ("dpm", 20)}
Batch = Mapping[str, Any]
ON_NONFINITE = ("raise", "hold")
# Normalised inputs live in [-1, 1] on the training data; this many times that range is no longer an
# unusual observation but a unit error or a broken sensor (named only when the actions come out non-finite).
EXTREME = 1e6


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
    """``DiffusionPolicy(config, on_nonfinite="raise")``: a :class:`PolicyConfig` (``PolicyConfig.build(...)``
    or a checkpoint's); ``on_nonfinite`` is ``"raise"`` or ``"hold"``.

    Every sampled chunk is checked once (``torch.isfinite(actions).all()``). Non-finite actions raise
    :class:`bac.NonFiniteError`, which says which inputs are far outside the training range (beyond
    ``EXTREME`` times the normaliser's range; such values are not refused before sampling, only named when
    the output is bad) and whether any weight is non-finite (checked only then). With
    ``on_nonfinite="hold"``, :meth:`select_action` instead repeats the last finite action of each failed
    sample for that chunk and appends the event to :attr:`nonfinite_events`; it still raises when a sample
    has no finite action since :meth:`reset`. :meth:`predict_action_chunk` always raises.

    :meth:`save` writes ``model.safetensors`` (EMA weights and the normalisation statistics, with the
    config's architecture fingerprint in its metadata) and ``config.json`` (:class:`PolicyConfig`, with the
    weights file's sha256); :meth:`load` checks both, unpickles nothing, and names the file in every
    :class:`bac.CheckpointError`.
    """

    name = "diffusion"

    def __init__(self, config: PolicyConfig, *legacy: Any, on_nonfinite: str = "raise", **legacy_kwargs: Any):
        if not isinstance(config, PolicyConfig) or legacy or legacy_kwargs:
            raise TypeError("DiffusionPolicy(config) takes one PolicyConfig: DiffusionPolicy(PolicyConfig.build("
                            "architecture, model, state_dim=..., action_dim=..., tasks=[...], horizon=..., ...)), "
                            f"got {type(config).__name__}" + (" and more arguments" if legacy or legacy_kwargs else ""))
        super().__init__()
        self.config = config
        sizes = ({"state_dim": config.state_dim} if config.is_vla else {"cond_dim": config.cond_dim})
        self.model = ARCHITECTURES[config.architecture](
            action_dim=config.action_dim, horizon=config.horizon, n_obs_steps=config.n_obs_steps,
            **sizes, **self.model_kwargs,
        )
        self.obs_normalizer = Normalizer(config.state_dim)
        self.action_normalizer = Normalizer(config.action_dim)
        if config.is_flow:
            self.noise_scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=config.noise_scheduler.num_train_timesteps, shift=config.noise_scheduler.shift)
        else:
            self.noise_scheduler = DDPMScheduler(**self.noise_config)
        # A VLA head reads free-text instructions: their frozen language tokens, encoded once each.
        self.language = LanguageCache() if config.is_vla else None
        self.set_sampler(*DEFAULT_SAMPLERS.get(config.architecture, ("ddpm", None)))
        self.on_nonfinite = on_nonfinite
        # Chunks held by on_nonfinite="hold": {"samples": [...], "message": ...}; kept across reset() so the
        # runtime can report them after an episode.
        self.nonfinite_events: list[dict] = []
        self.reset()

    # -- configuration -----------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def model_kwargs(self) -> dict:
        """The typed model config as a plain dict (reports, plan descriptions)."""
        return {k: getattr(self.config.model, k) for k in self.config.model.__dataclass_fields__}

    @property
    def input_features(self) -> dict[str, PolicyFeature]:
        return self.config.input_features

    @property
    def output_features(self) -> dict[str, PolicyFeature]:
        return self.config.output_features

    @property
    def obs_dim(self) -> int:
        return self.config.state_dim

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def n_obs_steps(self) -> int:
        return self.config.n_obs_steps

    @property
    def n_action_steps(self) -> int:
        return self.config.n_action_steps

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def noise_config(self) -> dict:
        return self.config.noise_scheduler.to_dict()

    @property
    def cameras(self) -> tuple[str, ...]:
        return self.config.cameras

    @property
    def on_nonfinite(self) -> str:
        """What :meth:`select_action` does with a non-finite chunk: ``"raise"`` or ``"hold"``."""
        return self._on_nonfinite

    @on_nonfinite.setter
    def on_nonfinite(self, value: str) -> None:
        if value not in ON_NONFINITE:
            raise ConfigError(f"on_nonfinite must be one of {ON_NONFINITE}, got {value!r}")
        self._on_nonfinite = value

    @property
    def provenance(self) -> dict:
        return self.config.provenance

    @provenance.setter
    def provenance(self, value: dict) -> None:
        self.config = self.config.replace(provenance=dict(value))

    def set_sampler(self, kind: str = "ddpm", steps: int | None = None) -> "DiffusionPolicy":
        """Sample with DDPM (all training steps by default), DDIM or DPM-Solver++ (fewer steps); a
        flow-matching policy with flow-matching Euler steps (``"flow"``; steps required)."""
        if kind not in SAMPLERS:
            raise ConfigError(f"unknown sampler {kind!r}; expected one of {sorted(SAMPLERS)}")
        if (kind in FLOW_SAMPLERS) != self.config.is_flow:
            trained = "flow matching" if self.config.is_flow else "DDPM"
            allowed = list(FLOW_SAMPLERS) if self.config.is_flow else sorted(set(SAMPLERS) - set(FLOW_SAMPLERS))
            raise ConfigError(f"sampler {kind!r} does not fit a policy trained with {trained}; use one of {allowed}")
        if kind in FLOW_SAMPLERS and steps is None:
            raise ConfigError("a flow-matching sampler needs its number of steps (e.g. set_sampler('flow', 10))")
        train_steps = self.config.noise_scheduler.num_train_timesteps
        if steps is None:
            steps = train_steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ConfigError(f"sampler steps must be an integer, got {steps!r}")
        if not 1 <= steps <= train_steps:
            raise ConfigError(f"sampler steps must be in [1, {train_steps}], got {steps}")
        sampler = SAMPLERS[kind].from_config(self.noise_scheduler.config)
        sampler.set_timesteps(steps)
        values, counts = sampler.timesteps.unique(return_counts=True)
        if (counts > 1).any():  # e.g. DPM-Solver++ at 100 of 100 training steps: NaN actions from there on
            raise ConfigError(f"sampler {kind!r} with {steps} steps repeats timestep(s) "
                              f"{values[counts > 1].tolist()} (diffusers' spacing for this step count); "
                              "choose another step count")
        self.sampler, self.sampler_kind, self.num_inference_steps = sampler, kind, steps
        self.fused_sampler = FusedSampler(sampler)
        return self

    @property
    def device(self) -> torch.device:
        return self.obs_normalizer.scale.device

    # -- inputs ----------------------------------------------------------------------
    def _state(self, batch: Batch, history: bool, state_only: bool = False) -> torch.Tensor:
        """The checked ``observation.state``; every other input feature must be present too, unless ``state_only``."""
        if not isinstance(batch, Mapping):
            raise DataError(f"a policy batch is a dict of features {sorted(self.input_features)}, "
                            f"got {type(batch).__name__}")
        missing = [name for name in (self.input_features if not state_only else [STATE]) if name not in batch]
        if missing:
            raise DataError(f"observation is missing feature(s) {missing}; this policy reads "
                            f"{ {n: f.type for n, f in self.input_features.items()} }")
        unknown = sorted(k for k in batch if k.startswith("observation.") and k not in self.input_features)
        if unknown:
            raise DataError(f"this policy does not read {unknown}; its observation features are "
                            f"{sorted(n for n in self.input_features if n.startswith('observation.'))}")
        try:
            state = torch.as_tensor(batch[STATE], dtype=torch.float32, device=self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"feature {STATE!r} is not a numeric array: {err}") from err
        expected = [self.n_obs_steps, self.obs_dim] if history else [self.obs_dim]
        if state.ndim != len(expected) + 1 or list(state.shape[1:]) != expected:
            where = "observation history" if history else "current observation"
            raise DataError(f"feature {STATE!r} ({where}) must have shape [batch, {', '.join(map(str, expected))}], "
                            f"got {list(state.shape)}")
        if state.shape[0] == 0:
            raise DataError(f"feature {STATE!r} has batch size 0 (shape {list(state.shape)}): "
                            "a policy call needs at least one observation")
        finite = torch.isfinite(state)
        if not finite.all():
            samples = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
            raise DataError(f"feature {STATE!r} contains NaN or inf in sample(s) {samples[:8]} (float32: finite "
                            "values beyond 3.4e38 overflow to inf)")
        return state

    def _task_indices(self, task, batch: int) -> torch.Tensor | None:
        """Task names (one, or one per sample) or a tensor of task indices -> indices; None without one-hot."""
        if TASK not in self.input_features:
            return None
        if isinstance(task, torch.Tensor):
            indices = task.to(self.device).reshape(-1)
            if indices.numel() != batch or indices.min() < 0 or indices.max() >= len(self.tasks):
                raise DataError(f"feature {TASK!r}: task indices must be {batch} values in [0, {len(self.tasks)})")
            return indices if self.config.conditions_on_task else None
        try:
            names = [task] * batch if isinstance(task, str) else list(task)
        except TypeError:  # not iterable (a number, None)
            names = None
        if names is None or not all(isinstance(n, str) for n in names):
            raise DataError(f"feature {TASK!r} must be a task name or one name per sample, got {task!r}")
        if len(names) != batch:
            raise DataError(f"feature {TASK!r}: {len(names)} task names for a batch of {batch}")
        unknown = sorted(set(names) - set(self.tasks))
        if unknown:
            raise DataError(f"feature {TASK!r}: unknown task(s) {unknown}; this policy was trained on {self.tasks}")
        if not self.config.conditions_on_task:
            return None
        return torch.tensor([self.tasks.index(n) for n in names], device=self.device)

    def condition(self, batch: Batch) -> Any:
        """The denoiser's condition of a batch with the stacked observation history: normalised
        ``observation.state`` ``[B, n_obs_steps, C]`` (plus the task one-hot for a multi-task policy), or
        for a VLA head its observation prefix (``policies.vla.Prefix``: images, instruction, state)."""
        return self._condition(self._state(batch, history=True), batch)

    def _images(self, batch: Batch, size: int) -> torch.Tensor:
        """The cameras' images ``[B, n_cameras, 3, S, S]`` (float in [0, 1]), checked."""
        images = []
        for camera in self.cameras:
            name = IMAGE_PREFIX + camera
            try:
                image = torch.as_tensor(batch[name], device=self.device)
            except (TypeError, ValueError, RuntimeError) as err:
                raise DataError(f"feature {name!r} is not a numeric array: {err}") from err
            if image.dtype == torch.uint8:
                raise DataError(f"feature {name!r} is uint8: images are float [batch, 3, H, W] in [0, 1] "
                                "(LeRobot's layout; bac.policies.vla.frames_to_images converts rendered frames)")
            if image.ndim != 4 or list(image.shape[1:]) != [3, size, size]:
                raise DataError(f"feature {name!r} must have shape [batch, 3, {size}, {size}], got {list(image.shape)}")
            image = image.float()
            if not torch.isfinite(image).all():
                raise DataError(f"feature {name!r} contains NaN or inf")
            if image.min() < 0 or image.max() > 1:
                raise DataError(f"feature {name!r} has values in [{image.min().item():.3g}, {image.max().item():.3g}]; "
                                "images are in [0, 1]")
            images.append(image)
        return torch.stack(images, 1)

    def _instructions(self, batch: Batch, size: int) -> list[str]:
        task = batch.get(TASK)
        names = [task] * size if isinstance(task, str) else task
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
            raise DataError(f"feature {TASK!r} of a vision-language-action policy is an instruction (a string, or one "
                            f"per sample), got {task!r}")
        if len(names) != size:
            raise DataError(f"feature {TASK!r}: {len(names)} instructions for a batch of {size}")
        return list(names)

    def _condition(self, state: torch.Tensor, batch: Batch, generator: torch.Generator | None = None) -> Any:
        """``generator`` draws the image augmentation of a VLA head in training."""
        cond = self.obs_normalizer(state)
        if self.config.is_vla:
            images = self._images(batch, self.config.model.image_size)
            if images.shape[0] != state.shape[0]:
                raise DataError(f"images have batch {images.shape[0]}, {STATE!r} has {state.shape[0]}")
            if self.training and self.config.model.crop_pad:
                pad = self.config.model.crop_pad
                images = random_shift(images.flatten(0, 1), pad, generator).unflatten(0, images.shape[:2])
            language, mask = self.language(self._instructions(batch, state.shape[0]), self.device)
            return self.model.encode_prefix({"images": images, "language": language, "language_mask": mask,
                                             "state": cond})
        tasks = self._task_indices(batch.get(TASK), state.shape[0])
        if tasks is not None:
            onehot = nn.functional.one_hot(tasks, len(self.tasks)).to(cond.dtype)
            cond = torch.cat([cond, onehot[:, None].expand(-1, self.n_obs_steps, -1)], dim=-1)
        return cond

    # -- training --------------------------------------------------------------------
    def compute_loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE on a batch of observation histories and ``action`` chunks ``[B, horizon, A]``.

        ``batch["task"]`` may also be a tensor of indices into :attr:`tasks` (the trainer's form).
        """
        state = self._state(batch, history=True)
        cond = self._condition(state, batch, generator)
        if ACTION not in batch:
            raise DataError(f"a training batch needs the feature {ACTION!r} [batch, {self.horizon}, {self.action_dim}]")
        actions = torch.as_tensor(batch[ACTION], dtype=torch.float32, device=self.device)
        if list(actions.shape[1:]) != [self.horizon, self.action_dim] or actions.shape[0] != state.shape[0]:
            raise DataError(f"feature {ACTION!r} must have shape [batch, {self.horizon}, {self.action_dim}], "
                            f"got {list(actions.shape)} (observations: batch {state.shape[0]})")
        target = self.action_normalizer(actions)
        noise = torch.randn(target.shape, generator=generator, device=self.device)
        train_steps = self.config.noise_scheduler.num_train_timesteps
        if self.config.is_flow:
            # pi0's time distribution: s = 0.001 + 0.999 * Beta(1.5, 1), drawn as U ** (1 / 1.5) (Beta(a, 1)'s inverse CDF)
            u = torch.rand(target.shape[0], generator=generator, device=self.device)
            s = (0.001 + 0.999 * u ** (1 / 1.5))[:, None, None]
            noisy = (1 - s) * target + s * noise
            return nn.functional.mse_loss(self.model(noisy, s.flatten() * train_steps, cond), noise - target)
        steps = torch.randint(0, train_steps, (target.shape[0],), generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(target, noise, steps)
        goal = target if self.config.noise_scheduler.prediction_type == "sample" else noise
        return nn.functional.mse_loss(self.model(noisy, steps, cond), goal)

    # -- inference -------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new episode: forget the observation history, the queued actions and the last action
        (which ``on_nonfinite="hold"`` would repeat). :attr:`nonfinite_events` is kept."""
        self._history: torch.Tensor | None = None
        self._queue: list[torch.Tensor] = []
        self._last_action: torch.Tensor | None = None

    def _sample(self, batch: Batch, generator: torch.Generator | None,
                num_actions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked observation history and the first ``num_actions`` (default ``n_action_steps``) sampled,
        unchecked actions ``[B, num_actions, A]``. The whole horizon is sampled either way, so the noise drawn
        from ``generator`` and the first actions do not depend on ``num_actions``."""
        num_actions = self._num_actions(num_actions)
        state = self._state(batch, history=True)
        cond = self._condition(state, batch)  # for a VLA head: the prefix, encoded once per call
        bac.new_trajectory(self.model)
        sampler = self.fused_sampler
        sampler.start()  # multistep solvers keep per-call state
        prepared = self.model.prepare(cond, sampler.timesteps)  # per-call invariants, computed once
        x = torch.randn((state.shape[0], self.horizon, self.action_dim), generator=generator, device=self.device)
        for i, t in enumerate(sampler.timesteps):
            x = sampler.step(i, self.model(x, t, cond, prepared=prepared[i]), x, generator=generator)
        return state, self.action_normalizer.inverse(x[:, :num_actions])

    def _num_actions(self, num_actions: int | None) -> int:
        if num_actions is None:
            return self.n_action_steps
        if isinstance(num_actions, bool) or not isinstance(num_actions, (int, np.integer)) \
                or not 1 <= num_actions <= self.horizon:
            raise ConfigError(f"num_actions must be an integer in [1, horizon={self.horizon}] (or None for "
                              f"n_action_steps={self.n_action_steps}), got {num_actions!r}")
        return int(num_actions)

    @torch.no_grad()
    def predict_action_chunk(self, batch: Batch, generator: torch.Generator | None = None,
                             num_actions: int | None = None) -> torch.Tensor:
        """One sampling call: the ``[B, num_actions, action_dim]`` actions to execute next.

        ``batch["observation.state"]`` is the observation history ``[B, n_obs_steps, D]``. ``num_actions``:
        how many of the chunk's ``horizon`` actions to return (default ``n_action_steps``, the receding
        horizon's; a real-time controller takes all of them to execute past a late chunk); a value outside
        ``[1, horizon]`` is a :class:`bac.ConfigError`. Non-finite actions (among those returned) raise
        :class:`bac.NonFiniteError` (whatever :attr:`on_nonfinite` says; see :class:`DiffusionPolicy`), with the
        chunk in ``err.actions`` and the failed samples in ``err.samples``.
        """
        state, actions = self._sample(batch, generator, num_actions)
        if not torch.isfinite(actions).all():  # the guard: one reduction per chunk; diagnosis only on failure
            raise self._nonfinite_error(state, actions)
        return actions

    @torch.no_grad()
    def _nonfinite_error(self, state: torch.Tensor, actions: torch.Tensor) -> NonFiniteError:
        """Why a chunk is not finite: which samples, which inputs are extreme, which weights are non-finite."""
        bad = ~torch.isfinite(actions).flatten(1).all(1)
        samples = bad.nonzero().flatten().tolist()
        parts = [f"policy produced non-finite actions (NaN/inf) for sample(s) {samples[:8]} of {len(bad)}"]
        normalised = self.obs_normalizer(state).abs().nan_to_num(nan=float("inf"))  # 1 = the training range
        extreme = normalised > EXTREME
        if extreme.any():
            dims = extreme.flatten(0, 1).any(0).nonzero().flatten().tolist()
            rows = extreme.flatten(1).any(1).nonzero().flatten().tolist()
            parts.append(f"input {STATE!r} is far outside the training range in sample(s) {rows[:8]}, dims "
                         f"{dims[:8]}: up to {state.abs().max().item():.3g} raw, {normalised.max().item():.3g} "
                         f"times the normaliser's range (limit {EXTREME:g}); check units and sensors")
        else:
            parts.append(f"inputs are finite and within {EXTREME:g} times the training range")
        weights = nonfinite_tensors(self.state_dict())
        if weights:
            parts.append(f"NaN/inf in {len(weights)} weight tensor(s) {weights[:6]}: the weights are corrupt")
        else:
            parts.append("every weight is finite")
        if bac.get_handle(self.model) is not None:
            parts.append("a bac cache is active on the denoiser: run without it to see whether caching causes this")
        err = NonFiniteError("; ".join(parts))
        err.actions, err.samples = actions, samples
        return err

    @torch.no_grad()
    def select_action(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next action ``[B, action_dim]`` for the current observation ``observation.state`` ``[B, D]``.

        Keeps the last ``n_obs_steps`` observations (the first one repeated after
        :meth:`reset`) and samples a new chunk only when the queue is empty. A non-finite
        chunk raises :class:`bac.NonFiniteError`, or with ``on_nonfinite="hold"`` is replaced,
        for the failed samples, by their last action (repeated for that chunk; the event goes
        to :attr:`nonfinite_events`); hold raises too when a failed sample has no last action
        since :meth:`reset`.
        """
        # Between chunks only the state is read (for the history): a runtime may leave out the images then
        # (see chunk_due), which saves rendering them at every step.
        state = self._state(batch, history=False, state_only=not self.chunk_due)
        if self._history is not None and self._history.shape[0] != state.shape[0]:
            raise DataError(f"feature {STATE!r}: batch of {state.shape[0]} observations after "
                            f"{self._history.shape[0]}; call reset() before a new batch of episodes")
        self._history = next_history(self._history, state, self.n_obs_steps)
        if not self._queue:
            try:
                chunk = self.predict_action_chunk({**batch, STATE: self._history}, generator=generator)
            except NonFiniteError as err:
                if self.on_nonfinite != "hold" or getattr(err, "actions", None) is None:
                    raise
                chunk = self._hold(err)
            self._queue = list(chunk.unbind(1))
        self._last_action = self._queue.pop(0)
        return self._last_action

    @property
    def chunk_due(self) -> bool:
        """Whether the next :meth:`select_action` samples a new chunk (and so reads every feature, images included)."""
        return not self._queue

    @property
    def reads_instructions(self) -> bool:
        """Whether ``task`` is a free-text instruction (a VLA head) rather than one of :attr:`tasks`."""
        return self.config.is_vla

    def _hold(self, err: NonFiniteError) -> torch.Tensor:
        """``err``'s chunk with each failed sample's rows replaced by that sample's last action."""
        if self._last_action is None:
            raise NonFiniteError(f"{err}; on_nonfinite='hold' has no finite action to hold "
                                 "(this is the first chunk since reset())") from err
        chunk = err.actions.clone()
        chunk[err.samples] = self._last_action[err.samples, None].expand(-1, chunk.shape[1], -1)
        self.nonfinite_events.append({"samples": list(err.samples), "message": str(err)})
        return chunk

    def accelerate(self, schedule: bac.Plan | bac.Rule | bac.Method) -> bac.CacheHandle:
        """``bac.accelerate`` on the denoiser with a plan, rule or named method, checked against this sampler."""
        return bac.accelerate(self.model, schedule, num_steps=self.num_inference_steps, scheduler=self.sampler)

    def use_tuned(self, path: str | Path) -> bac.CacheHandle | None:
        """Apply a ``python -m bac.tune`` result (``tuned.json``): its sampler and plan, in one line.

        Returns the cache handle (``None`` when the tuned pick is a plain sampler)."""
        from .tuned import TunedConfig

        return TunedConfig.load(path).apply(self)

    # -- checkpoints -----------------------------------------------------------------
    def save(self, directory: str | Path, half: bool = False) -> Path:
        """Write ``model.safetensors`` (with the architecture fingerprint) and ``config.json`` (with the
        weights' sha256). Each file is replaced atomically, weights first: a crash in between leaves
        a checkpoint whose sha256 does not match, which :meth:`load` refuses.

        ``half``: store the denoiser's floating-point weights as float16 (half the bytes; the normalisers
        stay float32); :meth:`load` casts them back to float32, so a policy computes in float32 either way."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if half:
            state = {k: v.half() if k.startswith("model.") and v.is_floating_point() else v for k, v in state.items()}
        record = save_weights(state, directory / WEIGHTS_FILE, self.config)
        self.config.save(directory / "config.json", weights=record)
        if self.language is not None and len(self.language):
            self.language.save(directory / CACHE_FILE)  # the instructions' tokens: no language model needed for them
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             expect: dict[str, Any] | None = None, on_nonfinite: str = "raise") -> "DiffusionPolicy":
        """Load a checkpoint directory; ``expect`` (e.g. ``{"architecture": "dpt"}``) must match its config.

        Every failure is a :class:`bac.CheckpointError` naming the file: a missing file
        (also a ``FileNotFoundError``), a bad ``config.json``, unreadable or truncated weights,
        weights that do not fit the config (names, shapes, the fingerprint of the config they
        were saved with), a sha256 that differs from the one ``config.json`` records, NaN/inf
        weights. Checkpoints saved before the sha256 and fingerprint existed load without those
        two checks (nothing to compare with); ``load(d).save(d)`` adds them.
        """
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / WEIGHTS_FILE
        missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{directory} is not a policy checkpoint (needs config.json and "
                                          f"{WEIGHTS_FILE}; missing {missing})")
        config, record = read_config(config_path)
        stored = config.to_dict()
        for key, value in (expect or {}).items():
            if stored.get(key) != value:
                raise CheckpointError(f"checkpoint {directory} has {key}={stored.get(key)!r}, expected {value!r}")
        policy = cls(config, on_nonfinite=on_nonfinite)
        state = read_weights(weights_path, config, record, policy, f"this {config.architecture} policy")
        policy.load_state_dict(state)
        if policy.language is not None and (directory / CACHE_FILE).is_file():
            policy.language = LanguageCache.load(directory / CACHE_FILE)
        return policy.to(device).eval()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict, naming every missing, unexpected or mis-shaped tensor (:class:`bac.CheckpointError`)."""
        check_fits(self, state, f"this {self.architecture} policy")
        self.load_state_dict(state)
