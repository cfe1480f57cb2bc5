"""A policy batch, checked and turned into the denoiser's condition.

A batch is a dict of the features of :attr:`PolicyConfig.input_features`; every check raises
:class:`bac.DataError` naming the feature. The functions read only the config and the batch (and, for the
condition, the policy's normaliser, denoiser and language cache), so they keep no state between calls.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from bac.errors import ConfigError, DataError

from .config import PolicyConfig
from .constants import ACTION, IMAGE_PREFIX, STATE, TASK
from .language import LanguageCache
from .normalize import Normalizer
from .vla import random_shift

Batch = Mapping[str, Any]


def check_state(config: PolicyConfig, batch: Batch, device: torch.device, history: bool,
                state_only: bool = False) -> torch.Tensor:
    """The checked ``observation.state`` (``[B, n_obs_steps, D]`` with ``history``, else ``[B, D]``); every
    other input feature must be present too, unless ``state_only``."""
    features = config.input_features
    if not isinstance(batch, Mapping):
        raise DataError(f"a policy batch is a dict of features {sorted(features)}, got {type(batch).__name__}")
    missing = [name for name in (features if not state_only else [STATE]) if name not in batch]
    if missing:
        raise DataError(f"observation is missing feature(s) {missing}; this policy reads "
                        f"{ {n: f.type for n, f in features.items()} }")
    unknown = sorted(k for k in batch if k.startswith("observation.") and k not in features)
    if unknown:
        raise DataError(f"this policy does not read {unknown}; its observation features are "
                        f"{sorted(n for n in features if n.startswith('observation.'))}")
    _refuse_non_real(STATE, batch[STATE])
    try:
        state = torch.as_tensor(batch[STATE], dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"feature {STATE!r} is not a numeric array: {err}") from err
    expected = [config.n_obs_steps, config.state_dim] if history else [config.state_dim]
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


def _refuse_non_real(name: str, value: Any) -> None:
    """Refuse boolean and complex arrays, which a cast to float would silently turn into other numbers."""
    if isinstance(value, torch.Tensor):
        kind = "boolean" if value.dtype == torch.bool else "complex" if value.is_complex() else None
    else:
        try:
            kind = {"b": "boolean", "c": "complex"}.get(np.asarray(value).dtype.kind)
        except (TypeError, ValueError, RuntimeError):  # ragged or not numbers: the cast names the problem
            kind = None
    if kind:
        raise DataError(f"feature {name!r} is a {kind} array; it must hold real numbers (float32)")


def check_actions(config: PolicyConfig, batch: Batch, device: torch.device, size: int) -> torch.Tensor:
    """A training batch's ``action`` chunks ``[size, horizon, action_dim]``."""
    shape = f"[batch, {config.horizon}, {config.action_dim}]"
    if ACTION not in batch:
        raise DataError(f"a training batch needs the feature {ACTION!r} {shape}")
    actions = torch.as_tensor(batch[ACTION], dtype=torch.float32, device=device)
    if list(actions.shape[1:]) != [config.horizon, config.action_dim] or actions.shape[0] != size:
        raise DataError(f"feature {ACTION!r} must have shape {shape}, got {list(actions.shape)} "
                        f"(observations: batch {size})")
    return actions


def check_num_actions(config: PolicyConfig, num_actions: int | None) -> int:
    """How many of a chunk's actions a call returns: ``num_actions``, or ``n_action_steps`` for None."""
    if num_actions is None:
        return config.n_action_steps
    if isinstance(num_actions, bool) or not isinstance(num_actions, (int, np.integer)) \
            or not 1 <= num_actions <= config.horizon:
        raise ConfigError(f"num_actions must be an integer in [1, horizon={config.horizon}] (or None for "
                          f"n_action_steps={config.n_action_steps}), got {num_actions!r}")
    return int(num_actions)


def check_shift(shift: Any) -> int:
    """A warm start's ``shift`` (actions of the last chunk run since its observation): an integer >= 0."""
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or shift < 0:
        raise ConfigError(f"shift must be an integer >= 0 (actions of the last chunk executed since its "
                          f"observation), got {shift!r}")
    return int(shift)


def task_indices(config: PolicyConfig, task: Any, size: int, device: torch.device) -> torch.Tensor | None:
    """Task names (one, or one per sample) or a tensor of task indices -> indices; None without one-hot."""
    if TASK not in config.input_features:
        return None
    tasks = list(config.tasks)
    if isinstance(task, torch.Tensor):
        if task.is_floating_point() or task.is_complex() or task.dtype == torch.bool:
            raise DataError(f"feature {TASK!r}: task indices must be an integer tensor, got {task.dtype}")
        indices = task.to(device=device, dtype=torch.long).reshape(-1)  # one_hot takes int64 only
        if indices.numel() != size or indices.min() < 0 or indices.max() >= len(tasks):
            raise DataError(f"feature {TASK!r}: task indices must be {size} values in [0, {len(tasks)})")
        return indices if config.conditions_on_task else None
    try:
        names = [task] * size if isinstance(task, str) else list(task)
    except TypeError:  # not iterable (a number, None)
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise DataError(f"feature {TASK!r} must be a task name or one name per sample, got {task!r}")
    if len(names) != size:
        raise DataError(f"feature {TASK!r}: {len(names)} task names for a batch of {size}")
    unknown = sorted(set(names) - set(tasks))
    if unknown:
        raise DataError(f"feature {TASK!r}: unknown task(s) {unknown}; this policy was trained on {tasks}")
    if not config.conditions_on_task:
        return None
    return torch.tensor([tasks.index(n) for n in names], device=device)


def check_images(config: PolicyConfig, batch: Batch, device: torch.device) -> torch.Tensor:
    """The cameras' images ``[B, n_cameras, 3, S, S]`` (float in [0, 1]), checked."""
    size = config.model.image_size
    images = []
    for camera in config.cameras:
        name = IMAGE_PREFIX + camera
        _refuse_non_real(name, batch[name])
        try:
            image = torch.as_tensor(batch[name], device=device)
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


def check_instructions(batch: Batch, size: int) -> list[str]:
    """A VLA head's free-text instructions, one per sample."""
    task = batch.get(TASK)
    names = [task] * size if isinstance(task, str) else task
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"feature {TASK!r} of a vision-language-action policy is an instruction (a string, or one "
                        f"per sample), got {task!r}")
    if len(names) != size:
        raise DataError(f"feature {TASK!r}: {len(names)} instructions for a batch of {size}")
    return list(names)


def condition(config: PolicyConfig, state: torch.Tensor, batch: Batch, obs_normalizer: Normalizer,
              model: nn.Module, language: LanguageCache | None, augment: bool = False,
              generator: torch.Generator | None = None) -> Any:
    """The denoiser's condition of a checked observation history ``state``: the normalised state
    ``[B, n_obs_steps, C]`` (plus the task one-hot for a multi-task policy), or for a VLA head its
    observation prefix (``model.encode_prefix``: images, instruction, state). ``augment`` (training)
    shifts a VLA head's images at random, drawn from ``generator``."""
    device = state.device
    cond = obs_normalizer(state)
    if config.is_vla:
        images = check_images(config, batch, device)
        if images.shape[0] != state.shape[0]:
            raise DataError(f"images have batch {images.shape[0]}, {STATE!r} has {state.shape[0]}")
        if augment and config.model.crop_pad:
            images = random_shift(images.flatten(0, 1), config.model.crop_pad, generator).unflatten(0, images.shape[:2])
        tokens, mask = language(check_instructions(batch, state.shape[0]), device)
        return model.encode_prefix({"images": images, "language": tokens, "language_mask": mask, "state": cond})
    tasks = task_indices(config, batch.get(TASK), state.shape[0], device)
    if tasks is not None:
        onehot = nn.functional.one_hot(tasks, len(config.tasks)).to(cond.dtype)
        cond = torch.cat([cond, onehot[:, None].expand(-1, config.n_obs_steps, -1)], dim=-1)
    return cond
