"""What every trainer here shares: resumable training state, state dicts checked before loading, and
weights files that carry what identifies them.

A weights file written by :func:`save_weights` is safetensors with one metadata entry, ``bac``: JSON
``{"format": "bac-weights/1", "fingerprint": ..., "identity": {...}}`` (one entry, because safetensors
writes metadata entries in hash order: with one, equal weights give equal bytes). Its sha256 and size go
into ``config.json``. :func:`read_weights` checks both, the sha256 against a flipped byte, the fingerprint
against changed model settings, and names the file in every :class:`bac.CheckpointError`
(docs/guide/policies.md, "The policy interface").
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bac.errors import CheckpointError
from bac.files import write_atomic

from .config import PolicyConfig, WeightsRecord, identity_differences, identity_digest

WEIGHTS_FORMAT = "bac-weights/1"
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or one of its files does not exist."""


def check_state_fits(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`bac.CheckpointError`, naming every missing, unexpected or mis-shaped tensor, unless
    ``state`` loads into ``module``."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise CheckpointError(f"checkpoint does not fit {what} ({len(problems)} problems): "
                              + "; ".join(problems[:6]))


def check_fits(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Deprecated name of :func:`check_state_fits` (``check_fits`` is :meth:`bac.Plan.check_fits`)."""
    warnings.warn("bac.policies.checkpointing.check_fits is deprecated: use check_state_fits", DeprecationWarning,
                  stacklevel=2)
    check_state_fits(module, state, what)


def save_weights(state: Mapping[str, torch.Tensor], path: Path, config: PolicyConfig) -> WeightsRecord:
    """Write ``state`` as safetensors with ``config``'s identity in the metadata; a crash leaves the old file.

    Returns the record (size, sha256) for ``config.json``. The bytes depend only on the tensors and
    the identity, so saving the same weights twice gives the same file.
    """
    identity = config.identity()
    entry = {"format": WEIGHTS_FORMAT, "fingerprint": identity_digest(identity), "identity": identity}
    data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()},
                            metadata={"bac": json.dumps(entry, sort_keys=True, separators=(",", ":"))})
    write_atomic(path, data)
    return WeightsRecord(file=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _metadata(data: bytes, path: Path) -> dict[str, Any]:
    """The ``bac`` metadata entry of a safetensors file's header ({} without one; safetensors' loader does
    not return metadata for bytes)."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is {'empty' if not data else f'{len(data)} bytes'}: not a safetensors "
                              "file (truncated or never written); save the policy again or restore the file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_HEADER_LIMIT, len(data) - 8):
        raise CheckpointError(f"{path} is truncated or corrupt: its header claims {size} bytes, "
                              f"the file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not JSON ({err})") from err
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or "bac" not in metadata:
        return {}
    try:
        entry = json.loads(metadata["bac"])
    except (TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: its 'bac' metadata is not JSON ({err})") from err
    if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint"), str):
        raise CheckpointError(f"{path} is corrupt: its 'bac' metadata has no fingerprint")
    return entry


def read_weights(path: Path, config: PolicyConfig, record: WeightsRecord | None,
                 module: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """Read a policy's weights file and check it against ``module``, its config and ``config.json``'s record.

    Checks in this order (the most specific diagnosis first), each failure a
    :class:`bac.CheckpointError` naming ``path``: a readable safetensors file (not empty, not
    truncated); tensor names and shapes fit ``module`` (:func:`check_state_fits`); the fingerprint in
    its metadata equals ``config``'s (else: the config fields that differ); its size and sha256
    equal ``record``'s ("weights file changed or corrupt"); every tensor finite. A file without
    the metadata, or a ``config.json`` without the record (both written before they existed),
    skips that check: such a checkpoint loads as before, with no protection against a changed
    config or a corrupted payload; re-save it (``DiffusionPolicy.load(d).save(d)``) to add both.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from err
    sha = hashlib.sha256(data).hexdigest()
    changed = record is not None and (sha != record.sha256 or len(data) != record.bytes)
    note = (f" (config.json records {record.bytes} bytes with sha256 {record.sha256[:12]}…, the file has "
            f"{len(data)} bytes with sha256 {sha[:12]}…)") if changed else ""
    metadata = _metadata(data, path)
    try:
        state = load_safetensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on a damaged file
        raise CheckpointError(f"{path} is corrupt or truncated: safetensors cannot read it ({err}){note}") from err
    try:
        check_state_fits(module, state, what)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}{note}") from None
    saved = metadata.get("fingerprint")
    if saved is not None and saved != config.fingerprint():
        identity = metadata.get("identity")
        differences = identity_differences(identity, config.identity()) if isinstance(identity, dict) else []
        raise CheckpointError(
            f"{path} was saved for another model than its config.json describes: "
            + ("; ".join(differences) if differences else "the architecture fingerprints differ")
            + ". Restore the config.json saved with these weights, or the weights saved with this config")
    if changed:
        raise CheckpointError(f"{path}: weights file changed or corrupt{note}; restore it from the original checkpoint")
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: NaN or inf in {len(bad)} tensor(s) {bad[:6]}; these weights cannot give "
                              "finite actions (a diverged training run?)")
    return state


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


class TrainingState:
    """Model, optimiser, LR schedule, EMA and random streams, saved atomically and restored exactly."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule, ema: EMAModel,
                 generator: torch.Generator):
        self.model, self.optimizer, self.lr_schedule, self.ema, self.generator = (
            model, optimizer, lr_schedule, ema, generator)

    def save(self, path: Path, **extra: Any) -> None:
        """Write the state and ``extra`` (tensors and plain values only) to ``path``; a crash leaves the old file,
        and a failed write (a full disk) no temporary one."""
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_schedule": self.lr_schedule.state_dict(), "ema": self.ema.state_dict(),
                    "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), **extra}, buffer)
        write_atomic(path, buffer.getbuffer())

    def restore(self, path: Path, check: Callable[[dict], None] | None = None) -> dict:
        """Load ``path`` (``weights_only``), let ``check`` refuse a foreign run, restore; returns the saved dict."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: torch raises several kinds
            raise CheckpointError(f"{path} is not a readable training state ({type(err).__name__}: {err}); "
                                  "delete it or use another run_dir to start afresh") from err
        if check is not None:
            check(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(next(self.model.parameters()).device)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return state


def resolve_checkpoint(name: str | Path) -> Path:
    """A checkpoint directory: a path as given (when it exists, is absolute or names a folder), else the
    shipped checkpoint of that bare name (``policies/checkpoints/<name>``, package data in an install), else
    the path as given. ``runs/<shipped name>`` that does not exist stays that path (a missing checkpoint),
    never the shipped one of the same name."""
    path = Path(name)
    if path.is_absolute() or path.exists() or len(path.parts) != 1:
        return path
    shipped = Path(__file__).resolve().parent / "checkpoints" / path.name
    return shipped if shipped.is_dir() else path
