"""Plan files: which steps every block is computed at, and what the plan was made for.

A plan is JSON (docs/guide/caching-methods.md, "Plan files"): the model fingerprint (with the calibration's
weights digest for a calibrated plan), the step count and scheduler, the method and its parameters, and per
block its sorted update steps. A plan refuses to load onto a model, block set, step count, scheduler or
weights it was not made for, and reading is strict: every problem is a :class:`bac.PlanMismatchError`
naming the file and the field.
"""
from __future__ import annotations

import io
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..adapters import KINDS
from ..checks import check_number
from ..errors import ConfigError, PlanMismatchError
from ..files import write_atomic
from ..fit import check_made_for, scheduler_id
from ..flops import executed_flops
from ..standins import Linear

SCHEMA_VERSION = 1

# Field types of a plan file; a key of MODEL_FIELDS marked optional may be absent.
_TOP_FIELDS = ("schema_version", "method", "params", "num_steps", "blocks", "model", "scheduler", "calibration")
_BLOCK_FIELDS = ("name", "kind", "layer", "update_steps")
_MODEL_FIELDS = {"class": (str,), "num_layers": (int,), "width": (int, type(None)), "parameters": (str,),
                 "weights": (str,)}
_MODEL_OPTIONAL = ("weights",)
MAX_NESTING = 32  # levels of lists and objects in params and calibration (real plans use 1)
HEATMAP_COLUMNS = 2000  # a longer plan is drawn in bins of steps, each shaded by the share of steps computed


def _nesting(value: Any, limit: int) -> int:
    """How deeply ``value`` nests lists and objects, counted up to ``limit + 1`` (so never deeper)."""
    if limit < 0 or not isinstance(value, (Mapping, list, tuple)):
        return 0
    items = value.values() if isinstance(value, Mapping) else value
    return 1 + max((_nesting(v, limit - 1) for v in items), default=0)


def _is_int(value: Any) -> bool:
    """An integer and not a bool (JSON ``true`` is not step 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", float: "a number",
             int: "an integer", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _Reader:
    """Validates a plan's JSON data field by field; errors name ``source`` and the field's path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str) -> PlanMismatchError:
        return PlanMismatchError(f"malformed plan {self.source}: {message}")

    def wrong(self, where: str, expected: str, value: Any) -> PlanMismatchError:
        return self.fail(f"field {where} must be {expected}, got {_type_name(value)} {value!r}"[:400])

    def fields(self, data: Any, where: str, known: Sequence[str], optional: Sequence[str] = ()) -> dict:
        if not isinstance(data, Mapping):
            raise self.wrong(where, "an object", data) if where else self.fail(
                f"expected a JSON object, got {_type_name(data)}")
        unknown = [k for k in data if k not in known]
        if unknown:
            raise self.fail(f"unknown field{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(repr(f'{where}.{k}' if where else k) for k in unknown)}")
        missing = [k for k in known if k not in data and k not in optional]
        if missing:
            names = ", ".join(f"{where}.{k}" if where else k for k in missing)
            raise self.fail(f"field {names} is missing" if len(missing) == 1 else f"fields {names} are missing")
        return dict(data)

    def integer(self, value: Any, where: str, low: int = 0) -> int:
        if not _is_int(value) or value < low:
            raise self.wrong(where, f"an integer >= {low}", value)
        return int(value)

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.wrong(where, "a non-empty string", value)
        return value

    def mapping(self, value: Any, where: str) -> dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.wrong(where, "an object", value)
        if _nesting(value, MAX_NESTING) > MAX_NESTING:
            raise self.fail(f"field {where} nests lists and objects deeper than {MAX_NESTING} levels")
        return dict(value)

    def read(self, data: Any) -> dict:
        data = self.fields(data, "", _TOP_FIELDS, optional=("scheduler", "calibration"))
        version = data.pop("schema_version")
        if version != SCHEMA_VERSION or not _is_int(version):
            raise PlanMismatchError(
                f"plan {self.source}: schema version {version!r}; this bac reads version {SCHEMA_VERSION}")
        num_steps = data["num_steps"]
        if not _is_int(num_steps) or num_steps < 1:
            raise self.fail(f"num_steps must be an integer in [1, inf], got {num_steps!r}")
        data["method"] = self.string(data["method"], "method")
        data["params"] = self.mapping(data["params"], "params")
        model = self.fields(data["model"], "model", tuple(_MODEL_FIELDS), _MODEL_OPTIONAL)
        for key, value in model.items():
            if not isinstance(value, _MODEL_FIELDS[key]) or isinstance(value, bool):
                expected = " or ".join(_type_name(t()) if t is not type(None) else "null" for t in _MODEL_FIELDS[key])
                raise self.wrong(f"model.{key}", expected, value)
        data["model"] = model
        scheduler = data.get("scheduler")
        if scheduler is not None and not isinstance(scheduler, str):
            raise self.wrong("scheduler", "a string or null", scheduler)
        if data.get("calibration") is not None:
            data["calibration"] = self.mapping(data["calibration"], "calibration")
        blocks = data["blocks"]
        if not isinstance(blocks, list) or not blocks:
            raise self.wrong("blocks", "a non-empty list", blocks)
        data["blocks"] = tuple(self.block(b, f"blocks[{i}]") for i, b in enumerate(blocks))
        return data

    def block(self, data: Any, where: str) -> "PlanBlock":
        data = self.fields(data, where, _BLOCK_FIELDS)
        kind = data["kind"]
        if kind not in KINDS:
            raise self.wrong(f"{where}.kind", f"one of {KINDS}", kind)
        steps = data["update_steps"]
        if not isinstance(steps, list):
            raise self.wrong(f"{where}.update_steps", "a list of integers", steps)
        return PlanBlock(
            self.string(data["name"], f"{where}.name"),
            kind,
            self.integer(data["layer"], f"{where}.layer"),
            tuple(self.integer(s, f"{where}.update_steps[{j}]") for j, s in enumerate(steps)),
        )


@dataclass(frozen=True)
class PlanBlock:
    name: str
    kind: str
    layer: int
    update_steps: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    method: str
    params: dict
    num_steps: int
    blocks: tuple[PlanBlock, ...]
    model: dict
    scheduler: str | None = None
    calibration: dict | None = None
    schema_version: int = field(default=SCHEMA_VERSION)

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise PlanMismatchError(f"plan schema version {self.schema_version}; this bac reads version {SCHEMA_VERSION}")
        try:
            check_number("num_steps", self.num_steps, 1, integer=True)
        except ValueError as err:
            raise PlanMismatchError(str(err)) from None
        names = [b.name for b in self.blocks]
        if len(set(names)) != len(names):
            raise PlanMismatchError("plan lists a block twice")
        for b in self.blocks:
            steps = list(b.update_steps)
            if not all(_is_int(s) for s in steps):
                raise PlanMismatchError(f"block {b.name}: update steps must be integers, got {steps}")
            if not steps or steps[0] != 0:
                raise PlanMismatchError(
                    f"block {b.name}: update steps must start with step 0 (nothing is cached before it)")
            if steps != sorted(set(steps)) or steps[-1] >= self.num_steps:
                raise PlanMismatchError(
                    f"block {b.name}: update steps must be sorted, unique and below {self.num_steps}")

    @classmethod
    def from_steps(
        cls,
        spec,
        update_steps: Mapping[str, Sequence[int]],
        num_steps: int,
        method: str,
        params: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        calibration: Mapping[str, Any] | None = None,
        weights: str | None = None,
    ) -> "Plan":
        """Build a plan for the blocks of ``spec`` (a :class:`bac.ModelSpec` or a :class:`bac.Calibration`).

        ``weights`` is the weights digest the plan depends on (a calibrated
        plan's, from its calibration); ``None`` for plans that fit any weights.
        """
        missing = [b.name for b in spec.blocks if b.name not in update_steps]
        if missing:
            raise ConfigError(f"no update steps for blocks {missing}")
        for b in spec.blocks:  # int(2.7) would silently become step 2
            bad = [s for s in update_steps[b.name] if not _is_int(s)]
            if bad:
                raise ConfigError(f"block {b.name}: update steps must be integers, got {bad[:4]}")
        blocks = tuple(
            PlanBlock(b.name, b.kind, b.layer, tuple(int(s) for s in update_steps[b.name])) for b in spec.blocks
        )
        model = {k: v for k, v in spec.fingerprint.items() if k != "weights"}
        if weights is not None:
            model["weights"] = weights
        check_number("num_steps", num_steps, 1, integer=True)
        return cls(
            method,
            dict(params or {}),
            int(num_steps),
            blocks,
            model,
            scheduler_id(scheduler),
            dict(calibration) if calibration else None,
        )

    # -- queries ---------------------------------------------------------------------
    def update_steps(self) -> dict[str, list[int]]:
        return {b.name: list(b.update_steps) for b in self.blocks}

    def step_table(self) -> tuple[tuple[bool, ...], ...]:
        """Per step, per block: is the block computed? (the engine's hot-path table)"""
        sets = [set(b.update_steps) for b in self.blocks]
        return tuple(tuple(k in s for s in sets) for k in range(self.num_steps))

    def computed_count(self) -> int:
        """Block evaluations one sampling call computes."""
        return sum(len(b.update_steps) for b in self.blocks)

    def skipped_count(self) -> int:
        """Block evaluations one sampling call skips."""
        return len(self.blocks) * self.num_steps - self.computed_count()

    def ideal_speedup(self, block_flops: Mapping[str, int], call_flops: int) -> float:
        """Full FLOPs over planned FLOPs of one sampling call, given per-call FLOPs."""
        flops = [block_flops[b.name] for b in self.blocks]
        planned = executed_flops(call_flops, flops, [len(b.update_steps) for b in self.blocks], self.num_steps)
        return self.num_steps * call_flops / planned

    def summary(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        evaluations = len(self.blocks) * self.num_steps
        lines = [
            f"plan '{self.method}' ({params}) for {self.model.get('class')} "
            f"[{self.model.get('num_layers')} layers, width {self.model.get('width')}]",
            f"  {self.num_steps} steps, scheduler {self.scheduler or 'unspecified'}",
            f"  {len(self.blocks)} blocks: {self.computed_count()} of {evaluations} block evaluations computed "
            f"({100 * self.skipped_count() / evaluations:.1f}% skipped)",
        ]
        if self.calibration:
            lines.append("  calibration: " + ", ".join(f"{k}={v}" for k, v in self.calibration.items()))
        width = max(len(b.name) for b in self.blocks)
        for b in self.blocks:
            lines.append(f"    {b.name:<{width}}  {b.kind:<3} L{b.layer:<3} {len(b.update_steps):>4} updates")
        return "\n".join(lines)

    # -- fitted parts (ERTACache: bac.methods.ertacache) ------------------------------------
    def fitted_standin(self) -> Linear | None:
        """The stand-in fitted into the plan (``params["rectification"]``: per block name, per skipped step,
        ``[c, a, b]``: the step ``c`` the block was last computed at and the coefficients of its last two
        computed values), or ``None``. A malformed fit is a :class:`bac.PlanMismatchError`."""
        fits = self.params.get("rectification")
        if fits is None:
            return None
        if not isinstance(fits, Mapping) or set(fits) - {b.name for b in self.blocks}:
            raise PlanMismatchError(f"plan params.rectification must map this plan's block names to fits, got "
                                    f"{sorted(fits)[:4] if isinstance(fits, Mapping) else type(fits).__name__}")
        coefficients = []
        for block in self.blocks:
            steps, table = set(block.update_steps), {}
            for key, fit in dict(fits.get(block.name, {})).items():
                t = int(key) if isinstance(key, str) and key.isdigit() else -1
                ok = (isinstance(fit, list) and len(fit) == 3 and _is_int(fit[0]) and fit[0] in steps
                      and 0 <= fit[0] < t < self.num_steps and t not in steps
                      and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in fit[1:]))
                if not ok:
                    raise PlanMismatchError(f"plan params.rectification[{block.name!r}][{key!r}] must be "
                                            f"[computed step before it, a, b] at a skipped step, got {fit!r}"[:300])
                table[t] = (int(fit[0]), float(fit[1]), float(fit[2]))
            coefficients.append(table)
        return Linear(coefficients)

    def output_scales(self) -> tuple[float, ...] | None:
        """The denoiser output's scale at each step (``params["step_scales"]``, ERTACache's timestep
        adjustment), or ``None``; a malformed list is a :class:`bac.PlanMismatchError`."""
        scales = self.params.get("step_scales")
        if scales is None:
            return None
        if not (isinstance(scales, list) and len(scales) == self.num_steps and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in scales)):
            raise PlanMismatchError(f"plan params.step_scales must be {self.num_steps} positive numbers, one per "
                                    f"step, got {str(scales)[:200]}")
        return tuple(float(v) for v in scales)

    # -- checks ----------------------------------------------------------------------
    def check_fits(self, spec, num_steps: int | None = None, scheduler: Any = None,
                   allow_other_weights: bool = False) -> None:
        """Raise :class:`bac.PlanMismatchError` naming the first thing that does not fit ``spec`` or the sampler.

        ``spec`` is the model's :class:`bac.ModelSpec` (:func:`bac.describe`);
        ``num_steps`` / ``scheduler`` the sampler's (``None``: not checked). A
        calibrated plan must have been calibrated on this model's weights
        (the weights are hashed, once per check) unless
        ``allow_other_weights``; plans without a weights digest (uncalibrated
        methods, files from before the digest) are not checked against weights.
        """
        blocks = [(b.name, b.kind, b.layer) for b in self.blocks]
        check_made_for("plan", self.model, blocks, self.num_steps, self.scheduler, spec, num_steps, scheduler,
                       allow_other_weights)

    # -- files -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["blocks"] = [{**b, "update_steps": list(b["update_steps"])} for b in data["blocks"]]
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "data") -> "Plan":
        """A plan from its JSON data, checked field by field (docs/guide/caching-methods.md, "Plan files").

        Every problem is a :class:`bac.PlanMismatchError` naming ``source``
        (the file, for :meth:`load`) and the field.
        """
        fields = _Reader(source).read(data)
        try:
            return cls(schema_version=SCHEMA_VERSION, **fields)
        except PlanMismatchError as err:
            raise PlanMismatchError(f"malformed plan {source}: {err}") from None

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file; a missing, unreadable, truncated or malformed file is a :class:`bac.PlanMismatchError`."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise PlanMismatchError(f"cannot read plan file {path}: {err}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanMismatchError(f"plan file {path} is not valid JSON (truncated?): {err}") from None
        except RecursionError:  # Python's JSON reader recurses per level of nesting
            raise PlanMismatchError(f"plan file {path} nests lists or objects too deeply to be a plan") from None
        return cls.from_dict(data, source=f"file {path}")

    def heatmap(self, path: str | Path | None = None, ax=None):
        """Draw blocks (rows) by steps (columns), updated vs reused; save to ``path`` if given (written whole
        or not at all; its suffix names the image format).

        A plan of more than :data:`HEATMAP_COLUMNS` steps is drawn in that many bins of consecutive steps,
        each shaded by the share of its steps computed, so drawing takes bounded memory for any step count."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap, ListedColormap

        bin_steps = math.ceil(self.num_steps / HEATMAP_COLUMNS)
        colors = ["#e8e8e8", "#c0392b"]
        if ax is None:
            height = max(3.0, 0.18 * len(self.blocks) + 1.2)
            fig, ax = plt.subplots(figsize=(min(16.0, 3 + 0.09 * self.num_steps), height))
        fig = ax.figure
        if bin_steps == 1:
            ax.imshow(self._update_table(), aspect="auto", interpolation="nearest", cmap=ListedColormap(colors))
            ax.set_xlabel("denoising step (execution order)")
        else:
            ax.imshow(self._update_shares(bin_steps), aspect="auto", interpolation="nearest", vmin=0, vmax=1,
                      cmap=LinearSegmentedColormap.from_list("updates", colors),
                      extent=(-0.5, self.num_steps - 0.5, len(self.blocks) - 0.5, -0.5))
            ax.set_xlabel(f"denoising step (execution order), in bins of {bin_steps} steps shaded by the share computed")
        ax.set_yticks(range(len(self.blocks)), [b.name for b in self.blocks], fontsize=6)
        ax.set_title(
            f"{self.method}: {self.computed_count()} of {len(self.blocks) * self.num_steps} block evaluations "
            "computed (red = update, grey = reuse)",
            fontsize=9,
        )
        fig.tight_layout()
        if path is not None:
            _save_figure(fig, Path(path))
            plt.close(fig)
        return fig

    def _update_table(self) -> list[list[float]]:
        """Per block, per step: 1.0 where the block is computed."""
        table = []
        for b in self.blocks:
            row = [0.0] * self.num_steps
            for k in b.update_steps:
                row[k] = 1.0
            table.append(row)
        return table

    def _update_shares(self, bin_steps: int):
        """Per block, per bin of ``bin_steps`` consecutive steps: the share of the bin's steps computed."""
        columns = math.ceil(self.num_steps / bin_steps)
        widths = np.full(columns, bin_steps)
        widths[-1] = self.num_steps - bin_steps * (columns - 1)
        return np.stack([np.bincount(np.asarray(b.update_steps) // bin_steps, minlength=columns) / widths
                         for b in self.blocks])


def _save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` in the format its suffix names (png without one), whole or not at all."""
    image_format = path.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if image_format not in supported:
        raise ConfigError(f"cannot draw a heatmap as {path}: the image formats are {', '.join(sorted(supported))}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, dpi=150)
    write_atomic(path, buffer.getvalue())
