"""Robot environments and demonstration data for training and evaluating diffusion policies.

:mod:`envs.metaworld_env` (seeded, goal-observable Meta-World v3 environments, ``bac/metaworld-<task>-v3``,
and the scripted experts), :mod:`envs.tasks` (task list, episode caps, registration), :mod:`envs.collect`
(``bac-collect``: expert demonstrations in robomimic's HDF5 layout), :mod:`envs.dataset` (training windows)
and :mod:`envs.video` (rollout GIFs). Importing this package registers the gymnasium ids with string entry
points, so it loads neither Meta-World nor MuJoCo. docs/guide/policies.md ("Simulated tasks").
"""

from .tasks import register_envs

__all__ = ["register_envs"]

try:
    register_envs()
except ImportError:  # gymnasium is in the `sim` extra; the data reader works without it
    pass
