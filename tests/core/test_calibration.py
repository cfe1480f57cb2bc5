"""Calibration statistics are what docs/guide/caching-methods.md defines, and calibration is reproducible."""
import numpy as np
import pytest
import torch
from torch import nn

import bac


def record_features(model, scheduler, obs, sample_actions):
    """Every block's residual at every step, recorded independently through forward hooks."""
    features = {}
    hooks = []
    for i, layer in enumerate(model.decoder.layers):
        for key, attr in (("sa", "self_attn"), ("ca", "multihead_attn"), ("ffn", "linear2")):
            name = f"decoder.layers.{i}.{key}"
            features[name] = []

            def hook(module, args, out, name=name):
                features[name].append((out[0] if isinstance(out, tuple) else out).detach().clone())

            hooks.append(getattr(layer, attr).register_forward_hook(hook))
    try:
        sample_actions(model, scheduler, obs)
    finally:
        for h in hooks:
            h.remove()
    return features


def test_matrices_match_the_definitions(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    calibration = bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs])
    torch.manual_seed(0)  # calibrate seeds the sampler's RNG the same way
    features = record_features(model, scheduler, obs, sample_actions)
    k = 12
    assert calibration.num_steps == k and calibration.samples == 2
    for i, block in enumerate(calibration.blocks):
        r = torch.stack(features[block.name], 1).flatten(2).double()  # [batch, K, D]
        cosine = torch.nn.functional.cosine_similarity(r[:, :, None], r[:, None], dim=-1).mean(0)
        l1 = (r[:, :, None] - r[:, None]).abs().mean(-1).mean(0)
        mse = (r[:, :, None] - r[:, None]).square().mean(-1).mean(0)
        np.testing.assert_allclose(calibration.matrix("cosine")[i], cosine.numpy(), atol=1e-5)
        np.testing.assert_allclose(calibration.matrix("l1")[i], l1.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(calibration.matrix("mse")[i], mse.numpy(), rtol=1e-4, atol=1e-9)
        pairs = [l1[a, t].item() for a in range(k) for t in range(a + 1, k)]
        assert calibration.reuse_error[i] == pytest.approx(np.mean(pairs), rel=1e-4)


def test_samples_accumulate_and_calibration_is_reproducible(tiny_stack, tmp_path, sample_actions):
    model, scheduler, obs = tiny_stack
    sample = lambda o: sample_actions(model, scheduler, o, seed=int(torch.randint(1000, ())))
    first = bac.calibrate(model, sample, [obs, obs[:1]], seed=3)
    second = bac.calibrate(model, sample, [obs, obs[:1]], seed=3)
    other = bac.calibrate(model, sample, [obs, obs[:1]], seed=4)
    assert first.samples == 3
    np.testing.assert_array_equal(first.matrix("cosine"), second.matrix("cosine"))
    assert not np.array_equal(first.matrix("cosine"), other.matrix("cosine"))
    loaded = bac.Calibration.load(first.save(tmp_path / "calibration.safetensors"))
    assert loaded.blocks == first.blocks and loaded.fingerprint == first.fingerprint
    np.testing.assert_array_equal(loaded.matrix("l1"), first.matrix("l1"))
    assert bac.make_plan(loaded, "bac", M=4) == bac.make_plan(first, "bac", M=4)


def test_calibration_leaves_the_model_and_rng_untouched(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs])
    assert torch.equal(torch.rand(3), expected)
    assert not hasattr(model, "_bac_handle")


class Wrongly(nn.Module):
    """Layers registered in the opposite order of execution."""

    def __init__(self):
        super().__init__()
        self.second = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.first = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

    def forward(self, x):
        return self.second(self.first(x))


def test_declared_order_must_be_execution_order():
    model = Wrongly().eval()

    def sample(x):
        for _ in range(3):
            model(x)

    with pytest.raises(RuntimeError, match="execution order"):
        bac.calibrate(model, sample, [torch.randn(1, 4, 8)])


def test_nan_features_and_inconsistent_step_counts_are_errors(tiny_stack, sample_actions):
    model, scheduler, obs = tiny_stack
    with pytest.raises(FloatingPointError, match="NaN"):
        bac.calibrate(model, lambda o: sample_actions(model, scheduler, o), [obs * float("nan")])
    x = torch.zeros(2, 8, 3)

    def steps(n):
        with torch.no_grad():
            for k in range(n):
                model(x, k, obs)

    with pytest.raises(RuntimeError, match="ran 4 and 5 steps"):
        bac.calibrate(model, steps, [4, 5])
    with pytest.raises(ValueError, match="at least one"):
        bac.calibrate(model, steps, [])
