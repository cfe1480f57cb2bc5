"""bac: Block-wise Adaptive Caching for transformer diffusion policies and DiTs.

Typical use::

    calibration = bac.calibrate(denoiser, policy.sample, calibration_batches)
    plan = bac.make_plan(calibration, "bac", M=10, n=5)
    plan.save("plan.json")
    with bac.accelerate(denoiser, bac.Plan.load("plan.json"), num_steps=100) as handle:
        actions = policy.sample(obs)          # calls bac.new_trajectory(denoiser) first
        print(handle.summary())

Every other caching method (TaylorSeer, FBCache, CG-Taylor, Sortblock, BAC with
Taylor forecasts) is a schedule plus a stand-in, built by name::

    method = bac.build_method("taylorseer", denoiser, num_steps=100, interval=4)
    with bac.accelerate(denoiser, method, num_steps=100):
        ...
"""
__version__ = "0.2.0"

from .adapters import Block, BranchAttributes, ForwardOverride, LayerAdapter, ModelSpec, describe, register_adapter
from .calibration import METRICS, Calibration, calibrate
from .engine import CacheHandle, StepOverflowError, accelerate, new_trajectory
from .forecast import Reuse, Taylor
from .methods import Method, available_methods, build_method, register_method
from .rules import CGTaylor, FirstBlockCache, Rule, Sortblock
from .plan import Plan, PlanBlock, PlanMismatchError, scheduler_id
from .schedulers import acs_schedule, bubbling_union, make_plan, plan_methods, register_plan_method

__all__ = [
    "Block",
    "BranchAttributes",
    "CGTaylor",
    "CacheHandle",
    "Calibration",
    "FirstBlockCache",
    "ForwardOverride",
    "LayerAdapter",
    "METRICS",
    "Method",
    "ModelSpec",
    "Plan",
    "PlanBlock",
    "PlanMismatchError",
    "Reuse",
    "Rule",
    "Sortblock",
    "StepOverflowError",
    "Taylor",
    "accelerate",
    "available_methods",
    "acs_schedule",
    "bubbling_union",
    "build_method",
    "calibrate",
    "describe",
    "make_plan",
    "new_trajectory",
    "plan_methods",
    "register_adapter",
    "register_method",
    "register_plan_method",
    "scheduler_id",
]
