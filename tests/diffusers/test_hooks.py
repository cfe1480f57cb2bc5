"""bac.diffusers as one named hook in diffusers' HookRegistry, on the real tiny DiT, FLUX and Wan pipelines.

Another hook composes with bac's in either registration and removal order; a diffusers cache on the same
model is refused in either order; each pipeline call is one trajectory (the pipeline's scheduler restarting,
and for CacheMixin models diffusers' end-of-call reset), with no class swap and nothing replaced on the
pipeline or transformer.
"""
import pytest
import torch
from diffusers import FirstBlockCacheConfig
from diffusers.hooks import HookRegistry, ModelHook, apply_first_block_cache
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.models.cache_utils import CacheMixin

import bac
import bac.diffusers
from bac.adapters import forward_replaced
from benchmarks.tiny_pipelines import call_kwargs, tiny_flux_pipeline, tiny_wan_pipeline

K = 6
KINDS = ("dit", "flux", "wan")
CACHING = {"interval": 2}  # uniform: skips every other step of every block but the first

pytestmark = pytest.mark.usefixtures("one_thread")


class ScaleInput(ModelHook):
    """A non-cache hook: scales the transformer's hidden states before its forward, and counts its calls."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor, self.calls = factor, 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"] * self.factor}
        else:
            args = (args[0] * self.factor, *args[1:])
        return args, kwargs


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(kind, tiny_dit_pipeline):
    pipe = {"dit": tiny_dit_pipeline, "flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}[kind]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, kind, steps=K):
    """One guided call's output (DiT: CFG batched, pixels; FLUX and Wan: two contexts per step, latents)."""
    if kind == "dit":
        return pipe(class_labels=[1, 7], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    return pipe(**call_kwargs(kind, num_inference_steps=steps, per_prompt=2))[0]


def enable(pipe, method="uniform", params=CACHING):
    return bac.diffusers.enable_cache(pipe, method, num_inference_steps=K, **params)


def registry(pipe):
    return HookRegistry.check_if_exists_or_initialize(pipe.transformer)


@pytest.fixture(scope="module")
def references(pipe, kind):
    """Outputs with no hook, with the other hook alone, and with bac alone."""
    plain = run(pipe, kind)
    registry(pipe).register_hook(ScaleInput(0.9), "scale")
    hooked = run(pipe, kind)
    registry(pipe).remove_hook("scale")
    enable(pipe)
    try:
        cached = run(pipe, kind)
    finally:
        bac.diffusers.disable_cache(pipe)
    assert not torch.equal(hooked, plain) and not torch.equal(cached, plain)
    return plain, hooked, cached


def test_bac_is_one_named_hook_and_replaces_nothing(pipe, kind, references):
    plain, _, cached = references
    cls, pipe_state, model_state = type(pipe), dict(vars(pipe)), set(vars(pipe.transformer))
    handle = enable(pipe)
    assert type(pipe) is cls and vars(pipe) == pipe_state  # no class swap, nothing set on the pipeline
    assert "bac" in registry(pipe).hooks and bac.get_handle(pipe.transformer) is handle
    assert "cache_context" not in vars(pipe.transformer) and "__call__" not in vars(pipe)
    # the registry hook drives the steps: no torch hook of bac's on the transformer
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    if isinstance(pipe.transformer, CacheMixin):
        assert pipe.transformer.is_cache_enabled  # as under diffusers' own caches
    first, second = run(pipe, kind), run(pipe, kind)
    assert torch.equal(first, cached) and torch.equal(second, cached)
    assert handle.stats()["sampling_calls"] == 2 and handle.stats()["skipped"] > 0
    registry(pipe).remove_hook("bac")  # removed through the registry, not only by disable_cache: undoes everything
    assert bac.get_handle(pipe.transformer) is None and "bac" not in registry(pipe).hooks
    assert not forward_replaced(pipe.transformer) and set(vars(pipe.transformer)) <= model_state | {"_diffusers_hook"}
    assert not getattr(pipe.transformer, "is_cache_enabled", False)
    assert torch.equal(run(pipe, kind), plain)
    bac.diffusers.disable_cache(pipe)  # nothing left to undo


@pytest.mark.parametrize("bac_first", [True, False], ids=["bac-registered-first", "other-registered-first"])
@pytest.mark.parametrize("remove_bac_first", [True, False], ids=["bac-removed-first", "other-removed-first"])
def test_another_hook_composes_in_either_order(pipe, kind, references, bac_first, remove_bac_first):
    plain, hooked, cached = references
    other = ScaleInput(0.9)
    if not bac_first:
        registry(pipe).register_hook(other, "scale")
    handle = enable(pipe)
    if bac_first:
        registry(pipe).register_hook(other, "scale")
    assert list(registry(pipe).hooks) == (["bac", "scale"] if bac_first else ["scale", "bac"])
    try:
        both = run(pipe, kind)
        calls = 2 * K if kind != "dit" else K  # FLUX and Wan: two denoiser calls per step
        assert other.calls == calls and handle.stats()["denoiser_calls"] == calls and handle.stats()["skipped"] > 0
        assert not torch.equal(both, hooked) and not torch.equal(both, cached)  # both act
        assert torch.equal(run(pipe, kind), both)
        if remove_bac_first:
            bac.diffusers.disable_cache(pipe)
            assert torch.equal(run(pipe, kind), hooked) and other.calls == 3 * calls  # the other hook alone
        else:
            registry(pipe).remove_hook("scale")
            assert torch.equal(run(pipe, kind), cached) and other.calls == 2 * calls  # bac's output as alone
            assert handle.stats()["sampling_calls"] == 3
    finally:
        bac.diffusers.disable_cache(pipe)
        registry(pipe).remove_hook("scale")
    assert not registry(pipe).hooks and not forward_replaced(pipe.transformer)
    assert torch.equal(run(pipe, kind), plain)


def test_every_step_plan_under_another_hook_is_that_hook_alone(pipe, kind, references):
    _, hooked, _ = references
    registry(pipe).register_hook(ScaleInput(0.9), "scale")
    try:
        enable(pipe, "every-step", {})
        assert torch.equal(run(pipe, kind), hooked)
    finally:
        bac.diffusers.disable_cache(pipe)
        registry(pipe).remove_hook("scale")


def remove_first_block_cache(pipe):
    for name in (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK):
        registry(pipe).remove_hook(name, recurse=True)


def test_a_diffusers_cache_is_refused_in_either_order(pipe, kind, references):
    plain, _, cached = references
    transformer, config = pipe.transformer, FirstBlockCacheConfig(threshold=0.1)
    # diffusers' cache first: bac refuses and changes nothing
    if isinstance(transformer, CacheMixin):
        transformer.enable_cache(config)
    else:  # DiT has no CacheMixin: the cache's hooks applied directly
        apply_first_block_cache(transformer, config)
    try:
        with pytest.raises(RuntimeError, match="has a diffusers cache .*'fbc_leader_block_hook' on "):
            enable(pipe)
        assert bac.get_handle(transformer) is None and "bac" not in registry(pipe).hooks
    finally:
        transformer.disable_cache() if isinstance(transformer, CacheMixin) else remove_first_block_cache(pipe)
    assert torch.equal(run(pipe, kind), plain)
    # bac first: diffusers' enable_cache refuses; hooks applied directly are refused at the next call
    enable(pipe)
    try:
        if isinstance(transformer, CacheMixin):
            with pytest.raises(ValueError, match="Caching has already been enabled with .*BacCache"):
                transformer.enable_cache(config)
            assert torch.equal(run(pipe, kind), cached)  # nothing was added
        apply_first_block_cache(transformer, config)
        with pytest.raises(RuntimeError, match="a diffusers cache was added after bac: .*fbc_leader_block_hook"):
            run(pipe, kind)
        with pytest.raises(RuntimeError, match="disable_cache: .*has a diffusers cache"):
            bac.diffusers.disable_cache(pipe)  # its hooks wrap bac's blocks: they go first
        remove_first_block_cache(pipe)
        assert torch.equal(run(pipe, kind), cached)
    finally:
        remove_first_block_cache(pipe)
        bac.diffusers.disable_cache(pipe)
    assert torch.equal(run(pipe, kind), plain)


def test_a_call_that_broke_off_does_not_leak_into_the_next(pipe, kind, references):
    """The next call's scheduler restart starts a new trajectory, though no end-of-call reset ran."""
    _, _, cached = references
    calls = [0]

    def break_off(module, args):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    handle = enable(pipe)
    hook = pipe.transformer.register_forward_pre_hook(break_off)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(pipe, kind)
        assert torch.equal(run(pipe, kind), cached)
        assert handle.stats()["sampling_calls"] == 2
    finally:
        hook.remove()
        bac.diffusers.disable_cache(pipe)


def test_each_call_follows_its_step_count(pipe, kind, references):
    """The step count is read from the scheduler at each call's first denoiser call (DiT included)."""
    plain = {steps: run(pipe, kind, steps) for steps in (4, 9)}
    handle = enable(pipe, "every-step", {})  # enabled for K steps
    try:
        for steps in (4, 9, K):
            out = run(pipe, kind, steps)
            assert torch.equal(out, plain.get(steps, references[0])) and handle.stats()["num_steps"] == steps
    finally:
        bac.diffusers.disable_cache(pipe)


# --- bare transformers: diffusers' end-of-call reset is the boundary of CacheMixin models ---------------


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_a_bare_cache_mixin_loop_ends_its_trajectory_at_the_reset(name, cases, model_of, all_equal):
    case, model = cases[name], model_of(cases[name])

    @torch.no_grad()
    def loop(steps=K):  # no bac.new_trajectory: the reset diffusers' pipelines run ends each loop
        x, cond = case.inputs(0)
        outputs = []
        for k in range(steps):
            with model.cache_context("cond"):
                outputs.append(case.call(model, x, k, cond))
            x = x - 0.1 * outputs[-1]
        model._reset_stateful_cache()
        return outputs

    reference = loop()
    handle = bac.diffusers.enable_cache(model, "uniform", num_inference_steps=K, **CACHING)
    try:
        first, second = loop(), loop()
        assert handle.stats()["sampling_calls"] == 2 and handle.stats()["skipped"] > 0
        assert all_equal(first, second) and not all_equal(first, reference)
        with pytest.raises(bac.PlanMismatchError, match=f"the plan covers {K} denoiser calls per context, the "
                                                        r"pipeline ran \{'cond': 4\}"):
            loop(steps=4)  # the reset checks the loop's length
        assert all_equal(loop(), first)
    finally:
        bac.diffusers.disable_cache(model)
    assert all_equal(loop(), reference)


def test_a_bare_dit_needs_new_trajectory(cases, model_of, sample, all_equal):
    """DiT has no CacheMixin, so nothing marks a bare loop's end: bac.new_trajectory does (sample calls it)."""
    case, model = cases["dit"], model_of(cases["dit"])
    bac.diffusers.enable_cache(model, "uniform", num_inference_steps=K, **CACHING)
    try:
        first = sample(case, model)
        assert all_equal(sample(case, model), first)
        with pytest.raises(bac.StepOverflowError), torch.no_grad():
            x, cond = case.inputs(0)
            case.call(model, x, K, cond)  # a seventh denoiser call without a new trajectory
    finally:
        bac.diffusers.disable_cache(model)
