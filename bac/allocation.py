"""Sharing a number of updates between blocks: the exact multiple-choice knapsack.

Used by :func:`bac.plan_for_budget` (a latency budget, gains from ACS scores) and by
``forecast-acs`` with ``allocate=True`` (a total update count, gains from each block's
forecast-error curve).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .checks import check_number
from .errors import ConfigError


class BudgetError(ConfigError):
    """No plan fits the latency budget (below the cost of updating every block once)."""


def allocate_updates(gains: Sequence[Sequence[float]], costs: Sequence[int], budget: int) -> list[int]:
    """Update counts ``n_b`` (1 .. K_b) maximising ``sum_b gains[b][n_b - 1]`` with ``sum_b costs[b] * n_b <= budget``.

    Exact: a dynamic program over blocks and integer budgets (a multiple-choice knapsack),
    O(B * K * budget). ``costs`` are positive integers. Ties go to fewer updates on the later
    blocks. Raises :class:`BudgetError` when even one update per block does not fit.
    """
    if len(gains) != len(costs) or not gains:
        raise ConfigError(f"need one gain row and one cost per block, got {len(gains)} and {len(costs)}")
    check_number("budget", budget, 0, integer=True)
    for c in costs:
        check_number("block cost (budget units)", c, 1, integer=True)
    minimum = int(sum(costs))
    if minimum > budget:
        raise BudgetError(f"one update per block costs {minimum} units, over the budget of {budget}")
    best = np.zeros(budget + 1)  # best[g]: the largest score of the blocks so far within g units
    choices = []
    for row, cost in zip(gains, costs):
        row = np.asarray(row, dtype=np.float64)
        candidates = np.full((len(row), budget + 1), -np.inf)
        for m in range(1, len(row) + 1):
            spent = cost * m
            if spent <= budget:
                candidates[m - 1, spent:] = best[: budget + 1 - spent] + row[m - 1]
        choice = np.argmax(candidates, axis=0)  # first maximum: the fewest updates
        best = candidates[choice, np.arange(budget + 1)]
        choices.append(choice)
    counts, g = [], budget
    for choice, cost in zip(reversed(choices), reversed(costs)):
        m = int(choice[g]) + 1
        counts.append(m)
        g -= cost * m
    return counts[::-1]
