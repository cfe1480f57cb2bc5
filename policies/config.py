"""The policy's config, as stored in a checkpoint's ``config.json``: :class:`PolicyConfig`, the documented home.

A policy declares what it reads and writes as named features (:mod:`policies.features`, keyed by
:mod:`policies.constants`: ``observation.state``, ``observation.images.<camera>``, ``task``, ``action``); its
architecture's typed model config lives beside the model (``policies/<architecture>_config.py``: :class:`DPTConfig`,
:class:`DiTConfig`, :class:`GR00TConfig`, :class:`RDTConfig`, :class:`Pi0Config`, the VLA heads sharing
:class:`VLAHeadConfig`), the training noise scheduler's in :mod:`policies.noise_scheduler_config`. This module
re-exports every one of those names, so ``from bac.policies.config import ...`` keeps working for all of them.

``config.json`` is :meth:`PolicyConfig.to_dict` (``"bac-policy/2"``), read strictly: every mismatch is a
:class:`bac.ConfigError` naming the field (a :class:`bac.CheckpointError` naming the file on load);
``bac-policy/1`` files are converted (:func:`from_legacy`). :meth:`PolicyConfig.fingerprint` is the digest of
what decides what the weights compute. The format: docs/guide/policies.md ("The policy interface").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bac.errors import CheckpointError, ConfigError
from bac.files import write_atomic

from .config_fields import is_kind, typed_fields
from .constants import ACTION, IMAGE_PREFIX, STATE, TASK
from .dit_config import DiTConfig
from .dpt_config import DPTConfig
from .features import FEATURE_TYPES, PolicyFeature, action_features, image_features, state_features
from .gr00t_config import GR00TConfig
from .noise_scheduler_config import (BETA_SCHEDULES, PREDICTION_TYPES, FlowMatchingConfig, NoiseSchedulerConfig,
                                     noise_scheduler_config)
from .pi0_config import Pi0Config
from .rdt_config import RDTConfig
from .vla_config import VLAHeadConfig

__all__ = [
    # this module's own
    "CONFIG_FORMAT", "LEGACY_FORMAT", "IDENTITY_FIELDS", "WEIGHTS_FILE", "MODEL_CONFIGS", "VLA_ARCHITECTURES",
    "ModelConfig", "PolicyConfig", "WeightsRecord", "from_legacy", "identity_differences", "identity_digest",
    "model_config", "read_config",
    # re-exported from their own modules
    "ACTION", "IMAGE_PREFIX", "STATE", "TASK", "FEATURE_TYPES", "PolicyFeature", "action_features",
    "image_features", "state_features", "BETA_SCHEDULES", "PREDICTION_TYPES", "FlowMatchingConfig",
    "NoiseSchedulerConfig", "noise_scheduler_config", "DPTConfig", "DiTConfig", "GR00TConfig", "Pi0Config",
    "RDTConfig", "VLAHeadConfig",
]

CONFIG_FORMAT = "bac-policy/2"
LEGACY_FORMAT = "bac-policy/1"


# ------------------------------------------------------------------------ architectures
MODEL_CONFIGS: dict[str, type] = {"dpt": DPTConfig, "dit": DiTConfig, "gr00t": GR00TConfig, "rdt": RDTConfig,
                                  "pi0": Pi0Config}
VLA_ARCHITECTURES = ("gr00t", "rdt", "pi0")
ModelConfig = DPTConfig | DiTConfig | GR00TConfig | RDTConfig | Pi0Config


def model_config(architecture: str, model: Mapping[str, Any] | ModelConfig | None = None,
                 complete: bool = False) -> ModelConfig:
    """The typed model config of ``architecture`` from a mapping (defaults fill missing fields unless ``complete``)."""
    if architecture not in MODEL_CONFIGS:
        raise ConfigError(f"unknown architecture {architecture!r}; expected one of {sorted(MODEL_CONFIGS)}")
    cls = MODEL_CONFIGS[architecture]
    if isinstance(model, cls):
        return model
    if dataclasses.is_dataclass(model):
        raise ConfigError(f"a {type(model).__name__} is not the model config of architecture {architecture!r}")
    if model is None and complete:
        raise ConfigError(f"model: missing (architecture {architecture!r} needs {cls.__name__}'s fields)")
    return cls(**typed_fields(cls, model or {}, "model", complete))


# ------------------------------------------------------------------------------- policy
_FIELDS = ("architecture", "model", "input_features", "output_features", "horizon", "n_obs_steps",
           "n_action_steps", "tasks", "noise_scheduler", "provenance")
# What decides the function the weights compute. Not n_action_steps (how many actions of a chunk are
# executed) and not provenance (the record): changing those in config.json is legitimate.
IDENTITY_FIELDS = ("architecture", "model", "input_features", "output_features", "horizon", "n_obs_steps",
                   "tasks", "noise_scheduler")
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class WeightsRecord:
    """``config.json``'s ``"weights"`` field: the weights file it was saved with (name, size, sha256)."""

    file: str
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        if self.file != WEIGHTS_FILE:
            raise ConfigError(f"weights.file must be {WEIGHTS_FILE!r}, got {self.file!r}")
        if not is_kind(self.bytes, int) or self.bytes < 0:
            raise ConfigError(f"weights.bytes must be a non-negative int, got {self.bytes!r}")
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64
                and all(c in "0123456789abcdef" for c in self.sha256)):
            raise ConfigError(f"weights.sha256 must be 64 lower-case hex digits, got {self.sha256!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "WeightsRecord":
        return cls(**typed_fields(cls, data, "weights", complete=True))


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to rebuild a policy before its weights load (``config.json``).

    Build one with :meth:`build` (from dimensions) or :meth:`from_dict` (from JSON).
    """

    architecture: str
    model: ModelConfig
    input_features: dict[str, PolicyFeature]
    output_features: dict[str, PolicyFeature]
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    tasks: tuple[str, ...] = ()
    noise_scheduler: NoiseSchedulerConfig | FlowMatchingConfig = field(default_factory=NoiseSchedulerConfig)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in MODEL_CONFIGS:
            raise ConfigError(f"unknown architecture {self.architecture!r}; expected one of {sorted(MODEL_CONFIGS)}")
        if not isinstance(self.model, MODEL_CONFIGS[self.architecture]):
            raise ConfigError(f"model must be a {MODEL_CONFIGS[self.architecture].__name__} for architecture "
                             f"{self.architecture!r}, got {type(self.model).__name__}")
        for key in ("horizon", "n_obs_steps", "n_action_steps"):
            if not is_kind(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive int, got {getattr(self, key)!r}")
        if self.n_action_steps > self.horizon:
            raise ConfigError(f"n_action_steps must be in [1, horizon={self.horizon}], got {self.n_action_steps}")
        tasks = self.tasks
        if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
            raise ConfigError(f"tasks must be a list of task names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"tasks must be distinct, got {list(tasks)}")
        object.__setattr__(self, "tasks", tuple(tasks))
        if not isinstance(self.noise_scheduler, (NoiseSchedulerConfig, FlowMatchingConfig)):
            raise ConfigError(f"noise_scheduler must be a NoiseSchedulerConfig or FlowMatchingConfig, got "
                              f"{type(self.noise_scheduler).__name__}")
        if not isinstance(self.provenance, dict):
            raise ConfigError(f"provenance must be a mapping, got {type(self.provenance).__name__}")
        self._check_features()

    def _check_features(self) -> None:
        for where, features in (("input_features", self.input_features), ("output_features", self.output_features)):
            if not isinstance(features, Mapping) or not all(isinstance(f, PolicyFeature) for f in features.values()):
                raise ConfigError(f"{where} must map names to PolicyFeature")
            for name, feature in features.items():
                if name != feature.name:
                    raise ConfigError(f"{where}: key {name!r} holds feature {feature.name!r}")
        inputs, outputs = self.input_features, self.output_features
        images = sorted(n for n, f in inputs.items() if f.type == "image")
        if self.is_vla:
            expected = sorted(IMAGE_PREFIX + c for c in self.model.cameras)
            if images != expected:
                raise ConfigError(f"a {self.architecture} head with cameras {list(self.model.cameras)} reads image "
                                  f"features {expected}, the feature spec has {images}")
            size = self.model.image_size
            wrong = [n for n in images if inputs[n].shape != (3, size, size)]
            if wrong:
                raise ConfigError(f"image features {wrong} must be [3, {size}, {size}] (model.image_size)")
            if TASK not in inputs:
                raise ConfigError(f"a vision-language-action head needs the language feature {TASK!r}")
        elif images:
            raise ConfigError(f"image features {images}: architecture {self.architecture!r} has no image encoder "
                             f"(the vision-language-action heads {list(VLA_ARCHITECTURES)} do)")
        if set(outputs) != {ACTION} or outputs[ACTION].type != "action":
            raise ConfigError(f"output_features must be exactly {{{ACTION!r}: action}}, got {sorted(outputs)}")
        wrong = sorted(n for n, f in inputs.items() if f.type not in ("state", "language", "image"))
        if wrong:
            raise ConfigError(f"input_features {wrong} must be of type state, image or language")
        if STATE not in inputs:
            raise ConfigError(f"input_features must include {STATE!r}, got {sorted(inputs)}")
        if self.tasks and TASK not in inputs:
            raise ConfigError(f"a policy trained on tasks {list(self.tasks)} needs the input feature {TASK!r}")
        if not self.tasks and TASK in inputs:
            raise ConfigError(f"input feature {TASK!r} needs the list of task names (tasks=[...])")

    # -- derived ---------------------------------------------------------------------
    @property
    def state_dim(self) -> int:
        return self.input_features[STATE].shape[0]

    @property
    def action_dim(self) -> int:
        return self.output_features[ACTION].shape[0]

    @property
    def is_vla(self) -> bool:
        """A vision-language-action head: images and a free-text instruction (``task``), no task one-hot."""
        return self.architecture in VLA_ARCHITECTURES

    @property
    def is_flow(self) -> bool:
        return isinstance(self.noise_scheduler, FlowMatchingConfig)

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(self.model.cameras) if self.is_vla else ()

    @property
    def conditions_on_task(self) -> bool:
        """Whether the task enters the condition as a one-hot: for more than one task, state policies only
        (a VLA head reads the instruction's language tokens instead)."""
        return len(self.tasks) > 1 and not self.is_vla

    @property
    def cond_dim(self) -> int:
        return self.state_dim + (len(self.tasks) if self.conditions_on_task else 0)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def build(cls, architecture: str, model: Mapping[str, Any] | ModelConfig | None = None, *,
              state_dim: int, action_dim: int, tasks: Sequence[str] = (),
              noise_scheduler: Mapping[str, Any] | NoiseSchedulerConfig | FlowMatchingConfig | None = None,
              state_keys: Sequence[str] | None = None, **settings: Any) -> "PolicyConfig":
        """A policy's config: features from the dimensions, typed model config from a mapping.

        A vision-language-action architecture also gets one image feature per ``model.cameras`` and the
        language feature ``task``. ``state_keys`` names the observation parts ``observation.state``
        concatenates (e.g. ``["hand_pos", "gripper"]``; None: the whole observation). ``settings`` are
        the remaining fields (``horizon``, ``n_obs_steps``, ``n_action_steps``, ``provenance``).
        """
        unknown = sorted(set(settings) - {"horizon", "n_obs_steps", "n_action_steps", "provenance"})
        if unknown:
            raise ConfigError(f"unknown policy setting(s) {unknown}")
        noise_scheduler = noise_scheduler_config(noise_scheduler)
        for key, value in (("state_dim", state_dim), ("action_dim", action_dim)):
            if not is_kind(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive int, got {value!r}")
        if isinstance(tasks, str):
            raise ConfigError(f"tasks must be a list of task names, got {tasks!r}")
        settings["provenance"] = dict(settings.get("provenance") or {})
        model = model_config(architecture, model)
        inputs = state_features(state_dim, tasks, state_keys)
        if architecture in VLA_ARCHITECTURES:
            inputs.update(image_features(model.cameras, model.image_size))
            inputs[TASK] = PolicyFeature(TASK, "language", ())
        return cls(
            architecture=architecture,
            model=model,
            input_features=inputs,
            output_features=action_features(action_dim),
            tasks=tuple(tasks),
            noise_scheduler=noise_scheduler,
            **settings,
        )

    def replace(self, **changes: Any) -> "PolicyConfig":
        return dataclasses.replace(self, **changes)

    # -- identity ----------------------------------------------------------------------
    def identity(self) -> dict:
        """The fields that decide what the weights compute (JSON values; see ``IDENTITY_FIELDS``)."""
        data = self.to_dict()
        return {k: data[k] for k in IDENTITY_FIELDS}

    def fingerprint(self) -> str:
        """sha256 of :meth:`identity` as canonical JSON: equal fingerprints, interchangeable weights."""
        return identity_digest(self.identity())

    # -- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": CONFIG_FORMAT,
            "type": "diffusion",
            "architecture": self.architecture,
            "model": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.model).items()},
            "input_features": {n: f.to_dict() for n, f in self.input_features.items()},
            "output_features": {n: f.to_dict() for n, f in self.output_features.items()},
            "horizon": self.horizon,
            "n_obs_steps": self.n_obs_steps,
            "n_action_steps": self.n_action_steps,
            "tasks": list(self.tasks),
            "noise_scheduler": self.noise_scheduler.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PolicyConfig":
        """Parse ``config.json``; an old ``bac-policy/1`` config is converted (see :func:`from_legacy`).

        The optional ``"weights"`` field belongs to the checkpoint, not to the config: it is
        checked (:class:`WeightsRecord`) and left out; :func:`read_config` returns it.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a policy config is a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt == LEGACY_FORMAT:
            return from_legacy(data)
        if fmt != CONFIG_FORMAT:
            raise ConfigError(f"config format {fmt!r} is not {CONFIG_FORMAT!r} (or the convertible {LEGACY_FORMAT!r})")
        if data.get("type", "diffusion") != "diffusion":
            raise ConfigError(f"config type {data.get('type')!r} is not a diffusion policy")
        body = {k: v for k, v in data.items() if k not in ("format", "type", "weights")}
        if "weights" in data:
            WeightsRecord.from_dict(data["weights"])
        missing = [k for k in _FIELDS if k not in body and k not in ("provenance",)]
        if missing:
            raise ConfigError(f"policy config is missing field(s) {missing}")
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"policy config has unknown field(s) {unknown}; expected {list(_FIELDS)}")
        for key in ("input_features", "output_features"):
            if not isinstance(body[key], Mapping):
                raise ConfigError(f"{key} must map feature names to {{type, shape}}, got {body[key]!r}")
        if not isinstance(body["tasks"], list):
            raise ConfigError(f"tasks must be a list of task names, got {body['tasks']!r}")
        architecture = body["architecture"]
        if not isinstance(architecture, str):
            raise ConfigError(f"architecture must be one of {sorted(MODEL_CONFIGS)}, got {architecture!r}")
        return cls(
            architecture=architecture,
            model=model_config(architecture, body["model"], complete=True),
            input_features={n: PolicyFeature.from_dict(n, f) for n, f in body["input_features"].items()},
            output_features={n: PolicyFeature.from_dict(n, f) for n, f in body["output_features"].items()},
            horizon=body["horizon"],
            n_obs_steps=body["n_obs_steps"],
            n_action_steps=body["n_action_steps"],
            tasks=tuple(body["tasks"]),
            noise_scheduler=noise_scheduler_config(body["noise_scheduler"], complete=True),
            provenance=dict(body.get("provenance") or {}),
        )

    def save(self, path: str | Path, weights: WeightsRecord | None = None) -> Path:
        """Write ``config.json`` (with the checkpoint's ``weights`` record, if given); a crash leaves the old file."""
        path = Path(path)
        data = self.to_dict()
        if weights is not None:
            data["weights"] = weights.to_dict()
        return write_atomic(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PolicyConfig":
        """Read a ``config.json``; every problem is a :class:`bac.CheckpointError` naming the file and the field."""
        return read_config(path)[0]


def read_config(path: str | Path) -> tuple[PolicyConfig, WeightsRecord | None]:
    """A checkpoint's ``config.json``: the config and its ``weights`` record (None in files saved before it).

    Every problem (unreadable, not JSON, a wrong field) is a :class:`bac.CheckpointError` naming the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from err
    try:
        config = PolicyConfig.from_dict(data)
        weights = WeightsRecord.from_dict(data["weights"]) if "weights" in data else None
    except (ValueError, TypeError) as err:  # TypeError: a value of a type no check anticipated
        raise CheckpointError(f"{path}: {err}") from err
    return config, weights


def identity_digest(identity: Mapping[str, Any]) -> str:
    """sha256 of an identity dict as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted field names whose values differ between two identity dicts, with both values."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        name = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += identity_differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: weights saved with {a!r}, config has {b!r}")
    return out


_LEGACY_FIELDS = ("format", "architecture", "model", "obs_dim", "action_dim", "horizon", "n_obs_steps",
                  "n_action_steps", "tasks", "noise_scheduler", "provenance")


def from_legacy(data: Mapping[str, Any]) -> PolicyConfig:
    """Convert a ``bac-policy/1`` config (``obs_dim``/``action_dim``, untyped model dict) to a :class:`PolicyConfig`.

    The features are ``observation.state`` ``(obs_dim,)``, ``task`` when it names tasks,
    and ``action`` ``(action_dim,)``; the weights need no change. Rewrite a checkpoint with
    ``PolicyConfig.load(dir / "config.json").save(dir / "config.json")``.
    """
    unknown = sorted(set(data) - set(_LEGACY_FIELDS))
    if unknown:
        raise ConfigError(f"{LEGACY_FORMAT} config has unknown field(s) {unknown}")
    missing = [k for k in ("architecture", "obs_dim", "action_dim") if k not in data]
    if missing:
        raise ConfigError(f"{LEGACY_FORMAT} config is missing field(s) {missing}")
    provenance = dict(data.get("provenance") or {})
    provenance["converted_from"] = LEGACY_FORMAT
    settings = {k: data[k] for k in ("horizon", "n_obs_steps", "n_action_steps") if k in data}
    return PolicyConfig.build(data["architecture"], data.get("model"), state_dim=data["obs_dim"],
                              action_dim=data["action_dim"], tasks=tuple(data.get("tasks") or ()),
                              noise_scheduler=data.get("noise_scheduler"), provenance=provenance, **settings)
