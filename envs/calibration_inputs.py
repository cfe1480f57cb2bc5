"""A policy's calibration observations, drawn from expert demonstrations or shipped with its checkpoint.

Caching needs a few observations to calibrate on; drawing them means collecting demonstrations of every
task the policy was trained on. A checkpoint can ship the drawn observations instead
(``calibration_inputs.safetensors``, written by ``python -m benchmarks.calibration_inputs``), with what
they were drawn from in the file's header, so they are used only where a fresh draw would give the same.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .collect import FORMAT_VERSION, collect
from .dataset import accepts_obs_dim, calibration_observations

CALIBRATION_INPUTS = "calibration_inputs.safetensors"  # a checkpoint's shipped calibration observations
CALIBRATION_INPUTS_FORMAT = "bac-calibration-inputs/1"
# The tensor's name: the policies' state feature key (bac.policies.constants.STATE), copied because bac.envs
# cannot import bac.policies; tests/envs keeps the two equal.
STATE = "observation.state"


def calibration_inputs_facts(tasks: list[str], *, samples: int, episodes: int, seed: int, n_obs_steps: int) -> dict:
    """What a state policy's calibration observations depend on; a shipped file is used only when all are equal.

    The observations come from ``episodes`` expert demonstrations per task (``envs.collect``, seeds from 0, no
    action noise) written by this collector (its format version) on this Meta-World version.
    """
    return {"format": CALIBRATION_INPUTS_FORMAT, "tasks": json.dumps(list(tasks)), "samples": str(int(samples)),
            "episodes": str(int(episodes)), "seed": str(int(seed)), "n_obs_steps": str(int(n_obs_steps)),
            "collector": str(FORMAT_VERSION), "metaworld": metadata.version("metaworld")}


def draw_calibration_inputs(tasks: list[str], *, samples: int, episodes: int, seed: int,
                            n_obs_steps: int) -> tuple[np.ndarray, list[str]]:
    """A state policy's calibration observations ``[N, n_obs_steps, D]`` (float32) and each one's task.

    ``ceil(samples / len(tasks))`` per task, in the order of ``tasks``, each task's drawn with ``seed`` from
    its ``episodes`` demonstrations (collected on demand under ``data/``). ``benchmarks/calibration_inputs.py``
    ships the result with a checkpoint.
    """
    per_task = -(-int(samples) // len(tasks))
    obs, names = [], []
    for task in tasks:
        path = collect(task, int(episodes), progress=False)
        obs.append(calibration_observations(path, per_task, seed=int(seed), n_obs_steps=n_obs_steps))
        names += [task] * per_task
    return np.concatenate(obs).astype(np.float32, copy=False), names


def save_calibration_inputs(path: Path, states: np.ndarray, facts: dict) -> Path:
    """Write calibration observations as safetensors, ``facts`` (what they were drawn with) in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({STATE: np.ascontiguousarray(states, dtype=np.float32)}, str(path), metadata=facts)
    return path


@accepts_obs_dim
def shipped_calibration_inputs(directory: Path, facts: dict, state_dim: int) -> np.ndarray | None:
    """The calibration observations shipped in a checkpoint directory, if they were drawn exactly as ``facts``
    says this run would draw them (same tasks, samples, episodes, seed, history, collector and Meta-World);
    else None (the caller collects demonstrations)."""
    path = directory / CALIBRATION_INPUTS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}) != facts:
                return None
            states = f.get_tensor(STATE)
    except (OSError, SafetensorError, KeyError):
        return None
    tasks = json.loads(facts["tasks"])
    per_task = -(-int(facts["samples"]) // len(tasks))
    expected = (per_task * len(tasks), int(facts["n_obs_steps"]), int(state_dim))
    return states if states.shape == expected and states.dtype == np.float32 else None
