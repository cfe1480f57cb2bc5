"""Attention profiling: how much attention each key token receives inside one block (ProfilingDiT).

:class:`AttentionProbe` is a ``TorchFunctionMode``: while it is active, every call of torch's attention
functions (``scaled_dot_product_attention``, which diffusers' processors and most attention modules call, and
``multi_head_attention_forward``, which ``nn.MultiheadAttention`` calls) runs as usual and also records, per
sample, the attention each key received: the softmax probabilities averaged over heads and queries, one
``[batch, keys]`` row per call. Any model whose attention goes through these functions can be profiled
without knowing its classes. The probabilities are formed explicitly (``[batch, heads, queries, keys]``),
so profiling costs memory quadratic in the token count: it runs on calibration inputs only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def received_attention(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``[batch, keys]``: the attention each key receives in ``scaled_dot_product_attention(query, key, ...)``,
    the probabilities averaged over heads and queries (each query's row sums to 1, so a row of the result
    sums to 1 too: uniform attention is ``1 / keys`` everywhere)."""
    q, k = query.float(), key.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if is_causal:
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else logits + attn_mask
    probabilities = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a fully masked query attends nowhere
    return probabilities.reshape(probabilities.shape[0], -1, probabilities.shape[-1]).mean(1)


def _sdpa_received(args: tuple, kwargs: dict) -> torch.Tensor:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = {**dict(zip(names, args)), **kwargs}
    return received_attention(bound["query"], bound["key"], bound.get("attn_mask"), bool(bound.get("is_causal")),
                              bound.get("scale"), bool(bound.get("enable_gqa")))


class AttentionProbe(TorchFunctionMode):
    """Record the attention keys receive in every attention call made while active (see the module
    docstring): ``probe.received`` is a list of ``[batch, keys]`` tensors, one per call, in call order."""

    def __init__(self):
        super().__init__()
        self.received: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.received.append(_sdpa_received(args, kwargs).detach())
        elif func is F.multi_head_attention_forward:
            # the caller's call, asked for its weights (under the mode it left the fused kernel anyway, which is
            # why calibration profiles in a pass of its own): handed back as the caller asked
            wanted = kwargs.get("need_weights", True)
            out, weights = func(*args, **{**kwargs, "need_weights": True})
            averaged = weights.mean(1) if weights.dim() == 4 else weights  # per head: [batch, heads, q, keys]
            self.received.append(averaged.float().mean(1).detach())  # [batch, queries, keys] -> [batch, keys]
            return out, weights if wanted else None
        return func(*args, **kwargs)


def attention_focus(received: "list[list[torch.Tensor | None]]") -> "list[tuple[float, int]]":
    """Per block, ProfilingDiT's foreground ratio at one denoising step, summed over samples, and the samples.

    ``received[b]`` is block ``b``'s ``[batch, keys]`` received attention at this step (``None``: the block
    attends nowhere, an FFN). Blocks attending over the same number of keys share a key set (the token
    sequence for self-attention, the conditioning for cross-attention). Per sample, the key set's
    *foreground* is the keys that receive more than uniform attention (``1 / keys``) averaged over every
    block of the set, what the model as a whole attends to; a block's *high-attention* keys are those it
    gives more than uniform attention. Its ratio is ``|high & foreground| / |foreground|`` (the paper's
    R_attn); samples without foreground count nowhere.
    """
    groups: dict[int, list[int]] = {}
    for b, r in enumerate(received):
        if r is not None:
            groups.setdefault(r.shape[-1], []).append(b)
    totals: list[tuple[float, int]] = [(0.0, 0)] * len(received)
    for keys, members in groups.items():
        uniform = 1.0 / keys
        foreground = torch.stack([received[b] for b in members]).mean(0) > uniform  # [batch, keys]
        size = foreground.sum(-1)
        has = size > 0
        for b in members:
            ratio = ((received[b] > uniform) & foreground).sum(-1)[has] / size[has]
            totals[b] = (float(ratio.sum()), int(has.sum()))
    return totals


def call_received(calls: "list[torch.Tensor]") -> torch.Tensor | None:
    """One block call's received attention from its attention calls' (their mean where several share a key
    count; the first key count's where they differ), or ``None`` when it made none."""
    if not calls:
        return None
    same = [c for c in calls if c.shape == calls[0].shape]
    return torch.stack(same).mean(0) if len(same) > 1 else same[0]


__all__ = ["AttentionProbe", "attention_focus", "call_received", "received_attention"]
