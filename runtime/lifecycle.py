"""The policy server's lifecycle: the asyncio websocket server on a background thread or the caller's, the
warm-up before listening, ``/healthz``, the API key checked at the handshake, and a graceful shutdown (stop
accepting, finish the requests in flight, close the connections) on :meth:`ServingLoop.stop` or SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
import logging
import signal
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

from bac.errors import ConfigError

from .sessions import InferenceThread

logger = logging.getLogger("bac.runtime.server")  # the server's one logger, whichever module logs
API_KEY_SCHEME = "Api-Key"  # openpi's client sends "Authorization: Api-Key <key>"
REFUSED_KEY_LOG_INTERVAL_S = 60.0  # at most one log line per interval for connections refused for their key
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServingLoop:
    """Serve ``handler(connection)`` on ``host:port`` (``port=0``: a free one, read after start).

    Before listening, ``warm_up()`` runs on the inference thread; the inference thread is shut down with the
    loop. ``health()`` is what ``/healthz`` answers (200 while :attr:`status` is ``"ok"``, else 503);
    ``description`` names what is served in the log. :attr:`closing` turns true when shutdown begins: the
    handler refuses new requests from then on, and shutdown waits for those inside :meth:`in_flight`.
    ``api_key``: when set, a websocket handshake without the header ``Authorization: Api-Key <key>`` is refused
    (HTTP 401, the connection closed); ``/healthz`` asks for none.
    """

    def __init__(self, handler: Callable[[Any], Awaitable[None]], inference: InferenceThread,
                 warm_up: Callable[[], None], *, host: str, port: int, max_message_bytes: int,
                 shutdown_timeout: float, health: Callable[[], dict], description: str, api_key: str | None = None):
        self.handler, self.inference, self.warm_up, self.health = handler, inference, warm_up, health
        self.host, self.port, self.description = host, port, description
        self._api_key = api_key.encode() if api_key is not None else None
        self._refused_keys = 0  # handshakes refused for their key since the last log line about them
        self._refused_logged_at = -REFUSED_KEY_LOG_INTERVAL_S
        self.max_message_bytes, self.shutdown_timeout = max_message_bytes, shutdown_timeout
        self.status = "starting"
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._stop_requested: asyncio.Event | None = None
        self._busy = 0  # requests received and not yet answered
        self._idle: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, timeout: float | None = 120.0) -> None:
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

    def serve_forever(self) -> None:
        """Warm up and serve from this thread until SIGINT/SIGTERM (or :meth:`stop` from another thread)."""
        asyncio.run(self._main(signals=True))

    def stop(self, timeout: float | None = None) -> None:
        """Shut down gracefully (idempotent)."""
        loop, event = self._loop, self._stop_requested
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just finished
                loop.call_soon_threadsafe(event.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.shutdown_timeout + 10)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Around one request, on the event loop: shutdown waits until none is in flight."""
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _main(self, signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        try:
            await self._listen(signals)
        except BaseException as err:
            self._startup_error = err
            self._ready.set()
            self.inference.shutdown(wait=False)
            if signals:
                raise
            return
        self._ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            await self._shutdown()

    async def _listen(self, signals: bool) -> None:
        from websockets.asyncio.server import serve

        await self.inference.run(self.warm_up)
        try:
            self._server = await serve(self.handler, self.host, self.port, process_request=self._http,
                                       max_size=self.max_message_bytes, compression=None)
        except OSError as err:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {err}") from err
        self.port = self._server.sockets[0].getsockname()[1]
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop_requested.set)
        self.status = "ok"
        logger.info("serving %s on %s (health: http://%s:%d/healthz)%s", self.description, self.url, self.host,
                    self.port, "; clients must send the API key" if self._api_key else "")
        if self._api_key is None and self.host not in LOOPBACK:
            logger.warning("listening on %s without an API key: anyone who reaches this port can use the policy "
                           "(set api_key, and put TLS in front: docs/guide/server.md)", self.host)

    async def _shutdown(self) -> None:
        self.closing = True  # new requests are refused from here on
        self._server.close(close_connections=False)  # stop accepting connections; handlers keep running
        await asyncio.sleep(0)  # the close task's first step closes the listening socket
        self.status = "stopping"
        logger.info("stopping: finishing %d request(s) in flight", self._busy)
        try:
            await asyncio.wait_for(self._idle.wait(), self.shutdown_timeout)
        except asyncio.TimeoutError:
            logger.warning("requests still in flight after %.0f s; closing anyway", self.shutdown_timeout)
        for connection in list(self._server.connections):
            await connection.close(1001, "server shutting down")
        await self._server.wait_closed()
        self.inference.shutdown(wait=True)
        self.status = "stopped"
        logger.info("stopped after %d request(s)", self.health()["requests_served"])

    def _http(self, connection: Any, request: Any) -> Any:
        """``/healthz`` answers JSON; a handshake without the API key (when one is set) is refused; anything
        else goes on to the websocket handshake."""
        if request.path.split("?")[0].rstrip("/") == "/healthz":
            status = http.HTTPStatus.OK if self.status == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _response(status, json.dumps(self.health()).encode(), "application/json")
        if self._api_key is None or self._key_matches(request.headers.get("Authorization")):
            return None
        self._log_refused_key(connection)
        text = (f"AuthError: this policy server needs an API key: send the header 'Authorization: {API_KEY_SCHEME} "
                "<key>' (openpi's WebsocketClientPolicy(api_key=...), bac's PolicyClient(api_key=...))")
        return _response(http.HTTPStatus.UNAUTHORIZED, text.encode(), "text/plain; charset=utf-8",
                         [("WWW-Authenticate", API_KEY_SCHEME)])

    def _key_matches(self, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").partition(" ")
        # compare_digest: the time taken does not tell how much of a wrong key was right
        return scheme.lower() == API_KEY_SCHEME.lower() and hmac.compare_digest(key.strip().encode(), self._api_key)

    def _log_refused_key(self, connection: Any) -> None:
        """One WARNING per interval however many are refused (a scanner cannot flood the log); never the key."""
        self._refused_keys += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSED_KEY_LOG_INTERVAL_S:
            address = connection.remote_address
            logger.warning("refused %d connection(s) without the right API key (the latest from %s); at most one "
                           "such line per %.0f s", self._refused_keys, address[0] if address else "?",
                           REFUSED_KEY_LOG_INTERVAL_S)
            self._refused_keys, self._refused_logged_at = 0, now


def _response(status: http.HTTPStatus, body: bytes, content_type: str, extra: list | None = None) -> Any:
    """A plain HTTP response that closes the connection."""
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close"),
                       *(extra or [])])
    return Response(status.value, status.phrase, headers, body)
