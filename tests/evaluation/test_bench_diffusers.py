"""The diffusers benchmark end to end on the tiny real pipelines (tiny grid, few steps, one timed round)."""
import dataclasses
import json
import math

import pytest

from benchmarks import bench_diffusers as bench

PEERS = ["diffusers:FirstBlockCache", "diffusers:TaylorSeerCache/blocks", "diffusers:TaylorSeerCache/modules",
         "diffusers:MagCache"]


def check_model(model: dict) -> None:
    results = model["results"]
    for r in results:
        assert r["finite"], r["setting"]
        assert all(math.isfinite(r[k]) for k in ("rel_l2", "speedup", "skipped_share")), r["setting"]
        assert 0 <= r["skipped_share"] <= 1 and r["speedup"] > 0 and r["latency"]["repeats"] == 1
    full = results[0]
    assert full["family"] == "full" and full["rel_l2"] == 0 and full["speedup"] == 1 and full["skipped_share"] == 0
    families = {r["family"] for r in results}
    assert set(PEERS) <= families and "magcache_error" not in model
    assert {"bac", "taylorseer", "forecast-acs", "fbcache"} <= families
    assert any(r["skipped_share"] > 0 for r in results if r["family"].startswith("diffusers:TaylorSeerCache/modules"))
    assert model["guidance_calls_per_step"] == 2  # classifier-free guidance as two transformer calls
    assert set(model["matched"]) == {str(b) for b in model["budgets"]}
    for budget, summary in model["matched"].items():
        assert {"fastest", "best_project", "best_diffusers", "ratio"} <= set(summary)
        for row in summary["fastest"]:
            assert row["rel_l2"] <= float(budget) and row["family"] != "full"
        project, peer = summary["best_project"], summary["best_diffusers"]
        if project and peer:
            assert not project["family"].startswith("diffusers:") and peer["family"].startswith("diffusers:")
            assert summary["ratio"] == pytest.approx(project["speedup"] / peer["speedup"])
        else:
            assert summary["ratio"] is None


def test_wan_pipeline_report(tmp_path, one_thread, monkeypatch):
    # refinement on the first calibration input, so that the refined family's path runs too
    case = dataclasses.replace(bench.CASES["wan-pipeline"], refine_inputs=lambda inputs: inputs[:1])
    monkeypatch.setitem(bench.CASES, "wan-pipeline", case)
    report = bench.main(["--models", "wan-pipeline", "--steps", "4", "--repeats", "1", "--grid", "tiny",
                         "--out", str(tmp_path)])
    (model,) = report["models"]
    check_model(model)
    assert model["pipeline"] == "WanPipeline" and "seacache_error" not in model
    assert "diffusers:SeaCache" in {r["family"] for r in model["results"]}
    (refined,) = [r for r in model["results"] if r["family"] == "taylorseer+refined"]
    info = refined["refinement"]
    assert info["seconds"] > 0 and info["deviation_after"] <= info["deviation_before"] and info["candidates"] >= 1
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["models"][0]["matched"].keys() == model["matched"].keys()
    assert "Best of this project against the best of diffusers' caches" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "speedup_vs_deviation.png").stat().st_size > 10_000


def test_flux_pipeline_records_what_cannot_run(one_thread):
    """FluxPipeline passes no step or noise level to cache_context: SeaCache would compute everything."""
    model = bench.bench_model(bench.CASES["flux-pipeline"], steps=4, repeats=1, device=bench.torch.device("cpu"),
                              seed=0, log=lambda line: None, grid="tiny")
    check_model(model)
    assert "fail-open" in model["seacache_error"]
    assert "diffusers:SeaCache" not in {r["family"] for r in model["results"]}


def test_dit_digits_grid():
    case = bench.CASES["dit-digits"]
    assert case.budgets == (0.015, 0.04, 0.10) and case.grid == "full" and case.refine_inputs is not None
    grid = bench.bac_grid(case, 50, "full")
    assert [p["M"] for f, p in grid if f == "bac"] == [8, 12, 20]
    assert [(p["M"], p.get("allocate", False)) for f, p in grid if f == "forecast-acs"] == [
        (10, False), (17, False), (25, False), (17, True)]
    assert sorted((p["interval"], p["order"]) for f, p in grid if f == "taylorseer") == [
        (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1)]
    assert all(setting in grid for setting in bench.refine_grid(50, "full"))
    peers = bench.diffusers_grid(50, "full", case.thresholds)
    assert len(peers["TaylorSeerCache"]) == 14 and len(peers["MagCache"]) == 4 and len(peers["SeaCache"]) == 8
