"""Robot environments and demonstration data for training and evaluating diffusion policies.

- :mod:`envs.metaworld_env`: seeded, goal-observable Meta-World v3 state environments,
  registered as ``bac/metaworld-<task>-v3``, plus the scripted experts.
- :mod:`envs.collect`: ``python -m bac.envs.collect task=push episodes=100`` writes expert
  demonstrations in robomimic's HDF5 layout.
- :mod:`envs.dataset`: reads robomimic-layout files as (observation history, action
  chunk) training windows, and draws calibration observations.

Nothing is imported here, so ``import bac.envs.dataset`` does not load Meta-World/MuJoCo.
"""
