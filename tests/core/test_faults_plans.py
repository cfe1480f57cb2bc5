"""Plan and calibration files are read strictly, and a calibrated plan refuses weights it was not made on."""
import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.numpy import save_file

import bac
from bac.adapters import weights_digest
from bac.apps.plan import main as plan_cli

K = 12

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def plan_data(calibrated):
    return bac.make_plan(calibrated[2], "bac", M=4, n=2).to_dict()


# -- weights ---------------------------------------------------------------------------------------


def perturbed(model, tiny_denoiser):
    """Same class and parameter shapes, one weight changed by 1e-3 (another checkpoint, fine-tuning)."""
    other = tiny_denoiser()
    with torch.no_grad():
        other.decoder.layers[2].linear2.weight[0, 0] += 1e-3
    return other


def test_calibration_records_the_weights_and_only_calibrated_plans_carry_them(calibrated, tiny_denoiser, tmp_path):
    model, _, calibration = calibrated
    assert calibration.weights == weights_digest(model) == bac.describe(model).weights_digest()
    assert len(calibration.weights) == 32 and calibration.weights == weights_digest(tiny_denoiser())  # same bytes
    assert weights_digest(perturbed(model, tiny_denoiser)) != calibration.weights
    for name in ("bac", "acs", "unified-acs"):
        assert bac.make_plan(calibration, name, M=4).model["weights"] == calibration.weights
    for plan in (bac.make_plan(calibration, "uniform", M=4), bac.make_plan(model, "every-step", num_steps=K),
                 bac.build_method("taylorseer", calibration).schedule):
        assert "weights" not in plan.model  # they fit any weights
    plan = bac.make_plan(calibration, "bac", M=4, n=2)
    assert bac.Plan.load(plan.save(tmp_path / "plan.json")) == plan
    assert bac.Calibration.load(calibration.save(tmp_path / "c.safetensors")).weights == calibration.weights


def test_a_calibrated_plan_refuses_other_weights_unless_allowed(calibrated, tiny_denoiser, sample_actions):
    model, scheduler, calibration = calibrated
    other = perturbed(model, tiny_denoiser)
    spec = bac.describe(other)
    assert spec.fingerprint == bac.describe(model).fingerprint  # the architecture check cannot tell them apart
    plan = bac.make_plan(calibration, "bac", M=4, n=2)
    for check in (lambda: bac.accelerate(other, plan, num_steps=K, scheduler=scheduler),
                  lambda: bac.accelerate(other, bac.build_method("bac", calibration, M=4)),
                  lambda: plan.check_fits(spec),
                  lambda: calibration.check_fits(spec, K, scheduler)):
        with pytest.raises(bac.PlanMismatchError) as caught:
            check()
        message = str(caught.value)
        assert "calibrated on other weights" in message and calibration.weights in message
        assert "bac.calibrate" in message and "allow_other_weights=True" in message
    assert not hasattr(other, "_bac_handle")
    plan.check_fits(spec, allow_other_weights=True)
    calibration.check_fits(spec, allow_other_weights=True)
    with bac.accelerate(other, plan, num_steps=K, allow_other_weights=True) as handle:
        sample_actions(other, scheduler, torch.randn(2, 2, 5))
        assert handle.stats()["skipped"] > 0
    bac.accelerate(other, bac.make_plan(other, "uniform", num_steps=K, M=4), num_steps=K).remove()  # any weights
    bac.accelerate(model, plan, num_steps=K).remove()  # its own weights


def test_weights_changed_in_place_or_recast_are_other_weights(calibrated, tiny_denoiser):
    _, _, calibration = calibrated
    model = tiny_denoiser()
    plan = bac.make_plan(calibration, "bac", M=4, n=2)
    bac.accelerate(model, plan).remove()
    with torch.no_grad():
        model.head.bias.mul_(1.5)  # fine-tuned in place after calibration
    with pytest.raises(bac.PlanMismatchError, match="other weights"):
        bac.accelerate(model, plan)
    with pytest.raises(bac.PlanMismatchError, match="other weights"):
        bac.accelerate(tiny_denoiser().double(), plan)


def test_plans_and_calibrations_without_a_digest_still_load_and_are_not_checked(calibrated, tiny_denoiser,
                                                                              plan_data, tmp_path):
    model, _, calibration = calibrated
    other = perturbed(model, tiny_denoiser)
    del plan_data["model"]["weights"]  # a version-1 plan from before the digest
    (tmp_path / "old.json").write_text(json.dumps(plan_data))
    old_plan = bac.Plan.load(tmp_path / "old.json")
    assert old_plan.schema_version == 1
    bac.accelerate(other, old_plan).remove()
    fingerprint = {k: v for k, v in calibration.fingerprint.items() if k != "weights"}
    old = dataclasses.replace(calibration, fingerprint=fingerprint).save(tmp_path / "old.safetensors")
    loaded = bac.Calibration.load(old)
    assert loaded.weights is None
    loaded.check_fits(bac.describe(other), K)
    assert "weights" not in bac.make_plan(loaded, "bac", M=4).model


def test_hashing_a_paper_size_model_is_cheap():
    """8 decoder layers of width 256 (about 8 M parameters, as benchmarks/bench_core.py's DP-T): well under a second."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(256, 4, 1024, dropout=0.0, batch_first=True, norm_first=True)
    model = torch.nn.TransformerDecoder(layer, 8)
    assert sum(p.numel() for p in model.parameters()) > 8e6
    start = time.perf_counter()
    digest = weights_digest(model)
    assert time.perf_counter() - start < 1.0  # measured about 25 ms on one core here
    assert digest == weights_digest(model)


# -- plan files ------------------------------------------------------------------------------------


def edit(path, value):
    """Set a field of the plan data given its path (a tuple of keys and indices)."""

    def apply(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


@pytest.mark.parametrize(
    "change, message",
    [
        (edit(("blocks", 0, "update_steps"), [0, 2.7]), r"blocks\[0\]\.update_steps\[1\] must be an integer"),
        (edit(("blocks", 0, "update_steps"), [0, "3"]), r"blocks\[0\]\.update_steps\[1\] must be an integer"),
        (edit(("blocks", 0, "update_steps"), [0, True]), r"update_steps\[1\] must be an integer"),
        (edit(("blocks", 0, "update_steps"), "0,3"), r"blocks\[0\]\.update_steps must be a list"),
        (edit(("blocks", 1, "layer"), 0.0), r"blocks\[1\]\.layer must be an integer"),
        (edit(("blocks", 1, "layer"), -1), r"blocks\[1\]\.layer must be an integer >= 0"),
        (edit(("blocks", 1, "kind"), "mlp"), r"blocks\[1\]\.kind must be one of"),
        (edit(("blocks", 1, "name"), 7), r"blocks\[1\]\.name must be a non-empty string"),
        (edit(("blocks", 1, "extra"), 1), r"unknown field 'blocks\[1\]\.extra'"),
        (edit(("blocks", 2), ["decoder.layers.0.ffn", "ffn", 0, [0]]), r"blocks\[2\] must be an object"),
        (edit(("blocks",), []), "blocks must be a non-empty list"),
        (edit(("blocks",), {"a": 1}), "blocks must be a non-empty list"),
        (edit(("num_steps",), 12.0), r"num_steps must be an integer in \[1"),
        (edit(("num_steps",), "12"), r"num_steps must be an integer in \[1"),
        (edit(("schema_version",), "1"), "schema version '1'"),
        (edit(("schema_version",), True), "schema version True"),
        (edit(("method",), 3), "method must be a non-empty string"),
        (edit(("params",), [4, 2]), "params must be an object"),
        (edit(("model",), "TinyDenoiser"), "model must be an object"),
        (edit(("model", "width"), "32"), "model.width must be an integer or null"),
        (edit(("model", "num_layers"), True), "model.num_layers must be an integer"),
        (edit(("model", "weights"), 5), "model.weights must be a string"),
        (edit(("model", "size"), 5), "unknown field 'model.size'"),
        (edit(("scheduler",), 5), "scheduler must be a string or null"),
        (edit(("calibration",), "yesterday"), "calibration must be an object"),
        (edit(("steps",), 12), "unknown field 'steps'"),
        (lambda d: d["model"].pop("class"), "field model.class is missing"),
        (lambda d: d.pop("num_steps"), "field num_steps is missing"),
        (edit(("blocks", 0, "update_steps"), [0, 12]), "below 12"),
    ],
)
def test_plan_fields_have_their_types(plan_data, tmp_path, change, message):
    change(plan_data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_data))
    with pytest.raises(bac.PlanMismatchError, match=message) as caught:
        bac.Plan.load(path)
    assert str(path) in str(caught.value)
    with pytest.raises(bac.PlanMismatchError, match=message):
        bac.Plan.from_dict(plan_data)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2, 3]", "expected a JSON object, got a list"),
        (b'"plan"', "expected a JSON object, got a string"),
        (b"null", "expected a JSON object, got null"),
        (b'{"schema_version": 1, "method": "bac", "num_st', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "cannot read plan file"),
    ],
)
def test_plan_files_that_are_not_plans(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(bac.PlanMismatchError, match=message) as caught:
        bac.Plan.load(path)
    assert str(path) in str(caught.value)


def test_a_truncated_real_plan_and_a_missing_one(plan_data, tmp_path):
    text = json.dumps(plan_data, indent=1)
    path = tmp_path / "plan.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(bac.PlanMismatchError, match="not valid JSON"):
        bac.Plan.load(path)
    with pytest.raises(bac.PlanMismatchError, match="cannot read plan file .*nope.json"):
        bac.Plan.load(tmp_path / "nope.json")


def test_plans_built_in_code_refuse_non_integer_steps(calibrated):
    model = calibrated[0]
    spec = bac.describe(model)
    steps = {b.name: [0, 6] for b in spec.blocks}
    assert bac.Plan.from_steps(spec, steps, K, "mine").blocks[0].update_steps == (0, 6)
    steps[spec.blocks[3].name] = [0, 2.7]
    with pytest.raises(ValueError, match=r"decoder.layers.1.sa: update steps must be integers, got \[2.7\]"):
        bac.Plan.from_steps(spec, steps, K, "mine")


@pytest.mark.parametrize(
    "content",
    [b"[1, 2]", b"{\"schema_version\": 1, \"meth", b"", b"\xff\xfe", None],
)
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, content):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_bytes(content)
    assert plan_cli(["show", str(path), "--no-heatmap"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read plan") and str(path) in lines[0]
    assert captured.out == ""


def test_cli_as_a_program_has_no_traceback(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("[]")
    done = subprocess.run([sys.executable, "-m", "bac.apps.plan", "show", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# -- calibration files -----------------------------------------------------------------------------


def test_corrupt_calibration_files_name_the_file(calibrated, tmp_path):
    _, _, calibration = calibrated
    good = calibration.save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "header only": raw[:40],
        "empty": b"",
        "garbage": b"\x00" * 64,
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(bac.PlanMismatchError, match="cannot read calibration file") as caught:
            bac.Calibration.load(path)
        assert str(path) in str(caught.value), name
    with pytest.raises(bac.PlanMismatchError, match="cannot read calibration file .*missing"):
        bac.Calibration.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "metadata, arrays, message",
    [
        (None, None, "not a bac calibration file"),
        ("{not json", None, "metadata is not JSON"),
        ("[1]", None, "metadata is not a JSON object"),
        ({"num_steps": 2.5}, None, "num_steps must be an integer"),
        ({"samples": 0}, None, "samples must be an integer >= 1"),
        ({"blocks": [["a", "sa", 0.5]]}, None, "blocks must be a non-empty list"),
        ({"fingerprint": None}, None, "fingerprint must be an object"),
        ({"scheduler": 3}, None, "scheduler must be a string or null"),
        ("drop date", None, "field date missing"),
        ({}, {"cosine": "drop"}, "array 'cosine' missing"),
        ({}, {"l1": (2, 2, 2)}, r"array 'l1' has shape \(2, 2, 2\)"),
    ],
)
def test_malformed_calibration_files(calibrated, tmp_path, metadata, arrays, message):
    _, _, calibration = calibrated
    meta = {"blocks": [[b.name, b.kind, b.layer] for b in calibration.blocks], "fingerprint": calibration.fingerprint,
            "num_steps": calibration.num_steps, "samples": calibration.samples, "seed": calibration.seed,
            "date": calibration.date, "scheduler": calibration.scheduler}
    tensors = {**calibration.matrices, "reuse_error": calibration.reuse_error}
    if isinstance(metadata, dict):
        header = {"bac": json.dumps({**meta, **metadata})}
    elif metadata == "drop date":
        header = {"bac": json.dumps({k: v for k, v in meta.items() if k != "date"})}
    elif metadata is None:
        header = {"other": "x"}
    else:
        header = {"bac": metadata}
    for name, change in (arrays or {}).items():
        if change == "drop":
            del tensors[name]
        else:
            tensors[name] = torch.zeros(change).numpy()
    path = tmp_path / "c.safetensors"
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(bac.PlanMismatchError, match=message) as caught:
        bac.Calibration.load(path)
    assert str(path) in str(caught.value)


# -- calibration inputs ----------------------------------------------------------------------------


def test_calibrate_refuses_an_empty_batch_and_nan(calibrated, sample_actions):
    model, scheduler, _ = calibrated
    obs = torch.randn(2, 2, 5)
    sample = lambda o: sample_actions(model, scheduler, o)  # noqa: E731
    with pytest.raises(bac.DataError, match="calibration input 1 is a batch of 0 samples"):
        bac.calibrate(model, sample, [obs, obs[:0]])
    with pytest.raises(bac.DataError, match="calibration input 0 is a batch of 0 samples"):
        bac.calibrate(model, sample, [obs[:0]])
    with pytest.raises(bac.NonFiniteError, match=r"produced NaN or inf during calibration \(input 1\)"):
        bac.calibrate(model, sample, [obs, obs * float("nan")])
    with pytest.raises(bac.DataError, match="at least one calibration input"):
        bac.calibrate(model, sample, [])
    assert not hasattr(model, "_bac_handle")
