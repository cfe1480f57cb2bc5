"""Robot environments and demonstration data for training and evaluating diffusion policies.

- :mod:`envs.metaworld_env`: seeded, goal-observable Meta-World v3 state environments,
  registered as ``bac/metaworld-<task>-v3``, that can also render ``rgb_array`` frames,
  plus the scripted experts.
- :mod:`envs.tasks`: the task list, episode caps and the gymnasium registration, none of
  which needs Meta-World.
- :mod:`envs.video`: one recorded episode per policy and task, as an animated GIF.
- :mod:`envs.collect`: ``bac-collect task=push episodes=100`` writes expert
  demonstrations in robomimic's HDF5 layout.
- :mod:`envs.dataset`: reads robomimic-layout files as (observation history, action
  chunk) training windows, and draws calibration observations.

Importing this package registers the gymnasium ids (``gymnasium.make("bac/metaworld-push-v3")``
works after ``import bac.envs``) with string entry points, so it loads neither Meta-World
nor MuJoCo: ``import bac.envs.dataset`` stays light. gymnasium 1.x does not load
``gymnasium.envs`` entry-point plugins by itself; without importing ``bac.envs`` first,
``gymnasium.make("bac.envs:bac/metaworld-push-v3")`` imports it on the way.
"""

from .tasks import register_envs

__all__ = ["register_envs"]

try:
    register_envs()
except ImportError:  # gymnasium is in the `sim` extra; the data reader works without it
    pass
