"""Sharded evaluation: shards split the (task, method) cells, one report of every shard's episodes,
the same numbers as one unsharded run; launched by Hydra's joblib and submitit (local) launchers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bac.evaluation import shards
from bac.evaluation.closed_loop import read_episodes
from bac.evaluation.run import run
from bac.evaluation.settings import EvalError

from .test_eval import REPO, config


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_shards_partition_the_cells_into_contiguous_near_equal_parts():
    cells = [(task, method) for task in "abc" for method in ("full", "bac", "acs", "uniform")]
    for count in (1, 2, 3, 5, 12, 13):
        parts = [shards.shard_cells(cells, i, count) for i in range(count)]
        assert [cell for part in parts for cell in part] == cells  # disjoint, complete, in order
        sizes = [len(part) for part in parts]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="shard.index"):
        shards.shard_cells(cells, 2, 2)


def episodes_by_key(path: Path) -> dict:
    return {(e["task"], e["method"], e["seed"]): e for e in read_episodes(path)}


def test_shards_write_one_report_equal_to_an_unsharded_run(checkpoint, tmp_path):
    methods = "run_methods=[full,uniform,bac]"
    first = run(config(checkpoint, tmp_path, methods, "shard.index=0", "shard.count=2"))
    out = tmp_path / "out"
    assert first["shard"] == {"index": 0, "count": 2, "episodes_left": 9}  # push x 3 methods x 3 seeds
    assert not (out / "report.json").exists()
    merged = run(config(checkpoint, tmp_path, methods, "shard.index=1", "shard.count=2"))
    assert (out / "report.json").exists() and not (out / shards.LOCK).exists()
    logs = {p.name for p in out.glob("episodes*.jsonl")}
    assert logs == {"episodes.shard0-of-2.jsonl", "episodes.shard1-of-2.jsonl"}
    assert {e["task"] for e in read_episodes(out / "episodes.shard0-of-2.jsonl")} == {"reach"}

    whole = run(config(checkpoint, tmp_path / "whole", methods))
    sharded = episodes_by_key(out / "episodes.shard0-of-2.jsonl") | episodes_by_key(out / "episodes.shard1-of-2.jsonl")
    assert sharded == episodes_by_key(tmp_path / "whole" / "out" / "episodes.jsonl")
    for name in ("full", "uniform", "bac"):
        assert merged["methods"][name]["success"] == whole["methods"][name]["success"]
        assert merged["methods"][name]["per_task"] == whole["methods"][name]["per_task"]

    # A shard run again repeats nothing; the unsharded command reads every shard's log and only reports.
    before = (out / "episodes.shard0-of-2.jsonl").read_bytes()
    run(config(checkpoint, tmp_path, methods, "shard.index=0", "shard.count=2"))
    assert (out / "episodes.shard0-of-2.jsonl").read_bytes() == before
    again = run(config(checkpoint, tmp_path, methods))
    assert not (out / "episodes.jsonl").exists() or not read_episodes(out / "episodes.jsonl")
    assert again["methods"]["bac"]["success"] == whole["methods"]["bac"]["success"]


def test_bad_shard_settings_are_refused(checkpoint, tmp_path):
    with pytest.raises(EvalError, match="shard.index"):
        run(config(checkpoint, tmp_path, "run_methods=[full]", "shard.index=2", "shard.count=2"))
    with pytest.raises(EvalError, match="without episodes"):
        run(config(checkpoint, tmp_path, "run_methods=[full]", "episodes=0", "shard.index=0", "shard.count=2"))
    with pytest.raises(EvalError, match="unsharded"):
        run(config(checkpoint, tmp_path, "+methods.matched={budget: {match: bac}}", "run_methods=[bac,matched]",
                   "shard.index=0", "shard.count=2"))


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_hydra_multirun_of_shards_writes_the_report(checkpoint, tmp_path, launcher):
    out = tmp_path / "out"
    overrides = [
        f"checkpoint={checkpoint}", "tasks=[reach,push]", "episodes=2", "num_envs=2", "max_episode_steps=12",
        "sampler.steps=4", "M=2", "n=2", "calibration.samples=4", "calibration.episodes=3", "methods=default", "run_methods=[full,bac]",
        "latency.repeats=2", "latency.warmup=0", f"out_dir={out}", "progress=false",
        f"plan_cache={Path(checkpoint).parent / 'plans'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "shard.index=0,1", "shard.count=2", f"hydra/launcher={launcher}",
    ]
    if launcher == "joblib":
        overrides.append("hydra.launcher.n_jobs=2")
    else:  # submitit's local executor: one process per shard, as on a Slurm cluster
        overrides += ["hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"]
    done = subprocess.run([sys.executable, "-m", "bac.eval", "-m", *overrides], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {name: m["success"]["episodes"] for name, m in report["methods"].items()} == {"full": 4, "bac": 4}
    assert len(list(out.glob("episodes.shard*-of-2.jsonl"))) == 2
