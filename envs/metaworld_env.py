"""Meta-World v3 tasks as seeded, goal-observable, state-only gymnasium environments.

Two Meta-World traps make naive use silently meaningless, and both are handled here: the default
environments hide the goal in the observation (we build the goal-observable classes), and those classes
freeze their object/goal vector (we unfreeze it and draw it from ``env.np_random``, so ``reset(seed=s)``
gives one configuration per seed). ``render_mode="rgb_array"`` renders frames with fast settings. The
observation and action layout, the traps and the rendering settings: docs/guide/policies.md ("Simulated
tasks"). The task list, episode caps and gymnasium registration live in :mod:`envs.tasks` (re-exported
here), which needs neither Meta-World nor MuJoCo.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import warnings
import weakref
from typing import Any

import gymnasium as gym
import numpy as np

try:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
    from metaworld.policies import ENV_POLICY_MAP
    from metaworld.policies.sawyer_reach_v3_policy import SawyerReachV3Policy
except ImportError as exc:  # pragma: no cover - message for a missing optional dependency
    raise ImportError(
        "envs.metaworld_env needs metaworld==3.1.1 (and `packaging`, which it imports "
        "without declaring)"
    ) from exc
import mujoco

from .tasks import (
    ALL_TASKS,
    DEFAULT_SUITE,
    MAX_EPISODE_STEPS,
    METAWORLD_MAX_PATH_LENGTH as _METAWORLD_MAX_PATH_LENGTH,
    check_task as _check_task,
    env_id,
    register_envs,
)

__all__ = [
    "ALL_TASKS",
    "DEFAULT_SUITE",
    "HAND_ABOVE_TCP",
    "MAX_EPISODE_STEPS",
    "OBS_SLICES",
    "CAMERAS",
    "MetaWorldStateEnv",
    "env_id",
    "expert_action",
    "expert_policy",
    "make_env",
    "make_vector_env",
    "register_envs",
]

#: Named slices of the 39-d observation (used to write split observation keys).
OBS_SLICES: dict[str, slice] = {
    "hand_pos": slice(0, 3),
    "gripper": slice(3, 4),
    "object": slice(4, 18),
    "goal_pos": slice(36, 39),
}


#: Cameras of the Meta-World v3 scene (every task has them). ``corner`` .. ``corner4``
#: are mounted upside down and come out turned right side up; ``topview`` looks straight
#: down; ``behindGripper`` and ``gripperPOV`` move with the hand.
CAMERAS: tuple[str, ...] = (
    "corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV",
)  # fmt: skip

_GL_BACKENDS = ("egl", "osmesa", "glfw")


def _gl_context(width: int, height: int):
    """An offscreen OpenGL context: ``MUJOCO_GL``'s backend, else the first that works."""
    requested = os.environ.get("MUJOCO_GL", "").strip().lower()
    order = (requested,) if requested in _GL_BACKENDS else _GL_BACKENDS
    errors = []
    for name in order:
        try:
            context = importlib.import_module(f"mujoco.{name}").GLContext(width, height)
            context.make_current()
            return context
        except Exception as exc:  # noqa: BLE001 - report every backend's failure at once
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise RuntimeError(
        "MuJoCo offscreen rendering found no working OpenGL backend (set MUJOCO_GL=egl with "
        "Debian's libegl1 and libgl1-mesa-dri, or MUJOCO_GL=osmesa with libosmesa6). "
        "Tried: " + "; ".join(errors)
    )


_LIVE_RENDERERS: weakref.WeakSet = weakref.WeakSet()
_CLOSE_AT_EXIT = []


def _close_renderers() -> None:
    for renderer in list(_LIVE_RENDERERS):
        renderer.close()


class _FastRenderer:
    """Offscreen RGB frames of one camera, with the fast settings of docs/guide/policies.md ("Rendering").

    Meta-World's 4x multisampling and shadows are almost all of a frame's cost on a CPU:
    ``offsamples = 0`` (read when the GL context is made, so set before the first render)
    and the scene's shadow and reflection flags off remove them. Made on the first
    ``render()``, so environments that never render need no OpenGL at all.
    """

    def __init__(self, model, camera: str, width: int, height: int, fast: bool = True) -> None:
        camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if camera_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise ValueError(f"unknown camera {camera!r}; this scene has {names}")
        if fast:
            model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
        self._model = model
        self._gl = _gl_context(width, height)
        self._con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._con)
        self._scene = mujoco.MjvScene(model, maxgeom=1000)
        if fast:
            self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._option = mujoco.MjvOption()
        self._perturb = mujoco.MjvPerturb()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = camera_id
        self._camera_id = camera_id
        self._rect = mujoco.MjrRect(0, 0, width, height)
        self._rgb = np.empty((height, width, 3), dtype=np.uint8)
        self._upside_down: bool | None = None  # decided on the first frame
        _LIVE_RENDERERS.add(self)
        if not _CLOSE_AT_EXIT:
            # After the GL backend's own exit hook (EGL registers eglTerminate on its
            # first context), so this one runs first and frees contexts while it can.
            atexit.register(_close_renderers)
            _CLOSE_AT_EXIT.append(True)

    def render(self, data) -> np.ndarray:
        if self._con is None:
            raise RuntimeError("render() after close()")
        if self._upside_down is None:
            # A camera whose image "up" points down in the world (Meta-World's corner
            # cameras) is turned 180 degrees: a rolled camera, not a mirrored image.
            self._upside_down = bool(data.cam_xmat[self._camera_id].reshape(3, 3)[2, 1] < 0)
        self._gl.make_current()
        mujoco.mjv_updateScene(
            self._model, data, self._option, self._perturb, self._camera,
            mujoco.mjtCatBit.mjCAT_ALL, self._scene,
        )  # fmt: skip
        mujoco.mjr_render(self._rect, self._scene, self._con)
        mujoco.mjr_readPixels(self._rgb, None, self._rect, self._con)
        # OpenGL rows run bottom-up: flip vertically; a 180-degree turn on top of that
        # leaves only the horizontal flip.
        frame = self._rgb[:, ::-1] if self._upside_down else self._rgb[::-1]
        return np.ascontiguousarray(frame)

    def close(self) -> None:
        if self._con is not None:
            try:
                self._gl.make_current()
                self._con.free()
                self._gl.free()
            except Exception:  # noqa: BLE001 - the GL library may be gone at exit
                pass
            self._con = None
        _LIVE_RENDERERS.discard(self)

    def __del__(self) -> None:
        self.close()


class MetaWorldStateEnv(gym.Env):
    """One Meta-World v3 task, goal-observable, with one configuration per seed.

    Args:
        task: short task name (``"push"``) or Meta-World name (``"push-v3"``).
        max_episode_steps: truncation length; ``None`` uses :data:`MAX_EPISODE_STEPS`.
        terminate_on_success: end the episode (``terminated=True``) at the first success.
        render_mode: ``None`` (state only, the default) or ``"rgb_array"``.
        camera_name: one of :data:`CAMERAS`, for ``render()``.
        width, height: frame size in pixels.
    """

    # Meta-World's control rate: frame_skip 5 x 2.5 ms timestep = 80 Hz.
    metadata = {"render_modes": ["rgb_array"], "render_fps": 80, "observation_slices": OBS_SLICES}

    def __init__(
        self,
        task: str,
        max_episode_steps: int | None = None,
        terminate_on_success: bool = False,
        *,
        render_mode: str | None = None,
        camera_name: str = "corner",
        width: int = 84,
        height: int = 84,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r} is not supported; use None or one of "
                f"{self.metadata['render_modes']}"
            )
        if int(width) < 1 or int(height) < 1:
            raise ValueError(f"frame size must be positive, got {width} x {height}")
        self.render_mode = render_mode
        self.camera_name = str(camera_name)
        self.width, self.height = int(width), int(height)
        self._renderers: dict[str, _FastRenderer] = {}
        self.task = _check_task(task)
        self.max_episode_steps = int(
            max_episode_steps
            or MAX_EPISODE_STEPS.get(self.task, _METAWORLD_MAX_PATH_LENGTH)
        )
        self.terminate_on_success = bool(terminate_on_success)
        # Construction resets once from the *global* numpy RNG; keep the caller's stream.
        global_state = np.random.get_state()
        try:
            env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{self.task}-v3-goal-observable"]()
        finally:
            np.random.set_state(global_state)
        # Trap 2: sample a fresh object/goal vector on every reset, from env.np_random.
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        # Meta-World raises if stepped past its own limit; make it agree with ours.
        env.max_path_length = self.max_episode_steps
        assert not env._partially_observable  # trap 1: the goal must be in the obs
        self._env = env
        # env.observation_space was built while the goal was still hidden (goal bounds 0);
        # the goal-observable space is the recomputed sawyer_observation_space.
        self.observation_space = env.sawyer_observation_space
        self.action_space = env.action_space
        self._elapsed = 0
        self._seeded = False
        if render_mode is not None and camera_name not in {
            env.model.camera(i).name for i in range(env.model.ncam)
        }:
            raise ValueError(f"unknown camera {camera_name!r}; Meta-World has {list(CAMERAS)}")

    @property
    def unwrapped_metaworld(self):
        """The underlying Meta-World ``SawyerXYZEnv`` (for goal, qpos, ...)."""
        return self._env

    @property
    def goal(self) -> np.ndarray:
        """Goal position of the current episode (what ``obs[36:39]`` shows)."""
        return np.array(self._env._target_pos, dtype=np.float64)

    def sim_state(self) -> np.ndarray:
        """MuJoCo ``qpos`` and ``qvel`` concatenated (robomimic's ``states``)."""
        return np.concatenate([self._env.data.qpos, self._env.data.qvel]).astype(np.float64)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))  # re-seeds env.np_random, the rand-vec source
        elif not self._seeded:
            # Unseeded first reset: draw a seed from our own (OS-entropy) generator.
            self._env.seed(int(self.np_random.integers(2**31 - 1)))
        self._seeded = True
        obs, info = self._env.reset()
        self._elapsed = 0
        info = dict(info)
        info["success"] = False
        return obs.astype(np.float64), info

    def step(self, action):
        action = np.asarray(action, dtype=np.float32)
        obs, reward, _, truncated, info = self._env.step(action)
        self._elapsed += 1
        info = dict(info)
        info["success"] = bool(info.get("success", 0.0))
        terminated = self.terminate_on_success and info["success"]
        truncated = bool(truncated) or self._elapsed >= self.max_episode_steps
        return obs.astype(np.float64), float(reward), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The current frame, ``[height, width, 3]`` uint8 (``render_mode="rgb_array"``)."""
        if self.render_mode is None:
            gym.logger.warn(
                "render() called without a render_mode; make the env with render_mode='rgb_array'"
            )
            return None
        return self.render_camera(self.camera_name)

    def render_camera(self, camera: str) -> np.ndarray:
        """A frame of any camera of :data:`CAMERAS` (``[height, width, 3]`` uint8), whatever ``render_mode`` is.

        One renderer per camera, made on its first frame; what image-based policies read
        (``observation.images.<camera>``), several cameras per step if they like."""
        renderer = self._renderers.get(camera)
        if renderer is None:
            renderer = self._renderers[camera] = _FastRenderer(self._env.model, camera, self.width, self.height)
        return renderer.render(self._env.data)

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()
        self._env.close()


def make_env(
    task: str,
    max_episode_steps: int | None = None,
    terminate_on_success: bool = False,
    **render: Any,
) -> MetaWorldStateEnv:
    """Build one environment directly (no gymnasium wrappers).

    ``render`` takes :class:`MetaWorldStateEnv`'s ``render_mode``, ``camera_name``,
    ``width`` and ``height``.
    """
    return MetaWorldStateEnv(task, max_episode_steps, terminate_on_success, **render)


def _make_registered(task: str, terminate_on_success: bool = False, **render: Any) -> MetaWorldStateEnv:
    # Under gymnasium.make the episode limit is gymnasium's TimeLimit wrapper (from the
    # spec, or make's own max_episode_steps argument), so the env itself must not cut
    # episodes shorter: lift its internal cap out of the way.
    return MetaWorldStateEnv(task, _NO_LIMIT, terminate_on_success, **render)


# gymnasium.make reads the creator's render modes (to check render_mode, and to offer
# "rgb_array_list" through its RenderCollection wrapper).
_make_registered.metadata = MetaWorldStateEnv.metadata

_NO_LIMIT = 2**62


# Registration (string entry points) is in envs.tasks; keep it working for direct imports.
register_envs()


def _make_for_vector(task: str, max_episode_steps: int | None, terminate_on_success: bool, render: dict):
    # Module-level (picklable) so AsyncVectorEnv workers can rebuild it.
    return MetaWorldStateEnv(task, max_episode_steps, terminate_on_success, **render)


def make_vector_env(
    task: str,
    num_envs: int,
    *,
    asynchronous: bool = False,
    max_episode_steps: int | None = None,
    terminate_on_success: bool = False,
    autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    **render: Any,
) -> gym.vector.VectorEnv:
    """A batch of ``num_envs`` copies of one task for batched closed-loop evaluation.

    Seed it with ``venv.reset(seed=[s0, s1, ...])`` (or an int ``s``: env i gets
    ``s + i``). Use evaluation seeds disjoint from the demonstration seeds
    (``envs.collect`` uses ``seed_offset, seed_offset + 1, ...``).

    Args:
        asynchronous: one subprocess per env (``AsyncVectorEnv``); with few cores the
            synchronous version is usually as fast, since a state-only step is cheap.
        render: ``render_mode="rgb_array"``, ``camera_name``, ``width``, ``height`` of every env
            (``venv.render()`` then gives one frame per env).
    """
    fns = [
        functools.partial(_make_for_vector, task, max_episode_steps, terminate_on_success, render)
        for _ in range(num_envs)
    ]
    cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    return cls(fns, autoreset_mode=autoreset_mode)


# --------------------------------------------------------------------------- experts


#: Where the observed hand position (``obs[0:3]``, the end-effector body) sits relative to
#: the tool centre point between the finger pads (``tcp_center``), which Meta-World's
#: success criteria measure: 4.5 cm above it (measured: z 0.0448 +- 0.0001 m; x and y
#: within 6 mm with the gripper open).
HAND_ABOVE_TCP = np.array([0.0, 0.0, 0.045])


class ReachTCPPolicy(SawyerReachV3Policy):
    """Meta-World's reach expert, steering the tool centre point, not the hand, to the goal.

    ``SawyerReachV3Policy`` drives ``obs[0:3]`` (the hand) onto the goal, but reach
    succeeds when ``tcp_center``, 4.5 cm below the hand, is within 5 cm of the goal. So
    the original expert settles at the edge of the success radius, and a policy imitating
    it succeeds only if it is accurate to a few millimetres in the wrong direction
    (docs/guide/policies.md, "Experts and demonstrations"). Aiming the hand 4.5 cm above
    the goal puts the tool centre on it, leaving the full 5 cm radius as margin.
    """

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        shifted = np.array(obs, dtype=np.float64, copy=True)
        shifted[-3:] = shifted[-3:] + HAND_ABOVE_TCP  # the hand's target above the goal
        return super().get_action(shifted)


#: Experts that replace Meta-World's scripted policy for a task (see each class).
EXPERT_OVERRIDES: dict[str, type] = {"reach": ReachTCPPolicy}


@functools.cache
def expert_policy(task: str):
    """The scripted expert for a task (cached): Meta-World's (``metaworld.policies``),
    or its replacement in :data:`EXPERT_OVERRIDES`."""
    task = _check_task(task)
    return (EXPERT_OVERRIDES.get(task) or ENV_POLICY_MAP[f"{task}-v3"])()


def expert_action(task: str, obs: np.ndarray) -> np.ndarray:
    """Expert action for one 39-d observation, clipped to the action space (float32).

    The experts are memoryless functions of the observation and need the goal in it,
    so they only work on the goal-observable observations produced here. Their
    proportional controllers often exceed [-1, 1] (the env clips anyway); clipping here
    makes the stored demonstration action equal to the action that took effect.
    A batch ``[B, 39]`` gives ``[B, 4]``.
    """
    obs = np.asarray(obs, dtype=np.float64)
    policy = expert_policy(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Constant(s) may be too high" on every step
        if obs.ndim == 1:
            act = policy.get_action(obs)
        else:
            act = np.stack([policy.get_action(o) for o in obs])
    return np.clip(np.asarray(act, dtype=np.float32), -1.0, 1.0)
