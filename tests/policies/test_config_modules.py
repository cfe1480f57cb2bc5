"""The config's layout: one model config module per architecture, the feature keys defined once, and
``bac.policies.config`` still exporting every name it did."""
import ast
import importlib
from pathlib import Path

import pytest

import bac
from bac.policies import config, constants

ROOT = Path(bac.__file__).resolve().parent.parent
FEATURE_KEYS = {constants.STATE, constants.IMAGE_PREFIX, constants.TASK, constants.ACTION}
# bac.envs cannot import bac.policies (sibling layers): its calibration file names the tensor by a copy,
# kept equal by tests/envs/test_state_dim.py.
ALLOWED_COPIES = {"policies/constants.py", "envs/calibration_inputs.py"}


@pytest.mark.parametrize("architecture", sorted(config.MODEL_CONFIGS))
def test_each_architecture_has_its_config_module(architecture):
    module = importlib.import_module(f"bac.policies.{architecture}_config")
    cls = config.MODEL_CONFIGS[architecture]
    assert cls.__module__ == module.__name__ and getattr(module, cls.__name__) is cls
    assert getattr(config, cls.__name__) is cls  # still importable from bac.policies.config


# Every public name bac.policies.config had before the split, and the module each one lives in now.
EXPORTED = {
    "bac.policies.config": ["CONFIG_FORMAT", "LEGACY_FORMAT", "IDENTITY_FIELDS", "WEIGHTS_FILE", "MODEL_CONFIGS",
                            "VLA_ARCHITECTURES", "ModelConfig", "PolicyConfig", "WeightsRecord", "from_legacy",
                            "identity_differences", "identity_digest", "model_config", "read_config"],
    "bac.policies.constants": ["ACTION", "IMAGE_PREFIX", "STATE", "TASK"],
    "bac.policies.features": ["FEATURE_TYPES", "PolicyFeature", "action_features", "image_features",
                              "state_features"],
    "bac.policies.noise_scheduler_config": ["BETA_SCHEDULES", "PREDICTION_TYPES", "FlowMatchingConfig",
                                            "NoiseSchedulerConfig", "noise_scheduler_config"],
    "bac.policies.vla_config": ["VLAHeadConfig"],
    "bac.policies.dpt_config": ["DPTConfig"], "bac.policies.dit_config": ["DiTConfig"],
    "bac.policies.gr00t_config": ["GR00TConfig"], "bac.policies.rdt_config": ["RDTConfig"],
    "bac.policies.pi0_config": ["Pi0Config"],
}


def test_config_still_exports_every_name_it_did():
    for module_name, names in EXPORTED.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(config, name) is getattr(module, name), f"{name} (from {module_name})"
    assert sorted(config.__all__) == sorted(n for names in EXPORTED.values() for n in names)
    assert config.PolicyConfig.__module__ == "bac.policies.config"  # the documented home


def test_feature_keys_are_defined_once():
    """No installed module assigns a feature key to a name of its own, except the constants module (and the
    envs' one copy, which a layer rule forces)."""
    found = []
    for folder in ("bac", "policies", "envs", "runtime", "eval", "apps"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant)
                        and node.value.value in FEATURE_KEYS):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert {f.split(":")[0] for f in found} == ALLOWED_COPIES, found
