"""Seeded episodes of a chunking policy on gymnasium vector envs, in waves of ``num_envs``.

The policy is driven through its interface: ``reset()`` at the start of a wave, then one
``select_action(batch)`` per environment step, so each chunk from the policy's action queue is executed
open loop; actions are clipped to the action space. One seed per environment; an episode ends at its first
success or at the step cap. The runtime holds no task knowledge: environments come from an
:data:`EnvFactory`, and an environment whose observation concatenates named parts lists them in
``metadata["observation_slices"]``, which a policy's ``observation.state`` feature may select by its
``keys``. docs/guide/realtime.md ("Chunked execution in environments").
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
import torch

from bac.policies.constants import ACTION, IMAGE_PREFIX, STATE, TASK
from bac.policies.vla import frames_to_images


class EnvFactory(Protocol):
    """Makes a vector env of ``num_envs`` copies of a task (``make_vector_env(task, n, ...)``'s signature)."""

    def __call__(self, task: str, num_envs: int, *, max_episode_steps: int | None = None,
                 terminate_on_success: bool = False, **render: Any) -> gym.vector.VectorEnv: ...


def observation_slices(env: gym.Env | gym.vector.VectorEnv) -> Mapping[str, slice] | None:
    """The named parts of an environment's observation (``metadata["observation_slices"]``), if it names them."""
    return env.metadata.get("observation_slices")


@runtime_checkable
class ChunkingPolicy(Protocol):
    """What the runtime needs of a policy (LeRobot's ``PreTrainedPolicy`` interface)."""

    input_features: Mapping[str, Any]
    output_features: Mapping[str, Any]
    device: torch.device

    def reset(self) -> None: ...

    def select_action(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor: ...

    def predict_action_chunk(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                             num_actions: int | None = None) -> torch.Tensor: ...


def _shape(feature: Any) -> tuple[int, ...]:
    return tuple(feature.shape)


def _cameras(policy: ChunkingPolicy) -> list[str]:
    return [name.removeprefix(IMAGE_PREFIX) for name in policy.input_features if name.startswith(IMAGE_PREFIX)]


def render_settings(policy: ChunkingPolicy) -> dict[str, int]:
    """Frame size of the cameras a policy reads (``width``, ``height``; empty for a state-only policy)."""
    cameras = _cameras(policy)
    if not cameras:
        return {}
    size = _shape(policy.input_features[IMAGE_PREFIX + cameras[0]])[-1]
    return {"width": size, "height": size}


def state_slices(policy: ChunkingPolicy, named: Mapping[str, slice] | None) -> list[slice] | None:
    """The parts of the environment observation the policy's ``observation.state`` concatenates
    (its feature's ``keys``, among the environment's ``named`` parts), or None for all of it."""
    keys = getattr(policy.input_features.get(STATE), "keys", None)
    if keys is None:
        return None
    named = named or {}
    unknown = [k for k in keys if k not in named]
    if unknown:
        raise ValueError(f"the policy's {STATE!r} reads {unknown}, which the environment's observation does not "
                         f"name (it names {sorted(named)})")
    return [named[k] for k in keys]


def check_compatible(policy: ChunkingPolicy, observation_space: gym.Space, action_space: gym.Space,
                     named_slices: Mapping[str, slice] | None = None) -> None:
    """Raise ``ValueError`` unless the policy's features fit one environment's spaces
    (``named_slices``: the environment's :func:`observation_slices`)."""
    inputs, outputs = policy.input_features, policy.output_features
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"the runtime maps Box observations to {STATE!r}; got a {type(observation_space).__name__}")
    width = observation_space.shape
    slices = state_slices(policy, named_slices) if STATE in inputs else None
    if slices is not None:
        width = (sum(len(range(*sl.indices(observation_space.shape[0]))) for sl in slices),)
    if STATE not in inputs or _shape(inputs[STATE]) != tuple(width):
        keys = f" (its keys {list(inputs[STATE].keys)})" if slices is not None else ""
        raise ValueError(f"the policy's {STATE!r} is {list(_shape(inputs[STATE])) if STATE in inputs else 'absent'}, "
                         f"the environment's observations are {list(width)}{keys}")
    if not isinstance(action_space, gym.spaces.Box) or _shape(outputs[ACTION]) != tuple(action_space.shape):
        raise ValueError(f"the policy's actions are {list(_shape(outputs['action']))}, "
                         f"the environment's action space is {action_space}")


def observation_batch(obs: np.ndarray, task: str | list[str], policy: ChunkingPolicy | None = None,
                      venv: gym.vector.VectorEnv | None = None, active: np.ndarray | None = None,
                      render: bool | None = None, named_slices: Mapping[str, slice] | None = None) -> dict[str, Any]:
    """The policy batch of a vector env's observations ``[B, D]``: float32 ``observation.state`` and ``task``
    (a task name, or one instruction per env).

    With ``policy``, the state is the parts of the observation its feature names (:func:`state_slices`;
    the parts are ``venv``'s :func:`observation_slices`, or ``named_slices``),
    and, when ``venv`` is given and the policy is about to sample a chunk (``policy.chunk_due``), every
    camera it reads is rendered into ``observation.images.<camera>`` (``[B, 3, H, W]`` float in [0, 1]);
    ``render=True``/``False`` decides that instead of ``chunk_due`` (a runtime that samples chunks itself).
    ``active`` (bool ``[B]``): only those envs of a synchronous vector env are rendered; the others (finished
    episodes, whose actions are discarded) get black frames. Rendering is most of a step's cost, and every
    sample of a batch is computed independently, so the active envs' actions do not change (tested).
    """
    obs = np.asarray(obs)
    if named_slices is None and venv is not None:
        named_slices = observation_slices(venv)
    slices = state_slices(policy, named_slices) if policy is not None else None
    state = obs if slices is None else np.concatenate([obs[:, sl] for sl in slices], axis=1)
    batch = {STATE: torch.as_tensor(state.astype(np.float32)),
             TASK: [task] * obs.shape[0] if isinstance(task, str) else list(task)}
    if render is None:
        render = bool(getattr(policy, "chunk_due", True))
    if policy is not None and venv is not None and render:
        for camera in _cameras(policy):
            if active is None or not active.any() or not hasattr(venv, "envs"):  # AsyncVectorEnv: render all
                frames = np.stack(venv.call("render_camera", camera))
            else:
                rendered = {i: venv.envs[i].get_wrapper_attr("render_camera")(camera)
                            for i in np.flatnonzero(active)}
                blank = np.zeros_like(next(iter(rendered.values())))
                frames = np.stack([rendered.get(i, blank) for i in range(len(active))])
            batch[IMAGE_PREFIX + camera] = frames_to_images(frames)
    return batch


class EnvPool:
    """Keeps the vector env of the last wave for the next wave of the same shape.

    Building a simulated env (a MuJoCo model, and a GL context where it renders) can cost more than
    an episode of it; every wave resets each env with its own seed, so a reused env runs exactly the
    episode a new one would (tested). ``make_env`` builds the envs. Use it as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, make_env: EnvFactory) -> None:
        self.make_env = make_env
        self._key: tuple | None = None
        self._venv: gym.vector.VectorEnv | None = None

    def get(self, task: str, num_envs: int, max_episode_steps: int | None, render: Mapping[str, Any]):
        """A vector env of ``num_envs`` copies of ``task`` (the pooled one when its shape is the same)."""
        key = (task, num_envs, max_episode_steps, tuple(sorted(render.items())))
        if key != self._key:
            self.close()
            self._venv = self.make_env(task, num_envs, max_episode_steps=max_episode_steps,
                                         terminate_on_success=True, **render)
            self._key = key
        return self._venv

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
        self._venv, self._key = None, None

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_episodes(
    policy: ChunkingPolicy,
    task: str,
    seeds: Iterable[int],
    *,
    num_envs: int = 10,
    max_episode_steps: int | None = None,
    generator: torch.Generator | None = None,
    instructions: Callable[[int], str] | None = None,
    make_env: EnvFactory | None = None,
    envs: EnvPool | None = None,
    on_step: Callable[[gym.vector.VectorEnv], None] | None = None,
) -> Iterator[dict]:
    """Yield one result per seed, ``{"seed", "success", "steps"}``, as each wave of ``num_envs`` finishes.

    ``generator`` (default: torch's global RNG) draws the sampling noise of every wave in turn.
    ``instructions(seed)``: the instruction of each episode, for a policy that reads instructions
    (``policy.reads_instructions``; required for it, refused otherwise). Cameras a policy reads are
    rendered at its image size when it samples a chunk. ``make_env`` builds the envs (closed at the end);
    or ``envs``, an :class:`EnvPool` that outlives this call (an evaluator running several methods on one task).
    ``on_step(venv)``: see :func:`run_wave` (e.g. a progress bar that moves with the steps).
    """
    if (make_env is None) == (envs is None):
        raise ValueError("run_episodes needs make_env (an env factory, e.g. bac.envs.metaworld_env.make_vector_env) "
                         "or envs (an EnvPool), not both")
    seeds = [int(s) for s in seeds]
    render = render_settings(policy)
    pool = envs if envs is not None else EnvPool(make_env)
    try:
        for start in range(0, len(seeds), num_envs):
            wave = seeds[start : start + num_envs]
            venv = pool.get(task, len(wave), max_episode_steps, render)
            yield from run_wave(policy, venv, task, wave, generator=generator, instructions=instructions,
                                on_step=on_step)
    finally:
        if envs is None:
            pool.close()


def run_wave(policy: ChunkingPolicy, venv: gym.vector.VectorEnv, task: str, seeds: list[int], *,
             generator: torch.Generator | None = None,
             on_step: Callable[[gym.vector.VectorEnv], None] | None = None,
             instructions: Callable[[int], str] | None = None) -> list[dict]:
    """One wave: reset ``venv`` with one seed per env, step until every episode is done.

    ``on_step(venv)`` runs after the reset and after every step (e.g. to render a frame).
    ``instructions``: see :func:`run_episodes`. Finished episodes' camera inputs are black frames
    (see :func:`observation_batch`).
    """
    check_compatible(policy, venv.single_observation_space, venv.single_action_space, observation_slices(venv))
    reads_instructions = bool(getattr(policy, "reads_instructions", False))
    if reads_instructions != (instructions is not None):
        raise ValueError("this policy reads free-text instructions: pass instructions=(seed -> instruction)"
                         if reads_instructions else "this policy reads task names, not instructions")
    task_input = [instructions(s) for s in seeds] if instructions is not None else task
    low, high = venv.single_action_space.low, venv.single_action_space.high
    obs, _ = venv.reset(seed=seeds)
    policy.reset()
    if on_step is not None:
        on_step(venv)
    done = np.zeros(len(seeds), dtype=bool)
    success = np.zeros(len(seeds), dtype=bool)
    steps = np.zeros(len(seeds), dtype=int)
    while not done.all():
        batch = observation_batch(obs, task_input, policy, venv, active=~done)
        action = policy.select_action(batch, generator=generator)
        action = action.detach().cpu().numpy() if isinstance(action, torch.Tensor) else np.asarray(action)
        if action.shape != (len(seeds), *venv.single_action_space.shape):
            raise ValueError(f"policy returned actions of shape {list(action.shape)}, expected "
                             f"{[len(seeds), *venv.single_action_space.shape]}")
        obs, _, terminated, truncated, info = venv.step(np.clip(action, low, high))
        if on_step is not None:
            on_step(venv)
        active = ~done
        steps[active] += 1
        success[active] |= np.asarray(info["success"], dtype=bool)[active]
        done |= active & (terminated | truncated)
    policy.reset()
    return [{"seed": s, "success": bool(ok), "steps": int(n)} for s, ok, n in zip(seeds, success, steps)]


def record_episode(
    policy: ChunkingPolicy,
    task: str,
    seed: int,
    *,
    make_env: EnvFactory,
    generator: torch.Generator | None = None,
    max_episode_steps: int | None = None,
    camera_name: str = "corner",
    size: int = 128,
) -> tuple[dict, list[np.ndarray]]:
    """One seeded episode run exactly as :func:`run_episodes` runs it, with a ``[size, size, 3]`` frame per step
    (``make_env``: the env factory, which takes ``render_mode``, ``camera_name``, ``width`` and ``height``).

    Returns the episode's result (``{"seed", "success", "steps"}``) and its ``steps + 1``
    frames (one after the reset, one after every step). Rendering does not change the
    state observations, so with the same ``generator`` this is the evaluated episode.
    """
    frames: list[np.ndarray] = []
    venv = make_env(task, 1, max_episode_steps=max_episode_steps, terminate_on_success=True,
                           render_mode="rgb_array", camera_name=camera_name, width=size, height=size)
    try:
        [result] = run_wave(policy, venv, task, [int(seed)], generator=generator,
                            on_step=lambda v: frames.append(v.render()[0]))
    finally:
        venv.close()
    return result, frames[: result["steps"] + 1]
