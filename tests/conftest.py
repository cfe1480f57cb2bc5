import pytest
import torch

from eval.stack import DecoderStackDenoiser, ddpm_scheduler, sample_actions


@pytest.fixture
def tiny_stack():
    """A small DP-T-shaped decoder stack, a 12-step DDPM sampler, and observations."""
    torch.manual_seed(0)
    model = DecoderStackDenoiser(action_dim=3, obs_dim=5, horizon=8, width=32, num_layers=3, heads=2).eval()
    scheduler = ddpm_scheduler(12)
    obs = torch.randn(2, 2, 5)
    return model, scheduler, obs


def run(model, scheduler, obs, seed=0):
    return sample_actions(model, scheduler, obs, seed=seed)
