"""numpy arrays in msgpack, byte for byte as openpi's ``openpi_client.msgpack_numpy`` writes them.

Written here from the format (not copied), so that openpi's clients and this project's server
understand each other:

* an ``ndarray`` is the map ``{b"__ndarray__": True, b"data": <C-order bytes>, b"dtype": dtype.str,
  b"shape": shape}`` (keys are msgpack *bin*, ``dtype.str`` names the byte order: ``"<f4"``, ``"|u1"``);
* a numpy scalar is ``{b"__npgeneric__": True, b"data": <its Python value>, b"dtype": dtype.str}``;
* everything else is plain msgpack (strings as *str*, bytes as *bin*).

Decoding is an ``object_hook`` on every map. Object, void and complex arrays are refused both
ways (openpi refuses them when encoding; an object array cannot be rebuilt from bytes safely).
"""
from __future__ import annotations

import functools
from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = {"O": "object", "V": "void (structured)", "c": "complex"}


def pack_array(obj: Any) -> Any:
    """msgpack ``default`` hook: numpy arrays and scalars to their maps; anything else is a ``TypeError``."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"cannot encode a numpy {_REFUSED_KINDS[obj.dtype.kind]} array (dtype {obj.dtype}): "
                         "send numbers, strings or bytes")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__} in msgpack: send dicts, lists, numbers, strings, "
                    "bytes or numpy arrays")


def unpack_array(obj: dict) -> Any:
    """msgpack ``object_hook``: the maps :func:`pack_array` writes back to numpy (others unchanged).

    Arrays are read-only views of the message's bytes (as openpi's); copy one to write to it.
    """
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(data, (bytes, bytearray)) or not isinstance(shape, (list, tuple)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError(f"malformed array map: needs bin 'data' and a list of sizes 'shape', got "
                             f"data {type(data).__name__}, shape {shape!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(data) != expected:
            raise ValueError(f"malformed array map: shape {list(shape)} of {dtype.str} needs {expected} bytes, "
                             f"'data' has {len(data)}")
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))
    if b"__npgeneric__" in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def _dtype(name: Any) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except TypeError as err:
        raise ValueError(f"malformed array map: 'dtype' {name!r} is not a numpy dtype string") from err
    if dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"refusing a numpy {_REFUSED_KINDS[dtype.kind]} array (dtype {name!r})")
    return dtype


#: A reusable packer (``Packer().pack(obj)``), as openpi's ``msgpack_numpy.Packer``.
Packer = functools.partial(msgpack.Packer, default=pack_array)
packb = functools.partial(msgpack.packb, default=pack_array)
unpackb = functools.partial(msgpack.unpackb, object_hook=unpack_array)

__all__ = ["Packer", "pack_array", "packb", "unpack_array", "unpackb"]
