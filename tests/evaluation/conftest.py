"""A tiny random-weight DP-T checkpoint (2 layers, width 32; tasks reach and push), saved once per module."""
import pytest
import torch

from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = PolicyConfig.build("dpt", {"width": 32, "num_layers": 2, "heads": 2}, state_dim=39, action_dim=4,
                                tasks=["reach", "push"])
    policy = DiffusionPolicy(config)
    policy.obs_normalizer.fit(torch.randn(100, 39))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    return policy.save(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(autouse=True)
def quick_torch_compile(monkeypatch):
    """The main job also times each uncached method under torch.compile (the capable user's configuration):
    here with dynamo's ``eager`` backend, the same code path without inductor's seconds of code generation."""
    from bac.evaluation import variants

    monkeypatch.setattr(variants, "TORCH_COMPILER", "eager")
