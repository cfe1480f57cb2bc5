"""Diffusion policies: the LeRobot-style interface, typed configs and features, caching equivalence,
checkpoints, training."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import bac
from bac.configs import CONFIG_DIR
from bac.policies.config import DiTConfig, DPTConfig, PolicyConfig, PolicyFeature
from bac.policies.policy import DiffusionPolicy
from bac.apps.train import run_training as train

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "policies" / "checkpoints" / "dpt-metaworld"
TASKS = ["reach", "push"]
SMALL = {"dpt": {"width": 32, "num_layers": 2, "heads": 2}, "dit": {"width": 32, "num_layers": 2, "heads": 2}}


def tiny_policy(architecture, tasks=TASKS, **settings):
    torch.manual_seed(0)
    config = PolicyConfig.build(architecture, SMALL[architecture], state_dim=39, action_dim=4, tasks=tasks, **settings)
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():  # adaLN-Zero starts at the identity: give every branch some signal
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 39))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    return policy.eval().with_sampler("ddpm", 10)


def batch(obs, task="push"):
    return {"observation.state": obs, "task": task}


def chunk(policy, obs, seed=0, task="push"):
    return policy.predict_action_chunk(batch(obs, task), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def direct_denoising(policy, obs, tasks, generator, prepared=False):
    """The sampling loop as the policy ran it before the executor, written out with diffusers' own
    ``scheduler.step`` on the same generator; ``prepared=True`` takes the condition encoding from
    ``model.prepare`` (once per call) instead of the encoder at every step."""
    cond = policy.obs_normalizer(torch.as_tensor(obs, dtype=torch.float32))
    if len(policy.tasks) > 1:
        index = torch.tensor([policy.tasks.index(t) for t in tasks])
        onehot = torch.nn.functional.one_hot(index, len(policy.tasks)).float()
        cond = torch.cat([cond, onehot[:, None].expand(-1, policy.n_obs_steps, -1)], dim=-1)
    scheduler = policy.sampler.scheduler
    scheduler.set_timesteps(policy.sampler.steps)
    memory = policy.model.prepare(cond, scheduler.timesteps) if prepared else None
    x = torch.randn((cond.shape[0], policy.horizon, policy.action_dim), generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        out = policy.model(x, t, cond, prepared=memory[i]) if prepared else policy.model(x, t, cond)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return policy.action_normalizer.inverse(x[:, : policy.n_action_steps])


# ------------------------------------------------------------------ identical numbers
@pytest.mark.parametrize("architecture", ["dpt", "dit"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_predict_action_chunk_is_the_direct_denoising_loop(architecture, sampler):
    """Bit-identical to diffusers' step on the prepared condition (the fused sampler is exact); equal
    to the per-step encoder within float32 rounding (one encoder pass over other rows: another
    matmul blocking)."""
    policy = tiny_policy(architecture).with_sampler(sampler, 6)
    obs, tasks = torch.randn(3, 2, 39), ["push", "reach", "push"]
    actions = policy.predict_action_chunk(batch(obs, tasks), generator=torch.Generator().manual_seed(4))
    assert actions.shape == (3, 8, 4)
    assert torch.equal(actions, direct_denoising(policy, obs, tasks, torch.Generator().manual_seed(4), prepared=True))
    per_step = direct_denoising(policy, obs, tasks, torch.Generator().manual_seed(4))
    assert (actions - per_step).abs().max() <= 1e-5 * per_step.abs().max()  # DPM's unclipped x grows large
    torch.manual_seed(9)  # no generator: torch's global RNG, as bac.calibrate seeds it
    global_rng = policy.predict_action_chunk(batch(obs, tasks))
    torch.manual_seed(9)
    assert torch.equal(global_rng, direct_denoising(policy, obs, tasks, None, prepared=True))


@pytest.mark.parametrize("architecture", ["dpt", "dit"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_prepared_condition_is_the_per_step_encoding(architecture, num_samples):
    policy = tiny_policy(architecture).with_sampler("ddpm", 10)
    model, cond = policy.model, torch.randn(num_samples, 2, policy.config.cond_dim)
    x, timesteps = torch.randn(num_samples, 16, 4), policy.sampler.timesteps
    prepared = model.prepare(cond, timesteps)
    assert prepared.shape[:2] == (len(timesteps), num_samples)
    for i, t in enumerate(timesteps):
        plain, fast = model(x, t, cond), model(x, t, cond, prepared=prepared[i])
        assert (plain - fast).abs().max() <= 1e-6 * plain.abs().max()


def test_shipped_policy_gives_the_actions_of_the_previous_implementation():
    """Reference values computed with the pre-interface ``predict_action`` (commit 81b803f)."""
    policy = DiffusionPolicy.load(SHIPPED).with_sampler("ddim", 10)
    obs = torch.randn(3, 2, 39, generator=torch.Generator().manual_seed(123)) * 0.3
    tasks = ["push", "reach", "door-open"]
    actions = policy.predict_action_chunk(batch(obs, tasks), generator=torch.Generator().manual_seed(7))
    assert torch.equal(actions, direct_denoising(policy, obs, tasks, torch.Generator().manual_seed(7), prepared=True))
    first = torch.tensor([[0.15840750932693481, 0.1486029028892517, 0.8663755059242249, 0.3674325942993164],
                          [0.8401256799697876, 0.9800902605056763, 0.37375861406326294, 0.9574580788612366],
                          [0.4259468615055084, -0.34056010842323303, -0.4832330048084259, 0.7125040888786316]])
    torch.testing.assert_close(actions[:, 0], first, rtol=0, atol=1e-5)
    assert float(actions.double().sum()) == pytest.approx(40.88360498473048, abs=1e-4)


# ------------------------------------------------------------------ select_action
@pytest.mark.parametrize("architecture", ["dpt", "dit"])
def test_select_action_queues_a_chunk_and_keeps_the_observation_history(architecture):
    policy = tiny_policy(architecture).with_sampler("ddim", 4)
    observations = torch.randn(20, 2, 39)  # 20 env steps of 2 envs
    calls = []
    predict = policy.predict_action_chunk

    def recorded(b, generator=None):
        calls.append(b["observation.state"].clone())
        return predict(b, generator=generator)

    policy.predict_action_chunk = recorded
    policy.reset()
    generator = torch.Generator().manual_seed(1)
    actions = [policy.select_action(batch(obs), generator=generator) for obs in observations]
    n = policy.n_action_steps
    assert len(calls) == -(-len(observations) // n) == 3  # one sampling call per n_action_steps actions
    assert torch.equal(calls[0], observations[0][:, None].expand(-1, 2, -1))  # padded by repeating the first
    assert torch.equal(calls[1], observations[n - 1 : n + 1].transpose(0, 1))  # the last two observations
    assert torch.equal(calls[2], observations[2 * n - 1 : 2 * n + 1].transpose(0, 1))
    # the same actions as predict_action_chunk on those histories, with the same generator
    replay = torch.Generator().manual_seed(1)
    chunks = [predict(batch(history), generator=replay) for history in calls]
    assert all(a.shape == (2, 4) for a in actions)
    assert torch.equal(torch.stack(actions, 1), torch.cat(chunks, 1)[:, : len(observations)])
    # reset() clears history and queue: the next call samples again, from a padded history
    policy.reset()
    policy.select_action(batch(observations[5]), generator=generator)
    assert len(calls) == 4 and torch.equal(calls[3], observations[5][:, None].expand(-1, 2, -1))
    with pytest.raises(ValueError, match="call reset"):
        policy.select_action(batch(torch.randn(3, 39)))


def test_select_action_takes_the_current_observation_only():
    policy = tiny_policy("dpt")
    policy.reset()
    with pytest.raises(ValueError, match=r"current observation\) must have shape \[batch, 39\], got \[1, 2, 39\]"):
        policy.select_action(batch(torch.zeros(1, 2, 39)))
    with pytest.raises(ValueError, match=r"observation history\) must have shape \[batch, 2, 39\], got \[1, 39\]"):
        policy.predict_action_chunk(batch(torch.zeros(1, 39)))


# ------------------------------------------------------------------ bad observations
def test_bad_observation_dicts_are_clear_errors():
    policy = tiny_policy("dpt")
    with pytest.raises(ValueError, match=r"must have shape \[batch, 2, 39\], got \[3, 2, 38\]"):
        chunk(policy, torch.zeros(3, 2, 38))
    with pytest.raises(ValueError, match="NaN"):
        chunk(policy, torch.full((1, 2, 39), float("nan")))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['fly'\]"):
        chunk(policy, torch.zeros(1, 2, 39), task="fly")
    with pytest.raises(ValueError, match="2 task names for a batch of 1"):
        chunk(policy, torch.zeros(1, 2, 39), task=["push", "reach"])
    with pytest.raises(ValueError, match=r"missing feature\(s\) \['task'\]"):
        policy.predict_action_chunk({"observation.state": torch.zeros(1, 2, 39)})
    with pytest.raises(ValueError, match=r"missing feature\(s\) \['observation.state'\]"):
        policy.predict_action_chunk({"task": "push"})
    with pytest.raises(ValueError, match=r"does not read \['observation.images.top'\]"):
        policy.predict_action_chunk({**batch(torch.zeros(1, 2, 39)), "observation.images.top": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="a policy batch is a dict"):
        policy.predict_action_chunk(torch.zeros(1, 2, 39))
    with pytest.raises(ValueError, match="not a numeric array"):
        chunk(policy, [["a"]])
    single = tiny_policy("dpt", tasks=["push"])
    assert chunk(single, torch.zeros(1, 2, 39)).shape == (1, 8, 4)
    with pytest.raises(ValueError, match=r"trained on \['push'\]"):
        chunk(single, torch.zeros(1, 2, 39), task="reach")
    no_task = tiny_policy("dpt", tasks=[])  # declares no task feature: a task in the batch is not read
    assert "task" not in no_task.input_features
    assert chunk(no_task, torch.zeros(1, 2, 39), task="anything").shape == (1, 8, 4)


# ------------------------------------------------------------------ typed config and features
@pytest.mark.parametrize("architecture, model_class", [("dpt", DPTConfig), ("dit", DiTConfig)])
def test_typed_config_round_trip(tmp_path, architecture, model_class):
    config = tiny_policy(architecture, n_action_steps=6, provenance={"note": "test"}).config
    assert isinstance(config.model, model_class) and config.model.width == 32
    assert config.input_features == {"observation.state": PolicyFeature("observation.state", "state", (39,)),
                                      "task": PolicyFeature("task", "language", ())}
    assert config.output_features == {"action": PolicyFeature("action", "action", (4,))}
    assert config.tasks == tuple(TASKS) and config.n_action_steps == 6
    assert PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PolicyConfig.load(config.save(tmp_path / "config.json")) == config


def test_checkpoint_stores_the_feature_spec(tmp_path):
    policy = tiny_policy("dit")
    stored = json.loads((policy.save(tmp_path / "ckpt") / "config.json").read_text())
    assert stored["format"] == "bac-policy/2" and stored["architecture"] == "dit"
    assert stored["input_features"] == {"observation.state": {"type": "state", "shape": [39]},
                                        "task": {"type": "language", "shape": []}}
    assert stored["output_features"] == {"action": {"type": "action", "shape": [4]}}
    assert stored["model"] == {"width": 32, "num_layers": 2, "heads": 2, "dropout": 0.0}
    loaded = DiffusionPolicy.load(tmp_path / "ckpt")
    assert loaded.config == policy.config and loaded.input_features == policy.input_features


def test_shipped_checkpoint_is_in_the_feature_format():
    stored = json.loads((SHIPPED / "config.json").read_text())
    assert stored["format"] == "bac-policy/2"
    policy = DiffusionPolicy.load(SHIPPED)
    assert policy.input_features["observation.state"].shape == (39,) and "task" in policy.input_features
    assert policy.output_features["action"].shape == (4,) and len(policy.tasks) == 6


def _mutate(config: dict, path: str, value):
    *parents, key = path.split(".")
    target = config
    for p in parents:
        target = target[p]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value


_DELETE = object()
BAD_CONFIGS = [
    ("horizon", _DELETE, r"missing field\(s\) \['horizon'\]"),
    ("horizon", "16", "horizon must be a positive int, got '16'"),
    ("n_action_steps", 17, r"n_action_steps must be in \[1, horizon=16\], got 17"),
    ("colour", "red", r"unknown field\(s\) \['colour'\]"),
    ("architecture", "unet", "unknown architecture 'unet'"),
    ("format", "bac-policy/9", "config format 'bac-policy/9'"),
    ("model.widht", 32, r"model: unknown field\(s\) \['widht'\]"),
    ("model.heads", 3, "width 32 is not divisible by heads 3"),
    ("model.causal_attn", "yes", "model.causal_attn must be bool, got 'yes'"),
    ("model.dropout", 1.5, r"dropout must be in \[0, 1\)"),
    ("noise_scheduler.prediction_type", "v_prediction", "prediction_type must be one of"),
    ("noise_scheduler.beta_schedule", "cosine", "beta_schedule must be one of"),
    ("input_features", {"task": {"type": "language", "shape": []}}, "must include 'observation.state'"),
    ("input_features", {"observation.state": {"type": "state", "shape": [39, 2]}, "task": {"type": "language", "shape": []}},
     r"a state feature has 1 dimension\(s\), got shape \[39, 2\]"),
    ("input_features", {"observation.state": {"type": "state", "shape": ["39"]}, "task": {"type": "language", "shape": []}},
     "shape must be a list of positive ints"),
    ("input_features", {"observation.state": {"type": "depth", "shape": [39]}, "task": {"type": "language", "shape": []}},
     "type must be one of"),
    ("input_features", {"observation.state": {"type": "state", "shape": [39]}},
     "needs the input feature 'task'"),
    ("input_features", {"observation.state": {"type": "state", "shape": [39]}, "task": {"type": "language", "shape": []},
                        "observation.images.top": {"type": "image", "shape": [3, 84, 84]}},
     "no image encoder"),
    ("output_features", {"action": {"type": "action"}}, "feature 'action' must be"),
    ("tasks", "push", "tasks must be a list"),
]


@pytest.mark.parametrize("path, value, message", BAD_CONFIGS, ids=[c[0] + "-" + str(i) for i, c in enumerate(BAD_CONFIGS)])
def test_wrong_or_missing_config_fields_are_refused(tmp_path, path, value, message):
    directory = tiny_policy("dpt").save(tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    _mutate(config, path, value)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        DiffusionPolicy.load(directory)
    assert str(directory / "config.json") in str(err.value)


def test_old_format_checkpoints_are_converted(tmp_path):
    policy = tiny_policy("dpt")
    directory = policy.save(tmp_path / "ckpt")
    legacy = {"format": "bac-policy/1", "architecture": "dpt", "model": SMALL["dpt"], "obs_dim": 39, "action_dim": 4,
              "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "tasks": TASKS,
              "noise_scheduler": {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2",
                                  "clip_sample": True, "prediction_type": "epsilon"}, "provenance": {"step": 3}}
    (directory / "config.json").write_text(json.dumps(legacy))
    loaded = DiffusionPolicy.load(directory).with_sampler("ddpm", 10)
    assert loaded.config == policy.config.replace(provenance={"step": 3, "converted_from": "bac-policy/1"})
    obs = torch.randn(2, 2, 39)
    assert torch.equal(chunk(loaded, obs), chunk(policy, obs))
    legacy["obs_dim"] = "39"
    (directory / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="state_dim must be a positive int"):
        DiffusionPolicy.load(directory)


def test_constructor_takes_a_typed_config():
    with pytest.raises(TypeError, match="takes one PolicyConfig"):
        DiffusionPolicy({"architecture": "dpt"})
    with pytest.raises(TypeError, match="takes one PolicyConfig"):
        DiffusionPolicy("dpt", {"width": 32}, obs_dim=39, action_dim=4)  # the pre-config signature
    with pytest.raises(ValueError, match="a DPTConfig is not the model config of architecture .dit."):
        PolicyConfig.build("dit", DPTConfig(), state_dim=39, action_dim=4)


# ------------------------------------------------------------------ caching and checkpoints
@pytest.mark.parametrize("architecture", ["dpt", "dit"])
def test_every_step_plan_gives_bit_identical_actions(architecture):
    policy = tiny_policy(architecture)
    obs = torch.randn(3, 2, 39)
    reference = chunk(policy, obs)
    spec = bac.describe(policy.model)
    assert {b.kind for b in spec.blocks} == ({"sa", "ca", "ffn"} if architecture == "dpt" else {"sa", "ffn"})
    plan = bac.make_plan(policy.model, "every-step", num_steps=10, scheduler=policy.sampler)
    with policy.accelerate(plan) as handle:
        assert torch.equal(chunk(policy, obs), reference)
        assert torch.equal(chunk(policy, obs), reference)
        assert handle.stats()["sampling_calls"] == 2
    uniform = bac.make_plan(policy.model, "uniform", num_steps=10, M=3, scheduler=policy.sampler)
    with policy.accelerate(uniform) as handle:
        cached = chunk(policy, obs)
        assert handle.stats()["last_call"]["skipped"] == uniform.skipped_count() > 0
    assert not torch.equal(cached, reference)
    assert torch.equal(chunk(policy, obs), reference)


def test_with_sampler_is_a_view_that_shares_the_weights():
    policy = tiny_policy("dpt")
    view = policy.with_sampler("dpm", 6)
    assert (policy.sampler.kind, policy.sampler.steps) == ("ddpm", 10)  # the viewed policy is left as it was
    assert (view.sampler.kind, view.sampler.steps) == ("dpm", 6)
    assert view.model is policy.model and view.obs_normalizer is policy.obs_normalizer
    assert view.state_dict().keys() == policy.state_dict().keys()
    obs = torch.randn(2, 2, 39)
    expected = chunk(view, obs)
    with torch.no_grad():
        policy.model.parameters().__next__().add_(1.0)  # a weight changed through the policy changes the view
    assert not torch.equal(chunk(view, obs), expected)
    view.select_action(batch(torch.randn(2, 39)))
    assert not view.chunk_due and policy.chunk_due  # each has its own action queue
    with pytest.raises(bac.ConfigError, match="unknown sampler .euler."):
        policy.with_sampler("euler", 4)


def test_deprecated_sampler_names_warn_and_still_work():
    policy = tiny_policy("dpt")
    with pytest.warns(DeprecationWarning, match=r"set_sampler.*with_sampler"):
        assert policy.set_sampler("ddim", 4) is policy
    assert (policy.sampler.kind, policy.sampler.steps) == ("ddim", 4)
    for old, new, value in [("sampler_kind", "sampler.kind", "ddim"), ("num_inference_steps", "sampler.steps", 4),
                            ("fused_sampler", "sampler.fused", policy.sampler.fused), ("obs_dim", "state_dim", 39)]:
        with pytest.warns(DeprecationWarning, match=rf"DiffusionPolicy.{old} is deprecated; use {new}"):
            assert getattr(policy, old) == value


def test_deprecated_checkpointing_check_fits_warns_and_still_checks():
    from bac.policies import checkpointing

    policy = tiny_policy("dpt")
    with pytest.warns(DeprecationWarning, match="check_state_fits"):
        checkpointing.check_fits(policy, policy.state_dict(), "this policy")
    with pytest.warns(DeprecationWarning), pytest.raises(bac.CheckpointError, match="missing"):
        checkpointing.check_fits(policy, {}, "this policy")


def test_plan_for_another_sampler_is_refused():
    policy = tiny_policy("dpt")
    plan = bac.make_plan(policy.model, "every-step", num_steps=10, scheduler=policy.sampler)
    policy = policy.with_sampler("ddim", 10)
    with pytest.raises(bac.PlanMismatchError, match="scheduler"):
        policy.accelerate(plan)
    policy = policy.with_sampler("ddpm", 20)
    with pytest.raises(bac.PlanMismatchError, match="10 denoising steps"):
        policy.accelerate(plan)


@pytest.mark.parametrize("architecture", ["dpt", "dit"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_checkpoint_round_trip_gives_identical_actions(tmp_path, architecture, sampler):
    policy = tiny_policy(architecture)
    policy = policy.with_sampler(sampler, 8)
    obs = torch.randn(2, 2, 39)
    expected = chunk(policy, obs)
    loaded = DiffusionPolicy.load(policy.save(tmp_path / "ckpt"), expect={"architecture": architecture})
    loaded = loaded.with_sampler(sampler, 8)
    assert torch.equal(chunk(loaded, obs), expected)
    assert torch.equal(chunk(loaded, obs), expected)  # samplers with per-call state restart cleanly


def test_wrong_checkpoints_are_clear_errors(tmp_path):
    tiny_policy("dpt").save(tmp_path / "dpt")
    with pytest.raises(ValueError, match="architecture='dpt', expected 'dit'"):
        DiffusionPolicy.load(tmp_path / "dpt", expect={"architecture": "dit"})
    # weights of another architecture under a dpt config
    tiny_policy("dit").save(tmp_path / "dit")
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
    (tmp_path / "dit" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        DiffusionPolicy.load(tmp_path / "dit")


# ------------------------------------------------------------------ training
def train_config(tmp_path, *extra):
    overrides = [
        "task=reach", "episodes=3", f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}",
        "steps=80", "batch_size=32", "warmup_steps=5", "checkpoint_every=40", "log_every=10", "progress=false",
        "policy.model.width=32", "policy.model.num_layers=1", *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_training_lowers_the_loss_and_resumes(tmp_path):
    cfg = train_config(tmp_path)
    export = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 80 and log[-1]["loss"] < 0.7 * log[0]["loss"]
    policy = DiffusionPolicy.load(export)
    assert policy.provenance["step"] == 80 and policy.tasks == ["reach"]
    assert isinstance(policy.config.model, DPTConfig) and policy.config.model.num_layers == 1
    assert policy.predict_action_chunk(batch(np.zeros((2, 2, 39), dtype=np.float32), "reach")).shape == (2, 8, 4)
    # resuming a finished run does no more steps and gives the same checkpoint
    before = (Path(export) / "model.safetensors").read_bytes()
    train(cfg)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == len(log)
    assert DiffusionPolicy.load(export).provenance["step"] == 80
    assert (Path(export) / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("policy", ["dpt", "dit"])
def test_training_on_a_harder_suite_task_lowers_the_loss(tmp_path, policy):
    cfg = train_config(tmp_path, "task=peg-insert-side", f"policy={policy}", "action_noise=0.3")
    export = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    trained = DiffusionPolicy.load(export)
    assert trained.architecture == policy and trained.tasks == ["peg-insert-side"]
    assert trained.provenance["datasets"]["peg-insert-side"]["train_demos"] >= 2


def test_training_refuses_bad_policy_settings_before_collecting(tmp_path):
    with pytest.raises(ValueError, match="policy settings \\(dpt\\): DPTConfig: width 32 is not divisible by heads 3"):
        train(train_config(tmp_path, "policy.model.heads=3"))
    assert not (tmp_path / "data").exists()


def test_compute_loss_takes_a_batch_with_names_or_indices():
    policy = tiny_policy("dit").train()
    obs, actions = torch.randn(4, 2, 39), torch.rand(4, 16, 4) * 2 - 1
    by_name = policy.compute_loss({**batch(obs, ["reach", "push", "push", "reach"]), "action": actions},
                                  generator=torch.Generator().manual_seed(0))
    by_index = policy.compute_loss({**batch(obs, torch.tensor([0, 1, 1, 0])), "action": actions},
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_name, by_index)
    with pytest.raises(ValueError, match=r"'action' must have shape \[batch, 16, 4\]"):
        policy.compute_loss({**batch(obs), "action": actions[:, :8]})


def test_provenance_is_part_of_the_config():
    policy = tiny_policy("dpt")
    exported = copy.deepcopy(policy)
    exported.provenance = {"step": 5}
    assert exported.config.provenance == {"step": 5} and policy.provenance == {}


def test_configured_suites_are_the_default_suite():
    from omegaconf import OmegaConf

    from bac.envs.metaworld_env import DEFAULT_SUITE

    assert list(OmegaConf.load(CONFIG_DIR / "train.yaml").suite) == list(DEFAULT_SUITE)
    assert list(OmegaConf.load(CONFIG_DIR / "eval.yaml").untrained_tasks) == list(DEFAULT_SUITE)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("architecture", ["dpt", "dit"])
def test_both_policy_architectures_accept_every_method(architecture, skipping_settings, exhaustive_settings):
    policy = tiny_policy(architecture)
    obs = torch.randn(2, 2, 39)
    reference = chunk(policy, obs)
    calibration = bac.calibrate(policy.model, lambda o: chunk(policy, o), [obs], scheduler=policy.sampler,
                                attention=True)
    steps = policy.sampler.steps
    for name in bac.available_methods():
        params = {k: min(v, steps) if k == "M" else v for k, v in skipping_settings.get(name, {}).items()}
        with policy.accelerate(bac.build_method(name, calibration, **params)) as handle:
            actions = chunk(policy, obs)
            stats = handle.stats()
        assert actions.shape == reference.shape and torch.isfinite(actions).all(), name
        assert (stats["skipped"] > 0) == (name != "every-step"), name
        if name in ("ertacache", "profiling-dit"):  # their every-step settings give the plain call bit for bit
            with policy.accelerate(bac.build_method(name, calibration, **exhaustive_settings(steps)[name])):
                assert torch.equal(chunk(policy, obs), reference), name
    assert torch.equal(chunk(policy, obs), reference)


@pytest.mark.parametrize("num_samples", [1, 3, 50])
@pytest.mark.parametrize("causal", [True, False])
def test_functional_decoder_layer_is_pytorchs_layer(num_samples, causal):
    """DP-T's branches are functional calls; they compute PyTorch's own pre-norm layer, bit for bit."""
    from bac.policies.dpt import DecoderLayer

    torch.manual_seed(1)
    layer = DecoderLayer(64, 4, dropout=0.0, causal=causal).eval()
    for p in layer.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, memory = torch.randn(num_samples, 16, 64), torch.randn(num_samples, 3, 64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(16) if causal else None
    with torch.no_grad():
        reference = torch.nn.TransformerDecoderLayer.forward(layer, x, memory, tgt_mask=mask, tgt_is_causal=causal)
        ours = layer(x, memory)
    # In eval mode without a mask, nn.MultiheadAttention takes its fused inference kernel (other rounding).
    assert torch.equal(ours, reference) if causal else (ours - reference).abs().max() <= 1e-6 * reference.abs().max()
    layer.train()  # dropout 0: training mode is PyTorch's plain path, which the functions reproduce exactly
    with torch.no_grad():
        trained = torch.nn.TransformerDecoderLayer.forward(layer, x, memory, tgt_mask=mask, tgt_is_causal=causal)
        assert torch.equal(layer(x, memory), trained)


def test_compiled_blocks_run_a_static_plan_without_recompiling():
    """compile_blocks: one graph per branch kind, shared by every layer; after warm-up a cached call and a
    full call compile nothing more (no graph break, no recompile: the plan's decisions stay outside)."""
    from torch._dynamo.utils import counters

    from bac.policies.dpt import BRANCHES

    policy = tiny_policy("dpt").with_sampler("ddim", 6)
    obs = batch(torch.randn(1, 2, 39))
    eager = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    plan = bac.make_plan(policy.model, "uniform", num_steps=6, M=3)
    with policy.accelerate(plan):
        cached_eager = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    policy.model.compile_blocks()
    try:
        with policy.accelerate(plan):
            policy.predict_action_chunk(obs)  # warm-up: compiles the three branch graphs
        policy.predict_action_chunk(obs)
        counters.clear()
        with policy.accelerate(plan):
            cached = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
        full = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
        assert sum(counters["stats"].values()) == 0 and not counters["graph_break"] and not counters["recompiles"]
    finally:
        policy.model.compile_blocks(False)
    torch.testing.assert_close(full, eager, rtol=0, atol=1e-5)  # inductor's fused kernels round differently
    torch.testing.assert_close(cached, cached_eager, rtol=0, atol=1e-5)
    assert all(layer.branches is BRANCHES for layer in policy.model.decoder.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_blocks_on_gpu():
    policy = tiny_policy("dpt").with_sampler("ddim", 6).to("cuda")
    obs = batch(torch.randn(1, 2, 39))
    plan = bac.make_plan(policy.model, "uniform", num_steps=6, M=3)
    with policy.accelerate(plan):
        eager = policy.predict_action_chunk(obs, generator=torch.Generator("cuda").manual_seed(0))
        policy.model.compile_blocks(mode="reduce-overhead")
        try:
            for _ in range(3):
                graphed = policy.predict_action_chunk(obs, generator=torch.Generator("cuda").manual_seed(0))
        finally:
            policy.model.compile_blocks(False)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-4)
