"""Counting the branch evaluations a diffusers transformer really runs, independently of bac's own counters.

A wrapper around the ``forward`` of the sub-module that does each branch's work (its attention or FFN
module) counts how often that branch really ran, whoever decided to skip it: bac's engine, one of
diffusers' cache hooks on the block, or a TaylorSeerCache hook on the sub-module itself (a forward hook
would also count the calls such a hook answers with a forecast). The
benchmark uses the counts for the share of skipped block evaluations, the tests to check what bac reports.
"""
from __future__ import annotations

from typing import Callable

import torch

import bac
import bac.diffusers

# The sub-module doing each branch's work (block class, branch key): counting its calls counts the
# branch's real evaluations, whoever skips them (bac's engine or a diffusers hook).
BRANCH_MODULES = {
    ("BasicTransformerBlock", "sa"): "attn1",
    ("BasicTransformerBlock", "ca"): "attn2",
    ("BasicTransformerBlock", "ffn"): "ff",
    ("FluxTransformerBlock", "attn"): "attn",
    ("FluxTransformerBlock", "ff"): "ff",
    ("FluxTransformerBlock", "ff_context"): "ff_context",
    ("FluxSingleTransformerBlock", "attn_mlp"): "proj_out",
    ("WanTransformerBlock", "sa"): "attn1",
    ("WanTransformerBlock", "ca"): "attn2",
    ("WanTransformerBlock", "ffn"): "ffn",
}


class _CountedForward:
    """Counts a module's real computations by wrapping its ``forward``: installed before a cache's hooks, it
    sits under any hook that replaces the forward (a forward hook would also count the calls answered
    from a cache, such as TaylorSeerCache's forecasts of a hooked attention module)."""

    def __init__(self, module: torch.nn.Module, count: Callable[[], None]):
        self.module, self.previous = module, module.__dict__.get("forward")
        forward = module.forward

        def counted(*args, **kwargs):
            count()
            return forward(*args, **kwargs)

        self.counted = module.forward = counted

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.counted:
            raise RuntimeError(f"{type(self.module).__name__}.forward was replaced over the counter and not restored")
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


def count_branches(model) -> tuple[dict[str, int], list]:
    """Per block branch, a counter of its real evaluations, and the counters' handles (remove them, after
    disabling the cache, to restore the modules).

    Each branch's own sub-module (attention, FFN; FLUX's single-stream branch: ``proj_out``) is counted
    whenever it really computes, whoever skips it otherwise: bac's engine, a diffusers hook on the block,
    or a TaylorSeerCache hook on the sub-module itself.
    """
    counts, handles = {}, []
    for block in bac.describe(model, bac.diffusers.adapters_for(model)).blocks:
        path, key = block.name.rsplit(".", 1)
        layer = model.get_submodule(path)
        module = getattr(layer, BRANCH_MODULES[(type(layer).__name__, key)])
        counts[block.name] = 0
        handles.append(_CountedForward(module, lambda n=block.name: counts.__setitem__(n, counts[n] + 1)))
    return counts, handles
