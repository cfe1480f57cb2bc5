"""The caching engine: routes every block through a runner that computes or stands in.

A forward pre-hook on the denoiser advances the step counter of the active context and takes that step's
row from the schedule (:mod:`bac.rows`); each block's runner (:mod:`bac.runners`) then computes the block
or returns the stand-in's value (:mod:`bac.standins`). State is per thread and per context (one per
classifier-free-guidance branch; :mod:`bac.state`), cleared by :func:`new_trajectory`; the batch shape and
the number of denoiser calls per sampling call are checked (:class:`bac.CacheStateError`). Statistics and
FLOPs: :mod:`bac.stats`. How it works, and what each check catches: docs/guide/core.md ("Inside the engine").
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .adapters import LayerAdapter, ModelSpec, describe
from .checks import check_number
from .errors import CacheStateError, ConfigError, ConfigTypeError, PlanMismatchError
from .fit import scheduler_id
from .methods import Method
from .plan import Plan
from .rows import BoundSchedule, StaticRows, rows_from_table
from .rules import Rule
from .runners import Tap, make_runner
from .standins import REUSE, Standin, make_standin
from .state import Context, Observer, ThreadStates, attach, detach, get_handle
from .stats import HandleStats


class StepOverflowError(CacheStateError):
    """The denoiser ran more steps in one sampling call than the schedule covers."""


class CacheHandle:
    """An accelerated model: trajectory control, contexts, statistics, and :meth:`remove`.

    Made by :func:`accelerate`; usable as a context manager that removes itself.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        schedule: BoundSchedule,
        standin: Standin = REUSE,
        plan: Plan | None = None,
        observer: Observer | None = None,
        tap: Tap | None = None,
        step_hooks: bool = True,
        scheduler: str | None = None,
    ):
        if get_handle(model) is not None:
            raise CacheStateError(f"{type(model).__name__} is already accelerated; call handle.remove() first")
        self.model = model
        self.spec = spec
        self.standin = standin
        self.plan = plan
        self.tap = tap
        self._scheduler = scheduler  # the scheduler id the schedule was made for (None: unknown)
        self._fitting: tuple = ()  # the last (num_steps, scheduler) check_sampler accepted
        self._threads = ThreadStates(schedule, len(spec.blocks), observer)
        self._local = self._threads.local  # what the hooks and runners read
        self._stats = HandleStats(spec, self._threads)

        runners = [make_runner(i, self._local, standin, schedule.static, tap) for i in range(len(spec.blocks))]
        start, installed = 0, []
        try:
            for _, layer, adapter in spec.layers:
                end = start + len(adapter.branches)
                adapter.install(layer, runners[start:end])
                installed.append((layer, adapter))
                start = end
        except BaseException:
            for layer, adapter in installed:  # leave the model as it was
                adapter.uninstall(layer)
            raise
        self._step_hooks = []
        if step_hooks:
            self._step_hooks = [
                model.register_forward_pre_hook(lambda module, args, kwargs: self.begin_call(args, kwargs),
                                                with_kwargs=True),
                model.register_forward_hook(lambda module, args, output: self.end_call(output)),
            ]
        attach(model, self)

    @property
    def schedule(self) -> BoundSchedule:
        """The bound schedule every thread's next step runs under (:meth:`reschedule` replaces it)."""
        return self._threads.schedule

    # -- per denoiser call -----------------------------------------------------------
    def begin_call(self, args: tuple, kwargs: dict) -> None:
        """A denoiser call with inputs ``args``/``kwargs`` starts: the calling thread's active context moves
        to its next step and takes that step's row.

        The handle's forward pre-hook calls it; call it yourself only for a model accelerated with
        ``step_hooks=False`` (a framework's own hook system drives the steps, as ``bac.diffusers``' hook
        does), together with :meth:`end_call` after each call returns.
        """
        local = self._local
        state = local.state
        step = state.step + 1
        if step >= state.schedule.limit:
            raise StepOverflowError(
                f"the schedule covers {state.schedule.limit} denoising steps but step {step + 1} was requested "
                f"in context {state.name!r}: mark each sampling call with handle.new_trajectory() "
                "(or bac.new_trajectory(model)), give each classifier-free-guidance branch its own "
                "handle.context(name), or make the schedule for this sampler's step count"
            )
        shape = _input_shape(args, kwargs)
        if step == state.start:
            state.shape = shape
        elif shape != state.shape:
            expected = state.shape
            local.record.restart()  # the cached values are unusable; the next call starts afresh
            raise CacheStateError(
                f"the denoiser's input has shape {_shape_text(shape)} at step {step} of this sampling call "
                f"(context {state.name!r}), but the call started with shape {_shape_text(expected)}, which the "
                "cached block outputs are for (another batch size in the middle of a trajectory?). Call "
                "handle.new_trajectory() (or bac.new_trajectory(model)) at the start of every sampling call; "
                "this thread's cache has been cleared"
            )
        state.step = step
        planned = step != state.start or step == 0
        state.row = state.schedule.row(state) if planned else state.schedule.first_row(state)
        scales = state.schedule.scales  # None but for a plan with a fitted timestep adjustment
        state.scale = scales[step] if scales is not None and planned else 1.0
        record = local.record
        record.calls += 1
        if record.fresh:
            record.fresh = False
            record.trajectories += 1

    def end_call(self, output: Any = None) -> Any:
        """The denoiser call begun by :meth:`begin_call` returned ``output`` (an exception skips it); returns
        the output the caller gets: ``output`` itself, or scaled where the plan adjusts this step
        (ERTACache's timestep adjustment, :meth:`bac.Plan.output_scales`)."""
        state = self._local.state
        state.done = state.step  # this call returned: a trajectory that stops here ended, not broke off
        return output if state.scale == 1.0 or output is None else scale_output(output, state.scale)

    # -- trajectory control ----------------------------------------------------------
    def new_trajectory(self, start: int = 0) -> None:
        """Start a new sampling call in this thread: every context restarts at step 0 with an empty cache.

        ``start``: the call's first denoiser call is step ``start`` of the schedule (a warm start, which
        runs a K-step sampler's last K - start steps): the plan's rows from there, the first computing every
        block. Only a static plan can (a runtime rule decides from the steps before: ConfigError).

        Raises :class:`bac.CacheStateError` if the previous call ran fewer
        denoiser calls than a static plan covers (docs/guide/core.md, "Inside the engine");
        the new call has started all the same, so a retry goes through.
        """
        record = self._local.record
        if start and not self.schedule.static:
            self.schedule.first_row(None)  # raises: a runtime rule cannot begin after step 0
        if start and not 0 < start < self.schedule.limit:
            raise ConfigError(f"a trajectory begins at a step in [0, {self.schedule.limit - 1}], got {start}")
        short = record.short_runs(self.schedule)
        record.restart(start)
        if short:
            raise _short_error(short, self.schedule.limit, "the previous sampling call")

    def abandon_trajectory(self) -> None:
        """This thread's sampling call stops here on purpose, before the plan's last step (a warm start's
        check step, :mod:`bac.policies.warm`): the next :meth:`new_trajectory` does not report it as short."""
        self._local.record.closed = True

    def end_trajectory(self) -> None:
        """Mark the end of this thread's sampling call and check its length now.

        Raises :class:`bac.CacheStateError` if a context ran fewer denoiser calls
        than the plan covers; either way the call counts as checked, so the next
        :meth:`new_trajectory` or :meth:`remove` does not report it again. The
        cached values stay until the next :meth:`new_trajectory`. Optional:
        without it the check happens at the next ``new_trajectory`` or ``remove``.
        """
        record = self._local.record
        short = record.short_runs(self.schedule)
        record.closed = True
        if short:
            raise _short_error(short, self.schedule.limit, "this sampling call")

    def reschedule(self, schedule: Plan | Rule | Method, *, num_steps: int | None = None, scheduler: Any = None,
                   allow_other_weights: bool = False) -> None:
        """Use ``schedule`` (e.g. the same method made for another step count) from the next sampling call on.

        Checked as :func:`accelerate` checks it. Every thread's trajectory restarts (call it between
        sampling calls); the statistics so far are kept. The stand-in must be the one the handle was
        made with, and a static plan cannot replace a runtime rule or the reverse (the runners are
        built for one of them): remove the handle and accelerate again for that.
        """
        bound, chosen, plan = _bind(self.spec, schedule, None, num_steps, scheduler, allow_other_weights)
        if chosen.describe() != self.standin.describe() or bound.static != self.schedule.static:
            raise ConfigError(
                f"reschedule keeps the handle's stand-in ({self.standin.describe()['standin']}) and "
                f"{'static plan' if self.schedule.static else 'runtime rule'}; got "
                f"{chosen.describe()['standin']} and {'a static plan' if bound.static else 'a runtime rule'}: "
                "remove the handle and call bac.accelerate instead"
            )
        self._threads.reschedule(bound)
        self.plan = plan
        self._scheduler, self._fitting = _scheduler_made_for(plan, scheduler), ()

    def check_sampler(self, num_steps: int, scheduler: Any = None) -> None:
        """Raise :class:`bac.PlanMismatchError` unless a sampling call of ``num_steps`` denoiser calls with
        ``scheduler`` fits this handle's schedule: a static plan's step count exactly, a runtime rule's at
        most, and the scheduler the plan was made for (or :func:`accelerate` was given) where both are known.

        ``scheduler``: a diffusers scheduler, a value carrying one in ``.scheduler``, a
        :func:`bac.scheduler_id`, or ``None`` (not checked). Call it before a sampling call whose sampler may
        differ from the one the model was accelerated for (a policy view with another sampler shares the
        denoiser: ``DiffusionPolicy`` does, once per call). The last sampler accepted is remembered, so
        checking the same one again is one comparison.
        """
        fitting = self._fitting
        if fitting and fitting[0] == num_steps and fitting[1] is scheduler:
            return
        schedule = self.schedule
        if num_steps > schedule.limit or (schedule.exact_length and num_steps != schedule.limit):
            made = "a plan" if schedule.exact_length else "a runtime rule"
            raise PlanMismatchError(
                f"the sampler runs {num_steps} denoising steps, but the model is accelerated with {made} "
                f"({schedule.name}) made for {schedule.limit}: accelerate for this sampler (a plan made for "
                f"{num_steps} steps; handle.reschedule or handle.remove() and accelerate again)"
            )
        wanted = scheduler_id(scheduler)
        if wanted is not None and self._scheduler is not None and wanted != self._scheduler:
            made, used = self._scheduler.split("(")[0], wanted.split("(")[0]
            raise PlanMismatchError(
                f"the sampler uses {used if used != made else f'another configuration of {used}'}, but the model "
                f"is accelerated with a schedule ({schedule.name}) made for {made}: accelerate for this sampler "
                "(handle.reschedule, or handle.remove() and accelerate again)"
            )
        self._fitting = (num_steps, scheduler)

    # -- whole-call graphs (bac.graphs) ------------------------------------------------
    @contextlib.contextmanager
    def scratch(self, name: str = "trace", start: int = 0) -> Iterator[None]:
        """Run this thread's denoiser calls in a fresh context ``name`` that leaves nothing behind: no cached
        value in another context, no count in :meth:`stats` (tracing a whole call into a graph,
        :mod:`bac.graphs`). Its first call is step ``start`` (see :meth:`new_trajectory`): call
        :meth:`begin_call` through the model as usual."""
        if start and not self.schedule.static:
            self.schedule.first_row(None)  # raises: a runtime rule cannot begin after step 0
        local, record = self._local, self._local.record
        saved = (local.state, record.fresh, record.closed, record.trajectories, record.calls)
        local.state = Context(name, self.schedule, len(self.spec.blocks), start)
        try:
            yield
        finally:
            local.state, record.fresh, record.closed, record.trajectories, record.calls = saved

    def count_graph_call(self, start: int = 0) -> None:
        """Count one sampling call that ran as a graph traced from this handle's static plan
        (:mod:`bac.graphs`): :meth:`stats` shows it as the engine would have run it, all of the plan's steps
        in this thread's active context. A graph decides nothing at run time, so this is bookkeeping only."""
        if not self.schedule.static:
            raise CacheStateError("only a static plan's calls run as graphs; a runtime rule decides per step")
        record = self._local.record
        record.restart(start)  # folds the previous call's counts in, as new_trajectory does
        state, limit = self._local.state, self.schedule.limit
        state.step = state.done = limit - 1
        record.fresh, record.closed = False, True
        record.trajectories += 1
        record.calls += limit - start

    # -- contexts --------------------------------------------------------------------
    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Run this thread's denoiser calls with the separate cache state ``name`` (e.g. one per CFG branch)."""
        local = self._local
        previous = local.state
        local.state = self._threads.context(name)
        try:
            yield
        finally:
            local.state = previous

    def drop_context(self, name: str) -> bool:
        """Forget this thread's context ``name`` and its cached values (a server's disconnected client).

        Contexts otherwise live as long as their thread, so a long-running server that names one per
        client would keep every departed client's cache. Its block counts stay in :meth:`stats` (added
        to this thread's ``"default"`` context). Returns whether the context existed; dropping the
        active context or ``"default"`` is an error.
        """
        local = self._local
        if name == "default" or name == local.state.name:
            raise ConfigError(f"cannot drop context {name!r}: it is "
                              f"{'the default context' if name == 'default' else 'active in this thread'}")
        record = local.record
        state = record.contexts.pop(name, None)
        if state is None:
            return False
        self._threads.context("default", record).add_counts(*state.counts())
        return True

    @property
    def active_context(self) -> str:
        """Name of this thread's active context."""
        return self._local.state.name

    @property
    def step(self) -> int:
        """Step index of this thread's last denoiser call in its active context (-1 before the first)."""
        return self._local.state.step

    def context_names(self) -> list[str]:
        """Names of this thread's live contexts (``"default"`` and every one made by :meth:`context` and not
        dropped), sorted."""
        return sorted(self._local.record.contexts)

    def steps_run(self) -> dict[str, int]:
        """Denoiser calls of this thread's current trajectory, per context that ran any."""
        return {name: state.step + 1 for name, state in self._local.record.contexts.items() if state.step >= 0}

    # -- removal ---------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the model exactly as it was.

        Then raises :class:`bac.CacheStateError` if this thread's last sampling
        call ran fewer denoiser calls than the plan covers (the model is
        restored all the same). Leaving ``with accelerate(...)`` on an
        exception restores without that check, so the exception is not masked.
        """
        self._remove(check=True)

    def _remove(self, check: bool) -> None:
        if get_handle(self.model) is not self:
            return
        short = self._local.record.short_runs(self.schedule) if check else {}
        for _, layer, adapter in self.spec.layers:
            adapter.uninstall(layer)
        for hook in self._step_hooks:
            hook.remove()
        detach(self.model, self)
        self._threads.reset()
        if short:
            raise _short_error(short, self.schedule.limit, "the last sampling call")

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._remove(check=exc_type is None)

    # -- statistics (bac.stats) ------------------------------------------------------
    def measure_flops(self, *args, **kwargs) -> dict[str, int]:
        """Count FLOPs of one full denoiser call per block (``torch.utils.flop_counter``).

        Runs the model once on ``args``/``kwargs`` with every block computed, in a
        scratch context, so the current trajectory is not disturbed.
        """
        return self._stats.measure_flops(self.model, args, kwargs)

    def stats(self) -> dict:
        """What ran and what was skipped, per block and per sampling call (all threads), and FLOPs saved.

        ``last_call`` is the calling thread's current (or last) sampling call.
        """
        return self._stats.stats(self.schedule, self.standin)

    def summary(self) -> str:
        """The statistics as a short human-readable report."""
        return self._stats.summary(self.schedule, self.standin)


def _short_error(short: dict[str, int], limit: int, when: str) -> CacheStateError:
    ran = ", ".join(f"{n} in context {name!r}" for name, n in short.items())
    return CacheStateError(
        f"{when} ran {ran} of the plan's {limit} denoising steps, so only the plan's first rows "
        "were used: the sampler runs fewer steps than the plan was made for. Make the plan for this sampler's "
        "step count, and pass num_steps= (the sampler's step count) to bac.accelerate to check it up front"
    )


def accelerate(
    model: nn.Module,
    schedule: Plan | Rule | Method,
    *,
    standin: str | Standin | None = None,
    num_steps: int | None = None,
    scheduler: Any = None,
    adapters: Mapping[type, LayerAdapter] | None = None,
    allow_other_weights: bool = False,
    tap: Tap | None = None,
    step_hooks: bool = True,
) -> CacheHandle:
    """Cache ``model``'s blocks; returns a :class:`CacheHandle`.

    ``schedule`` says when each block runs: a :class:`bac.Plan` (static), a
    runtime rule (:class:`bac.FirstBlockCache`, :class:`bac.CGTaylor`,
    :class:`bac.Sortblock`), or a :class:`bac.Method` built by name with
    :func:`bac.build_method`, which carries its own stand-in. ``standin`` says
    what stands in for a skipped block of a plan or rule: the last value
    (default, ``"reuse"``) or a Taylor forecast (``"taylor-1"``, ``"taylor-2"``,
    :class:`bac.Taylor`).

    ``num_steps`` and ``scheduler`` (the sampler's step count and scheduler, or
    its description) are checked against what a plan was made for; a runtime
    rule needs ``num_steps`` so that a sampling call that runs longer (a missed
    :func:`new_trajectory`, CFG branches sharing one context) is an error.
    Without ``num_steps``, a sampler that runs fewer steps than a plan covers
    is reported when its sampling call is over (docs/guide/core.md, "Inside the engine").
    Call ``handle.new_trajectory()`` (or ``bac.new_trajectory(model)``) at the
    start of every sampling call; ``handle.remove()`` undoes everything.

    A plan made from a calibration must be applied to the weights it was
    calibrated on (their digest is compared; the weights are hashed once per call
    of ``accelerate``), else
    :class:`bac.PlanMismatchError`; ``allow_other_weights=True`` applies it
    anyway (e.g. a plan calibrated on one checkpoint, knowingly reused for a
    fine-tuned one). Uncalibrated plans (``every-step``, ``uniform``,
    ``taylorseer``) fit any weights.

    ``tap(block_index, step, output, computed)``, for inspection (e.g. the
    error of every block's output against full computation,
    :mod:`benchmarks.block_errors`), is called after every block
    evaluation with the output the block hands on to the model: the value it
    computed (``computed=True``) or its stand-in's value at a skipped step
    (``computed=False``). ``step`` is the step index in the calling thread's
    active context (:attr:`CacheHandle.active_context` names it; every
    context is tapped, :meth:`CacheHandle.measure_flops`' scratch context
    ``"flops"`` too). The tap must not modify ``output``. Without a tap the
    runners are not wrapped, so it costs nothing when unused.

    ``step_hooks=False`` installs no torch hooks on ``model``: a framework with
    its own hook system calls :meth:`CacheHandle.begin_call` and
    :meth:`CacheHandle.end_call` around every denoiser call instead
    (``bac.diffusers`` does, from its ``HookRegistry`` hook).
    """
    spec = describe(model, adapters)
    bound, chosen, plan = _bind(spec, schedule, standin, num_steps, scheduler, allow_other_weights)
    return CacheHandle(model, spec, bound, chosen, plan=plan, tap=tap, step_hooks=step_hooks,
                       scheduler=_scheduler_made_for(plan, scheduler))


def _scheduler_made_for(plan: Plan | None, scheduler: Any) -> str | None:
    """The scheduler id a handle's schedule was made for: the plan's, else the one ``accelerate`` was given."""
    return (plan.scheduler if plan is not None else None) or scheduler_id(scheduler)


def _bind(spec: ModelSpec, schedule: Plan | Rule | Method, standin: str | Standin | None, num_steps: int | None,
          scheduler: Any, allow_other_weights: bool) -> tuple[BoundSchedule, Standin, Plan | None]:
    """The bound schedule, stand-in and plan (if static) of ``schedule`` on ``spec``, every fit checked."""
    if isinstance(schedule, Method):
        if standin is not None:
            raise ConfigError(f"method {schedule.name!r} already has its stand-in ({schedule.standin!r})")
        schedule, standin = schedule.schedule, schedule.standin
    if isinstance(schedule, Plan):
        schedule.check_fits(spec, num_steps=num_steps, scheduler=scheduler, allow_other_weights=allow_other_weights)
        chosen = make_standin(standin or schedule.fitted_standin() or REUSE)
        rows = rows_from_table(schedule.step_table(), chosen.keeps_history)
        bound = StaticRows(rows, schedule.num_steps, schedule.method, schedule.params, schedule.output_scales())
        return bound, chosen, schedule
    if isinstance(schedule, Rule):
        check_number(f"num_steps (a runtime rule, {schedule.name}, needs the sampler's step count)", num_steps, 1,
                     integer=True)
        chosen = make_standin(standin or schedule.standin or REUSE)
        return schedule.bind(spec, num_steps), chosen, None
    raise ConfigTypeError(f"schedule must be a bac.Plan, a runtime rule or a bac.Method, not {type(schedule).__name__}")


def output_tensor(output: Any) -> torch.Tensor:
    """A denoiser's prediction: the output itself, the first tensor of a tuple or list, or the ``sample`` of an
    output object (diffusers' ``Transformer2DModelOutput``); anything else is a :class:`bac.ConfigError`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        return output.sample
    raise ConfigError(f"a fitted timestep adjustment scales the denoiser's output, but it is a "
                      f"{type(output).__name__}: a tensor, a tuple of tensors or an object with a .sample tensor "
                      "can be scaled")


def scale_output(output: Any, scale: float) -> Any:
    """``output`` (see :func:`output_tensor`) with its prediction times ``scale``, in the same container."""
    scaled = output_tensor(output) * scale
    if isinstance(output, torch.Tensor):
        return scaled
    if isinstance(output, (tuple, list)):
        return type(output)([scaled, *output[1:]])
    return type(output)(**{**output, "sample": scaled})


def _input_shape(args: tuple, kwargs: dict) -> torch.Size | None:
    """Shape of a denoiser call's first tensor argument (positional, else keyword); ``None`` if it has none."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value.shape
    return None


def _shape_text(shape: torch.Size | None) -> str:
    return "(no tensor)" if shape is None else str(list(shape))


def abandon_trajectory(model: nn.Module) -> None:
    """:meth:`CacheHandle.abandon_trajectory` on ``model``'s handle; does nothing if it is not accelerated."""
    handle = get_handle(model)
    if handle is not None:
        handle.abandon_trajectory()


def new_trajectory(model: nn.Module, start: int = 0) -> None:
    """Mark the start of a sampling call on ``model``; does nothing if it is not accelerated.
    ``start``: its first denoiser call is that step of the schedule (a warm start, :meth:`CacheHandle.new_trajectory`).

    Policies call this at the top of their sampling function so that caching
    needs no other cooperation from the caller. Raises
    :class:`bac.CacheStateError` if the previous call ran fewer steps than the
    plan covers (:meth:`CacheHandle.new_trajectory`).
    """
    handle = get_handle(model)
    if handle is not None:
        handle.new_trajectory(start)
