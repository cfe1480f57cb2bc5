"""The evaluator's settings: checked before any work starts, and the output folder they name."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bac.configs import CONFIG_DIR
from bac.configs.settings import BOOL, FLOAT, INT, SEQ, STR, check_settings
from bac.errors import ConfigError

from .provenance import settings_digest

UNTRAINED = "untrained:"


class EvalError(ConfigError):
    """A bad evaluation setting: reported as one clear line and exit status 2."""


# Checked before any work starts (bac.configs.settings.check_settings); the policy and methods check their own fields.
SETTINGS = {
    "checkpoint": (STR, None, False), "untrained_tasks": (SEQ, None, False), "tasks": (SEQ, None, False),
    "episodes": (INT, 0, False), "seed": (INT, 0, False), "max_episode_steps": (INT, 1, True),
    "num_envs": (INT, 1, False), "sampler.kind": (STR, None, True), "sampler.steps": (INT, 1, True),
    "instructions": (STR, None, False),
    "M": (INT, 1, False), "n": (INT, 0, False), "run_methods": (SEQ, None, False),
    "calibration.samples": (INT, 1, False), "calibration.seed": (INT, 0, False),
    "calibration.episodes": (INT, 1, False), "calibration.recompute": (BOOL, None, False),
    "tolerance_points": (FLOAT, 0, False), "threads": (INT, 1, True),
    "latency.repeats": (INT, 1, False), "latency.warmup": (INT, 0, False), "latency.threads": (INT, 1, False),
    "device": (STR, None, False), "plan_cache": (STR, None, False), "video": (BOOL, None, False),
    "video_settings.size": (INT, 16, False), "video_settings.fps": (INT, 1, False),
    "out_dir": (STR, None, False), "progress": (BOOL, None, False), "tuned": (STR, None, True),
    "mode": (STR, None, False), "realtime.clock": (STR, None, False), "realtime.blend": (INT, 0, False),
    "realtime.on_late": (STR, None, False), "realtime.execute_steps": (INT, 1, True),
    "realtime.adapt_lead": (BOOL, None, False), "shard.index": (INT, 0, False), "shard.count": (INT, 1, False),
}


def check_eval_settings(cfg: DictConfig) -> None:
    check_settings(cfg, SETTINGS, CONFIG_DIR / "eval.yaml")


def apply_threads(cfg: DictConfig) -> None:
    """``threads``: torch's intra-op threads for everything the run computes but the batch-1 latency
    (``latency.threads``); null keeps torch's default (``OMP_NUM_THREADS``, else one per core)."""
    threads = cfg.get("threads")
    if threads is not None:
        torch.set_num_threads(int(threads))


def output_dir(cfg: DictConfig, kind: str = "eval", digest: str | None = None) -> Path:
    """``out_dir``, or with ``auto`` ``outputs/<kind>/<checkpoint>-<settings digest>`` (one folder per run)."""
    if cfg.out_dir != "auto":
        return Path(cfg.out_dir)
    name = str(cfg.checkpoint).replace(UNTRAINED, "untrained-").rstrip("/").split("/")[-1]
    return Path("outputs") / kind / f"{name}-{digest or settings_digest(cfg)}"


def claim_out_dir(cfg: DictConfig, out: Path, digest: str) -> None:
    """Make ``out`` this run's (``run.json``: settings digest and config); one holding another run's is refused."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()).get("digest") != digest:
        raise EvalError(f"{out} holds a run with other settings; pick another out_dir (or out_dir=auto)")
    run_file.write_text(json.dumps({"digest": digest, "config": OmegaConf.to_container(cfg, resolve=True)}, indent=1))
