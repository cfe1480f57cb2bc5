"""The Adaptive Caching Scheduler is the exact optimum: checked against brute force."""
import itertools

import numpy as np
import pytest

from bac import acs_schedule


def segment_score(matrix, starts):
    k = matrix.shape[0]
    bounds = list(starts) + [k]
    return sum(matrix[a, a:b].sum() for a, b in zip(bounds[:-1], bounds[1:]))


def brute_force(matrix, m, maximize):
    """All schedules; exact ties broken toward the earliest steps compared from the end."""
    k = matrix.shape[0]
    best, best_steps = None, None
    for rest in itertools.combinations(range(1, k), m - 1):
        steps = (0,) + rest
        score = segment_score(matrix, steps)
        better = best is None or (score > best if maximize else score < best)
        tie = best is not None and score == best and steps[::-1] < best_steps[::-1]
        if better or tie:
            best, best_steps = score, steps
    return list(best_steps), best


@pytest.mark.parametrize("maximize", [True, False])
@pytest.mark.parametrize("k", range(1, 9))
def test_matches_brute_force_on_random_matrices(k, maximize):
    rng = np.random.default_rng(k + 100 * maximize)
    for trial in range(6):
        matrix = rng.normal(size=(k, k))
        for m in range(1, k + 1):
            steps = acs_schedule(matrix, m, maximize=maximize)
            expected, best = brute_force(matrix, m, maximize)
            assert steps == expected, (k, m, trial)
            assert np.isclose(segment_score(matrix, steps), best)


@pytest.mark.parametrize("maximize", [True, False])
def test_exact_ties_follow_the_documented_rule(maximize):
    rng = np.random.default_rng(7)
    for k in range(2, 8):
        for _ in range(5):
            matrix = rng.integers(0, 2, size=(k, k)).astype(float)  # many exact ties
            for m in range(1, k + 1):
                assert acs_schedule(matrix, m, maximize) == brute_force(matrix, m, maximize)[0]


def test_constant_matrix_gives_earliest_steps():
    assert acs_schedule(np.ones((10, 10)), 4) == [0, 1, 2, 3]


def test_edge_budgets():
    matrix = np.random.default_rng(0).random((12, 12))
    assert acs_schedule(matrix, 1) == [0]
    assert acs_schedule(matrix, 12) == list(range(12))


def test_prefers_updating_where_similarity_drops():
    # Two regimes: steps 0-5 alike, 6-11 alike, unlike each other.
    k = 12
    matrix = np.full((k, k), -1.0)
    matrix[:6, :6] = 1.0
    matrix[6:, 6:] = 1.0
    assert acs_schedule(matrix, 2) == [0, 6]


def test_accepts_torch_tensors():
    import torch

    matrix = np.random.default_rng(1).random((6, 6))
    assert acs_schedule(torch.tensor(matrix), 3) == acs_schedule(matrix, 3)


@pytest.mark.parametrize(
    "matrix, m, message",
    [
        (np.ones((3, 4)), 2, "square"),
        (np.ones((4, 4)), 0, "num_updates"),
        (np.ones((4, 4)), 5, "num_updates"),
        (np.ones((4, 4)), 2.0, "num_updates"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), 1, "NaN"),
    ],
)
def test_bad_input_is_a_clear_error(matrix, m, message):
    with pytest.raises(ValueError, match=message):
        acs_schedule(matrix, m)
