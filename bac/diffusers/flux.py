"""Adapters for FLUX's dual-stream and single-stream blocks.

Dual-stream ``FluxTransformerBlock`` (three branches, in execution order):

* ``attn`` (kind ``sa``): the joint attention over text and image tokens with
  both streams' adaLN-Zero modulation and gates. It updates both streams, so
  its cached feature is the tuple ``(gate_msa * image_out, c_gate_msa * text_out)``
  (plus the IP-adapter output when an IP-adapter processor returns one; it is
  added to the image stream after the FFN, as diffusers does).
* ``ff`` (kind ``ffn``): ``gate_mlp * ff(norm2(h) * (1 + scale_mlp) + shift_mlp)`` on the image stream.
* ``ff_context`` (kind ``ffn``): the same on the text stream with the context modulation.

Each stream's six modulation vectors (``norm1.linear`` / ``norm1_context.linear``
of ``temb``) are computed by the first branch of the layer that needs them.

Single-stream ``FluxSingleTransformerBlock``: one branch ``attn_mlp`` (kind
``ffn``). diffusers runs attention and MLP in parallel on the same normalised
input and mixes them in ONE linear layer, ``proj_out(cat([attn, mlp]))``;
splitting that matmul into an attention part and an MLP part would change the
arithmetic (and the result bits), so the whole parallel block is one branch:
``gate * proj_out(cat([attn(x), mlp(x)]))`` with ``x`` the modulated norm of the
concatenated ``[text; image]`` stream (one tensor for both streams). Its kind is
``ffn`` because its MLP path (``proj_mlp``, GELU, ``proj_out``) has no
normalisation between its linear layers, which is what BUA's bubbling rule
keys on: a single block's schedule bubbles up into the selected upstream blocks.

Dual blocks (``transformer_blocks``) are registered, and run, before the single
blocks (``single_transformer_blocks``), so layer numbers follow execution order.
fp16 clipping is reproduced where diffusers applies it (after each block).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.normalization import AdaLayerNormZero
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from ._common import CheckedOverride, Lazy, UnsupportedBlockError, require_plain


def _modulation(norm: AdaLayerNormZero, temb):
    # AdaLayerNormZero.forward(x, emb=temb), without normalising x: same modules, same ops.
    emb = norm.linear(norm.silu(temb))
    return emb.chunk(6, dim=1)  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _attn(layer: FluxTransformerBlock, hidden_states, encoder_hidden_states, mod, c_mod, image_rotary_emb, kwargs):
    shift_msa, scale_msa, gate_msa = mod()[:3]
    norm_hidden_states = layer.norm1.norm(hidden_states) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    c_shift_msa, c_scale_msa, c_gate_msa = c_mod()[:3]
    norm_encoder_hidden_states = (
        layer.norm1_context.norm(encoder_hidden_states) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
    )
    attention_outputs = layer.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **kwargs,
    )
    if len(attention_outputs) == 2:
        attn_output, context_attn_output = attention_outputs
        extra = ()
    elif len(attention_outputs) == 3:
        attn_output, context_attn_output, ip_attn_output = attention_outputs
        extra = (ip_attn_output,)
    else:
        raise RuntimeError(f"FluxTransformerBlock.attn returned {len(attention_outputs)} outputs; expected 2 or 3")
    return (gate_msa.unsqueeze(1) * attn_output, c_gate_msa.unsqueeze(1) * context_attn_output) + extra


def _ff(norm, ff, hidden_states, mod):
    shift_mlp, scale_mlp, gate_mlp = mod()[3:]
    norm_hidden_states = norm(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return gate_mlp.unsqueeze(1) * ff(norm_hidden_states)


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

    outputs = attn(_attn, layer, hidden_states, encoder_hidden_states, mod, c_mod, image_rotary_emb,
                   joint_attention_kwargs)

    hidden_states = hidden_states + outputs[0]
    hidden_states = hidden_states + ff(_ff, layer.norm2, layer.ff, hidden_states, mod)
    if len(outputs) == 3:
        hidden_states = hidden_states + outputs[2]

    encoder_hidden_states = encoder_hidden_states + outputs[1]
    encoder_hidden_states = encoder_hidden_states + ff_context(
        _ff, layer.norm2_context, layer.ff_context, encoder_hidden_states, c_mod
    )
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_branch(layer: FluxSingleTransformerBlock, hidden_states, temb, image_rotary_emb, joint_attention_kwargs):
    norm_hidden_states, gate = layer.norm(hidden_states, emb=temb)
    mlp_hidden_states = layer.act_mlp(layer.proj_mlp(norm_hidden_states))
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn_output = layer.attn(
        hidden_states=norm_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **joint_attention_kwargs,
    )
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    gate = gate.unsqueeze(1)
    return gate * layer.proj_out(hidden_states)


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
    hidden_states = residual + attn_mlp(_single_branch, layer, hidden_states, temb, image_rotary_emb,
                                        joint_attention_kwargs)
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
    require_plain(layer)


def _width(layer) -> int:
    return layer.attn.query_dim


FLUX_DOUBLE_BLOCK = CheckedOverride(
    [("attn", "sa"), ("ff", "ffn"), ("ff_context", "ffn")],
    _double_forward,
    _check_double,
    _width,
    "FluxTransformerBlock (dual stream)",
)
FLUX_SINGLE_BLOCK = CheckedOverride(
    [("attn_mlp", "ffn")],
    _single_forward,
    _check_single,
    _width,
    "FluxSingleTransformerBlock (parallel attention + MLP)",
)
