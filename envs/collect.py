"""Collect scripted-expert demonstrations on a Meta-World task into robomimic's HDF5 layout.

    bac-collect task=push episodes=100            # -> data/metaworld/...
    bac-collect task=door-open episodes=50 seed_offset=1000 overwrite=true

Episode ``k`` is reset with seed ``seed_offset + k``; failed expert episodes are dropped and further seeds
tried until ``episodes`` successes exist, so the same arguments write the same data. ``action_noise``
(DART) perturbs the executed hand motion while storing the expert's own action, so the demonstrations
also show how to recover. A file whose metadata matches the request is reused unless ``overwrite=true``;
files are written under a temporary name and renamed. The file layout, DART and camera frames:
docs/guide/policies.md ("Experts and demonstrations").
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from bac.envs.instructions import INSTRUCTIONS, instruction, train_instructions
from bac.envs.tasks import check_task
from bac.errors import ConfigError
from bac.files import check_free_space, check_output_folder
from bac.envs.metaworld_env import (
    CAMERAS,
    OBS_SLICES,
    MetaWorldStateEnv,
    env_id,
    expert_action,
    expert_policy,
)

__all__ = ["FORMAT_VERSION", "DatasetExistsError", "collect", "dataset_path", "default_data_dir", "rollout_expert"]

#: Bumped whenever what is written changes, so stale caches are not reused.
FORMAT_VERSION = 2  # 2: reach's expert steers the tool centre (envs.metaworld_env.ReachTCPPolicy)
_ROBOMIMIC_GYM_TYPE = 2  # robomimic.envs.env_base.EnvType.GYM_TYPE
MAX_IMAGE_SIZE = 1024  # a frame is 3 * image_size**2 bytes, one per step and camera, all held in memory
# The free-space estimate: measured 1.2-1.5 KB per step of a state-only dataset (plus the frames), and demos
# as long as half the episode cap (the caps are about twice the experts' usual longest episode).
_STATE_BYTES_PER_STEP = 1500


class DatasetExistsError(ConfigError, FileExistsError):
    """A dataset file with other settings is in the way: a :class:`bac.ConfigError` that ``except
    FileExistsError`` (the error of earlier versions) also catches."""


def default_data_dir() -> Path:
    """``$BAC_DATA_DIR/metaworld``, else ``./data/metaworld`` under the current directory (gitignored in the repo).

    Never inside the installed package, which may be read-only.
    """
    return Path(os.environ.get("BAC_DATA_DIR", "data")) / "metaworld"


def dataset_path(
    task: str, episodes: int, seed_offset: int = 0, out_dir: str | os.PathLike | None = None,
    action_noise: float = 0.0, cameras: tuple[str, ...] = (), image_size: int = 84,
) -> Path:
    """Where :func:`collect` writes (and looks for) a dataset."""
    env_id(task)  # validates the name
    task = task.removesuffix("-v3")
    out = Path(out_dir) if out_dir is not None else default_data_dir()
    noise = f"_noise{action_noise:g}" if action_noise else ""
    images = f"_{'+'.join(cameras)}_{image_size}px" if cameras else ""
    return out / f"metaworld_{task}_{episodes}demos_seed{seed_offset}{noise}{images}.hdf5"


def rollout_expert(
    env: MetaWorldStateEnv, seed: int, post_success_steps: int = 10, action_noise: float = 0.0,
    cameras: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    """One seeded expert episode; the transition arrays, or None if it never succeeded.

    With ``action_noise`` the executed hand motion is the expert's plus Gaussian noise
    (seeded by ``seed``); the stored action is the expert's (docs/guide/policies.md, DART).
    ``cameras``: also a frame per camera of every observation (``images[camera]``).
    """
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng([seed, 0xDA27])
    observations, next_observations, actions, rewards, states = [], [], [], [], []
    frames: dict[str, list[np.ndarray]] = {camera: [] for camera in cameras}
    first_success = None
    while True:
        action = expert_action(env.task, obs)
        states.append(env.sim_state())
        for camera in cameras:
            frames[camera].append(env.render_camera(camera))
        executed = action.copy()
        if action_noise:
            executed[:3] += rng.normal(0.0, action_noise, 3).astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(np.clip(executed, -1.0, 1.0))
        observations.append(obs)
        next_observations.append(next_obs)
        actions.append(action)
        rewards.append(reward)
        obs = next_obs
        if first_success is None and info["success"]:
            first_success = len(actions)
        if terminated or truncated:
            break
        if first_success is not None and len(actions) >= first_success + post_success_steps:
            break
    if first_success is None:
        return None
    dones = np.zeros(len(actions), dtype=np.int64)
    dones[-1] = 1
    return {
        "obs": np.asarray(observations, dtype=np.float64),
        "next_obs": np.asarray(next_observations, dtype=np.float64),
        "actions": np.asarray(actions, dtype=np.float32),
        "rewards": np.asarray(rewards, dtype=np.float64),
        "dones": dones,
        "states": np.asarray(states, dtype=np.float64),
        "images": {camera: np.stack(f) for camera, f in frames.items()},
        "first_success_step": first_success,
    }


def _obs_groups(obs: np.ndarray) -> dict[str, np.ndarray]:
    groups = {"state": obs}
    groups.update({key: obs[:, sl] for key, sl in OBS_SLICES.items()})
    return groups


def _read_meta(path: Path) -> dict | None:
    try:
        with h5py.File(path, "r") as f:
            meta = json.loads(f["data"].attrs["bac_collect"])
            if len([k for k in f["data"] if k.startswith("demo_")]) != meta["episodes"]:
                return None
            return meta
    except (OSError, KeyError, ValueError):
        return None


def collect(
    task: str,
    episodes: int,
    seed_offset: int = 0,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    post_success_steps: int = 10,
    action_noise: float = 0.0,
    max_episode_steps: int | None = None,
    valid_fraction: float = 0.1,
    progress: bool = True,
    cameras: tuple[str, ...] | list[str] = (),
    image_size: int = 84,
) -> Path:
    """Write (or reuse) ``episodes`` successful expert demonstrations; returns the path.

    Args:
        seed_offset: seed of the first attempted episode (then +1, +2, ...).
        out_dir: directory; ``None`` is :func:`default_data_dir`.
        overwrite: rewrite even if a matching dataset exists.
        post_success_steps: steps kept after the first success.
        action_noise: standard deviation of the noise added to the executed hand motion
            (DART; 0: the expert's actions are executed as they are).
        max_episode_steps: episode cap for the expert (default: the env's per-task cap).
        valid_fraction: share of demos in ``mask/valid`` (seeded split, at least one
            demo if there are two or more); the rest are in ``mask/train``.
        cameras: cameras (``envs.metaworld_env.CAMERAS``) whose frames are stored per step,
            ``image_size`` pixels square (at most :data:`MAX_IMAGE_SIZE`); with them every demo also gets
            an instruction.

    Before any episode runs, each of these is a :class:`bac.ConfigError`: an unknown task, an impossible
    setting, an ``out_dir`` that is a file or cannot be written, or one whose file system has less free
    space than the dataset's estimate (demos half the episode cap long); a dataset with other settings in
    the way is a :class:`DatasetExistsError`. A write that fails later (a disk filled meanwhile) is a
    ``ConfigError`` too, and leaves no partial file.
    """
    check_task(task)
    _check_arguments(episodes, seed_offset, post_success_steps, action_noise, max_episode_steps, valid_fraction,
                     image_size)
    cameras = _checked_cameras(cameras)
    env = MetaWorldStateEnv(task, max_episode_steps=max_episode_steps, width=image_size, height=image_size)
    path = dataset_path(env.task, episodes, seed_offset, out_dir, action_noise, cameras, image_size)
    labelled = bool(cameras) and env.task in INSTRUCTIONS
    meta = _metadata(env, episodes, seed_offset, post_success_steps, action_noise, valid_fraction,
                     cameras, image_size, labelled)
    try:
        if path.exists() and not overwrite and _reusable(path, meta):
            return path
        _check_room(path, episodes, env.max_episode_steps, len(cameras) * 3 * image_size ** 2)
        demos, attempts = _expert_demos(env, episodes, seed_offset, post_success_steps, action_noise, cameras,
                                        progress)
    finally:
        env.close()

    attrs = _dataset_attrs(env, demos, meta, attempts)
    instructions = [instruction(env.task, i) if labelled else None for i in range(len(demos))]
    try:
        _write_dataset(path, demos, instructions, attrs, _split(len(demos), valid_fraction, seed_offset))
    except OSError as err:  # a full disk or a folder made read-only meanwhile; no partial file is left
        raise ConfigError(f"setting out_dir: cannot write {path}: {err}; free some space or choose another "
                          "out_dir") from err
    print(f"[envs.collect] wrote {path}: {episodes} demos, {attrs['total']} samples, "
          f"{attempts - episodes} failed expert episodes dropped", file=sys.stderr)
    return path


def _check_arguments(episodes: int, seed_offset: int, post_success_steps: int, action_noise: float,
                     max_episode_steps: int | None, valid_fraction: float, image_size: int) -> None:
    """Refuse impossible settings before an environment is made (each a :class:`bac.ConfigError`)."""
    def integer(name: str, value, low: int, high: float = math.inf) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
            bound = f"in [{low}, {high}]" if high < math.inf else f">= {low}"
            raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")

    integer("episodes", episodes, 1)
    integer("seed_offset", seed_offset, 0)
    integer("post_success_steps", post_success_steps, 0)
    integer("image_size", image_size, 8, MAX_IMAGE_SIZE)
    if max_episode_steps is not None:
        integer("max_episode_steps", max_episode_steps, 1)
    if isinstance(action_noise, bool) or not isinstance(action_noise, numbers.Real) \
            or not (math.isfinite(action_noise) and action_noise >= 0):
        raise ConfigError(f"action_noise is the standard deviation of the executed motion's noise: a finite number "
                          f">= 0, got {action_noise!r}")
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, numbers.Real) \
            or not 0 <= valid_fraction < 1:
        raise ConfigError(f"valid_fraction is the share of demos held out for validation, in [0, 1), "
                          f"got {valid_fraction!r}")


def _checked_cameras(cameras: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    cameras = tuple(cameras)
    unknown = sorted(set(cameras) - set(CAMERAS))
    if unknown or len(set(cameras)) != len(cameras):
        raise ConfigError(f"cameras must be distinct names from {list(CAMERAS)}, got {list(cameras)}")
    return cameras


def _check_room(path: Path, episodes: int, episode_cap: int, frame_bytes: int) -> None:
    """Refuse a dataset folder that cannot be written or lacks the space for the dataset (an estimate)."""
    check_output_folder(path.parent, "out_dir")
    needed = episodes * (episode_cap // 2) * (_STATE_BYTES_PER_STEP + frame_bytes)
    check_free_space(path.parent, needed, "out_dir",
                     f"{episodes} demos (estimated at half the {episode_cap}-step episode cap each)")


def _metadata(
    env: MetaWorldStateEnv, episodes: int, seed_offset: int, post_success_steps: int, action_noise: float,
    valid_fraction: float, cameras: tuple[str, ...], image_size: int, labelled: bool,
) -> dict:
    """What a dataset was collected with: an existing file is reused only if its metadata is equal."""
    meta = {
        "format_version": FORMAT_VERSION,
        "task": env.task,
        "episodes": int(episodes),
        "seed_offset": int(seed_offset),
        "post_success_steps": int(post_success_steps),
        "action_noise": float(action_noise),
        "max_episode_steps": env.max_episode_steps,
        "valid_fraction": float(valid_fraction),
        "expert": type(expert_policy(env.task)).__name__,
        "metaworld": importlib_metadata.version("metaworld"),
    }
    if cameras:  # image datasets only, so the metadata of existing state datasets is unchanged
        meta.update(cameras=list(cameras), image_size=int(image_size),
                    instructions=list(train_instructions(env.task)) if labelled else [])
    return meta


def _reusable(path: Path, meta: dict) -> bool:
    """Whether the existing ``path`` is the dataset asked for (False: an older collector's, to be rewritten);
    any other file there is refused rather than overwritten."""
    existing = _read_meta(path)
    if existing == meta:
        print(f"[envs.collect] reusing {path} (matching metadata)", file=sys.stderr)
        return True
    if existing is not None and existing.get("format_version", 0) < FORMAT_VERSION:
        print(f"[envs.collect] {path} is from an older collector; rewriting it", file=sys.stderr)
        return False
    raise DatasetExistsError(
        f"{path} exists but was collected with other settings or is incomplete "
        f"(found {existing}, want {meta}); pass overwrite=true to replace it"
    )


def _expert_demos(
    env: MetaWorldStateEnv, episodes: int, seed_offset: int, post_success_steps: int, action_noise: float,
    cameras: tuple[str, ...], progress: bool,
) -> tuple[list[tuple[int, dict]], int]:
    """The first ``episodes`` successful expert episodes (with their seeds) from seed ``seed_offset`` on,
    and how many episodes were attempted."""
    demos: list[tuple[int, dict]] = []
    max_attempts = 2 * episodes + 20  # experts succeed on more than half of the seeds, with DART noise too
    attempts = 0
    bar = tqdm(total=episodes, desc=f"collect {env.task}", unit="demo", disable=not progress)
    while len(demos) < episodes:
        if attempts >= max_attempts:
            raise ConfigError(
                f"the expert succeeded on only {len(demos)} of {attempts} episodes of {env.task} "
                f"(max_episode_steps={env.max_episode_steps}, action_noise={action_noise:g}): "
                "raise max_episode_steps or lower action_noise"
            )
        seed = seed_offset + attempts
        attempts += 1
        episode = rollout_expert(env, seed, post_success_steps, action_noise, cameras)
        if episode is not None:
            demos.append((seed, episode))
            bar.update(1)
        bar.set_postfix(failed=attempts - len(demos))
    bar.close()
    return demos, attempts


def _dataset_attrs(env: MetaWorldStateEnv, demos: list[tuple[int, dict]], meta: dict, attempts: int) -> dict:
    """The attributes of ``data``, in the order they are written (the same arguments give the same bytes):
    ``env_args`` is robomimic's description of the environment, ``bac_collect`` the metadata."""
    env_args = {
        "env_name": env_id(env.task),
        "type": _ROBOMIMIC_GYM_TYPE,
        "env_kwargs": {"max_episode_steps": env.max_episode_steps, "terminate_on_success": False},
    }
    return {
        "total": sum(len(episode["actions"]) for _, episode in demos),
        "env_args": json.dumps(env_args, indent=4),
        "bac_collect": json.dumps(meta, sort_keys=True),
        "attempted_episodes": attempts,
    }


def _write_dataset(
    path: Path, demos: list[tuple[int, dict]], instructions: list[str | None], attrs: dict,
    split: tuple[list[int], list[int]],
) -> None:
    """The demos as ``data/demo_<i>``, ``attrs`` on ``data``, and the train/valid masks."""
    with _written_atomically(path) as f:
        data = f.create_group("data")
        for i, ((seed, episode), text) in enumerate(zip(demos, instructions)):
            _write_demo(data.create_group(f"demo_{i}"), seed, episode, text)
        for name, value in attrs.items():
            data.attrs[name] = value
        train, valid = split
        f.create_dataset("mask/train", data=np.array([f"demo_{i}" for i in train], dtype="S"))
        f.create_dataset("mask/valid", data=np.array([f"demo_{i}" for i in valid], dtype="S"))


def _write_demo(group: h5py.Group, seed: int, episode: dict[str, Any], task_instruction: str | None) -> None:
    for prefix in ("obs", "next_obs"):
        for key, arr in _obs_groups(episode[prefix]).items():
            group.create_dataset(f"{prefix}/{key}", data=arr)
    for camera, frames in episode["images"].items():
        group.create_dataset(f"obs/{camera}_image", data=frames, chunks=(1, *frames.shape[1:]))
    for key in ("actions", "rewards", "dones", "states"):
        group.create_dataset(key, data=episode[key])
    if task_instruction is not None:
        group.attrs["instruction"] = task_instruction
    group.attrs["num_samples"] = len(episode["actions"])
    group.attrs["seed"] = seed
    group.attrs["first_success_step"] = episode["first_success_step"]


@contextmanager
def _written_atomically(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file written under a temporary name and renamed to ``path`` when complete: a killed
    collection leaves no partial file that could be mistaken for a dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _split(n: int, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    n_valid = int(round(valid_fraction * n))
    if valid_fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    else:
        n_valid = 0
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_valid:].tolist()), sorted(perm[:n_valid].tolist())
