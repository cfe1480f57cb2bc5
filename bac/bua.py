"""The Bubbling Union Algorithm: downstream FFN update steps bubble up to the blocks with the largest reuse error."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .adapters import KINDS
from .checks import check_number
from .errors import ConfigError


def _as_block(block: Any) -> tuple[str, str, int]:
    if isinstance(block, (tuple, list)):
        name, kind, layer = block
    else:
        name, kind, layer = block.name, block.kind, block.layer
    if kind not in KINDS:
        raise ConfigError(f"block {name!r} has kind {kind!r}; expected one of {KINDS}")
    return str(name), kind, int(layer)


def bubbling_union(
    update_steps: Mapping[str, Sequence[int]],
    blocks: Sequence[Any],
    reuse_error: Mapping[str, float],
    top_n: int,
) -> dict[str, list[int]]:
    """The Bubbling Union Algorithm.

    Takes the ``top_n`` blocks with the largest reuse error (ties: the earlier
    block in execution order) and adds to each one's update steps those of
    every FFN block in the same or a deeper layer, so an upstream block is
    recomputed before a downstream FFN consumes its stale output. The FFNs'
    own (input) schedules are what bubble up. ``top_n = 0`` returns the input
    schedules unchanged. Returns every block's sorted update steps.
    """
    check_number("top_n", top_n, 0, integer=True)
    described = [_as_block(b) for b in blocks]
    for name, _, _ in described:
        if name not in update_steps:
            raise KeyError(f"no update steps for block {name!r}")
        if name not in reuse_error:
            raise KeyError(f"no reuse error for block {name!r}")
    result = {name: sorted(set(int(s) for s in update_steps[name])) for name, _, _ in described}
    ranked = sorted(range(len(described)), key=lambda i: (-float(reuse_error[described[i][0]]), i))
    for i in ranked[:top_n]:
        name, _, layer = described[i]
        bubbled = set(result[name])
        for other, kind, other_layer in described:
            if kind == "ffn" and other_layer >= layer:
                bubbled.update(int(s) for s in update_steps[other])
        result[name] = sorted(bubbled)
    return result
