"""Real-time chunking (RTC): a chunk sampled while the last one still runs, inpainted to continue it.

Black, Galliker and Levine, "Real-Time Execution of Action Chunking Flow Policies" (NeurIPS 2025,
arXiv 2506.07339). While a chunk is sampled the robot keeps executing the previous one, so the first ``delay``
actions of the new chunk will never run: they are *frozen* to the previous chunk's. The rest of the overlap
with the previous chunk is inpainted toward it with a soft mask, by guidance during denoising (training-free):
at each step the denoiser's data prediction is pulled toward the previous chunk through a vector-Jacobian
product, so the new chunk takes over where the old one is, with no jump at the seam.

At step ``i``, on the sample ``x`` entering it (``x = a_i * x0 + b_i * noise``):

* ``x0_hat(x)``: the data the denoiser's output predicts (:meth:`bac.sampling.FusedSampler.predict_x0`);
* ``g = (d x0_hat / d x)^T [W * (Y - x0_hat)]``: one vector-Jacobian product through the denoiser, with ``Y`` the
  previous chunk advanced by ``shift`` executed actions and ``W`` the soft mask (:func:`prefix_weights`);
* the step is taken with the output whose data prediction is ``x0_hat + lambda_i * g``
  (:meth:`~bac.sampling.FusedSampler.shift_output`), ``lambda_i = b_i * min(max_guidance, (a_i^2 + b_i^2) /
  (a_i * b_i))``.

For flow matching (``a = 1 - sigma``, ``b = sigma``) this is the paper's guided velocity ``v + w * g`` with
``w = min(beta, (1 - tau) / (tau * r_tau^2))``, ``r_tau^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)``, exactly. A
variance-preserving sampler (DDPM, DDIM, DPM-Solver++) is the same flow after rescaling the sample by
``1 / (a + b)``; there it is PiGDM's guidance with the same clip. After the last step the frozen actions are set
to the previous chunk's, so they are returned unchanged.

Cost: a guided step is a forward and a backward pass through the denoiser (a DDIM-4 call of the harder suite's
DP-T: 2.4x an unguided one on CPU). With a caching plan, a reused or forecast block value is a constant of the
step (the engine detaches what it keeps): the product runs through the blocks the step computes, so a step that
computes every block is exact and a cached step's guidance is an approximation. docs/guide/real-time-chunking.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from bac.errors import ConfigError

#: the paper's clip on the guidance weight (beta)
DEFAULT_MAX_GUIDANCE = 5.0


@dataclass(frozen=True)
class RealTimeChunking:
    """How a policy view's calls continue the previous chunk: ``max_guidance`` (the paper's beta, the clip on
    the guidance weight; 0: no guidance, only the frozen prefix)."""

    max_guidance: float = DEFAULT_MAX_GUIDANCE

    def __post_init__(self) -> None:
        value = self.max_guidance
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"real-time chunking: max_guidance must be a finite number >= 0, got {value!r}")

    def describe(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        return f"rtc{self.max_guidance:g}"

    def scales(self, fused: Any) -> list[float]:
        """``lambda_i`` for each step of ``fused`` (the module docstring)."""
        out = []
        for i in range(fused.num_steps):
            a, b = fused.scales(i)
            ratio = math.inf if a * b <= 0 else (a * a + b * b) / (a * b)
            out.append(b * min(float(self.max_guidance), ratio))
        return out


def prefix_weights(horizon: int, delay: int, overlap: int) -> torch.Tensor:
    """The soft mask ``W`` ``[horizon]``: 1 on the frozen prefix ``[0, delay)``, then decaying exponentially to 0
    over the rest of the overlap ``[delay, overlap)`` (the paper's eq. 5: ``c_i * (e^c_i - 1) / (e - 1)``,
    ``c_i = (overlap - i) / (overlap - delay + 1)``), 0 past the overlap (actions the last chunk has none for)."""
    if not 0 <= delay <= overlap <= horizon:
        raise ConfigError(f"real-time chunking: need 0 <= delay <= overlap <= horizon, got delay={delay}, "
                          f"overlap={overlap}, horizon={horizon}")
    i = torch.arange(horizon, dtype=torch.float64)
    c = (overlap - i) / (overlap - delay + 1)
    soft = c * torch.expm1(c) / (math.e - 1)
    weights = torch.where(i < delay, torch.ones_like(i), torch.where(i < overlap, soft, torch.zeros_like(i)))
    return weights.to(torch.float32)


#: ``denoise(x) -> model output``: the denoiser's call at the current step on the sample ``x``
Denoise = Callable[[torch.Tensor], torch.Tensor]


class Guide:
    """One call's guidance: ``guide(i, x, denoise) -> model output`` for step ``i`` (see the module docstring).
    ``target`` is the previous chunk advanced by the executed actions ``[B, H, A]`` (normalised), ``weights``
    the soft mask ``[H]``."""

    def __init__(self, target: torch.Tensor, weights: torch.Tensor, fused: Any, scales: list[float]):
        self.target = target
        self.weights = weights.to(target.device)[None, :, None]
        self.fused, self.scales = fused, scales

    def __call__(self, i: int, x: torch.Tensor, denoise: Denoise) -> torch.Tensor:
        scale = self.scales[i]
        if scale == 0:
            return denoise(x)
        with torch.enable_grad():
            sample = x.detach().requires_grad_(True)
            out = denoise(sample)
            x0 = self.fused.predict_x0(i, out, sample)
            error = self.weights * (self.target - x0.detach())
            (pull,) = torch.autograd.grad(x0, sample, grad_outputs=error)
        return self.fused.shift_output(i, out.detach(), scale * pull)


def check_delay(delay: Any) -> int:
    """``delay`` (actions of the previous chunk that still run before the new one takes over) as an int >= 0."""
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ConfigError(f"delay must be a number of actions >= 0 (the frozen prefix), got {delay!r}")
    return int(delay)
