"""bac.diffusers: block adapters for DiT, FLUX and Wan transformers (tiny random models, CPU)."""
import functools

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

import bac
import bac.diffusers
from bac.diffusers import UnsupportedBlockError

pytestmark = pytest.mark.usefixtures("one_thread")

CASE_NAMES = ("dit", "flux", "wan")  # the conftest's cases


def instance_state(model):
    return {name: set(module.__dict__) for name, module in model.named_modules()}


# --- description ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_describe_finds_the_blocks_in_execution_order(name, cases, model_of):
    assert tuple(cases) == CASE_NAMES
    case = cases[name]
    model = model_of(case)
    spec = bac.describe(model)
    assert [(b.name, b.kind, b.layer) for b in spec.blocks] == case.blocks
    assert spec.batch_dims() == [0] * len(case.blocks)
    assert spec.fingerprint["width"] == {"dit": 16, "flux": 16, "wan": 24}[name]
    assert spec.fingerprint["num_layers"] == case.blocks[-1][2] + 1


# --- equivalence ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_step_plan_is_bit_identical_and_remove_restores(name, cases, model_of, sample, all_equal, K):
    case = cases[name]
    model = model_of(case)
    reference = sample(case, model)
    before = instance_state(model)
    with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=K), num_steps=K) as handle:
        assert instance_state(model) != before  # the forwards really are replaced
        cached = sample(case, model)
        repeated = sample(case, model, seed=0)
        stats = handle.stats()
    assert all_equal(cached, reference) and all_equal(repeated, reference)
    assert stats["skipped"] == 0 and stats["computed"] == 2 * K * len(case.blocks)
    assert instance_state(model) == before and not hasattr(model, "_bac_handle")
    assert all_equal(sample(case, model), reference)


@pytest.mark.parametrize("name, dtype", [("dit", torch.float16), ("flux", torch.float16), ("wan", torch.bfloat16)])
def test_every_step_plan_is_bit_identical_in_half_precision(name, dtype, cases, sample, all_equal, K):
    # FLUX clips fp16 streams after each block; Wan adds residuals in float32 and casts back.
    case = cases[name]
    model = case.build().to(dtype)
    reference = sample(case, model, dtype=dtype)
    assert reference[-1].dtype == dtype and all(torch.isfinite(r).all() for r in reference)
    with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=K)):
        cached = sample(case, model, dtype=dtype)
    assert all_equal(cached, reference)


def test_flux_fp16_clipping_is_reproduced(cases, sample, all_equal, K):
    case = cases["flux"]
    model = case.build().to(torch.float16)
    with torch.no_grad():  # make both kinds of block overflow fp16, so diffusers' clip fires
        model.transformer_blocks[1].ff_context.net[2].weight.mul_(3e5)
        model.single_transformer_blocks[0].proj_out.weight.mul_(3e5)
    peaks = []
    hooks = [block.register_forward_hook(lambda m, a, out: peaks.append(max(o.abs().max().item() for o in out)))
             for block in [*model.transformer_blocks, *model.single_transformer_blocks]]
    reference = sample(case, model, dtype=torch.float16)
    for h in hooks:
        h.remove()
    assert peaks[1] == peaks[2] == 65504.0 and all(torch.isfinite(r).all() for r in reference)
    with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=K)):
        cached = sample(case, model, dtype=torch.float16)
    assert all_equal(cached, reference)


def test_wan_per_token_timesteps_are_bit_identical(cases, model_of, sample, all_equal, K):
    case = cases["wan"]
    model = model_of(case)

    def call(m, x, k, cond):
        return case.call(m, x, k, cond, per_token=True)

    ndims = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: ndims.append(args[2].ndim))
    try:
        reference = sample(case, model, call=call)
        with bac.accelerate(model, bac.make_plan(model, "every-step", num_steps=K)):
            cached = sample(case, model, call=call)
    finally:
        hook.remove()
    assert ndims == [4] * (2 * K)  # the blocks took the per-token modulation path
    assert all_equal(cached, reference)


# --- caching --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_uniform_plan_skips_whole_branches(name, cases, model_of, sample, K):
    case = cases[name]
    model = model_of(case)
    plan = bac.make_plan(model, "uniform", num_steps=K, interval=2)  # update at steps 0, 2, 4
    reference = sample(case, model, update=False)
    # every linear layer inside the blocks (attention, FFN and the adaLN modulation) must run only at update steps
    spec = bac.describe(model)
    counts, hooks = {}, []
    for path, layer, _ in spec.layers:
        for sub, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                key = f"{path}.{sub}"
                counts[key] = 0
                hooks.append(module.register_forward_hook(lambda *a, key=key: counts.__setitem__(key, counts[key] + 1)))
    try:
        with bac.accelerate(model, plan) as handle:
            cached = sample(case, model, update=False)
            stats = handle.stats()
    finally:
        for h in hooks:
            h.remove()
    assert plan.skipped_count() == len(case.blocks) * 3
    assert stats["skipped"] == plan.skipped_count() and stats["computed"] == plan.computed_count()
    for k in range(K):
        if k % 2 == 0:
            assert torch.equal(cached[k], reference[k]), k  # every block recomputed: exactly the reference
        else:
            assert not torch.equal(cached[k], reference[k]), k  # every block reused: caching really happens
    for key, count in counts.items():
        # DiT's output head reuses the first block's timestep/class embedding at every step
        outside = K if name == "dit" and key.startswith("transformer_blocks.0.norm1.emb.") else 0
        assert count == 3 + outside, key


# Hand-written caching: the branches computed with diffusers' own modules (the original
# AdaLayerNormZero forward for DiT and FLUX), stored at update steps and re-added otherwise.


@torch.no_grad()
def dit_manual(model, plan, inputs, K, seed=0):
    steps, cache = plan.update_steps(), {}
    x, cond = inputs(seed)
    labels, p = cond["class_labels"], model.patch_size
    outputs = []
    for k in range(K):
        timestep = torch.full((2,), 999 - 190 * k, dtype=torch.long)
        h = model.pos_embed(x)
        for i, block in enumerate(model.transformer_blocks):
            name = f"transformer_blocks.{i}"
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, timestep, labels, hidden_dtype=h.dtype)
            if k in steps[f"{name}.sa"]:
                cache[f"{name}.sa"] = gate_msa.unsqueeze(1) * block.attn1(norm_h)
            h = cache[f"{name}.sa"] + h
            if k in steps[f"{name}.ffn"]:
                norm_h = block.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                cache[f"{name}.ffn"] = gate_mlp.unsqueeze(1) * block.ff(norm_h)
            h = cache[f"{name}.ffn"] + h
        conditioning = model.transformer_blocks[0].norm1.emb(timestep, labels, hidden_dtype=h.dtype)
        shift, scale = model.proj_out_1(nn.functional.silu(conditioning)).chunk(2, dim=1)
        h = model.proj_out_2(model.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
        n = int(h.shape[1] ** 0.5)
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, n, n, p, p, model.out_channels))
        out = h.reshape(-1, model.out_channels, n * p, n * p)
        outputs.append(out)
        x = x - 0.1 * out
    return outputs


def flux_double_manual(block, name, steps, cache, step):
    def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        k = step[0]
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
        if k in steps[f"{name}.attn"]:
            attn, context_attn = block.attn(hidden_states=norm_h, encoder_hidden_states=norm_e,
                                            image_rotary_emb=image_rotary_emb)
            cache[f"{name}.attn"] = (gate_msa.unsqueeze(1) * attn, c_gate_msa.unsqueeze(1) * context_attn)
        hidden_states = hidden_states + cache[f"{name}.attn"][0]
        if k in steps[f"{name}.ff"]:
            norm_h = block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            cache[f"{name}.ff"] = gate_mlp.unsqueeze(1) * block.ff(norm_h)
        hidden_states = hidden_states + cache[f"{name}.ff"]
        encoder_hidden_states = encoder_hidden_states + cache[f"{name}.attn"][1]
        if k in steps[f"{name}.ff_context"]:
            norm_e = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            cache[f"{name}.ff_context"] = c_gate_mlp.unsqueeze(1) * block.ff_context(norm_e)
        encoder_hidden_states = encoder_hidden_states + cache[f"{name}.ff_context"]
        return encoder_hidden_states, hidden_states

    return forward


def flux_single_manual(block, name, steps, cache, step):
    def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_len = encoder_hidden_states.shape[1]
        h = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        if step[0] in steps[f"{name}.attn_mlp"]:
            norm_h, gate = block.norm(h, emb=temb)
            mlp = block.act_mlp(block.proj_mlp(norm_h))
            attn = block.attn(hidden_states=norm_h, image_rotary_emb=image_rotary_emb)
            cache[f"{name}.attn_mlp"] = gate.unsqueeze(1) * block.proj_out(torch.cat([attn, mlp], dim=2))
        h = h + cache[f"{name}.attn_mlp"]
        return h[:, :text_len], h[:, text_len:]

    return forward


def wan_manual(block, name, steps, cache, step):
    def forward(hidden_states, encoder_hidden_states, temb, rotary_emb):
        k, h = step[0], hidden_states
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, 1)
        if k in steps[f"{name}.sa"]:
            norm_h = (block.norm1(h.float()) * (1 + scale_msa) + shift_msa).type_as(h)
            cache[f"{name}.sa"] = block.attn1(norm_h, None, None, rotary_emb) * gate_msa
        h = (h.float() + cache[f"{name}.sa"]).type_as(h)
        if k in steps[f"{name}.ca"]:
            cache[f"{name}.ca"] = block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)
        h = h + cache[f"{name}.ca"]
        if k in steps[f"{name}.ffn"]:
            norm_h = (block.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h)
            cache[f"{name}.ffn"] = block.ffn(norm_h).float() * c_gate
        return (h.float() + cache[f"{name}.ffn"]).type_as(h)

    return forward


MANUAL_BLOCKS = {
    "flux": [("transformer_blocks", flux_double_manual), ("single_transformer_blocks", flux_single_manual)],
    "wan": [("blocks", wan_manual)],
}


def manual_cached_sample(case, model, plan, K):
    if case.name == "dit":
        return dit_manual(model, plan, case.inputs, K)
    # The model's own embeddings and head; each block's forward replaced by hand-written caching.
    steps, cache, step = plan.update_steps(), {}, [0]
    blocks = [(f"{attr}.{i}", block, make) for attr, make in MANUAL_BLOCKS[case.name]
              for i, block in enumerate(getattr(model, attr))]
    for name, block, make in blocks:
        block.forward = make(block, name, steps, cache, step)
    try:
        x, cond = case.inputs(0)
        outputs = []
        with torch.no_grad():
            for k in range(K):
                step[0] = k
                out = case.call(model, x, k, cond)
                outputs.append(out)
                x = x - 0.1 * out
    finally:
        for _, block, _ in blocks:
            del block.forward
    return outputs


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("method", ["bac", "uniform", "staggered"])
def test_cached_output_equals_hand_written_caching(name, method, cases, model_of, sample, all_equal, K):
    case = cases[name]
    model = model_of(case)
    if method == "bac":
        calibration = bac.calibrate(model, lambda seed: sample(case, model, seed), [1, 2])
        assert calibration.num_steps == K and calibration.samples == 4
        assert [(b.name, b.kind, b.layer) for b in calibration.blocks] == case.blocks
        plan = bac.make_plan(calibration, "bac", M=2, n=2)
        assert plan.skipped_count() > 0
    elif method == "uniform":
        plan = bac.make_plan(model, "uniform", num_steps=K, interval=2)
    else:  # FFNs recomputed while attention is reused: the FFN branch computes the modulation itself
        spec = bac.describe(model)
        steps = {b.name: [0, 2, 4] if b.kind == "ffn" else [0, 3] for b in spec.blocks}
        plan = bac.Plan.from_steps(spec, steps, K, "staggered")
    reference = sample(case, model)
    with bac.accelerate(model, plan, num_steps=K) as handle:
        cached = sample(case, model)
        assert handle.stats()["skipped"] == plan.skipped_count()
    manual = manual_cached_sample(case, model, plan, K)
    assert all_equal(cached, manual)
    assert torch.equal(cached[0], reference[0]) and not all_equal(cached, reference)


# --- configurations the adapters refuse -------------------------------------------------------


class BlockStack(nn.Module):
    """Two BasicTransformerBlocks as a denoiser of tokens."""

    def __init__(self, **block):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(BasicTransformerBlock(16, 2, 8, **block) for _ in range(2))

    def forward(self, x, t, context=None):
        for block in self.blocks:
            x = block(x, encoder_hidden_states=context, timestep=t, class_labels=torch.tensor([1, 2]))
        return x


def test_dit_blocks_with_cross_attention_need_their_adapter(all_equal):
    model = BlockStack(cross_attention_dim=12, norm_type="ada_norm_zero", num_embeds_ada_norm=100,
                       activation_fn="gelu-approximate").eval()
    with pytest.raises(UnsupportedBlockError, match="adapters_for"):
        bac.describe(model)
    adapters = bac.diffusers.adapters_for(model)
    spec = bac.describe(model, adapters)
    assert [(b.name, b.kind) for b in spec.blocks] == [
        ("blocks.0.sa", "sa"), ("blocks.0.ca", "ca"), ("blocks.0.ffn", "ffn"),
        ("blocks.1.sa", "sa"), ("blocks.1.ca", "ca"), ("blocks.1.ffn", "ffn")]
    x, context = torch.randn(2, 6, 16), torch.randn(2, 3, 12)

    def run():
        bac.new_trajectory(model)
        with torch.no_grad():
            return [model(x, torch.tensor([900 - 100 * k] * 2), context) for k in range(4)]

    reference = run()
    with bac.accelerate(model, bac.make_plan(spec, "every-step", num_steps=4), adapters=adapters):
        assert all_equal(run(), reference)
    with bac.accelerate(model, bac.make_plan(spec, "uniform", num_steps=4, interval=2), adapters=adapters):
        cached = run()
    assert torch.equal(cached[2], reference[2]) and not torch.equal(cached[1], reference[1])


@pytest.mark.parametrize("block", [
    dict(norm_type="layer_norm"),
    dict(norm_type="ada_norm", num_embeds_ada_norm=100),
    dict(norm_type="ada_norm_zero", num_embeds_ada_norm=100, double_self_attention=True),
])
def test_unsupported_basic_block_configurations_are_refused(block):
    model = BlockStack(**block)
    with pytest.raises(UnsupportedBlockError):
        bac.describe(model)
    with pytest.raises(UnsupportedBlockError):
        bac.diffusers.adapters_for(model)
    assert "forward" not in model.blocks[0].__dict__


def test_hooked_blocks_are_refused_and_left_alone(cases, sample, all_equal, K):
    model = cases["dit"].build()
    plan = bac.make_plan(model, "every-step", num_steps=K)
    original = model.transformer_blocks[0].forward
    hooked = functools.partial(lambda *a, **k: original(*a, **k))
    model.transformer_blocks[0].forward = hooked  # an active hook (diffusers' registry, another accelerator)
    with pytest.raises(UnsupportedBlockError, match="replaced forward"):
        bac.accelerate(model, plan)
    assert model.transformer_blocks[0].forward is hooked
    # after its hooks are removed diffusers leaves the original bound method on the instance: that is no hook
    model.transformer_blocks[0].forward = original
    reference = sample(cases["dit"], model)
    with bac.accelerate(model, plan):
        assert all_equal(sample(cases["dit"], model), reference)
    assert all_equal(sample(cases["dit"], model), reference)  # removing bac also drops the leftover
    hook = model.transformer_blocks[1].norm1.register_forward_hook(lambda *a: None)
    with pytest.raises(UnsupportedBlockError, match="norm1"):
        bac.calibrate(model, lambda seed: None, [0])
    hook.remove()
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)


def test_mixed_block_configurations_are_refused():
    model = BlockStack(norm_type="ada_norm_zero", num_embeds_ada_norm=100)
    model.blocks.append(BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, norm_type="ada_norm_zero",
                                              num_embeds_ada_norm=100))
    with pytest.raises(UnsupportedBlockError, match="different branch lists"):
        bac.diffusers.adapters_for(model)
