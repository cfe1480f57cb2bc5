"""FusedSampler is diffusers' scheduler.step, bit for bit, without calling it; unsupported configs are refused."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)

import bac.sampling
from bac.errors import ConfigError
from bac.sampling import FusedSampler

SHAPE = (16, 4)  # horizon x action dim, as a policy samples
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
POLICY = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)  # the policy's DDPM


def make(cls, steps=None, set_kwargs=None, from_ddpm=None, **config):
    """A factory of fresh schedulers ready to sample (a fresh one per reference trajectory)."""

    def factory():
        scheduler = cls.from_config(DDPMScheduler(**from_ddpm).config, **config) if from_ddpm else cls(**config)
        scheduler.set_timesteps(steps, **(set_kwargs or {}))
        return scheduler

    return factory


# (id, factory): every supported scheduler and config variant; the policy-shaped ones first.
CASES = {
    # DDPM
    "ddpm-policy": lambda k: make(DDPMScheduler, k, **POLICY),
    "ddpm-default": lambda k: make(DDPMScheduler, k),
    "ddpm-noclip": lambda k: make(DDPMScheduler, k, clip_sample=False),
    "ddpm-clip-range": lambda k: make(DDPMScheduler, k, clip_sample_range=0.5),
    "ddpm-sample": lambda k: make(DDPMScheduler, k, prediction_type="sample"),
    "ddpm-sample-noclip": lambda k: make(DDPMScheduler, k, prediction_type="sample", clip_sample=False),
    "ddpm-v": lambda k: make(DDPMScheduler, k, prediction_type="v_prediction", beta_schedule="scaled_linear"),
    "ddpm-v-zero-snr": lambda k: make(DDPMScheduler, k, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing"),
    "ddpm-small-log": lambda k: make(DDPMScheduler, k, variance_type="fixed_small_log", **POLICY),
    "ddpm-large": lambda k: make(DDPMScheduler, k, variance_type="fixed_large", clip_sample=False),
    "ddpm-linspace": lambda k: make(DDPMScheduler, k, timestep_spacing="linspace", beta_schedule="sigmoid"),
    "ddpm-trailing": lambda k: make(DDPMScheduler, k, timestep_spacing="trailing", steps_offset=1),
    # DDIM (eta = 0)
    "ddim-policy": lambda k: make(DDIMScheduler, k, from_ddpm=POLICY),
    "ddim-default": lambda k: make(DDIMScheduler, k),
    "ddim-noclip": lambda k: make(DDIMScheduler, k, clip_sample=False, beta_schedule="scaled_linear"),
    "ddim-alpha-not-one": lambda k: make(DDIMScheduler, k, set_alpha_to_one=False, steps_offset=1),
    "ddim-sample": lambda k: make(DDIMScheduler, k, prediction_type="sample", **POLICY),
    "ddim-sample-noclip": lambda k: make(DDIMScheduler, k, prediction_type="sample", clip_sample=False),
    "ddim-v": lambda k: make(DDIMScheduler, k, prediction_type="v_prediction", timestep_spacing="trailing"),
    "ddim-linspace": lambda k: make(DDIMScheduler, k, timestep_spacing="linspace", clip_sample_range=2.0),
    # DPM-Solver++ multistep
    "dpm-policy": lambda k: make(DPMSolverMultistepScheduler, k, from_ddpm=POLICY),
    "dpm-default": lambda k: make(DPMSolverMultistepScheduler, k),
    "dpm-order1": lambda k: make(DPMSolverMultistepScheduler, k, solver_order=1),
    "dpm-heun": lambda k: make(DPMSolverMultistepScheduler, k, from_ddpm=POLICY, solver_type="heun"),
    "dpm-no-lower-final": lambda k: make(DPMSolverMultistepScheduler, k, lower_order_final=False),
    "dpm-sigma-min": lambda k: make(DPMSolverMultistepScheduler, k, final_sigmas_type="sigma_min",
                                    lower_order_final=False),
    "dpm-sigma-min-euler": lambda k: make(DPMSolverMultistepScheduler, k, final_sigmas_type="sigma_min",
                                          euler_at_final=True),
    "dpm-sample": lambda k: make(DPMSolverMultistepScheduler, k, prediction_type="sample"),
    "dpm-v": lambda k: make(DPMSolverMultistepScheduler, k, prediction_type="v_prediction",
                            beta_schedule="scaled_linear"),
    "dpm-karras": lambda k: make(DPMSolverMultistepScheduler, k, use_karras_sigmas=True),
    "dpm-lu": lambda k: make(DPMSolverMultistepScheduler, k, use_lu_lambdas=True),
    "dpm-clipped-lambda": lambda k: make(DPMSolverMultistepScheduler, k, beta_schedule="squaredcos_cap_v2",
                                         lambda_min_clipped=-5.1, timestep_spacing="trailing"),
    # FlowMatchEuler
    "flow-default": lambda k: make(FlowMatchEulerDiscreteScheduler, k),
    "flow-shift3": lambda k: make(FlowMatchEulerDiscreteScheduler, k, shift=3.0),
    "flow-dynamic": lambda k: make(FlowMatchEulerDiscreteScheduler, k, set_kwargs={"mu": 0.8},
                                   use_dynamic_shifting=True),
    "flow-stochastic": lambda k: make(FlowMatchEulerDiscreteScheduler, k, shift=3.0, stochastic_sampling=True),
    "flow-karras": lambda k: make(FlowMatchEulerDiscreteScheduler, k, use_karras_sigmas=True, shift=3.0),
    "flow-invert-terminal": lambda k: make(FlowMatchEulerDiscreteScheduler, k, invert_sigmas=True,
                                           shift_terminal=0.1),
}
# Policy-shaped and default configs at all lengths (100 = every training step of the policy's DDPM);
# the variants at a few lengths, including both sides of DPM-Solver's lower_order_final threshold (15).
MAIN = {"ddpm-policy", "ddpm-default", "ddim-policy", "ddim-default", "dpm-policy", "dpm-default", "flow-default",
        "flow-shift3"}
PARAMS = [(name, k) for name in CASES for k in ((1, 2, 3, 10, 100) if name in MAIN else (1, 3, 10, 20))
          # diffusers itself fails there: shift_terminal with 1 step makes a NaN timestep (its step raises
          # IndexError; FusedSampler raises ConfigError, see UNSUPPORTED).
          if not (name == "flow-invert-terminal" and k == 1)]


def fake_model(x, t):
    """A deterministic stand-in denoiser of (x, t)."""
    return torch.tanh(0.7 * x + t.float() / 700.0) * 1.3 - 0.25 * x


def random_outputs(num_steps, batch, seed, dtype=torch.float32, device="cpu"):
    """A stand-in denoiser whose outputs at the steps are fixed random tensors (ignores x and t)."""
    g = torch.Generator().manual_seed(seed)
    outputs = [(2.0 * torch.randn((batch, *SHAPE), generator=g)).to(device=device, dtype=dtype)
               for _ in range(num_steps)]
    return lambda i, x, t: outputs[i]


BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a, b):
    """Bit for bit: torch.equal, and also -0.0 vs 0.0 and NaN (diffusers' DPM-Solver makes NaN from repeated
    timesteps, e.g. 100 steps of a 100-step schedule)."""
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype])))


def initial(batch, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *SHAPE), generator=g).to(device=device, dtype=dtype)


def reference(scheduler, x, model, generator):
    """diffusers' own loop; the samples after each step."""
    out = []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(i, x, t), t, x, generator=generator).prev_sample
        out.append(x)
    return out


def fused_run(fused, x, model, generator):
    out = []
    trajectory = fused.start()
    for i, t in enumerate(fused.timesteps):
        model_output = model(i, x, t)
        kept = model_output.clone(), x.clone()
        x_next = trajectory.step(i, model_output, x, generator=generator)
        assert same_bits(model_output, kept[0]) and same_bits(x, kept[1]), "step modified its inputs"
        x = x_next
        out.append(x)
    return out


def assert_same(ref, got):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert same_bits(a, b), f"step {i}: max |diff| {(a.double() - b.double()).abs().max().item()}"


def gen(device, seed):
    return torch.Generator(device).manual_seed(seed)


def check(factory, batch, model, *, seed=0, dtype=torch.float32, device="cpu", trajectories=2):
    """Reference vs fused trajectories, the fused sampler reused (a new start()) across several of them."""
    fused = FusedSampler(factory())
    x = initial(batch, seed, dtype, device)
    for trial in range(trajectories):
        ref = reference(factory(), x, model, gen(device, 100 + trial))
        got = fused_run(fused, x, model, gen(device, 100 + trial))
        assert_same(ref, got)
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name,k", PARAMS)
def test_bit_identical_with_random_outputs(name, k, batch, device):
    check(CASES[name](k), batch, random_outputs(k, batch, seed=k + batch, device=device), seed=k, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name,k", PARAMS)
def test_bit_identical_with_a_model_of_x_and_t(name, k, batch, device):
    check(CASES[name](k), batch, lambda i, x, t: fake_model(x, t), seed=7 * k + batch, device=device)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
                         ids=["f32-sample-bf16-output", "f16", "f64", "bf16-sample-f32-output"])
@pytest.mark.parametrize("name", ["ddpm-policy", "ddpm-sample", "ddpm-v", "ddim-policy", "ddim-sample", "ddim-v",
                                  "dpm-policy", "dpm-sample", "dpm-v", "flow-shift3", "flow-stochastic"])
def test_bit_identical_with_other_dtypes(name, dtypes):
    """Mixed precision (an autocast model's bf16 output on a float32 sample) promotes as diffusers does."""
    sample_dtype, output_dtype = dtypes
    k = 10
    outputs = random_outputs(k, 3, seed=5, dtype=output_dtype)
    check(CASES[name](k), 3, outputs, dtype=sample_dtype)


def test_start_makes_the_next_trajectory_independent_of_an_abandoned_one():
    factory = CASES["dpm-policy"](10)
    fused = FusedSampler(factory())
    x = initial(1, 3)
    model = lambda i, x, t: fake_model(x, t)  # noqa: E731
    abandoned = fused.start()
    y = x + 0.5
    for i in range(4):  # half a trajectory from another start, then abandoned
        y = abandoned.step(i, model(i, y, fused.timesteps[i]), y)
    first = fused_run(fused, x, model, None)
    second = fused_run(fused, x, model, None)
    assert_same(reference(factory(), x, model, None), first)
    assert_same(first, second)


def test_dpm_steps_out_of_order_are_refused():
    fused = FusedSampler(CASES["dpm-default"](10)())
    x = initial(1, 0)
    trajectory = fused.start()
    trajectory.step(0, x, x)
    with pytest.raises(RuntimeError, match="in order"):
        trajectory.step(2, x, x)


def test_interleaved_trajectories_of_one_sampler_are_independent():
    """Two calls sharing a DPM-Solver sampler, step by step in turn, each match a trajectory run alone."""
    factory = CASES["dpm-policy"](10)
    fused = FusedSampler(factory())
    model = lambda i, x, t: fake_model(x, t)  # noqa: E731
    starts = initial(1, 3), initial(1, 4)
    alone = [fused_run(fused, x, model, None) for x in starts]
    trajectories, samples = [fused.start(), fused.start()], list(starts)
    for i, t in enumerate(fused.timesteps):
        for k in range(2):
            samples[k] = trajectories[k].step(i, model(i, samples[k], t), samples[k])
    for k in range(2):
        assert same_bits(samples[k], alone[k][-1])


def test_start_returns_its_own_trajectory_when_another_starts_in_between():
    """Another start() while one is under way (another thread, switched to when the trajectory it replaces is
    freed) must not hand the first caller the second's trajectory: the race behind "step(1) follows step(1)"."""
    import weakref

    fused = FusedSampler(CASES["dpm-policy"](10)())
    started_in_between = []
    previous = fused.start()
    previous.prev_x0 = torch.zeros(1)  # as after a step: freed with the trajectory
    weakref.finalize(previous.prev_x0, lambda: started_in_between.append(fused.start()))
    del previous  # kept alive only by the sampler's record of the last start (for the deprecated step)
    mine = fused.start()  # replacing that record frees it and its tensor, whose finaliser starts another
    assert started_in_between and mine is not started_in_between[0]
    assert mine.last == -1 and mine.prev_x0 is None


def test_the_deprecated_sampler_step_runs_the_last_started_trajectory():
    factory = CASES["dpm-policy"](10)
    fused = FusedSampler(factory())
    x = initial(1, 3)
    model = lambda i, x, t: fake_model(x, t)  # noqa: E731
    fused.start()
    y = x
    with pytest.warns(DeprecationWarning, match=r"trajectory = sampler.start\(\); trajectory.step"):
        for i, t in enumerate(fused.timesteps):
            y = fused.step(i, model(i, y, t), y)
    assert same_bits(y, fused_run(fused, x, model, None)[-1])


def test_global_generator_and_generator_lists_draw_the_same_noise():
    factory = CASES["ddpm-policy"](10)
    fused = FusedSampler(factory())
    x = initial(3, 1)
    model = random_outputs(10, 3, seed=2)
    torch.manual_seed(11)
    ref = reference(factory(), x, model, None)
    torch.manual_seed(11)
    assert_same(ref, fused_run(fused, x, model, None))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    assert_same(reference(factory(), x, model, gens()), fused_run(fused, x, model, gens()))


STATE_METHODS = ("step", "previous_timestep", "_get_variance", "index_for_timestep", "_init_step_index",
                 "convert_model_output", "dpm_solver_first_order_update", "multistep_dpm_solver_second_order_update",
                 "_sigma_to_alpha_sigma_t", "_threshold_sample")


@pytest.mark.parametrize("name", ["ddpm-policy", "ddim-policy", "dpm-policy", "flow-stochastic"])
def test_fused_step_calls_no_scheduler_code_and_no_item(name, monkeypatch):
    """After construction the scheduler is not consulted: not its step, helpers or arrays, nor Tensor.item."""
    factory = CASES[name](10)
    scheduler = factory()
    fused = FusedSampler(scheduler)
    assert fused.timesteps is scheduler.timesteps and fused.num_steps == 10

    def refuse(*args, **kwargs):
        raise AssertionError("the fused step called the scheduler")

    for method in STATE_METHODS:
        if hasattr(scheduler, method):
            monkeypatch.setattr(scheduler, method, refuse)
    timesteps = scheduler.timesteps
    scheduler.set_timesteps = refuse
    for array in ("alphas_cumprod", "sigmas", "one", "final_alpha_cumprod", "timesteps", "model_outputs"):
        if hasattr(scheduler, array):
            monkeypatch.setattr(scheduler, array, None)
    x = initial(1, 4)
    model = random_outputs(10, 1, seed=9)
    ref = reference(factory(), x, model, gen("cpu", 1))
    fused.timesteps = timesteps
    for banned in ("item", "nonzero", "tolist"):
        monkeypatch.setattr(torch.Tensor, banned, refuse)
    got = fused_run(fused, x, model, gen("cpu", 1))
    monkeypatch.undo()
    assert_same(ref, got)


def test_the_schedule_is_a_snapshot():
    """set_timesteps(other K) on the scheduler afterwards leaves a built sampler as it was."""
    factory = CASES["ddpm-policy"](10)
    scheduler = factory()
    fused = FusedSampler(scheduler)
    scheduler.set_timesteps(3)
    x = initial(1, 5)
    model = random_outputs(10, 1, seed=6)
    assert_same(reference(factory(), x, model, gen("cpu", 2)), fused_run(fused, x, model, gen("cpu", 2)))


def _set(scheduler, *args, **kwargs):
    scheduler.set_timesteps(*args, **kwargs)
    return scheduler


class SubclassedDDPM(DDPMScheduler):
    pass


UNSUPPORTED = {
    "ddpm-thresholding": (lambda: _set(DDPMScheduler(thresholding=True), 10), r"DDPMScheduler thresholding=True"),
    "ddpm-learned-range": (lambda: _set(DDPMScheduler(variance_type="learned_range"), 10),
                           r"DDPMScheduler variance_type='learned_range'"),
    "ddpm-fixed-large-log": (lambda: _set(DDPMScheduler(variance_type="fixed_large_log"), 10),
                             r"DDPMScheduler variance_type='fixed_large_log'"),
    "ddpm-learned": (lambda: _set(DDPMScheduler(variance_type="learned"), 10), r"variance_type='learned'"),
    "ddim-thresholding": (lambda: _set(DDIMScheduler(thresholding=True), 10), r"DDIMScheduler thresholding=True"),
    "ddim-no-timesteps": (lambda: DDIMScheduler(), r"DDIMScheduler.num_inference_steps is None"),
    "dpm-sde": (lambda: _set(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), 10),
                r"DPMSolverMultistepScheduler algorithm_type='sde-dpmsolver\+\+'"),
    "dpm-noise-prediction": (lambda: _set(DPMSolverMultistepScheduler(algorithm_type="dpmsolver",
                                                                      final_sigmas_type="sigma_min"), 10),
                             r"algorithm_type='dpmsolver'"),
    "dpm-order3": (lambda: _set(DPMSolverMultistepScheduler(solver_order=3), 10),
                   r"DPMSolverMultistepScheduler solver_order=3"),
    "dpm-thresholding": (lambda: _set(DPMSolverMultistepScheduler(thresholding=True), 10), r"thresholding=True"),
    "dpm-flow-sigmas": (lambda: _set(DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                                 prediction_type="flow_prediction"), 10),
                        r"DPMSolverMultistepScheduler (use_flow_sigmas=True|prediction_type='flow_prediction')"),
    "dpm-flow-prediction": (lambda: _set(DPMSolverMultistepScheduler(prediction_type="flow_prediction"), 10),
                            r"prediction_type='flow_prediction'"),
    "dpm-learned-variance": (lambda: _set(DPMSolverMultistepScheduler(variance_type="learned_range"), 10),
                             r"variance_type='learned_range'"),
    "dpm-begin-index": (lambda: _begin(DPMSolverMultistepScheduler(), 2), r"start its trajectory at step index 2"),
    "dpm-no-timesteps": (lambda: DPMSolverMultistepScheduler(), r"num_inference_steps is None"),
    "flow-no-timesteps": (lambda: FlowMatchEulerDiscreteScheduler(), r"num_inference_steps is None"),
    "flow-nan-timestep": (lambda: _set(FlowMatchEulerDiscreteScheduler(shift_terminal=0.1), 1),
                          r"first timestep tensor\(nan\) is not found"),
    "flow-begin-index": (lambda: _begin(FlowMatchEulerDiscreteScheduler(), 1), r"at step index 1"),
    "other-scheduler": (lambda: _set(EulerDiscreteScheduler(), 10), r"EulerDiscreteScheduler is not supported"),
    "subclass": (lambda: _set(SubclassedDDPM(), 10), r"SubclassedDDPM is not supported"),
}


def _begin(scheduler, index):
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(index)
    return scheduler


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_configs_raise_config_error(name):
    build, message = UNSUPPORTED[name]
    scheduler = build()
    with pytest.raises(ConfigError, match=message):
        FusedSampler(scheduler)


def test_an_init_field_it_does_not_know_is_refused(monkeypatch):
    """A newer diffusers' new field is refused, not assumed harmless."""
    rules = dict(bac.sampling._SUPPORTED_FIELDS[DDPMScheduler])
    del rules["rescale_betas_zero_snr"]
    monkeypatch.setitem(bac.sampling._SUPPORTED_FIELDS, DDPMScheduler, rules)
    with pytest.raises(ConfigError, match=r"DDPMScheduler config field rescale_betas_zero_snr=False is unknown"):
        FusedSampler(_set(DDPMScheduler(), 10))


def test_config_keys_of_another_scheduler_are_ignored_as_diffusers_ignores_them():
    """DPM-Solver built from the policy's DDPM config carries clip_sample, which DPM-Solver does not use."""
    scheduler = CASES["dpm-policy"](10)()
    assert scheduler.config.get("clip_sample") is True
    assert FusedSampler(scheduler).num_steps == 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("generators", ["global", "one", "list", "one-on-cpu"])
def test_noise_is_randn_tensors_draw(device, generators):
    """The direct torch.randn call is taken only where it is the draw diffusers' randn_tensor makes."""
    from diffusers.utils.torch_utils import randn_tensor

    def make_generator():
        torch.manual_seed(3)
        if generators == "global":
            return None
        if generators == "list":
            return [torch.Generator(device).manual_seed(s) for s in (4, 5, 6)]
        return torch.Generator("cpu" if generators == "one-on-cpu" else device).manual_seed(4)

    for dtype in (torch.float32, torch.bfloat16):
        want = randn_tensor((3, *SHAPE), generator=make_generator(), device=torch.device(device), dtype=dtype)
        got = bac.sampling._noise((3, *SHAPE), make_generator(), torch.device(device), dtype)
        assert same_bits(want, got)
