"""Forecast-aware ACS: update steps chosen for the error of the stand-in that will really be used.

ACS scores a skipped step by the error of *reuse*; a Taylor stand-in extrapolates from the last two updates,
so a schedule good for reuse is not the one good for a forecast. Both stand-ins are linear in the computed
features, so the calibration's Gram matrices give the mean squared error of either exactly, and a dynamic
program over (previous update, last update) finds the update steps of least total error, in O(M K^3) per
block. Like ACS it sees each block's own error only (:mod:`bac.refine` sees the output). The derivation:
docs/guide/caching-methods.md ("Forecast-aware ACS").
"""
from __future__ import annotations

import numpy as np

from .checks import check_number
from .errors import ConfigError, DataError

ORDERS = (0, 1)  # stand-ins the dynamic program is exact for: reuse and linear extrapolation


def standin_errors(gram: np.ndarray, order: int) -> np.ndarray:
    """``E[p, u, t]``: squared error per feature of the stand-in at step ``t > u`` after updates ``p < u``.

    Row ``p = K`` is "no earlier update" (only ``u`` computed so far), where every
    stand-in is reuse. For ``order=0`` every row is reuse. Entries outside
    ``p < u < t`` are ``inf``.
    """
    g = _check_gram(gram)
    check_number("order", order, 0, max(ORDERS), integer=True)
    k = g.shape[0]
    diag = np.diag(g)
    errors = np.full((k + 1, k, k), np.inf)
    steps = np.arange(k)
    for u in range(k):
        t = steps[u + 1:]
        reuse = diag[t] + g[u, u] - 2 * g[u, t]
        errors[k, u, u + 1:] = reuse
        if order == 0:
            errors[:u, u, u + 1:] = reuse
            continue
        p = steps[:u, None]
        a = (t[None, :] - u) / (u - p)  # [p, t]: f_t = (1 + a) r_u - a r_p
        errors[:u, u, u + 1:] = (diag[t] + (1 + a) ** 2 * g[u, u] + a**2 * diag[:u, None]
                                 - 2 * (1 + a) * g[t, u] + 2 * a * g[:u][:, t] - 2 * a * (1 + a) * g[u, :u, None])
    return np.maximum(errors, 0.0)  # rounding can dip an exact zero below it


def _segments(errors: np.ndarray) -> np.ndarray:
    """``S[p, u, v]``: summed error of steps ``u+1 .. v-1`` after updates ``(p, u)``; ``v = K`` is the end."""
    k = errors.shape[1]
    finite = np.where(np.isfinite(errors), errors, 0.0)
    csum = np.concatenate([np.zeros((k + 1, k, 1)), np.cumsum(finite, axis=2)], axis=2)  # csum[..., v] = sum_{t<v}
    segments = csum - csum[:, np.arange(k), np.arange(k) + 1][:, :, None]  # minus the sum up to and including u
    v, u = np.arange(k + 1)[None, None, :], np.arange(k)[None, :, None]
    p = np.arange(k + 1)[:, None, None]
    valid = (v > u) & ((p < u) | (p == k))
    return np.where(valid, segments, np.inf)


def _dynamic_program(gram: np.ndarray, order: int, num_updates: int) -> tuple[np.ndarray, list, np.ndarray]:
    """Totals for 1 .. ``num_updates`` updates, the backtracking choices, and the last table."""
    seg = _segments(standin_errors(gram, order))
    k = seg.shape[1]
    table = np.full((k + 1, k), np.inf)  # table[p, u]: least error of steps 0..u, last updates p < u
    table[k, 0] = 0.0  # one update, at step 0
    totals, choices, tables = [], [], [table]
    for m in range(1, num_updates + 1):
        totals.append((table + seg[:, :, k]).min())
        if m == num_updates:
            break
        candidate = table[:, :, None] + seg[:, :, :k]  # [p, u, v]
        choice = np.argmin(candidate, axis=0)  # first minimum: the earliest p
        table = np.full((k + 1, k), np.inf)
        table[:k, :] = np.take_along_axis(candidate, choice[None], axis=0)[0]
        choices.append(choice)
        tables.append(table)
    return np.asarray(totals), choices, tables[-1] + seg[:, :, k]


def forecast_schedule(gram, num_updates: int, order: int = 1) -> list[int]:
    """The ``num_updates`` update steps (step 0 first) of least total squared stand-in error for one block."""
    g = _check_gram(gram)
    check_number("num_updates", num_updates, 1, g.shape[0], integer=True)
    _, choices, final = _dynamic_program(g, order, num_updates)
    p, u = np.unravel_index(np.argmin(final), final.shape)
    steps = [int(u)]
    for choice in reversed(choices):
        steps.append(int(p))
        p, u = choice[p, u], p
    return steps[::-1]


def forecast_errors(gram, order: int = 1) -> np.ndarray:
    """Least total squared stand-in error of one block for every update count ``M = 1 .. K`` (entry ``M - 1``)."""
    g = _check_gram(gram)
    totals, _, _ = _dynamic_program(g, order, g.shape[0])
    return totals


def schedule_error(gram, steps, order: int = 1) -> float:
    """Total squared stand-in error of one block under the given update steps (what the program minimises)."""
    errors = standin_errors(gram, order)
    k = errors.shape[1]
    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[0] != 0 or steps[-1] >= k:
        raise ConfigError(f"update steps must start at 0 and lie in 0..{k - 1}, got {steps}")
    total, previous = 0.0, k
    for u, v in zip(steps, steps[1:] + [k]):
        total += errors[previous, u, u + 1:v].sum()
        previous = u
    return float(total)


def _check_gram(gram) -> np.ndarray:
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise DataError(f"a Gram matrix must be a non-empty square K x K matrix, got shape {g.shape}")
    if not np.isfinite(g).all():
        raise DataError("Gram matrix contains NaN or inf")
    return g
