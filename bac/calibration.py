"""Calibration data: per-block K x K feature statistics of one model and sampler (made by :func:`bac.calibrate`).

For every block and every pair of steps (a, t), averaged over calibration
samples: cosine similarity, mean absolute difference (L1) and mean squared
difference (MSE) of the block's residual-branch outputs r_a and r_t, and each
block's reuse error. Saved as safetensors with the metadata in the header.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from .adapters import Block
from .fit import check_fits

METRICS = ("cosine", "l1", "mse")


@dataclass(frozen=True)
class Calibration:
    """Per-block K x K feature statistics of one model and sampler."""

    blocks: tuple[Block, ...]
    fingerprint: dict
    num_steps: int
    samples: int
    seed: int
    date: str
    scheduler: str | None
    matrices: dict[str, np.ndarray]  # metric -> [num_blocks, K, K], averaged over samples
    reuse_error: np.ndarray  # [num_blocks]: mean over step pairs a < t of mean |r_a - r_t|

    def matrix(self, metric: str) -> np.ndarray:
        if metric not in self.matrices:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        return self.matrices[metric]

    def check_fits(self, spec, num_steps: int | None = None, scheduler: Any = None) -> None:
        """Raise :class:`bac.PlanMismatchError` naming the first thing that does not fit ``spec`` / the sampler."""
        blocks = [(b.name, b.kind, b.layer) for b in self.blocks]
        check_fits("calibration", self.fingerprint, blocks, self.num_steps, self.scheduler, spec, num_steps, scheduler)

    def facts(self) -> dict:
        """What a plan file records about the calibration it came from."""
        return {"samples": self.samples, "seed": self.seed, "date": self.date}

    def save(self, path: str | Path) -> Path:
        """Save as safetensors (arrays) with the metadata in the header; no pickle."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "blocks": [[b.name, b.kind, b.layer] for b in self.blocks],
            "fingerprint": self.fingerprint,
            "num_steps": self.num_steps,
            "samples": self.samples,
            "seed": self.seed,
            "date": self.date,
            "scheduler": self.scheduler,
        }
        save_file({**self.matrices, "reuse_error": self.reuse_error}, str(path), metadata={"bac": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("bac", "null") or "null")
        if meta is None:
            raise ValueError(f"{path} is not a bac calibration file")
        arrays = load_file(str(path))
        return cls(
            blocks=tuple(Block(n, k, int(l)) for n, k, l in meta["blocks"]),
            fingerprint=meta["fingerprint"],
            num_steps=int(meta["num_steps"]),
            samples=int(meta["samples"]),
            seed=int(meta["seed"]),
            date=meta["date"],
            scheduler=meta["scheduler"],
            matrices={m: arrays[m] for m in METRICS},
            reuse_error=arrays["reuse_error"],
        )
