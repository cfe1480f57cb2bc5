"""Tiny random DiT, FLUX and Wan transformers and their sampling loops, shared by the diffusers tests.

Fixtures: ``cases`` (name -> ``Case``: how to build the model, make its inputs, call it, and the blocks
bac must find in it), ``K`` (denoiser calls per sampling call), ``model_of`` (one shared model per case),
``sample`` (one sampling call), ``all_equal`` (bit-identical output lists), ``tiny_dit_pipeline`` (builds a
real ``DiTPipeline``: 3 blocks, a one-level VAE, DDIM).
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    WanTransformer3DModel,
)

import bac

STEPS = 6  # denoiser calls per sampling call: the K fixture


def tiny_dit(**changes):
    torch.manual_seed(0)
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, sample_size=8, patch_size=2,
                  num_layers=2, num_embeds_ada_norm=1000, norm_num_groups=1)
    return DiTTransformer2DModel(**{**config, **changes}).eval()


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                                  axes_dims_rope=(2, 2, 4)).eval()


def tiny_wan():
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32).eval()


def _tiny_dit_pipeline():
    """A real ``DiTPipeline`` with tiny random modules (learned sigma: 8 output channels), progress bar off."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        sample_size=8, patch_size=2, num_layers=3, num_embeds_ada_norm=1000,
                                        norm_num_groups=1).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g).to(dtype), {"class_labels": torch.tensor([3, 7])}


def dit_call(model, x, k, cond):
    timestep = torch.full((2,), 999 - 190 * k, dtype=torch.long)
    return model(x, timestep=timestep, class_labels=cond["class_labels"]).sample


def flux_inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=1)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 12, generator=g).to(dtype),
            "pooled_projections": torch.randn(2, 10, generator=g).to(dtype),
            "img_ids": img_ids, "txt_ids": torch.zeros(5, 3)}
    return torch.randn(2, 16, 4, generator=g).to(dtype), cond


def flux_call(model, x, k, cond):
    return model(x, timestep=torch.full((2,), 1 - k / STEPS, dtype=x.dtype), **cond).sample


def wan_inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 2, 8, 8, generator=g).to(dtype), {"encoder_hidden_states": torch.randn(
        2, 6, 16, generator=g).to(dtype)}


def wan_call(model, x, k, cond, per_token=False):
    timestep = torch.full((2, 32) if per_token else (2,), 999 - 190 * k)  # per token: Wan 2.2 TI2V's 4-d temb
    return model(x, timestep, cond["encoder_hidden_states"]).sample


@dataclass
class Case:
    name: str
    build: Callable
    inputs: Callable  # (seed, dtype=float32) -> (x, cond)
    call: Callable  # (model, x, k, cond) -> output; Wan's also takes per_token=True
    blocks: list  # (name, kind, layer) of every block, in execution order


CASES = {
    "dit": Case("dit", tiny_dit, dit_inputs, dit_call, [
        ("transformer_blocks.0.sa", "sa", 0), ("transformer_blocks.0.ffn", "ffn", 0),
        ("transformer_blocks.1.sa", "sa", 1), ("transformer_blocks.1.ffn", "ffn", 1)]),
    "flux": Case("flux", tiny_flux, flux_inputs, flux_call, [
        ("transformer_blocks.0.attn", "sa", 0), ("transformer_blocks.0.ff", "ffn", 0),
        ("transformer_blocks.0.ff_context", "ffn", 0),
        ("transformer_blocks.1.attn", "sa", 1), ("transformer_blocks.1.ff", "ffn", 1),
        ("transformer_blocks.1.ff_context", "ffn", 1),
        ("single_transformer_blocks.0.attn_mlp", "ffn", 2), ("single_transformer_blocks.1.attn_mlp", "ffn", 3)]),
    "wan": Case("wan", tiny_wan, wan_inputs, wan_call, [
        ("blocks.0.sa", "sa", 0), ("blocks.0.ca", "ca", 0), ("blocks.0.ffn", "ffn", 0),
        ("blocks.1.sa", "sa", 1), ("blocks.1.ca", "ca", 1), ("blocks.1.ffn", "ffn", 1)]),
}
MODELS = {}


def _model_of(case):
    if case.name not in MODELS:
        MODELS[case.name] = case.build()
    return MODELS[case.name]


@torch.no_grad()
def _sample(case, model, seed=0, update=True, dtype=torch.float32, call=None):
    """One sampling call: K denoiser calls with falling timesteps; x follows a simple Euler-like rule."""
    bac.new_trajectory(model)
    x, cond = case.inputs(seed, dtype)
    outputs = []
    for k in range(STEPS):
        out = (call or case.call)(model, x, k, cond)
        outputs.append(out)
        if update:
            x = x - 0.1 * out
    return outputs


def _all_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="session")
def K():
    """Denoiser calls per sampling call of ``sample``."""
    return STEPS


@pytest.fixture(scope="session")
def cases():
    """Case name ("dit", "flux", "wan") -> ``Case``."""
    return CASES


@pytest.fixture(scope="session")
def model_of():
    """``model_of(case)``: the case's tiny model, built once and shared by every test that does not change it."""
    return _model_of


@pytest.fixture(scope="session")
def sample():
    """``sample(case, model, seed=0, update=True, dtype=float32, call=None)``: one sampling call's outputs."""
    return _sample


@pytest.fixture(scope="session")
def all_equal():
    """``all_equal(a, b)``: two lists of tensors, bit for bit."""
    return _all_equal


@pytest.fixture(scope="session")
def tiny_dit_pipeline():
    """``tiny_dit_pipeline()``: a new real ``DiTPipeline`` with tiny random modules, progress bar off."""
    return _tiny_dit_pipeline
