"""bac.diffusers.enable_cache: every caching method on DiT, FLUX and Wan, and the DiT pipeline (tiny models, CPU)."""
import contextlib

import pytest
import torch
from diffusers import DiTPipeline, FirstBlockCacheConfig, FlowMatchEulerDiscreteScheduler

import bac
import bac.diffusers
from bac import PlanMismatchError
from benchmarks.branch_counts import count_branches
from benchmarks.digits_dit import CachingDiT

CASE_NAMES = ("dit", "flux", "wan")  # the conftest's cases
# the methods of the exhaustive_settings fixture
EXHAUSTIVE_METHODS = ("acs", "bac", "cg-taylor", "ertacache", "every-step", "fbcache", "forecast-acs",
                      "profiling-dit", "sortblock", "taylorseer", "unified-acs", "uniform")
SKIPPING = {
    "uniform": {"interval": 2},
    "unified-acs": {"M": 3},
    "acs": {"M": 3},
    "bac": {"M": 3, "n": 2},
    "bac+taylor": {"M": 3, "n": 2, "standin": "taylor-1"},
    "forecast-acs": {"M": 3, "order": 1},
    "taylorseer": {"interval": 2, "order": 2},
    "fbcache": {"threshold": 10.0},
    "cg-taylor": {"gate": 10.0},
    "sortblock": {"fraction": 0.4, "interval": 3, "warmup": 1},
    "ertacache": {"threshold": 1.5, "warmup": 2},
    "ertacache+adjusted": {"threshold": 1.5, "warmup": 2},  # with the timestep adjustment fitted
    "profiling-dit": {"share": 0.5, "warmup": 1, "interval": 2},
}
CALIBRATIONS = {}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cached(sample, K):
    """``with cached(case, model, method, params) as handle``: ``method`` enabled on ``model`` for the block,
    disabled after whatever happens."""

    def calibration_of(case, model):
        if case.name not in CALIBRATIONS:
            CALIBRATIONS[case.name] = bac.calibrate(model, lambda seed: sample(case, model, seed), [1, 2],
                                                    attention=True)
        return CALIBRATIONS[case.name]

    @contextlib.contextmanager
    def cached(case, model, method, params):
        name = method.split("+")[0]
        calibration = calibration_of(case, model) if bac.methods.needs_calibration(name) else None
        if method.endswith("+adjusted"):  # ERTACache's timestep adjustment, fitted on an input of its own
            built = bac.build_method(name, calibration, **params)
            adjusted = bac.diffusers.adjust_timesteps(model, built, [3], sample_fn=lambda seed: sample(case, model, seed))
            scales = adjusted.schedule.params["step_scales"]
            assert any(s != 1.0 for s in scales) == (built.schedule.skipped_count() > 0)
            handle = bac.diffusers.enable_cache(model, adjusted, num_inference_steps=K)
        else:
            handle = bac.diffusers.enable_cache(model, name, calibration=calibration, num_inference_steps=K, **params)
        try:
            yield handle
        finally:
            bac.diffusers.disable_cache(model)

    return cached


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("method", EXHAUSTIVE_METHODS)
def test_exhaustive_settings_are_bit_identical_and_disable_restores(name, method, cases, model_of, sample,
                                                                    all_equal, K, cached, exhaustive_settings):
    assert EXHAUSTIVE_METHODS == tuple(sorted(exhaustive_settings(K)))
    case = cases[name]
    model = model_of(case)
    reference = sample(case, model)
    with cached(case, model, method, exhaustive_settings(K)[method]) as handle:
        outputs = sample(case, model)
        assert handle.stats()["skipped"] == 0
    assert all_equal(outputs, reference)
    assert not hasattr(model, "_bac_handle") and "cache_context" not in model.__dict__


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("method", sorted(SKIPPING))
def test_skipped_evaluations_match_what_the_method_reports(name, method, cases, model_of, sample, all_equal, K,
                                                          cached):
    case = cases[name]
    model = model_of(case)
    reference = sample(case, model)
    counts, hooks = count_branches(model)
    try:
        with cached(case, model, method, SKIPPING[method]) as handle:
            before = dict(counts)  # fitting a timestep adjustment ran the model too
            outputs = sample(case, model)
            stats = handle.stats()
    finally:
        for h in hooks:
            h.remove()
    assert {block: b["computed"] for block, b in stats["per_block"].items()} == {
        block: counts[block] - before[block] for block in counts}
    assert stats["skipped"] > 0 and stats["computed"] + stats["skipped"] == K * len(counts)
    assert all(torch.isfinite(out).all() for out in outputs) and not all_equal(outputs, reference)
    assert all_equal(sample(case, model), reference)  # disable_cache restored the plain model


# --- flow-matching sampling loops as diffusers' FLUX and Wan pipelines run them ----------------


@torch.no_grad()
def flow_loop(case, model, K, guidance: bool):
    """FlowMatchEuler sampling (K steps); with guidance, two denoiser calls per step in 'cond'/'uncond' contexts."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(K)
    bac.new_trajectory(model)
    x, cond = case.inputs(0)
    negative = {**cond, "encoder_hidden_states": -cond["encoder_hidden_states"]}
    for t in scheduler.timesteps:
        timestep = (t / 1000 if case.name == "flux" else t).expand(x.shape[0])
        with model.cache_context("cond"):
            noise = model(x, timestep=timestep, **cond_kwargs(case, cond)).sample
        if guidance:
            with model.cache_context("uncond"):
                uncond = model(x, timestep=timestep, **cond_kwargs(case, negative)).sample
            noise = uncond + 4.0 * (noise - uncond)
        x = scheduler.step(noise, t, x).prev_sample
    return x


def cond_kwargs(case, cond):
    return cond if case.name == "flux" else {"encoder_hidden_states": cond["encoder_hidden_states"]}


@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.parametrize("method", sorted(SKIPPING))
def test_guidance_branches_have_their_own_cache_state(name, method, cases, model_of, K, cached,
                                                        exhaustive_settings):
    case = cases[name]
    model = model_of(case)
    reference = flow_loop(case, model, K, guidance=True)
    with cached(case, model, method, exhaustive_settings(K)[method.split("+")[0]]) as handle:
        exhaustive = flow_loop(case, model, K, guidance=True)
        assert handle.steps_run() == {"cond": K, "uncond": K}
    assert torch.equal(exhaustive, reference)
    # Skipping for real, each branch on its own step counter (one shared counter would overflow)
    with cached(case, model, method, SKIPPING[method]) as handle:
        guided = flow_loop(case, model, K, guidance=True)
        assert handle.steps_run() == {"cond": K, "uncond": K}
        stats = handle.stats()
    assert stats["skipped"] > 0 and stats["denoiser_calls"] == 2 * K
    assert torch.isfinite(guided).all() and not torch.equal(guided, reference)


def test_a_missing_context_is_an_error_not_shared_state(cases, model_of, K):
    case = cases["wan"]
    model = model_of(case)
    bac.diffusers.enable_cache(model, "fbcache", threshold=0.1, num_inference_steps=K)
    try:
        x, cond = case.inputs(0)
        bac.new_trajectory(model)
        with pytest.raises(bac.StepOverflowError, match="context"), torch.no_grad():
            for k in range(K):  # two calls per step, no cache_context: the step count runs out
                for _ in range(2):
                    model(x, torch.full((2,), 999 - 100 * k), cond["encoder_hidden_states"])
    finally:
        bac.diffusers.disable_cache(model)


# --- the DiT pipeline, end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_pipe(tiny_dit_pipeline):
    return tiny_dit_pipeline()


def run_pipe(pipe, steps):
    return pipe(class_labels=[1, 7], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.mark.parametrize("method", sorted(SKIPPING))
def test_dit_pipeline_runs_every_method_and_disable_restores(dit_pipe, method, tmp_path, K):
    pipe = dit_pipe
    reference = run_pipe(pipe, K)
    name = method.split("+")[0]
    calibration = None
    if bac.methods.needs_calibration(name):
        calibration = bac.diffusers.calibrate(pipe, [dict(class_labels=[2, 5], num_inference_steps=K, output_type="np")],
                                              attention=True)
        assert calibration.num_steps == K and calibration.samples == 4  # guidance batched: 2 labels x 2
        calibration = calibration.save(tmp_path / "calibration.safetensors")  # enable_cache also takes the file
    handle = bac.diffusers.enable_cache(pipe, name, calibration=calibration, num_inference_steps=K, **SKIPPING[method])
    try:
        assert type(pipe).__name__ == "DiTPipeline" and isinstance(pipe, DiTPipeline)
        first, second = run_pipe(pipe, K), run_pipe(pipe, K)
        stats = handle.stats()
    finally:
        bac.diffusers.disable_cache(pipe)
    assert type(pipe) is DiTPipeline
    assert stats["sampling_calls"] == 2 and stats["skipped"] > 0
    assert (first == second).all()  # each call is a new trajectory
    assert first.shape == reference.shape and not (first == reference).all()
    assert (run_pipe(pipe, K) == reference).all()


def test_dit_pipeline_every_step_plan_file_is_bit_identical(dit_pipe, tmp_path, K):
    pipe = dit_pipe
    reference = run_pipe(pipe, K)
    plan = bac.make_plan(pipe.transformer, "every-step", num_steps=K).save(tmp_path / "plan.json")
    bac.diffusers.enable_cache(pipe, plan)
    try:
        assert (run_pipe(pipe, K) == reference).all()
        with pytest.raises(PlanMismatchError, match=f"made for {K} denoising steps, not num_inference_steps={K + 2}; "
                                                    "a plan is made for one step count"):
            run_pipe(pipe, steps=K + 2)
    finally:
        bac.diffusers.disable_cache(pipe)


def test_enable_cache_errors(dit_pipe, K):
    pipe = dit_pipe
    with pytest.raises(ValueError, match="calibration"):
        bac.diffusers.enable_cache(pipe, "bac", M=3)
    with pytest.raises(ValueError, match="unknown caching method"):
        bac.diffusers.enable_cache(pipe, "nope")
    bac.diffusers.enable_cache(pipe, "fbcache")  # the pipeline's default step count
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            bac.diffusers.enable_cache(pipe, "fbcache")
    finally:
        bac.diffusers.disable_cache(pipe)
    plan = bac.make_plan(pipe.transformer, "every-step", num_steps=5)
    with pytest.raises(PlanMismatchError, match="made for 5 steps"):
        bac.diffusers.enable_cache(pipe, plan, num_inference_steps=K)
    assert type(pipe) is DiTPipeline and not hasattr(pipe.transformer, "_bac_handle")


# --- bac's fbcache against diffusers' own FirstBlockCache -----------------------------------------


def test_fbcache_makes_the_same_decisions_as_diffusers_first_block_cache(cases):
    torch.manual_seed(0)
    model = CachingDiT(num_attention_heads=2, attention_head_dim=8, in_channels=4, sample_size=8, patch_size=2,
                       num_layers=4, num_embeds_ada_norm=1000, norm_num_groups=1).eval()
    steps = 10
    blocks_per_layer, layers = 2, 4

    @torch.no_grad()
    def loop():
        bac.new_trajectory(model)
        x, cond = cases["dit"].inputs(0)
        for k in range(steps):
            with model.cache_context("cond"):
                x = x - 0.1 * model(x, timestep=torch.full((2,), 999 - 60 * k), class_labels=cond["class_labels"]).sample
        model._reset_stateful_cache()
        return x

    calls = []
    hook = model.transformer_blocks[-1].ff.register_forward_hook(lambda *a: calls.append(1))
    reference = loop()
    skipped_steps = []
    try:
        for threshold in (0.05, 0.15, 0.3):
            calls.clear()
            model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
            theirs = loop()
            model.disable_cache()
            their_full_steps = len(calls)
            handle = bac.diffusers.enable_cache(model, "fbcache", threshold=threshold, num_inference_steps=steps)
            ours = loop()
            stats = handle.stats()
            bac.diffusers.disable_cache(model)
            assert stats["skipped"] == (steps - their_full_steps) * blocks_per_layer * (layers - 1), threshold
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), threshold
            skipped_steps.append(steps - their_full_steps)
    finally:
        hook.remove()
    assert skipped_steps[0] < skipped_steps[-1] < steps - 1  # the thresholds span both kinds of step
    assert torch.equal(loop(), reference)


def test_two_transformer_pipelines_and_bare_calibration_are_clear_errors(cases, model_of, K):
    class TwoStage:  # Wan 2.2's pipeline shape: a high-noise and a low-noise transformer
        transformer = model_of(cases["wan"])
        transformer_2 = model_of(cases["wan"])

    with pytest.raises(ValueError, match="two transformers"):
        bac.diffusers.enable_cache(TwoStage(), "fbcache", num_inference_steps=K)
    with pytest.raises(TypeError, match="sample_fn"):
        bac.diffusers.calibrate(model_of(cases["wan"]), [0])
    with pytest.raises(TypeError, match="neither a transformer nor a pipeline"):
        bac.diffusers.enable_cache(object(), "fbcache")
    with pytest.raises(ValueError, match="num_inference_steps"):
        bac.diffusers.enable_cache(model_of(cases["wan"]), "fbcache")  # a bare transformer has no default
    assert not hasattr(model_of(cases["wan"]), "_bac_handle")


# --- exact gates under Taylor forecasts ---------------------------------------------------------------


@pytest.mark.parametrize("standin", ["taylor-1", "reuse"])
def test_taylor_forecasts_the_ungated_output_and_applies_the_current_gate(cases, model_of, sample, K, standin):
    """A skipped DiT self-attention hands on gate(t) * (linear extrapolation of attn1's outputs) under a Taylor
    stand-in, and under reuse exactly the gated value it handed on last (what FORA, BAC and FirstBlockCache reuse)."""
    case, model = cases["dit"], model_of(cases["dit"])
    layer = model.transformer_blocks[1]
    computed_steps = [0, 2, 4]
    attn, gates, handed = {}, {}, {}
    step = [-1]

    def on_model(module, args, kwargs):
        step[0] += 1
        emb = layer.norm1.emb(kwargs["timestep"], kwargs["class_labels"], hidden_dtype=args[0].dtype)
        gates[step[0]] = layer.norm1.linear(layer.norm1.silu(emb)).chunk(6, dim=1)[2].unsqueeze(1)

    index = [b.name for b in bac.describe(model).blocks].index("transformer_blocks.1.sa")
    hooks = [model.register_forward_pre_hook(on_model, with_kwargs=True),
             layer.attn1.register_forward_hook(lambda m, a, out: attn.__setitem__(step[0], out))]
    plan = bac.Plan.from_steps(bac.describe(model), {b.name: computed_steps for b in bac.describe(model).blocks}, K,
                               "test", {})
    try:
        with bac.accelerate(model, plan, standin=standin, num_steps=K,
                            tap=lambda i, s, out, computed: handed.__setitem__(s, out) if i == index else None):
            sample(case, model)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(attn) == computed_steps
    for t in (1, 3, 5):
        u = max(s for s in computed_steps if s < t)
        if standin == "reuse":
            expected = handed[u]
        elif u == 0:
            expected = gates[t] * attn[0]  # one computed value: the forecast is that value, under today's gate
        else:
            p = max(s for s in computed_steps if s < u)
            expected = gates[t] * (attn[u] + (attn[u] - attn[p]) / (u - p) * (t - u))
        assert torch.allclose(handed[t], expected, rtol=1e-5, atol=1e-6), (standin, t)
    assert not torch.allclose(gates[1], gates[0])  # the gate really moves with the timestep
