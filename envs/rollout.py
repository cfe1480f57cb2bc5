"""Seeded closed-loop rollouts of an action-chunking policy on gymnasium vector envs.

``act(obs_history) -> actions`` is any batched policy call: ``obs_history`` is
``[B, n_obs_steps, obs_dim]`` (float32), the result ``[B, n, action_dim]``; the
``n`` actions are executed open loop before the policy is called again (Diffusion
Policy's receding horizon). At reset the history repeats the first observation,
as the training windows are padded. Episodes run in waves of ``num_envs``, one
seed each; an episode ends at its first success or at the task's step cap, and
its result is final from then on (envs that finish early idle until the wave ends).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .metaworld_env import make_vector_env

ActFn = Callable[[np.ndarray], np.ndarray | torch.Tensor]


def run_episodes(
    act: ActFn,
    task: str,
    seeds: Iterable[int],
    *,
    n_obs_steps: int = 2,
    num_envs: int = 10,
    max_episode_steps: int | None = None,
) -> Iterator[dict]:
    """Yield one result per seed, ``{"seed", "success", "steps"}``, as each wave finishes."""
    seeds = [int(s) for s in seeds]
    for start in range(0, len(seeds), num_envs):
        wave = seeds[start : start + num_envs]
        venv = make_vector_env(task, len(wave), max_episode_steps=max_episode_steps, terminate_on_success=True)
        try:
            yield from _run_wave(act, venv, wave, n_obs_steps)
        finally:
            venv.close()


def _run_wave(act: ActFn, venv, seeds: list[int], n_obs_steps: int) -> list[dict]:
    obs, _ = venv.reset(seed=seeds)
    history = np.repeat(obs[:, None].astype(np.float32), n_obs_steps, axis=1)
    done = np.zeros(len(seeds), dtype=bool)
    success = np.zeros(len(seeds), dtype=bool)
    steps = np.zeros(len(seeds), dtype=int)
    while not done.all():
        chunk = act(history)
        chunk = chunk.detach().cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
        if chunk.ndim != 3 or chunk.shape[0] != len(seeds):
            raise ValueError(f"policy returned actions of shape {chunk.shape}, expected [{len(seeds)}, n, action_dim]")
        for action in chunk.transpose(1, 0, 2):
            obs, _, terminated, truncated, info = venv.step(np.clip(action, -1.0, 1.0))
            active = ~done
            steps[active] += 1
            success[active] |= np.asarray(info["success"], dtype=bool)[active]
            done |= active & (terminated | truncated)
            history = np.concatenate([history[:, 1:], obs[:, None].astype(np.float32)], axis=1)
            if done.all():
                break
    return [{"seed": s, "success": bool(ok), "steps": int(n)} for s, ok, n in zip(seeds, success, steps)]
