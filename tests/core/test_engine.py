"""The engine: equivalence with no caching, exact reuse semantics, statistics, state handling."""
import sys

import pytest
import torch
from torch import nn

import bac
import bac.fit
import bac.rows
import bac.runners
import bac.state


def every_step(model, k):
    return bac.make_plan(model, "every-step", num_steps=k)


class DecoderStack(nn.Module):
    """PyTorch decoder layers in every configuration the built-in adapter supports."""

    def __init__(self, norm_first, batch_first):
        super().__init__()
        torch.manual_seed(0)
        self.horizon, self.action_dim, self.batch_first = 8, 3, batch_first
        self.inp, self.cond, self.out = nn.Linear(3, 16), nn.Linear(5, 16), nn.Linear(16, 3)
        layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(8))

    def forward(self, x, t, obs):
        h, memory = self.inp(x) + t / 100, self.cond(obs)
        if not self.batch_first:
            h, memory = h.transpose(0, 1), memory.transpose(0, 1)
        h = self.decoder(h, memory, tgt_mask=self.mask, tgt_is_causal=True)
        return self.out(h if self.batch_first else h.transpose(0, 1))


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_every_step_plan_is_bit_identical_and_remove_restores(norm_first, batch_first, ddpm_scheduler,
                                                              sample_actions):
    model, scheduler = DecoderStack(norm_first, batch_first).eval(), ddpm_scheduler(12)
    obs = torch.randn(2, 2, 5)
    reference = sample_actions(model, scheduler, obs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with bac.accelerate(model, every_step(model, 12), num_steps=12) as handle:
        cached = sample_actions(model, scheduler, obs)
        repeated = sample_actions(model, scheduler, obs)  # the cache is cleared per sampling call
        assert handle.stats()["skipped"] == 0
    assert torch.equal(cached, reference) and torch.equal(repeated, reference)
    assert torch.equal(sample_actions(model, scheduler, obs), reference)
    assert "forward" not in model.decoder.layers[0].__dict__ and not hasattr(model, "_bac_handle")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class EncoderDenoiser(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.inp = nn.Linear(3, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x, t):
        return self.out(self.encoder(self.inp(x) + t / 10))


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layers_use_the_standard_path(norm_first):
    torch.manual_seed(0)
    model = EncoderDenoiser(norm_first).eval()
    x = torch.randn(2, 6, 3)

    def loop():
        bac.new_trajectory(model)
        with torch.no_grad():
            return [model(x, float(t)) for t in range(5)]

    fused = loop()  # PyTorch may take its fused inference kernel here
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        standard = loop()
        with bac.accelerate(model, every_step(model, 5)):
            cached = loop()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert all(torch.equal(a, b) for a, b in zip(cached, standard))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cached, fused))


def manual_cached_loop(model, scheduler, obs, plan, seed=0):
    """Reference caching written out by hand for the tiny denoiser (pre-norm decoder layers, no masks)."""
    steps = plan.update_steps()
    cache = {}
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((obs.shape[0], model.horizon, model.action_dim), generator=generator)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            memory = model.cond_emb(obs)
            h = model.input_emb(x) + model.time_emb(t)[:, None]
            for i, layer in enumerate(model.decoder.layers):
                branches = {
                    "sa": lambda h: layer._sa_block(layer.norm1(h), None, None, False),
                    "ca": lambda h: layer._mha_block(layer.norm2(h), memory, None, None, False),
                    "ffn": lambda h: layer._ff_block(layer.norm3(h)),
                }
                for key, branch in branches.items():
                    name = f"decoder.layers.{i}.{key}"
                    if k in steps[name]:
                        cache[name] = branch(h)
                    h = h + cache[name]
            eps = model.head(model.norm_out(h))
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def test_cached_output_equals_hand_written_caching(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    calibration = bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs])
    plan = bac.make_plan(calibration, "bac", M=4, n=2)
    with bac.accelerate(model, plan, num_steps=12):
        cached = sample_actions(model, scheduler, obs)
    assert torch.equal(cached, manual_cached_loop(model, scheduler, obs, plan))
    assert not torch.equal(cached, sample_actions(model, scheduler, obs))  # caching really changed something


def test_skipped_blocks_do_not_run_and_counts_match_the_plan(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    plan = bac.make_plan(model, "uniform", num_steps=12, M=3)
    calls = []
    handles = [layer.linear1.register_forward_hook(lambda *a: calls.append(1)) for layer in model.decoder.layers]
    with bac.accelerate(model, plan) as handle:
        for seed in range(3):
            sample_actions(model, scheduler, obs, seed=seed)
        stats = handle.stats()
    for h in handles:
        h.remove()
    assert len(calls) == 3 * 3 * len(model.decoder.layers)  # FFN ran at 3 of 12 steps, 3 calls
    assert stats["sampling_calls"] == 3 and stats["denoiser_calls"] == 36
    assert stats["computed"] == 3 * plan.computed_count()
    assert stats["skipped"] == 3 * plan.skipped_count()
    assert stats["last_call"] == {"denoiser_calls": 12, "computed": plan.computed_count(),
                                  "skipped": plan.skipped_count()}
    for block in plan.blocks:
        assert stats["per_block"][block.name]["computed"] == 3 * len(block.update_steps)


def test_more_steps_than_the_plan_is_an_error(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    plan = bac.make_plan(model, "every-step", num_steps=6)
    with bac.accelerate(model, plan) as handle:
        with pytest.raises(bac.StepOverflowError, match="covers 6 denoising steps"):
            sample_actions(model, scheduler, obs)
        # forgetting to mark a new sampling call is caught the same way
        handle.new_trajectory()
        x = torch.zeros(2, 8, 3)
        with torch.no_grad():
            for _ in range(6):
                model(x, 1, obs)
            with pytest.raises(bac.StepOverflowError, match="new_trajectory"):
                model(x, 1, obs)


def test_contexts_keep_separate_state(tiny_stack):
    model, scheduler, obs = tiny_stack
    plan = bac.make_plan(model, "uniform", num_steps=12, interval=4)
    x = torch.randn(2, 8, 3)
    with bac.accelerate(model, plan) as handle, torch.no_grad():
        handle.new_trajectory()
        for k in range(12):  # two calls per step, as classifier-free guidance does
            with handle.context("cond"):
                model(x, k, obs)
            with handle.context("uncond"):
                model(x, k, obs)
            assert handle.step == -1  # the default context never ran
        with handle.context("cond"):
            assert handle.step == 11
        handle.new_trajectory()
        with handle.context("cond"):
            assert handle.step == -1
        assert handle.stats()["denoiser_calls"] == 24
        assert handle.context_names() == ["cond", "default", "uncond"]
        assert handle.drop_context("uncond") and handle.context_names() == ["cond", "default"]
    # without contexts the second call per step overflows the plan instead of sharing state
    with bac.accelerate(model, plan), torch.no_grad():
        with pytest.raises(bac.StepOverflowError):
            for k in range(12):
                model(x, k, obs)
                model(x, k, obs)


def test_double_accelerate_is_an_error_and_remove_is_idempotent(tiny_stack):
    model, _, _ = tiny_stack
    plan = every_step(model, 4)
    handle = bac.accelerate(model, plan)
    with pytest.raises(RuntimeError, match="already accelerated"):
        bac.accelerate(model, plan)
    handle.remove()
    handle.remove()
    bac.accelerate(model, plan).remove()


def test_flops_per_block_match_the_layer_shapes(tiny_stack):
    model, _, obs = tiny_stack
    width, tokens, batch = 32, 8, 2
    with bac.accelerate(model, every_step(model, 4)) as handle:
        flops = handle.measure_flops(torch.zeros(batch, tokens, 3), torch.tensor(1), obs)
        assert handle.stats()["denoiser_calls"] == 0  # measuring is not a step
    ffn = 2 * (2 * batch * tokens * width * 4 * width)  # two linear layers
    assert flops["decoder.layers.0.ffn"] == ffn
    assert flops["total"] > sum(v for k, v in flops.items() if k != "total") > 0


def test_ideal_speedup_from_stats_matches_the_plan(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    plan = bac.make_plan(model, "uniform", num_steps=12, M=4)
    with bac.accelerate(model, plan) as handle:
        per_block = handle.measure_flops(torch.zeros(2, 8, 3), torch.tensor(1), obs)
        sample_actions(model, scheduler, obs)
        stats = handle.stats()
    total = per_block.pop("total")
    assert stats["flops"]["ideal_speedup"] == pytest.approx(plan.ideal_speedup(per_block, total))
    assert 2.5 < stats["flops"]["ideal_speedup"] < 3.0  # 4 of 12 steps, plus a small non-block share
    assert "ideal speedup" in handle.summary()


class ToyLayer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def mix(self, x):
        return self.attn(self.norm(x)).softmax(-1) * x

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.mlp(x)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(ToyLayer(8) for _ in range(2))

    def forward(self, x, t):
        for layer in self.layers:
            x = layer(x + t)
        return x


def test_user_model_declared_in_one_line():
    torch.manual_seed(0)
    model = ToyModel()
    adapters = {ToyLayer: bac.BranchAttributes({"mix": "sa", "mlp": "ffn"})}
    spec = bac.describe(model, adapters)
    assert [(b.name, b.kind, b.layer) for b in spec.blocks] == [
        ("layers.0.mix", "sa", 0), ("layers.0.mlp", "ffn", 0), ("layers.1.mix", "sa", 1), ("layers.1.mlp", "ffn", 1)]
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        reference = [model(x, 0.1 * k) for k in range(4)]
        plan = bac.make_plan(spec, "uniform", num_steps=4, interval=2)
        with bac.accelerate(model, plan, adapters=adapters):
            cached = [model(x, 0.1 * k) for k in range(4)]
        with bac.accelerate(model, bac.make_plan(spec, "every-step", num_steps=4), adapters=adapters):
            identical = [model(x, 0.1 * k) for k in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(identical, reference))
    assert torch.equal(cached[0], reference[0]) and torch.equal(cached[2], reference[2])
    assert not torch.equal(cached[1], reference[1])
    assert "mix" not in model.layers[0].__dict__ and "forward" not in model.layers[0].mlp.__dict__


def test_model_without_adapters_is_a_clear_error():
    with pytest.raises(ValueError, match="register_adapter"):
        bac.describe(nn.Sequential(nn.Linear(2, 2)))


def test_failed_install_leaves_the_model_untouched(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    reference = sample_actions(model, scheduler, obs)
    plan = every_step(model, 12)

    class Refusing(bac.ForwardOverride):
        def install(self, layer, runners):
            if layer is model.decoder.layers[2]:
                raise RuntimeError("cannot install here")
            super().install(layer, runners)

    builtin = bac.adapters._REGISTRY[nn.TransformerDecoderLayer]
    refusing = Refusing(builtin.branches, builtin._forward, builtin._batch_dim, builtin._width)
    with pytest.raises(RuntimeError, match="cannot install"):
        bac.accelerate(model, plan, adapters={nn.TransformerDecoderLayer: refusing})
    assert all("forward" not in layer.__dict__ for layer in model.decoder.layers)
    assert not hasattr(model, "_bac_handle") and not model._forward_pre_hooks
    assert torch.equal(sample_actions(model, scheduler, obs), reference)


def test_layers_replaced_by_someone_else_are_refused(tiny_stack):
    model, _, _ = tiny_stack
    model.decoder.layers[1].forward = lambda *a, **k: None
    with pytest.raises(ValueError, match="already has a replaced forward"):
        bac.describe(model)


def test_get_handle_names_the_accelerating_handle_and_describe_sees_it(tiny_stack):
    model, _, _ = tiny_stack
    assert bac.get_handle(model) is None
    with bac.accelerate(model, every_step(model, 4)) as handle:
        assert bac.get_handle(model) is handle
        # the replaced forwards are bac's own (bac.adapters asks bac.get_handle), so describing is no error
        assert bac.describe(model).blocks == handle.spec.blocks
    assert bac.get_handle(model) is None


def python_calls(fn, *args):
    """fn(*args), and the (file name, function name) of every Python function it called."""
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append((frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        out = fn(*args)
    finally:
        sys.setprofile(None)
    return out, calls


@pytest.mark.parametrize("static", [True, False])
def test_the_static_hot_path_calls_nothing_beyond_the_block(static):
    """A static plan's runner at a computed step: a row lookup and the block's own call (two runner frames,
    then the block); a runtime rule's runner adds its notify-and-count step around the same plain runner."""
    RUN, STORE = bac.rows.RUN, bac.rows.STORE
    schedule = bac.rows.StaticRows(((RUN,), (RUN | STORE,), (0,)), 3, "test")
    threads = bac.state.ThreadStates(schedule, num_blocks=1)
    runner = bac.runners.make_runner(0, threads.local, bac.REUSE, static=static)
    state = threads.local.state

    def block(x):
        return x + 1

    state.step, state.row = 0, schedule.rows[0]
    out, calls = python_calls(runner, block, 1)
    assert out == 2 and calls[-1] == ("test_engine.py", "block")
    assert all(file == "runners.py" for file, _ in calls[:-1]) and len(calls) == (3 if static else 4)
    for step, x in ((1, 2), (2, 7)):
        state.step, state.row = step, schedule.rows[step]
        assert runner(block, x) == 3  # at step 2 the value stored at step 1 stands in
    assert (state.computed, state.skipped) == (([0], [0]) if static else ([2], [1]))  # static: counted from rows


def test_renamed_core_names_keep_deprecated_aliases(tiny_stack):
    import bac.actions

    with pytest.warns(DeprecationWarning, match=r"bac\.rows\.rows_from_table"):
        assert bac.actions.actions_from_table is bac.rows.rows_from_table
    with pytest.warns(DeprecationWarning, match=r"bac\.rows\.StaticRows"):
        from bac.actions import StaticRows
    assert StaticRows is bac.rows.StaticRows
    with pytest.raises(AttributeError):
        bac.actions.Action  # noqa: B018
    model, _, _ = tiny_stack
    plan = every_step(model, 4)
    blocks = [(b.name, b.kind, b.layer) for b in plan.blocks]
    with pytest.warns(DeprecationWarning, match="check_made_for"), \
            pytest.raises(bac.PlanMismatchError, match="made for 4 denoising steps, the sampler runs 5"):
        bac.fit.check_fits("plan", plan.model, blocks, plan.num_steps, plan.scheduler, bac.describe(model), 5)
