"""Rollout videos: one recorded, seeded episode per policy and task, as an animated GIF.

``act(obs_history) -> actions`` is the same batched policy call as closed-loop evaluation
uses, at batch 1: ``obs_history`` is ``[1, n_obs_steps, obs_dim]`` float32, the result
``[1, n, action_dim]`` (numpy or torch). The episode is run the way the evaluation runs
its episodes: the history starts as the first observation repeated, every action is
clipped to [-1, 1], the ``n`` actions of a chunk are executed open loop before the policy
is called again (receding horizon), and the episode ends at its first success or at the
task's step cap. Frames come from :class:`envs.metaworld_env.MetaWorldStateEnv` with
``render_mode="rgb_array"`` (fast settings, corner cameras right side up): one frame at
reset and one after every step. Rendering does not change the state observations, so
the recorded episode is the episode the policy would have had without a camera.

GIFs are written with Pillow (a dependency of matplotlib, the ``plots`` extra); nothing
else is needed. Meta-World runs at 80 control steps per second, and GIF players do not
show more than 50 frames per second, so a video at the default 25 fps plays at about a
third of real time (a 200-step episode lasts 8 s).

Only ``write_video`` is light; the recording functions import Meta-World on first use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["RecordedEpisode", "record_episode", "save_videos", "video_path", "write_video"]

#: A batched policy call, ``[1, n_obs_steps, obs_dim] -> [1, n, action_dim]``.
ActFn = Callable[[np.ndarray], Any]

#: GIF frame delays are whole centiseconds and players clamp delays under 20 ms.
_MAX_GIF_FPS = 50.0


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: float = 25.0) -> Path:
    """Write ``[H, W, 3]`` uint8 frames as an animated GIF (looping) and return its path.

    One palette, made from a few frames spread over the episode, serves every frame, so
    colours do not flicker from frame to frame. Above 50 fps (what GIF players show)
    frames are dropped evenly so that the video keeps its speed. Pillow stores identical
    consecutive frames once, with their durations added.
    """
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"write_video writes GIFs; got {path.name!r}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError("no frames to write")
    shape = frames[0].shape
    for f in frames:
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.shape != shape:
            raise ValueError(f"frames must all be [H, W, 3] uint8 of one size; got {f.shape} {f.dtype} after {shape}")
    stride = max(1, int(np.ceil(fps / _MAX_GIF_FPS)))
    frames = frames[::stride]
    duration_ms = max(20, int(round(1000.0 * stride / fps / 10.0)) * 10)

    # One shared adaptive palette from (up to) 16 frames spread over the episode.
    picks = [frames[i] for i in np.linspace(0, len(frames) - 1, min(16, len(frames))).round().astype(int)]
    palette = Image.fromarray(np.concatenate(picks, axis=0)).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, optimize=False
    )
    return path


@dataclass
class RecordedEpisode:
    """One recorded episode: ``frames`` (``steps + 1`` of them, ``[H, W, 3]`` uint8)."""

    task: str
    seed: int
    success: bool
    steps: int
    frames: list[np.ndarray] = field(repr=False)


def _to_numpy(chunk: Any) -> np.ndarray:
    if hasattr(chunk, "detach"):  # a torch tensor, without importing torch here
        chunk = chunk.detach().cpu().numpy()
    return np.asarray(chunk)


def record_episode(
    act: ActFn,
    task: str,
    seed: int,
    *,
    n_obs_steps: int = 2,
    max_steps: int | None = None,
    camera_name: str = "corner",
    size: int | tuple[int, int] = 128,
) -> RecordedEpisode:
    """Run one seeded episode of ``task`` under ``act`` and keep a frame per step.

    Args:
        act: ``[1, n_obs_steps, obs_dim] -> [1, n, action_dim]`` (see the module doc).
        seed: the episode's seed (its object and goal configuration), as in evaluation.
        n_obs_steps: length of the observation history the policy gets.
        max_steps: step cap; ``None`` is the task's evaluation cap
            (:data:`envs.tasks.MAX_EPISODE_STEPS`).
        camera_name: one of :data:`envs.metaworld_env.CAMERAS`.
        size: frame size, ``s`` for ``s x s`` or ``(height, width)``.
    """
    from .metaworld_env import MetaWorldStateEnv

    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    env = MetaWorldStateEnv(
        task,
        max_episode_steps=max_steps,
        terminate_on_success=True,
        render_mode="rgb_array",
        camera_name=camera_name,
        width=width,
        height=height,
    )
    try:
        obs, _ = env.reset(seed=int(seed))
        frames = [env.render()]
        history = np.repeat(obs[None, None].astype(np.float32), n_obs_steps, axis=1)
        success, steps, done = False, 0, False
        while not done:
            chunk = _to_numpy(act(history))
            if chunk.ndim != 3 or chunk.shape[0] != 1 or chunk.shape[1] < 1:
                raise ValueError(f"policy returned actions of shape {chunk.shape}, expected [1, n >= 1, action_dim]")
            for action in chunk[0]:
                obs, _, terminated, truncated, info = env.step(np.clip(action, -1.0, 1.0))
                steps += 1
                success |= bool(info["success"])
                frames.append(env.render())
                history = np.concatenate([history[:, 1:], obs[None, None].astype(np.float32)], axis=1)
                if terminated or truncated:
                    done = True
                    break
        return RecordedEpisode(task=env.task, seed=int(seed), success=success, steps=steps, frames=frames)
    finally:
        env.close()


def video_path(out_dir: str | Path, method: str, task: str) -> Path:
    """``<out_dir>/videos/<method>-<task>.gif`` (characters unsafe in file names become ``_``)."""
    safe = re.sub(r"[^\w.,=+-]", "_", f"{method}-{task}")
    return Path(out_dir) / "videos" / f"{safe}.gif"


def save_videos(
    acts: Mapping[str, Callable[[str, int], ActFn]],
    tasks: Iterable[str],
    out_dir: str | Path,
    *,
    seed: int | Mapping[str, int] = 0,
    n_obs_steps: int = 2,
    max_steps: int | None = None,
    camera_name: str = "corner",
    size: int | tuple[int, int] = 128,
    fps: float = 25.0,
    overwrite: bool = False,
) -> list[dict]:
    """Record one episode per method and task and write ``<out_dir>/videos/<method>-<task>.gif``.

    Args:
        acts: per method name, a factory ``make_act(task, seed) -> act`` that returns the
            batch-1 policy call for that task's recorded episode (seed its noise generator
            from ``seed`` to make the video reproducible, as the evaluation does).
        tasks: the tasks to record.
        seed: the recorded episode's seed, one for every task or one per task.
        n_obs_steps, max_steps, camera_name, size: as in :func:`record_episode`.
        fps: playback rate of the GIFs.
        overwrite: re-record videos that already exist (else they are skipped, so an
            interrupted run resumes).

    Returns:
        One record per (method, task): ``{"method", "task", "seed", "path", "success",
        "steps", "skipped"}`` (``success`` and ``steps`` are ``None`` when skipped).
    """
    tasks = list(tasks)
    records = []
    for method, make_act in acts.items():
        for task in tasks:
            task_seed = int(seed[task] if isinstance(seed, Mapping) else seed)
            path = video_path(out_dir, method, task)
            record = {"method": method, "task": task, "seed": task_seed, "path": str(path)}
            if path.exists() and not overwrite:
                records.append({**record, "success": None, "steps": None, "skipped": True})
                continue
            episode = record_episode(
                make_act(task, task_seed), task, task_seed, n_obs_steps=n_obs_steps, max_steps=max_steps,
                camera_name=camera_name, size=size,
            )  # fmt: skip
            # Write to a temporary name first: an interrupted write leaves no half video
            # that a resumed run would skip.
            partial = path.with_name(path.stem + ".partial.gif")
            write_video(episode.frames, partial, fps=fps)
            partial.replace(path)
            records.append({**record, "success": episode.success, "steps": episode.steps, "skipped": False})
    return records
