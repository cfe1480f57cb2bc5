"""What runtimes share with the policies without loading a model: the observation-history rule."""
from __future__ import annotations

import torch


def next_history(history: torch.Tensor | None, state: torch.Tensor, n_obs_steps: int) -> torch.Tensor:
    """The last ``n_obs_steps`` observations ``[B, n_obs_steps, D]`` once ``state`` ``[B, D]`` arrives; after a
    reset (``history`` is None) the first observation repeated, as training windows are padded. The one rule
    for every runtime that keeps a history (``select_action``, the control loop, the policy server)."""
    if history is None:
        return state[:, None].expand(-1, n_obs_steps, -1).clone()
    return torch.cat([history[:, 1:], state[:, None]], dim=1)
