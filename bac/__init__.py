"""bac: Block-wise Adaptive Caching for transformer diffusion policies and DiTs.

Typical use::

    calibration = bac.calibrate(denoiser, policy_sample, calibration_batches)
    plan = bac.make_plan(calibration, "bac", M=10, n=5)
    plan.save("plan.json")
    with bac.accelerate(denoiser, bac.Plan.load("plan.json"), num_steps=100) as handle:
        actions = policy_sample(obs)          # calls bac.new_trajectory(denoiser) first
        print(handle.summary())

Every method (BAC and its ablations, uniform caching, TaylorSeer, FBCache,
CG-Taylor, Sortblock) is a schedule plus a stand-in, built by name::

    method = bac.build_method("taylorseer", denoiser, num_steps=100, interval=4)
    with bac.accelerate(denoiser, method, num_steps=100):
        ...

To move a plan's update steps where the model's real output deviates least (the cached model in the
loop on a few calibration inputs; the update counts, and so the cost, stay)::

    refined = bac.refine(denoiser, bac.build_method("taylorseer", denoiser, num_steps=50, interval=4),
                         policy_sample, calibration_batches)

For a deadline instead of an update budget (a control rate, a chunk latency), on this machine::

    chosen = bac.plan_for_budget(calibration, control_hz=20, actions_per_chunk=8,
                                 timer=bac.plan_timer(denoiser, lambda: policy_sample(obs)))
    print(chosen.describe())  # predicted and measured latency, updates per block

The core needs torch, numpy and safetensors only; ``bac.diffusers`` (extra
``diffusers``) adds diffusers' DiT, FLUX and Wan transformers.
"""
__version__ = "0.2.0"

from .acs import acs_schedule, acs_scores
from .adapters import Block, BranchAttributes, ForwardOverride, LayerAdapter, ModelSpec, describe, register_adapter
from .bua import bubbling_union
from .budget import BlockCost, BudgetError, BudgetPlan, allocate_updates, plan_for_budget, plan_timer
from .calibration import METRICS, Calibration
from .engine import CacheHandle, StepOverflowError, accelerate, new_trajectory
from .errors import (
    BacError,
    CacheStateError,
    CheckpointError,
    ConfigError,
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
from .standins import REUSE, Reuse, Taylor, make_standin

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
    "DataError",
    "FirstBlockCache",
    "ForwardOverride",
    "LayerAdapter",
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
    "new_trajectory",
    "plan_for_budget",
    "plan_timer",
    "refine",
    "register_adapter",
    "register_method",
    "scheduler_id",
]
