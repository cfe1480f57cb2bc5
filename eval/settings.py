"""The evaluator's settings: checked before any work starts, and the output folder they name."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bac.configs import CONFIG_DIR
from bac.configs.settings import BOOL, FLOAT, INT, SEQ, STR, check_settings
from bac.errors import ConfigError

from .provenance import DIGEST_SETTINGS, LATER_KEYS, settings_digest

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
    "compile": (STR, None, False), "backend": (STR, None, False),
}


# Upper bounds of the values that size memory or work before any episode runs: generous for real use
# (docs/guide/evaluation.md, "Checked before any work"). A Meta-World env holds about 26 MB: 256 take about 7 GB.
LIMITS = {
    "episodes": 100_000, "num_envs": 256, "max_episode_steps": 10_000, "seed": 2**32 - 1,
    "calibration.samples": 10_000, "calibration.episodes": 10_000, "calibration.seed": 2**32 - 1,
    "latency.repeats": 100_000, "latency.warmup": 10_000, "threads": 1024, "latency.threads": 1024,
    "video_settings.size": 1024, "video_settings.fps": 1000, "shard.count": 100_000, "tolerance_points": 100,
}


def check_eval_settings(cfg: DictConfig) -> None:
    """Kinds and ranges of every setting (:data:`SETTINGS`), then the upper bounds of :data:`LIMITS`."""
    check_settings(cfg, SETTINGS, CONFIG_DIR / "eval.yaml")
    for key, limit in LIMITS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value > limit:
            raise EvalError(f"setting {key} must be <= {limit:g}, got {value!r} (the upper bounds: "
                            "docs/guide/evaluation.md)")


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


# Settings that change a closed-loop run's episodes but are not in its digest (recorded runs differ in them):
# checked against the recorded run.json before a run resumes. num_envs sets the waves, and so the noise.
RECORDED_SETTINGS = ("num_envs",)


def check_recorded_run(cfg: DictConfig, out: Path, digest: str, recorded_settings: tuple[str, ...] = ()) -> None:
    """Refuse to resume a run in ``out`` made with other settings: another digest, or another value of one of
    ``recorded_settings``. The error names each differing setting with both values. Writes nothing."""
    run_file = out / "run.json"
    if not run_file.is_file():
        return
    try:
        recorded = json.loads(run_file.read_text())
        before = dict(recorded["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvalError(f"{run_file} is not a run record ({err}); pick another out_dir, or delete the folder") from err
    now = OmegaConf.to_container(cfg, resolve=True)
    keys = (*DIGEST_SETTINGS, *recorded_settings) if recorded.get("digest") != digest else recorded_settings
    # a run recorded before a later setting existed ran with its default
    before = {key: before.get(key, LATER_KEYS.get(key)) for key in keys}
    changed = [f"{key}={short(before[key])} there, {short(now.get(key))} now" for key in keys
               if before[key] != now.get(key)]
    if recorded.get("digest") != digest or changed:
        raise EvalError(f"{out} holds a run with other settings ({'; '.join(changed) or 'the weights or settings'}"
                        f"): its episodes are not this run's; pick another out_dir (or out_dir=auto)")


def short(value, limit: int = 120) -> str:
    """A setting's value for a message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def claim_out_dir(cfg: DictConfig, out: Path, digest: str, recorded_settings: tuple[str, ...] = ()) -> None:
    """Make ``out`` this run's (``run.json``: settings digest and config); one holding another run's is refused
    (:func:`check_recorded_run`)."""
    check_recorded_run(cfg, out, digest, recorded_settings)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    run_file.write_text(json.dumps({"digest": digest, "config": OmegaConf.to_container(cfg, resolve=True)}, indent=1))
