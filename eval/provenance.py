"""What an evaluation's results depend on: the checkpoint's weights, the settings and the package versions.

A run's output folder is named by :func:`settings_digest` and resumes only a run of the same digest, so its
content must not change: a recorded run would no longer be found.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bac.policies.checkpointing import resolve_checkpoint

PACKAGES = ("torch", "diffusers", "gymnasium", "metaworld", "mujoco", "numpy", "hydra-core", "bac")


def checkpoint_digest(checkpoint: Path) -> str:
    """Short SHA-256 of a checkpoint's weights: retrained weights of the same shape get a new one."""
    digest = hashlib.sha256()
    with open(checkpoint / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


DIGEST_KEYS = ("checkpoint", "tasks", "episodes", "seed", "sampler", "methods", "run_methods", "calibration", "M", "n",
               "tuned")
# Settings that entered the digest after runs were recorded: in it only when they differ from these defaults,
# so that every recorded run keeps its digest (and its folder).
# compile and backend: a compiled call may round differently from the eager one, so its episodes are another run's.
LATER_KEYS = {"instructions": "held_out", "max_episode_steps": None, "device": "cpu", "compile": "none",
              "backend": "torch"}
DIGEST_SETTINGS = (*DIGEST_KEYS, *LATER_KEYS)  # every setting a digest covers


def settings_digest(cfg: DictConfig) -> str:
    """Short hash of the settings a run's results depend on (and of a trained checkpoint's weights).

    ``num_envs`` also changes the episodes (it sets the waves, and so the noise) but recorded runs differ
    in it: it is checked against the recorded run before one resumes (``settings.check_recorded_run``)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    relevant = {k: settings.get(k) for k in DIGEST_KEYS}
    relevant["calibration"] = {k: v for k, v in relevant["calibration"].items() if k != "recompute"}
    if relevant["tuned"] is None:  # no tuned file: the digest of runs made before the setting existed
        del relevant["tuned"]
    relevant |= {k: settings.get(k) for k, default in LATER_KEYS.items() if settings.get(k, default) != default}
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    if (checkpoint / "model.safetensors").is_file():  # a retrained checkpoint is another run
        relevant["weights"] = checkpoint_digest(checkpoint)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


def package_versions() -> dict[str, str | None]:
    """The installed version of each package of :data:`PACKAGES` (``None``: not installed), for a report."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
