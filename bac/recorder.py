"""Calibration runs: record every block's residual at every step over full sampling calls.

:func:`calibrate` runs the uncached model through the engine with an
observer on every block, folds one sampling call's features at a time into
the statistics of :class:`bac.Calibration` (memory is one call's features,
whatever the number of samples), and checks execution order, finiteness and
that every input has samples. The calibration records the digest of the
weights it ran on, so plans made from it refuse other weights.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .adapters import Block, LayerAdapter, describe
from .attention import AttentionProbe, attention_focus, call_received
from .calibration import METRICS, Calibration, reuse_errors
from .engine import CacheHandle
from .errors import DataError, NonFiniteError
from .fit import scheduler_id
from .rows import AlwaysCompute


def per_sample(out: Any, batch_dim: int) -> torch.Tensor:
    """A branch output (tensor or tuple of tensors) as [batch, features], float32 (calibration statistics,
    ``benchmarks.block_errors``)."""
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    parts = [t.detach().movedim(batch_dim, 0).reshape(t.shape[batch_dim], -1).float() for t in tensors if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _Recorder:
    """Observer that keeps one sampling call's block outputs and folds them into sums.

    Outputs are kept per cache context: each classifier-free-guidance branch
    is its own trajectory, and its batch elements count as samples of their own.
    """

    def __init__(self, blocks: tuple[Block, ...], batch_dims: list[int]):
        self.blocks = blocks
        self.batch_dims = batch_dims
        self.handle: CacheHandle | None = None
        self.features: dict[str, list[list[torch.Tensor]]] = {}
        self.first_order: list[int] | None = []
        self.sums: dict[str, torch.Tensor] | None = None
        self.samples = 0
        self.num_steps: int | None = None
        self.input = 0  # index of the calibration input being run, for error messages

    def __call__(self, i, fn, args, kwargs):
        out = fn(*args, **kwargs)
        context = self.handle.active_context
        if context not in self.features:
            self.features[context] = [[] for _ in self.blocks]
        features = self.features[context]
        if self.first_order is not None and len(self.features) == 1 and not features[i]:
            self.first_order.append(i)
        first = next(t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None)
        if first.shape[self.batch_dims[i]] == 0:  # would add nothing but divide by a sample count of 0
            raise DataError(f"calibration input {self.input} is a batch of 0 samples "
                            f"(block {self.blocks[i].name} got batch size 0); give every input at least one sample")
        features[i].append(per_sample(out, self.batch_dims[i]))
        return out

    def finish(self, steps_by_context: Mapping[str, int]) -> None:
        if not self.features:
            raise RuntimeError("the calibration sampling function never called the model")
        if self.first_order is not None:
            if self.first_order != list(range(len(self.blocks))):
                ran = [self.blocks[i].name for i in self.first_order]
                raise RuntimeError(
                    f"blocks ran in the order {ran}, not in the declared order {[b.name for b in self.blocks]}: "
                    "register layers in execution order (BUA relies on it)"
                )
            self.first_order = None
        for context, features in self.features.items():
            steps = steps_by_context[context]
            if self.num_steps is None:
                self.num_steps = steps
            elif steps != self.num_steps:
                raise RuntimeError(
                    f"calibration sampling calls ran {self.num_steps} and {steps} steps (context {context!r}); "
                    "use one sampler"
                )
            self._fold(features, steps)
        self.features = {}

    def _fold(self, features: list[list[torch.Tensor]], steps: int) -> None:
        for i, block in enumerate(self.blocks):
            if len(features[i]) != steps:
                raise RuntimeError(
                    f"block {block.name} ran {len(features[i])} times in a {steps}-step sampling call; "
                    "each block must run exactly once per denoiser call"
                )
            r = torch.stack(features[i], dim=1)  # [batch, K, D]
            features[i] = []
            if not torch.isfinite(r).all():
                raise NonFiniteError(f"block {block.name} produced NaN or inf during calibration "
                                     f"(input {self.input}); check the model's weights and the calibration inputs")
            unit = r / r.norm(dim=2, keepdim=True).clamp_min(1e-12)
            stats = {
                "cosine": unit @ unit.transpose(1, 2),
                "l1": torch.cdist(r, r, p=1) / r.shape[2],
                "mse": torch.cdist(r, r, p=2, compute_mode="donot_use_mm_for_euclid_dist").square() / r.shape[2],
            }
            r64 = r.double()  # differences of large inner products: float32 would cancel away small errors
            stats["gram"] = r64 @ r64.transpose(1, 2) / r.shape[2]  # the squared error of any linear stand-in
            if self.sums is None:
                n, k = len(self.blocks), steps
                self.sums = {m: torch.zeros(n, k, k, dtype=torch.float64) for m in (*METRICS, "gram")}
            for metric, value in stats.items():
                self.sums[metric][i] += value.sum(0).double().cpu()
        self.samples += r.shape[0]


class _AttentionProfile:
    """Observer of the attention-profiling pass: per context, block and step, the attention keys received
    (:class:`bac.attention.AttentionProbe`), folded into each block's foreground ratio after every call.

    A pass of its own: torch's attention functions under a ``TorchFunctionMode`` may take other kernels
    (``nn.MultiheadAttention`` leaves its fused path), so the statistics come from a pass without it."""

    def __init__(self, num_blocks: int):
        self.handle: CacheHandle | None = None
        self.received: dict[str, list[list]] = {}
        self.sums = [(0.0, 0)] * num_blocks

    def __call__(self, i, fn, args, kwargs):
        with AttentionProbe() as probe:
            out = fn(*args, **kwargs)
        calls = self.received.setdefault(self.handle.active_context, [[] for _ in self.sums])
        calls[i].append(call_received(probe.received))
        return out

    def finish(self) -> None:
        for received in self.received.values():
            for step in zip(*received):  # one step of every block
                for b, (total, count) in enumerate(attention_focus(list(step))):
                    self.sums[b] = (self.sums[b][0] + total, self.sums[b][1] + count)
        self.received = {}

    def focus(self) -> np.ndarray:
        """Per block, the mean foreground ratio of its attention; NaN for a block that attends nowhere."""
        return np.array([total / count if count else np.nan for total, count in self.sums])


def _profile_attention(model, spec, sample_fn, inputs, seed: int, devices) -> np.ndarray:
    profile = _AttentionProfile(len(spec.blocks))
    handle = CacheHandle(model, spec, AlwaysCompute(len(spec.blocks)), observer=profile)
    profile.handle = handle
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for x in inputs:
                handle.new_trajectory()
                sample_fn(x)
                profile.finish()
    finally:
        handle.remove()
    return profile.focus()


def calibrate(
    model: nn.Module,
    sample_fn: Callable[[Any], Any],
    inputs: Iterable[Any],
    *,
    seed: int = 0,
    scheduler: Any = None,
    adapters: Mapping[type, LayerAdapter] | None = None,
    attention: bool = False,
) -> Calibration:
    """Record every block's residual at every step over full sampling calls.

    ``sample_fn(x)`` runs one complete sampling call (every denoising step) for
    each ``x`` in ``inputs``; each batch element counts as one sample, and the
    denoiser calls of each cache context (``handle.context(name)``, e.g. the
    two classifier-free-guidance branches) form trajectories of their own. The
    global RNG is seeded with ``seed`` inside a forked RNG state, so the
    caller's random state is untouched and calibration is reproducible.
    ``scheduler`` (a diffusers scheduler or a description) is recorded in plans.

    The result records :func:`bac.adapters.weights_digest` of ``model``: plans
    made from it are refused on other weights (see :meth:`bac.Plan.check_fits`).
    An input whose batch has no samples is a :class:`bac.DataError`, a block
    output with NaN or inf a :class:`bac.NonFiniteError`.

    ``attention=True`` also profiles where each block's attention goes (ProfilingDiT's foreground ratio,
    :func:`bac.attention.attention_focus`, recorded as ``Calibration.focus``), through torch's attention
    functions (:class:`bac.attention.AttentionProbe`), in a second pass over the inputs (the statistics are
    those of a calibration without it); it forms every attention matrix explicitly, so it costs memory
    quadratic in the token count.
    """
    spec = describe(model, adapters)
    weights = spec.weights_digest()  # before sampling: what the statistics are of
    recorder = _Recorder(spec.blocks, spec.batch_dims())
    inputs = list(inputs)
    handle = CacheHandle(model, spec, AlwaysCompute(len(spec.blocks)), observer=recorder)
    recorder.handle = handle
    devices = [p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for index, x in enumerate(inputs):
                recorder.input = index
                handle.new_trajectory()
                sample_fn(x)
                recorder.finish(handle.steps_run())
    finally:
        handle.remove()
    if recorder.sums is None:
        raise DataError("calibrate needs at least one calibration input")
    focus = _profile_attention(model, spec, sample_fn, inputs, seed, devices) if attention else None
    matrices = {m: (s / recorder.samples).numpy() for m, s in recorder.sums.items()}
    gram = matrices.pop("gram")
    k = recorder.num_steps
    reuse_error = reuse_errors(matrices["l1"])
    return Calibration(
        blocks=spec.blocks,
        fingerprint={**spec.fingerprint, "weights": weights},
        num_steps=k,
        samples=recorder.samples,
        seed=seed,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        scheduler=scheduler_id(scheduler),
        matrices=matrices,
        reuse_error=reuse_error,
        gram=gram,
        focus=focus,
    )
