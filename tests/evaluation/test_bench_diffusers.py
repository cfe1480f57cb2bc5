"""The diffusers benchmark end to end on the tiny real pipelines (tiny grid, few steps, one timed round)."""
import copy
import dataclasses
import json
import math

import pytest
import torch

import bac.diffusers
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
    assert {"bac", "taylorseer", "forecast-acs", "fbcache", "ertacache", "ertacache+adjusted", "profiling-dit"} <= families
    assert any(r["skipped_share"] > 0 for r in results if r["family"].startswith("diffusers:TaylorSeerCache/modules"))
    assert model["guidance_calls_per_step"] == 2  # classifier-free guidance as two transformer calls
    check_alternatives(model)
    assert set(model["matched"]) == {str(b) for b in model["budgets"]}
    for budget, summary in model["matched"].items():
        assert {"fastest", "best_project", "best_peer", "best_diffusers", "ratio", "full_computation",
                "fewer_steps", "compile"} <= set(summary)
        for row in summary["fastest"]:
            assert row["rel_l2"] <= float(budget) and row["family"] != "full"
        project, peer, diffusers = summary["best_project"], summary["best_peer"], summary["best_diffusers"]
        if project:
            assert bench.side(project["family"]) == "project"
        if peer:
            assert bench.side(peer["family"]) == "peer" and peer["speedup"] >= (diffusers or peer)["speedup"]
        # a side with nothing within the budget counts as full computation, 1.0x
        assert summary["full_computation"] == [name for name, r in (("project", project), ("peer", peer)) if not r]
        assert summary["ratio"] == pytest.approx((project or {"speedup": 1.0})["speedup"]
                                                 / (peer or {"speedup": 1.0})["speedup"])
        for key, families in (("fewer_steps", {"fewer-steps"}), ("compile", {"compile", "compile+fewer-steps"})):
            within = [r for r in results if r["family"] in families and r["rel_l2"] <= float(budget)]
            assert (summary[key] or {}).get("speedup") == max((r["speedup"] for r in within), default=None)


def check_alternatives(model: dict) -> None:
    """Fewer steps deviate, with the transformer calls they really made; compile computes what eager does;
    cache-dit's DBCache, with and without TaylorSeer, ran."""
    results, full = model["results"], model["results"][0]
    fewer = [r for r in results if r["family"] == "fewer-steps"]
    assert fewer and all(r["rel_l2"] > 0 for r in fewer)
    for r in fewer + [r for r in results if r["family"] == "compile+fewer-steps"]:
        assert r["transformer_calls"] == r["params"]["steps"] * model["guidance_calls_per_step"]
        assert r["skipped_share"] == pytest.approx(1 - r["transformer_calls"] / full["transformer_calls"])
    (compiled,) = [r for r in results if r["family"] == "compile"]
    # compiled against eager float32: fused kernels reorder sums (~1e-6 relative); a skipped step costs 0.04
    assert compiled["rel_l2"] < 1e-4 and compiled["skipped_share"] == 0
    steps = {r["params"]["steps"]: r for r in fewer}
    for r in results:
        if r["family"].startswith("compile"):
            assert r["compilations_while_timed"] == 0  # compiled in the untimed passes only
        if r["family"] == "compile+fewer-steps":
            assert r["rel_l2"] == pytest.approx(steps[r["params"]["steps"]]["rel_l2"], abs=1e-4)
    assert "cache_dit_error" not in model
    assert set(bench.CACHE_DIT_FAMILIES) <= {r["family"] for r in results}
    assert any(r["skipped_share"] > 0 for r in results if r["family"].startswith("cache-dit:"))


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
    assert "| rel. L2 <= | project best | best peer | ratio | fewer steps best | compile best |" in (
        tmp_path / "report.md").read_text()
    assert (tmp_path / "speedup_vs_deviation.png").stat().st_size > 10_000

    # --resume keeps a case recorded with the same options and re-runs it on a changed one
    runs = []

    def bench_model(case, *args, **kwargs):
        runs.append(case.name)
        return copy.deepcopy(model)

    monkeypatch.setattr(bench, "bench_model", bench_model)
    options = ["--models", "wan-pipeline", "--steps", "4", "--grid", "tiny", "--out", str(tmp_path), "--resume"]
    assert bench.main([*options, "--repeats", "1"])["models"] == stored["models"] and runs == []
    assert len(bench.main([*options, "--repeats", "2"])["models"]) == 1 and runs == ["wan-pipeline"]
    assert json.loads((tmp_path / "report.json").read_text())["models"][0]["options"]["repeats"] == 2


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
    taylorseer = [(p["interval"], p["order"], p.get("warmup", 1)) for f, p in grid if f == "taylorseer"]
    assert sorted(t for t in taylorseer if t[2] == 1) == [
        (2, 1, 1), (2, 2, 1), (3, 1, 1), (3, 2, 1), (4, 1, 1), (4, 2, 1), (5, 1, 1), (6, 1, 1)]
    # every phase of the long intervals, and late-skipping schedules for the tightest budget
    assert {(i, w) for i, _, w in taylorseer if 1 < w < 20} == {(i, w) for i in (6, 7, 8, 9) for w in (2, 3, 4)}
    assert {(i, w) for i, _, w in taylorseer if w >= 20} == {(i, w) for i in (2, 3, 4) for w in (20, 25, 30)}
    assert [p["threshold"] for f, p in grid if f == "ertacache" and "terms" not in p] == [0.02, 0.03, 0.05, 0.08, 0.2]
    assert len([1 for f, _ in grid if f == "profiling-dit"]) == 8
    assert all(setting in grid for setting in bench.adjust_grid(case, "full"))
    assert all(setting in grid for setting in bench.refine_grid(50, "full"))
    peers = bench.diffusers_grid(50, "full", case.thresholds)
    assert len(peers["TaylorSeerCache"]) == 14 and len(peers["MagCache"]) == 4 and len(peers["SeaCache"]) == 8
    assert bench.fewer_steps_grid(50, "full") == [10, 15, 20, 25, 30, 35, 40]
    assert bench.fewer_steps_grid(20, "small") == [5, 8, 10, 14] and bench.fewer_steps_grid(4, "tiny") == [2]
    dbcache = bench.cache_dit_grid(50, "full", case.thresholds, blocks=6)
    assert {f for f, _ in dbcache} == set(bench.CACHE_DIT_FAMILIES) and len(dbcache) == 28
    assert all(p["Fn_compute_blocks"] + p["Bn_compute_blocks"] < 2
               for _, p in bench.cache_dit_grid(20, "small", case.thresholds, blocks=2))


def test_cache_dit_leaves_the_dit_as_it_was(one_thread):
    """cache-dit's DiT patch hoists the first block's embedder into the transformer: disabling must undo it,
    or bac's plans (which check the parameters' names and order) refuse the model afterwards."""
    case = bench.CASES["dit-digits"]
    model = case.build(case.config).eval()
    names = [name for name, _ in model.named_parameters()]
    x = case.inputs(0, torch.device("cpu"))
    x = (x[0][:4], {k: v[:4] for k, v in x[1].items()})
    reference = bench.sample(case, model, x, 3)
    bac.diffusers.enable_cache(model, "uniform", interval=2, num_inference_steps=3)  # a hook registry, as in
    bac.diffusers.disable_cache(model)                                              # the benchmark's run
    settings, notes = bench.cache_dit_settings(case, model, model, 3, "tiny")
    assert settings and "cache_dit_error" not in notes
    for setting in settings:
        setting.enable()
        bench.sample(case, model, x, 3)
        setting.disable()
    assert [name for name, _ in model.named_parameters()] == names
    assert torch.equal(bench.sample(case, model, x, 3), reference)
