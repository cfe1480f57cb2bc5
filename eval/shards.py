"""One evaluation split over jobs: each shard runs a share of the (task, method) cells, and the last
shard to finish writes the one report of the whole run.

    python -m bac.eval -m shard.index=0,1,2,3 shard.count=4 hydra/launcher=joblib hydra.launcher.n_jobs=2 ...
    python -m bac.eval -m shard.index='range(16)' shard.count=16 hydra/launcher=submitit_slurm ...

Every shard has the settings digest of the unsharded run (``shard`` is not part of it), so all of
them use one output folder. A shard appends its episodes to its own log
(``episodes.shard<i>-of-<n>.jsonl``: no two processes write one file) and resumes from it when
rerun. When a shard finishes and every cell of the run is complete in the logs, it takes
``report.lock`` (created exclusively: one shard wins) and measures latency and writes the report
from the union of the logs. The same command without ``shard`` (``count=1``) reads every log too:
it runs only what no shard finished, so it is also the way to merge by hand, or to finish a run
whose shards died.
"""
from __future__ import annotations

import os
from pathlib import Path

from .closed_loop import read_episodes

MAIN_LOG = "episodes.jsonl"
LOCK = "report.lock"


def shard_cells(cells: list, index: int, count: int) -> list:
    """The contiguous ``index``-th of ``count`` near-equal parts of ``cells`` (task-major order keeps a
    shard on few tasks, so it builds few environments)."""
    if not 0 <= index < count:
        raise ValueError(f"shard.index must be in [0, shard.count), got index {index} of count {count}")
    return [cell for i, cell in enumerate(cells) if i * count // len(cells) == index]


def log_path(out: Path, index: int, count: int) -> Path:
    """Where a shard (or, with ``count=1``, the unsharded run) appends its episodes."""
    return out / MAIN_LOG if count == 1 else out / f"episodes.shard{index}-of-{count}.jsonl"


def all_logs(out: Path) -> list[Path]:
    return sorted({out / MAIN_LOG, *out.glob("episodes.shard*-of-*.jsonl")})


def logged_episodes(out: Path) -> list[dict]:
    """Every complete episode line of every log of the run (the same episode logged twice counts once)."""
    unique = {}
    for path in all_logs(out):
        for episode in read_episodes(path):
            unique.setdefault((episode["task"], episode["method"], episode["seed"]), episode)
    return list(unique.values())


def missing(out: Path, cells: list[tuple[str, str]], seeds: list[int]) -> int:
    """How many (task, method, seed) episodes of ``cells`` no log holds yet."""
    done = {(e["task"], e["method"], e["seed"]) for e in logged_episodes(out)}
    return sum((task, method, seed) not in done for task, method in cells for seed in seeds)


def claim_report(out: Path) -> bool:
    """True for exactly one caller: the shard that writes the report (``report.lock`` created exclusively)."""
    try:
        os.close(os.open(out / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def release_report(out: Path) -> None:
    (out / LOCK).unlink(missing_ok=True)
