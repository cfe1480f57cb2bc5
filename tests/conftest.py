import pytest
import torch
from diffusers import DDPMScheduler

import bac
from bac.policies.dpt import TransformerForDiffusion


def ddpm_scheduler(num_steps):
    scheduler = DDPMScheduler(num_train_timesteps=num_steps, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def sample_actions(model, scheduler, obs, seed=0):
    """One sampling call of a denoiser ``model(x, t, cond)``: a seeded reverse-diffusion trajectory."""
    bac.new_trajectory(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((obs.shape[0], model.horizon, model.action_dim), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, obs), t, x, generator=generator).prev_sample
    return x


def tiny_dpt(**changes):
    torch.manual_seed(0)
    config = dict(action_dim=3, cond_dim=5, horizon=8, width=32, num_layers=3, heads=2, dropout=0.0)
    return TransformerForDiffusion(**{**config, **changes}).eval()


@pytest.fixture
def tiny_stack():
    """A small DP-T (PyTorch decoder layers), a 12-step DDPM sampler, and observations."""
    model = tiny_dpt()
    return model, ddpm_scheduler(12), torch.randn(2, 2, 5)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread hand-offs cost more than the arithmetic on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exhaustive_settings(num_steps: int) -> dict[str, dict]:
    """Per caching method, parameters under which it computes every block at every step."""
    return {
        "every-step": {},
        "uniform": {"interval": 1},
        "unified-acs": {"M": num_steps},
        "acs": {"M": num_steps},
        "bac": {"M": num_steps, "n": 2},
        "taylorseer": {"interval": 1, "order": 2},
        "fbcache": {"threshold": 0.0},
        "cg-taylor": {"gate": 0.0},
        "sortblock": {"fraction": 1.0},
    }
