"""bac: Block-wise Adaptive Caching for transformer diffusion policies and DiTs.

Typical use::

    calibration = bac.calibrate(denoiser, policy.sample, calibration_batches)
    plan = bac.make_plan(calibration, "bac", M=10, n=5)
    plan.save("plan.json")
    with bac.accelerate(denoiser, bac.Plan.load("plan.json"), num_steps=100) as handle:
        actions = policy.sample(obs)          # calls bac.new_trajectory(denoiser) first
        print(handle.summary())
"""
from .adapters import Block, BranchAttributes, ForwardOverride, LayerAdapter, ModelSpec, describe, register_adapter
from .calibration import METRICS, Calibration, calibrate
from .engine import CacheHandle, StepOverflowError, accelerate, new_trajectory
from .plan import Plan, PlanBlock, PlanMismatchError, scheduler_id
from .schedulers import acs_schedule, bubbling_union, make_plan, plan_methods, register_plan_method

__all__ = [
    "Block",
    "BranchAttributes",
    "CacheHandle",
    "Calibration",
    "ForwardOverride",
    "LayerAdapter",
    "METRICS",
    "ModelSpec",
    "Plan",
    "PlanBlock",
    "PlanMismatchError",
    "StepOverflowError",
    "accelerate",
    "acs_schedule",
    "bubbling_union",
    "calibrate",
    "describe",
    "make_plan",
    "new_trajectory",
    "plan_methods",
    "register_adapter",
    "register_plan_method",
    "scheduler_id",
]
