"""Read robomimic-layout HDF5 demonstrations as diffusion-policy training windows.

The layout is robomimic's (``data/demo_i/obs/<key>``, ``data/demo_i/actions``,
``mask/<filter key>``), so files written by :mod:`envs.collect` and robomimic's own
low-dim datasets (lift / can / square: ``robot0_eef_pos``, ``robot0_eef_quat``,
``robot0_gripper_qpos``, ``object``, ...) load the same way.

Windows follow ``robomimic.utils.dataset.SequenceDataset(frame_stack=n_obs_steps,
seq_length=horizon, pad_frame_stack=True, pad_seq_length=True)``: one sample per
timestep ``t`` of every demo, covering frames ``t - n_obs_steps + 1 ... t + horizon - 1``,
with indices outside the demo clamped to its first / last frame (robomimic's
``pad_same``). Of that sequence we return the observation history ending at ``t``
(``[n_obs_steps, obs_dim]``) and the action chunk starting at ``t`` (``[horizon,
act_dim]``): the chunk a policy executes from the current observation, from its
first action on. (Diffusion Policy's reference code instead starts the predicted
chunk at the oldest observation, ``t - n_obs_steps + 1``, and executes from index
``n_obs_steps - 1``.)

We do not use robomimic's class itself: it works without torchvision only when
robomimic is installed with ``pip install --no-deps`` (its metadata requires
torchvision, which would pull a CUDA torch), which no ``pyproject`` dependency can
express, and it needs the global ``ObsUtils`` modality registry initialised first.
This reader is equivalent on low-dim data (checked against robomimic 0.3.0) and
loads everything into memory (``hdf5_cache_mode="low_dim"``): these datasets are
a few MB.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import h5py
import numpy as np
import torch

__all__ = [
    "WindowDataset",
    "calibration_observations",
    "list_demos",
    "load_episodes",
]


def list_demos(path: str | os.PathLike, filter_key: str | None = None) -> list[str]:
    """Demo names in robomimic's order (by the integer after ``demo_``).

    ``filter_key`` selects ``mask/<filter_key>`` (e.g. ``"train"``, ``"valid"``).
    """
    with h5py.File(path, "r") as f:
        if filter_key is not None:
            if f"mask/{filter_key}" not in f:
                have = list(f["mask"].keys()) if "mask" in f else []
                raise KeyError(f"{path} has no filter key {filter_key!r} (has {have})")
            names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in f[f"mask/{filter_key}"][()]]
        else:
            names = list(f["data"].keys())
    return sorted(names, key=lambda n: int(n[5:]))


def load_episodes(
    path: str | os.PathLike,
    obs_keys: Sequence[str] = ("state",),
    filter_key: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Each demo as ``{"name", "obs": [T, obs_dim], "actions": [T, act_dim]}`` (float32).

    Observations are the ``obs/<key>`` datasets concatenated in ``obs_keys`` order.
    ``T`` is the demo's ``num_samples`` attribute (robomimic's), or the length of
    ``actions`` if a file lacks it.
    """
    if isinstance(obs_keys, str):
        obs_keys = (obs_keys,)
    episodes = []
    with h5py.File(path, "r") as f:
        for name in list_demos(path, filter_key):
            g = f[f"data/{name}"]
            actions = np.asarray(g["actions"][()], dtype=np.float32)
            n = int(g.attrs.get("num_samples", len(actions)))
            parts = []
            for key in obs_keys:
                if key not in g["obs"]:
                    raise KeyError(
                        f"{path}:{name} has no obs key {key!r} (has {sorted(g['obs'].keys())})"
                    )
                arr = np.asarray(g["obs"][key][()], dtype=np.float32)
                if arr.ndim == 1:
                    arr = arr[:, None]
                if arr.ndim != 2:
                    raise ValueError(
                        f"obs key {key!r} has shape {arr.shape}: only low-dim (state) keys are supported"
                    )
                parts.append(arr[:n])
            if actions.ndim == 1:
                actions = actions[:, None]
            episodes.append(
                {"name": name, "obs": np.concatenate(parts, axis=1), "actions": actions[:n]}
            )
    if not episodes:
        raise ValueError(f"{path} has no demonstrations (filter key {filter_key!r})")
    return episodes


class WindowDataset(torch.utils.data.Dataset):
    """(observation history, action chunk) windows over robomimic-layout demos.

    ``ds[i]`` is ``(obs [n_obs_steps, obs_dim], action [horizon, act_dim])`` as float32
    torch tensors (``ds.window(i)`` gives numpy); ``len(ds)`` is the total number of
    timesteps in the selected demos. See the module docstring for the padding.

    Args:
        path: HDF5 file in robomimic's layout.
        obs_keys: ``obs/<key>`` datasets to concatenate (``("state",)`` for
            :mod:`envs.collect` files; robomimic lift e.g. ``("object",
            "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")``).
        horizon: action chunk length H.
        n_obs_steps: observation history length.
        filter_key: robomimic filter key under ``mask/`` (``"train"`` / ``"valid"``),
            or None for every demo.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        obs_keys: Sequence[str] = ("state",),
        horizon: int = 16,
        n_obs_steps: int = 2,
        filter_key: str | None = None,
    ) -> None:
        if horizon < 1 or n_obs_steps < 1:
            raise ValueError("horizon and n_obs_steps must be >= 1")
        self.path = os.fspath(path)
        self.obs_keys = (obs_keys,) if isinstance(obs_keys, str) else tuple(obs_keys)
        self.horizon = int(horizon)
        self.n_obs_steps = int(n_obs_steps)
        self.filter_key = filter_key
        episodes = load_episodes(path, self.obs_keys, filter_key)
        self.demos = [ep["name"] for ep in episodes]
        lengths = np.array([len(ep["actions"]) for ep in episodes], dtype=np.int64)
        self.episode_ends = np.cumsum(lengths)  # exclusive end of each demo in the flat arrays
        self._starts = self.episode_ends - lengths
        self.obs = np.concatenate([ep["obs"] for ep in episodes])
        self.actions = np.concatenate([ep["actions"] for ep in episodes])
        # Per flat index: start and last index of its demo (for clamping).
        ep_of = np.repeat(np.arange(len(episodes)), lengths)
        self._lo = self._starts[ep_of]
        self._hi = self.episode_ends[ep_of] - 1

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def __len__(self) -> int:
        return len(self.obs)

    def indices(self, index: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat frame indices of the observation history and the action chunk."""
        index = np.asarray(index)
        lo, hi = self._lo[index][..., None], self._hi[index][..., None]
        obs_idx = np.clip(index[..., None] + np.arange(1 - self.n_obs_steps, 1), lo, hi)
        act_idx = np.clip(index[..., None] + np.arange(self.horizon), lo, hi)
        return obs_idx, act_idx

    def window(self, index: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Numpy window(s); an index array gives a batch ``[B, n_obs_steps, D]``, ``[B, H, A]``."""
        if np.any(np.asarray(index) < 0) or np.any(np.asarray(index) >= len(self)):
            raise IndexError(index)
        obs_idx, act_idx = self.indices(index)
        return self.obs[obs_idx], self.actions[act_idx]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        obs, act = self.window(index)
        return torch.from_numpy(obs), torch.from_numpy(act)

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-dimension min / max / mean / std of observations and actions (for normalisers)."""
        out = {}
        for name, arr in (("obs", self.obs), ("action", self.actions)):
            out[name] = {
                "min": arr.min(0),
                "max": arr.max(0),
                "mean": arr.mean(0),
                "std": arr.std(0),
            }
        return out


def calibration_observations(
    path: str | os.PathLike,
    n: int,
    seed: int = 0,
    obs_keys: Sequence[str] = ("state",),
    n_obs_steps: int = 2,
    filter_key: str | None = None,
) -> np.ndarray:
    """``n`` observation histories ``[n, n_obs_steps, obs_dim]`` (float32) from demos.

    Caching plans are calibrated on what the policy sees in its training distribution,
    not on evaluation episodes (which would leak the test set). Timesteps are drawn
    uniformly over all frames of the selected demos (so every phase of the task is
    represented), without replacement when ``n`` allows, from ``seed``; histories are
    padded at demo starts like the training windows.
    """
    ds = WindowDataset(path, obs_keys, horizon=1, n_obs_steps=n_obs_steps, filter_key=filter_key)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=n, replace=n > len(ds))
    return ds.window(idx)[0]
