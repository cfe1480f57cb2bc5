"""Bubbling Union Algorithm semantics on hand-built schedules."""
import pytest

from bac import Block, bubbling_union

BLOCKS = [
    ("l0.sa", "sa", 0), ("l0.ca", "ca", 0), ("l0.ffn", "ffn", 0),
    ("l1.sa", "sa", 1), ("l1.ca", "ca", 1), ("l1.ffn", "ffn", 1),
    ("l2.sa", "sa", 2), ("l2.ffn", "ffn", 2),
]
STEPS = {
    "l0.sa": [0, 5], "l0.ca": [0, 6], "l0.ffn": [0, 1],
    "l1.sa": [0, 7], "l1.ca": [0, 8], "l1.ffn": [0, 2],
    "l2.sa": [0, 9], "l2.ffn": [0, 3],
}


def errors(**high):
    base = {name: 0.1 for name, _, _ in BLOCKS}
    base.update({k.replace("_", "."): v for k, v in high.items()})
    return base


def test_top_n_zero_is_identity():
    assert bubbling_union(STEPS, BLOCKS, errors(l1_sa=9.0), 0) == STEPS


def test_same_layer_and_deeper_ffns_bubble_up():
    out = bubbling_union(STEPS, BLOCKS, errors(l1_sa=9.0), 1)
    assert out["l1.sa"] == [0, 2, 3, 7]  # own + l1.ffn (same layer) + l2.ffn (deeper)
    assert {k: v for k, v in out.items() if k != "l1.sa"} == {k: v for k, v in STEPS.items() if k != "l1.sa"}


def test_shallower_ffns_do_not_bubble():
    out = bubbling_union(STEPS, BLOCKS, errors(l2_sa=9.0), 1)
    assert out["l2.sa"] == [0, 3, 9]  # l0.ffn and l1.ffn are upstream of layer 2


def test_top_n_picks_largest_errors():
    out = bubbling_union(STEPS, BLOCKS, errors(l0_ca=5.0, l2_sa=4.0, l1_sa=3.0), 2)
    assert out["l0.ca"] == [0, 1, 2, 3, 6]
    assert out["l2.sa"] == [0, 3, 9]
    assert out["l1.sa"] == STEPS["l1.sa"]


def test_ffn_selected_gets_deeper_ffns_and_inputs_bubble_not_outputs():
    out = bubbling_union(STEPS, BLOCKS, errors(l0_ffn=5.0, l1_ffn=4.0), 2)
    assert out["l0.ffn"] == [0, 1, 2, 3]
    assert out["l1.ffn"] == [0, 2, 3]


def test_ties_prefer_earlier_blocks_and_objects_are_accepted():
    objects = [Block(*b) for b in BLOCKS]
    out = bubbling_union(STEPS, objects, {b.name: 1.0 for b in objects}, 1)
    assert out["l0.sa"] == [0, 1, 2, 3, 5]
    assert all(out[k] == STEPS[k] for k in STEPS if k != "l0.sa")


def test_top_n_larger_than_block_count_selects_all():
    out = bubbling_union(STEPS, BLOCKS, errors(), 100)
    assert out["l0.sa"] == [0, 1, 2, 3, 5]
    assert out["l2.ffn"] == [0, 3]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="top_n"):
        bubbling_union(STEPS, BLOCKS, errors(), -1)
    with pytest.raises(KeyError, match="l0.sa"):
        bubbling_union({k: v for k, v in STEPS.items() if k != "l0.sa"}, BLOCKS, errors(), 1)
    with pytest.raises(ValueError, match="kind"):
        bubbling_union(STEPS, [("l0.sa", "mlp", 0)], errors(), 1)
