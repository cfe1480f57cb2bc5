"""Adapter for diffusers' ``BasicTransformerBlock`` in DiT's configuration (``norm_type="ada_norm_zero"``).

Every branch (``sa``, ``ca`` where the block has cross-attention, ``ffn``) hands on its gated residual; the
gate is applied outside the runner (``runner.gated``), and the adaLN-Zero modulation is computed by the first
branch of the layer that runs, so a fully reused layer skips it too. Every other ``norm_type``,
``only_cross_attention`` and ``double_self_attention`` are refused. The branches, what is supported, and
when to pass ``adapters_for(model)``: docs/guide/diffusers.md ("What the adapters cache").
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.normalization import AdaLayerNormZero
from diffusers.utils import logging

from ._common import CheckedOverride, Lazy, UnsupportedBlockError, require_plain

logger = logging.get_logger("diffusers.models.attention")


def _modulation(norm1: AdaLayerNormZero, timestep, class_labels, hidden_dtype):
    # AdaLayerNormZero.forward, without normalising x: same modules, same ops.
    emb = norm1.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = norm1.linear(norm1.silu(emb))
    return emb.chunk(6, dim=1)  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _sa(layer: BasicTransformerBlock, hidden_states, modulation: Lazy, attention_mask, cross_attention_kwargs):
    shift_msa, scale_msa = modulation()[:2]
    norm_hidden_states = layer.norm1.norm(hidden_states) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    if layer.pos_embed is not None:
        norm_hidden_states = layer.pos_embed(norm_hidden_states)
    return layer.attn1(
        norm_hidden_states, encoder_hidden_states=None, attention_mask=attention_mask, **cross_attention_kwargs
    )


def _ca(layer: BasicTransformerBlock, hidden_states, encoder_hidden_states, encoder_attention_mask, kwargs):
    norm_hidden_states = layer.norm2(hidden_states)
    if layer.pos_embed is not None:
        norm_hidden_states = layer.pos_embed(norm_hidden_states)
    return layer.attn2(
        norm_hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs
    )


def _ffn(layer: BasicTransformerBlock, hidden_states, modulation: Lazy):
    shift_mlp, scale_mlp = modulation()[3:5]
    norm_hidden_states = layer.norm3(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    if layer._chunk_size is not None:
        return _chunked_feed_forward(layer.ff, norm_hidden_states, layer._chunk_dim, layer._chunk_size)
    return layer.ff(norm_hidden_states)


def _gate(modulation: Lazy, index: int):
    # gate * output, as diffusers computes it; the modulation is computed only if something needs it
    return lambda output: modulation()[index].unsqueeze(1) * output


def _forward(
    layer: BasicTransformerBlock,
    runners,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    timestep: torch.LongTensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    class_labels: torch.LongTensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``BasicTransformerBlock.forward`` for ``norm_type="ada_norm_zero"``, one runner per branch."""
    if cross_attention_kwargs is not None:
        if cross_attention_kwargs.get("scale", None) is not None:
            logger.warning("Passing `scale` to `cross_attention_kwargs` is deprecated. `scale` will be ignored.")
    modulation = Lazy(_modulation, layer.norm1, timestep, class_labels, hidden_states.dtype)
    cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
    gligen_kwargs = cross_attention_kwargs.pop("gligen", None)

    sa = runners[0]
    hidden_states = sa.gated(_gate(modulation, 2), _sa, layer, hidden_states, modulation, attention_mask,
                             cross_attention_kwargs) + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if gligen_kwargs is not None:
        hidden_states = layer.fuser(hidden_states, gligen_kwargs["objs"])

    if layer.attn2 is not None:
        ca = runners[1]
        hidden_states = (
            ca(_ca, layer, hidden_states, encoder_hidden_states, encoder_attention_mask, cross_attention_kwargs)
            + hidden_states
        )

    ffn = runners[-1]
    hidden_states = ffn.gated(_gate(modulation, 5), _ffn, layer, hidden_states, modulation) + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


def _check(adapter: CheckedOverride, layer: BasicTransformerBlock) -> None:
    cross = any(kind == "ca" for _, kind in adapter.branches)
    if layer.norm_type != "ada_norm_zero":
        raise UnsupportedBlockError(
            f"bac.diffusers reproduces BasicTransformerBlock only with norm_type='ada_norm_zero' (DiT), "
            f"not norm_type={layer.norm_type!r}; declare your own adapter with "
            "bac.register_adapter(BasicTransformerBlock, ...) or adapters={BasicTransformerBlock: ...}"
        )
    if layer.only_cross_attention or layer.double_self_attention:
        raise UnsupportedBlockError(
            "bac.diffusers does not support BasicTransformerBlock with only_cross_attention or "
            "double_self_attention (its attention branches would change kind)"
        )
    if type(layer.norm1) is not AdaLayerNormZero or layer.norm1.emb is None:
        raise UnsupportedBlockError(
            f"BasicTransformerBlock.norm1 is {type(layer.norm1).__name__} without its own timestep/class "
            "embedding; bac.diffusers expects DiT's AdaLayerNormZero(dim, num_embeds_ada_norm)"
        )
    if (layer.attn2 is not None) != cross:
        has = "has cross-attention (attn2)" if layer.attn2 is not None else "has no cross-attention"
        raise UnsupportedBlockError(
            f"this BasicTransformerBlock {has} but the adapter in use declares branches "
            f"{[key for key, _ in adapter.branches]}; pass adapters=bac.diffusers.adapters_for(model) "
            "to bac.describe / bac.calibrate / bac.make_plan / bac.accelerate"
        )
    require_plain(layer, ("norm1",))


def _width(layer: BasicTransformerBlock) -> int:
    return layer.dim


BASIC_BLOCK = CheckedOverride(
    [("sa", "sa"), ("ffn", "ffn")], _forward, _check, _width, "BasicTransformerBlock (ada_norm_zero, DiT)"
)
BASIC_BLOCK_WITH_CA = CheckedOverride(
    [("sa", "sa"), ("ca", "ca"), ("ffn", "ffn")],
    _forward,
    _check,
    _width,
    "BasicTransformerBlock (ada_norm_zero with cross-attention)",
)


def basic_block_adapter(layer: BasicTransformerBlock) -> CheckedOverride:
    """The adapter that reproduces ``layer`` (raises :class:`UnsupportedBlockError` if none does)."""
    adapter = BASIC_BLOCK_WITH_CA if getattr(layer, "attn2", None) is not None else BASIC_BLOCK
    adapter.check(layer)
    return adapter
