"""Calibration data: per-block K x K feature statistics of one model and sampler (made by :func:`bac.calibrate`).

For every block and every pair of steps, averaged over calibration samples: the cosine similarity, L1 and
MSE of the block's residual-branch outputs, each block's reuse error, and the Gram matrix from which the
error of any linear stand-in follows exactly (:mod:`bac.forecast`). Saved as safetensors with the metadata
in the header, including the digest of the weights it was recorded on (:meth:`Calibration.check_fits`
refuses other weights unless ``allow_other_weights``); older files without the Gram matrix or the digest
load, unchecked. docs/guide/caching-methods.md ("Block-wise Adaptive Caching").
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from .adapters import KINDS, Block
from .errors import ConfigError, PlanMismatchError
from .files import write_atomic
from .fit import check_made_for

METRICS = ("cosine", "l1", "mse")


def reuse_errors(l1: np.ndarray) -> np.ndarray:
    """Each block's reuse error: the mean L1 distance over step pairs a < t of its ``[blocks, K, K]`` L1 matrix."""
    k = l1.shape[1]
    upper = np.triu_indices(k, 1)
    return l1[:, upper[0], upper[1]].mean(axis=1) if k > 1 else np.zeros(l1.shape[0])


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
    gram: np.ndarray | None = None  # [num_blocks, K, K]: mean over samples of <r_a, r_t> / D
    timesteps: np.ndarray | None = None  # [K]: the sampler's timesteps, where known (bac.diffusers.calibrate)
    # [num_blocks]: ProfilingDiT's foreground ratio of each block's attention, NaN where a block attends nowhere
    # (calibrate(..., attention=True))
    focus: np.ndarray | None = None

    def for_timesteps(self, timesteps) -> "Calibration":
        """The statistics of the calibrated steps at ``timesteps``: a sampler with fewer steps on the same grid.

        A 50-step DDIM calibration covers 25 or 10 steps (their timesteps are among its own); FLUX's
        flow-matching sigmas for 14 steps are among those for 28. Each kept step's statistics come from the
        calibrated trajectory at the same timestep, an approximation of the shorter sampler's own (it takes
        larger steps). Raises :class:`bac.PlanMismatchError` when the timesteps are unknown or not covered.
        """
        if self.timesteps is None:
            raise PlanMismatchError("this calibration does not record its sampler's timesteps (a bare transformer, "
                                    "or an older file): calibrate at this step count instead")
        wanted = np.asarray(timesteps, dtype=np.float64).reshape(-1)
        known = self.timesteps
        index = [int(np.argmin(np.abs(known - t))) for t in wanted]
        covered = all(abs(known[i] - t) <= 1e-4 * max(1.0, abs(t)) for i, t in zip(index, wanted))
        if not wanted.size or not covered or any(b <= a for a, b in zip(index, index[1:])):
            raise PlanMismatchError(
                f"the {len(wanted)} timesteps of this call ({np.round(wanted[:6], 3).tolist()}...) are not among the "
                f"{len(known)} calibrated ones ({np.round(known[:6], 3).tolist()}...): calibrate at "
                f"{len(wanted)} steps")
        grid = np.ix_(range(len(self.blocks)), index, index)
        matrices = {m: a[grid] for m, a in self.matrices.items()}
        return replace(self, num_steps=len(index), matrices=matrices, reuse_error=reuse_errors(matrices["l1"]),
                       gram=None if self.gram is None else self.gram[grid], timesteps=known[index])

    def gram_matrices(self) -> np.ndarray:
        """The per-block Gram matrices; a clear error for a calibration recorded without them."""
        if self.gram is None:
            raise PlanMismatchError("this calibration has no Gram matrices (recorded by an older bac): "
                                    "recalibrate with bac.calibrate to plan forecast-aware methods")
        return self.gram

    def matrix(self, metric: str) -> np.ndarray:
        if metric not in self.matrices:
            raise ConfigError(f"unknown metric {metric!r}; expected one of {METRICS}")
        return self.matrices[metric]

    @property
    def weights(self) -> str | None:
        """Digest of the weights this was recorded on (``None`` for files from before bac recorded it)."""
        return self.fingerprint.get("weights")

    def check_fits(self, spec, num_steps: int | None = None, scheduler: Any = None,
                   allow_other_weights: bool = False) -> None:
        """Raise :class:`bac.PlanMismatchError` naming the first thing that does not fit ``spec`` / the sampler.

        Includes the weights (hashed now) unless ``allow_other_weights`` or the
        calibration has no weights digest (an older file).
        """
        blocks = [(b.name, b.kind, b.layer) for b in self.blocks]
        check_made_for("calibration", self.fingerprint, blocks, self.num_steps, self.scheduler, spec, num_steps,
                       scheduler, allow_other_weights)

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
        optional = {name: value for name, value in (("gram", self.gram), ("timesteps", self.timesteps),
                                                    ("focus", self.focus)) if value is not None}
        return write_atomic(path, save({**self.matrices, "reuse_error": self.reuse_error, **optional},
                                       metadata={"bac": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read a calibration file; a missing, truncated, corrupt or malformed one is a :class:`bac.PlanMismatchError`."""
        try:
            with safe_open(str(path), framework="numpy") as f:
                text = (f.metadata() or {}).get("bac")
            arrays = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise PlanMismatchError(f"cannot read calibration file {path} (missing, truncated or not safetensors): "
                                    f"{err}") from None
        if text is None:
            raise PlanMismatchError(f"{path} is not a bac calibration file (no 'bac' metadata)")

        def bad(what: str) -> PlanMismatchError:
            return PlanMismatchError(f"malformed calibration file {path}: {what}")

        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise bad(f"its metadata is not JSON: {err}") from None
        if not isinstance(meta, dict):
            raise bad("its metadata is not a JSON object")
        missing = [k for k in ("blocks", "fingerprint", "num_steps", "samples", "seed", "date", "scheduler")
                   if k not in meta]
        if missing:
            raise bad(f"field {', '.join(missing)} missing")

        def integer(key: str, low: int) -> int:
            value = meta[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(f"field {key} must be an integer >= {low}, got {value!r}")
            return value

        blocks = meta["blocks"]
        if not isinstance(blocks, list) or not blocks or not all(
            isinstance(b, list) and len(b) == 3 and isinstance(b[0], str) and b[1] in KINDS
            and isinstance(b[2], int) and not isinstance(b[2], bool) for b in blocks
        ):
            raise bad("field blocks must be a non-empty list of [name, kind, layer]")
        if not isinstance(meta["fingerprint"], dict):
            raise bad("field fingerprint must be an object")
        if meta["scheduler"] is not None and not isinstance(meta["scheduler"], str):
            raise bad("field scheduler must be a string or null")
        num_steps, n = integer("num_steps", 1), len(blocks)
        for name, shape in [(m, (n, num_steps, num_steps)) for m in METRICS] + [("reuse_error", (n,))]:
            if name not in arrays:
                raise bad(f"array {name!r} missing")
            if arrays[name].shape != shape:
                raise bad(f"array {name!r} has shape {arrays[name].shape}, expected {shape} "
                          f"({n} blocks, {num_steps} steps)")
        if "gram" in arrays and arrays["gram"].shape != (n, num_steps, num_steps):
            raise bad(f"array 'gram' has shape {arrays['gram'].shape}, expected {(n, num_steps, num_steps)}")
        if "timesteps" in arrays and arrays["timesteps"].shape != (num_steps,):
            raise bad(f"array 'timesteps' has shape {arrays['timesteps'].shape}, expected {(num_steps,)}")
        if "focus" in arrays and arrays["focus"].shape != (n,):
            raise bad(f"array 'focus' has shape {arrays['focus'].shape}, expected {(n,)}")
        return cls(
            blocks=tuple(Block(name, kind, layer) for name, kind, layer in blocks),
            fingerprint=meta["fingerprint"],
            num_steps=num_steps,
            samples=integer("samples", 1),
            seed=integer("seed", -(2**63)),
            date=str(meta["date"]),
            scheduler=meta["scheduler"],
            matrices={m: arrays[m] for m in METRICS},
            reuse_error=arrays["reuse_error"],
            gram=arrays.get("gram"),
            timesteps=arrays.get("timesteps"),
            focus=arrays.get("focus"),
        )
