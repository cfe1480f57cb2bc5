"""Adapter for Wan's ``WanTransformerBlock``.

Three branches (``sa``, ``ca``, ``ffn``), each handing on what diffusers adds to the stream, with diffusers'
float32 additions and casts reproduced exactly; gates are applied outside the runner (``runner.gated``).
The branches: docs/guide/diffusers.md ("What the adapters cache").
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from ._common import CheckedOverride, Lazy, require_plain


def _modulation(scale_shift_table, temb):
    if temb.ndim == 4:
        # temb: batch_size, seq_len, 6, inner_dim (wan2.2 ti2v)
        chunks = (scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        return tuple(chunk.squeeze(2) for chunk in chunks)
    # temb: batch_size, 6, inner_dim
    return (scale_shift_table + temb.float()).chunk(6, dim=1)


def _sa(layer: WanTransformerBlock, hidden_states, mod: Lazy, rotary_emb):
    shift_msa, scale_msa = mod()[:2]
    norm_hidden_states = (layer.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    return layer.attn1(norm_hidden_states, None, None, rotary_emb)


def _ca(layer: WanTransformerBlock, hidden_states, encoder_hidden_states):
    norm_hidden_states = layer.norm2(hidden_states.float()).type_as(hidden_states)
    return layer.attn2(norm_hidden_states, encoder_hidden_states, None, None)


def _ffn(layer: WanTransformerBlock, hidden_states, mod: Lazy):
    c_shift_msa, c_scale_msa = mod()[3:5]
    norm_hidden_states = (layer.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
        hidden_states
    )
    return layer.ffn(norm_hidden_states)


def _forward(
    layer: WanTransformerBlock,
    runners,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary_emb: torch.Tensor,
) -> torch.Tensor:
    """``WanTransformerBlock.forward`` with each gated branch routed through its runner."""
    sa, ca, ffn = runners
    mod = Lazy(_modulation, layer.scale_shift_table, temb)
    sa_gate = lambda output: output * mod()[2]  # noqa: E731  (as diffusers multiplies)
    ffn_gate = lambda output: output.float() * mod()[5]  # noqa: E731
    hidden_states = (hidden_states.float() + sa.gated(sa_gate, _sa, layer, hidden_states, mod, rotary_emb)).type_as(
        hidden_states)
    hidden_states = hidden_states + ca(_ca, layer, hidden_states, encoder_hidden_states)
    hidden_states = (hidden_states.float() + ffn.gated(ffn_gate, _ffn, layer, hidden_states, mod)).type_as(
        hidden_states)
    return hidden_states


def _check(adapter: CheckedOverride, layer: WanTransformerBlock) -> None:
    require_plain(layer)


def _width(layer: WanTransformerBlock) -> int:
    return layer.scale_shift_table.shape[-1]


WAN_BLOCK = CheckedOverride(
    [("sa", "sa"), ("ca", "ca"), ("ffn", "ffn")], _forward, _check, _width, "WanTransformerBlock"
)
