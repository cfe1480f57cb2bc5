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
from benchmarks.tiny_pipelines import call_kwargs, tiny_flux_pipeline, tiny_wan_pipeline

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
    return bac.diffusers.calibrate(pipe, [call_kwargs(kind, num_inference_steps=K, seed=1)], attention=True)


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


# --- fbcache against diffusers' FirstBlockCache on the real pipelines -----------------------------------


def full_steps(pipe, enable, disable, kind):
    """Indices of the denoiser calls (both guidance branches, in call order) that ran the last block, and the
    latents of one guided call under the cache ``enable()`` turns on."""
    transformer, calls, ran = pipe.transformer, [0], []
    last = transformer.single_transformer_blocks[-1].proj_out if kind == "flux" else transformer.blocks[-1].ffn
    hooks = [transformer.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)),
             last.register_forward_hook(lambda *a: ran.append(calls[0] - 1))]
    enable()
    try:
        out = run(pipe, kind)
    finally:
        disable()
        for hook in hooks:
            hook.remove()
    return ran, out


def test_fbcache_makes_diffusers_first_block_cache_decisions(pipe, kind):
    from diffusers import FirstBlockCacheConfig

    skipped = []
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5):
        theirs, their_out = full_steps(pipe, lambda: pipe.transformer.enable_cache(
            FirstBlockCacheConfig(threshold=threshold)), pipe.transformer.disable_cache, kind)
        ours, our_out = full_steps(pipe, lambda: bac.diffusers.enable_cache(
            pipe, "fbcache", threshold=threshold, num_inference_steps=K), lambda: bac.diffusers.disable_cache(pipe), kind)
        assert ours == theirs, threshold  # the same denoiser calls run in full
        assert torch.allclose(our_out, their_out, rtol=1e-5, atol=1e-5), threshold
        skipped.append(2 * K - len(ours))
    assert skipped[0] == 0 and skipped[-1] > 0  # the thresholds span computing everything and skipping


# --- step counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fbcache", "cg-taylor", "sortblock", "uniform", "taylorseer", "every-step"])
def test_step_count_free_methods_follow_each_call(pipe, kind, method, skipping_settings, exhaustive_settings):
    for steps in (4, 9):  # FLUX-schnell's 4 steps, then more than enabled for
        expected = reference_for(pipe, kind, steps)
        handle = enable(pipe, method, exhaustive_settings(K)[method], None)  # enabled for K steps
        try:
            assert torch.equal(run(pipe, kind, num_inference_steps=steps), expected)
            assert handle.stats()["num_steps"] == steps and handle.stats()["skipped"] == 0
        finally:
            bac.diffusers.disable_cache(pipe)
    if method == "every-step":
        return
    handle = enable(pipe, method, skipping_settings[method], None)
    try:
        first = run(pipe, kind, num_inference_steps=4)
        run(pipe, kind)  # back to K
        again = run(pipe, kind, num_inference_steps=4)
        stats = handle.stats()
    finally:
        bac.diffusers.disable_cache(pipe)
    assert torch.equal(first, again) and torch.isfinite(first).all()
    assert stats["sampling_calls"] == 3 and stats["denoiser_calls"] == 2 * (4 + K + 4) and stats["skipped"] > 0


REFERENCES = {}


def reference_for(pipe, kind, steps):
    """The uncached pipeline's latents at ``steps`` steps (call with caching disabled)."""
    assert not hasattr(pipe.transformer, "_bac_handle")
    if (kind, steps) not in REFERENCES:
        REFERENCES[kind, steps] = run(pipe, kind, num_inference_steps=steps)
    return REFERENCES[kind, steps]


def test_calibrated_plans_replan_for_covered_step_counts_and_refuse_others(pipe, kind, calibration, tmp_path):
    assert calibration.timesteps is not None and len(calibration.timesteps) == K
    coarse = K // 2  # every other calibrated timestep, for both pipelines' schedulers
    for method, params in (("bac", {"M": 2, "n": 1}), ("forecast-acs", {"M": 2})):
        handle = enable(pipe, method, params, calibration)
        try:
            run(pipe, kind)
            out = run(pipe, kind, num_inference_steps=coarse)
            assert handle.stats()["num_steps"] == coarse and torch.isfinite(out).all()
            expected = bac.build_method(method, calibration.for_timesteps(pipe.scheduler.timesteps), **params)
            assert handle.plan == expected.schedule  # planned from the calibrated steps at this call's timesteps
            with pytest.raises(bac.PlanMismatchError, match=f"re-planning '{method}' for 4 steps from its {K}-step "
                                                            "calibration: the 4 timesteps of this call .* are not "
                                                            f"among the {K} calibrated ones"):
                run(pipe, kind, num_inference_steps=4)
            assert torch.equal(run(pipe, kind, num_inference_steps=coarse), out)  # a refused call leaves no trace
            assert handle.stats()["sampling_calls"] == 3  # the refused call ran no denoiser call
        finally:
            bac.diffusers.disable_cache(pipe)
    plan = bac.make_plan(pipe.transformer, "uniform", num_steps=K, interval=2).save(tmp_path / "plan.json")
    bac.diffusers.enable_cache(pipe, plan)
    try:
        with pytest.raises(bac.PlanMismatchError, match="a plan is made for one step count"):
            run(pipe, kind, num_inference_steps=4)
    finally:
        bac.diffusers.disable_cache(pipe)
    assert torch.equal(run(pipe, kind), run(pipe, kind))


def test_a_calibration_without_timesteps_refuses_another_step_count(pipe, kind, calibration):
    import dataclasses

    bare = dataclasses.replace(calibration, timesteps=None)  # e.g. recorded on a bare transformer
    bac.diffusers.enable_cache(pipe, "bac", calibration=bare, M=2, n=1)
    try:
        with pytest.raises(bac.PlanMismatchError, match=f"made for {K} denoising steps, not num_inference_steps=3; "
                                                        f"'bac' is planned from a calibration of {K} steps"):
            run(pipe, kind, num_inference_steps=3)
    finally:
        bac.diffusers.disable_cache(pipe)


def test_refine_on_a_pipeline_lowers_the_deviation_it_reports(pipe, kind):
    start = bac.build_method("taylorseer", pipe.transformer, num_steps=K, interval=3, order=1)
    refined = bac.diffusers.refine(pipe, start, [call_kwargs(kind, num_inference_steps=K, seed=5)], rounds=1)
    params = refined.schedule.params
    assert refined.name == "taylorseer+refined" and params["deviation_after"] <= params["deviation_before"]
    handle = bac.diffusers.enable_cache(pipe, refined)
    try:
        out = pipe(**call_kwargs(kind, num_inference_steps=K, seed=5))[0]
        assert handle.stats()["skipped"] > 0
    finally:
        bac.diffusers.disable_cache(pipe)
    full = pipe(**call_kwargs(kind, num_inference_steps=K, seed=5))[0]
    assert float((out - full).double().norm() / full.double().norm()) == pytest.approx(params["deviation_after"],
                                                                                         rel=1e-6)
    with pytest.raises(TypeError, match="sample_fn"):
        bac.diffusers.refine(pipe.transformer, start, [0])
