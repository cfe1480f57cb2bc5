"""Plan files: round trip, the methods, and every mismatch error."""
import json

import pytest

import bac
from bac.apps.plan import main as plan_cli


@pytest.fixture
def calibrated(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    calibration = bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs], scheduler=scheduler)
    return model, scheduler, obs, calibration


def test_round_trip(calibrated, tmp_path):
    model, scheduler, _, calibration = calibrated
    plan = bac.make_plan(calibration, "bac", M=4, n=2)
    loaded = bac.Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["schema_version"] == 1 and data["num_steps"] == 12 and data["method"] == "bac"
    assert data["params"] == {"M": 4, "n": 2, "metric": "cosine"}
    assert data["model"]["class"].endswith("TinyDenoiser") and data["model"]["num_layers"] == 3
    assert data["model"]["width"] == 32 and data["calibration"]["samples"] == 2
    assert data["scheduler"].startswith("DDPMScheduler(")
    first = data["blocks"][0]
    assert first["name"] == "decoder.layers.0.sa" and first["kind"] == "sa" and first["layer"] == 0
    assert first["update_steps"][0] == 0 and first["update_steps"] == sorted(first["update_steps"])
    bac.accelerate(model, loaded, num_steps=12, scheduler=scheduler).remove()


def test_methods(calibrated):
    model, _, _, calibration = calibrated
    uniform = bac.make_plan(model, "uniform", num_steps=12, M=4).update_steps()
    assert set(map(tuple, uniform.values())) == {(0, 3, 6, 9)}
    assert bac.make_plan(model, "uniform", num_steps=12, interval=5).blocks[0].update_steps == (0, 5, 10)
    unified = bac.make_plan(calibration, "unified-acs", M=4).update_steps()
    assert len(set(map(tuple, unified.values()))) == 1 and len(next(iter(unified.values()))) == 4
    reference = bac.make_plan(calibration, "unified-acs", M=4, reference="decoder.layers.2.ffn").update_steps()
    assert all(v == bac.acs_schedule(calibration.matrix("cosine")[-1], 4) for v in reference.values())
    acs = bac.make_plan(calibration, "acs", M=4).update_steps()
    assert all(len(v) == 4 for v in acs.values())
    assert bac.make_plan(calibration, "bac", M=4, n=0).update_steps() == acs
    full = bac.make_plan(calibration, "bac", M=4, n=3)
    expected = bac.bubbling_union(acs, calibration.blocks, dict(zip(acs, calibration.reuse_error)), 3)
    assert full.update_steps() == expected
    for metric in ("l1", "mse"):
        steps = bac.make_plan(calibration, "acs", M=4, metric=metric).update_steps()
        assert steps["decoder.layers.0.sa"] == bac.acs_schedule(calibration.matrix(metric)[0], 4, maximize=False)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, c: bac.make_plan(c, "magic"), ValueError, "unknown caching method"),
        (lambda m, c: bac.make_plan(c, "bac", M=4, k=3), ValueError, "takes parameters"),
        (lambda m, c: bac.make_plan(m, "bac"), ValueError, "needs a Calibration"),
        (lambda m, c: bac.make_plan(m, "uniform", M=3), ValueError, "needs num_steps"),
        (lambda m, c: bac.make_plan(m, "uniform", num_steps=12), ValueError, "exactly one"),
        (lambda m, c: bac.make_plan(c, "acs", M=13), ValueError, r"in \[1, 12\]"),
        (lambda m, c: bac.make_plan(c, "acs", metric="l2"), ValueError, "unknown metric"),
        (lambda m, c: bac.make_plan(c, "acs", num_steps=10), ValueError, "covers 12 steps"),
        (lambda m, c: bac.make_plan(c, "unified-acs", reference="nope"), ValueError, "reference block"),
    ],
)
def test_bad_plan_requests(calibrated, call, error, message):
    model, _, _, calibration = calibrated
    with pytest.raises(error, match=message):
        call(model, calibration)


def subclass_of(denoiser_class):
    class Subclass(denoiser_class):
        pass

    return Subclass


# Each case: (the tiny_denoiser factory, its class, the ddpm_scheduler factory) -> (model, accelerate's keywords).
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda other_model, cls, ddpm_scheduler: (other_model(width=64), {}), "width=32"),
        (lambda other_model, cls, ddpm_scheduler: (other_model(num_layers=2), {}), "num_layers=3"),
        (lambda other_model, cls, ddpm_scheduler: (
            subclass_of(cls)(action_dim=3, cond_dim=5, horizon=8, width=32, num_layers=3, heads=2), {}), "class="),
        (lambda other_model, cls, ddpm_scheduler: (other_model(cond_dim=7), {}), "parameter shapes"),
        (lambda other_model, cls, ddpm_scheduler: (other_model(), {"num_steps": 10}),
         "made for 12 denoising steps, the sampler runs 10"),
        (lambda other_model, cls, ddpm_scheduler: (other_model(), {"scheduler": ddpm_scheduler(10)}), "scheduler"),
        (lambda other_model, cls, ddpm_scheduler: (other_model(), {"scheduler": "DDIMScheduler(...)"}), "scheduler"),
    ],
)
def test_plan_refuses_what_it_does_not_fit(calibrated, make, message, tiny_denoiser, denoiser_class, ddpm_scheduler):
    plan = bac.make_plan(calibrated[3], "bac", M=4, n=2)
    model, kwargs = make(tiny_denoiser, denoiser_class, ddpm_scheduler)
    with pytest.raises(bac.PlanMismatchError, match=message):
        bac.accelerate(model, plan, **kwargs)


def test_plan_with_other_blocks_is_refused(calibrated, tmp_path):
    model, _, _, calibration = calibrated
    data = bac.make_plan(calibration, "bac", M=4, n=2).to_dict()
    data["blocks"][0]["name"] = "decoder.layers.0.attention"
    with pytest.raises(bac.PlanMismatchError, match="only in plan"):
        bac.accelerate(model, bac.Plan.from_dict(data))
    data["blocks"] = data["blocks"][1:]
    with pytest.raises(bac.PlanMismatchError, match="only in model"):
        bac.accelerate(model, bac.Plan.from_dict(data))


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda d: d.update(schema_version=99), bac.PlanMismatchError, "schema version 99"),
        (lambda d: d["blocks"][0].update(update_steps=[1, 2]), ValueError, "start with step 0"),
        (lambda d: d["blocks"][0].update(update_steps=[0, 5, 3]), ValueError, "sorted"),
        (lambda d: d["blocks"][0].update(update_steps=[0, 12]), ValueError, "below 12"),
        (lambda d: d["blocks"][0].pop("kind"), ValueError, "malformed"),
        (lambda d: d.update(num_steps=0), ValueError, r"num_steps must be an integer in \[1"),
    ],
)
def test_malformed_plan_files(calibrated, tmp_path, edit, error, message):
    data = bac.make_plan(calibrated[3], "bac", M=4, n=2).to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(error, match=message):
        bac.Plan.load(path)


def test_cli_show_prints_summary_and_draws_heatmap(calibrated, tmp_path, capsys):
    plan = bac.make_plan(calibrated[3], "bac", M=4, n=2)
    path = plan.save(tmp_path / "plan.json")
    assert plan_cli(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "plan 'bac' (M=4, n=2, metric=cosine)" in out and "decoder.layers.2.ffn" in out
    image = tmp_path / "plan.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text("{}")
    assert plan_cli(["show", str(tmp_path / "bad.json")]) == 2
    assert "cannot read plan" in capsys.readouterr().err
