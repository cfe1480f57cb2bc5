"""Plan files: which steps every block is computed at, and what the plan was made for.

A plan is JSON (SPEC section 5): schema version, the model fingerprint, the
step count and scheduler, the method and its parameters, per block its kind,
layer and sorted update steps, and calibration facts. A plan refuses to load
onto a model, block set, step count or scheduler it was not made for, and the
error names the mismatch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..checks import check_number
from ..fit import PlanMismatchError, check_fits, scheduler_id
from ..flops import executed_flops

SCHEMA_VERSION = 1


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
        check_number("num_steps", self.num_steps, 1, integer=True)
        names = [b.name for b in self.blocks]
        if len(set(names)) != len(names):
            raise ValueError("plan lists a block twice")
        for b in self.blocks:
            steps = list(b.update_steps)
            if not steps or steps[0] != 0:
                raise ValueError(f"block {b.name}: update steps must start with step 0 (nothing is cached before it)")
            if steps != sorted(set(steps)) or steps[-1] >= self.num_steps:
                raise ValueError(f"block {b.name}: update steps must be sorted, unique and below {self.num_steps}")

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
    ) -> "Plan":
        """Build a plan for the blocks of ``spec`` (a :class:`bac.ModelSpec`)."""
        missing = [b.name for b in spec.blocks if b.name not in update_steps]
        if missing:
            raise ValueError(f"no update steps for blocks {missing}")
        blocks = tuple(
            PlanBlock(b.name, b.kind, b.layer, tuple(int(s) for s in update_steps[b.name])) for b in spec.blocks
        )
        return cls(
            method,
            dict(params or {}),
            int(num_steps),
            blocks,
            dict(spec.fingerprint),
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

    # -- checks ----------------------------------------------------------------------
    def check_fits(self, spec, num_steps: int | None = None, scheduler: Any = None) -> None:
        """Raise :class:`PlanMismatchError` naming the first thing that does not fit."""
        blocks = [(b.name, b.kind, b.layer) for b in self.blocks]
        check_fits("plan", self.model, blocks, self.num_steps, self.scheduler, spec, num_steps, scheduler)

    # -- files -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["blocks"] = [{**b, "update_steps": list(b["update_steps"])} for b in data["blocks"]]
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        data = dict(data)
        version = data.pop("schema_version", None)
        if version != SCHEMA_VERSION:
            raise PlanMismatchError(f"plan schema version {version!r}; this bac reads version {SCHEMA_VERSION}")
        try:
            blocks = tuple(
                PlanBlock(b["name"], b["kind"], int(b["layer"]), tuple(int(s) for s in b["update_steps"]))
                for b in data.pop("blocks")
            )
            return cls(blocks=blocks, schema_version=version, **data)
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed plan: {err}") from err

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def heatmap(self, path: str | Path | None = None, ax=None):
        """Draw blocks (rows) by steps (columns), updated vs reused; save to ``path`` if given."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        table = [[float(k in set(b.update_steps)) for k in range(self.num_steps)] for b in self.blocks]
        if ax is None:
            height = max(3.0, 0.18 * len(self.blocks) + 1.2)
            fig, ax = plt.subplots(figsize=(min(16.0, 3 + 0.09 * self.num_steps), height))
        fig = ax.figure
        ax.imshow(table, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#e8e8e8", "#c0392b"]))
        ax.set_yticks(range(len(self.blocks)), [b.name for b in self.blocks], fontsize=6)
        ax.set_xlabel("denoising step (execution order)")
        ax.set_title(
            f"{self.method}: {self.computed_count()} of {len(self.blocks) * self.num_steps} block evaluations "
            "computed (red = update, grey = reuse)",
            fontsize=9,
        )
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=150)
            plt.close(fig)
        return fig
