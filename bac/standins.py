"""Stand-ins: what the engine returns for a block it does not compute.

``Reuse`` returns the block's last computed residual (BAC, FORA, FBCache); ``Taylor(order)`` forecasts it
from the block's computed values with finite differences over step indices (TaylorSeer; ``order=1`` is
Sortblock's linear extrapolation), degrading to reuse while there is one computed value; ``Linear``
combines the last two computed values with coefficients fitted per block and step on a calibration
(ERTACache's residual rectification, :mod:`bac.methods.ertacache`). For a branch with
an exact gate (``runner.gated``) ``Taylor`` forecasts the ungated output and applies the current gate. A
stand-in keeps its per-block memory in the context's ``cache`` list, so classifier-free-guidance branches
never share it; block outputs may be tensors or tuples of tensors (``None`` entries pass through).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from .checks import check_number
from .errors import ConfigError


def map_outputs(fn: Callable[..., Any], *outputs: Any) -> Any:
    """Apply ``fn`` to tensors, or elementwise to tuples of tensors (``None`` stays ``None``)."""
    first = outputs[0]
    if isinstance(first, (tuple, list)):
        return tuple(None if parts[0] is None else fn(*parts) for parts in zip(*outputs))
    return fn(*outputs)


def tensors(output: Any) -> list:
    """The tensors of a block output (a tensor or a tuple of tensors), or of a list of block outputs."""
    if isinstance(output, (tuple, list)):
        return [t for part in output for t in tensors(part)]
    return [] if output is None else [output]


def relative_l1(value: Any, reference: Any) -> float:
    """sum |value - reference| / sum |reference| over every tensor of two block outputs (or lists of them)."""
    num = den = 0.0
    for a, b in zip(tensors(value), tensors(reference)):
        num += (a.float() - b.float()).abs().sum().item()
        den += b.float().abs().sum().item()
    return num / den if den > 0 else math.inf


def stream_sums(outputs: Any) -> list:
    """Branch outputs summed per tensor shape, in float32.

    For the branches of one pre-norm residual layer this is the layer's
    output minus its input, per stream (image and text streams of a FLUX
    block have different shapes): what diffusers' first-block cache compares.
    """
    sums: dict = {}
    for t in tensors(outputs):
        key = (tuple(t.shape), t.device)
        sums[key] = t.float() if key not in sums else sums[key] + t.float()
    return list(sums.values())


class Reuse:
    """Return the last computed value: the plain cache."""

    name = "reuse"

    keeps_history = False  # only the computation right before a skip needs storing
    recomputes_gate = False  # reuses the gated value last handed on (FORA, BAC, diffusers' FirstBlockCache)

    def store(self, cache: list, i: int, step: int, out: Any) -> None:
        cache[i] = out

    def fill(self, cache: list, i: int, step: int) -> Any:
        return cache[i]

    def describe(self) -> dict:
        return {"standin": "reuse"}


class TaylorSeries:
    """Finite-difference derivatives of one block output over step indices.

    ``update(step, x)`` adds a computed value; ``predict(step)`` evaluates the
    Taylor polynomial around the last computed step. Derivative j at a new
    point is ``(d_{j-1}(new) - d_{j-1}(old)) / (step - old_step)``, TaylorSeer's
    recursive approximation.
    """

    __slots__ = ("order", "step", "terms")

    def __init__(self, order: int):
        self.order = order
        self.step: int | None = None
        self.terms: list = []

    def update(self, step: int, x: Any) -> None:
        terms = [x]
        if self.step is not None:
            dt = float(step - self.step)
            for j in range(1, min(self.order, len(self.terms)) + 1):
                terms.append(map_outputs(lambda new, old: (new - old) / dt, terms[j - 1], self.terms[j - 1]))
        self.step, self.terms = step, terms

    def predict(self, step: int) -> Any:
        if self.step is None:
            raise RuntimeError("no computed value to forecast from")
        dt = float(step - self.step)
        out = self.terms[0]
        for j in range(1, len(self.terms)):
            coefficient = dt**j / math.factorial(j)
            out = map_outputs(lambda acc, d: acc + d * coefficient, out, self.terms[j])
        return out


class Taylor:
    """Forecast a skipped block with a Taylor series of order 1 or 2 from its computed values."""

    keeps_history = True  # every computation before a skip contributes a finite difference
    # A branch with an exact gate (runner.gated: adaLN-Zero's gate of the timestep) is forecast ungated and
    # multiplied by the current gate: the gate is known, only the branch's computation is extrapolated.
    recomputes_gate = True

    def __init__(self, order: int = 1):
        check_number("Taylor order", order, 1, 2, integer=True)
        self.order = int(order)

    def store(self, cache: list, i: int, step: int, out: Any) -> None:
        series = cache[i]
        if series is None:
            series = cache[i] = TaylorSeries(self.order)
        series.update(step, out)

    def fill(self, cache: list, i: int, step: int) -> Any:
        return cache[i].predict(step)

    def describe(self) -> dict:
        return {"standin": f"taylor-{self.order}"}

    def __repr__(self) -> str:
        return f"Taylor(order={self.order})"


class Linear:
    """A skipped block as ``a * r_c + b * r_p``: its last two computed values (steps ``c`` and ``p``) with
    coefficients fitted per block and skipped step (ERTACache's closed-form residual rectification).

    ``coefficients[i]`` maps a step ``t`` to ``(c, a, b)``: the fit assumed block ``i`` was last computed at
    step ``c``. Where the block's history does not match (a warm start began the trajectory later, or a
    refined plan moved an update) or no fit exists, the last value is reused as is.
    """

    keeps_history = True  # the value before the last computed one enters the fit
    recomputes_gate = False  # fitted on the gated values a block hands on (what calibration records)

    def __init__(self, coefficients: "list[dict[int, tuple[int, float, float]]]"):
        self.coefficients = coefficients

    def store(self, cache: list, i: int, step: int, out: Any) -> None:
        last = cache[i]
        cache[i] = (step, out, last[1] if last is not None else None)

    def fill(self, cache: list, i: int, step: int) -> Any:
        last_step, last, previous = cache[i]
        fit = self.coefficients[i].get(step)
        if fit is None or fit[0] != last_step:
            return last
        _, a, b = fit
        if b == 0.0 or previous is None:
            return map_outputs(lambda r: r * a, last)
        return map_outputs(lambda r, q: r * a + q * b, last, previous)

    def describe(self) -> dict:
        return {"standin": "linear"}

    def __repr__(self) -> str:
        return f"Linear({sum(len(c) for c in self.coefficients)} fitted block steps)"


REUSE = Reuse()

Standin = Reuse | Taylor | Linear


def make_standin(standin: "str | Standin") -> Standin:
    """A stand-in by name: ``"reuse"``, ``"taylor-1"`` or ``"taylor-2"`` (or a stand-in, returned as is)."""
    if isinstance(standin, (Reuse, Taylor, Linear)):
        return standin
    if standin == "reuse":
        return REUSE
    if isinstance(standin, str) and standin.startswith("taylor-") and standin[7:] in ("1", "2"):
        return Taylor(int(standin[7:]))
    if standin == "linear":
        raise ConfigError("the 'linear' stand-in is fitted per block and step: it comes with its plan "
                          "(bac.build_method('ertacache', calibration) or a loaded ertacache plan)")
    raise ConfigError(f"unknown stand-in {standin!r}; expected 'reuse', 'taylor-1' or 'taylor-2'")
