"""The engine's tap: every block output handed on to the model, computed or stood in, without changing the result."""
import pytest
import torch

import bac


def _tapped_run(model, method, scheduler, obs, sample_actions, **kwargs):
    seen = []

    def tap(i, step, out, computed):
        seen.append((handle.active_context, i, step, out, computed))

    with bac.accelerate(model, method, num_steps=12, tap=tap, **kwargs) as handle:
        actions = sample_actions(model, scheduler, obs)
    return actions, seen


@pytest.mark.parametrize("standin", ["reuse", "taylor-1"])
def test_tap_sees_every_block_at_every_step_and_changes_nothing(tiny_stack, sample_actions, standin):
    model, scheduler, obs = tiny_stack
    plan = bac.make_plan(model, "uniform", num_steps=12, M=4)
    with bac.accelerate(model, plan, num_steps=12, standin=standin):
        plain = sample_actions(model, scheduler, obs)
    actions, seen = _tapped_run(model, plan, scheduler, obs, sample_actions, standin=standin)
    assert torch.equal(actions, plain)  # tapping is observation only
    num_blocks = len(plan.blocks)
    assert [(i, step) for _, i, step, _, _ in seen] == [(i, k) for k in range(12) for i in range(num_blocks)]
    table = plan.step_table()
    assert all(computed == table[step][i] for _, i, step, _, computed in seen)
    assert {context for context, *_ in seen} == {"default"}
    if standin == "reuse":  # a reused block hands on exactly the value computed at its last update step
        last = {}
        for _, i, step, out, computed in seen:
            if computed:
                last[i] = out
            else:
                assert out is last[i]


def test_tap_on_a_runtime_rule_reports_what_ran(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    method = bac.build_method("fbcache", model, num_steps=12, threshold=0.5)
    _, seen = _tapped_run(model, method, scheduler, obs, sample_actions)
    assert len(seen) == 12 * len(bac.describe(model).blocks)
    with bac.accelerate(model, method, num_steps=12) as handle:
        sample_actions(model, scheduler, obs)
        stats = handle.stats()
    assert sum(computed for *_, computed in seen) == stats["computed"]
    assert sum(not computed for *_, computed in seen) == stats["skipped"] > 0

