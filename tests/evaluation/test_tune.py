"""The tuner's tuned file for every kind of static pick, and the settings it refuses before any work.

The end-to-end tuner run (pick, front, ``use_tuned``, ``bac.eval tuned=``) is in test_eval.py; these
cases need no episodes: they write the tuned file of a given candidate the way :func:`tune` does.
"""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bac
from bac.configs import CONFIG_DIR
from bac.evaluation.setup import tuned_variant
from bac.evaluation.tune import TUNE_KEYS, check_tune_settings, write_tuned
from bac.policies.policy import DiffusionPolicy
from bac.policies.tuned import TunedConfig


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def tune_config(checkpoint, tmp_path, *extra):
    overrides = [f"checkpoint={checkpoint}", "tasks=[reach]", "episodes=2", "num_envs=2", "sampler.steps=6",
                 f"out_dir={tmp_path / 'tune'}", "progress=false", f"plan_cache={tmp_path / 'plans'}", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="tune", overrides=overrides)


def tuned_file(checkpoint, tmp_path, config: dict) -> TunedConfig:
    """The tuned file ``tune`` writes when ``config`` (a candidate of tune.json) is the pick."""
    cfg = tune_config(checkpoint, tmp_path)
    eval_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in TUNE_KEYS])
    out = tmp_path / "tune"
    out.mkdir()
    candidate = {"config": config, "plan_file": None, "successes": 2, "episodes": 2, "p50_ms": 1.0, "speedup": 3.0}
    result = {"lossless": True, "candidates": {"full": {"successes": 2}}, "calibration_seeds": [0, 1],
              "tasks": ["reach"], "pick": "x"}
    return TunedConfig.load(write_tuned(cfg, eval_cfg, candidate, out, None, result))


def actions(policy):
    obs = {"observation.state": torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(3)), "task": "reach"}
    return policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("config, standin", [
    ({"sampler": "ddim", "steps": 4, "cache": "uniform", "M": 2}, "reuse"),
    ({"sampler": "ddim", "steps": 5, "cache": "taylorseer", "interval": 2, "order": 1}, "taylor-1"),
    ({"sampler": "ddim", "steps": 4, "cache": "uniform", "M": 2, "standin": "taylor-2"}, "taylor-2"),
])
def test_uncalibrated_pick_gets_its_plan_and_stand_in(checkpoint, tmp_path, config, standin):
    """A uniform or taylorseer pick has no cached plan file: the tuner writes its plan, and the policy and the
    evaluator apply it with the stand-in the tuner measured."""
    tuned = tuned_file(checkpoint, tmp_path, dict(config))
    assert tuned.plan == "plan.json" and (tmp_path / "tune" / "plan.json").is_file()
    assert (tuned.sampler, tuned.steps, tuned.method) == (config["sampler"], config["steps"], config["cache"])

    policy, by_hand = DiffusionPolicy.load(checkpoint), DiffusionPolicy.load(checkpoint)
    handle = policy.use_tuned(tuned.path)
    assert handle is not None and (policy.sampler.kind, policy.sampler.steps) == (tuned.sampler, tuned.steps)
    by_hand = by_hand.with_sampler(tuned.sampler, tuned.steps)
    params = {k: v for k, v in config.items() if k not in ("sampler", "steps", "cache")}
    method = bac.build_method(config["cache"], by_hand.model, num_steps=tuned.steps, scheduler=by_hand.sampler.scheduler,
                              **params)
    assert method.standin.describe() == tuned.method_for(policy).standin.describe() == {"standin": standin}
    assert method.schedule.to_dict()["blocks"] == tuned.load_plan().to_dict()["blocks"]
    with by_hand.accelerate(method):
        assert torch.equal(actions(policy), actions(by_hand))
    handle.remove()
    _, evaluated, _ = tuned_variant(DiffusionPolicy.load(checkpoint), tuned.path)  # python -m bac.eval tuned=...
    assert evaluated.standin.describe() == {"standin": standin}


def test_plain_sampler_pick_has_no_plan(checkpoint, tmp_path):
    tuned = tuned_file(checkpoint, tmp_path, {"sampler": "ddim", "steps": 3, "cache": None})
    assert (tuned.method, tuned.plan) == (None, None) and not (tmp_path / "tune" / "plan.json").exists()
    policy = DiffusionPolicy.load(checkpoint)
    assert policy.use_tuned(tuned.path) is None and policy.sampler.steps == 3
    assert tuned.found["calibration_seeds"] == [0, 1] and tuned.weights is not None


def test_warm_pick_is_recorded_and_applied(checkpoint, tmp_path):
    """A warm-started pick's tuned file carries its warm start; use_tuned and bac.eval tuned= apply it."""
    warm = {"start": 2, "variant": "plain", "threshold": None, "jump": 0.75}
    tuned = tuned_file(checkpoint, tmp_path, {"sampler": "ddim", "steps": 6, "cache": None, "warm": dict(warm)})
    assert tuned.warm == warm and json.loads(tuned.path.read_text())["warm"] == warm
    policy = DiffusionPolicy.load(checkpoint)
    policy.use_tuned(tuned.path)
    assert policy.warm.describe() == warm
    by_hand = DiffusionPolicy.load(checkpoint).with_sampler("ddim", 6).with_warm_start(2)
    obs = {"observation.state": torch.randn(2, 39, generator=torch.Generator().manual_seed(3)), "task": "reach"}
    for _ in range(2 * policy.n_action_steps):  # two chunks: the second one warm
        assert torch.equal(policy.select_action(obs, generator=torch.Generator().manual_seed(1)),
                           by_hand.select_action(obs, generator=torch.Generator().manual_seed(1)))
    assert policy.warm_counts["warm_calls"] == 1
    variant, _, _ = tuned_variant(DiffusionPolicy.load(checkpoint), tuned.path)
    assert variant.warm.describe() == warm
    (tmp_path / "cold").mkdir()
    cold = tuned_file(checkpoint, tmp_path / "cold", {"sampler": "ddim", "steps": 6, "cache": None})
    assert "warm" not in json.loads(cold.path.read_text())  # a cold pick's file is as before
    data = json.loads(tuned.path.read_text())
    tuned.path.write_text(json.dumps({**data, "warm": {**warm, "start": 6}}))
    with pytest.raises(bac.ConfigError, match="field 'warm': warm start at step 6 does not fit"):
        TunedConfig.load(tuned.path)


@pytest.mark.parametrize("extra, message", [
    (["run_methods=[ddim-4,bac-M2-ddim4]"], "need 'full'"),
    (["methods=all", "run_methods=[full,fbcache]"], "runtime rule 'fbcache'"),
    (["seed=100000", "episodes=1"], "reach the evaluation seeds"),
])
def test_tuner_refuses_before_any_work(checkpoint, tmp_path, extra, message):
    with pytest.raises(bac.ConfigError, match=message):
        check_tune_settings(tune_config(checkpoint, tmp_path, *extra))


@pytest.mark.parametrize("edit, message", [
    ({"steps": 0}, "field 'steps' must be >= 1"),
    ({"params": {"M": 2, "Q": 1}}, r"fields 'method'/'params'.*not \['Q'\]"),
    ({"params": {"M": 2, "standin": "taylor-9"}}, "unknown stand-in"),
    ({"method": "nope"}, "unknown caching method 'nope'"),
])
def test_tuned_reader_checks_steps_and_method_params(tmp_path, edit, message):
    (tmp_path / "plan.json").write_text("{}")
    path = TunedConfig("ddim", 4, "bac", {"M": 2}, "plan.json").save(tmp_path / "tuned.json")
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(bac.ConfigError, match=message):
        TunedConfig.load(path)


def test_a_tuned_ertacache_plan_brings_its_fitted_stand_in(checkpoint, tmp_path):
    """A calibrated plan with a fit (ERTACache's rectification) applies with that stand-in, not plain reuse."""
    policy = DiffusionPolicy.load(checkpoint).with_sampler("ddim", 6)
    obs = {"observation.state": torch.randn(4, 2, 39, generator=torch.Generator().manual_seed(5)), "task": "reach"}
    calibration = bac.calibrate(policy.model, lambda o: policy.predict_action_chunk(o), [obs],
                                scheduler=policy.sampler.scheduler)
    method = bac.build_method("ertacache", calibration, threshold=0.5, warmup=2)
    assert method.schedule.skipped_count() > 0 and isinstance(method.standin, bac.Linear)
    method.schedule.save(tmp_path / "plan.json")
    tuned = TunedConfig.load(TunedConfig("ddim", 6, "ertacache", {"threshold": 0.5, "warmup": 2}, "plan.json")
                             .save(tmp_path / "tuned.json"))
    assert isinstance(tuned.method_for(policy).standin, bac.Linear)
    loaded = DiffusionPolicy.load(checkpoint)
    handle = loaded.use_tuned(tuned.path)
    with policy.accelerate(method):
        assert torch.equal(actions(loaded), actions(policy))
    handle.remove()
