"""The Adaptive Caching Scheduler: the exact dynamic program over one block's step similarity."""
from __future__ import annotations

import numpy as np

from .checks import check_number
from .errors import DataError


def acs_schedule(similarity, num_updates: int, maximize: bool = True) -> list[int]:
    """The exact Adaptive Caching Scheduler on one K x K matrix.

    Chooses update steps 0 = c_1 < ... < c_M (M = ``num_updates``) that
    maximise (or, with ``maximize=False`` for a distance, minimise) the total
    score sum_m sum_{t=c_m}^{c_{m+1}-1} S[c_m, t], by dynamic programming in
    O(M K^2). ``M = 1`` gives ``[0]``; ``M = K`` gives every step.

    Ties: among exactly equal optimal schedules the result has the earliest
    last update step, then the earliest second-to-last, and so on (it is the
    smallest when the step lists are compared from their ends); e.g. a constant
    matrix gives ``[0, 1, ..., M-1]``.
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise DataError(f"similarity must be a non-empty square K x K matrix, got shape {s.shape}")
    check_number("num_updates", num_updates, 1, s.shape[0], integer=True)
    _, choices = _dynamic_program(s, num_updates, maximize)
    steps, i = [], s.shape[0] - 1
    for choice in reversed(choices):
        i = int(choice[i])
        steps.append(i + 1)
    return [0] + steps[::-1]


def acs_scores(similarity, maximize: bool = True) -> np.ndarray:
    """The optimal ACS score of one block for every update count: entry ``M - 1`` is the total score of
    ``acs_schedule(similarity, M)`` (negated for a distance, so larger is always better), for M = 1 .. K.

    One pass of the same dynamic program (its value after each added segment), O(K^3). What a
    budget allocator trades between blocks (:func:`bac.plan_for_budget`).
    """
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise DataError(f"similarity must be a non-empty square K x K matrix, got shape {s.shape}")
    values, _ = _dynamic_program(s, s.shape[0], maximize)
    return values


def _dynamic_program(s: np.ndarray, num_updates: int, maximize: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """ACS's table for 1 .. ``num_updates`` segments: the optimal total score for each count (larger is
    better) and, per added segment, the argmax choices that backtracking reads."""
    if not np.isfinite(s).all():
        raise DataError("similarity matrix contains NaN or inf")
    k = s.shape[0]
    score = s if maximize else -s
    prefix = np.cumsum(score, axis=1)
    # cost[a, b] = sum_{t=a..b} score[a, t] for b >= a; -inf marks an empty segment.
    before = np.concatenate([[0.0], prefix[np.arange(1, k), np.arange(k - 1)]])
    cost = np.where(np.triu(np.ones((k, k), dtype=bool)), prefix - before[:, None], -np.inf)
    best = cost[0].copy()  # best[i]: steps 0..i covered by m segments, the last ending at i
    values, choices = [best[-1]], []
    for _ in range(1, num_updates):
        # candidate[j, i]: m-1 segments cover 0..j, the new one covers j+1..i.
        candidate = best[:-1, None] + cost[1:, :]
        choice = np.argmax(candidate, axis=0)  # first maximum: the smallest j
        best = np.concatenate([[-np.inf], candidate[choice[1:], np.arange(1, k)]])
        choices.append(choice)
        values.append(best[-1])
    return np.asarray(values), choices
