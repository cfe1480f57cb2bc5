"""The Python client of the policy server (:mod:`bac.runtime.server`; the protocol: docs/guide/server.md).

    with PolicyClient("127.0.0.1", 8000) as client:
        client.reset(seed=0)
        actions = client.infer({"observation.state": state, "task": "door-open"})["actions"]  # [n, A]

:class:`PolicyClient` is openpi's ``WebsocketClientPolicy`` in shape (``metadata``, ``infer``,
``reset``), synchronous, and turns the server's error texts into exceptions.
:class:`RemotePolicy` wraps a client in a policy's own interface (``reset``, ``select_action``,
``predict_action_chunk``, features), so the runtime's episode loops
(:func:`bac.runtime.run_wave`) drive a served policy exactly as a local one.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import numpy as np

from bac.errors import BacError, ConfigError, DataError
from bac.policies.constants import ACTION, IMAGE_PREFIX, STATE, TASK

from .msgpack_numpy import packb, unpackb


class ServerError(BacError, RuntimeError):
    """The policy server answered with an error (``kind``: the server's error kind, e.g. ``NonFiniteError``),
    or could not be reached."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


class ObservationError(ServerError, DataError):
    """The server refused a request (``DataError``): a missing key, a wrong shape or dtype, NaN/inf, an
    unknown task. The connection stays usable."""


def _server_error(text: str) -> ServerError:
    kind, sep, _ = text.partition(": ")
    if not sep or not kind.isidentifier():
        kind = None
    cls = ObservationError if kind == "DataError" else ServerError
    return cls(f"policy server: {text}", kind)


def _refusal_text(err: Exception) -> str | None:
    """The text body of a refused handshake (websockets' ``InvalidStatus``), if it is a ``"<Kind>: ..."`` text."""
    body = getattr(getattr(err, "response", None), "body", None)
    if not body:
        return None
    text = bytes(body).decode("utf-8", "replace").strip()
    return text if _server_error(text).kind else None


def _plain(value: Any) -> Any:
    """Torch tensors to numpy (the wire carries numpy arrays); containers recursively."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class PolicyClient:
    """A connection to a policy server: one session (its own history, noise generator and cache).

    ``host``: a host name, or a whole ``ws://`` / ``wss://`` URL (then ``port`` is ignored when ``None``), as
    openpi's client takes it. ``api_key``: sent as ``Authorization: Api-Key <key>`` (as openpi's client sends
    it); a server that asks for another refuses the connection with a :class:`ServerError` of kind
    ``AuthError``. ``timeout``: seconds to wait for a reply (``None``: forever). Use as a context manager, or
    :meth:`close`. Each episode starts with :meth:`reset` (or a new connection).
    A text reply raises :class:`ObservationError` (the request was refused) or :class:`ServerError`;
    both keep the connection usable. A lost connection or a server that cannot be reached is a
    :class:`ServerError` too.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, *, timeout: float | None = None,
                 open_timeout: float = 10.0, max_message_bytes: int | None = 64 << 20, api_key: str | None = None):
        from websockets.sync.client import connect

        self.url = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        if port is not None and not host.startswith(("ws://", "wss://")):
            self.url += f":{port}"
        self.timeout = timeout
        self._exit = contextlib.ExitStack()
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            # entered as a context manager: the one form every websockets version since 13 accepts without warning
            self._ws = self._exit.enter_context(connect(self.url, open_timeout=open_timeout, max_size=max_message_bytes,
                                                        compression=None, additional_headers=headers))
        except (OSError, TimeoutError) as err:
            raise ServerError(f"cannot connect to the policy server at {self.url}: {err}") from err
        except Exception as err:  # noqa: BLE001 -- websockets' handshake errors (InvalidStatus, InvalidURI, ...)
            refusal = _refusal_text(err)
            if refusal:  # the server said why (e.g. "AuthError: ...")
                raise _server_error(refusal) from err
            raise ServerError(f"cannot open a websocket to {self.url}: {type(err).__name__}: {err}") from err
        self.metadata: dict = self._receive()

    def infer(self, observation: Mapping[str, Any]) -> dict:
        """Send one observation map, return the reply: ``{"actions": float32 [n, A], "server_timing": {...}}``."""
        if not isinstance(observation, Mapping):
            raise DataError(f"an observation is a dict of features, got {type(observation).__name__}")
        return self._call(packb(_plain(observation)))

    def reset(self, seed: int | None = None) -> dict:
        """Start a new episode on the server: clear this session's history, reseed its noise generator
        (``None``: the server's default seed, as a new connection). Without it, the next request continues the
        last episode's history and noise (openpi's client's ``reset()`` sends nothing: reconnect instead)."""
        return self._call(packb({"reset": True} if seed is None else {"reset": True, "seed": int(seed)}))

    def send_raw(self, frame: bytes | str) -> Any:
        """Send one frame as given and return the decoded reply (error texts raise): for protocol tests."""
        return self._call(frame)

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, frame: bytes | str) -> Any:
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.send(frame)
        except ConnectionClosed as err:
            raise ServerError(f"the policy server at {self.url} closed the connection: {err}") from err
        return self._receive()

    def _receive(self) -> Any:
        from websockets.exceptions import ConnectionClosed

        try:
            reply = self._ws.recv(timeout=self.timeout)
        except ConnectionClosed as err:
            raise ServerError(f"the policy server at {self.url} closed the connection: {err}") from err
        except TimeoutError as err:
            raise ServerError(f"no reply from the policy server at {self.url} within {self.timeout} s") from err
        if isinstance(reply, str):
            raise _server_error(reply)
        return unpackb(reply)


@dataclasses.dataclass(frozen=True)
class RemoteFeature:
    """A feature as the server's metadata describes it (what ``check_compatible`` and the runtime read)."""

    name: str
    type: str
    shape: tuple[int, ...]
    keys: tuple[str, ...] | None = None


class RemotePolicy:
    """A served policy with a local policy's interface, for the runtime's episode loops.

    Keeps the observation history and the action queue on this side, as ``DiffusionPolicy.select_action``
    does, and sends the whole history ``[n_obs_steps, D]`` when its queue runs out (one request per chunk),
    so its actions are the local policy's, bit for bit, when the server's generator is seeded as the local
    one (``reset()`` reseeds it with :attr:`seed`). Batches of one observation only (one session draws one
    sample at a time); sampling noise comes from the server, so ``generator`` must be ``None``.
    """

    def __init__(self, client: PolicyClient, seed: int | None = 0):
        import torch

        self.client, self.seed = client, seed
        meta = client.metadata
        self.input_features = {name: RemoteFeature(name, f["type"], tuple(f["shape"]),
                                                   tuple(f["keys"]) if f.get("keys") else None)
                               for name, f in meta["features"].items()}
        self.output_features = {ACTION: RemoteFeature(ACTION, "action", tuple(meta["action"]["shape"]))}
        self.n_obs_steps, self.n_action_steps = meta["n_obs_steps"], meta["n_action_steps"]
        self.reads_instructions = bool(meta["reads_instructions"])
        self.device = torch.device("cpu")
        self._history: np.ndarray | None = None
        self._queue: list[np.ndarray] = []

    def reset(self) -> None:
        """New episode: clear the history and queue here, and reseed the server's generator with :attr:`seed`."""
        self._history, self._queue = None, []
        self.client.reset(self.seed)

    @property
    def chunk_due(self) -> bool:
        return not self._queue

    def select_action(self, batch: Mapping[str, Any], generator: Any = None):
        """The next action ``[1, A]`` for the current observation (``observation.state`` ``[1, D]``)."""
        import torch

        self._no_generator(generator)
        state = self._single(batch, STATE)
        if state.ndim != 1:
            raise DataError(f"{STATE!r} must be [1, D] (one current observation), got {[1, *state.shape]}")
        if self._history is None:
            self._history = np.repeat(state[None], self.n_obs_steps, axis=0)
        else:
            self._history = np.concatenate([self._history[1:], state[None]], axis=0)
        if not self._queue:
            self._queue = list(self._request(batch, self._history))
        return torch.from_numpy(self._queue.pop(0).copy())[None]

    def predict_action_chunk(self, batch: Mapping[str, Any], generator: Any = None):
        """One chunk ``[1, n_action_steps, A]`` for the history ``observation.state`` ``[1, n_obs_steps, D]``."""
        import torch

        self._no_generator(generator)
        return torch.from_numpy(self._request(batch, self._single(batch, STATE)).copy())[None]

    def _request(self, batch: Mapping[str, Any], state: np.ndarray) -> np.ndarray:
        observation: dict[str, Any] = {STATE: state.astype(np.float32)}
        for name in self.input_features:
            if name.startswith(IMAGE_PREFIX):
                observation[name] = self._single(batch, name).astype(np.float32)
        if TASK in batch:
            task = batch[TASK]
            observation[TASK] = task if isinstance(task, str) else list(task)[0]
        return self.client.infer(observation)["actions"]

    @staticmethod
    def _single(batch: Mapping[str, Any], name: str) -> np.ndarray:
        if name not in batch:
            raise DataError(f"batch is missing {name!r}")
        value = np.asarray(_plain(batch[name]))
        if value.ndim < 1 or value.shape[0] != 1:
            raise DataError(f"a served policy takes batches of one observation; {name!r} has shape {list(value.shape)}")
        return value[0]

    @staticmethod
    def _no_generator(generator: Any) -> None:
        if generator is not None:
            raise ConfigError("a served policy draws its noise on the server: seed it with reset() "
                              "(RemotePolicy.seed), and pass generator=None")


__all__ = ["ObservationError", "PolicyClient", "RemoteFeature", "RemotePolicy", "ServerError"]
