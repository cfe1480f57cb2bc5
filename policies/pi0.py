"""A pi0-style action expert (after pi0's flow-matching action expert), written from the paper's description.

pi0 runs a vision-language model over the prefix once per policy call and keeps every layer's keys and
values; its action expert, of the same depth, attends in each layer to that layer's prefix keys/values and
to its own tokens. Here the "VLM" is a small bidirectional transformer trained with the expert
(:class:`Pi0PrefixLayer`; no VLM weights are installable); :meth:`Pi0Head.encode_prefix` runs it once per
call and stores every layer's keys/values in ``Prefix.extra["kv"]``, so the denoising loop only runs the
expert. The flow-matching time enters through an MLP over [action, time] (no adaLN); pre-RMSNorm branches;
10 Euler steps by default, as pi0. docs/guide/policies.md ("pi0-style").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bac

from .dpt import SinusoidalEmbedding
from .vla import PreNormLayer, Prefix, VLAHead, key_mask


class Pi0PrefixLayer(PreNormLayer):
    """One layer of the prefix transformer (the VLM's role); also gives the keys/values the expert reads."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        h = self.norm1(x)
        q = self.attn._split(self.attn.q(h))
        k, v = self.attn.keys_values(h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(mask))
        x = x + self.attn.out(out.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x)), (k, v)


class Pi0ExpertLayer(PreNormLayer):
    """One layer of the action expert: attention over the prefix and its own tokens, then the FFN."""

    def sa(self, x: torch.Tensor, prefix_kv, prefix_mask) -> torch.Tensor:
        """Attention of the expert's tokens over [this layer's prefix keys/values, their own]."""
        return self.attn(self.norm1(x), extra_kv=prefix_kv, extra_mask=prefix_mask)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, prefix_kv, prefix_mask) -> torch.Tensor:
        x = x + self.sa(x, prefix_kv, prefix_mask)
        return x + self.ffn(x)


bac.register_adapter(Pi0ExpertLayer, bac.BranchAttributes({"sa": "sa", "ffn": "ffn"}))


class Pi0Head(VLAHead):
    """Velocity predictor ``(noisy actions [B, H, A], timestep, Prefix) -> [B, H, A]``."""

    def __init__(self, action_dim: int, state_dim: int, horizon: int, n_obs_steps: int, width: int = 128,
                 num_layers: int = 6, heads: int = 4, dropout: float = 0.0, cameras=("corner3",),
                 image_size: int = 84, crop_pad: int = 4):
        super().__init__(action_dim, state_dim, horizon, n_obs_steps, width, cameras, image_size)
        self.prefix_pos_emb = nn.Parameter(0.02 * torch.randn(1, 1, width))  # marks the prefix stream
        self.prefix_layers = nn.ModuleList(Pi0PrefixLayer(width, heads, dropout) for _ in range(num_layers))
        self.time_emb = SinusoidalEmbedding(width)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, 1 + horizon, width))
        self.layers = nn.ModuleList(Pi0ExpertLayer(width, heads, dropout) for _ in range(num_layers))
        self.norm_out = nn.RMSNorm(width, eps=1e-6)
        self.head = nn.Linear(width, action_dim)

    def encode_prefix(self, observation: dict) -> Prefix:
        """The prefix, run through the prefix transformer: every layer's keys/values in ``prefix.extra``."""
        prefix = super().encode_prefix(observation)
        tokens, mask = prefix.vision_language()
        x, kv = tokens + self.prefix_pos_emb, []
        for layer in self.prefix_layers:
            x, layer_kv = layer(x, mask)
            kv.append(layer_kv)
        prefix.extra.update(kv=kv, mask=mask)
        return prefix

    def prepare(self, prefix: Prefix, timesteps: torch.Tensor) -> list[dict]:
        """Per step: ``{"time": the sinusoidal time embedding [B, W]}`` (the prefix keys/values are in ``prefix``)."""
        times = self.time_emb(timesteps.to(prefix.vision.device))
        return [{"time": t[None].expand(prefix.batch, -1)} for t in times]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float, prefix: Prefix,
                prepared: dict | None = None) -> torch.Tensor:
        if prepared is None:
            batch = sample.shape[0]
            timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
            prepared = {"time": self.time_emb(timestep)}
        if "kv" not in prefix.extra:
            raise ValueError("Pi0Head needs a prefix from its own encode_prefix (with the per-layer keys/values)")
        time = prepared["time"][:, None].expand(-1, self.horizon, -1)
        actions = self.action_time_mlp(torch.cat([self.input_emb(sample), time], -1))
        x = torch.cat([prefix.state, actions], 1) + self.pos_emb
        for layer, kv in zip(self.layers, prefix.extra["kv"]):
            x = layer(x, kv, prefix.extra["mask"])
        return self.head(self.norm_out(x[:, 1:]))
