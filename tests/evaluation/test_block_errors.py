"""Per-block caching errors against full computation (benchmarks.block_errors) on a tiny random DP-T."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bac
from benchmarks.block_errors import block_errors, relative_l2, surges
from bac.policies.policy import DiffusionPolicy

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, one_thread):
    """The tiny policy on a 6-step DDPM sampler, a batch of 3 push observations and a calibration on it."""
    policy = DiffusionPolicy.load(tiny_checkpoint).with_sampler("ddpm", STEPS)
    batch = {"observation.state": torch.randn(3, 2, 39, generator=torch.Generator().manual_seed(0)),
             "task": ["push"] * 3}
    calibration = bac.calibrate(policy.model, policy.predict_action_chunk, [batch], scheduler=policy.sampler.scheduler)
    return policy, batch, calibration


def test_computing_every_block_at_every_step_has_no_error(tiny):
    policy, batch, _ = tiny
    plans = {"every-step": bac.make_plan(policy.model, "every-step", num_steps=STEPS),
             "uniform-1": bac.build_method("uniform", policy.model, num_steps=STEPS, interval=1)}
    results = block_errors(policy, plans, batch, seed=3)
    for result in results.values():
        assert result["errors"].shape == (len(result["blocks"]), STEPS)
        assert not result["errors"].any() and result["mask"].all()
        assert result["action_deviation"] == {"mean": 0.0, "max": 0.0}
        assert result["surges"] == result["update_surges"] == 0 and result["skipped_share"] == 0


def test_caching_is_exact_at_step_0_and_errs_where_blocks_are_reused(tiny):
    policy, batch, calibration = tiny
    plans = {"uniform": bac.build_method("uniform", policy.model, num_steps=STEPS, interval=3),
             "acs": bac.build_method("acs", calibration, num_steps=STEPS, M=2),
             "bac": bac.build_method("bac", calibration, num_steps=STEPS, M=2, n=2)}
    results = block_errors(policy, plans, batch, seed=3)
    for name, result in results.items():
        errors, mask = result["errors"], result["mask"]
        assert (errors[:, 0] == 0).all(), name  # every block computes step 0 on identical inputs
        assert (errors[~mask] > 0).any() and result["mean_error_reused"] > 0, name
        assert result["action_deviation"]["mean"] > 0, name
        # the reported mask is the plan's own update table, blocks in its order
        assert np.array_equal(mask, np.asarray(plans[name].schedule.step_table()).T), name
        assert [b["name"] for b in result["blocks"]] == [b.name for b in plans[name].schedule.blocks]
        assert result["surges"] == int(result["block_surges"].sum())


def test_surges_are_reused_steps_above_the_factor_times_the_median():
    errors = np.array([[0.0, 1.0, 1.0, 5.0, 3.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    mask = np.array([[True, False, False, False, True], [True, True, True, True, True]])
    surge, update = surges(errors, mask, 2.0)
    assert surge.tolist() == [[False, False, False, True, False], [False] * 5]  # median 1: only 5 at a reused step
    assert update.tolist() == [[False, False, False, False, True], [False, False, True, False, False]]
    assert relative_l2(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.zeros(2, 2)).tolist() == [0.0, float("inf")]


def test_cli_writes_the_report_and_one_figure_per_task(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.block_errors", f"checkpoint={tiny_checkpoint}", "tasks=[push]",
         "run_methods=[acs,bac]", "M=2", "n=2", "sampler.steps=6", "samples=3", "calibration.samples=4",
         "calibration.episodes=3", f"plan_cache={tmp_path / 'plans'}", f"out_dir={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "block_errors.json").read_text())
    assert set(report["summary"]) == {"acs", "bac"} and report["figures"] == {"push": ["block_errors-push.png"]}
    for entry in report["tasks"]["push"]["methods"].values():
        assert len(entry["errors"]) == len(entry["mask"]) == len(entry["blocks"]) and len(entry["errors"][0]) == 6
    assert (out / "block_errors-push.png").stat().st_size > 0
    assert "bac" in done.stdout and "block_errors.json" in done.stdout
