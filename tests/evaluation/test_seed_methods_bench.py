"""The seed methods' mechanism checks (benchmarks.seed_methods) on a tiny random DP-T."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bac
from benchmarks.seed_methods import SCHEMA, choose_thresholds, layer_sets, measure, policy_subject
from bac.evaluation.settings import EvalError
from bac.policies.policy import DiffusionPolicy

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
DRAWS = 3


@pytest.fixture(scope="module")
def measured(tiny_checkpoint, one_thread):
    """Both checks on the tiny policy (2 layers) on an 8-step DDPM sampler, 3 push observations."""
    policy = DiffusionPolicy.load(tiny_checkpoint).with_sampler("ddpm", STEPS)
    batch = {"observation.state": torch.randn(3, 2, 39, generator=torch.Generator().manual_seed(0)),
             "task": ["push"] * 3}
    calibration_batch = {"observation.state": torch.randn(4, 2, 39, generator=torch.Generator().manual_seed(1)),
                         "task": ["push"] * 4}
    calibration = bac.calibrate(policy.model, policy.predict_action_chunk, [calibration_batch],
                                scheduler=policy.sampler.scheduler, attention=True)
    subject = policy_subject(policy, calibration, batch, calibration_batch, seed=5, facts={"name": "tiny"})
    return calibration, measure(subject, None, [0.3, 0.6], [0.5], [2, 3], DRAWS, draw_seed=0)


def test_ertacache_rows_deviate_where_the_schedule_skips(measured):
    calibration, result = measured
    assert result["num_steps"] == STEPS and result["observations"] == 3
    assert result["ertacache"]
    for row in result["ertacache"]:
        assert set(row["deviation"]) == {"terms0", "terms1", "terms2", "terms2_adjusted"}
        assert row["computed_steps"][0] == 0 and len(row["computed_steps"]) < STEPS  # the plan skips steps
        assert row["deviation"]["terms0"] > 0
        assert row["ratio_terms2_terms0"] == pytest.approx(row["deviation"]["terms2"] / row["deviation"]["terms0"])
        assert row["step_scales"]  # the adjustment scaled the skipping steps
    shares = [row["computed_share"] for row in result["ertacache"]]
    assert len(set(shares)) == len(shares)  # each threshold a distinct schedule


def test_profiling_rows_compare_disjoint_layer_sets_of_one_size(measured):
    calibration, result = measured
    assert set(result["layer_scores"]) == {"0", "1"} and len(result["focus"]) == len(calibration.blocks)
    assert len(result["profiling"]) == 2  # one share x two intervals
    for row in result["profiling"]:
        background, foreground = row["background"]["layers"], row["foreground"]["layers"]
        assert len(background) == len(foreground) == row["layers_cached"] == 1
        assert not set(background) & set(foreground)
        assert len(row["random"]["draws"]) == DRAWS
        assert all(len(d["layers"]) == 1 for d in row["random"]["draws"])
        assert row["background"]["deviation"] > 0 and row["foreground"]["deviation"] > 0
        scores = result["layer_scores"]
        assert scores[str(background[0])] <= scores[str(foreground[0])]


def test_thresholds_and_layer_sets_are_refused_or_chosen_as_documented(measured):
    calibration, _ = measured
    thresholds = choose_thresholds(calibration, [0.0, 1.0])
    steps = [len(bac.build_method("ertacache", calibration, threshold=t).schedule.blocks[0].update_steps)
             for t in thresholds]
    assert steps[0] < steps[-1] == STEPS  # 0: the fewest computed steps; 1: every step
    with pytest.raises(EvalError, match="disjoint"):
        layer_sets({0: 0.1, 1: 0.5, 2: 0.9}, 2, 3, 0)
    sets = layer_sets({0: 0.1, 1: 0.5, 2: float("nan"), 3: 0.9, 4: 0.2}, 2, 4, 0)
    assert sets["background"] == [0, 4] and sets["foreground"] == [1, 3]
    assert len(sets["random"]) == 4 and all(2 not in s for s in sets["random"])


def test_cli_writes_the_json_and_the_table(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.seed_methods", f"checkpoint={tiny_checkpoint}", "tasks=[push]",
         "sampler.steps=6", "samples=2", "calibration.samples=4", "calibration.episodes=3", "fractions=[0.5]",
         "shares=[0.5]", "intervals=[2]", "draws=2", f"plan_cache={tmp_path / 'plans'}", f"out_dir={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "seed_methods.json").read_text())
    assert report["schema"] == SCHEMA and {"created", "command", "settings", "models"} <= set(report)
    (model,) = report["models"].values()
    assert model["sampler"] == {"kind": "ddpm", "steps": 6} and model["observations"] == 2
    assert len(model["ertacache"]) == 1 and len(model["profiling"][0]["random"]["draws"]) == 2
    assert "ERTACache threshold" in (out / "seed_methods.md").read_text() and "seed_methods.json" in done.stdout


def test_cli_refuses_an_empty_setting_list_before_any_work(tiny_checkpoint, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.seed_methods", f"checkpoint={tiny_checkpoint}", "fractions=[]"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "fractions is empty" in done.stderr and "Traceback" not in done.stderr
