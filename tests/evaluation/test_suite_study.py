"""The suite study's gathering: the suite rule, the ablation's paired orderings, the seeds table."""
import json

import pytest

from benchmarks import suite_study


def rates(full, few, bac):
    return {"full": full, "ddim-1": few, "ddim-2": few, "ddim-3": few, "bac": bac}


def test_suite_is_the_most_sensitive_learnable_tasks():
    runs = {
        "dpt": {"a": rates(1.0, 1.0, 1.0), "b": rates(0.9, 0.1, 0.5), "c": rates(0.6, 0.0, 0.0),
                "d": rates(0.8, 0.4, 0.8), "e": rates(0.95, 0.2, 0.9)},
        "dit": {"a": rates(1.0, 1.0, 1.0), "b": rates(0.9, 0.3, 0.7), "c": rates(1.0, 0.0, 0.0),
                "d": rates(0.7, 0.5, 0.7), "e": rates(0.9, 0.2, 0.8)},
    }
    choice = suite_study.choose_suite(runs, size=2)
    assert choice["learnable"] == ["a", "b", "d", "e"]  # c is under 70 % at full on dpt
    assert choice["suite"] == ["b", "e"]  # the largest drops, in candidate order
    assert choice["sensitivity"]["a"] == 0.0
    drop = lambda full, few, bac: full - (2 * few + bac) / 3  # DDIM-2, DDIM-3 and bac; DDIM-1 is left out
    assert choice["sensitivity"]["b"] == pytest.approx((drop(0.9, 0.1, 0.5) + drop(0.9, 0.3, 0.7)) / 2)
    assert suite_study.choose_suite(runs, size=10)["suite"] == ["a", "b", "d", "e"]


def write_run(path, outcomes: dict[str, list[bool]], checkpoint="dpt-x", flops=None):
    """A minimal evaluator run: report.json and a shard log of the given per-seed outcomes (task t)."""
    path.mkdir(parents=True)
    flops = flops or {}
    methods = {m: {"speedup": 2.0, "skipped_share": 0.5, "config": {}, "flops_per_call": flops.get(m, 100)}
               for m in outcomes}
    (path / "report.json").write_text(json.dumps({"policy": {"architecture": "dpt", "checkpoint": checkpoint},
                                                  "environment": {"tasks": ["t"]}, "methods": methods}))
    with open(path / "episodes.shard0-of-1.jsonl", "w") as f:
        for method, results in outcomes.items():
            for seed, success in enumerate(results):
                f.write(json.dumps({"task": "t", "method": method, "seed": seed, "success": success}) + "\n")


def test_ablation_orderings_are_paired_per_budget_and_pooled(tmp_path):
    n = 60
    good, bad = [True] * n, [i % 2 == 0 for i in range(n)]
    write_run(tmp_path / "run", {"full": good, "uniform-M5": bad, "acs-M5": good, "bac-M5": good,
                                 "uniform-M10": bad, "acs-M10": good, "bac-M10": bad})
    result, text = suite_study.ablation([tmp_path / "run"])
    entry = result["dpt (dpt-x)"]
    assert list(entry["budgets"]) == ["M5", "M10"]
    m5 = entry["budgets"]["M5"]["orderings"]
    assert m5["acs > uniform"]["mean"] == pytest.approx(0.5) and suite_study._verdict(m5["acs > uniform"]) == "holds"
    assert m5["bac > acs"]["mean"] == 0 and suite_study._verdict(m5["bac > acs"]) == "not separable"
    m10 = entry["budgets"]["M10"]["orderings"]
    assert suite_study._verdict(m10["bac > acs"]) == "reversed"
    pooled = entry["pooled"]["bac > acs"]
    assert pooled["pairs"] == 2 * n and pooled["mean"] == pytest.approx(-0.25)
    assert "unified-acs > acs" not in entry["pooled"]  # no unified-acs in this run
    assert "| acs > uniform |" in text
    assert entry["per_task"]["uniform-M5"]["t"]["rate"] == 0.5 and "| uniform-M5 | 50 (" in text


def test_bac_is_paired_with_the_cheapest_rival_that_costs_at_least_as_much(tmp_path):
    n = 40
    flops = {"uniform-M5": 50, "acs-M5": 50, "bac-M5": 60, "uniform-M10": 100, "acs-M10": 100, "bac-M10": 120}
    write_run(tmp_path / "run", {"full": [True] * n, "uniform-M5": [False] * n, "acs-M5": [False] * n,
                                 "bac-M5": [True] * n, "uniform-M10": [True] * n, "acs-M10": [i % 2 == 0 for i in range(n)],
                                 "bac-M10": [True] * n}, flops=flops)
    entry = suite_study.ablation([tmp_path / "run"])[0]["dpt (dpt-x)"]["equal_compute"]
    assert set(entry) == {"bac-M5 > uniform-M10", "bac-M5 > acs-M10"}  # nothing costs as much as bac-M10
    assert entry["bac-M5 > uniform-M10"]["flops_ratio"] == pytest.approx(100 / 60)
    assert entry["bac-M5 > uniform-M10"]["mean"] == 0 and entry["bac-M5 > acs-M10"]["mean"] == pytest.approx(0.5)


def test_seeds_table_has_one_column_per_seed(tmp_path):
    write_run(tmp_path / "s0", {"full": [True] * 10, "bac-M10": [True] * 9 + [False]}, checkpoint="dpt-seed0")
    write_run(tmp_path / "s1", {"full": [True] * 8 + [False] * 2, "bac-M10": [True] * 8 + [False] * 2},
              checkpoint="dpt-seed1")
    with open(tmp_path / "s0" / "episodes.shard0-of-1.jsonl", "a") as f:  # a task the other run lacks: left out
        f.write(json.dumps({"task": "other", "method": "full", "seed": 0, "success": False}) + "\n")
    report = json.loads((tmp_path / "s0" / "report.json").read_text())
    report["environment"]["tasks"] = ["t", "other"]
    (tmp_path / "s0" / "report.json").write_text(json.dumps(report))
    result, text = suite_study.seeds([tmp_path / "s0", tmp_path / "s1"], ["full", "bac-M10"])
    assert result["dpt-seed0"]["bac-M10"]["success"]["rate"] == 0.9
    assert result["dpt-seed1"]["full"]["success"]["rate"] == 0.8
    assert "| full | 100.0 | 80.0 | 20.0 pts |" in text


def test_blocks_summary_averages_tasks_and_finds_the_worst_block(tmp_path):
    def method(errors, block_max):
        return {"errors": errors, "block_max": block_max, "blocks": ["l0.ffn", "l1.ffn"],
                "mask": [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0]], "action_deviation": {"mean": 0.5}}

    data = {"policy": {"checkpoint": "dpt-x"}, "settings": {"samples": 2}, "tasks": {
        "a": {"methods": {"acs": method([[0, 1, 1, 1, 1], [0, 1, 1, 1, 3]], [1.0, 3.0])}},
        "b": {"methods": {"acs": method([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]], [1.0, 1.0])}}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "block_errors.json").write_text(json.dumps(data))
    result, text = suite_study.blocks([tmp_path / "run"])
    acs = result["dpt-x"]["acs"]
    assert acs["updates"] == 3 and acs["worst_block"] == "l1.ffn" and acs["worst_block_max"] == 2.0
    assert acs["mean_error"] == pytest.approx(18 / 20) and acs["mean_error_last_fifth"] == pytest.approx(6 / 4)
    assert "| acs | 3 |" in text
