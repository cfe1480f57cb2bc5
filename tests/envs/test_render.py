"""Gymnasium registration without MuJoCo, rgb_array rendering, and rollout videos."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

from bac.envs import tasks
from bac.envs.metaworld_env import MetaWorldStateEnv, env_id, make_env
from bac.envs.video import video_path, write_video

OBS_DIM, ACT_DIM = 39, 4


# --------------------------------------------------------------------------- registration


def test_static_task_list_is_metaworlds_v3_list():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    import bac.envs.metaworld_env as mw_env

    expected = tuple(n.removesuffix("-v3-goal-observable") for n in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE)
    assert tasks.ALL_TASKS == expected
    assert tasks.ALL_TASKS == tuple(n.removesuffix("-v3") for n in ALL_V3_ENVIRONMENTS)
    assert set(tasks.MAX_EPISODE_STEPS) <= set(tasks.ALL_TASKS)
    assert set(tasks.DEFAULT_SUITE) <= set(tasks.ALL_TASKS)
    # one source of truth, re-exported by the Meta-World module
    assert mw_env.ALL_TASKS is tasks.ALL_TASKS and mw_env.MAX_EPISODE_STEPS is tasks.MAX_EPISODE_STEPS


def test_import_registers_ids_without_loading_mujoco():
    script = """
import json, sys
import gymnasium as gym
import bac.envs
ids = [k for k in gym.registry if k.startswith("bac/metaworld-")]
heavy = sorted(m for m in ("mujoco", "metaworld", "OpenGL") if m in sys.modules)
spec = gym.spec("bac/metaworld-door-open-v3")
env = gym.make("bac/metaworld-reach-v3")
print(json.dumps({"ids": len(ids), "heavy": heavy, "cap": spec.max_episode_steps,
                  "entry": spec.entry_point, "after_make": "mujoco" in sys.modules,
                  "obs": list(env.reset(seed=0)[0].shape)}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ids"] == len(tasks.ALL_TASKS) == 50
    assert out["heavy"] == []  # registering imported neither Meta-World nor MuJoCo
    assert out["cap"] == tasks.MAX_EPISODE_STEPS["door-open"]
    assert out["entry"] == "bac.envs.metaworld_env:_make_registered"
    assert out["after_make"] and out["obs"] == [OBS_DIM]


def test_register_envs_is_idempotent():
    import bac.envs

    before = {k: v.entry_point for k, v in gym.registry.items() if k.startswith("bac/")}
    bac.envs.register_envs()
    tasks.register_envs()
    assert {k: v.entry_point for k, v in gym.registry.items() if k.startswith("bac/")} == before


# --------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def push_env():
    env = make_env("push", render_mode="rgb_array")
    yield env
    env.close()


def test_rgb_array_frames(push_env):
    push_env.reset(seed=0)
    first = push_env.render()
    assert first.shape == (84, 84, 3) and first.dtype == np.uint8
    assert first.std() > 10  # a scene, not a blank or constant image
    for _ in range(10):
        push_env.step(np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32))
    moved = push_env.render()
    assert np.abs(moved.astype(int) - first).max() > 50  # the arm moved in the picture
    again = push_env.render()
    np.testing.assert_array_equal(moved, again)  # rendering is a pure function of the state


def test_frame_size_camera_and_arguments():
    env = make_env("reach", render_mode="rgb_array", camera_name="topview", width=64, height=48)
    env.reset(seed=1)
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 10
    env.close()
    assert MetaWorldStateEnv.metadata["render_modes"] == ["rgb_array"]
    assert MetaWorldStateEnv.metadata["render_fps"] == 80
    with pytest.raises(ValueError, match="render_mode"):
        make_env("reach", render_mode="human")
    with pytest.raises(ValueError, match="camera"):
        make_env("reach", render_mode="rgb_array", camera_name="nope")
    plain = make_env("reach")
    plain.reset(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert plain.render() is None  # gymnasium's convention without a render mode


def test_gymnasium_make_with_render_mode():
    env = gym.make(env_id("push"), render_mode="rgb_array", width=32, height=32)
    obs, _ = env.reset(seed=4)
    assert obs.shape == (OBS_DIM,) and env.render_mode == "rgb_array"
    frame = env.render()
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    env.close()
    # gymnasium's own "_list" mode works on top of rgb_array
    env = gym.make(env_id("push"), render_mode="rgb_array_list", width=16, height=16)
    env.reset(seed=4)
    env.step(np.zeros(ACT_DIM, dtype=np.float32))
    frames = env.render()
    assert len(frames) == 2 and frames[0].shape == (16, 16, 3)
    env.close()


def test_state_observations_do_not_depend_on_rendering():
    plain = make_env("push")
    seen = make_env("push", render_mode="rgb_array")
    rng = np.random.default_rng(0)
    a, _ = plain.reset(seed=11)
    b, _ = seen.reset(seed=11)
    seen.render()
    np.testing.assert_array_equal(a, b)
    for _ in range(15):
        action = rng.uniform(-1, 1, ACT_DIM).astype(np.float32)
        oa, ra, *_ = plain.step(action)
        ob, rb, *_ = seen.step(action)
        seen.render()
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb
    plain.close()
    seen.close()


def _blue_centroid(frame: np.ndarray) -> np.ndarray:
    f = frame.astype(int)
    mask = f[..., 2] - np.maximum(f[..., 0], f[..., 1]) > 100
    assert mask.sum() >= 3, "the puck is not visible"
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


def test_corner_camera_is_right_side_up():
    # Paint the puck pure blue, then lift it and slide it along the camera's horizontal:
    # in a right-side-up picture higher means a smaller row, and the slide towards the
    # camera's right (after the 180-degree turn) means a larger column.
    env = make_env("push", render_mode="rgb_array", camera_name="corner", width=96, height=96)
    env.reset(seed=0)
    mw = env.unwrapped_metaworld
    model, data = mw.model, mw.data
    puck = model.geom("objGeom").id
    model.geom_matid[puck] = -1  # its material would darken the colour
    model.geom_rgba[puck] = (0.0, 0.0, 1.0, 1.0)
    start = data.body("obj").xpos.copy()
    at_rest = _blue_centroid(env.render())
    mw._set_obj_xyz(start + np.array([0.0, 0.0, 0.12]))
    lifted = _blue_centroid(env.render())
    assert lifted[0] < at_rest[0] - 3, (at_rest, lifted)
    # the camera's world-right direction after the turn: minus its x axis
    right = -data.cam("corner").xmat.reshape(3, 3)[:, 0]
    assert data.cam("corner").xmat.reshape(3, 3)[2, 1] < 0  # Meta-World mounts it upside down
    mw._set_obj_xyz(start + 0.12 * np.array([right[0], right[1], 0.0]))
    slid = _blue_centroid(env.render())
    assert slid[1] > at_rest[1] + 3, (at_rest, slid)
    env.close()


# --------------------------------------------------------------------------- videos


def test_write_video_round_trips(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (40, 40, 40)]
    frames = [np.full((20, 30, 3), c, dtype=np.uint8) for c in colours]
    path = write_video(frames, tmp_path / "sub" / "clip.gif", fps=25)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (30, 20)
        assert gif.info["duration"] == 40 and gif.info.get("loop") == 0
        for i, colour in enumerate(colours):
            gif.seek(i)
            np.testing.assert_allclose(np.asarray(gif.convert("RGB"))[10, 15], colour, atol=8)
    # faster than GIF players show: every other frame, same speed
    fast = write_video([np.full((8, 8, 3), 10 * i, dtype=np.uint8) for i in range(10)], tmp_path / "f.gif", fps=100)
    with Image.open(fast) as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 20
    with pytest.raises(ValueError):
        write_video(frames, tmp_path / "clip.mp4")
    with pytest.raises(ValueError):
        write_video([np.zeros((4, 4), dtype=np.uint8)], tmp_path / "gray.gif")


def test_video_paths_are_safe_file_names(tmp_path):
    assert video_path(tmp_path, "every-step", "reach") == tmp_path / "videos" / "every-step-reach.gif"
    assert video_path(tmp_path, "bac M=10/n 2", "reach").name == "bac_M=10_n_2-reach.gif"
