"""The digits DiT that gives the diffusers benchmark real weights: trained, resumable, loaded safely, cacheable."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bac
import bac.diffusers
from benchmarks import digits_dit
from bac.policies.checkpointing import TrainingState

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    return digits_dit.load()


@pytest.fixture(scope="module")
def classifier():
    return digits_dit.DigitClassifier()


def test_classifier_recognises_real_digits(classifier):
    images, labels = digits_dit.digits()
    assert images.shape == (1797, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert classifier.held_out_accuracy > 0.97
    assert classifier.accuracy(images, labels) > 0.97  # through the 16x16 -> 8x8 pooling the samples take


def test_shipped_checkpoint_draws_the_digits_it_is_asked_for(trained, classifier):
    labels = torch.arange(10).repeat(2)
    images = digits_dit.sample(trained, labels, steps=20, seed=1)
    assert images.shape == (20, 1, 16, 16) and torch.isfinite(images).all()
    assert classifier.accuracy(images, labels) >= 0.9
    untrained = digits_dit.build_model().eval()
    assert classifier.accuracy(digits_dit.sample(untrained, labels, steps=20, seed=1), labels) < 0.5


def test_every_step_plan_is_bit_identical_and_bac_keeps_the_digits(trained, classifier):
    steps, labels = 20, torch.arange(10).repeat(2)
    full = digits_dit.sample(trained, labels, steps=steps, seed=2)
    calibration = bac.diffusers.calibrate(
        trained, [3, 4], sample_fn=lambda seed: digits_dit.sample(trained, labels, steps=steps, seed=seed))
    bac.diffusers.enable_cache(trained, "every-step", num_inference_steps=steps)
    try:
        assert torch.equal(digits_dit.sample(trained, labels, steps=steps, seed=2), full)
    finally:
        bac.diffusers.disable_cache(trained)
    handle = bac.diffusers.enable_cache(trained, "bac", calibration=calibration, M=8, n=3)
    try:
        cached = digits_dit.sample(trained, labels, steps=steps, seed=2)
        skipped = handle.stats()["skipped_share"]
    finally:
        bac.diffusers.disable_cache(trained)
    assert torch.equal(digits_dit.sample(trained, labels, steps=steps, seed=2), full)  # disable restores
    assert skipped > 0.4
    # measured 0.077 (uniform caching: 0.047 at 50% skipped, 0.079 at 75%); a cache that feeds wrong residuals
    # lands near 0.55, as far as a sample from other noise
    assert float((cached - full).norm() / full.norm()) < 0.15
    assert classifier.accuracy(cached, labels) >= classifier.accuracy(full, labels) - 0.1


def _train(tmp_path, name):
    return digits_dit.train(tmp_path / name / "export", tmp_path / name / "run", steps=24, batch_size=16, lr=1e-3,
                            warmup=4, seed=0, checkpoint_every=12, device="cpu", progress=False, log_every=4)


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, monkeypatch):
    straight = _train(tmp_path, "straight")
    log = [json.loads(line) for line in (tmp_path / "straight" / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["batch_loss"] < 0.8 * log[0]["batch_loss"]
    assert json.loads((straight / "config.json").read_text())["training"]["step"] == 24

    save, saves = TrainingState.save, []

    def interrupted_after_first_checkpoint(self, path, **extra):
        save(self, path, **extra)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingState, "save", interrupted_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "resumed")
    resumed = _train(tmp_path, "resumed")
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks.digits_dit train"):
        digits_dit.load(tmp_path / "missing")
    wrong = tmp_path / "wrong-config"
    digits_dit.save(digits_dit.build_model(), wrong, {})
    config = json.loads((wrong / "config.json").read_text())
    config["model"]["num_layers"] = 4
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config"):
        digits_dit.load(wrong)
    mis_shaped = tmp_path / "mis-shaped"
    digits_dit.save(digits_dit.build_model(), mis_shaped, {})
    state = load_file(mis_shaped / "model.safetensors")
    state["proj_out_2.weight"] = state["proj_out_2.weight"][:, :8].contiguous()
    save_file(state, mis_shaped / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        digits_dit.load(mis_shaped)


def test_taylorseer_matches_diffusers_taylorseer_cache_on_the_trained_dit():
    """Same computed steps, same order: bac's forecast (ungated outputs under the current gate) is as accurate as
    diffusers' TaylorSeerCache on the attention/FFN module outputs, the same forecast. (diffusers' forecast of whole
    block outputs, the stream itself, is another forecast: closer at some settings, farther at others; measured in
    benchmarks/results/bench_diffusers.)"""
    from diffusers import TaylorSeerCacheConfig

    model = digits_dit.load(model_class=digits_dit.CachingDiT)
    steps, labels = 30, torch.arange(10).repeat(2)

    @torch.no_grad()
    def sample():
        x = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(3))
        scheduler = digits_dit.scheduler_for_sampling()
        scheduler.set_timesteps(steps)
        bac.new_trajectory(model)
        for t in scheduler.timesteps:
            with model.cache_context("cond"):
                x = scheduler.step(digits_dit.guided_noise(model, x, t, labels, digits_dit.GUIDANCE), t, x).prev_sample
        model._reset_stateful_cache()
        return x

    def deviation(out):
        return float((out - full).norm() / full.norm())

    def theirs(interval, order, patterns):
        model.enable_cache(TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=1,
                                                 max_order=order, taylor_factors_dtype=torch.float32,
                                                 cache_identifiers=patterns))
        try:
            return deviation(sample())
        finally:
            model.disable_cache()

    full = sample()
    spec = bac.describe(model)
    for interval, order in ((4, 1), (4, 2), (3, 1)):
        computed = [s for s in range(steps) if s == 0 or (s - 2) % interval == 0]  # diffusers' steps, warm-up 1
        plan = bac.Plan.from_steps(spec, {b.name: computed for b in spec.blocks}, steps, "taylorseer", {})
        bac.diffusers.enable_cache(model, bac.Method("taylorseer", plan, bac.Taylor(order)), num_inference_steps=steps)
        try:
            ours = deviation(sample())
        finally:
            bac.diffusers.disable_cache(model)
        modules = theirs(interval, order, [r"transformer_blocks\.\d+\.(attn1|ff)"])
        assert ours == pytest.approx(modules, rel=1e-3), (interval, order)
        assert 0.005 < ours < 0.2  # a forecast, not full computation, and not noise
