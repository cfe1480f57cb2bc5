"""The policy server's wire format: what a request may hold, how it is checked, what a reply looks like.

Frames are msgpack with openpi's numpy encoding (:mod:`bac.runtime.msgpack_numpy`). A request is an
observation map or a reset map; a reply is packed actions, a reset acknowledgement, or an error text
``"<Kind>: <message>"``. The protocol, message by message: ``docs/guide/server.md``. Everything here is a
pure function of the policy's features and the message; the server decides when to call it.

A refused value is quoted at most :data:`MAX_QUOTED` characters long (``"... (N more)"``), and an error text
is at most :data:`MAX_ERROR_CHARS`: a client's 20 MB string is not echoed back, nor logged.
"""
from __future__ import annotations

import dataclasses
import inspect
import reprlib
from typing import Any, Mapping

import numpy as np
import torch

from bac.errors import BacError, DataError
from bac.policies.constants import IMAGE_PREFIX, STATE, TASK
from bac.policies.vla import frames_to_images
from bac.policies.warm import reads_last_chunk, real_time_chunked, warm_started  # noqa: F401  (the server's too)

from .msgpack_numpy import packb, unpackb

PROTOCOL, PROTOCOL_VERSION = "bac-policy-server", 1
NUM_ACTIONS = "num_actions"
SHIFT = "shift"  # a warm-started policy's: actions of the previous chunk executed since its observation
DELAY = "delay"  # a real-time chunked policy's: actions of the current chunk still executed before the new one
# Any shift >= horizon means the same (a late chunk: cold), any delay >= horizon too (the whole overlap frozen),
# so larger ones are refused as typos.
MAX_ACTION_COUNT, MAX_ACTION_COUNT_TEXT = 2**31, "2**31"
RESET, SEED = "reset", "seed"
MAX_QUOTED = 200  # characters of a refused value quoted in an error text
MAX_QUOTED_KEYS = 8  # unknown keys named in an error text
MAX_ERROR_CHARS = 2000  # the longest error text a client receives (and the log holds)
MAX_INSTRUCTION_CHARS = 2000  # longer instructions are refused before tokenizing (their 32 word pieces are shorter)


class Unavailable(BacError, RuntimeError):
    """The server is shutting down (the client sees ``Unavailable: ...``)."""


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """``text``, or its first ``limit`` characters and ``"... (N more)"``."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more)"


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxother = 3, MAX_QUOTED


def quote(value: Any) -> str:
    """A client's value as an error text quotes it: its repr, clipped (a long value's whole repr is never built)."""
    if isinstance(value, (str, bytes)) and len(value) > MAX_QUOTED:
        return f"{value[:MAX_QUOTED]!r}... ({len(value) - MAX_QUOTED} more)"
    return clip(_SHORT_REPR.repr(value))


def _quote_keys(keys: list[Any]) -> str:
    named = ", ".join(quote(key) for key in keys[:MAX_QUOTED_KEYS])
    return f"[{named}{f', ... ({len(keys) - MAX_QUOTED_KEYS} more)' if len(keys) > MAX_QUOTED_KEYS else ''}]"


# ----------------------------------------------------------------------------- requests
def decode_request(message: Any) -> dict[str, Any]:
    """A frame as a request map with text keys; every problem is a :class:`bac.DataError`."""
    if isinstance(message, str):
        raise DataError("got a text frame: send binary frames of msgpack (openpi's msgpack_numpy encoding)")
    try:
        request = unpackb(message)
    except Exception as err:  # msgpack's many exceptions, and malformed array maps
        raise DataError(f"could not decode the message as msgpack (openpi's msgpack_numpy encoding): "
                        f"{type(err).__name__}: {clip(str(err))}") from None
    if not isinstance(request, dict):
        raise DataError(f"a request is a msgpack map (dict) of observation keys, or {{{RESET!r}: true, "
                        f"{SEED!r}: int}}; got {type(request).__name__}")
    keys = {}
    for key, value in request.items():
        if isinstance(key, bytes):
            try:
                key = key.decode()
            except UnicodeDecodeError:
                raise DataError(f"request key {quote(key)} is not UTF-8 text") from None
        keys[key] = value
    return keys


def reset_seed(request: Mapping[str, Any], default_seed: int) -> int:
    """The seed a reset map asks for (``default_seed`` when it names none)."""
    extra = sorted(set(request) - {RESET, SEED})
    if request[RESET] is not True or extra:
        raise DataError(f"a reset message is {{{RESET!r}: true, {SEED!r}: int}} (seed optional), got keys "
                        f"{_quote_keys(sorted(request))} with {RESET}={quote(request[RESET])}")
    seed = request.get(SEED, default_seed)
    if isinstance(seed, np.integer):
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise DataError(f"{SEED!r} must be an integer in [0, 2**63), got {quote(seed)}")
    return seed


@dataclasses.dataclass
class Observation:
    """One checked request: ``state`` float32 ``[D]`` (current) or ``[n_obs_steps, D]`` (history), images
    float32 ``[3, S, S]`` in [0, 1] by feature name; ``shift``: for a policy that reads the previous chunk (a
    warm start, real-time chunking), the actions of that chunk executed since its observation (``None``: its
    ``n_action_steps``); ``delay``: for real-time chunking, the actions of the client's current chunk it still
    executes before this one takes over, the frozen prefix (``None``: 0)."""

    state: np.ndarray
    task: str | None
    images: dict[str, np.ndarray]
    num_actions: int | None = None
    shift: int | None = None
    delay: int | None = None


def _shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _array(key: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple, int, float, np.generic)) and not isinstance(value, bool):
        try:
            return np.asarray(value)
        except (ValueError, TypeError) as err:
            raise DataError(f"{key!r} is not a numeric array: {clip(str(err))}") from err
    raise DataError(f"{key!r} must be a numpy array (msgpack_numpy) or a list of numbers, got {type(value).__name__}")


def _check_finite(key: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        where = [list(map(int, i)) if array.ndim > 1 else int(i[0]) for i in np.argwhere(bad)[:4]]
        raise DataError(f"{key!r} contains NaN or inf (at {where}{'...' if bad.sum() > 4 else ''}); "
                        "send finite numbers")


def parse_observation(policy: Any, message: Mapping[str, Any]) -> Observation:
    """Check a request map against the policy's features; every problem is a :class:`bac.DataError` naming
    the key and what was expected. Checked before queueing, so a bad request is answered at once."""
    cameras = [name for name in policy.input_features if name.startswith(IMAGE_PREFIX)]
    _check_keys(policy, message, cameras)
    state, task = _state(policy, message[STATE]), _task(policy, message.get(TASK))  # checked in this order
    images = {key: _image(key, message[key], policy.input_features[key].shape) for key in cameras}
    return Observation(state, task, images, _num_actions(policy, message.get(NUM_ACTIONS)),
                       _shift(policy, message.get(SHIFT)), _delay(message.get(DELAY)))


def _check_keys(policy: Any, message: Mapping[str, Any], cameras: list[str]) -> None:
    n, dim = policy.n_obs_steps, policy.state_dim
    required = [STATE, *cameras, *([TASK] if TASK in policy.input_features else [])]
    optional = [NUM_ACTIONS, *([SHIFT] if reads_last_chunk(policy) else []),
                *([DELAY] if real_time_chunked(policy) else [])]
    unknown = sorted(set(message) - set(required) - set(optional))
    if unknown:
        hints = {SHIFT: f" ({SHIFT!r} is read only by a warm-started policy or one with real-time chunking: this "
                        "server's metadata has warm_start null and rtc null)",
                 DELAY: f" ({DELAY!r} is read only by a policy with real-time chunking: this server's metadata has "
                        "rtc null; serve it with the setting rtc={max_guidance:5})"}
        hint = "".join(hints[key] for key in (SHIFT, DELAY) if key in unknown and key not in optional)
        raise DataError(f"unknown key(s) {_quote_keys(unknown)}; this policy reads {required} (and optional "
                        f"{', '.join(map(repr, optional))}), or send {{{RESET!r}: true, {SEED!r}: int}}{hint}")
    missing = [key for key in required if key not in message]
    if missing:
        raise DataError(f"observation is missing key(s) {missing}; this policy reads {required} "
                        f"({STATE!r}: float [{dim}] or [{n}, {dim}])")


def _state(policy: Any, value: Any) -> np.ndarray:
    n, dim = policy.n_obs_steps, policy.state_dim
    state = _array(STATE, value)
    if state.dtype.kind not in "fiu":
        raise DataError(f"{STATE!r} has dtype {state.dtype} ({state.dtype.str}); send real numbers (float32)")
    if state.shape not in ((dim,), (n, dim)):
        raise DataError(f"{STATE!r} must have shape [{dim}] (the current observation) or [{n}, {dim}] (the last "
                        f"{n} observations), got {_shape_text(state.shape)}")
    state = state.astype(np.float32)  # a copy: decoded arrays are read-only views of the message
    _check_finite(STATE, state)
    return state


def _task(policy: Any, task: Any) -> str | None:
    if TASK in policy.input_features:
        if not isinstance(task, str) or not task.strip():
            raise DataError(f"{TASK!r} must be a string (" + ("the instruction" if policy.reads_instructions else
                            f"one of {policy.tasks}") + f"), got {type(task).__name__} {quote(task)}")
        if policy.reads_instructions and len(task) > MAX_INSTRUCTION_CHARS:
            raise DataError(f"{TASK!r}: an instruction of {len(task)} characters; at most {MAX_INSTRUCTION_CHARS} "
                            f"are read (got {quote(task)})")
        if not policy.reads_instructions and task not in policy.tasks:
            raise DataError(f"{TASK!r}: unknown task {quote(task)}; this policy was trained on {policy.tasks}")
    return task


def _image(key: str, value: Any, shape: tuple[int, int, int]) -> np.ndarray:
    channels, height, width = shape
    image = _array(key, value)
    if image.dtype == np.uint8 and image.shape == (height, width, channels):
        return frames_to_images(image.copy()).numpy()  # a copy: decoded arrays are read-only
    if image.dtype.kind == "f" and image.shape == (channels, height, width):
        image = image.astype(np.float32)
        _check_finite(key, image)
        if image.min() < 0 or image.max() > 1:
            raise DataError(f"{key!r} has values in [{image.min():.3g}, {image.max():.3g}]; float images are "
                            "in [0, 1] (or send uint8 HWC)")
        return image
    raise DataError(f"{key!r} must be uint8 [{height}, {width}, {channels}] (HWC, a rendered frame) or float "
                    f"[{channels}, {height}, {width}] (CHW, in [0, 1]), got {image.dtype} {_shape_text(image.shape)}")


def _num_actions(policy: Any, num_actions: Any) -> int | None:
    if num_actions is None:
        return None
    if isinstance(num_actions, np.integer):
        num_actions = int(num_actions)
    if not isinstance(num_actions, int) or isinstance(num_actions, bool) or not 1 <= num_actions <= policy.horizon:
        raise DataError(f"{NUM_ACTIONS!r} must be an integer in [1, horizon={policy.horizon}] (or left out for "
                        f"n_action_steps={policy.n_action_steps}), got {quote(num_actions)}")
    return num_actions


def _action_count(key: str, value: Any, meaning: str) -> int | None:
    """An optional count of actions ``key``: ``None``, or an int (numpy's too) in ``[0, MAX_ACTION_COUNT)``."""
    if value is None:
        return None
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_ACTION_COUNT:
        raise DataError(f"{key!r} must be an integer in [0, {MAX_ACTION_COUNT_TEXT}): {meaning}, got {quote(value)}")
    return value


def _shift(policy: Any, shift: Any) -> int | None:
    return _action_count(SHIFT, shift, "the actions of the previous chunk executed since its "
                         f"observation (or left out for n_action_steps={policy.n_action_steps})")


def _delay(delay: Any) -> int | None:
    return _action_count(DELAY, delay, "the actions of the client's current chunk it still executes before the new "
                         "one takes over, which the new one returns unchanged (or left out for 0)")


def accepts_num_actions(policy: Any) -> bool:
    """Whether ``policy.predict_action_chunk`` takes ``num_actions=`` (the server passes it through)."""
    try:
        parameters = inspect.signature(policy.predict_action_chunk).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == NUM_ACTIONS or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def check_num_actions(policy: Any, observation: Observation) -> None:
    """Refuse ``num_actions`` for a policy that cannot take it (asked at request time: the call may be wrapped)."""
    if observation.num_actions is not None and not accepts_num_actions(policy):
        raise DataError(f"{NUM_ACTIONS!r}: this policy returns its n_action_steps ({policy.n_action_steps}) actions "
                        f"per request and takes no {NUM_ACTIONS}; leave the key out")


def synthetic_request(policy: Any) -> dict[str, Any]:
    """A request of the right shapes: the middle of the state's training range, grey images, a known task."""
    middle = policy.obs_normalizer.inverse(torch.zeros(policy.state_dim, device=policy.device))
    request: dict[str, Any] = {STATE: middle.cpu().numpy().astype(np.float32)}
    for name, feature in policy.input_features.items():
        if name.startswith(IMAGE_PREFIX):
            request[name] = np.full(feature.shape, 0.5, dtype=np.float32)
    if TASK in policy.input_features:
        if policy.reads_instructions:
            cached = list(getattr(policy.language, "entries", {}) or [])
            request[TASK] = cached[0] if cached else "pick up the object"
        else:
            request[TASK] = policy.tasks[0]
    return request


# ----------------------------------------------------------------------------- replies
def actions_reply(actions: np.ndarray, infer_ms: float, queue_ms: float) -> bytes:
    return packb({"actions": actions, "server_timing": {"infer_ms": infer_ms, "queue_ms": queue_ms}})


def reset_reply(seed: int) -> bytes:
    return packb({RESET: True, SEED: seed})


def error_kind(err: BaseException) -> str:
    """``DataError`` for a refused request, a bac error's class, else ``InternalError`` (a bug)."""
    if isinstance(err, DataError):
        return "DataError"
    return type(err).__name__ if isinstance(err, BacError) else "InternalError"


def error_text(err: BaseException) -> str:
    """``"<Kind>: <message>"`` (:func:`error_kind`; an internal error names its exception type too), at most
    :data:`MAX_ERROR_CHARS` long."""
    kind = error_kind(err)
    detail = f"{type(err).__name__}: {err}" if kind == "InternalError" else str(err)
    return clip(f"{kind}: {detail}", MAX_ERROR_CHARS)
