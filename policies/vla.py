"""What the vision-language-action heads share: images in, the observation prefix, attention and FFN parts.

A VLA head (``policies.gr00t``, ``policies.rdt``, ``policies.pi0``) denoises an action chunk conditioned on a
*prefix*: the tokens of the observation, computed once per policy call and step-independent, so the
denoising loop only runs the head's blocks. :class:`Prefix` holds its three token sets: image tokens
(:class:`ImageEncoder`, trained with the head, on LeRobot's ``[B, 3, H, W]`` images, see
:func:`frames_to_images`; :func:`random_shift` augments in training), the instruction's frozen language
tokens (``policies.language``) and the proprioceptive state as one token. docs/guide/policies.md ("The
prefix, data and training").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .language import TOKEN_DIM

__all__ = ["Attention", "FeedForward", "ImageEncoder", "PreNormLayer", "Prefix", "PrefixEncoder", "VLAHead",
           "frames_to_images", "modulate", "random_shift"]


def frames_to_images(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rendered frames ``[..., H, W, 3]`` uint8 -> LeRobot's images ``[..., 3, H, W]`` float32 in [0, 1]."""
    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [..., H, W, 3], got {frames.dtype} {list(frames.shape)}")
    return frames.movedim(-1, -3).float().div_(255.0)


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ's augmentation: replicate-pad ``[B, C, H, W]`` by ``pad`` pixels, crop each sample back at a random offset."""
    if pad <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device=images.device)
    rows = offsets[:, 0, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(width, device=images.device)   # [B, W]
    index = torch.arange(batch, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` per sample (``shift``/``scale`` ``[B, W]``)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class ImageEncoder(nn.Module):
    """Images ``[B, n_cameras, 3, S, S]`` in [0, 1] -> tokens ``[B, n_cameras * g * g, width]`` (one trunk for all cameras)."""

    def __init__(self, width: int, n_cameras: int, image_size: int):
        super().__init__()
        channels = (32, 64, 128, 128)
        layers, previous = [], 3
        for c in channels:
            layers += [nn.Conv2d(previous, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.GELU()]
            previous = c
        self.trunk = nn.Sequential(*layers)
        grid = image_size
        for _ in channels:
            grid = (grid + 1) // 2
        self.grid = grid
        self.proj = nn.Linear(previous, width)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(1, 1, grid * grid, width))
        self.camera_emb = nn.Parameter(0.02 * torch.randn(1, n_cameras, 1, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, cameras = images.shape[:2]
        features = self.trunk(images.flatten(0, 1) * 2.0 - 1.0)            # [B * n, C, g, g]
        tokens = self.proj(features.flatten(2).transpose(1, 2))             # [B * n, g * g, W]
        tokens = tokens.unflatten(0, (batch, cameras)) + self.pos_emb + self.camera_emb
        return tokens.flatten(1, 2)


@dataclass
class Prefix:
    """The observation's tokens for one policy call: vision ``[B, Nv, W]``, language ``[B, Nl, W]`` with its
    mask ``[B, Nl]`` (True: a real token), state ``[B, 1, W]``; ``extra`` holds what a head derives from them
    once per call (pi0: every layer's keys and values)."""

    vision: torch.Tensor
    language: torch.Tensor
    language_mask: torch.Tensor
    state: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.vision.shape[0]

    def vision_language(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and language tokens in one sequence ``[B, Nv + Nl, W]`` and its key mask ``[B, Nv + Nl]``."""
        visible = torch.ones(self.vision.shape[:2], dtype=torch.bool, device=self.vision.device)
        return torch.cat([self.vision, self.language], 1), torch.cat([visible, self.language_mask], 1)


# its tensors flatten and rebuild (torch.utils._pytree), so a whole-call graph takes them as inputs
torch.export.register_dataclass(Prefix, serialized_type_name="bac.policies.vla.Prefix")


class PrefixEncoder(nn.Module):
    """Observation -> :class:`Prefix`: the image encoder, a projection of the language tokens, a state MLP."""

    def __init__(self, width: int, cameras: Sequence[str], image_size: int, state_dim: int, n_obs_steps: int):
        super().__init__()
        self.cameras = tuple(cameras)
        self.images = ImageEncoder(width, len(self.cameras), image_size)
        self.language = nn.Sequential(nn.LayerNorm(TOKEN_DIM), nn.Linear(TOKEN_DIM, width))
        self.state = nn.Sequential(nn.Linear(n_obs_steps * state_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, observation: dict) -> Prefix:
        """``observation``: ``images [B, n_cameras, 3, S, S]``, ``language [B, L, 384]``, ``language_mask [B, L]``,
        ``state [B, To, D]`` (normalised)."""
        return Prefix(
            vision=self.images(observation["images"]),
            language=self.language(observation["language"]),
            language_mask=observation["language_mask"],
            state=self.state(observation["state"].flatten(1))[:, None],
        )


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A ``[B, N]`` key mask as scaled_dot_product_attention's boolean ``[B, 1, 1, N]``."""
    return None if mask is None else mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention of queries from ``x`` over keys/values (``kv``, or ``x`` itself), SDPA kernels.

    :meth:`keys_values` projects a context once, so a step-independent context (the prefix) costs one
    projection per policy call, not one per denoising step.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, L, W] -> [B, h, L, W / h]

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                extra_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``kv=None``: self-attention. ``extra_kv``: keys/values attended *besides* ``kv`` (pi0's prefix), placed first."""
        q = self._split(self.q(x))
        k, v = self.keys_values(x) if kv is None else kv
        if extra_kv is not None:
            k, v = torch.cat([extra_kv[0], k], 2), torch.cat([extra_kv[1], v], 2)
            if extra_mask is not None:
                own = torch.ones(x.shape[0], k.shape[2] - extra_mask.shape[1], dtype=torch.bool, device=x.device)
                mask = torch.cat([extra_mask, own if mask is None else mask], 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(mask))
        return self.out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                         nn.Linear(4 * width, width))


class PreNormLayer(nn.Module):
    """A pre-RMSNorm attention + FFN layer's parts (``norm1``, ``attn``, ``norm2``, ``mlp``); subclasses wire them."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.mlp = FeedForward(width, dropout)


class VLAHead(nn.Module):
    """What every VLA head has: the observation prefix encoder and the action-token embedding.

    The heads take every field of their typed config (``policies.vla_config.VLAHeadConfig``); ``crop_pad`` is
    the policy's training augmentation and ``dropout`` the FFNs', so neither is used here.
    """

    def __init__(self, action_dim: int, state_dim: int, horizon: int, n_obs_steps: int, width: int,
                 cameras: Sequence[str], image_size: int):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.prefix_encoder = PrefixEncoder(width, cameras, image_size, state_dim, n_obs_steps)
        self.input_emb = nn.Linear(action_dim, width)

    def encode_prefix(self, observation: dict) -> Prefix:
        """The observation's :class:`Prefix`, once per policy call (see :class:`PrefixEncoder`)."""
        return self.prefix_encoder(observation)
