"""Diffusion policies: caching equivalence, checkpoints, training, closed-loop rollout."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import bac
from bac.policies.policy import DiffusionPolicy
from bac.policies.train import REPO, train

TASKS = ["reach", "push"]
SMALL = {"dpt": {"width": 32, "num_layers": 2, "heads": 2}, "dit": {"width": 32, "num_layers": 2, "heads": 2}}


def small_policy(architecture, tasks=TASKS, **kwargs):
    torch.manual_seed(0)
    policy = DiffusionPolicy(architecture, SMALL[architecture], obs_dim=39, action_dim=4, tasks=tasks, **kwargs)
    for p in policy.model.parameters():  # adaLN-Zero starts at the identity: give every branch some signal
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 39))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    return policy.eval().set_sampler("ddpm", 10)


def act(policy, obs, seed=0, task="push"):
    return policy.predict_action(obs, task, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ["dpt", "dit"])
def test_every_step_plan_gives_bit_identical_actions(architecture):
    policy = small_policy(architecture)
    obs = torch.randn(3, 2, 39)
    reference = act(policy, obs)
    spec = bac.describe(policy.model)
    assert {b.kind for b in spec.blocks} == ({"sa", "ca", "ffn"} if architecture == "dpt" else {"sa", "ffn"})
    plan = bac.make_plan(policy.model, "every-step", num_steps=10, scheduler=policy.sampler)
    with policy.accelerate(plan) as handle:
        assert torch.equal(act(policy, obs), reference)
        assert torch.equal(act(policy, obs), reference)
        assert handle.stats()["sampling_calls"] == 2
    uniform = bac.make_plan(policy.model, "uniform", num_steps=10, M=3, scheduler=policy.sampler)
    with policy.accelerate(uniform) as handle:
        cached = act(policy, obs)
        assert handle.stats()["last_call"]["skipped"] == uniform.skipped_count() > 0
    assert not torch.equal(cached, reference)
    assert torch.equal(act(policy, obs), reference)


def test_plan_for_another_sampler_is_refused():
    policy = small_policy("dpt")
    plan = bac.make_plan(policy.model, "every-step", num_steps=10, scheduler=policy.sampler)
    policy.set_sampler("ddim", 10)
    with pytest.raises(bac.PlanMismatchError, match="scheduler"):
        policy.accelerate(plan)
    policy.set_sampler("ddpm", 20)
    with pytest.raises(bac.PlanMismatchError, match="10 denoising steps"):
        policy.accelerate(plan)


@pytest.mark.parametrize("architecture", ["dpt", "dit"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_checkpoint_round_trip_gives_identical_actions(tmp_path, architecture, sampler):
    policy = small_policy(architecture)
    policy.set_sampler(sampler, 8)
    obs = torch.randn(2, 2, 39)
    expected = act(policy, obs)
    loaded = DiffusionPolicy.load(policy.save(tmp_path / "ckpt"), expect={"architecture": architecture})
    loaded.set_sampler(sampler, 8)
    assert torch.equal(act(loaded, obs), expected)
    assert torch.equal(act(loaded, obs), expected)  # samplers with per-call state restart cleanly


def test_wrong_checkpoints_are_clear_errors(tmp_path):
    small_policy("dpt").save(tmp_path / "dpt")
    with pytest.raises(ValueError, match="architecture='dpt', expected 'dit'"):
        DiffusionPolicy.load(tmp_path / "dpt", expect={"architecture": "dit"})
    # weights of another architecture under a dpt config
    small_policy("dit").save(tmp_path / "dit")
    (tmp_path / "dpt" / "model.safetensors").write_bytes((tmp_path / "dit" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not fit this dpt policy"):
        DiffusionPolicy.load(tmp_path / "dpt")
    # same architecture, other width
    weights = load_file(str(tmp_path / "dit" / "model.safetensors"))
    weights["model.head.weight"] = torch.zeros(4, 64)
    save_file(weights, str(tmp_path / "dit" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.head.weight: checkpoint \[4, 64\] vs model \[4, 32\]"):
        DiffusionPolicy.load(tmp_path / "dit")
    with pytest.raises(FileNotFoundError, match="not a policy checkpoint"):
        DiffusionPolicy.load(tmp_path / "missing")


def test_bad_observations_and_tasks_are_clear_errors():
    policy = small_policy("dpt")
    with pytest.raises(ValueError, match=r"shape \[batch, 2, 39\], got \[3, 2, 38\]"):
        policy.predict_action(torch.zeros(3, 2, 38), "push")
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action(torch.full((1, 2, 39), float("nan")), "push")
    with pytest.raises(ValueError, match="unknown task"):
        policy.predict_action(torch.zeros(1, 2, 39), "fly")
    with pytest.raises(ValueError, match="conditioned on the task"):
        policy.predict_action(torch.zeros(1, 2, 39))
    single = small_policy("dpt", tasks=["push"])
    assert single.predict_action(torch.zeros(1, 2, 39)).shape == (1, 8, 4)
    with pytest.raises(ValueError, match="trained on"):
        single.predict_action(torch.zeros(1, 2, 39), "reach")


def test_training_lowers_the_loss_and_resumes(tmp_path):
    overrides = [
        "task=reach", "episodes=3", f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}",
        "steps=80", "batch_size=32", "warmup_steps=5", "checkpoint_every=40", "log_every=10", "progress=false",
        "policy.model.width=32", "policy.model.num_layers=1",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    export = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 80 and log[-1]["loss"] < 0.7 * log[0]["loss"]
    policy = DiffusionPolicy.load(export)
    assert policy.provenance["step"] == 80 and policy.tasks == ["reach"]
    assert policy.predict_action(np.zeros((2, 2, 39), dtype=np.float32)).shape == (2, 8, 4)
    # resuming a finished run does no more steps and gives the same checkpoint
    before = (Path(export) / "model.safetensors").read_bytes()
    train(cfg)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == len(log)
    assert DiffusionPolicy.load(export).provenance["step"] == 80
    assert load_file(str(Path(export) / "model.safetensors")).keys() == load_file_bytes(before).keys()


def load_file_bytes(data):
    from safetensors.torch import load

    return load(data)


def test_short_closed_loop_rollout_runs():
    from bac.envs.rollout import run_episodes

    policy = small_policy("dpt", tasks=["reach"]).set_sampler("ddim", 3)
    results = list(run_episodes(policy.predict_action, "reach", [5, 6, 7], num_envs=2, max_episode_steps=20))
    assert [r["seed"] for r in results] == [5, 6, 7]
    assert all(1 <= r["steps"] <= 20 and isinstance(r["success"], bool) for r in results)
    assert all(r["steps"] == 20 for r in results if not r["success"])


def test_configured_suites_are_the_default_suite():
    from omegaconf import OmegaConf

    from bac.envs.metaworld_env import DEFAULT_SUITE

    assert list(OmegaConf.load(REPO / "configs" / "train.yaml").suite) == list(DEFAULT_SUITE)
    assert list(OmegaConf.load(REPO / "configs" / "eval.yaml").untrained_tasks) == list(DEFAULT_SUITE)
