"""A diffusion policy with LeRobot's interface: a thin policy over the denoiser, its sampler and normalisers.

:class:`DiffusionPolicy` has ``PreTrainedPolicy``'s interface without depending on LeRobot: ``reset()``,
``predict_action_chunk(batch)`` (one sampling call on the observation history) and ``select_action(batch)``
(the next action for the current observation, from a queue of ``n_action_steps``), plus checkpoint IO.
What it delegates: the batch checks and the condition (:mod:`bac.policies.inputs`, a bad batch raises
:class:`bac.DataError` naming the feature), normalisation (:mod:`bac.policies.normalize`), the sampler value
(:mod:`bac.policies.sampler`), the sampling loop and the training loss (:mod:`bac.policies.diffusion`),
non-finite actions (:mod:`bac.policies.nonfinite`). Checkpoints are ``model.safetensors`` + ``config.json``,
checked on load (:mod:`bac.policies.checkpointing`). The interface in full: docs/guide/policies.md
("The policy interface").
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import bac
from bac.errors import CheckpointError, ConfigError, ConfigTypeError, DataError, NonFiniteError

from . import inputs
from .checkpointing import CheckpointNotFoundError, check_state_fits, read_weights, save_weights
from .config import WEIGHTS_FILE, PolicyConfig, read_config
from .constants import STATE, TASK
from .diffusion import StepRunner, sample_chunk, training_loss, training_scheduler
from .dit import DiTPolicyHead
from .dpt import TransformerForDiffusion
from .features import next_history
from .graph_call import CompiledCall
from .gr00t import GR00THead
from .inputs import Batch
from .language import CACHE_FILE, LanguageCache
from .nonfinite import EXTREME, ON_NONFINITE, hold, nonfinite_error
from .normalize import Normalizer
from .pi0 import Pi0Head
from .rdt import RDTHead
from .sampler import DEFAULT_SAMPLERS, FLOW_SAMPLERS, SAMPLERS, Sampler  # noqa: F401  (SAMPLERS, FLOW_SAMPLERS: importable here as before)
from .rtc import DEFAULT_MAX_GUIDANCE, RealTimeChunking, check_delay
from .warm import DEFAULT_JUMP, WarmStart, WarmState, reads_last_chunk, warm_sample

__all__ = ["DiffusionPolicy", "ARCHITECTURES", "EXTREME", "Normalizer"]

ARCHITECTURES = {"dpt": TransformerForDiffusion, "dit": DiTPolicyHead, "gr00t": GR00THead, "rdt": RDTHead,
                 "pi0": Pi0Head}


class _FromConfig:
    """A read-only attribute that is the config's field of the same name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, policy: "DiffusionPolicy | None", owner: type | None = None) -> Any:
        return self if policy is None else getattr(policy.config, self.name)

    def __set__(self, policy: "DiffusionPolicy", value: Any) -> None:
        raise AttributeError(f"DiffusionPolicy.{self.name} is its config's; build a policy from another config")


class _Renamed:
    """A deprecated attribute that warns and reads its new name, a dotted path on the policy."""

    def __init__(self, new: str):
        self.new = new

    def __set_name__(self, owner: type, name: str) -> None:
        self.old = name

    def __get__(self, policy: "DiffusionPolicy | None", owner: type | None = None) -> Any:
        if policy is None:
            return self
        _deprecated(self.old, self.new)
        value = policy
        for part in self.new.split("."):
            value = getattr(value, part)
        return value


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"DiffusionPolicy.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


class DiffusionPolicy(nn.Module):
    """``DiffusionPolicy(config, on_nonfinite="raise")``: a :class:`PolicyConfig` (``PolicyConfig.build(...)``
    or a checkpoint's); ``on_nonfinite`` is ``"raise"`` or ``"hold"``.

    ``model`` is the denoiser (what ``bac.accelerate`` caches), ``obs_normalizer`` / ``action_normalizer`` the
    normalisers, ``sampler`` the :class:`~bac.policies.sampler.Sampler` value it samples with
    (:meth:`with_sampler` gives a view with another one).

    Every sampled chunk is checked once (``torch.isfinite(actions).all()``). Non-finite actions raise
    :class:`bac.NonFiniteError`, which says which inputs are far outside the training range (beyond
    ``EXTREME`` times the normaliser's range; such values are not refused before sampling, only named when
    the output is bad) and whether any weight is non-finite (checked only then). With
    ``on_nonfinite="hold"``, :meth:`select_action` instead repeats the last finite action of each failed
    sample for that chunk and appends the event to :attr:`nonfinite_events`; it still raises when a sample
    has no finite action since :meth:`reset`. :meth:`predict_action_chunk` always raises.

    :meth:`save` writes ``model.safetensors`` (EMA weights and the normalisation statistics, with the
    config's architecture fingerprint in its metadata) and ``config.json`` (:class:`PolicyConfig`, with the
    weights file's sha256); :meth:`load` checks both, unpickles nothing, and names the file in every
    :class:`bac.CheckpointError`.
    """

    name = "diffusion"

    def __init__(self, config: PolicyConfig, *args: Any, on_nonfinite: str = "raise", **kwargs: Any):
        if not isinstance(config, PolicyConfig) or args or kwargs:  # the pre-config call styles, named clearly
            raise ConfigTypeError(
                "DiffusionPolicy(config) takes one PolicyConfig: DiffusionPolicy(PolicyConfig.build(architecture, "
                "model, state_dim=..., action_dim=..., tasks=[...], horizon=..., ...)), "
                f"got {type(config).__name__}" + (" and more arguments" if args or kwargs else ""))
        super().__init__()
        self.config = config
        sizes = ({"state_dim": config.state_dim} if config.is_vla else {"cond_dim": config.cond_dim})
        self.model = ARCHITECTURES[config.architecture](
            action_dim=config.action_dim, horizon=config.horizon, n_obs_steps=config.n_obs_steps,
            **sizes, **self.model_kwargs,
        )
        self.obs_normalizer = Normalizer(config.state_dim)
        self.action_normalizer = Normalizer(config.action_dim)
        self.noise_scheduler = training_scheduler(config)
        # A VLA head reads free-text instructions: their frozen language tokens, encoded once each.
        self.language = LanguageCache() if config.is_vla else None
        self.sampler = self.make_sampler(*DEFAULT_SAMPLERS.get(config.architecture, ("ddpm", None)))
        self.graph: CompiledCall | None = None  # compile_call's graphs of the sampling call, or eager
        self.warm: WarmStart | None = None  # with_warm_start's setting: calls begin from the last chunk
        self.rtc: RealTimeChunking | None = None  # with_rtc's setting: calls continue the last chunk
        self.on_nonfinite = on_nonfinite
        # Chunks held by on_nonfinite="hold": {"samples": [...], "message": ...}; kept across reset() so the
        # runtime can report them after an episode.
        self.nonfinite_events: list[dict] = []
        self._warm_state = WarmState()
        self.reset()

    # -- configuration -----------------------------------------------------------------
    architecture = _FromConfig()
    input_features = _FromConfig()
    output_features = _FromConfig()
    state_dim = _FromConfig()
    action_dim = _FromConfig()
    horizon = _FromConfig()
    n_obs_steps = _FromConfig()
    n_action_steps = _FromConfig()
    cameras = _FromConfig()
    obs_dim = _Renamed("state_dim")

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def model_kwargs(self) -> dict:
        """The typed model config as a plain dict (reports, plan descriptions)."""
        return {k: getattr(self.config.model, k) for k in self.config.model.__dataclass_fields__}

    @property
    def reads_instructions(self) -> bool:
        """Whether ``task`` is a free-text instruction (a VLA head) rather than one of :attr:`tasks`."""
        return self.config.is_vla

    @property
    def device(self) -> torch.device:
        return self.obs_normalizer.scale.device

    @property
    def on_nonfinite(self) -> str:
        """What :meth:`select_action` does with a non-finite chunk: ``"raise"`` or ``"hold"``."""
        return self._on_nonfinite

    @on_nonfinite.setter
    def on_nonfinite(self, value: str) -> None:
        if value not in ON_NONFINITE:
            raise ConfigError(f"on_nonfinite must be one of {ON_NONFINITE}, got {value!r}")
        self._on_nonfinite = value

    @property
    def provenance(self) -> dict:
        return self.config.provenance

    @provenance.setter
    def provenance(self, value: dict) -> None:
        self.config = self.config.replace(provenance=dict(value))

    # -- the sampler -----------------------------------------------------------------
    def make_sampler(self, kind: str, steps: int | None = None) -> Sampler:
        """A :class:`~bac.policies.sampler.Sampler` for this policy, checked (:meth:`with_sampler` says which)."""
        return Sampler.make(kind, steps, self.noise_scheduler, self.config.is_flow)

    def with_sampler(self, kind: str, steps: int | None = None) -> "DiffusionPolicy":
        """This policy sampling with another sampler: a view sharing the weights (the same modules and
        buffers), with its own sampler and episode state; this policy is left as it is.

        DDPM (all training steps by default), DDIM or DPM-Solver++ (fewer steps); a flow-matching policy
        with flow-matching Euler steps (``"flow"``; steps required)."""
        return self._view(self.make_sampler(kind, steps))

    def with_warm_start(self, start: int, variant: str = "plain", threshold: float | None = None,
                        jump: float = DEFAULT_JUMP) -> "DiffusionPolicy":
        """This policy with warm-started sampling calls (:mod:`bac.policies.warm`, docs/guide/warm-starts.md):
        a view sharing the weights whose :meth:`select_action` begins each chunk after the first of an episode
        from the previous chunk, noised to step ``start`` of its sampler (``variant``: ``"plain"``,
        ``"checked"`` or ``"falcon"``, the last two with ``threshold``). ``start=0``: every call cold.
        :meth:`predict_action_chunk` warm-starts where it is given a :class:`WarmState`. A compiled view's
        graphs are made for the warm calls too (call :meth:`compile_call` on this view)."""
        warm = WarmStart(start, variant, threshold, jump)
        warm.check(self.sampler.steps)
        if self.rtc is not None and variant != "plain":
            raise ConfigError(f"real-time chunking combines with plain warm starts, not {variant!r}")
        if self.graph is not None:
            raise ConfigError("compile the warm-started view: policy.with_warm_start(...).compile_call(...)")
        view = self._view(self.sampler)
        view.warm = warm
        return view

    def with_rtc(self, max_guidance: float = DEFAULT_MAX_GUIDANCE) -> "DiffusionPolicy":
        """This policy with real-time chunking (:mod:`bac.policies.rtc`, docs/guide/real-time-chunking.md): a view
        sharing the weights whose calls, given the stream's :class:`WarmState` and a ``delay``, continue the
        previous chunk: its actions that still run during the inference (``delay``) are frozen, the rest of the
        overlap is inpainted toward it by guidance clipped at ``max_guidance`` (the paper's beta). The first call
        of a stream, and any call the previous chunk is no prior for, is a plain call. Combines with a plain
        warm start (``with_warm_start(...).with_rtc()``); graphs (:meth:`compile_call`) refuse it."""
        rtc = RealTimeChunking(max_guidance)
        if self.warm is not None and self.warm.variant != "plain":
            raise ConfigError(f"real-time chunking combines with plain warm starts, not {self.warm.variant!r}")
        if self.graph is not None:
            raise ConfigError("real-time chunking's guided steps run eagerly: add it before compile_call, which "
                              "refuses it")
        view = self._view(self.sampler)
        view.rtc = rtc
        return view

    @property
    def streams(self) -> bool:
        """Whether this view's calls read the previous chunk (a warm start or real-time chunking): such a
        call takes the caller's :class:`WarmState` (``predict_action_chunk(..., warm_state=)``)."""
        return reads_last_chunk(self)

    def _view(self, sampler: Sampler) -> "DiffusionPolicy":
        view = copy.copy(self)
        # its own registries of the same modules, parameters and buffers: setting a module on the view
        # does not change this policy
        view.__dict__.update(_modules=dict(self._modules), _parameters=dict(self._parameters),
                             _buffers=dict(self._buffers))
        view.sampler, view.graph = sampler, None
        if self.warm is not None and sampler is not self.sampler:
            view.warm = None  # made for another schedule: with_warm_start again
        view.nonfinite_events = []
        view._warm_state = WarmState()  # its own episode state
        view.reset()
        return view

    def compile_call(self, batch: int | Sequence[int] = 1, backend: str = "inductor", mode: str | None = None,
                     threads: int | None = None, onnx: str | Path | None = None,
                     instructions: Sequence[str] = ()) -> "DiffusionPolicy":
        """This policy with each sampling call run as one graph: a view sharing the weights, whose calls run
        the sampler's steps unrolled with the plan the denoiser is accelerated with now (or none) baked in
        (:mod:`bac.graphs`, docs/guide/graphs.md). Built here for each of the ``batch`` sizes, so the first
        call pays no compilation (a VLA head: for the token lengths of ``instructions``, the ones its calls
        will read; another length is built on the first call with it).

        ``backend``: ``"inductor"`` (``torch.compile``; ``mode="reduce-overhead"`` adds CUDA graphs on a
        GPU), ``"aot_eager"``, or ``"onnxruntime"`` (exported to ONNX, run in ONNX Runtime with ``threads``
        threads; ``onnx``: serve that exported file, made by ``bac-export`` for this configuration, instead).
        The view refuses other batch sizes, and every call once the denoiser's handle is removed or
        rescheduled; a runtime rule cannot be compiled (it decides on the host at every step).
        """
        sizes = (batch,) if isinstance(batch, int) and not isinstance(batch, bool) else tuple(batch)
        view = self._view(self.sampler)
        view.graph = CompiledCall(view, sizes, backend, mode, threads, None if onnx is None else str(onnx),
                                  instructions)
        return view

    def export_onnx(self, path: str | Path, batch: int = 1, instruction: str | None = None) -> Path:
        """Write this view's sampling call (sampler, current plan, ``batch``) as an ONNX model with its
        description in the metadata (:func:`bac.policies.graph_call.describe_call`); see :meth:`compile_call`.
        A VLA head's call is made for ``instruction``'s token length (the file serves instructions of it)."""
        if self.config.is_vla and instruction is None:
            raise ConfigError("a VLA head's exported call is made for one instruction length: pass instruction=")
        call = CompiledCall(self, (batch,), "onnxruntime", instructions=[instruction] if instruction else ())
        (graph,) = call.graphs.values()
        return graph.save_onnx(path)

    def set_sampler(self, kind: str = "ddpm", steps: int | None = None) -> "DiffusionPolicy":
        """Deprecated: change this policy's sampler in place (every caller sharing it changes too);
        use :meth:`with_sampler`."""
        _deprecated("set_sampler(kind, steps)", "with_sampler(kind, steps), which returns a view")
        self.sampler, self.graph = self.make_sampler(kind, steps), None
        return self

    sampler_kind = _Renamed("sampler.kind")
    num_inference_steps = _Renamed("sampler.steps")
    fused_sampler = _Renamed("sampler.fused")

    # -- the denoising process -------------------------------------------------------
    def condition(self, batch: Batch) -> Any:
        """The denoiser's condition of a batch with the stacked observation history: normalised
        ``observation.state`` ``[B, n_obs_steps, C]`` (plus the task one-hot for a multi-task policy), or
        for a VLA head its observation prefix (``policies.vla.Prefix``: images, instruction, state)."""
        return self._condition(inputs.check_state(self.config, batch, self.device, history=True), batch)

    def _condition(self, state: torch.Tensor, batch: Batch, generator: torch.Generator | None = None) -> Any:
        """``generator`` draws the image augmentation of a VLA head in training."""
        return inputs.condition(self.config, state, batch, self.obs_normalizer, self.model, self.language,
                                augment=self.training, generator=generator)

    def compute_loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE on a batch of observation histories and ``action`` chunks ``[B, horizon, A]``.

        ``batch["task"]`` may also be a tensor of indices into :attr:`tasks` (the trainer's form).
        """
        state = inputs.check_state(self.config, batch, self.device, history=True)
        cond = self._condition(state, batch, generator)
        actions = inputs.check_actions(self.config, batch, self.device, state.shape[0])
        target = self.action_normalizer(actions)
        return training_loss(self.model, self.noise_scheduler, self.config, target, cond, generator)

    def _sample(self, batch: Batch, generator: torch.Generator | None, num_actions: int | None = None,
                warm_state: WarmState | None = None, shift: int | None = None,
                delay: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked observation history and the first ``num_actions`` (default ``n_action_steps``) sampled,
        unchecked actions ``[B, num_actions, A]``. The whole horizon is sampled either way, so the noise drawn
        from ``generator`` and the first actions do not depend on ``num_actions``."""
        num_actions = inputs.check_num_actions(self.config, num_actions)
        handle = bac.get_handle(self.model)
        if handle is not None:  # a view's sampler may differ from the one the shared denoiser is accelerated for
            handle.check_sampler(self.sampler.steps, self.sampler.scheduler)
        state = inputs.check_state(self.config, batch, self.device, history=True)
        cond = self._condition(state, batch)  # for a VLA head: the prefix, encoded once per call
        shape = (state.shape[0], self.horizon, self.action_dim)
        delay = 0 if delay is None else check_delay(delay)
        if self.streams and warm_state is not None:
            shift = self.n_action_steps if shift is None else inputs.check_shift(shift)
            noise = torch.randn(shape, generator=generator, device=self.device)  # a cold call's starting draw
            runner = (self.graph.runner(cond, generator) if self.graph is not None
                      else StepRunner(self.model, self.sampler, cond, generator))
            warm = self.warm if self.warm is not None else WarmStart(0)
            x = warm_sample(warm, warm_state, self.sampler.fused, noise, runner, self.obs_normalizer(state[:, -1]),
                            batch.get(TASK), shift, self.rtc, delay)
        elif self.graph is not None:
            x = self.graph.sample(cond, shape, generator, self.device)
        else:
            x = sample_chunk(self.model, self.sampler, cond, shape, generator, self.device)
        return state, self.action_normalizer.inverse(x[:, :num_actions])

    # -- inference -------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new episode: forget the observation history, the queued actions and the last action
        (which ``on_nonfinite="hold"`` would repeat). :attr:`nonfinite_events` is kept."""
        self._history: torch.Tensor | None = None
        self._queue: list[torch.Tensor] = []
        self._last_action: torch.Tensor | None = None
        self._warm_state.reset()  # select_action's: a new episode starts cold (its counts are kept)

    @torch.no_grad()
    def predict_action_chunk(self, batch: Batch, generator: torch.Generator | None = None,
                             num_actions: int | None = None, warm_state: WarmState | None = None,
                             shift: int | None = None, delay: int | None = None) -> torch.Tensor:
        """One sampling call: the ``[B, num_actions, action_dim]`` actions to execute next.

        ``batch["observation.state"]`` is the observation history ``[B, n_obs_steps, D]``. ``num_actions``:
        how many of the chunk's ``horizon`` actions to return (default ``n_action_steps``, the receding
        horizon's; a real-time controller takes all of them to execute past a late chunk); a value outside
        ``[1, horizon]`` is a :class:`bac.ConfigError`. Non-finite actions (among those returned) raise
        :class:`bac.NonFiniteError` (whatever :attr:`on_nonfinite` says; see :class:`DiffusionPolicy`), with the
        chunk in ``err.actions`` and the failed samples in ``err.samples``.

        A warm-started view (:meth:`with_warm_start`) begins from the last chunk of ``warm_state`` (a
        :class:`~bac.policies.warm.WarmState` the caller keeps per stream of calls, e.g. per robot or session),
        advanced by ``shift`` actions (how many of that chunk ran between its observation and this one;
        default ``n_action_steps``), and updates it; without ``warm_state`` the call is cold. A view with
        real-time chunking (:meth:`with_rtc`) continues that chunk the same way, its first ``delay`` actions (the
        ones that run before this chunk takes over; default 0) returned unchanged.
        """
        state, actions = self._sample(batch, generator, num_actions, warm_state, shift, delay)
        if not torch.isfinite(actions).all():  # the guard: one reduction per chunk; diagnosis only on failure
            if warm_state is not None:
                warm_state.reset()  # never begin a call from a non-finite chunk
            raise self._nonfinite_error(state, actions)
        return actions

    @torch.no_grad()
    def _nonfinite_error(self, state: torch.Tensor, actions: torch.Tensor) -> NonFiniteError:
        return nonfinite_error(state, actions, self.obs_normalizer(state), self.state_dict(),
                               cached=bac.get_handle(self.model) is not None)

    @torch.no_grad()
    def select_action(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next action ``[B, action_dim]`` for the current observation ``observation.state`` ``[B, D]``.

        Keeps the last ``n_obs_steps`` observations (the first one repeated after
        :meth:`reset`) and samples a new chunk only when the queue is empty. A non-finite
        chunk raises :class:`bac.NonFiniteError`, or with ``on_nonfinite="hold"`` is replaced,
        for the failed samples, by their last action (repeated for that chunk; the event goes
        to :attr:`nonfinite_events`); hold raises too when a failed sample has no last action
        since :meth:`reset`.
        """
        # Between chunks only the state is read (for the history): a runtime may leave out the images then
        # (see chunk_due), which saves rendering them at every step.
        state = inputs.check_state(self.config, batch, self.device, history=False, state_only=not self.chunk_due)
        if self._history is not None and self._history.shape[0] != state.shape[0]:
            raise DataError(f"feature {STATE!r}: batch of {state.shape[0]} observations after "
                            f"{self._history.shape[0]}; call reset() before a new batch of episodes")
        self._history = next_history(self._history, state, self.n_obs_steps)
        if not self._queue:
            try:
                warm = {"warm_state": self._warm_state} if self.streams else {}  # a subclass may not take it
                chunk = self.predict_action_chunk({**batch, STATE: self._history}, generator=generator, **warm)
            except NonFiniteError as err:
                if self.on_nonfinite != "hold" or getattr(err, "actions", None) is None:
                    raise
                chunk = hold(err, self._last_action, self.nonfinite_events)
            self._queue = list(chunk.unbind(1))
        self._last_action = self._queue.pop(0)
        return self._last_action

    @property
    def warm_counts(self) -> dict:
        """What :meth:`select_action`'s sampling calls did since this view was made: ``calls``, ``warm_calls``
        (begun from the last chunk) and ``evaluations`` (denoiser evaluations); zeros without warm starts."""
        return self._warm_state.counts()

    @property
    def chunk_due(self) -> bool:
        """Whether the next :meth:`select_action` samples a new chunk (and so reads every feature, images included)."""
        return not self._queue

    # -- caching ---------------------------------------------------------------------
    def accelerate(self, schedule: bac.Plan | bac.Rule | bac.Method) -> bac.CacheHandle:
        """``bac.accelerate`` on the denoiser with a plan, rule or named method, checked against this sampler."""
        sampler = self.sampler
        return bac.accelerate(self.model, schedule, num_steps=sampler.steps, scheduler=sampler.scheduler)

    def use_tuned(self, path: str | Path) -> bac.CacheHandle | None:
        """Apply a ``python -m bac.tune`` result (``tuned.json``): its sampler and plan, in one line.

        Returns the cache handle (``None`` when the tuned pick is a plain sampler)."""
        from .tuned import TunedConfig

        return TunedConfig.load(path).apply(self)

    # -- checkpoints -----------------------------------------------------------------
    def save(self, directory: str | Path, half: bool = False) -> Path:
        """Write ``model.safetensors`` (with the architecture fingerprint) and ``config.json`` (with the
        weights' sha256). Each file is replaced atomically, weights first: a crash in between leaves
        a checkpoint whose sha256 does not match, which :meth:`load` refuses.

        ``half``: store the denoiser's floating-point weights as float16 (half the bytes; the normalisers
        stay float32); :meth:`load` casts them back to float32, so a policy computes in float32 either way."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if half:
            state = {k: v.half() if k.startswith("model.") and v.is_floating_point() else v for k, v in state.items()}
        record = save_weights(state, directory / WEIGHTS_FILE, self.config)
        self.config.save(directory / "config.json", weights=record)
        if self.language is not None and len(self.language):
            self.language.save(directory / CACHE_FILE)  # the instructions' tokens: no language model needed for them
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             expect: dict[str, Any] | None = None, on_nonfinite: str = "raise") -> "DiffusionPolicy":
        """Load a checkpoint directory; ``expect`` (e.g. ``{"architecture": "dpt"}``) must match its config.

        Every failure is a :class:`bac.CheckpointError` naming the file: a missing file
        (also a ``FileNotFoundError``), a bad ``config.json``, unreadable or truncated weights,
        weights that do not fit the config (names, shapes, the fingerprint of the config they
        were saved with), a sha256 that differs from the one ``config.json`` records, NaN/inf
        weights. Checkpoints saved before the sha256 and fingerprint existed load without those
        two checks (nothing to compare with); ``load(d).save(d)`` adds them.
        """
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / WEIGHTS_FILE
        missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{directory} is not a policy checkpoint (needs config.json and "
                                          f"{WEIGHTS_FILE}; missing {missing})")
        config, record = read_config(config_path)
        stored = config.to_dict()
        for key, value in (expect or {}).items():
            if stored.get(key) != value:
                raise CheckpointError(f"checkpoint {directory} has {key}={stored.get(key)!r}, expected {value!r}")
        policy = cls(config, on_nonfinite=on_nonfinite)
        state = read_weights(weights_path, config, record, policy, f"this {config.architecture} policy")
        policy.load_state_dict(state)
        if policy.language is not None and (directory / CACHE_FILE).is_file():
            policy.language = LanguageCache.load(directory / CACHE_FILE)
        return policy.to(device).eval()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict, naming every missing, unexpected or mis-shaped tensor (:class:`bac.CheckpointError`)."""
        check_state_fits(self, state, f"this {self.architecture} policy")
        self.load_state_dict(state)
