"""Ordinary mistakes in the core's API raise the project's error kinds (bac.errors), never a bare ValueError
or TypeError, and each kind still derives from the built-in exception the call raised before."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import bac
from bac import CacheStateError, ConfigError, ConfigTypeError, DataError, PlanMismatchError

K = 6  # the calibration's steps

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class NoParams:
    pass


class OneLayer(nn.Module):
    """A denoiser of one decoder layer: a whole-model rule has no layer left to cache."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x, x)


def accelerate_twice(c):
    with bac.accelerate(c.model, bac.make_plan(c.spec, "uniform", num_steps=K, M=2)):
        bac.accelerate(c.model, bac.make_plan(c.spec, "uniform", num_steps=K, M=3))


def drop_default_context(c):
    with bac.accelerate(c.model, bac.make_plan(c.spec, "uniform", num_steps=K, M=2)) as handle:
        handle.drop_context("default")


def reschedule_to_another_standin(c):
    with bac.accelerate(c.model, bac.make_plan(c.spec, "uniform", num_steps=K, M=2)) as handle:
        handle.reschedule(bac.build_method("uniform", c.spec, num_steps=K, M=3, standin="taylor-1"))


# (call on the context, kind, message fragment, the built-in exception it raised before)
CASES = {
    "plan without a block's steps": (lambda c: bac.Plan.from_steps(c.spec, {}, num_steps=K, method="custom"),
                                     ConfigError, "no update steps for blocks", ValueError),
    "plan with fractional steps": (lambda c: bac.Plan.from_steps(
        c.spec, {b.name: [0, 2.5] for b in c.spec.blocks}, num_steps=K, method="custom"),
        ConfigError, "update steps must be integers", ValueError),
    "unknown method": (lambda c: bac.build_method("bca", c.spec, num_steps=K), ConfigError,
                       "unknown caching method 'bca'", ValueError),
    "unknown parameter": (lambda c: bac.method_params("bac", M=3, m=2), ConfigError,
                          "takes parameters", ValueError),
    "calibrated method from a model": (lambda c: bac.build_method("bac", c.model, num_steps=K), ConfigError,
                                       "needs a Calibration", ValueError),
    "calibration of another step count": (lambda c: bac.make_plan(c.calibration, "bac", num_steps=K + 1, M=2),
                                          PlanMismatchError, f"calibration covers {K} steps, not {K + 1}", ValueError),
    "static plan without steps": (lambda c: bac.make_plan(c.spec, "uniform", M=2), ConfigError,
                                  "needs num_steps", ValueError),
    "plan of a runtime rule": (lambda c: bac.make_plan(c.spec, "fbcache", num_steps=K), ConfigError,
                               "is a runtime rule, not a static plan", ValueError),
    "uniform with M and interval": (lambda c: bac.make_plan(c.spec, "uniform", num_steps=K, M=2, interval=3),
                                    ConfigError, "exactly one of M", ValueError),
    "M out of range": (lambda c: bac.make_plan(c.calibration, "bac", M=0), ConfigError,
                       "M (updates per block) must be an integer", ValueError),
    "unknown metric": (lambda c: bac.make_plan(c.calibration, "bac", M=2, metric="cosin"), ConfigError,
                       "unknown metric 'cosin'", ValueError),
    "unknown stand-in": (lambda c: bac.make_standin("taylor-3"), ConfigError, "unknown stand-in", ValueError),
    "adapter of another type": (lambda c: bac.register_adapter(nn.Linear, {"ffn": "ffn"}), ConfigTypeError,
                                "must be a LayerAdapter", TypeError),
    "unknown branch kind": (lambda c: bac.BranchAttributes({"linear1": "mlp"}), ConfigError,
                            "has kind 'mlp'", ValueError),
    "model without adapted layers": (lambda c: bac.describe(nn.Linear(2, 2)), ConfigError,
                                     "no layer with a registered block adapter", ValueError),
    "spec without its model": (lambda c: bac.ModelSpec((), (), {}).weights_digest(), ConfigError,
                               "built without its model", ValueError),
    "schedule of another type": (lambda c: bac.accelerate(c.model, "bac", num_steps=K), ConfigTypeError,
                                 "schedule must be a bac.Plan", TypeError),
    "two stand-ins": (lambda c: bac.accelerate(c.model, bac.build_method("uniform", c.spec, num_steps=K, M=2),
                                               standin="taylor-1"), ConfigError, "already has its stand-in",
                      ValueError),
    "accelerated twice": (accelerate_twice, CacheStateError, "already accelerated", RuntimeError),
    "dropping the default context": (drop_default_context, ConfigError, "cannot drop context 'default'",
                                     ValueError),
    "reschedule to another stand-in": (reschedule_to_another_standin, ConfigError, "keeps the handle's stand-in",
                                       ValueError),
    "undescribable scheduler": (lambda c: bac.scheduler_id(object()), ConfigTypeError,
                                "cannot describe scheduler", TypeError),
    "whole-model rule on one layer": (lambda c: bac.accelerate(OneLayer(), bac.build_method(
        "fbcache", OneLayer(), num_steps=K), num_steps=K), PlanMismatchError, "at least two layers", ValueError),
    "register: params not a dataclass": (lambda c: bac.register_method("mine", dict), ConfigTypeError,
                                         "params must be a dataclass type", TypeError),
    "register: a name taken": (lambda c: bac.register_method("bac", NoParams)(lambda *a: None), ConfigError,
                               "already registered", ValueError),
    "refine a runtime rule": (lambda c: bac.refine(c.model, bac.build_method("fbcache", c.spec, num_steps=K),
                                                   c.sample, [c.obs]), ConfigTypeError,
                              "refine improves a static plan", TypeError),
    "refine without inputs": (lambda c: bac.refine(c.model, bac.build_method("uniform", c.spec, num_steps=K, M=2),
                                                   c.sample, []), ConfigError, "at least one input", ValueError),
    "ACS of a non-square matrix": (lambda c: bac.acs_schedule(np.zeros((3, 4)), 2), DataError,
                                   "square K x K", ValueError),
    "ACS of NaN": (lambda c: bac.acs_schedule(np.full((3, 3), np.nan), 2), DataError, "NaN or inf", ValueError),
    "forecast of a non-square Gram matrix": (lambda c: bac.forecast_schedule(np.zeros((2, 3)), 1), DataError,
                                             "Gram matrix", ValueError),
    "BUA of an unknown block kind": (lambda c: bac.bubbling_union({"b": [0]}, [("b", "mlp", 0)], {"b": 1.0}, 1),
                                     ConfigError, "has kind 'mlp'", ValueError),
    "allocation without blocks": (lambda c: bac.allocate_updates([], [], 3), ConfigError, "one gain row",
                                  ValueError),
    "budget of an unknown metric": (lambda c: bac.plan_for_budget(c.calibration, latency_ms=10.0, metric="l3"),
                                    ConfigError, "unknown metric 'l3'", ValueError),
    "negative budget": (lambda c: bac.plan_for_budget(c.calibration, latency_ms=-1.0), ConfigError,
                        "latency_ms", ValueError),
}


@dataclasses.dataclass
class Context:
    model: nn.Module
    spec: bac.ModelSpec
    calibration: bac.Calibration
    sample: object
    obs: torch.Tensor


@pytest.fixture(scope="module")
def context(calibrated, sample_actions):
    model, scheduler, calibration = calibrated
    obs = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(2))
    return Context(model, bac.describe(model), calibration, lambda o: sample_actions(model, scheduler, o), obs)


@pytest.mark.parametrize("case", CASES)
def test_an_api_mistake_raises_its_kind_naming_the_fault(case, context):
    call, kind, fragment, builtin = CASES[case]
    with pytest.raises(kind, match=fragment.replace("(", r"\(").replace(")", r"\)")) as caught:
        call(context)
    assert isinstance(caught.value, bac.BacError) and isinstance(caught.value, builtin)
    assert bac.get_handle(context.model) is None  # a failed call leaves the model as it was


def test_the_type_kind_is_a_config_error_and_a_type_error():
    assert issubclass(ConfigTypeError, ConfigError) and issubclass(ConfigTypeError, TypeError)
    assert issubclass(ConfigTypeError, ValueError)  # as every ConfigError: `except ValueError` sees it too
