"""A websocket policy server: one accelerated policy serving action chunks to robot controllers.

    bac-serve checkpoint=dpt-metaworld sampler.kind=ddim sampler.steps=10 port=8000

openpi's message shapes (msgpack-encoded numpy arrays; metadata on connect, ``infer(obs) ->
{"actions": (H, A)}``), one inference thread, one session per connection (its own observation
history, generator and cache context). The protocol, message by message, for a client in any
language: ``docs/guide/server.md`` (the docs site's "The policy server" page).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import http
import inspect
import itertools
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

import bac
from bac.errors import BacError, ConfigError, DataError
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.config import IMAGE_PREFIX, STATE, TASK
from bac.policies.features import next_history
from bac.policies.policy import DiffusionPolicy
from bac.policies.vla import frames_to_images

from .msgpack_numpy import packb, unpackb

PROTOCOL, PROTOCOL_VERSION = "bac-policy-server", 1
NUM_ACTIONS = "num_actions"
RESET, SEED = "reset", "seed"
DEFAULT_PORT = 8000
logger = logging.getLogger("bac.runtime.server")  # also under python -m


# ----------------------------------------------------------------------------- the policy
def load_served_policy(checkpoint: str | Path, *, device: str = "cpu", sampler: str | None = None,
                       steps: int | None = None, tuned: str | Path | None = None, plan: str | Path | None = None,
                       method: str | None = None, method_params: Mapping[str, Any] | None = None):
    """Load a policy and accelerate it at most one way; returns ``(policy, source)`` (``source``: where its
    acceleration came from, for the metadata).

    ``tuned``: a ``python -m bac.tune`` result (sets the sampler too, so ``sampler``/``steps`` must be
    unset); ``plan``: a plan file; ``method``: an uncalibrated method by name with ``method_params``
    (a calibrated one, ``bac``/``acs``, needs a plan file: ``bac-plan``). Every problem is a
    :class:`bac.ConfigError` (or the plan's and checkpoint's own errors).
    """
    chosen = [name for name, value in (("tuned", tuned), ("plan", plan), ("method", method)) if value]
    if len(chosen) > 1:
        raise ConfigError(f"accelerate one way: set one of tuned, plan, method (got {chosen})")
    if method_params and not method:
        raise ConfigError(f"method_params {dict(method_params)} given without a method")
    policy = DiffusionPolicy.load(resolve_checkpoint(checkpoint), device=device)
    if tuned:
        if sampler is not None or steps is not None:
            raise ConfigError(f"{tuned} sets the sampler (the tuner's pick): leave sampler.kind and sampler.steps null")
        policy.use_tuned(tuned)
        return policy, {"tuned": str(tuned)}
    if sampler is not None or steps is not None:
        policy.set_sampler(sampler or policy.sampler_kind, steps)
    if plan:
        policy.accelerate(bac.Plan.load(plan))
        return policy, {"plan": str(plan)}
    if method:
        try:
            if bac.needs_calibration(method):
                raise ConfigError(f"method {method!r} plans from a calibration: make its plan file first "
                                  "(bac-plan, or python -m bac.tune) and pass plan=<file>")
            built = bac.build_method(method, policy.model, num_steps=policy.num_inference_steps,
                                     scheduler=policy.sampler, **dict(method_params or {}))
        except (ValueError, TypeError) as err:
            if isinstance(err, BacError):
                raise
            raise ConfigError(f"method {method!r} with {dict(method_params or {})}: {err}") from err
        policy.accelerate(built)
        return policy, {"method_source": "by name"}
    return policy, {}


def acceleration_summary(policy: Any, source: Mapping[str, Any] | None = None) -> dict | None:
    """What the policy's cache handle does (``None``: not accelerated), as plain data for the metadata."""
    handle = bac.get_handle(policy.model)
    if handle is None:
        return {"method": None, **source} if source else None
    info: dict[str, Any] = {"method": handle.schedule.name, "params": dict(handle.schedule.params),
                            **handle.standin.describe(), "static": bool(handle.schedule.static), **(source or {})}
    if handle.plan is not None:
        computed, skipped = handle.plan.computed_count(), handle.plan.skipped_count()
        info.update(num_steps=handle.plan.num_steps, blocks=len(handle.plan.blocks), computed=computed,
                    skipped=skipped, skipped_share=skipped / max(computed + skipped, 1))
    return json.loads(json.dumps(info, default=str))  # msgpack-safe: tuples, numpy numbers, paths


def metadata(policy: Any, checkpoint: str | None = None, source: Mapping[str, Any] | None = None) -> dict:
    """The map sent on connect (see the module docstring)."""
    features = {name: {"type": f.type, "shape": list(f.shape), **({"keys": list(f.keys)} if f.keys else {})}
                for name, f in policy.input_features.items()}
    return {
        "protocol": PROTOCOL,
        "protocol_version": PROTOCOL_VERSION,
        "server": {"bac": bac.__version__},
        "policy": {"type": "diffusion", "architecture": policy.architecture, "checkpoint": checkpoint,
                   "model": json.loads(json.dumps(policy.model_kwargs, default=str))},
        "features": features,
        "action": {"shape": list(policy.output_features["action"].shape)},
        "tasks": [] if policy.reads_instructions else list(policy.tasks),
        "reads_instructions": bool(policy.reads_instructions),
        "horizon": policy.horizon,
        "n_obs_steps": policy.n_obs_steps,
        "n_action_steps": policy.n_action_steps,
        "sampler": {"kind": policy.sampler_kind, "steps": policy.num_inference_steps},
        "acceleration": acceleration_summary(policy, source),
        "accepts_num_actions": accepts_num_actions(policy),
    }


def accepts_num_actions(policy: Any) -> bool:
    """Whether ``policy.predict_action_chunk`` takes ``num_actions=`` (the server passes it through)."""
    try:
        parameters = inspect.signature(policy.predict_action_chunk).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == NUM_ACTIONS or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# ----------------------------------------------------------------------------- requests
@dataclasses.dataclass
class Observation:
    """One checked request: ``state`` float32 ``[D]`` (current) or ``[n_obs_steps, D]`` (history), images
    float32 ``[3, S, S]`` in [0, 1] by feature name."""

    state: np.ndarray
    task: str | None
    images: dict[str, np.ndarray]
    num_actions: int | None = None


def _shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _array(key: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple, int, float, np.generic)) and not isinstance(value, bool):
        try:
            return np.asarray(value)
        except (ValueError, TypeError) as err:
            raise DataError(f"{key!r} is not a numeric array: {err}") from err
    raise DataError(f"{key!r} must be a numpy array (msgpack_numpy) or a list of numbers, got {type(value).__name__}")


def _check_finite(key: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        where = [list(map(int, i)) if array.ndim > 1 else int(i[0]) for i in np.argwhere(bad)[:4]]
        raise DataError(f"{key!r} contains NaN or inf (at {where}{'...' if bad.sum() > 4 else ''}); "
                        "send finite numbers")


def parse_observation(policy: Any, message: Mapping[str, Any]) -> Observation:
    """Check a request map against the policy's features; every problem is a :class:`bac.DataError` naming
    the key and what was expected. Checked here, before queueing, so a bad request is answered at once."""
    n, dim = policy.n_obs_steps, policy.obs_dim
    cameras = [name for name in policy.input_features if name.startswith(IMAGE_PREFIX)]
    known = [STATE, *cameras, *([TASK] if TASK in policy.input_features else []), NUM_ACTIONS]
    unknown = sorted(set(message) - set(known))
    if unknown:
        raise DataError(f"unknown key(s) {unknown}; this policy reads {known[:-1]} (and optional {NUM_ACTIONS!r}), "
                        f"or send {{{RESET!r}: true, {SEED!r}: int}}")
    missing = [key for key in known[:-1] if key not in message]
    if missing:
        raise DataError(f"observation is missing key(s) {missing}; this policy reads {known[:-1]} "
                        f"({STATE!r}: float [{dim}] or [{n}, {dim}])")

    state = _array(STATE, message[STATE])
    if state.dtype.kind not in "fiu":
        raise DataError(f"{STATE!r} has dtype {state.dtype} ({state.dtype.str}); send real numbers (float32)")
    if state.shape not in ((dim,), (n, dim)):
        raise DataError(f"{STATE!r} must have shape [{dim}] (the current observation) or [{n}, {dim}] (the last "
                        f"{n} observations), got {_shape_text(state.shape)}")
    state = state.astype(np.float32)  # a copy: decoded arrays are read-only views of the message
    _check_finite(STATE, state)

    task = message.get(TASK)
    if TASK in policy.input_features:
        if not isinstance(task, str) or not task.strip():
            raise DataError(f"{TASK!r} must be a string (" + ("the instruction" if policy.reads_instructions else
                            f"one of {policy.tasks}") + f"), got {type(task).__name__} {task!r}")
        if not policy.reads_instructions and task not in policy.tasks:
            raise DataError(f"{TASK!r}: unknown task {task!r}; this policy was trained on {policy.tasks}")

    images = {}
    for key in cameras:
        channels, height, width = policy.input_features[key].shape
        image = _array(key, message[key])
        expected = (f"uint8 [{height}, {width}, {channels}] (HWC, a rendered frame) or float [{channels}, {height}, "
                    f"{width}] (CHW, in [0, 1])")
        if image.dtype == np.uint8 and image.shape == (height, width, channels):
            image = frames_to_images(image.copy()).numpy()  # a copy: decoded arrays are read-only
        elif image.dtype.kind == "f" and image.shape == (channels, height, width):
            image = image.astype(np.float32)
            _check_finite(key, image)
            if image.min() < 0 or image.max() > 1:
                raise DataError(f"{key!r} has values in [{image.min():.3g}, {image.max():.3g}]; float images are "
                                "in [0, 1] (or send uint8 HWC)")
        else:
            raise DataError(f"{key!r} must be {expected}, got {image.dtype} {_shape_text(image.shape)}")
        images[key] = image

    num_actions = message.get(NUM_ACTIONS)
    if num_actions is not None:
        if isinstance(num_actions, np.integer):
            num_actions = int(num_actions)
        if not isinstance(num_actions, int) or isinstance(num_actions, bool) or not 1 <= num_actions <= policy.horizon:
            raise DataError(f"{NUM_ACTIONS!r} must be an integer in [1, horizon={policy.horizon}] (or left out for "
                            f"n_action_steps={policy.n_action_steps}), got {num_actions!r}")
    return Observation(state, task, images, num_actions)


def _error_text(err: BaseException) -> str:
    """``"<Kind>: <message>"``: ``DataError`` for a refused request, a bac error's class, else ``InternalError``
    (a bug: its exception type is named too)."""
    if isinstance(err, DataError):
        return f"DataError: {err}"
    if isinstance(err, BacError):
        return f"{type(err).__name__}: {err}"
    return f"InternalError: {type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- the server
@dataclasses.dataclass(eq=False)
class _Session:
    """One connection's state: never shared, dropped on disconnect."""

    id: str
    peer: str
    generator: torch.Generator
    history: torch.Tensor | None = None  # [1, n_obs_steps, D], what the next current observation is appended to
    requests: int = 0
    closed: bool = False  # queued work of a departed client is skipped


class PolicyServer:
    """Serve ``policy`` (a ``DiffusionPolicy``, accelerated or not) over a websocket (module docstring).

    ``port=0`` picks a free port (read :attr:`port` after :meth:`start`). ``warmup`` policy calls on
    ``example`` (a request map; default: a synthetic observation of the right shapes) run before the
    server listens, so the first robot request is not the slow one. ``seed``: the generator seed of a new
    session and of a reset without ``seed``. ``checkpoint``/``source``: named in the metadata.

    :meth:`start` serves from a background thread (tests, notebooks, the benchmark);
    :meth:`serve_forever` serves from the calling thread until SIGINT/SIGTERM. Either way
    :meth:`stop` shuts down gracefully: stop accepting, finish the requests in flight, close connections.
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, warmup: int = 3,
                 example: Mapping[str, Any] | None = None, seed: int = 0, checkpoint: str | None = None,
                 source: Mapping[str, Any] | None = None, max_message_bytes: int = 64 << 20,
                 shutdown_timeout: float = 30.0):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"warmup must be a number of calls >= 0, got {warmup!r}")
        self.policy = policy.eval() if hasattr(policy, "eval") else policy
        self.host, self.port = host, port
        self.warmup, self.example, self.seed = warmup, example, int(seed)
        self.max_message_bytes, self.shutdown_timeout = max_message_bytes, shutdown_timeout
        self.metadata = metadata(policy, checkpoint, source)
        self._metadata_bytes = packb(self.metadata)
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self.requests_served = 0
        self.errors = 0
        self._status = "starting"
        self._closing = False
        self._started = time.monotonic()
        # ONE worker thread for every policy call, so the policy, its sampler and its cache handle are never
        # called concurrently; a ThreadPoolExecutor of 1 keeps its thread for its whole life, in FIFO order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bac-inference")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._stop_requested: asyncio.Event | None = None
        self._busy = 0  # requests received and not yet answered
        self._idle: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- public ----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "PolicyServer":
        """A server from ``configs/serve.yaml``'s settings (the policy loaded and accelerated)."""
        policy, source = load_served_policy(
            cfg["checkpoint"], device=cfg.get("device", "cpu"), sampler=cfg["sampler"]["kind"],
            steps=cfg["sampler"]["steps"], tuned=cfg.get("tuned"), plan=cfg.get("plan"), method=cfg.get("method"),
            method_params=dict(cfg.get("method_params") or {}))
        return cls(policy, cfg.get("host", "127.0.0.1"), cfg.get("port", DEFAULT_PORT), warmup=cfg.get("warmup", 3),
                   seed=cfg.get("seed", 0), checkpoint=str(cfg["checkpoint"]), source=source,
                   max_message_bytes=int(cfg.get("max_message_mb", 64)) << 20,
                   shutdown_timeout=float(cfg.get("shutdown_timeout_s", 30)))

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def handle(self) -> bac.CacheHandle | None:
        return bac.get_handle(self.policy.model) if hasattr(self.policy, "model") else None

    @property
    def sessions(self) -> list[str]:
        """Ids of the connected clients' sessions."""
        return list(self._sessions)

    def health(self) -> dict:
        """What ``/healthz`` answers."""
        return {"status": self._status, "clients": len(self._sessions), "requests_served": self.requests_served,
                "errors": self.errors, "uptime_s": round(time.monotonic() - self._started, 3),
                "protocol_version": PROTOCOL_VERSION, "architecture": self.metadata["policy"]["architecture"]}

    def call_in_inference_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the inference thread and return its result (e.g. ``handle.stats()``, which
        must not race with a policy call). Blocks; not from the server's own event loop."""
        return self._executor.submit(fn, *args).result()

    def start(self, timeout: float | None = 120.0) -> "PolicyServer":
        """Warm up, then serve from a background thread; returns once listening (raises what startup raised)."""
        if self._thread is not None:
            raise RuntimeError("this server was already started")
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(signals=False)),
                                        name="bac-policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the policy server did not start within {timeout} s")
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self

    def serve_forever(self) -> None:
        """Warm up and serve from this thread until SIGINT/SIGTERM (or :meth:`stop` from another thread)."""
        asyncio.run(self._main(signals=True))

    def stop(self, timeout: float | None = None) -> None:
        """Shut down gracefully (idempotent): stop accepting, finish in-flight requests, close connections."""
        loop, event = self._loop, self._stop_requested
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just finished
                loop.call_soon_threadsafe(event.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.shutdown_timeout + 10)

    def __enter__(self) -> "PolicyServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------
    async def _main(self, signals: bool) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop_requested, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        try:
            try:
                await self._loop.run_in_executor(self._executor, self._warm_up)
                self._server = await serve(self._handle, self.host, self.port, process_request=self._http,
                                           max_size=self.max_message_bytes, compression=None)
            except OSError as err:
                raise ConfigError(f"cannot listen on {self.host}:{self.port}: {err}") from err
            self.port = self._server.sockets[0].getsockname()[1]
            if signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._loop.add_signal_handler(sig, self._stop_requested.set)
            self._status = "ok"
            logger.info("serving %s on %s (health: http://%s:%d/healthz)", self._describe(), self.url, self.host,
                        self.port)
        except BaseException as err:
            self._startup_error = err
            self._ready.set()
            self._executor.shutdown(wait=False)
            if signals:
                raise
            return
        self._ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True  # new requests are refused from here on
        self._server.close(close_connections=False)  # stop accepting connections; handlers keep running
        await asyncio.sleep(0)  # the close task's first step closes the listening socket
        self._status = "stopping"
        logger.info("stopping: finishing %d request(s) in flight", self._busy)
        try:
            await asyncio.wait_for(self._idle.wait(), self.shutdown_timeout)
        except asyncio.TimeoutError:
            logger.warning("requests still in flight after %.0f s; closing anyway", self.shutdown_timeout)
        for connection in list(self._server.connections):
            await connection.close(1001, "server shutting down")
        await self._server.wait_closed()
        self._executor.shutdown(wait=True)
        self._status = "stopped"
        logger.info("stopped after %d request(s)", self.requests_served)

    def _describe(self) -> str:
        m = self.metadata
        acceleration = (m["acceleration"] or {}).get("method") or "no caching"
        return (f"{m['policy']['checkpoint'] or m['policy']['architecture']} "
                f"({m['sampler']['kind']}-{m['sampler']['steps']}, {acceleration})")

    def _warm_up(self) -> None:
        """On the inference thread: ``warmup`` calls in a scratch session, whose context is dropped after."""
        if not self.warmup:
            return
        example = dict(self.example) if self.example is not None else self._synthetic_example()
        try:
            observation = parse_observation(self.policy, example)
        except DataError as err:
            raise ConfigError(f"the warm-up example does not fit the policy: {err}") from err
        session = _Session("warmup", "", torch.Generator(device=self.policy.device).manual_seed(self.seed))
        for _ in range(self.warmup):
            self._infer(session, observation, time.perf_counter())
        self._drop(session)

    def _synthetic_example(self) -> dict:
        """A request of the right shapes: the middle of the state's training range, grey images, a known task."""
        policy = self.policy
        middle = policy.obs_normalizer.inverse(torch.zeros(policy.obs_dim, device=policy.device))
        example: dict[str, Any] = {STATE: middle.cpu().numpy().astype(np.float32)}
        for name, feature in policy.input_features.items():
            if name.startswith(IMAGE_PREFIX):
                example[name] = np.full(feature.shape, 0.5, dtype=np.float32)
        if TASK in policy.input_features:
            if policy.reads_instructions:
                cached = list(getattr(policy.language, "entries", {}) or [])
                example[TASK] = cached[0] if cached else "pick up the object"
            else:
                example[TASK] = policy.tasks[0]
        return example

    # -- HTTP ------------------------------------------------------------------------
    def _http(self, connection: Any, request: Any) -> Any:
        """``/healthz`` answers JSON; anything else goes on to the websocket handshake."""
        if request.path.split("?")[0].rstrip("/") != "/healthz":
            return None
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        body = json.dumps(self.health()).encode()
        status = http.HTTPStatus.OK if self._status == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                           ("Connection", "close")])
        return Response(status.value, status.phrase, headers, body)

    # -- sessions --------------------------------------------------------------------
    async def _handle(self, connection: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        address = connection.remote_address
        peer = f"{address[0]}:{address[1]}" if address else "?"
        session = _Session(f"client-{next(self._ids)}", peer,
                           torch.Generator(device=self.policy.device).manual_seed(self.seed))
        self._sessions[session.id] = session
        logger.info("%s connected from %s", session.id, peer)
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            await connection.send(self._metadata_bytes)
            while True:
                message = await connection.recv()
                self._busy += 1
                self._idle.clear()
                try:
                    request = asyncio.ensure_future(self._reply(session, message))
                    await asyncio.wait({request, closed}, return_when=asyncio.FIRST_COMPLETED)
                    reply = request.result() if request.done() else None
                    if reply is None:  # the client left in the middle of its request
                        session.closed = True
                        break
                    await connection.send(reply)
                finally:
                    self._busy -= 1
                    if not self._busy:
                        self._idle.set()
        except ConnectionClosed:
            pass
        finally:
            session.closed = True
            closed.cancel()
            self._sessions.pop(session.id, None)
            # On the inference thread, after any call of this session still running there (FIFO).
            with contextlib.suppress(RuntimeError):  # the executor is shut down only after every handler returned
                await self._loop.run_in_executor(self._executor, self._drop, session)
            logger.info("%s disconnected after %d request(s)", session.id, session.requests)

    async def _reply(self, session: _Session, message: Any) -> bytes | str | None:
        """The reply frame to one message: packed actions / reset acknowledgement, or an error text
        (``None``: the client has left)."""
        try:
            if self._closing:
                raise Unavailable("the server is shutting down; reconnect to another instance or later")
            request = self._decode(message)
            if RESET in request:
                return packb(self._reset(session, request))
            observation = parse_observation(self.policy, request)
            if observation.num_actions is not None and not accepts_num_actions(self.policy):
                raise DataError(f"{NUM_ACTIONS!r}: this policy returns its n_action_steps "
                                f"({self.policy.n_action_steps}) actions per request and takes no {NUM_ACTIONS}; "
                                "leave the key out")
            result = await self._loop.run_in_executor(self._executor, self._infer, session, observation,
                                                      time.perf_counter())
            if result is None:  # the client left while its request was queued: nobody to answer
                return None
            actions, infer_ms, queue_ms = result
            self.requests_served += 1
            session.requests += 1
            return packb({"actions": actions, "server_timing": {"infer_ms": infer_ms, "queue_ms": queue_ms}})
        except Exception as err:  # noqa: BLE001 -- every failure is answered; the server keeps serving
            self.errors += 1
            if isinstance(err, BacError):
                logger.info("%s: refused: %s", session.id, err)
            else:
                logger.exception("%s: request failed", session.id)
            return _error_text(err)

    @staticmethod
    def _decode(message: Any) -> dict[str, Any]:
        if isinstance(message, str):
            raise DataError("got a text frame: send binary frames of msgpack (openpi's msgpack_numpy encoding)")
        try:
            request = unpackb(message)
        except Exception as err:  # msgpack's many exceptions, and malformed array maps
            raise DataError(f"could not decode the message as msgpack (openpi's msgpack_numpy encoding): "
                            f"{type(err).__name__}: {err}") from None
        if not isinstance(request, dict):
            raise DataError(f"a request is a msgpack map (dict) of observation keys, or {{{RESET!r}: true, "
                            f"{SEED!r}: int}}; got {type(request).__name__}")
        keys = {}
        for key, value in request.items():
            if isinstance(key, bytes):
                try:
                    key = key.decode()
                except UnicodeDecodeError:
                    raise DataError(f"request key {key!r} is not UTF-8 text") from None
            keys[key] = value
        return keys

    def _reset(self, session: _Session, request: dict[str, Any]) -> dict:
        extra = sorted(set(request) - {RESET, SEED})
        if request[RESET] is not True or extra:
            raise DataError(f"a reset message is {{{RESET!r}: true, {SEED!r}: int}} (seed optional), got keys "
                            f"{sorted(request)} with {RESET}={request[RESET]!r}")
        seed = request.get(SEED, self.seed)
        if isinstance(seed, np.integer):
            seed = int(seed)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise DataError(f"{SEED!r} must be an integer in [0, 2**63), got {seed!r}")
        # Only this session's state: its request is not in flight (one at a time per connection).
        session.history = None
        session.generator.manual_seed(seed)
        return {RESET: True, SEED: seed}

    # -- the inference thread --------------------------------------------------------
    def _infer(self, session: _Session, observation: Observation, submitted: float):
        """One policy call for ``session``, on the inference thread: ``(actions [n, A], infer_ms, queue_ms)``,
        or ``None`` if the client left while it was queued. The history is kept only if the call succeeded."""
        started = time.perf_counter()
        if session.closed:
            return None
        policy = self.policy
        state = torch.from_numpy(observation.state)[None].to(policy.device)
        history = state if state.ndim == 3 else next_history(session.history, state, policy.n_obs_steps)
        batch: dict[str, Any] = {STATE: history}
        if observation.task is not None:
            batch[TASK] = observation.task
        for key, image in observation.images.items():
            batch[key] = torch.from_numpy(image)[None].to(policy.device)
        kwargs: dict[str, Any] = {"generator": session.generator}
        if observation.num_actions is not None:
            kwargs[NUM_ACTIONS] = observation.num_actions
        handle = self.handle
        with handle.context(session.id) if handle is not None else contextlib.nullcontext():
            actions = policy.predict_action_chunk(batch, **kwargs)
        session.history = history
        actions = np.ascontiguousarray(actions[0].detach().cpu().numpy(), dtype=np.float32)
        done = time.perf_counter()
        return actions, (done - started) * 1e3, (started - submitted) * 1e3

    def _drop(self, session: _Session) -> None:
        """On the inference thread (contexts are per thread): forget the session's cache context."""
        handle = self.handle
        if handle is not None:
            handle.drop_context(session.id)


class Unavailable(BacError, RuntimeError):
    """The server is shutting down (the client sees ``Unavailable: ...``)."""


__all__ = ["DEFAULT_PORT", "Observation", "PROTOCOL", "PROTOCOL_VERSION", "PolicyServer", "acceleration_summary",
           "accepts_num_actions", "load_served_policy", "metadata", "parse_observation"]
