"""The errors a user can act on: each message names the file or field at fault and the fix.

Every entry point (``bac.eval``, ``bac-train``, ``bac-collect``, ``bac-plan``) turns a
:class:`BacError` into one line on stderr and exit status 2; anything else is a bug and
keeps its traceback. Each subclass also derives from the built-in exception it refines,
so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class BacError(Exception):
    """A failure caused by an input, a file or a setting, not by a bug."""


class ConfigError(BacError, ValueError):
    """A setting (Hydra config, argument, config file field) is missing, unknown or out of range."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument of the wrong type (a model where a Calibration belongs, a non-callable branch): a
    :class:`ConfigError` that ``except TypeError`` also catches."""


class CheckpointError(BacError, ValueError):
    """A checkpoint or weights file is missing, corrupt, or does not fit its config."""


class DataError(BacError, ValueError):
    """A dataset or an observation is malformed: missing keys, wrong shapes or widths, NaN."""


class PlanMismatchError(BacError, ValueError):
    """A plan or calibration does not fit the model, weights or sampler it is applied to."""


class CacheStateError(BacError, RuntimeError):
    """Cached state does not fit the current call (another batch size in the middle of a trajectory)."""


class NonFiniteError(BacError, FloatingPointError):
    """A model produced NaN or inf (actions, block features)."""
