"""Adapters for FLUX's dual-stream and single-stream blocks.

A dual-stream block has three branches: the joint attention (``sa``, updating both streams: its feature is
a tuple) and one gated FFN per stream. A single-stream block is one branch (``ffn``): diffusers mixes its
parallel attention and MLP in one linear layer, which cannot be split without changing the result bits.
Gates are applied outside the runner (``runner.gated``). The branches and why they are cut this way:
docs/guide/diffusers.md ("What the adapters cache").
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from ._common import CheckedOverride, Lazy, UnsupportedBlockError, require_plain


def _modulation(norm: AdaLayerNormZero, temb):
    # AdaLayerNormZero.forward(x, emb=temb), without normalising x: same modules, same ops.
    emb = norm.linear(norm.silu(temb))
    return emb.chunk(6, dim=1)  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _attn(layer: FluxTransformerBlock, hidden_states, encoder_hidden_states, mod, c_mod, image_rotary_emb, kwargs):
    shift_msa, scale_msa = mod()[:2]
    norm_hidden_states = layer.norm1.norm(hidden_states) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    c_shift_msa, c_scale_msa = c_mod()[:2]
    norm_encoder_hidden_states = (
        layer.norm1_context.norm(encoder_hidden_states) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
    )
    attention_outputs = layer.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **kwargs,
    )
    if len(attention_outputs) not in (2, 3):
        raise RuntimeError(f"FluxTransformerBlock.attn returned {len(attention_outputs)} outputs; expected 2 or 3")
    return tuple(attention_outputs)  # (image, text[, IP-adapter]) before the gates


def _attn_gates(mod: Lazy, c_mod: Lazy):
    # each stream's gate, as diffusers multiplies; the IP-adapter output is added ungated
    return lambda out: (mod()[2].unsqueeze(1) * out[0], c_mod()[2].unsqueeze(1) * out[1]) + tuple(out[2:])


def _ff(norm, ff, hidden_states, mod):
    shift_mlp, scale_mlp = mod()[3:5]
    norm_hidden_states = norm(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return ff(norm_hidden_states)


def _gate(mod: Lazy, index: int):
    return lambda output: mod()[index].unsqueeze(1) * output


def _double_forward(
    layer: FluxTransformerBlock,
    runners,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward`` with the joint attention and the two FFNs routed through runners."""
    attn, ff, ff_context = runners
    mod = Lazy(_modulation, layer.norm1, temb)
    c_mod = Lazy(_modulation, layer.norm1_context, temb)
    joint_attention_kwargs = joint_attention_kwargs or {}

    outputs = attn.gated(_attn_gates(mod, c_mod), _attn, layer, hidden_states, encoder_hidden_states, mod, c_mod,
                         image_rotary_emb, joint_attention_kwargs)

    hidden_states = hidden_states + outputs[0]
    hidden_states = hidden_states + ff.gated(_gate(mod, 5), _ff, layer.norm2, layer.ff, hidden_states, mod)
    if len(outputs) == 3:
        hidden_states = hidden_states + outputs[2]

    encoder_hidden_states = encoder_hidden_states + outputs[1]
    encoder_hidden_states = encoder_hidden_states + ff_context.gated(
        _gate(c_mod, 5), _ff, layer.norm2_context, layer.ff_context, encoder_hidden_states, c_mod
    )
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_modulation(layer: FluxSingleTransformerBlock, temb):
    # AdaLayerNormZeroSingle.forward(x, emb=temb), without normalising x: same modules, same ops.
    return layer.norm.linear(layer.norm.silu(temb)).chunk(3, dim=1)  # shift, scale, gate


def _single_branch(layer: FluxSingleTransformerBlock, hidden_states, mod: Lazy, image_rotary_emb,
                   joint_attention_kwargs):
    shift_msa, scale_msa = mod()[:2]
    norm_hidden_states = layer.norm.norm(hidden_states) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    mlp_hidden_states = layer.act_mlp(layer.proj_mlp(norm_hidden_states))
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn_output = layer.attn(
        hidden_states=norm_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **joint_attention_kwargs,
    )
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    return layer.proj_out(hidden_states)


def _single_forward(
    layer: FluxSingleTransformerBlock,
    runners,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` with the parallel attention + MLP routed through one runner."""
    (attn_mlp,) = runners
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

    residual = hidden_states
    mod = Lazy(_single_modulation, layer, temb)
    hidden_states = residual + attn_mlp.gated(_gate(mod, 2), _single_branch, layer, hidden_states, mod,
                                              image_rotary_emb, joint_attention_kwargs)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)

    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


def _check_double(adapter: CheckedOverride, layer: FluxTransformerBlock) -> None:
    for name in ("norm1", "norm1_context"):
        norm = getattr(layer, name)
        if type(norm) is not AdaLayerNormZero or norm.emb is not None:
            raise UnsupportedBlockError(
                f"FluxTransformerBlock.{name} is {type(norm).__name__}; bac.diffusers expects FLUX's "
                "AdaLayerNormZero(dim) driven by temb"
            )
    require_plain(layer, ("norm1", "norm1_context"))


def _check_single(adapter: CheckedOverride, layer: FluxSingleTransformerBlock) -> None:
    if type(layer.norm) is not AdaLayerNormZeroSingle:
        raise UnsupportedBlockError(
            f"FluxSingleTransformerBlock.norm is {type(layer.norm).__name__}; bac.diffusers expects FLUX's "
            "AdaLayerNormZeroSingle driven by temb"
        )
    require_plain(layer, ("norm",))


def _image_residual(outputs) -> list:
    # What diffusers' FirstBlockCache compares: the image stream's change (hidden_states out minus in),
    # the joint attention's image part, the image FFN and any IP-adapter output; not the text stream.
    attn, ff = outputs[0], outputs[1]
    return [sum(part.float() for part in (attn[0], ff, *attn[2:]))]


def _width(layer) -> int:
    return layer.attn.query_dim


FLUX_DOUBLE_BLOCK = CheckedOverride(
    [("attn", "sa"), ("ff", "ffn"), ("ff_context", "ffn")],
    _double_forward,
    _check_double,
    _width,
    "FluxTransformerBlock (dual stream)",
    _image_residual,
)
FLUX_SINGLE_BLOCK = CheckedOverride(
    [("attn_mlp", "ffn")],
    _single_forward,
    _check_single,
    _width,
    "FluxSingleTransformerBlock (parallel attention + MLP)",
)
