"""Rollout videos as animated GIFs (Pillow, which the ``plots`` extra brings with matplotlib).

Frames come from :class:`bac.envs.metaworld_env.MetaWorldStateEnv` with
``render_mode="rgb_array"`` (fast settings, corner cameras right side up);
:func:`bac.runtime.record_episode` records one evaluated episode with a frame per
step. Meta-World runs at 80 control steps per second, and GIF players do not show
more than 50 frames per second, so a video at the default 25 fps plays at about a
third of real time (a 200-step episode lasts 8 s).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["video_path", "write_video"]

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


def video_path(out_dir: str | Path, method: str, task: str) -> Path:
    """``<out_dir>/videos/<method>-<task>.gif`` (characters unsafe in file names become ``_``)."""
    safe = re.sub(r"[^\w.,=+-]", "_", f"{method}-{task}")
    return Path(out_dir) / "videos" / f"{safe}.gif"
