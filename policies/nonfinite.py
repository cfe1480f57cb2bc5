"""Non-finite actions: the diagnosis a :class:`bac.NonFiniteError` carries, and ``on_nonfinite="hold"``."""
from __future__ import annotations

import torch

from bac.errors import NonFiniteError

from .checkpointing import nonfinite_tensors
from .constants import STATE

ON_NONFINITE = ("raise", "hold")
# Normalised inputs live in [-1, 1] on the training data; this many times that range is no longer an
# unusual observation but a unit error or a broken sensor (named only when the actions come out non-finite).
EXTREME = 1e6


@torch.no_grad()
def nonfinite_error(state: torch.Tensor, actions: torch.Tensor, normalised_state: torch.Tensor,
                    weights: dict[str, torch.Tensor], cached: bool) -> NonFiniteError:
    """Why a chunk is not finite: which samples, which inputs are extreme (``normalised_state``: ``state``
    through the observation normaliser), which ``weights`` are non-finite, whether a cache (``cached``) is on."""
    bad = ~torch.isfinite(actions).flatten(1).all(1)
    samples = bad.nonzero().flatten().tolist()
    parts = [f"policy produced non-finite actions (NaN/inf) for sample(s) {samples[:8]} of {len(bad)}"]
    normalised = normalised_state.abs().nan_to_num(nan=float("inf"))  # 1 = the training range
    extreme = normalised > EXTREME
    if extreme.any():
        dims = extreme.flatten(0, 1).any(0).nonzero().flatten().tolist()
        rows = extreme.flatten(1).any(1).nonzero().flatten().tolist()
        parts.append(f"input {STATE!r} is far outside the training range in sample(s) {rows[:8]}, dims "
                     f"{dims[:8]}: up to {state.abs().max().item():.3g} raw, {normalised.max().item():.3g} "
                     f"times the normaliser's range (limit {EXTREME:g}); check units and sensors")
    else:
        parts.append(f"inputs are finite and within {EXTREME:g} times the training range")
    bad_weights = nonfinite_tensors(weights)
    if bad_weights:
        parts.append(f"NaN/inf in {len(bad_weights)} weight tensor(s) {bad_weights[:6]}: the weights are corrupt")
    else:
        parts.append("every weight is finite")
    if cached:
        parts.append("a bac cache is active on the denoiser: run without it to see whether caching causes this")
    err = NonFiniteError("; ".join(parts))
    err.actions, err.samples = actions, samples
    return err


def hold(err: NonFiniteError, last_action: torch.Tensor | None, events: list[dict]) -> torch.Tensor:
    """``err``'s chunk with each failed sample's rows replaced by that sample's ``last_action``; the event is
    appended to ``events``."""
    if last_action is None:
        raise NonFiniteError(f"{err}; on_nonfinite='hold' has no finite action to hold "
                             "(this is the first chunk since reset())") from err
    chunk = err.actions.clone()
    chunk[err.samples] = last_action[err.samples, None].expand(-1, chunk.shape[1], -1)
    events.append({"samples": list(err.samples), "message": str(err)})
    return chunk
