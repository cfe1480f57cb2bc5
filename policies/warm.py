"""Warm starts: a sampling call that begins from the previous call's chunk instead of pure noise.

Consecutive calls on a robot see nearly the same observation, and their chunks overlap: once ``shift``
actions of the last chunk have run, its remaining ones are a close prior for the next. A warm call takes
that prior (normalised, shifted by ``shift``, the tail padded with its last action), noises it to step
``start`` of the sampler's schedule with the scheduler's own forward process
(:meth:`bac.sampling.FusedSampler.noised`, the same Gaussian draw a cold call starts from), and runs the
last ``K - start`` steps (Falcon, Chen et al. ICML 2025, arXiv 2503.00339; RTI-DP, arXiv 2508.05396).

Three variants (:data:`VARIANTS`):

* ``plain``: always begin at ``start`` (``K - start`` denoiser evaluations per warm call).
* ``checked``: first take the cold call's step 0 (one evaluation), whose data prediction is a one-step
  estimate of the chunk under the current observation; begin at ``start`` from the prior only where it lies
  within ``threshold`` of that estimate (RMS over the overlapping actions, normalised units), else go on
  with the cold call (``1 + K - start`` evaluations, or ``K``).
* ``falcon``: Falcon's selection: the previous call's partially denoised samples at steps ``1 .. start`` are
  the candidates, each with the data prediction made at its step; after the cold step 0, begin from the
  latest candidate whose prediction lies within ``threshold`` of the one-step estimate, else go on cold.

A call is cold (from pure noise, bit-identical to a policy without warm starts) when there is no valid
prior: the first call after :meth:`WarmState.reset` (a new episode), another batch size, a late chunk
(``shift >= horizon``), another task, or an observation that jumped (the RMS change of the normalised state
over its features is above ``jump``). A batch begins warm only when all its rows can; a row's prior is its own.
State lives in a :class:`WarmState` per stream of calls (a policy view's episode, a server session, a
thread); nothing is shared. docs/guide/warm-starts.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from bac.errors import ConfigError

from .rtc import Guide, RealTimeChunking, prefix_weights

VARIANTS = ("plain", "checked", "falcon")
#: the default largest observation change a warm call accepts: the RMS over the normalised state's features
#: ([-1, 1] over the training range). Within Meta-World episodes one chunk (8 steps) moves it by 0.07 (median),
#: 0.47 (99th percentile), 0.56 at most (DP-T, 30 episodes of three tasks).
DEFAULT_JUMP = 0.75


@dataclass(frozen=True)
class WarmStart:
    """How a policy view warm-starts: ``start`` (the schedule's step index a warm call begins at; for
    ``falcon`` the latest one it may begin at; 0: every call cold), ``variant`` (:data:`VARIANTS`),
    ``threshold`` (``checked``/``falcon``: the largest RMS distance, normalised units, between the prior
    and the one-step estimate) and ``jump`` (the largest observation change accepted)."""

    start: int
    variant: str = "plain"
    threshold: float | None = None
    jump: float = DEFAULT_JUMP

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"warm-start variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"warm start: start must be a step index >= 0, got {self.start!r}")
        needs = self.variant != "plain"
        if needs != (self.threshold is not None):
            raise ConfigError(f"warm start {self.variant!r}: " + ("needs threshold= (RMS distance, normalised units)"
                                                                  if needs else "takes no threshold"))
        for name in ("threshold", "jump"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"warm start: {name} must be a positive number, got {value!r}")

    def check(self, steps: int) -> None:
        """Raise :class:`bac.ConfigError` unless this fits a sampler of ``steps`` steps."""
        if self.start >= steps:
            raise ConfigError(f"warm start at step {self.start} does not fit a sampler of {steps} steps "
                              f"(start in [0, {steps - 1}])")
        if self.variant != "plain" and self.start < 2 and self.start != 0:
            raise ConfigError(f"warm start {self.variant!r} takes the cold step 0 first, so it begins at a step "
                              f">= 2 (got start={self.start}); use plain for start=1")

    def warm_evaluations(self, steps: int) -> int:
        """Denoiser evaluations of a warm call that begins at ``start`` (falcon: at most)."""
        return steps - self.start + (self.variant != "plain")

    def describe(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        tail = "" if self.variant == "plain" else f"-{self.variant}{self.threshold:g}"
        return f"warm{self.start}{tail}"


class WarmState:
    """One stream's last chunk, read by warm starts and by real-time chunking (rows of a batch: one per episode
    of a vector env, a server session).

    Holds the last chunk (normalised, the whole horizon), for ``falcon`` its partially denoised samples,
    and the observation and task it was made for; :meth:`reset` forgets them (a new episode). ``calls``,
    ``warm_calls`` and ``evaluations`` count what the calls made with it did."""

    def __init__(self) -> None:
        self.calls = self.warm_calls = self.guided_calls = self.evaluations = 0
        self.reset()

    def reset(self) -> None:
        self.prior: torch.Tensor | None = None  # [B, H, A]
        self.candidates: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # falcon: (step, x_step, x0 at step)
        self.observation: torch.Tensor | None = None  # [B, D] normalised
        self.task: Any = None

    def counts(self) -> dict:
        return {"calls": self.calls, "warm_calls": self.warm_calls, "guided_calls": self.guided_calls,
                "evaluations": self.evaluations}


def warm_started(policy: Any) -> bool:
    """Whether ``policy`` warm-starts its calls from the last chunk (``DiffusionPolicy.with_warm_start``)."""
    return getattr(policy, "warm", None) is not None


def real_time_chunked(policy: Any) -> bool:
    """Whether ``policy`` continues the last chunk by real-time chunking (``DiffusionPolicy.with_rtc``)."""
    return getattr(policy, "rtc", None) is not None


def reads_last_chunk(policy: Any) -> bool:
    """Whether ``policy``'s calls read the stream's last chunk (a warm start or real-time chunking): a caller
    keeps a :class:`WarmState` per stream for them. Any policy object (a runtime's, a stand-in) may be asked."""
    return warm_started(policy) or real_time_chunked(policy)


def shifted(chunk: torch.Tensor, shift: int) -> torch.Tensor:
    """``chunk`` ``[B, H, A]`` advanced by ``shift`` actions, the tail padded with its last action."""
    if shift == 0:
        return chunk
    tail = chunk[:, -1:].expand(-1, shift, -1)
    return torch.cat([chunk[:, shift:], tail], dim=1)


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the RMS distance over actions and dimensions."""
    return (a - b).pow(2).mean(dim=(1, 2)).sqrt()


def _same_task(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and bool(torch.equal(a, b))
    return a == b


def jumped(before: torch.Tensor, after: torch.Tensor, jump: float) -> bool:
    """Whether any row's normalised state ``[B, D]`` changed by more than ``jump`` (RMS over its features)."""
    return bool(((after - before).pow(2).mean(dim=1).sqrt() > jump).any())


def cold_reason(state: WarmState, observation: torch.Tensor, task: Any, shift: int, horizon: int,
                jump: float) -> str | None:
    """Why this call cannot warm-start (None: it can)."""
    if state.prior is None:
        return "no earlier chunk"
    if state.prior.shape[0] != observation.shape[0]:
        return "another batch size"
    if shift >= horizon:
        return "late chunk"
    if not _same_task(state.task, task):
        return "another task"
    if state.observation is not None and jumped(state.observation, observation, jump):
        return "observation jumped"
    return None


#: ``run(x, begin, end, keep, resume=False) -> x``: the sampler's steps ``begin .. end - 1`` on ``x`` in a new
#: trajectory begun at ``begin``, or with ``resume`` going on with the last one (``end=None``: to the last
#: step); ``keep(step, x_step, model_output)``, if given, sees each step's input and output.
Runner = Callable[..., torch.Tensor]


def warm_sample(warm: WarmStart, state: WarmState, fused: Any, noise: torch.Tensor, runner: Runner,
                observation: torch.Tensor, task: Any, shift: int, rtc: RealTimeChunking | None = None,
                delay: int = 0) -> torch.Tensor:
    """One sampling call of a stream: the normalised chunk, ``state`` updated. ``noise`` is the draw a
    cold call starts from; ``runner`` runs the sampler's steps (see :data:`Runner`); ``observation`` is the
    normalised current state ``[B, D]``. ``warm``: the warm start (``WarmStart(0)``: none). ``rtc``: real-time
    chunking (:mod:`bac.policies.rtc`) with ``delay`` frozen actions, where the last chunk is a valid prior:
    the runner's ``guide`` is set for the call and the frozen actions are the last chunk's."""
    steps, horizon = fused.num_steps, noise.shape[1]
    invalid = cold_reason(state, observation, task, shift, horizon, warm.jump)  # why the last chunk is no prior
    reason = invalid if warm.start else "start 0"
    keep, kept = _keeper(warm, fused) if warm.variant == "falcon" else (None, None)
    guided = rtc is not None and invalid is None
    if guided:
        if warm.variant != "plain":
            raise ConfigError(f"real-time chunking combines with plain warm starts, not {warm.variant!r}")
        target, overlap = shifted(state.prior, shift), horizon - shift
        frozen = min(delay, overlap)
        runner.guide = Guide(target, prefix_weights(horizon, frozen, overlap), fused, rtc.scales(fused))
    evaluations, warm_call = steps, False
    if reason is not None:
        x = runner(noise, 0, None, keep)
    elif warm.variant == "plain":
        x = runner(fused.noised(warm.start, shifted(state.prior, shift), noise), warm.start, None, None)
        evaluations, warm_call = steps - warm.start, True
    else:  # the cold step 0 first: its data prediction is the one-step estimate under this observation
        seen: dict = {}
        x1 = runner(noise, 0, 1, lambda k, x, out: seen.update(out=out))
        estimate = fused.predict_x0(0, seen["out"], noise)
        overlap = horizon - shift
        begin, start_sample = _choose(warm, state, fused, noise, estimate, shift, overlap)
        if begin is None:
            x = runner(x1, 1, None, keep, resume=True)
        else:
            x = runner(start_sample, begin, None, keep)
            evaluations, warm_call = 1 + steps - begin, True
    if kept is not None:
        state.candidates = kept
    if guided:
        runner.guide = None
        x = torch.cat([target[:, :frozen], x[:, frozen:]], dim=1)  # the actions that run before it takes over
    state.calls += 1
    state.warm_calls += warm_call
    state.guided_calls += guided
    state.evaluations += evaluations
    state.prior, state.observation, state.task = x, observation, task
    return x


def _choose(warm: WarmStart, state: WarmState, fused: Any, noise: torch.Tensor, estimate: torch.Tensor,
            shift: int, overlap: int) -> tuple[int | None, torch.Tensor | None]:
    """(begin, the sample entering it) for checked/falcon, or (None, None): go on cold."""
    if warm.variant == "checked":
        prior = shifted(state.prior, shift)
        if _rms(prior[:, :overlap], estimate[:, :overlap]).max().item() <= warm.threshold:
            return warm.start, fused.noised(warm.start, prior, noise)
        return None, None
    for step, sample, x0 in sorted(state.candidates, key=lambda c: -c[0]):  # the latest first
        prediction = shifted(x0, shift)
        if _rms(prediction[:, :overlap], estimate[:, :overlap]).max().item() <= warm.threshold:
            start_sample = shifted(sample, shift)
            if shift:  # the padded tail: its own noise, at this step's level, around the padded prediction
                tail = slice(sample.shape[1] - shift, None)
                start_sample = start_sample.clone()
                start_sample[:, tail] = fused.noised(step, prediction[:, tail], noise[:, tail])
            return step, start_sample
    return None, None


def _keeper(warm: WarmStart, fused: Any) -> tuple[Callable, list]:
    """Falcon's candidates: a call's samples entering steps 1 .. start, with their data predictions."""
    kept: list = []

    def keep(step: int, sample: torch.Tensor, model_output: torch.Tensor) -> None:
        if 1 <= step <= warm.start:
            kept.append((step, sample, fused.predict_x0(step, model_output, sample)))
    return keep, kept
