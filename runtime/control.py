"""The real-time control loop: one robot at a fixed control rate, the next chunk sampled while the current one runs.

:func:`run_episodes` (the evaluator's loop) stops the world while a chunk is sampled, so a slow sampler costs
nothing there; on a robot the arm keeps moving on its last command. :func:`run_control_episode` keeps time:
every ``1 / control_hz`` it executes one action while an inference worker computes the next chunk, so whatever
the sampler's latency does to a robot (stale actions, deadline misses, a lower achieved rate) shows up here.
It runs on a :class:`VirtualClock` (deterministic) or a :class:`WallClock` (real time, a worker thread);
everything returned (:class:`EpisodeTrace`, :func:`summarize_runs`) is plain data. The timing model, tick by
tick: docs/guide/realtime.md ("The timing model").
"""
from __future__ import annotations

import math
import numbers
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import gymnasium as gym
import numpy as np
import torch

from bac.errors import ConfigError
from bac.policies.features import next_history  # the history rule select_action uses
from bac.policies.warm import WarmState, reads_last_chunk, real_time_chunked

from .episodes import STATE, ChunkingPolicy, EnvFactory, EnvPool, check_compatible, observation_batch, \
    observation_slices, render_settings

ON_LATE = ("hold", "continue")
#: real-time chunking's delay estimate without a modelled latency: the slowest of this many last chunks
DELAY_WINDOW = 10
LatencyModel = Callable[[int], float]


# ----------------------------------------------------------------------------------------------- clocks
class Job(Protocol):
    """One submitted inference: ``ready()`` once its result is visible; ``result() -> (value, latency_ms)``."""

    def ready(self) -> bool: ...

    def result(self) -> tuple[Any, float]: ...

    def discard(self) -> None: ...


class Clock(Protocol):
    """What the loop needs of time and of the inference worker: the only difference between a run on the
    wall clock and a simulated one."""

    name: str

    def start(self, dt: float) -> None: ...

    def now(self) -> float: ...

    def next_tick(self) -> bool: ...

    def submit(self, fn: Callable[[], Any], latency_ms: float | None = None) -> Job: ...


class _VirtualJob:
    def __init__(self, clock: "VirtualClock", value: Any, error: BaseException | None, latency_ms: float):
        self._clock, self._value, self._error, self.latency_ms = clock, value, error, latency_ms
        self._ready_ns = clock._now_ns + round(latency_ms * 1e6)

    def ready(self) -> bool:
        return self._clock._now_ns >= self._ready_ns

    def result(self) -> tuple[Any, float]:
        if self._error is not None:
            raise self._error
        return self._value, self.latency_ms

    def discard(self) -> None:
        pass


class VirtualClock:
    """Simulated time: ticks are exact (integer nanoseconds), an inference's result is visible ``latency``
    after its submission (its measured compute time, or the episode's ``latency_model``); reproducible."""

    name = "virtual"

    def __init__(self) -> None:
        self._now_ns, self._dt_ns = 0, 0

    def start(self, dt: float) -> None:
        self._now_ns, self._dt_ns = 0, round(dt * 1e9)

    def now(self) -> float:
        return self._now_ns / 1e9

    def next_tick(self) -> bool:
        self._now_ns += self._dt_ns
        return False  # simulated work takes no time: never an overrun

    def submit(self, fn: Callable[[], Any], latency_ms: float | None = None) -> _VirtualJob:
        begin = time.perf_counter()
        value, error = None, None
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - raised when the result is taken, as from a worker thread
            error = err
        measured = (time.perf_counter() - begin) * 1e3
        return _VirtualJob(self, value, error, measured if latency_ms is None else latency_ms)

    def close(self) -> None:
        pass

    def __enter__(self) -> "VirtualClock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _WallJob:
    def __init__(self, future: Future):
        self._future = future

    def ready(self) -> bool:
        return self._future.done()

    def result(self) -> tuple[Any, float]:
        return self._future.result()

    def discard(self) -> None:
        """Wait for it (a running thread cannot be stopped), so the policy is idle when the episode returns."""
        try:
            self._future.result()
        except Exception:  # noqa: BLE001 - an unused chunk's failure changes nothing
            pass


class WallClock:
    """Real time: ``time.monotonic``, a sleep to each tick, inference on one worker thread (the policy runs
    while the env steps). Reusable across episodes; ``close()`` (or ``with``) stops the thread."""

    name = "wall"

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bac-inference")
        self._t0, self._dt, self._deadline = time.monotonic(), 0.0, 0.0

    def start(self, dt: float) -> None:
        self._t0, self._dt, self._deadline = time.monotonic(), dt, 0.0

    def now(self) -> float:
        return time.monotonic() - self._t0

    def next_tick(self) -> bool:
        """Sleep to the next tick; True (an overrun) when the last tick's work ran past it. Deadlines are
        absolute, so sleep jitter does not accumulate; after an overrun the schedule restarts from now."""
        self._deadline += self._dt
        now = self.now()
        if now > self._deadline:
            self._deadline = now
            return True
        time.sleep(self._deadline - now)
        return False

    def submit(self, fn: Callable[[], Any], latency_ms: float | None = None) -> _WallJob:
        if latency_ms is not None:
            raise ConfigError("latency_model needs a VirtualClock: a WallClock measures the real latency")

        def timed() -> tuple[Any, float]:
            begin = time.perf_counter()
            value = fn()
            return value, (time.perf_counter() - begin) * 1e3

        return _WallJob(self._pool.submit(timed))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "WallClock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------- latency models
def constant_latency(ms: float) -> LatencyModel:
    """Every inference takes ``ms`` milliseconds (a :class:`VirtualClock` episode's ``latency_model``)."""
    return lambda call_index: float(ms)


def sampled_latency(samples_ms: Iterable[float], seed: int) -> LatencyModel:
    """Each inference takes one of ``samples_ms`` (e.g. a batch-1 latency benchmark of the sampler), drawn
    from ``seed`` and the call index alone: the same episode gets the same latencies whatever ran before."""
    samples = np.asarray(list(samples_ms), dtype=np.float64)
    if samples.size == 0 or not np.isfinite(samples).all() or (samples < 0).any():
        raise ConfigError("sampled_latency needs at least one finite, non-negative latency in ms")
    return lambda call_index: float(samples[np.random.default_rng([int(seed), int(call_index)]).integers(samples.size)])


def auto_lead(latencies_ms: Iterable[float], control_hz: float, execute_steps: int) -> int:
    """``lead="auto"``: ``ceil(max latency / dt) + 1`` ticks (the inference's ticks plus one of margin),
    clipped to ``[0, execute_steps]``."""
    worst = max(latencies_ms) / 1e3 * control_hz
    return int(min(execute_steps, max(0, math.ceil(worst - 1e-9) + 1)))


# ---------------------------------------------------------------------------------------------- traces
@dataclass
class ChunkRecord:
    """One chunk that took over: from the observation at ``start_tick``, visible at ``arrival_tick``."""

    index: int
    start_tick: int
    arrival_tick: int
    latency_ms: float
    delay_ticks: int  # arrival - start: the actions dropped at takeover
    missed_ticks: int  # deadline misses while the robot waited for it
    executed: int = 0  # its actions executed (blended ones included)


@dataclass
class EpisodeTrace:
    """One control episode. ``ticks`` are the control ticks that executed an action (= env ``steps``); the
    first chunk's wait (``first_wait_ticks``) is not among them, so on a :class:`VirtualClock`
    ``elapsed_s = (first_wait_ticks + ticks) * dt``. ``actions`` (executed, clipped, ``[ticks, A]``) and
    ``sources`` (per tick: ``(chunk index, action index)``, action index -1 when an action was held)
    are left out of :meth:`to_dict` unless asked for. ``warm``: for a policy whose calls read the last chunk (a
    warm start, real-time chunking), what its calls did (``calls``, ``warm_calls``, ``guided_calls``,
    ``evaluations``: denoiser evaluations; a call still in flight at the end included); ``None`` (and left out
    of :meth:`to_dict`) otherwise. Smoothness (:func:`smoothness`): ``seam_jumps``, the executed action's change
    at each tick a new chunk took over, and ``jerk``, the mean and 95th percentile of its second difference."""

    task: str
    seed: int
    clock: str
    control_hz: float
    execute_steps: int
    lead: int
    on_late: str
    blend: int
    success: bool
    steps: int
    ticks: int
    elapsed_s: float
    time_to_first_action_s: float
    first_wait_ticks: int
    chunks: list[ChunkRecord]
    missed_ticks: list[int]
    overrun_ticks: list[int]
    actions: np.ndarray = field(repr=False)
    sources: list[tuple[int, int]] = field(repr=False)
    warm: dict | None = None
    seam_jumps: list[float] = field(default_factory=list)
    jerk: dict = field(default_factory=dict)

    @property
    def achieved_hz(self) -> float:
        """Executed actions per second once the first action was executed (the wait for the first chunk is
        :attr:`time_to_first_action_s`, reported on its own)."""
        running = self.elapsed_s - self.time_to_first_action_s
        return self.ticks / running if running > 0 else float("nan")

    @property
    def latencies_ms(self) -> list[float]:
        return [c.latency_ms for c in self.chunks]

    @property
    def delays(self) -> list[int]:
        return [c.delay_ticks for c in self.chunks]

    @property
    def late_chunks(self) -> int:
        """Chunks that arrived after at least one deadline miss (one still awaited at the end counts too)."""
        return sum(c.missed_ticks > 0 for c in self.chunks) + (self.trailing_misses > 0)

    @property
    def trailing_misses(self) -> int:
        """Misses at the end of the episode, waiting for a chunk that never arrived."""
        return len(self.missed_ticks) - sum(c.missed_ticks for c in self.chunks)

    def to_dict(self, actions: bool = False) -> dict:
        left_out = ("actions", "sources") + (("warm",) if self.warm is None else ())
        out = {k: v for k, v in asdict(self).items() if k not in left_out}
        out.update(achieved_hz=self.achieved_hz, latencies_ms=self.latencies_ms, delays=self.delays,
                   late_chunks=self.late_chunks)
        if actions:
            out.update(actions=np.asarray(self.actions).tolist(), sources=[list(s) for s in self.sources])
        return out


def smoothness(actions: np.ndarray, sources: list[tuple[int, int]]) -> tuple[list[float], dict]:
    """``(seam_jumps, jerk)`` of an episode's executed actions ``[T, A]`` and their sources: the norm of
    ``a[t] - a[t-1]`` at each tick ``t`` whose action came from another chunk than the tick before's (a takeover,
    blended or not), and of the second difference ``a[t+1] - 2 a[t] + a[t-1]`` (Meta-World's actions are
    end-effector displacements, so this is the commanded motion's jerk up to a constant): ``{"mean", "p95",
    "ticks"}`` over the episode."""
    actions = np.asarray(actions, dtype=np.float64)
    seams = [float(np.linalg.norm(actions[t] - actions[t - 1])) for t in range(1, len(sources))
             if sources[t][0] != sources[t - 1][0] and sources[t][1] >= 0]
    if len(actions) < 3:
        return seams, {"mean": 0.0, "p95": 0.0, "ticks": 0}
    second = np.linalg.norm(actions[2:] - 2 * actions[1:-1] + actions[:-2], axis=1)
    return seams, {"mean": float(second.mean()), "p95": float(np.percentile(second, 95)), "ticks": int(second.size)}


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class _Chunk:
    record: ChunkRecord
    actions: np.ndarray  # [H, A]: index i is the action for tick t0 + i

    @property
    def t0(self) -> int:
        return self.record.start_tick


def _int_in(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


@dataclass(frozen=True)
class _Settings:
    """:func:`run_control_episode`'s settings, checked. ``control_hz`` as given (the trace records its float);
    ``lead`` is ``"auto"`` until the first chunk's latency resolves it."""

    control_hz: numbers.Real
    horizon: int
    execute_steps: int
    lead: int | str
    on_late: str
    blend: int
    max_steps: int | None
    adapt_lead: bool  # as given: only its truth is read

    @property
    def dt(self) -> float:
        return 1.0 / float(self.control_hz)


def _check_settings(policy, control_hz, execute_steps, lead, on_late, blend, max_steps, adapt_lead) -> _Settings:
    if isinstance(control_hz, bool) or not isinstance(control_hz, numbers.Real) or not math.isfinite(control_hz) \
            or control_hz <= 0:
        raise ConfigError(f"control_hz must be a positive number of ticks per second, got {control_hz!r}")
    horizon = int(policy.horizon)
    s = _int_in(f"execute_steps (actions per chunk; the policy's horizon is {horizon})",
                policy.n_action_steps if execute_steps is None else execute_steps, 1, horizon)
    if lead != "auto":
        lead = _int_in(f"lead (ticks before a chunk's planned end; 'auto' or at most execute_steps={s})",
                       lead, 0, s)
    if on_late not in ON_LATE:
        raise ConfigError(f"on_late must be one of {ON_LATE}, got {on_late!r}")
    blend = _int_in(f"blend (actions crossfaded after a takeover; at most the horizon {horizon})", blend, 0, horizon)
    if max_steps is not None:
        max_steps = _int_in("max_steps", max_steps, 1, 2**62)
    return _Settings(control_hz, horizon, s, lead, on_late, blend, max_steps, adapt_lead)


class _Schedule:
    """The chunk bookkeeping of one episode: which chunk runs, its planned end, misses, blending.
    Pure (no env, no clock): every rule of the timing model (docs/guide/realtime.md) is here."""

    def __init__(self, horizon: int, s: int, on_late: str, blend: int):
        self.horizon, self.s, self.on_late, self.blend = horizon, s, on_late, blend
        self.chunks: list[_Chunk] = []
        self.current: _Chunk | None = None
        self.planned_end = 0
        self.missed: list[int] = []
        self.pending_misses = 0
        self.previous: tuple[_Chunk, int, np.ndarray | None] | None = None  # chunk, planned end, held action
        self.since_takeover = 0
        self.last: np.ndarray | None = None  # the last executed action
        self.holding = False  # whether the last executed action was a held one

    def take_over(self, actions: np.ndarray, latency_ms: float, t_start: int, tick: int) -> None:
        record = ChunkRecord(len(self.chunks), t_start, tick, float(latency_ms), tick - t_start, self.pending_misses)
        new = _Chunk(record, actions)
        self.pending_misses = 0
        if self.current is not None:
            self.previous = (self.current, self.planned_end, self.last if self.holding else None)
        self.chunks.append(new)
        self.current, self.since_takeover = new, 0
        # s actions from now, or fewer when the chunk arrived so late that its last action comes first
        self.planned_end = min(tick + self.s, t_start + self.horizon)

    def _late(self, chunk: _Chunk, end: int, held: np.ndarray | None, tick: int) -> tuple[np.ndarray, int]:
        """What ``chunk`` (planned to end at ``end``) executes at ``tick`` past its plan: ``(action, index)``,
        index -1 for a held action (``held``, else the last action it would have executed)."""
        index = tick - chunk.t0
        if self.on_late == "continue" and index < self.horizon:
            return chunk.actions[index], index
        if held is None:
            held = chunk.actions[(self.horizon if self.on_late == "continue" else end - chunk.t0) - 1]
        return held, -1

    def _blended(self, tick: int, action: np.ndarray) -> np.ndarray:
        """``action`` crossfaded from what the previous chunk would execute at ``tick``, for the first ``blend``
        ticks after a takeover (a step between two chunks' plans jolts the robot)."""
        if self.since_takeover >= self.blend or self.previous is None:
            return action
        before, before_end, held = self.previous
        if tick < before_end:
            old = before.actions[tick - before.t0]
        else:
            old, _ = self._late(before, before_end, held, tick)
        w = (self.since_takeover + 1) / (self.blend + 1)
        return (1 - w) * np.asarray(old, np.float64) + w * np.asarray(action, np.float64)

    def action(self, tick: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The action for ``tick`` (before clipping) and its source ``(chunk index, action index)``."""
        current = self.current
        if tick < self.planned_end:
            index = tick - current.t0
            action = self._blended(tick, current.actions[index])
        else:  # a deadline miss: the next chunk is not here
            self.missed.append(tick)
            self.pending_misses += 1
            action, index = self._late(current, self.planned_end, self.last, tick)
        if index >= 0:
            current.record.executed += 1
        self.since_takeover += 1
        self.holding = index < 0
        return action, (current.record.index, index)


class _Robot:
    """The env as the loop drives it: observations turned into the policy's inputs, actions clipped and stepped."""

    def __init__(self, policy: ChunkingPolicy, env: gym.vector.VectorEnv, task: str, instruction: str | None):
        if getattr(env, "num_envs", None) != 1:
            raise ConfigError(f"the control loop drives one robot: pass a vector env of 1 env "
                              f"(make_env(task, 1, ...)), got num_envs={getattr(env, 'num_envs', None)}")
        self.named_slices = observation_slices(env)
        check_compatible(policy, env.single_observation_space, env.single_action_space, self.named_slices)
        reads_instructions = bool(getattr(policy, "reads_instructions", False))
        if reads_instructions != (instruction is not None):
            raise ConfigError("this policy reads free-text instructions: pass instruction='...'" if reads_instructions
                              else "this policy reads task names, not instructions")
        self.policy, self.env = policy, env
        self.task_input = instruction if instruction is not None else task
        self.low, self.high = env.single_action_space.low, env.single_action_space.high
        self.n_obs = int(policy.n_obs_steps)

    def history(self, obs: np.ndarray, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The observation history after ``obs`` (the first one repeated when there is no ``previous``), by the
        rule select_action uses."""
        state = observation_batch(obs, self.task_input, self.policy, named_slices=self.named_slices)[STATE]
        return next_history(previous, state, self.n_obs)

    def batch(self, obs: np.ndarray, history: torch.Tensor) -> dict:
        """An inference's input: cameras rendered now (only when the policy reads them), its own history copy."""
        return {**observation_batch(obs, self.task_input, self.policy, self.env, render=True), STATE: history.clone()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        """Execute ``action`` clipped to the action space: ``(the executed action, observation, ended, success)``."""
        action = np.clip(action, self.low, self.high)
        obs, _, terminated, truncated, info = self.env.step(action[None])
        success = bool(np.asarray(info["success"])[0])
        return action, obs, bool(terminated[0] or truncated[0]), success


class _Inference:
    """Starts chunk inferences on the clock (each with its latency) and checks the chunks they return.

    ``warm_state``: a warm-started policy's state for this episode's calls (``None``: the policy is called as
    any policy is, ``predict_action_chunk(batch, generator=..., num_actions=...)``)."""

    def __init__(self, robot: _Robot, clock: Clock, generator: torch.Generator | None, horizon: int,
                 latency_model: LatencyModel | None, warm_state: WarmState | None = None,
                 control_hz: float = 0.0):
        self.robot, self.clock, self.generator, self.horizon = robot, clock, generator, horizon
        self.latency_model, self.warm_state, self.control_hz = latency_model, warm_state, float(control_hz)
        self.rtc = real_time_chunked(robot.policy)
        self.latencies: list[float] = []  # ms, of the chunks returned so far
        self.chunk_shape = (horizon, *robot.env.single_action_space.shape)
        self.calls = 0
        self.last_tick = 0  # the observation tick of the last inference: its chunk's index 0 is that tick's action

    def submit(self, obs: np.ndarray, history: torch.Tensor, tick: int) -> Job:
        """Render (if the policy reads cameras) and start the inference from this observation history, taken at
        ``tick``."""
        batch = self.robot.batch(obs, history)
        kwargs: dict[str, Any] = {"generator": self.generator, "num_actions": self.horizon}
        if self.warm_state is not None:
            # The last chunk's index i is the action for tick last_tick + i, this one's index 0 for tick: the prior
            # advances by the ticks between the two observations, whatever the delay drops at takeover (the
            # same ticks of both). A chunk that has run out (shift >= horizon) is no prior: the call is cold.
            kwargs.update(warm_state=self.warm_state, shift=tick - self.last_tick)
        self.last_tick = tick
        latency = self._modelled_latency()
        if self.rtc:  # real-time chunking freezes the actions the last chunk still runs while this one is computed
            kwargs["delay"] = self._expected_delay(latency)

        def infer() -> np.ndarray:
            chunk = self.robot.policy.predict_action_chunk(batch, **kwargs)
            return chunk[0].detach().cpu().numpy()

        self.calls += 1
        return self.clock.submit(infer, latency)

    def _expected_delay(self, modelled_ms: float | None) -> int:
        """Ticks from this observation to its chunk's takeover: from the modelled latency when there is one,
        else from the slowest of the last :data:`DELAY_WINDOW` chunks (0 before the first)."""
        window = [modelled_ms] if modelled_ms is not None else self.latencies[-DELAY_WINDOW:]
        if not window:
            return 0
        return max(0, math.ceil(max(window) / 1e3 * self.control_hz - 1e-9))

    def _modelled_latency(self) -> float | None:
        if self.latency_model is None:
            return None
        latency = float(self.latency_model(self.calls))
        if not math.isfinite(latency) or latency < 0:
            raise ConfigError(f"latency_model({self.calls}) gave {latency!r}; latencies are finite, non-negative ms")
        return latency

    def result(self, job: Job) -> tuple[np.ndarray, float]:
        """``(chunk [H, A], latency_ms)``; a chunk of another shape is refused."""
        actions, latency_ms = job.result()
        actions = np.asarray(actions)
        if actions.shape != self.chunk_shape:
            raise ValueError(f"policy returned a chunk of shape {[1, *actions.shape]}, expected "
                             f"{[1, *self.chunk_shape]} (predict_action_chunk(..., num_actions={self.horizon}))")
        self.latencies.append(float(latency_ms))
        return actions, latency_ms


@dataclass
class _TickState:
    """The episode so far, carried from tick to tick."""

    obs: np.ndarray
    history: torch.Tensor  # the last n_obs_steps observations, as the next inference reads them
    lead: int | str
    tick: int = 0
    job: Job | None = None  # the inference in flight
    job_start: int = 0  # the tick its observation was taken at
    success: bool = False
    first_wait_ticks: int = 0
    first_action_s: float = 0.0
    elapsed_s: float = 0.0
    executed: list[np.ndarray] = field(default_factory=list)
    sources: list[tuple[int, int]] = field(default_factory=list)
    overruns: list[int] = field(default_factory=list)


class _ControlLoop:
    """One episode's ticks: each takes over a chunk that arrived, requests the next one when it is due and
    executes one action."""

    def __init__(self, settings: _Settings, robot: _Robot, inference: _Inference, clock: Clock, obs: np.ndarray):
        self.settings, self.robot, self.inference, self.clock = settings, robot, inference, clock
        self.plan = _Schedule(settings.horizon, settings.execute_steps, settings.on_late, settings.blend)
        self.state = _TickState(obs, robot.history(obs), settings.lead)

    def run(self) -> None:
        self.clock.start(self.settings.dt)
        self._first_chunk()
        state = self.state
        while True:
            self._take_over_if_ready()
            self._request_if_due()
            self._take_over_if_ready()  # a result visible at once (zero latency) executes from this tick
            if self._execute_action():
                break
            state.history = self.robot.history(state.obs, state.history)
            if self.clock.next_tick():
                state.overruns.append(state.tick)
            state.tick += 1
        if self.clock.next_tick():  # close the last tick's period: the elapsed time covers every tick
            state.overruns.append(state.tick)
        state.elapsed_s = self.clock.now()

    def _first_chunk(self) -> None:
        """The robot waits for its first chunk: time passes, the env does not step."""
        state = self.state
        state.job = self.inference.submit(state.obs, state.history, state.tick)
        while not state.job.ready():
            self.clock.next_tick()
            state.first_wait_ticks += 1
        state.first_action_s = self.clock.now()
        self._take_over()  # at tick 0, its observation's tick: nothing is dropped
        if state.lead == "auto":
            state.lead = self._lead_for(self.plan.chunks[0].record.latency_ms)

    def _take_over_if_ready(self) -> None:
        state = self.state
        if state.job is None or not state.job.ready():
            return
        self._take_over()
        if self.settings.adapt_lead:  # track the inference's own delay: calls in the loop run slower than a benchmark's
            state.lead = max(state.lead, self._lead_for(self.plan.chunks[-1].record.latency_ms))

    def _take_over(self) -> None:
        """The finished inference's chunk runs from this tick (the actions for the ticks it took are dropped)."""
        state = self.state
        self.plan.take_over(*self.inference.result(state.job), t_start=state.job_start, tick=state.tick)
        state.job = None

    def _lead_for(self, latency_ms: float) -> int:
        return auto_lead([latency_ms], self.settings.control_hz, self.settings.execute_steps)

    def _request_if_due(self) -> None:
        """Start the next inference ``lead`` ticks before the running chunk's planned end (one at a time)."""
        state = self.state
        if state.job is None and state.tick >= self.plan.planned_end - state.lead:
            state.job, state.job_start = self.inference.submit(state.obs, state.history, state.tick), state.tick

    def _execute_action(self) -> bool:
        """Execute this tick's action; True when the episode is over (the env ended it, or ``max_steps``)."""
        state = self.state
        action, source = self.plan.action(state.tick)
        action, state.obs, ended, success = self.robot.step(action)
        self.plan.last = action
        state.executed.append(action)
        state.sources.append(source)
        state.success |= success
        return ended or (self.settings.max_steps is not None and len(state.executed) >= self.settings.max_steps)

    def discard_pending(self) -> None:
        """Wait for an inference still in flight, so the policy is idle when the episode returns."""
        if self.state.job is not None:
            self.state.job.discard()

    def trace(self, task: str, seed: int) -> EpisodeTrace:
        """The finished episode, as plain data."""
        settings, state, clock = self.settings, self.state, self.clock
        actions = np.stack(state.executed)
        seam_jumps, jerk = smoothness(actions, state.sources)
        return EpisodeTrace(
            task=task, seed=int(seed), clock=getattr(clock, "name", type(clock).__name__),
            control_hz=float(settings.control_hz), execute_steps=settings.execute_steps, lead=int(state.lead),
            on_late=settings.on_late, blend=settings.blend, success=bool(state.success), steps=len(state.executed),
            ticks=len(state.executed), elapsed_s=float(state.elapsed_s),
            time_to_first_action_s=float(state.first_action_s), first_wait_ticks=state.first_wait_ticks,
            chunks=[c.record for c in self.plan.chunks], missed_ticks=self.plan.missed,
            overrun_ticks=state.overruns, actions=actions, sources=state.sources,
            warm=None if self.inference.warm_state is None else self.inference.warm_state.counts(),
            seam_jumps=seam_jumps, jerk=jerk)


def run_control_episode(
    policy: ChunkingPolicy,
    env: gym.vector.VectorEnv,
    task: str,
    *,
    seed: int,
    control_hz: float,
    clock: Clock | None = None,
    generator: torch.Generator | None = None,
    execute_steps: int | None = None,
    lead: int | str = "auto",
    adapt_lead: bool = False,
    on_late: str = "hold",
    blend: int = 0,
    instruction: str | None = None,
    max_steps: int | None = None,
    latency_model: LatencyModel | None = None,
) -> EpisodeTrace:
    """One seeded episode of ``policy`` driving a 1-env vector env (an env factory's ``make_env(task, 1,
    terminate_on_success=True)``, or :func:`make_control_env`) at ``control_hz``; the timing model is in
    docs/guide/realtime.md.

    ``clock``: :class:`VirtualClock` (default) or :class:`WallClock`. ``generator``: the sampling noise
    (default torch's global RNG). ``execute_steps``: actions planned per chunk (default the policy's
    ``n_action_steps``). ``lead``: ``"auto"`` or ticks in ``[0, execute_steps]``; ``adapt_lead``: after
    every chunk, raise the lead to :func:`auto_lead` of that chunk's latency when that is larger (a
    controller tracking its own inference delay: calls inside the loop run slower than a benchmark's,
    and their tail is what misses deadlines). ``on_late``: ``"hold"`` or
    ``"continue"``. ``blend``: actions crossfaded after a takeover. ``instruction``: required for a policy
    that reads instructions, refused otherwise. ``max_steps``: a step cap besides the env's own.
    ``latency_model(call_index) -> ms`` (virtual clock only): each inference's latency instead of its
    measured compute time (call 0 is the first chunk). The episode ends at its first success or a cap.
    The policy needs ``predict_action_chunk(batch, generator=..., num_actions=...)``, ``horizon``,
    ``n_obs_steps`` and ``n_action_steps`` (``bac.policies.policy.DiffusionPolicy`` has them).

    A warm-started policy (``policy.warm`` set: ``DiffusionPolicy.with_warm_start``) gets a fresh
    :class:`~bac.policies.warm.WarmState` for the episode and, at every call, ``warm_state=`` and ``shift=``
    (the ticks since the last call's observation, which its chunk's index 0 is the action for); the trace's
    ``warm`` counts its calls, warm calls and denoiser evaluations. A view with real-time chunking
    (``policy.rtc`` set: ``DiffusionPolicy.with_rtc``) gets the same state and, at every call, ``delay=``: the
    ticks until its chunk takes over, from ``latency_model`` when given, else from the slowest of the last
    :data:`DELAY_WINDOW` chunks' latencies (the actions the running chunk executes meanwhile are frozen).
    It assumes the running chunk runs on while the next is computed (a lead covering the latency, or
    ``on_late="continue"``).
    """
    settings = _check_settings(policy, control_hz, execute_steps, lead, on_late, blend, max_steps, adapt_lead)
    robot = _Robot(policy, env, task, instruction)
    clock = VirtualClock() if clock is None else clock
    warm_state = WarmState() if reads_last_chunk(policy) else None
    inference = _Inference(robot, clock, generator, settings.horizon, latency_model, warm_state, settings.control_hz)
    obs, _ = env.reset(seed=[int(seed)])
    policy.reset()
    loop = _ControlLoop(settings, robot, inference, clock, obs)
    try:
        loop.run()
    finally:
        loop.discard_pending()
        policy.reset()
    return loop.trace(task, seed)


def make_control_env(policy: ChunkingPolicy, task: str, *, make_env: EnvFactory | None = None,
                     pool: EnvPool | None = None, max_episode_steps: int | None = None) -> gym.vector.VectorEnv:
    """The 1-env vector env :func:`run_control_episode` drives: ends at success, renders the policy's cameras
    at its image size. From ``pool`` (an :class:`EnvPool`), the pooled env (reused across episodes; the
    pool closes it); from ``make_env`` (an env factory), a new one the caller closes."""
    if (make_env is None) == (pool is None):
        raise ValueError("make_control_env needs make_env (an env factory) or pool (an EnvPool), not both")
    render = render_settings(policy)
    if pool is not None:
        return pool.get(task, 1, max_episode_steps, render)
    return make_env(task, 1, max_episode_steps=max_episode_steps, terminate_on_success=True, **render)


# -------------------------------------------------------------------------------------------- summary
def _nearest_rank(values: np.ndarray, q: float) -> float:
    """The nearest-rank percentile: an observed sample, never an interpolation beyond the largest."""
    return float(values[max(0, math.ceil(q / 100 * values.size) - 1)])


def summarize_runs(traces: Iterable[EpisodeTrace | Mapping[str, Any]], warmup_chunks: int = 1) -> dict:
    """Latency, deadline and rate statistics over episodes (traces or their ``to_dict()``).

    The first ``warmup_chunks`` chunks of each episode (the one the robot waits for, with the first call's
    one-off costs) are left out of the latency percentiles (nearest rank, over every episode's remaining
    chunks), of the mean delay and of the misses (misses while waiting for a warm-up chunk). ``notes``
    says when a tail percentile rests on too few samples to be more than the largest one. Episodes of a
    warm-started policy add ``warm``: their calls, warm calls and denoiser evaluations summed, with
    ``evaluations_per_call`` (every call counted, the warm-up chunk's too). ``smoothness`` summarises the
    episodes' seam jumps and jerk (:func:`smoothness`); ``steps_to_success`` is the mean steps of the
    successful episodes (``None`` without one).
    """
    warmup_chunks = _int_in("warmup_chunks", warmup_chunks, 0, 2**31)
    rows = [t.to_dict() if isinstance(t, EpisodeTrace) else dict(t) for t in traces]
    if not rows:
        raise ValueError("summarize_runs needs at least one episode trace")
    latencies, delays, misses, late = [], [], 0, 0
    for row in rows:
        chunks = [dict(c) if isinstance(c, Mapping) else asdict(c) for c in row["chunks"]]
        kept = chunks[warmup_chunks:]
        latencies += [c["latency_ms"] for c in kept]
        delays += [c["delay_ticks"] for c in kept]
        trailing = len(row["missed_ticks"]) - sum(c["missed_ticks"] for c in chunks)  # awaiting a chunk at the end
        misses += sum(c["missed_ticks"] for c in kept) + trailing
        late += sum(c["missed_ticks"] > 0 for c in kept) + (trailing > 0)
    ticks = sum(r["ticks"] for r in rows)
    elapsed = sum(r["elapsed_s"] - r["time_to_first_action_s"] for r in rows)  # the rate once running
    values = np.sort(np.asarray(latencies, dtype=np.float64))
    notes = []
    if values.size:
        latency = {"samples": int(values.size), "p50": _nearest_rank(values, 50), "p95": _nearest_rank(values, 95),
                   "p99": _nearest_rank(values, 99), "max": float(values[-1]), "mean": float(values.mean())}
        for q, enough in ((95, 20), (99, 100)):
            if values.size < enough:
                notes.append(f"p{q} of {values.size} samples = the largest")
    else:
        latency = {"samples": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
        notes.append(f"no chunk after the first {warmup_chunks} of any episode: no latency statistics")
    summary = {
        "episodes": len(rows),
        "success_rate": sum(bool(r["success"]) for r in rows) / len(rows),
        "warmup_chunks": warmup_chunks,
        "latency_ms": latency,
        "mean_delay_ticks": float(np.mean(delays)) if delays else None,
        "missed_ticks": int(misses),
        "miss_rate": misses / ticks if ticks else None,
        "late_chunks": int(late),
        "ticks": int(ticks),
        "achieved_hz": ticks / elapsed if elapsed > 0 else None,
        "control_hz": sorted({float(r["control_hz"]) for r in rows}),
        "time_to_first_action_s": float(np.mean([r["time_to_first_action_s"] for r in rows])),
        "overruns": int(sum(len(r["overrun_ticks"]) for r in rows)),
        "notes": notes,
    }
    summary["smoothness"] = _smoothness_summary(rows)
    successes = [r["steps"] for r in rows if r["success"]]
    summary["steps_to_success"] = float(np.mean(successes)) if successes else None
    warm = [r["warm"] for r in rows if r.get("warm") is not None]
    if warm:
        totals = {key: int(sum(w.get(key, 0) for w in warm)) for key in ("calls", "warm_calls", "guided_calls",
                                                                         "evaluations")}
        summary["warm"] = {**totals, "evaluations_per_call": totals["evaluations"] / max(totals["calls"], 1)}
    return summary


def _smoothness_summary(rows: list[dict]) -> dict | None:
    """Seam jumps pooled over every takeover (mean, nearest-rank p95) and jerk (the tick-weighted mean, and the
    mean over episodes of each one's p95), of episodes that recorded them."""
    rows = [r for r in rows if r.get("jerk")]
    if not rows:
        return None
    seams = np.sort(np.asarray([j for r in rows for j in r.get("seam_jumps", [])], dtype=np.float64))
    ticks = sum(r["jerk"]["ticks"] for r in rows)
    return {"seams": int(seams.size),
            "seam_jump_mean": float(seams.mean()) if seams.size else None,
            "seam_jump_p95": _nearest_rank(seams, 95) if seams.size else None,
            "jerk_mean": sum(r["jerk"]["mean"] * r["jerk"]["ticks"] for r in rows) / ticks if ticks else None,
            "jerk_p95": float(np.mean([r["jerk"]["p95"] for r in rows]))}


def format_summary(summary: Mapping[str, Any]) -> str:
    """One readable line of :func:`summarize_runs`' output."""
    lat = summary["latency_ms"]
    if lat["samples"]:
        latency = (f"latency p50 {lat['p50']:.1f} / p95 {lat['p95']:.1f} / p99 {lat['p99']:.1f} / max "
                   f"{lat['max']:.1f} ms over {lat['samples']} chunks")
    else:
        latency = "no latency samples"
    rate = summary["achieved_hz"]
    parts = [f"{summary['episodes']} episodes, success {summary['success_rate']:.0%}", latency,
             f"mean delay {summary['mean_delay_ticks'] or 0:.2f} ticks",
             f"{summary['missed_ticks']} missed ticks in {summary['late_chunks']} late chunks",
             f"achieved {rate:.1f} Hz" if rate is not None else "no ticks",
             f"first action after {summary['time_to_first_action_s'] * 1e3:.0f} ms"]
    if summary["overruns"]:
        parts.append(f"{summary['overruns']} overruns")
    if "warm" in summary:
        warm = summary["warm"]
        parts.append(f"{warm['warm_calls']} of {warm['calls']} calls warm, "
                     f"{warm['evaluations_per_call']:.2f} evaluations per call")
    return "; ".join(parts) + (f" ({'; '.join(summary['notes'])})" if summary["notes"] else "")
