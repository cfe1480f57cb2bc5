"""The feature keys: the names of a policy's inputs and outputs, after LeRobot's conventions.

A batch handed to a policy, a policy server's request and a shipped calibration file are keyed by these
names. Every module of the policies and of the layers above reads them from here (``bac.envs``, a sibling
that cannot import ``bac.policies``, keeps one copy for its calibration file, checked equal by a test).
"""

STATE = "observation.state"
"""The proprioceptive state, ``[state_dim]`` (with its history, ``[n_obs_steps, state_dim]``)."""

IMAGE_PREFIX = "observation.images."
"""Plus a camera name: one image ``[3, H, W]`` with values in [0, 1]."""

TASK = "task"
"""The task's name, or a vision-language head's free-text instruction."""

ACTION = "action"
"""The output: an action chunk, ``[horizon, action_dim]``."""
