"""The runtime: chunked execution of seeded episodes through the policy interface, identical to the
previous ``envs/rollout.py`` on the same seeds and generators."""
from pathlib import Path

import numpy as np
import pytest
import torch

from bac.envs.metaworld_env import make_vector_env
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy
from bac.runtime import EnvPool, check_compatible, observation_batch, record_episode, run_episodes, run_wave

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "checkpoints" / "dpt-metaworld"


def tiny_policy(tasks=("reach", "push"), state_dim=39, steps=3):
    torch.manual_seed(0)
    config = PolicyConfig.build("dpt", {"width": 32, "num_layers": 2, "heads": 2}, state_dim=state_dim, action_dim=4,
                                tasks=list(tasks))
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, state_dim))
    return policy.eval().with_sampler("ddim", steps)


def waves(policy, task, seeds, num_envs, max_episode_steps=None):
    """As ``bac.evaluation.closed_loop`` runs them: one generator per wave, seeded from its first seed."""
    results = []
    for start in range(0, len(seeds), num_envs):
        wave = seeds[start : start + num_envs]
        generator = torch.Generator().manual_seed(wave[0])
        results += run_episodes(policy, task, wave, num_envs=num_envs, max_episode_steps=max_episode_steps,
                                generator=generator, make_env=make_vector_env)
    return results


def previous_rollout(act, task, seeds, n_obs_steps, num_envs, max_episode_steps):
    """``envs/rollout.py`` as it was (commit 81b803f): a history array, whole chunks executed open loop."""
    results = []
    for start in range(0, len(seeds), num_envs):
        wave = seeds[start : start + num_envs]
        venv = make_vector_env(task, len(wave), max_episode_steps=max_episode_steps, terminate_on_success=True)
        obs, _ = venv.reset(seed=wave)
        history = np.repeat(obs[:, None].astype(np.float32), n_obs_steps, axis=1)
        done, success = np.zeros(len(wave), bool), np.zeros(len(wave), bool)
        steps = np.zeros(len(wave), int)
        while not done.all():
            chunk = act(history, wave[0]).numpy()
            for action in chunk.transpose(1, 0, 2):
                obs, _, terminated, truncated, info = venv.step(np.clip(action, -1.0, 1.0))
                active = ~done
                steps[active] += 1
                success[active] |= np.asarray(info["success"], dtype=bool)[active]
                done |= active & (terminated | truncated)
                history = np.concatenate([history[:, 1:], obs[:, None].astype(np.float32)], axis=1)
                if done.all():
                    break
        venv.close()
        results += [{"seed": s, "success": bool(ok), "steps": int(n)} for s, ok, n in zip(wave, success, steps)]
    return results


def test_shipped_policy_gives_the_episodes_of_the_previous_implementation():
    """Per-seed results of the shipped policy (DDIM 10) recorded with ``envs/rollout.py`` at commit 81b803f."""
    policy = DiffusionPolicy.load(SHIPPED).with_sampler("ddim", 10)
    results = waves(policy, "reach", list(range(100000, 100005)), num_envs=2)
    assert results == [{"seed": 100000, "success": True, "steps": 48}, {"seed": 100001, "success": True, "steps": 34},
                       {"seed": 100002, "success": True, "steps": 31}, {"seed": 100003, "success": True, "steps": 39},
                       {"seed": 100004, "success": True, "steps": 37}]


def test_chunks_and_results_equal_the_previous_rollout_loop():
    policy = tiny_policy()
    seeds, num_envs, cap = [3, 4, 5], 2, 19  # 19: the last chunk is cut short by the step cap
    recorded = []
    predict = policy.predict_action_chunk

    def recording(batch, generator=None):
        recorded.append((batch["observation.state"].clone(), list(batch["task"])))
        chunk = predict(batch, generator=generator)
        recorded.append(chunk.clone())
        return chunk

    policy.predict_action_chunk = recording
    results = waves(policy, "push", seeds, num_envs, max_episode_steps=cap)
    new = recorded[:]
    recorded.clear()
    generators = {}

    def act(history, first_seed):  # the previous evaluator's policy call: one generator per wave
        generator = generators.setdefault(first_seed, torch.Generator().manual_seed(first_seed))
        return recording({"observation.state": torch.as_tensor(history), "task": ["push"] * len(history)}, generator)

    assert results == previous_rollout(act, "push", seeds, policy.n_obs_steps, num_envs, cap)
    assert all(r["steps"] == cap and not r["success"] for r in results)
    assert len(new) == len(recorded) == 2 * (3 + 3)  # 3 chunks of 8 per wave for 19 steps, 2 waves
    for a, b in zip(new, recorded):
        if isinstance(a, tuple):
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
        else:
            assert torch.equal(a, b)


def test_short_rollout_results():
    policy = tiny_policy(tasks=["reach"])
    results = list(run_episodes(policy, "reach", [5, 6, 7], num_envs=2, max_episode_steps=20, make_env=make_vector_env))
    assert [r["seed"] for r in results] == [5, 6, 7]
    assert all(1 <= r["steps"] <= 20 and isinstance(r["success"], bool) for r in results)
    assert all(r["steps"] == 20 for r in results if not r["success"])


def test_a_pooled_env_runs_the_episodes_of_a_new_one():
    """The evaluator reuses one set of envs for every method on a task: after other episodes (some cut short,
    some autoreset), a pooled env must give exactly the observations, frames and results of new envs."""
    policy = tiny_policy(tasks=["reach"])
    render = {"render_mode": "rgb_array", "camera_name": "corner3", "width": 16, "height": 16}
    actions = np.random.default_rng(0).uniform(-1, 1, (12, 2, 4))

    def trajectory(venv):
        obs, _ = venv.reset(seed=[41, 42])
        frames, states = [venv.render()], [obs]
        for action in actions:
            obs, *_ = venv.step(action)
            states.append(obs)
            frames.append(venv.render())
        return np.stack(states), np.stack(frames)

    with EnvPool(make_vector_env) as pool:
        list(run_episodes(policy, "reach", [3, 4], num_envs=2, max_episode_steps=7, envs=pool,
                          generator=torch.Generator().manual_seed(3)))
        first = pool.get("reach", 2, 7, {})
        again = list(run_episodes(policy, "reach", [5, 6], num_envs=2, max_episode_steps=7, envs=pool,
                                  generator=torch.Generator().manual_seed(5)))
        assert pool.get("reach", 2, 7, {}) is first  # the same envs ran both waves
        used = pool.get("reach", 2, 7, render)
        used.reset(seed=[1, 2])
        for action in actions[:9]:  # past the cap: both envs autoreset on their own
            used.step(action)
        pooled = trajectory(pool.get("reach", 2, 7, render))
        assert pool.get("reach", 2, 7, render) is used
    fresh_venv = make_vector_env("reach", 2, max_episode_steps=7, terminate_on_success=True, **render)
    try:
        fresh = trajectory(fresh_venv)
    finally:
        fresh_venv.close()
    assert np.array_equal(pooled[0], fresh[0]) and np.array_equal(pooled[1], fresh[1])
    assert again == list(run_episodes(policy, "reach", [5, 6], num_envs=2, max_episode_steps=7,
                                      generator=torch.Generator().manual_seed(5), make_env=make_vector_env))


def test_policy_that_does_not_fit_the_env_is_refused():
    venv = make_vector_env("reach", 1, max_episode_steps=5)
    try:
        with pytest.raises(ValueError, match=r"'observation.state' is \[38\], the environment's observations are \[39\]"):
            run_wave(tiny_policy(state_dim=38), venv, "reach", [0])
        check_compatible(tiny_policy(), venv.single_observation_space, venv.single_action_space)
    finally:
        venv.close()


def test_observation_batch_names_the_features():
    obs = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    batch = observation_batch(obs, "push")
    assert batch["task"] == ["push", "push"]
    assert batch["observation.state"].dtype == torch.float32
    assert torch.equal(batch["observation.state"], torch.as_tensor(obs.astype(np.float32)))


def test_a_recorded_episode_is_the_evaluated_episode():
    policy = tiny_policy()
    [evaluated] = waves(policy, "reach", [100003], num_envs=1, max_episode_steps=20)
    result, frames = record_episode(policy, "reach", 100003, make_env=make_vector_env, generator=torch.Generator().manual_seed(100003),
                                    max_episode_steps=20, size=24)
    assert result == evaluated
    assert len(frames) == result["steps"] + 1 and frames[0].shape == (24, 24, 3) and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])  # the arm moved
