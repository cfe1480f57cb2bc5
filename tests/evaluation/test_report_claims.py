"""No claim in the report contradicts the numbers printed beside it: "significant" follows the exact McNemar
test, and where Newcombe's paired interval reads otherwise (possible at small n) the report says so."""
from __future__ import annotations

from bac.evaluation.report import markdown, newcombe_paired, significant, interval_disagrees, verdict, verdict_line


def episodes(outcomes):
    return [{"task": "t", "seed": i, "success": bool(s)} for i, s in enumerate(outcomes)]


def entry(outcomes, reference, speedup):
    from bac.evaluation.report import paired_difference, success_summary

    return {"speedup": speedup, "paired_vs_full": paired_difference(episodes(outcomes), episodes(reference)),
            "success": success_summary(episodes(outcomes))}


# 10 pairs (5 episodes on each of 2 tasks): the reference alone succeeded 5 times, the method alone never.
# The main job printed this as -50.0 (-74.6, -8.2) with McNemar p 0.06.
REFERENCE = [1] * 9 + [0]
SMALL_LOSS = [1] * 4 + [0] * 6


def test_the_small_n_case_is_one_where_the_interval_and_the_exact_test_disagree():
    low, high = newcombe_paired(4, 0, 5, 1)
    paired = entry(SMALL_LOSS, REFERENCE, 2.0)["paired_vs_full"]
    assert paired["ci95"] == [low, high] and high < 0  # the interval excludes 0 ...
    assert 0.05 < paired["mcnemar_p"] < 0.07  # ... the exact test does not reject
    assert interval_disagrees(paired) and not significant(paired)
    agreeing = entry([0] * 10, REFERENCE, 2.0)["paired_vs_full"]  # 9 discordant pairs: both say "different"
    assert significant(agreeing) and not interval_disagrees(agreeing)


def test_the_verdict_says_when_it_calls_a_loss_not_significant_beside_an_interval_that_excludes_zero():
    methods = {"ref": entry(REFERENCE, REFERENCE, 1.0), "acs": entry(SMALL_LOSS, REFERENCE, 2.0)}
    v = verdict(methods, "ref", 2.0)
    (loss,) = v["faster"]
    assert loss["method"] == "acs" and not loss["significant_loss"] and loss["interval_disagrees"]
    line = verdict_line(v)
    assert "McNemar p 0.062 (not significant; its paired interval (-74.6, -8.2) excludes 0" in line
    assert "disagree" in line and "follows the exact test" in line


def test_a_pick_within_the_tolerance_that_is_a_significant_loss_is_never_called_not_significant():
    reference = [1] * 2000
    pick = [0] * 30 + [1] * 1970  # -1.5 points over 2,000 pairs: within 2 points, McNemar p about 2e-9
    v = verdict({"ref": entry(reference, reference, 1.0), "pick": entry(pick, reference, 2.0)}, "ref", 2.0)
    assert v["pick"] == "pick" and not v["lossless_at_95"] and v["significant_loss"] and v["mcnemar_p"] < 0.05
    line = verdict_line(v)
    assert "not significant" not in line and "**significant loss** within the tolerance" in line


def report(methods: dict) -> dict:
    rows = {name: {**m, "config": {"method": name}, "latency": {"p50_ms": 1.0, "p99_ms": 2.0, "hz": 1000.0},
                   "flops_per_call": 1e9, "skipped_share": 0.0} for name, m in methods.items()}
    return {"methods": rows, "reference_method": "ref", "policy": {"checkpoint": "c"},
            "environment": {"tasks": ["t"], "seeds": [100000, 100009], "episodes_per_task": 10},
            "latency_settings": {"threads": 1, "repeats": 3}, "machine": {"platform": "p"},
            "packages": {"torch": "x"}}


def test_the_table_names_rows_whose_interval_and_p_value_disagree_and_only_those():
    methods = {"ref": entry(REFERENCE, REFERENCE, 1.0), "acs": entry(SMALL_LOSS, REFERENCE, 2.0),
               "ddim": entry([0] * 10, REFERENCE, 3.0)}
    text = markdown(report(methods))
    assert "| -50.0 (-74.6, -8.2) | 0.06 |" in text
    (note,) = [line for line in text.splitlines() if "disagree" in line]
    assert note.startswith("acs: ") and "ddim" not in note and "follows the exact McNemar test" in note
    del methods["acs"]
    assert "disagree" not in markdown(report(methods))
