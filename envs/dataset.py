"""Read robomimic-layout HDF5 demonstrations as diffusion-policy training windows.

Files written by :mod:`envs.collect` and robomimic's own low-dim datasets (lift / can / square) load the same
way. The windows are those of robomimic 0.3.0's ``SequenceDataset`` (checked against it), read by this
module because robomimic itself cannot be a dependency (docs/guide/policies.md, "Experts and
demonstrations"). Everything is loaded into memory: these datasets are a few MB.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import h5py
import numpy as np
import torch

from bac.errors import ConfigError, DataError

__all__ = [
    "WindowDataset",
    "calibration_observations",
    "list_demos",
    "load_episodes",
]


def accepts_obs_dim(function):
    """Let ``function`` take ``obs_dim=``, the deprecated name of its ``state_dim=`` (for one release)."""

    name = function.__qualname__.removesuffix(".__init__")

    @functools.wraps(function)
    def renamed(*args, **kwargs):
        if "obs_dim" in kwargs:
            warnings.warn(f"{name}(obs_dim=...) is deprecated: use state_dim=", DeprecationWarning, stacklevel=2)
            if "state_dim" in kwargs:
                raise TypeError(f"{name}: give state_dim only (obs_dim is its deprecated name)")
            kwargs["state_dim"] = kwargs.pop("obs_dim")
        return function(*args, **kwargs)

    return renamed


class DataKeyError(DataError, KeyError):
    """A demo or file lacks a key: a :class:`bac.DataError` that ``except KeyError`` also catches."""

    __str__ = Exception.__str__  # KeyError's str() would quote the message


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset file does not exist."""


def _open(path: str | os.PathLike) -> h5py.File:
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"dataset {os.fspath(path)} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{os.fspath(path)} is not a readable HDF5 file: {err}") from err


def _demo_names(f: h5py.File, path, filter_key: str | None) -> list[str]:
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        raise DataKeyError(f"{path} has no 'data' group: not robomimic's layout (data/demo_i/obs, actions)")
    if filter_key is not None:
        if f"mask/{filter_key}" not in f:
            have = list(f["mask"].keys()) if "mask" in f else []
            raise DataKeyError(f"{path} has no filter key {filter_key!r} (has {have})")
        names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in f[f"mask/{filter_key}"][()]]
        absent = [n for n in names if n not in f["data"]]
        if absent:
            raise DataKeyError(f"{path}: mask/{filter_key} lists {absent[:5]}, which data/ does not have")
    else:
        names = list(f["data"].keys())
    wrong = [n for n in names if not (n.startswith("demo_") and n[5:].isdigit())]
    if wrong:
        raise DataError(f"{path}: {wrong[:5]} are not robomimic demo names (demo_<i>)")
    return sorted(names, key=lambda n: int(n[5:]))


def list_demos(path: str | os.PathLike, filter_key: str | None = None) -> list[str]:
    """Demo names in robomimic's order (by the integer after ``demo_``).

    ``filter_key`` selects ``mask/<filter_key>`` (e.g. ``"train"``, ``"valid"``).
    """
    with _open(path) as f:
        return _demo_names(f, path, filter_key)


def _array(g: h5py.Group, key: str, where: str) -> np.ndarray:
    """A numeric low-dim dataset of a demo as float32 ``[T, width]``, with NaN/inf refused."""
    if key not in g or not isinstance(g[key], h5py.Dataset):
        have = sorted(k for k in g.keys()) if isinstance(g, h5py.Group) else []
        raise DataKeyError(f"{where} has no {key!r} (has {have})")
    try:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
            arr = np.asarray(g[key][()], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: {key} is not numeric ({err})") from err
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{where}: {key} has shape {list(arr.shape)}: only low-dim (state) keys are supported")
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{where}: {key} has {int(bad.sum())} NaN/inf value(s), the first at row {row}, column {col} "
                        "(float32: values beyond 3.4e38 overflow to inf)")
    return arr


@accepts_obs_dim
def load_episodes(
    path: str | os.PathLike,
    obs_keys: Sequence[str] = ("state",),
    filter_key: str | None = None,
    state_dim: int | None = None,
    action_dim: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Each demo as ``{"name", "obs": [T, state_dim], "actions": [T, act_dim]}`` (float32), validated.

    Observations are the ``obs/<key>`` datasets concatenated in ``obs_keys`` order. ``T``
    is the number of actions; every ``obs/<key>`` must have as many rows (and the demo's
    ``num_samples`` attribute, robomimic's, must agree where present). ``state_dim`` and
    ``action_dim``, when given, are the widths the caller (a policy) expects.

    Checked once, at load: every selected demo has ``actions`` and the requested
    ``obs/<key>`` datasets (numeric, low-dim), as many observation rows as actions, the
    same width of every key and of the actions in every demo (and the expected widths), at
    least one sample, and no NaN or inf. Each failure is a :class:`bac.DataError` naming the
    file and the demo (``... data/demo_7: actions has 40 rows, obs/state 41``); a missing key
    or filter key is also a ``KeyError``, a missing file also a ``FileNotFoundError``.
    """
    if isinstance(obs_keys, str):
        obs_keys = (obs_keys,)
    episodes = []
    widths: dict[str, tuple[int, str]] = {}  # key -> (width, first demo): every demo must agree

    def same_width(key: str, width: int, where: str, name: str) -> None:
        first = widths.setdefault(key, (width, name))
        if first[0] != width:
            raise DataError(f"{where}: {key} is {width} wide, {first[1]}'s is {first[0]}")

    with _open(path) as f:
        for name in _demo_names(f, path, filter_key):
            where = f"{os.fspath(path)}: data/{name}"
            g = f[f"data/{name}"]
            actions = _array(g, "actions", where)
            rows = len(actions)
            if rows == 0:
                raise DataError(f"{where}: actions has 0 rows: a demo needs at least one sample")
            if "num_samples" in g.attrs and int(g.attrs["num_samples"]) != rows:
                raise DataError(f"{where}: num_samples attribute says {int(g.attrs['num_samples'])}, "
                                f"actions has {rows} rows")
            if "obs" not in g or not isinstance(g["obs"], h5py.Group):
                raise DataKeyError(f"{where} has no 'obs' group (has {sorted(g.keys())})")
            parts = []
            for key in obs_keys:
                if key not in g["obs"]:
                    raise DataKeyError(f"{where} has no obs key {key!r} (has {sorted(g['obs'].keys())})")
                arr = _array(g["obs"], key, where + "/obs")
                if len(arr) != rows:
                    raise DataError(f"{where}: actions has {rows} rows, obs/{key} {len(arr)}")
                same_width(f"obs/{key}", arr.shape[1], where, name)
                parts.append(arr)
            same_width("actions", actions.shape[1], where, name)
            obs = np.concatenate(parts, axis=1)
            if state_dim is not None and obs.shape[1] != state_dim:
                raise DataError(f"{where}: observations (obs/{'+'.join(obs_keys)}) are {obs.shape[1]} wide, "
                                f"the policy expects {state_dim}")
            if action_dim is not None and actions.shape[1] != action_dim:
                raise DataError(f"{where}: actions are {actions.shape[1]} wide, the policy expects {action_dim}")
            episodes.append({"name": name, "obs": obs, "actions": actions})
    if not episodes:
        raise DataError(f"{os.fspath(path)} has no demonstrations (filter key {filter_key!r})")
    return episodes


class WindowDataset(torch.utils.data.Dataset):
    """(observation history, action chunk) windows over robomimic-layout demos.

    ``ds[i]`` is ``(obs [n_obs_steps, state_dim], action [horizon, act_dim])`` as float32
    torch tensors (``ds.window(i)`` gives numpy); ``len(ds)`` is the total number of
    timesteps in the selected demos.

    Windows follow ``robomimic.utils.dataset.SequenceDataset(frame_stack=n_obs_steps,
    seq_length=horizon, pad_frame_stack=True, pad_seq_length=True)``: one sample per
    timestep ``t`` of every demo, covering frames ``t - n_obs_steps + 1 ... t + horizon - 1``,
    indices outside the demo clamped to its first / last frame (robomimic's ``pad_same``);
    of that sequence, the observation history ending at ``t`` and the action chunk starting
    at ``t``, the chunk a policy executes from the current observation. (Diffusion Policy's
    reference code instead starts the chunk at the oldest observation, ``t - n_obs_steps + 1``,
    and executes from index ``n_obs_steps - 1``.)

    Args:
        path: HDF5 file in robomimic's layout.
        obs_keys: ``obs/<key>`` datasets to concatenate (``("state",)`` for
            :mod:`envs.collect` files; robomimic lift e.g. ``("object",
            "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")``).
        horizon: action chunk length H.
        n_obs_steps: observation history length.
        filter_key: robomimic filter key under ``mask/`` (``"train"`` / ``"valid"``),
            or None for every demo.
        state_dim, action_dim: the widths the caller expects (a policy's), checked in every demo
            (``obs_dim``: the deprecated name of ``state_dim``).

    The demos are validated once, here (:func:`load_episodes`).
    """

    @accepts_obs_dim
    def __init__(
        self,
        path: str | os.PathLike,
        obs_keys: Sequence[str] = ("state",),
        horizon: int = 16,
        n_obs_steps: int = 2,
        filter_key: str | None = None,
        state_dim: int | None = None,
        action_dim: int | None = None,
    ) -> None:
        if horizon < 1 or n_obs_steps < 1:
            raise ConfigError(f"horizon and n_obs_steps must be >= 1, got {horizon} and {n_obs_steps}")
        self.path = os.fspath(path)
        self.obs_keys = (obs_keys,) if isinstance(obs_keys, str) else tuple(obs_keys)
        self.horizon = int(horizon)
        self.n_obs_steps = int(n_obs_steps)
        self.filter_key = filter_key
        episodes = load_episodes(path, self.obs_keys, filter_key, state_dim=state_dim, action_dim=action_dim)
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
    def state_dim(self) -> int:
        """The width of an observation (``observation.state``)."""
        return int(self.obs.shape[1])

    @property
    def obs_dim(self) -> int:
        """Deprecated: :attr:`state_dim`."""
        warnings.warn("WindowDataset.obs_dim is deprecated: use state_dim", DeprecationWarning, stacklevel=2)
        return self.state_dim

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


@accepts_obs_dim
def calibration_observations(
    path: str | os.PathLike,
    n: int,
    seed: int = 0,
    obs_keys: Sequence[str] = ("state",),
    n_obs_steps: int = 2,
    filter_key: str | None = None,
    state_dim: int | None = None,
) -> np.ndarray:
    """``n`` observation histories ``[n, n_obs_steps, state_dim]`` (float32) from demos.

    Caching plans are calibrated on what the policy sees in its training distribution,
    not on evaluation episodes (which would leak the test set). Timesteps are drawn
    uniformly over all frames of the selected demos (so every phase of the task is
    represented), without replacement when ``n`` allows, from ``seed``; histories are
    padded at demo starts like the training windows. ``state_dim``: the policy's, checked in every demo.
    """
    ds = WindowDataset(path, obs_keys, horizon=1, n_obs_steps=n_obs_steps, filter_key=filter_key, state_dim=state_dim)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=n, replace=n > len(ds))
    return ds.window(idx)[0]


def _frames(g: h5py.Group, key: str, where: str, rows: int, image_size: int | None) -> np.ndarray:
    """A demo's ``obs/<camera>_image`` as uint8 ``[T, S, S, 3]``, checked."""
    if key not in g["obs"] or not isinstance(g["obs"][key], h5py.Dataset):
        raise DataKeyError(f"{where} has no obs key {key!r} (has {sorted(g['obs'].keys())})")
    frames = g["obs"][key]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise DataError(f"{where}: obs/{key} must be uint8 [T, H, W, 3] frames, got {frames.dtype} {list(frames.shape)}")
    if len(frames) != rows:
        raise DataError(f"{where}: actions has {rows} rows, obs/{key} {len(frames)}")
    if image_size is not None and frames.shape[1:3] != (image_size, image_size):
        raise DataError(f"{where}: obs/{key} frames are {frames.shape[2]} x {frames.shape[1]}, the policy reads "
                        f"{image_size} x {image_size}")
    return frames[()]


class ImageLanguageWindows:
    """Training windows of a language-labelled image dataset (``envs.collect`` with ``cameras``).

    ``windows`` is the :class:`WindowDataset` over the ``state_keys`` (e.g. ``("hand_pos", "gripper")``)
    and the actions; ``frames[camera]`` holds every frame of the selected demos, uint8
    ``[N, S, S, 3]`` in the same flat order, so window ``i``'s current image is ``frames[camera][i]``;
    ``instructions[i]`` is the instruction of window ``i``'s demo (its ``attrs["instruction"]``). Every
    demo must have the frames (uint8, one per action, ``image_size`` square when given) and an
    instruction; each failure is a :class:`bac.DataError` naming the file and the demo.
    """

    def __init__(self, path: str | os.PathLike, state_keys: Sequence[str], cameras: Sequence[str], horizon: int,
                 n_obs_steps: int = 1, filter_key: str | None = None, state_dim: int | None = None,
                 action_dim: int | None = None, image_size: int | None = None) -> None:
        self.windows = WindowDataset(path, state_keys, horizon, n_obs_steps, filter_key, state_dim, action_dim)
        self.cameras = tuple(cameras)
        frames: dict[str, list[np.ndarray]] = {camera: [] for camera in self.cameras}
        instructions: list[str] = []
        with _open(path) as f:
            for name, start, end in zip(self.windows.demos, self.windows._starts, self.windows.episode_ends):
                where = f"{os.fspath(path)}: data/{name}"
                g = f[f"data/{name}"]
                for camera in self.cameras:
                    frames[camera].append(_frames(g, f"{camera}_image", where, int(end - start), image_size))
                text = g.attrs.get("instruction")
                if isinstance(text, bytes):
                    text = text.decode("utf-8")
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{where} has no instruction attribute (collect with cameras=[...] on a task "
                                    "of envs.instructions)")
                instructions += [text] * int(end - start)
        self.frames = {camera: np.concatenate(parts) for camera, parts in frames.items()}
        self.instructions = instructions

    def __len__(self) -> int:
        return len(self.windows)
