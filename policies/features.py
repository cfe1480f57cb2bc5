"""A policy's features, what runtimes share with the policies without loading a model.

The feature spec: :class:`PolicyFeature` (name, type, shape) for each input and output, named by the keys of
:mod:`policies.constants`; and the observation-history rule (:func:`next_history`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from bac.errors import ConfigError

from .config_fields import is_kind
from .constants import ACTION, IMAGE_PREFIX, STATE, TASK

FEATURE_TYPES = ("state", "image", "language", "action")


@dataclass(frozen=True)
class PolicyFeature:
    """One named input or output: ``type`` is state, image, language or action; ``shape`` excludes batch and time.

    ``shape`` is ``(D,)`` for state and action vectors, ``(C, H, W)`` for images and
    ``()`` for a language string.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    keys: tuple[str, ...] | None = None  # state only: the named observation parts it concatenates (None: all)

    def __post_init__(self) -> None:
        if self.keys is not None:
            if self.type != "state" or isinstance(self.keys, str) or not self.keys or not all(
                    isinstance(k, str) and k for k in self.keys):
                raise ConfigError(f"feature {self.name!r}: keys are a non-empty list of observation names, for a "
                                  f"state feature only; got {self.keys!r}")
            object.__setattr__(self, "keys", tuple(self.keys))
        if self.type not in FEATURE_TYPES:
            raise ConfigError(f"feature {self.name!r}: type must be one of {FEATURE_TYPES}, got {self.type!r}")
        shape = self.shape
        if not isinstance(shape, (tuple, list)) or not all(is_kind(n, int) and n >= 1 for n in shape):
            raise ConfigError(f"feature {self.name!r}: shape must be a list of positive ints, got {shape!r}")
        object.__setattr__(self, "shape", tuple(shape))
        expected_rank = {"state": 1, "action": 1, "image": 3, "language": 0}[self.type]
        if len(self.shape) != expected_rank:
            raise ConfigError(f"feature {self.name!r}: a {self.type} feature has {expected_rank} dimension(s), "
                             f"got shape {list(self.shape)}")
        expected_name = {"state": STATE, "action": ACTION, "language": TASK}.get(self.type)
        if expected_name and self.name != expected_name:
            raise ConfigError(f"a {self.type} feature must be named {expected_name!r}, got {self.name!r}")
        if self.type == "image" and (not self.name.startswith(IMAGE_PREFIX) or self.name == IMAGE_PREFIX):
            raise ConfigError(f"an image feature must be named {IMAGE_PREFIX}<camera>, got {self.name!r}")

    def to_dict(self) -> dict:
        data = {"type": self.type, "shape": list(self.shape)}
        if self.keys is not None:  # absent otherwise, so older configs keep their fingerprint
            data["keys"] = list(self.keys)
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "PolicyFeature":
        if not isinstance(data, Mapping) or not {"type", "shape"} <= set(data) <= {"type", "shape", "keys"}:
            raise ConfigError(f"feature {name!r} must be {{'type': ..., 'shape': [...]}} (a state may add "
                              f"'keys': [...]), got {data!r}")
        return cls(name, data["type"], data["shape"], data.get("keys"))


def state_features(state_dim: int, tasks: Sequence[str] = (), keys: Sequence[str] | None = None) -> dict[str, PolicyFeature]:
    """Inputs of a state-based policy: ``observation.state`` ``(state_dim,)``, and ``task`` if it knows tasks."""
    features = {STATE: PolicyFeature(STATE, "state", (state_dim,), None if keys is None else tuple(keys))}
    if tasks:
        features[TASK] = PolicyFeature(TASK, "language", ())
    return features


def image_features(cameras: Sequence[str], size: int) -> dict[str, PolicyFeature]:
    """``observation.images.<camera>`` ``(3, size, size)`` per camera (float in [0, 1], LeRobot's layout)."""
    return {IMAGE_PREFIX + c: PolicyFeature(IMAGE_PREFIX + c, "image", (3, size, size)) for c in cameras}


def action_features(action_dim: int) -> dict[str, PolicyFeature]:
    return {ACTION: PolicyFeature(ACTION, "action", (action_dim,))}


def next_history(history: torch.Tensor | None, state: torch.Tensor, n_obs_steps: int) -> torch.Tensor:
    """The last ``n_obs_steps`` observations ``[B, n_obs_steps, D]`` once ``state`` ``[B, D]`` arrives; after a
    reset (``history`` is None) the first observation repeated, as training windows are padded. The one rule
    for every runtime that keeps a history (``select_action``, the control loop, the policy server)."""
    if history is None:
        return state[:, None].expand(-1, n_obs_steps, -1).clone()
    return torch.cat([history[:, 1:], state[:, None]], dim=1)
