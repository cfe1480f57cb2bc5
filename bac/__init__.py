"""bac: Block-wise Adaptive Caching for transformer diffusion policies and DiTs.

Typical use::

    calibration = bac.calibrate(denoiser, policy_sample, calibration_batches)
    plan = bac.make_plan(calibration, "bac", M=10, n=5)
    with bac.accelerate(denoiser, plan, num_steps=100) as handle:
        actions = policy_sample(obs)          # calls bac.new_trajectory(denoiser) first
        print(handle.summary())

Every method is a schedule plus a stand-in, built by name (:func:`build_method`); :func:`refine` and
:func:`plan_for_budget` make plans for the real output and for a deadline. The core needs torch, numpy and
safetensors only; ``bac.diffusers`` adds diffusers' DiT, FLUX and Wan. The guide: docs/guide/core.md and
docs/guide/caching-methods.md.
"""
__version__ = "0.2.0"

from .acs import acs_schedule, acs_scores
from .adjust import adjust_timesteps
from .adapters import Block, BranchAttributes, ForwardOverride, LayerAdapter, ModelSpec, describe, register_adapter
from .bua import bubbling_union
from .budget import BlockCost, BudgetError, BudgetPlan, allocate_updates, plan_for_budget, plan_timer
from .calibration import METRICS, Calibration
from .engine import CacheHandle, StepOverflowError, abandon_trajectory, accelerate, get_handle, new_trajectory
from .errors import (
    BacError,
    CacheStateError,
    CheckpointError,
    ConfigError,
    ConfigTypeError,
    DataError,
    NonFiniteError,
    PlanMismatchError,
)
from .fit import scheduler_id
from .forecast import forecast_errors, forecast_schedule
from .methods import (
    Method,
    MethodInfo,
    available_methods,
    build_method,
    make_plan,
    method_info,
    method_params,
    needs_calibration,
    register_method,
)
from .plan import Plan, PlanBlock
from .recorder import calibrate
from .refine import refine
from .rules import CGTaylor, FirstBlockCache, Rule, Sortblock
from .standins import REUSE, Linear, Reuse, Taylor, make_standin

__all__ = [
    "BacError",
    "BlockCost",
    "BudgetError",
    "BudgetPlan",
    "Block",
    "BranchAttributes",
    "CGTaylor",
    "CacheHandle",
    "CacheStateError",
    "Calibration",
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "DataError",
    "FirstBlockCache",
    "ForwardOverride",
    "LayerAdapter",
    "Linear",
    "METRICS",
    "Method",
    "MethodInfo",
    "ModelSpec",
    "NonFiniteError",
    "Plan",
    "PlanBlock",
    "PlanMismatchError",
    "REUSE",
    "Reuse",
    "Rule",
    "Sortblock",
    "StepOverflowError",
    "Taylor",
    "__version__",
    "accelerate",
    "acs_schedule",
    "adjust_timesteps",
    "acs_scores",
    "allocate_updates",
    "available_methods",
    "bubbling_union",
    "build_method",
    "calibrate",
    "describe",
    "forecast_errors",
    "forecast_schedule",
    "make_plan",
    "make_standin",
    "method_info",
    "method_params",
    "needs_calibration",
    "get_handle",
    "new_trajectory",
    "abandon_trajectory",
    "plan_for_budget",
    "plan_timer",
    "refine",
    "register_adapter",
    "register_method",
    "scheduler_id",
]
