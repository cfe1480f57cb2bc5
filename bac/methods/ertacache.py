"""ERTACache (arXiv 2508.21091): a profiled step schedule for the whole model, rectified cached residuals,
and an adjusted integration interval at cached steps.

Three parts, each from the calibration (:class:`bac.Calibration`) or a run on calibration inputs:

1. **Offline residual profiling picks the reused steps.** Every block shares one schedule (the whole model is
   cached, so reusing every block's residual is reusing the model's total residual). Step ``t`` reuses the
   last computed step ``c`` while the profiled relative L2 distance of the whole residual,
   ``sqrt(sum_b |r_b,t - r_b,c|^2 / sum_b |r_b,t|^2)`` (exact from the calibration's Gram matrices), stays
   within ``threshold``; the first ``warmup`` steps are computed.
2. **Closed-form residual linearisation rectifies the feature shift.** At a reused step ``t`` each block's
   stand-in is ``a * r_c + b * r_p`` (its last two computed values), with ``(a, b)`` the least-squares fit
   of ``r_t`` over the calibration samples: the 2 x 2 normal equations of the Gram matrix, in closed form
   (``terms=1``: ``a * r_c`` alone; ``terms=0``: plain reuse). The fits travel in the plan file
   (``params["rectification"]``) and make its :class:`bac.Linear` stand-in.
3. **Timestep adjustment against step amplification** (:func:`bac.adjust_timesteps`): the cached model runs
   its own trajectories on calibration inputs; at each cached step the denoiser output ``v`` is scaled by
   ``s = <v_full, v> / <v, v>``, the least-squares factor toward the full model's output at the same
   sample. In a flow-matching Euler step ``x + (sigma_next - sigma) * s * v`` this is exactly the integration
   interval scaled by ``s``; in DDIM with epsilon prediction, the interval of DDIM's ODE in its own
   variables; for other predictions and multistep solvers, a scaled model output. The scales travel in the
   plan file (``params["step_scales"]``) and the engine applies them to the denoiser's output.

The paper's code and method section could not be read here; this is the design as its abstract and README
state it, with every fit exact on the calibration (docs/guide/caching-methods.md, "ERTACache").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import check_number
from ..errors import ConfigError
from .registry import register_method, same_steps

RIDGE = 1e-9  # relative to the Gram diagonal: keeps the 2 x 2 fit solvable when two computed values are collinear


@dataclass(frozen=True)
class ERTACacheParams:
    threshold: float = 0.1  # profiled relative L2 of the whole residual that forces a computed step
    warmup: int = 1  # leading steps computed in full
    terms: int = 2  # rectification: 0 plain reuse, 1 a * r_c, 2 a * r_c + b * r_p

    def __post_init__(self):
        check_number("threshold", self.threshold, 0.0)
        check_number("warmup", self.warmup, 1, integer=True)
        check_number("terms", self.terms, 0, 2, integer=True)


def profiled_steps(gram: np.ndarray, threshold: float, warmup: int) -> list[int]:
    """The computed steps: the first ``warmup``, then each step whose whole-residual relative L2 distance
    from the last computed one (from the per-block Gram matrices ``[blocks, K, K]``) exceeds ``threshold``."""
    energy = np.einsum("btt->t", gram)  # sum over blocks of |r_t|^2 (per element)
    steps = []
    for t in range(gram.shape[1]):
        if t < warmup or not steps:
            steps.append(t)
            continue
        c = steps[-1]
        distance = gram[:, t, t].sum() + gram[:, c, c].sum() - 2 * gram[:, c, t].sum()
        if np.sqrt(max(distance, 0.0) / max(energy[t], 1e-30)) > threshold:
            steps.append(t)
    return steps


def rectification(gram: np.ndarray, steps: list[int], terms: int) -> list[dict[str, list]]:
    """Per block, per reused step ``t``: ``[c, a, b]`` minimising the calibration's mean
    ``|r_t - a r_c - b r_p|^2`` (``c``, ``p``: the last two computed steps before ``t``)."""
    fits = []
    for g in gram:
        block = {}
        for t in range(gram.shape[1]):
            if t in steps:
                continue
            earlier = [s for s in steps if s < t][-terms:][::-1]  # c, then p
            if not earlier:
                continue
            c = earlier[0]
            lhs = g[np.ix_(earlier, earlier)]
            lhs = lhs + RIDGE * np.trace(lhs) * np.eye(len(earlier))
            coefficients = np.linalg.solve(lhs, g[earlier, t]) if lhs[0, 0] > 0 else np.zeros(len(earlier))
            a, b = (float(coefficients[0]), float(coefficients[1]) if len(earlier) > 1 else 0.0)
            block[str(t)] = [c, a, b]
        fits.append(block)
    return fits


@register_method("ertacache", ERTACacheParams, needs_calibration=True)
def ertacache(params, spec, num_steps, calibration):
    """ERTACache: a profiled whole-model step schedule, with cached residuals rectified in closed form."""
    gram = calibration.gram_matrices()
    steps = profiled_steps(gram, params.threshold, params.warmup)
    if params.terms == 0:
        return same_steps(spec.blocks, steps), None
    fits = rectification(gram, steps, params.terms)
    if not all(np.isfinite(v).all() for block in fits for v in map(np.asarray, block.values())):
        raise ConfigError("ertacache: the calibration's Gram matrices gave a non-finite rectification")
    fitted = {"rectification": {b.name: fit for b, fit in zip(spec.blocks, fits) if fit}}
    return same_steps(spec.blocks, steps), None, fitted
