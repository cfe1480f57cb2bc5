"""The policy server's per-client state and the one thread every policy call runs on.

Each connection is a :class:`Session`: its observation history, its noise generator, its cache context
(named by the session id) and, for a policy that reads the last chunk (a warm start, real-time chunking), that
chunk's state. :class:`InferenceThread` runs every policy call, a session's or the warm-up's, on one worker
thread in arrival order, so the policy, its sampler and its cache handle are never called concurrently; a
session's cache context lives on that thread (contexts are per thread), which is why it is also dropped there.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch

import bac
from bac.errors import ConfigError, DataError
from bac.policies.constants import STATE, TASK
from bac.policies.features import next_history
from bac.policies.warm import DEFAULT_JUMP, WarmState, jumped

from .protocol import (NUM_ACTIONS, Observation, parse_observation, reads_last_chunk, real_time_chunked,
                       synthetic_request, warm_started)


@dataclasses.dataclass(eq=False)
class Session:
    """One connection's state: never shared, dropped on disconnect.

    No lock guards it: its connection handler reads one message at a time and awaits the reply before the
    next, so a reset (on the event loop) and a policy call (on the inference thread) of one session never
    overlap, and the executor's future orders them. ``closed`` is set on the event loop and read on the
    inference thread (one bool): a departed client's queued call is skipped.
    """

    id: str
    peer: str
    generator: torch.Generator
    seed: int  # the server's default seed: a new episode's without a seed of its own
    history: torch.Tensor | None = None  # [1, n_obs_steps, D], what the next current observation is appended to
    # the last chunk, read only by a policy that reads it (a warm start, real-time chunking)
    warm: WarmState = dataclasses.field(default_factory=WarmState)
    requests: int = 0
    jumps: int = 0  # new episodes begun because the observation jumped (a policy that reads the last chunk)
    refused: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # error kind -> count
    closed: bool = False

    def reset(self, seed: int) -> None:
        """A new episode: the history cleared, the generator reseeded, the last chunk forgotten."""
        self.history = None
        self.generator.manual_seed(seed)
        self.warm.reset()

    def predict(self, policy: Any, observation: Observation) -> np.ndarray:
        """One policy call: the chunk ``[n, A]`` float32. The history is kept only if the call succeeded.

        For a policy that reads the last chunk, an observation that jumped from the last call's (:func:`jump_of`)
        begins a new episode first, as a reset without a seed would (openpi's client's ``reset()`` sends
        nothing), and the call continues this session's last chunk advanced by ``observation.shift`` actions
        (warm-starts from it; with real-time chunking, returns its first ``observation.delay`` actions unchanged
        and guides the rest of the overlap toward it)."""
        state = torch.from_numpy(observation.state)[None].to(policy.device)
        kwargs: dict[str, Any] = {"generator": self.generator}
        if reads_last_chunk(policy):
            self._new_episode_if_jumped(policy, state if state.ndim == 2 else state[:, -1])
            kwargs.update(warm_state=self.warm, shift=observation.shift)
        if real_time_chunked(policy):
            kwargs["delay"] = observation.delay
        history = state if state.ndim == 3 else next_history(self.history, state, policy.n_obs_steps)
        batch: dict[str, Any] = {STATE: history}
        if observation.task is not None:
            batch[TASK] = observation.task
        for key, image in observation.images.items():
            batch[key] = torch.from_numpy(image)[None].to(policy.device)
        if observation.num_actions is not None:
            kwargs[NUM_ACTIONS] = observation.num_actions
        actions = policy.predict_action_chunk(batch, **kwargs)
        self.history = history
        return np.ascontiguousarray(actions[0].detach().cpu().numpy(), dtype=np.float32)

    def _new_episode_if_jumped(self, policy: Any, current: torch.Tensor) -> None:
        """Reset (default seed) when the normalised current state ``[1, D]`` jumped from the last call's."""
        before = self.warm.observation
        if before is not None and jumped(before, policy.obs_normalizer(current), jump_of(policy)):
            self.reset(self.seed)
            self.jumps += 1


def jump_of(policy: Any) -> float:
    """The largest change of the normalised state a call continues the last chunk across: the warm start's
    ``jump``, else (real-time chunking alone) the default, which its calls use too."""
    return policy.warm.jump if warm_started(policy) else DEFAULT_JUMP


def new_session(session_id: str, peer: str, seed: int, device: torch.device | str) -> Session:
    return Session(session_id, peer, torch.Generator(device=device).manual_seed(seed), seed)


class Sessions:
    """The connected clients' sessions by id (``client-1``, ``client-2``, ...): opened and closed on the event
    loop, counted and listed from any thread (a copy of the ids)."""

    def __init__(self):
        self._open: dict[str, Session] = {}
        self._ids = itertools.count(1)

    def open(self, peer: str, seed: int, device: torch.device | str) -> Session:
        session = new_session(f"client-{next(self._ids)}", peer, seed, device)
        self._open[session.id] = session
        return session

    def close(self, session: Session) -> None:
        """Mark it closed (its queued work is skipped) and forget it; its cache context is dropped separately."""
        session.closed = True
        self._open.pop(session.id, None)

    def ids(self) -> list[str]:
        return list(self._open)

    def __len__(self) -> int:
        return len(self._open)


class InferenceThread:
    """ONE worker thread for every policy call (``handle``: the policy's cache handle, ``None`` if it is not
    accelerated); a ThreadPoolExecutor of 1 keeps its thread for its whole life and runs calls in FIFO order."""

    def __init__(self, policy: Any, handle: bac.CacheHandle | None):
        self.policy, self.handle = policy, handle
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bac-inference")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the inference thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the inference thread; blocks (not from the event loop)."""
        return self._executor.submit(fn, *args).result()

    def shutdown(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait)

    # -- on the inference thread -------------------------------------------------------------------
    def infer(self, session: Session, observation: Observation, submitted: float):
        """One policy call for ``session``: ``(actions [n, A], infer_ms, queue_ms)``, or ``None`` if the client
        left while it was queued."""
        started = time.perf_counter()
        if session.closed:
            return None
        with self._context(session.id):
            actions = session.predict(self.policy, observation)
        done = time.perf_counter()
        return actions, (done - started) * 1e3, (started - submitted) * 1e3

    def drop(self, session: Session) -> None:
        """Forget the session's cache context (after any of its calls still queued here: FIFO)."""
        if self.handle is not None:
            self.handle.drop_context(session.id)

    def warm_up(self, example: Mapping[str, Any] | None, calls: int, seed: int) -> None:
        """``calls`` policy calls on ``example`` (default: a synthetic request) in a scratch session, whose
        context is dropped after."""
        if not calls:
            return
        try:
            observation = parse_observation(self.policy, dict(example) if example is not None else
                                            synthetic_request(self.policy))
        except DataError as err:
            raise ConfigError(f"the warm-up example does not fit the policy: {err}") from err
        session = new_session("warmup", "", seed, self.policy.device)
        for _ in range(calls):
            self.infer(session, observation, time.perf_counter())
        self.drop(session)

    def _context(self, name: str) -> contextlib.AbstractContextManager:
        return self.handle.context(name) if self.handle is not None else contextlib.nullcontext()
