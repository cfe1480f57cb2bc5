"""The evaluator passes variants as values: the policy it loads is never re-pointed at another sampler, no
function rewrites its caller's data, and recorded runs still resume by their settings digest."""
import importlib
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bac
import bac.evaluation.run as run_module
from bac.configs import CONFIG_DIR
from bac.evaluation.budget import budget_plans
from bac.evaluation.latency import measure_latency
from bac.evaluation.provenance import settings_digest
from bac.evaluation.realtime import realtime_digest
from bac.evaluation.setup import count_flops, prepare
from bac.evaluation.variants import Variant, applied
from bac.policies.policy import DiffusionPolicy

REPO = Path(__file__).resolve().parents[2]


def budget_config(checkpoint, tmp_path):
    overrides = [f"checkpoint={checkpoint}", "methods=budget", "run_methods=[full,ddim,bac,budget]", "tasks=[reach]",
                 "episodes=0", "sampler.steps=6", "M=2", "n=2", "calibration.samples=4", "calibration.episodes=3",
                 "latency.repeats=2", "latency.warmup=0", f"out_dir={tmp_path / 'out'}", "progress=false",
                 f"plan_cache={tmp_path / 'plans'}",
                 # a budget every plan meets: what is tested is who changes what, not the host's timing
                 "~methods.budget.budget.match", "+methods.budget.budget.latency_ms=100000"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def chunk(policy, seed=1):
    obs = {"observation.state": torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(3)), "task": "reach"}
    return policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(seed))


def test_a_variant_samples_through_a_view_whose_cache_is_removed_on_exit(tiny_checkpoint, one_thread):
    policy = DiffusionPolicy.load(tiny_checkpoint)
    sampler, before = policy.sampler, chunk(policy)
    variant = Variant("uniform-ddim2", "ddim", 2, "uniform", {"M": 1})
    by_hand = DiffusionPolicy.load(tiny_checkpoint).with_sampler("ddim", 2)
    method = bac.build_method("uniform", by_hand.model, num_steps=2, scheduler=by_hand.sampler.scheduler, M=1)
    with applied(policy, variant, method) as (view, handle):
        assert (view.sampler.kind, view.sampler.steps) == ("ddim", 2) and policy.sampler is sampler
        assert bac.get_handle(policy.model) is handle  # the view shares the policy's weights
        with by_hand.accelerate(method):
            assert torch.equal(chunk(view), chunk(by_hand))
    assert bac.get_handle(policy.model) is None and policy.sampler is sampler
    assert torch.equal(chunk(policy), before)
    with applied(policy, Variant("ddim2", "ddim", 2), None) as (view, handle):
        assert handle is None and bac.get_handle(policy.model) is None
        assert torch.equal(chunk(view), chunk(by_hand))


def test_the_evaluator_leaves_its_policy_and_its_callers_data_as_they_are(tiny_checkpoint, tmp_path, one_thread):
    cfg = budget_config(tiny_checkpoint, tmp_path)
    setup = prepare(cfg)
    sampler, variants, built = setup.policy.sampler, list(setup.variants), dict(setup.built)
    assert (sampler.kind, sampler.steps) == ("ddpm", 6) and "budget" not in built

    made, info = budget_plans(cfg, setup.policy, setup.variants, setup.built, setup.calibrations,
                              setup.latency_batch, tmp_path / "out")
    assert set(made) == set(info) == {"budget"} and setup.built == built  # returned, not added to built
    methods = {**setup.built, **made}
    counted = count_flops(setup, setup.variants, methods)
    assert setup.variants == variants  # steps: auto resolved in the returned variants only
    assert [v.name for v in counted.variants] == [v.name for v in variants] == list(counted.flops)
    assert count_flops(setup, setup.variants, methods) == counted
    latencies = measure_latency(setup.policy, counted.variants, methods, setup.latency_batch, repeats=1, warmup=0,
                                threads=1)
    assert set(latencies) == {v.name for v in variants}
    assert setup.policy.sampler is sampler and bac.get_handle(setup.policy.model) is None


def test_moved_names_still_import_from_run_with_a_deprecation_warning():
    for name, target in run_module.MOVED.items():
        home, _, new_name = target.partition(".")
        with pytest.warns(DeprecationWarning, match=f"bac.evaluation.{home}.{new_name or name}"):
            moved = getattr(run_module, name)
        assert moved is getattr(importlib.import_module(f"bac.evaluation.{home}"), new_name or name)
    assert run_module.MOVED["weights_digest"] == "provenance.checkpoint_digest"
    with pytest.raises(AttributeError):
        getattr(run_module, "no_such_name")


def test_recorded_runs_resume_by_their_settings_digest():
    """Every recorded run of the current settings schema finds its folder again (its run.json digest)."""
    compared = 0
    for path in sorted((REPO / "benchmarks" / "results").glob("*/run.json")):
        recorded = json.loads(path.read_text())
        if "instructions" not in recorded["config"]:  # recorded before the setting existed
            continue
        cfg = OmegaConf.create(recorded["config"])
        digest = realtime_digest(cfg) if cfg.get("mode") == "realtime" else settings_digest(cfg)
        assert digest == recorded["digest"], path
        compared += 1
    assert compared >= 10
