"""bac.diffusers on real diffusers FluxPipeline and WanPipeline objects (tiny random models, built offline).

Unlike test_cache.py's hand-written sampling loops, these run the pipelines' own text encoding, schedulers,
classifier-free guidance (the transformer called twice per step, in ``cache_context("cond" / "uncond")``)
and batching (two prompts, two outputs per prompt).
"""
import pytest
import torch
from torch import nn

import bac
import bac.diffusers
from bac.evaluation.tiny_pipelines import call_kwargs, tiny_flux_pipeline, tiny_wan_pipeline

K = 6  # denoising steps of every call here
METHODS = bac.available_methods()
SKIPPING_METHODS = [m for m in METHODS if m != "every-step"]  # the conftest's skipping_settings
BUILDERS = {"flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}
LATENT_SHAPES = {"flux": (4, 16, 16), "wan": (4, 4, 3, 8, 8)}  # two prompts x two outputs; FLUX's are packed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(kind):
    pipe = BUILDERS[kind]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, kind, **changes):
    """One guided call (FLUX: true_cfg_scale=2 with a negative prompt; Wan: guidance_scale=3), its latents."""
    return pipe(**{**call_kwargs(kind, num_inference_steps=K, per_prompt=2), **changes})[0]


@pytest.fixture(scope="module")
def reference(pipe, kind):
    return run(pipe, kind)


@pytest.fixture(scope="module")
def calibration(pipe, kind):
    return bac.diffusers.calibrate(pipe, [call_kwargs(kind, num_inference_steps=K, seed=1)])


def enable(pipe, method, params, calibration):
    calibration = calibration if bac.methods.needs_calibration(method) else None
    return bac.diffusers.enable_cache(pipe, method, calibration=calibration, num_inference_steps=K, **params)


def test_pipelines_are_deterministic_and_in_eval_mode(pipe, kind, reference):
    assert not any(m.training for m in pipe.components.values() if isinstance(m, nn.Module))
    assert reference.shape == LATENT_SHAPES[kind] and torch.isfinite(reference).all()
    assert torch.equal(run(pipe, kind), reference)
    pixels = run(pipe, kind, output_type="np")  # the VAE decodes too
    assert pixels.shape == ((4, 16, 16, 3) if kind == "flux" else (4, 5, 16, 16, 3))
    assert (pixels == run(pipe, kind, output_type="np")).all()


@pytest.mark.parametrize("method", METHODS)
def test_exhaustive_settings_are_bit_identical_and_disable_restores(pipe, kind, reference, calibration, method,
                                                                    exhaustive_settings):
    cls = type(pipe)
    handle = enable(pipe, method, exhaustive_settings(K)[method], calibration)
    try:
        cached = run(pipe, kind)
        stats = handle.stats()
    finally:
        bac.diffusers.disable_cache(pipe)
    assert stats["skipped"] == 0 and stats["denoiser_calls"] == 2 * K
    assert torch.equal(cached, reference)
    assert type(pipe) is cls and torch.equal(run(pipe, kind), reference)


@pytest.mark.parametrize("method", SKIPPING_METHODS)
def test_skipping_settings_skip_and_each_call_is_a_new_trajectory(pipe, kind, reference, calibration, method,
                                                                  skipping_settings):
    assert sorted(skipping_settings) == sorted(SKIPPING_METHODS)
    handle = enable(pipe, method, skipping_settings[method], calibration)
    try:
        first, second = run(pipe, kind), run(pipe, kind)
        stats = handle.stats()
    finally:
        bac.diffusers.disable_cache(pipe)
    assert stats["sampling_calls"] == 2 and stats["denoiser_calls"] == 2 * 2 * K and stats["skipped"] > 0
    assert stats["computed"] + stats["skipped"] == stats["denoiser_calls"] * stats["num_blocks"]
    assert torch.isfinite(first).all() and not torch.equal(first, reference)
    assert torch.equal(first, second)
    assert torch.equal(run(pipe, kind), reference)


def test_guidance_runs_two_contexts_per_step(pipe, kind, skipping_settings):
    handle = bac.diffusers.enable_cache(pipe, "fbcache", num_inference_steps=K, **skipping_settings["fbcache"])
    try:
        run(pipe, kind)
        guided = handle.stats()
        assert handle.steps_run() == {"cond": K, "uncond": K}
        pipe(**call_kwargs(kind, num_inference_steps=K, guidance=False))
        unguided = handle.stats()
        assert handle.steps_run() == {"cond": K}
    finally:
        bac.diffusers.disable_cache(pipe)
    assert guided["denoiser_calls"] == 2 * K and guided["last_call"]["denoiser_calls"] == 2 * K
    assert unguided["denoiser_calls"] == 3 * K and unguided["last_call"]["denoiser_calls"] == K
    assert unguided["sampling_calls"] == 2
