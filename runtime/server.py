"""A websocket policy server: one accelerated policy serving action chunks to robot controllers.

    bac-serve checkpoint=dpt-metaworld sampler.kind=ddim sampler.steps=10 port=8000

openpi's message shapes (msgpack-encoded numpy arrays; metadata on connect, ``infer(obs) ->
{"actions": (H, A)}``), one inference thread, one session per connection (its own observation
history, generator, cache context and last chunk for warm starts or real-time chunking; a new episode is a new
connection or a reset message, and for a policy that reads the last chunk an observation that jumped). Refusals
are answered and logged bounded: values clipped (:mod:`.protocol`), one WARNING per session and error
kind. An optional shared key (openpi's ``api_key``) is checked at the handshake (:mod:`.lifecycle`). The protocol, message by message, for a client in any
language: ``docs/guide/server.md`` (the docs site's "The policy server" page).

:class:`PolicyServer` ties together the parts, one module each: the served policy and its description
(:mod:`.loading`), the wire format (:mod:`.protocol`), the sessions and the inference thread
(:mod:`.sessions`), and the websocket loop's start and graceful stop (:mod:`.lifecycle`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from typing import Any, Callable, Mapping

import bac
from bac.errors import BacError, ConfigError

from .lifecycle import ServingLoop
from .loading import acceleration_summary, describe, load_policy, load_served_policy, metadata
from .msgpack_numpy import packb
from .protocol import (PROTOCOL, PROTOCOL_VERSION, RESET, Observation, Unavailable, accepts_num_actions, actions_reply,
                       check_num_actions, decode_request, error_kind, error_text, parse_observation, reset_reply,
                       reads_last_chunk, real_time_chunked, reset_seed, warm_started)
from .sessions import InferenceThread, Session, Sessions

DEFAULT_PORT = 8000
DEFAULT_LANGUAGE_CACHE = 512  # instructions encoded on demand that a VLA server keeps (<= 24 MiB per device)
logger = logging.getLogger("bac.runtime.server")  # also under python -m


class PolicyServer:
    """Serve ``policy`` (a ``DiffusionPolicy``, accelerated or not) over a websocket (module docstring).

    ``port=0`` picks a free port (read :attr:`port` after :meth:`start`). ``warmup`` policy calls on
    ``example`` (a request map; default: a synthetic observation of the right shapes) run before the
    server listens, so the first robot request is not the slow one. ``seed``: the generator seed of a new
    session and of a reset without ``seed``. ``checkpoint``/``source``: named in the metadata. ``handle``:
    the policy's cache handle as ``policy.accelerate`` returned it (default: ``bac.get_handle(policy.model)``).
    ``api_key``: when set, a client must send the header ``Authorization: Api-Key <key>`` (openpi's
    ``WebsocketClientPolicy(api_key=...)``, :class:`~bac.runtime.client.PolicyClient` ``(api_key=...)``); others
    are refused at the handshake (HTTP 401). ``language_cache_size``: for a policy that reads instructions, how
    many instructions encoded on demand its language cache keeps (``LanguageCache.max_encoded``, set on the
    policy's cache, which its sampler views share; ``None``: all).

    :meth:`start` serves from a background thread (tests, notebooks, the benchmark);
    :meth:`serve_forever` serves from the calling thread until SIGINT/SIGTERM. Either way
    :meth:`stop` shuts down gracefully: stop accepting, finish the requests in flight, close connections.
    """

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, warmup: int = 3,
                 example: Mapping[str, Any] | None = None, seed: int = 0, checkpoint: str | None = None,
                 source: Mapping[str, Any] | None = None, max_message_bytes: int = 64 << 20,
                 shutdown_timeout: float = 30.0, handle: bac.CacheHandle | None = None, api_key: str | None = None,
                 language_cache_size: int | None = DEFAULT_LANGUAGE_CACHE):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"warmup must be a number of calls >= 0, got {warmup!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ConfigError("api_key must be a non-empty string (or None: no key asked)")
        if getattr(policy, "language", None) is not None:
            policy.language.max_encoded = language_cache_size
        self.policy = policy.eval() if hasattr(policy, "eval") else policy
        if handle is None and hasattr(policy, "model"):
            handle = bac.get_handle(policy.model)
        self.handle = handle
        self.warmup, self.example, self.seed = warmup, example, int(seed)
        self.metadata = metadata(policy, checkpoint, source, handle)
        self._metadata_bytes = packb(self.metadata)
        self.requests_served = 0
        self.errors = 0
        self._started = time.monotonic()
        self._sessions = Sessions()
        self._inference = InferenceThread(self.policy, handle)
        self._serving = ServingLoop(
            self._serve_connection, self._inference,
            warm_up=lambda: self._inference.warm_up(self.example, self.warmup, self.seed),
            host=host, port=port, max_message_bytes=max_message_bytes, shutdown_timeout=shutdown_timeout,
            health=self.health, description=describe(self.metadata), api_key=api_key)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "PolicyServer":
        """A server from ``configs/serve.yaml``'s settings (the policy loaded, accelerated and, with ``compile``/
        ``backend``/``onnx``, compiled for the server's batch of one before it listens)."""
        served = load_policy(
            cfg["checkpoint"], device=cfg.get("device", "cpu"), sampler=cfg["sampler"]["kind"],
            steps=cfg["sampler"]["steps"], tuned=cfg.get("tuned"), plan=cfg.get("plan"), method=cfg.get("method"),
            method_params=dict(cfg.get("method_params") or {}), compile=cfg.get("compile") or "none",
            backend=cfg.get("backend") or "torch", onnx=cfg.get("onnx"), warm=cfg.get("warm"),
            rtc=cfg.get("rtc"))
        if served.policy.graph is not None:
            logger.info("sampling calls run as one graph (%s): built in %s s", served.policy.graph.backend,
                        {shape: round(seconds, 2) for shape, seconds in served.policy.graph.build_seconds.items()})
        return cls(served.policy, cfg.get("host", "127.0.0.1"), cfg.get("port", DEFAULT_PORT),
                   warmup=cfg.get("warmup", 3), seed=cfg.get("seed", 0), checkpoint=str(cfg["checkpoint"]),
                   source=served.source, handle=served.handle,
                   max_message_bytes=int(cfg.get("max_message_mb", 64)) << 20,
                   shutdown_timeout=float(cfg.get("shutdown_timeout_s", 30)), api_key=cfg.get("api_key"),
                   language_cache_size=cfg.get("language_cache_size", DEFAULT_LANGUAGE_CACHE))

    @property
    def host(self) -> str:
        return self._serving.host

    @property
    def port(self) -> int:
        return self._serving.port

    @property
    def url(self) -> str:
        return self._serving.url

    @property
    def max_message_bytes(self) -> int:
        return self._serving.max_message_bytes

    @property
    def shutdown_timeout(self) -> float:
        return self._serving.shutdown_timeout

    @property
    def sessions(self) -> list[str]:
        """Ids of the connected clients' sessions."""
        return self._sessions.ids()

    def health(self) -> dict:
        """What ``/healthz`` answers."""
        return {"status": self._serving.status, "clients": len(self._sessions), "requests_served": self.requests_served,
                "errors": self.errors, "uptime_s": round(time.monotonic() - self._started, 3),
                "protocol_version": PROTOCOL_VERSION, "architecture": self.metadata["policy"]["architecture"]}

    def call_in_inference_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the inference thread and return its result (e.g. ``handle.stats()``, which
        must not race with a policy call). Blocks; not from the server's own event loop."""
        return self._inference.call(fn, *args)

    def start(self, timeout: float | None = 120.0) -> "PolicyServer":
        """Warm up, then serve from a background thread; returns once listening (raises what startup raised)."""
        self._serving.start(timeout)
        return self

    def serve_forever(self) -> None:
        """Warm up and serve from this thread until SIGINT/SIGTERM (or :meth:`stop` from another thread)."""
        self._serving.serve_forever()

    def stop(self, timeout: float | None = None) -> None:
        """Shut down gracefully (idempotent): stop accepting, finish in-flight requests, close connections."""
        self._serving.stop(timeout)

    def __enter__(self) -> "PolicyServer":
        return self if self._serving.started else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- on the event loop -----------------------------------------------------------------------
    async def _serve_connection(self, connection: Any) -> None:
        """One client: the metadata, then its messages one at a time; its session is dropped when it leaves."""
        from websockets.exceptions import ConnectionClosed

        address = connection.remote_address
        session = self._sessions.open(f"{address[0]}:{address[1]}" if address else "?", self.seed,
                                      self.policy.device)
        logger.info("%s connected from %s", session.id, session.peer)
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            await connection.send(self._metadata_bytes)
            while True:
                message = await connection.recv()
                with self._serving.in_flight():
                    request = asyncio.ensure_future(self._reply(session, message))
                    await asyncio.wait({request, closed}, return_when=asyncio.FIRST_COMPLETED)
                    reply = request.result() if request.done() else None
                    if reply is None:  # the client left in the middle of its request
                        break
                    await connection.send(reply)
        except ConnectionClosed:
            pass
        finally:
            closed.cancel()
            self._sessions.close(session)  # before anything else: its queued call is skipped
            # On the inference thread, after any call of this session still running there (FIFO).
            with contextlib.suppress(RuntimeError):  # the executor is shut down only after every handler returned
                await self._inference.run(self._inference.drop, session)
            refused = ", ".join(f"{count} {kind}" for kind, count in session.refused.items())
            logger.info("%s disconnected after %d request(s)%s%s", session.id, session.requests,
                        f" ({refused} refused)" if refused else "", self._last_chunk_text(session))

    def _last_chunk_text(self, session: Session) -> str:
        """For a policy that reads the last chunk, what the session's calls did with it (the disconnect line)."""
        if not reads_last_chunk(self.policy):
            return ""
        state = session.warm
        done = [f"{state.warm_calls} of {state.calls} calls warm"] if warm_started(self.policy) else []
        done += [f"{state.guided_calls} of {state.calls} calls guided (real-time chunking)"] \
            if real_time_chunked(self.policy) else []
        return f"; {', '.join(done)}, {session.jumps} new episode(s) on an observation jump"

    async def _reply(self, session: Session, message: Any) -> bytes | str | None:
        """The reply frame to one message: packed actions / reset acknowledgement, or an error text
        (``None``: the client has left)."""
        try:
            if self._serving.closing:
                raise Unavailable("the server is shutting down; reconnect to another instance or later")
            request = decode_request(message)
            if RESET in request:
                seed = reset_seed(request, self.seed)
                session.reset(seed)  # no call of this session is in flight (one message at a time)
                return reset_reply(seed)
            observation = parse_observation(self.policy, request)
            check_num_actions(self.policy, observation)
            result = await self._inference.run(self._inference.infer, session, observation, time.perf_counter())
            if result is None:  # the client left while its request was queued: nobody to answer
                return None
            self.requests_served += 1
            session.requests += 1
            return actions_reply(*result)
        except Exception as err:  # noqa: BLE001 -- every failure is answered; the server keeps serving
            self.errors += 1
            text = error_text(err)  # bounded: the client's values clipped
            self._log_failure(session, err, text)
            return text

    @staticmethod
    def _log_failure(session: Session, err: Exception, text: str) -> None:
        """The first failure of each kind in a session at WARNING (a bug's at ERROR, with its stack), later ones
        at DEBUG and counted in the disconnect line: a client repeating a bad request cannot flood the log."""
        kind = error_kind(err)
        session.refused[kind] += 1
        if session.refused[kind] > 1:
            logger.debug("%s: refused again: %s", session.id, text)
        elif isinstance(err, BacError):
            logger.warning("%s: refused: %s (later %s refusals of this client at DEBUG)", session.id, text, kind)
        else:  # the stack without the exception's own text, which may quote the request
            logger.error("%s: request failed: %s\n%s", session.id, text,
                         "".join(traceback.format_tb(err.__traceback__)).rstrip())


__all__ = ["DEFAULT_LANGUAGE_CACHE", "DEFAULT_PORT", "Observation", "PROTOCOL", "PROTOCOL_VERSION", "PolicyServer", "Unavailable",
           "acceleration_summary", "accepts_num_actions", "load_policy", "load_served_policy", "metadata",
           "parse_observation"]
