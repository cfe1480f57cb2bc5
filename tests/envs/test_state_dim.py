"""``state_dim`` is the one name of the state width: ``obs_dim`` still works for one release, with a warning
naming ``state_dim``; the envs' copy of the state feature key is the policies' key."""
import warnings

import numpy as np
import pytest
import torch

import bac
from bac.envs import calibration_inputs
from bac.envs.dataset import WindowDataset, calibration_observations, load_episodes
from bac.policies import constants

from .test_data_faults import good, write


def test_envs_state_key_is_the_policies_feature_key():
    assert calibration_inputs.STATE == constants.STATE


def test_state_dim_is_checked_and_reported(tmp_path):
    path = write(tmp_path / "ok.hdf5", good())
    ds = WindowDataset(path, horizon=4, n_obs_steps=2, state_dim=3)
    assert ds.state_dim == 3
    with pytest.raises(bac.DataError, match="are 3 wide, the policy expects 5"):
        load_episodes(path, state_dim=5)


@pytest.mark.parametrize("read", [
    lambda path, **kw: WindowDataset(path, horizon=4, n_obs_steps=2, **kw),
    lambda path, **kw: load_episodes(path, **kw),
    lambda path, **kw: calibration_observations(path, 4, **kw),
], ids=["WindowDataset", "load_episodes", "calibration_observations"])
def test_obs_dim_keyword_is_a_deprecated_alias_of_state_dim(tmp_path, read):
    path = write(tmp_path / "ok.hdf5", good())
    with pytest.warns(DeprecationWarning, match=r"obs_dim=\.\.\.\) is deprecated: use state_dim"):
        read(path, obs_dim=3)  # the right width: loads
    with pytest.warns(DeprecationWarning), pytest.raises(bac.DataError, match="the policy expects 39"):
        read(path, obs_dim=39)  # still checked under the old name
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="give state_dim only"):
        read(path, obs_dim=3, state_dim=3)


def test_obs_dim_attribute_warns_and_equals_state_dim(tmp_path):
    ds = WindowDataset(write(tmp_path / "ok.hdf5", good()), horizon=4, n_obs_steps=2)
    with pytest.warns(DeprecationWarning, match="WindowDataset.obs_dim is deprecated: use state_dim"):
        assert ds.obs_dim == ds.state_dim == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.state_dim == 3  # the new name does not warn


def test_shipped_calibration_inputs_take_state_dim(tmp_path):
    facts = {"format": calibration_inputs.CALIBRATION_INPUTS_FORMAT, "tasks": '["reach"]', "samples": "4",
             "n_obs_steps": "2"}
    states = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
    calibration_inputs.save_calibration_inputs(tmp_path / calibration_inputs.CALIBRATION_INPUTS, states, facts)
    np.testing.assert_array_equal(calibration_inputs.shipped_calibration_inputs(tmp_path, facts, state_dim=3), states)
    assert calibration_inputs.shipped_calibration_inputs(tmp_path, facts, 4) is None  # another width: not used
    with pytest.warns(DeprecationWarning, match="use state_dim"):
        shipped = calibration_inputs.shipped_calibration_inputs(tmp_path, facts, obs_dim=3)
    np.testing.assert_array_equal(shipped, states)


def test_load_windows_takes_state_dim(tmp_path, monkeypatch):
    from bac.envs import windows

    path = write(tmp_path / "ok.hdf5", good(), mask=["demo_0", "demo_1", "demo_2"])
    monkeypatch.setattr(windows, "collect", lambda *args, **kwargs: path)  # no simulator: the file is the task's
    data = windows.load_windows(["reach"], 3, tmp_path, horizon=4, n_obs_steps=2, state_dim=3)
    assert data.state.shape == (30, 2, 3)
    with pytest.raises(bac.DataError, match="the policy expects 5"):
        windows.load_windows(["reach"], 3, tmp_path, horizon=4, n_obs_steps=2, state_dim=5)
    with pytest.warns(DeprecationWarning, match=r"load_windows\(obs_dim=\.\.\.\) is deprecated: use state_dim"):
        old = windows.load_windows(["reach"], 3, tmp_path, horizon=4, n_obs_steps=2, obs_dim=3)
    assert torch.equal(old.state, data.state)
