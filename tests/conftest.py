"""Fixtures every layer's tests share; the layers' own are in their folders' conftest.py."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread hand-offs cost more than the arithmetic on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def exhaustive_settings():
    """``exhaustive_settings(num_steps)``: per caching method, parameters under which it computes every
    block at every step (calibrations for them profile attention: ProfilingDiT's needs it)."""

    def settings(num_steps: int) -> dict[str, dict]:
        return {
            "every-step": {},
            "uniform": {"interval": 1},
            "unified-acs": {"M": num_steps},
            "acs": {"M": num_steps},
            "bac": {"M": num_steps, "n": 2},
            "forecast-acs": {"M": num_steps, "order": 1, "allocate": True},
            "taylorseer": {"interval": 1, "order": 2},
            "fbcache": {"threshold": 0.0},
            "cg-taylor": {"gate": 0.0},
            "sortblock": {"fraction": 1.0},
            "ertacache": {"threshold": 0.0},
            "profiling-dit": {"share": 0.0},
        }

    return settings


@pytest.fixture(scope="session")
def skipping_settings():
    """Per caching method but every-step, parameters that skip a good share of block evaluations on the tests'
    tiny denoisers and policies (cap ``M`` at the sampler's step count)."""
    return {
        "uniform": {"interval": 3},
        "unified-acs": {"M": 4},
        "acs": {"M": 4},
        "bac": {"M": 4, "n": 2},
        "forecast-acs": {"M": 4, "order": 1},
        "taylorseer": {"interval": 3, "order": 2},
        "fbcache": {"threshold": 10.0},
        "cg-taylor": {"gate": 10.0},
        "sortblock": {"fraction": 0.34, "interval": 4},
        "ertacache": {"threshold": 1.5, "warmup": 2},  # steps 0 and 1, then every step rectified from both
        "profiling-dit": {"share": 0.67, "warmup": 1, "interval": 3},
    }
