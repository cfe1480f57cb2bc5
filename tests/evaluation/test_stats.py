"""Paired statistics for 0/1 outcomes: exact McNemar and Newcombe's paired interval (method 10)."""
import math
import random

import pytest

from bac.evaluation.report import _hybrid_score, mcnemar_exact, newcombe_paired, paired_difference, wilson


def brute_force_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial p: the probability of tables at most as likely as the observed one."""
    n = b + c
    if n == 0:
        return 1.0
    probability = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(p for p in probability if p <= probability[b] * (1 + 1e-7)))


def test_square_and_add_reproduces_newcombes_published_example():
    """Newcombe (1998, Stat Med 17:873), example (a): 56/70 vs 48/80, method 10: 0.0524 to 0.3339.
    The paired method is the same square-and-add of Wilson limits, with the pairs' correlation."""
    low, high = _hybrid_score(56 / 70, wilson(56, 70), 48 / 80, wilson(48, 80), phi=0.0)
    assert low == pytest.approx(0.0524, abs=1e-4) and high == pytest.approx(0.3339, abs=1e-4)


def test_paired_interval_and_mcnemar_reproduce_a_published_paired_example():
    """Cavo et al. (2012), complete response before/after consolidation: [[59, 6], [16, 80]], n = 161.
    Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8; the expected
    output in the test suite of their R package contingencytables (tests/testthat/test-ch8.R):
    Newcombe square-and-add (method 10) -0.0621 (95% CI -0.1186 to -0.0046), McNemar exact
    conditional P = 0.052479. Here a*d - b*c = 4624 > n/2, so Newcombe's phi adjustment is exercised."""
    low, high = newcombe_paired(59, 6, 16, 80)
    assert low == pytest.approx(-0.1186, abs=5e-5) and high == pytest.approx(-0.0046, abs=5e-5)
    assert mcnemar_exact(6, 16) == pytest.approx(0.052479, abs=5e-7)
    # Without the adjustment (phi from a*d - b*c itself) the limits differ in the fourth decimal.
    p1, p2 = 65 / 161, 75 / 161
    unadjusted = _hybrid_score(p1, wilson(65, 161), p2, wilson(75, 161), (59 * 80 - 6 * 16) / math.sqrt(65 * 96 * 75 * 86))
    assert abs(unadjusted[0] - low) > 5e-4 or abs(unadjusted[1] - high) > 5e-4


def test_all_pairs_agreeing_gives_an_interval_around_zero_with_width():
    for both, neither in [(300, 0), (290, 10), (0, 50), (25, 25)]:
        low, high = newcombe_paired(both, 0, 0, neither)
        assert low < 0 < high and high - low > 0.005
    assert mcnemar_exact(0, 0) == 1.0


@pytest.mark.parametrize("b,c", [(0, 1), (1, 0), (3, 7), (12, 2), (5, 5), (0, 9), (20, 31)])
def test_mcnemar_is_the_exact_binomial(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(brute_force_mcnemar(b, c), rel=1e-9)


def test_swapping_method_and_reference_negates_the_interval():
    for a, b, c, d in [(36, 12, 2, 0), (280, 4, 9, 7), (10, 0, 3, 1), (1, 0, 0, 0)]:
        low, high = newcombe_paired(a, b, c, d)
        swapped = newcombe_paired(a, c, b, d)
        assert swapped == pytest.approx([-high, -low], abs=1e-12)


def test_interval_contains_the_difference_and_stays_in_range():
    rng = random.Random(0)
    tables = [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 50, 0, 0), (0, 0, 50, 0),
              (300, 0, 0, 0), (0, 0, 0, 300), (1, 1, 7, 12)]  # n = 1, all success, all failure, 0 < ad-bc <= n/2
    tables += [tuple(rng.randint(0, 40) for _ in range(4)) for _ in range(300)]
    for a, b, c, d in tables:
        if a + b + c + d == 0:
            continue
        low, high = newcombe_paired(a, b, c, d)
        diff = (b - c) / (a + b + c + d)
        assert -1.0 <= low <= diff <= high <= 1.0 and high > low


def test_more_discordance_on_one_side_moves_the_interval():
    assert newcombe_paired(280, 0, 12, 8)[1] < 0  # the reference alone succeeded 12 times: clearly worse
    assert newcombe_paired(280, 2, 4, 14)[0] < 0 < newcombe_paired(280, 2, 4, 14)[1]


def test_paired_difference_on_episodes():
    def episodes(outcomes):
        return [{"task": "push", "seed": i, "success": s} for i, s in enumerate(outcomes)]

    method = episodes([1, 1, 0, 1, 0, 1])
    reference = episodes([1, 0, 0, 1, 1, 1])
    d = paired_difference(method, reference)
    assert (d["both_succeeded"], d["only_method_succeeded"], d["only_reference_succeeded"], d["both_failed"]) == (3, 1, 1, 1)
    assert d["pairs"] == 6 and d["mean"] == 0.0 and d["ci_method"] == "newcombe-10"
    assert d["ci95"] == pytest.approx(newcombe_paired(3, 1, 1, 1)) and d["mcnemar_p"] == 1.0
    assert paired_difference(method, episodes([]))["pairs"] == 0


def test_vla_summary_pairs_swapped_instructions_with_the_right_ones(tmp_path):
    """The cross-head summary: per-task success at full computation, and the swapped-instruction run paired
    episode by episode with the held-out one (only full-computation episodes count)."""
    import json

    from benchmarks.vla_summary import markdown, summarize_head

    def write(run, successes, extra_method=False):
        run.mkdir()
        lines = [{"task": t, "method": "full", "seed": s, "success": ok, "steps": 5}
                 for t, outcomes in successes.items() for s, ok in enumerate(outcomes)]
        if extra_method:  # another method's episodes are not the head's full-computation success
            lines += [{"task": "faucet-open", "method": "bac", "seed": 0, "success": False, "steps": 5}]
        (run / "episodes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    write(tmp_path / "vla-gr00t", {"faucet-open": [True, True, True, False], "faucet-close": [True, False, False, False]},
          extra_method=True)
    write(tmp_path / "vla-gr00t-swapped", {"faucet-open": [False, True, False, False],
                                           "faucet-close": [False, False, False, False]})
    report = {"policy": {"checkpoint": "gr00t-metaworld"}, "sampler": {"kind": "flow", "steps": 4},
              "environment": {"tasks": ["faucet-open", "faucet-close"]},
              "prefix": {"share_of_reference": 0.25}, "methods": {"full": {"latency": {"p50_ms": 10.0}}}}
    (tmp_path / "vla-gr00t" / "report.json").write_text(json.dumps(report))
    summary = summarize_head(tmp_path, "gr00t")
    assert summary["per_task"]["faucet-open"]["successes"] == 3 and summary["success"]["episodes"] == 8
    assert summary["mean_over_tasks"] == pytest.approx((0.75 + 0.25) / 2)
    paired = summary["swapped"]["paired_vs_right_instruction"]
    assert (paired["both_succeeded"], paired["only_method_succeeded"], paired["only_reference_succeeded"]) == (1, 0, 3)
    assert paired["mean"] == pytest.approx(-3 / 8)
    assert summarize_head(tmp_path, "rdt") is None
    assert "| gr00t, swapped | 25 " in markdown({"gr00t": summary, "rdt": None})
