"""What a plan or calibration was made for, and the check that it fits a model and sampler.

:func:`check_made_for` is the check; :meth:`bac.Plan.check_fits` and :meth:`bac.Calibration.check_fits` call it
with what they were made for.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Sequence

from .errors import ConfigTypeError, PlanMismatchError


def scheduler_id(scheduler: Any) -> str | None:
    """A comparable description of a sampler: a string as is, or a diffusers scheduler's class and config
    (given as the scheduler itself or as a sampler value carrying it in ``.scheduler``)."""
    if scheduler is None or isinstance(scheduler, str):
        return scheduler
    scheduler = getattr(scheduler, "scheduler", scheduler)
    config = getattr(scheduler, "config", None)
    if config is None:
        raise ConfigTypeError(f"cannot describe scheduler {scheduler!r}: pass a string or a diffusers scheduler")
    items = {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "trained_betas"}
    return f"{type(scheduler).__name__}({json.dumps(items, sort_keys=True, default=str)})"


def check_made_for(
    what: str,
    fingerprint: dict,
    blocks: Sequence[tuple[str, str, int]],
    num_steps: int,
    scheduler: str | None,
    spec,
    wanted_steps: int | None = None,
    wanted_scheduler: Any = None,
    allow_other_weights: bool = False,
) -> None:
    """Raise :class:`PlanMismatchError` naming the first thing ``what`` (a plan, a calibration) was not made for.

    ``fingerprint``, ``blocks`` (name, kind, layer), ``num_steps`` and ``scheduler``
    describe what it was made for; ``spec`` (a :class:`bac.ModelSpec`) is the
    model, ``wanted_steps`` / ``wanted_scheduler`` the sampler (``None``: unchecked).

    A fingerprint with a ``"weights"`` digest (a calibration, and plans made
    from one) must match :meth:`bac.ModelSpec.weights_digest` of the model
    unless ``allow_other_weights``; one without it (uncalibrated plans, and
    files written before bac recorded weights) is not checked against weights.
    The weights are hashed last, only when everything else fits.
    """
    for key in ("class", "num_layers", "width"):
        if fingerprint.get(key) != spec.fingerprint.get(key):
            raise PlanMismatchError(
                f"{what} was made for a model with {key}={fingerprint.get(key)!r}, "
                f"this model has {key}={spec.fingerprint.get(key)!r}"
            )
    planned = [tuple(b) for b in blocks]
    actual = [(b.name, b.kind, b.layer) for b in spec.blocks]
    if planned != actual:
        extra = sorted(set(planned) - set(actual))
        missing = sorted(set(actual) - set(planned))
        raise PlanMismatchError(
            f"{what} blocks do not match the model's: only in {what} {extra[:4]}, only in model {missing[:4]}"
            + ("" if extra or missing else " (same blocks, different order)")
        )
    if fingerprint.get("parameters") != spec.fingerprint.get("parameters"):
        raise PlanMismatchError(
            f"{what} was made for a model with different parameter shapes "
            f"(digest {fingerprint.get('parameters')} vs {spec.fingerprint.get('parameters')})"
        )
    if wanted_steps is not None and wanted_steps != num_steps:
        raise PlanMismatchError(f"{what} was made for {num_steps} denoising steps, the sampler runs {wanted_steps}")
    wanted = scheduler_id(wanted_scheduler)
    if wanted is not None and scheduler is not None and wanted != scheduler:
        raise PlanMismatchError(f"{what} was made for scheduler {scheduler}, the sampler uses {wanted}")
    made_on = fingerprint.get("weights")
    if made_on is not None and not allow_other_weights:
        actual_weights = spec.weights_digest()
        if made_on != actual_weights:
            raise PlanMismatchError(
                f"{what} was calibrated on other weights than this model's (weights digest {made_on}, "
                f"this model {actual_weights}; another checkpoint, or a fine-tuned or re-cast copy): recalibrate "
                "on this model (bac.calibrate, then bac.make_plan), or pass allow_other_weights=True "
                "(bac.accelerate, Plan.check_fits) to use it anyway"
            )


def check_fits(*args, **kwargs) -> None:
    """Deprecated name of :func:`check_made_for` (``check_fits`` is :meth:`bac.Plan.check_fits` and
    :meth:`bac.Calibration.check_fits`, which call it); kept for one release."""
    warnings.warn("bac.fit.check_fits is deprecated: use bac.fit.check_made_for", DeprecationWarning, stacklevel=2)
    check_made_for(*args, **kwargs)
