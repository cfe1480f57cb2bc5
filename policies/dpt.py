"""DP-T: the transformer denoiser of Diffusion Policy (Chi et al., 2023), written from the paper.

Condition tokens (a sinusoidal timestep token plus one token per observation step) pass through an MLP
condition encoder; the decoder is a stack of pre-norm layers with the parameters of PyTorch's
``nn.TransformerDecoderLayer``: causal self-attention, cross-attention to the condition, a GELU FFN. The
condition is encoded once per call (:meth:`TransformerForDiffusion.prepare`), and each residual branch is a
method computed by a pure function (:data:`BRANCHES`), bit-identical to PyTorch's layer without
``nn.MultiheadAttention``'s per-call argument handling, which :meth:`TransformerForDiffusion.compile_blocks`
compiles. docs/guide/policies.md ("DP-T") and docs/guide/core.md ("The per-call executor and compilation").
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import bac
from bac.graphs import CUDA_GRAPH_MODES


class SinusoidalEmbedding(nn.Module):
    """Diffusion Policy's timestep embedding; frequencies precomputed once."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * (-math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, E] -> [B, heads, L, E / heads]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, d] -> [B, L, heads * d]."""
    return x.transpose(1, 2).flatten(2)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # F.dropout is the identity outside training, but still costs a call per branch at batch 1
    return F.dropout(x, p, True) if training and p > 0 else x


def self_attention(x, norm_w, norm_b, eps: float, in_w, in_b, out_w, out_b, heads: int, causal: bool,
                   attn_dropout: float, dropout: float, training: bool):
    """Pre-norm self-attention branch of ``nn.TransformerDecoderLayer`` (``norm1``, ``self_attn``, ``dropout1``)."""
    h = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)
    q, k, v = (_heads(p, heads) for p in F.linear(h, in_w, in_b).chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_dropout if training else 0.0, is_causal=causal)
    return _dropout(F.linear(_merge(out), out_w, out_b), dropout, training)


def cross_attention(x, memory, norm_w, norm_b, eps: float, in_w, in_b, out_w, out_b, heads: int,
                    attn_dropout: float, dropout: float, training: bool):
    """Pre-norm cross-attention branch (``norm2``, ``multihead_attn`` over ``memory``, ``dropout2``)."""
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), norm_w, norm_b, eps)
    q = _heads(F.linear(h, in_w[:width], in_b[:width]), heads)
    k, v = (_heads(p, heads) for p in F.linear(memory, in_w[width:], in_b[width:]).chunk(2, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_dropout if training else 0.0)
    return _dropout(F.linear(_merge(out), out_w, out_b), dropout, training)


def feed_forward(x, norm_w, norm_b, eps: float, w1, b1, w2, b2, dropout: float, training: bool):
    """Pre-norm GELU FFN branch (``norm3``, ``linear1``, ``dropout``, ``linear2``, ``dropout3``)."""
    h = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)
    h = _dropout(F.gelu(F.linear(h, w1, b1)), dropout, training)
    return _dropout(F.linear(h, w2, b2), dropout, training)


BRANCHES = SimpleNamespace(self_attention=self_attention, cross_attention=cross_attention, feed_forward=feed_forward)
_COMPILED: dict[tuple, SimpleNamespace] = {}


def compiled_branches(**options) -> SimpleNamespace:
    """``torch.compile``\\ d :data:`BRANCHES`, made once per set of options (``mode``, ``backend``, ...)."""
    key = tuple(sorted(options.items()))
    if key not in _COMPILED:
        compiled = {name: torch.compile(fn, fullgraph=True, dynamic=False, **options)
                    for name, fn in vars(BRANCHES).items()}
        if options.get("mode") in CUDA_GRAPH_MODES:
            compiled = {name: _cloned(fn) for name, fn in compiled.items()}
        _COMPILED[key] = SimpleNamespace(**compiled)
    return _COMPILED[key]


def _cloned(fn):
    """``fn`` returning a copy: a CUDA graph's output is overwritten by the graph's next replay, and the
    cache keeps a block's output across steps (seen on an H200: "accessing tensor output of CUDAGraphs
    that has been overwritten by a subsequent run"). PyTorch's remedy is cloning outside the graph."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs).clone()

    return call


class DecoderLayer(nn.TransformerDecoderLayer):
    """A pre-norm GELU ``nn.TransformerDecoderLayer`` (same parameters, same names, same values) whose
    residual branches are the methods :meth:`sa`, :meth:`ca` and :meth:`ffn` (see the module docstring)."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__(width, heads, 4 * width, dropout=dropout, activation="gelu", batch_first=True,
                         norm_first=True)
        self.heads, self.causal = heads, causal
        self.branches = BRANCHES

    def sa(self, x: torch.Tensor) -> torch.Tensor:
        a, norm = self.self_attn, self.norm1
        return self.branches.self_attention(x, norm.weight, norm.bias, norm.eps, a.in_proj_weight, a.in_proj_bias,
                                            a.out_proj.weight, a.out_proj.bias, self.heads, self.causal, a.dropout,
                                            self.dropout1.p, self.training)

    def ca(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        a, norm = self.multihead_attn, self.norm2
        return self.branches.cross_attention(x, memory, norm.weight, norm.bias, norm.eps, a.in_proj_weight,
                                             a.in_proj_bias, a.out_proj.weight, a.out_proj.bias, self.heads,
                                             a.dropout, self.dropout2.p, self.training)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm3
        return self.branches.feed_forward(x, norm.weight, norm.bias, norm.eps, self.linear1.weight, self.linear1.bias,
                                          self.linear2.weight, self.linear2.bias, self.dropout.p, self.training)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.sa(x)
        x = x + self.ca(x, memory)
        return x + self.ffn(x)


bac.register_adapter(DecoderLayer, bac.BranchAttributes({"sa": "sa", "ca": "ca", "ffn": "ffn"}))


class TransformerForDiffusion(nn.Module):
    """Epsilon predictor ``(noisy actions [B, H, A], timestep, condition [B, To, C]) -> [B, H, A]``."""

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int = 16,
        n_obs_steps: int = 2,
        width: int = 256,
        num_layers: int = 8,
        heads: int = 4,
        dropout: float = 0.1,
        causal_attn: bool = True,
    ):
        super().__init__()
        self.horizon, self.action_dim, self.cond_dim, self.n_obs_steps = horizon, action_dim, cond_dim, n_obs_steps
        self.input_emb = nn.Linear(action_dim, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, width))
        self.time_emb = SinusoidalEmbedding(width)
        self.cond_obs_emb = nn.Linear(cond_dim, width)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, width))
        self.cond_encoder = nn.Sequential(nn.Linear(width, 4 * width), nn.Mish(), nn.Linear(4 * width, width))
        # nn.TransformerDecoder only holds the layers (its state-dict names): forward loops over them directly.
        self.decoder = nn.TransformerDecoder(DecoderLayer(width, heads, dropout, causal_attn), num_layers)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, action_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, name) is not None:
                    nn.init.normal_(getattr(module, name), std=0.02)
            for name in ("in_proj_bias", "bias_k", "bias_v"):
                if getattr(module, name) is not None:
                    nn.init.zeros_(getattr(module, name))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def compile_blocks(self, enable: bool = True, **options) -> "TransformerForDiffusion":
        """Compute every layer's branches with ``torch.compile``\\ d functions (``enable=False``: eager again).

        ``options`` go to ``torch.compile`` (``mode="reduce-overhead"`` adds CUDA graphs on a GPU).
        """
        branches = compiled_branches(**options) if enable else BRANCHES
        for layer in self.decoder.layers:
            layer.branches = branches
        return self

    def _encode(self, time_tokens: torch.Tensor, obs_tokens: torch.Tensor) -> torch.Tensor:
        return self.cond_encoder(torch.cat([time_tokens, obs_tokens], dim=1) + self.cond_pos_emb)

    def prepare(self, cond: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The condition encoder's output for every step of one sampling call: ``[K, B, 1 + To, width]``.

        One encoder pass over the K timestep tokens and the observation tokens (the encoder is
        position-wise); pass ``prepared=result[i]`` with the i-th timestep.
        """
        steps, batch = timesteps.shape[0], cond.shape[0]
        pos = self.cond_pos_emb[0]
        time_tokens = self.time_emb(timesteps.to(cond.device)) + pos[0]
        obs_tokens = (self.cond_obs_emb(cond) + pos[1:]).flatten(0, 1)
        encoded = self.cond_encoder(torch.cat([time_tokens, obs_tokens]))
        time_part = encoded[:steps, None, None].expand(steps, batch, 1, -1)
        obs_part = encoded[steps:].unflatten(0, (batch, -1))[None].expand(steps, -1, -1, -1)
        return torch.cat([time_part, obs_part], dim=2)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, cond: torch.Tensor,
                prepared: torch.Tensor | None = None) -> torch.Tensor:
        if prepared is None:
            batch = sample.shape[0]
            timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
            memory = self._encode(self.time_emb(timestep)[:, None], self.cond_obs_emb(cond))
        else:
            memory = prepared
        x = self.input_emb(sample) + self.pos_emb
        for layer in self.decoder.layers:
            x = layer(x, memory)
        return self.head(self.ln_f(x))
