"""Training windows of a task list, demonstrations collected on demand (:mod:`bac.envs.collect`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .collect import collect
from .dataset import ImageLanguageWindows, WindowDataset, accepts_obs_dim


@dataclass
class TrainingWindows:
    """Every training window of a task list.

    ``state`` ``[N, To, D]`` and ``actions`` ``[N, H, A]``; ``task_index`` ``[N]`` indexes the task list, or, for
    a vision-language head, ``instructions``; ``frames``: each camera's current frame per window (uint8
    ``[N, S, S, 3]``); ``sources``: per task, the file and the number of demonstrations and windows.
    """

    state: torch.Tensor
    actions: torch.Tensor
    task_index: torch.Tensor
    sources: dict
    frames: dict[str, torch.Tensor] = field(default_factory=dict)
    instructions: list[str] | None = None


@accepts_obs_dim
def load_windows(tasks: list[str], episodes: int, data_dir, horizon: int, n_obs_steps: int,
                 action_noise: float = 0.0, state_dim: int | None = None, action_dim: int | None = None):
    """All training windows of every task (``task_index``: the task's position in ``tasks``).

    Every demo is validated at load (:mod:`bac.envs.dataset`: keys, lengths, NaN); its widths must be
    ``state_dim`` / ``action_dim`` when given, and otherwise those of the first task's file (one policy
    is trained on all of them). Each failure is a :class:`bac.DataError` naming the file and the demo.
    """
    obs, actions, task_index, sources = [], [], [], {}
    for i, task in enumerate(tasks):
        path = collect(task, episodes, out_dir=data_dir, action_noise=action_noise, progress=False)
        data = WindowDataset(path, horizon=horizon, n_obs_steps=n_obs_steps, filter_key="train",
                             state_dim=state_dim, action_dim=action_dim)
        state_dim, action_dim = data.state_dim, data.action_dim
        o, a = data.window(np.arange(len(data)))
        obs.append(o)
        actions.append(a)
        task_index.append(np.full(len(data), i))
        sources[task] = {"file": path.name, "train_demos": len(data.demos), "windows": len(data)}
    as_tensor = lambda parts, dtype: torch.as_tensor(np.concatenate(parts), dtype=dtype)
    return TrainingWindows(as_tensor(obs, torch.float32), as_tensor(actions, torch.float32),
                           as_tensor(task_index, torch.long), sources)


def load_image_windows(tasks: list[str], episodes: int, data_dir, horizon: int, n_obs_steps: int, action_noise: float,
                       state_keys: list[str], cameras: tuple[str, ...], image_size: int):
    """The windows of a vision-language-action head, with every
    window's current frame per camera (uint8 ``[N, S, S, 3]``, kept as uint8 in memory) and the index
    of its instruction in the returned list of instructions."""
    state, actions, frames, instruction_index, instructions, sources = [], [], {c: [] for c in cameras}, [], [], {}
    for task in tasks:
        path = collect(task, episodes, out_dir=data_dir, action_noise=action_noise, progress=False,
                       cameras=cameras, image_size=image_size)
        data = ImageLanguageWindows(path, state_keys, cameras, horizon, n_obs_steps, "train", image_size=image_size)
        o, a = data.windows.window(np.arange(len(data)))
        state.append(o)
        actions.append(a)
        for camera in cameras:
            frames[camera].append(data.frames[camera])
        for text in data.instructions:
            if text not in instructions:
                instructions.append(text)
        instruction_index.append(np.array([instructions.index(t) for t in data.instructions]))
        sources[task] = {"file": path.name, "train_demos": len(data.windows.demos), "windows": len(data)}
    return TrainingWindows(torch.as_tensor(np.concatenate(state)), torch.as_tensor(np.concatenate(actions)),
                           torch.as_tensor(np.concatenate(instruction_index)), sources,
                           frames={c: torch.as_tensor(np.concatenate(f)) for c, f in frames.items()},
                           instructions=instructions)
