"""Counting the branch evaluations a diffusers transformer really runs, independently of bac's own counters.

A forward hook on the sub-module that does each branch's work (its attention or FFN module) counts how
often that branch ran, whoever decided to skip it: bac's engine or one of diffusers' cache hooks. The
benchmark uses the counts for the share of skipped block evaluations, the tests to check what bac reports.
"""
from __future__ import annotations

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


def count_branches(model) -> tuple[dict[str, int], list]:
    """Per block name, a counter of its branch's real evaluations (starting at 0), and the hooks that
    count them; remove the hooks when done."""
    counts, hooks = {}, []
    for block in bac.describe(model, bac.diffusers.adapters_for(model)).blocks:
        path, key = block.name.rsplit(".", 1)
        layer = model.get_submodule(path)
        module = getattr(layer, BRANCH_MODULES[(type(layer).__name__, key)])
        counts[block.name] = 0
        hooks.append(module.register_forward_hook(lambda *a, n=block.name: counts.__setitem__(n, counts[n] + 1)))
    return counts, hooks
