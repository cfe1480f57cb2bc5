"""FLOP accounting: one formula for what a cached sampling call executes."""
from __future__ import annotations

from typing import Sequence


def executed_flops(call_flops: int, block_flops: Sequence[int], computed: Sequence[int], calls: int) -> int:
    """FLOPs of ``calls`` denoiser calls in which block ``i`` was computed ``computed[i]`` times in all.

    ``call_flops`` is one full denoiser call, ``block_flops[i]`` block ``i``'s share
    of it; everything outside the blocks (embeddings, head) runs on every call.
    """
    non_block = call_flops - sum(block_flops)
    return calls * non_block + sum(c * f for c, f in zip(computed, block_flops))
