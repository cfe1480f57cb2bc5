"""Malformed demonstration files: refused once at load, each with a DataError naming the file and the demo."""
import h5py
import numpy as np
import pytest

import bac
from bac.envs.dataset import DataFileNotFoundError, DataKeyError, WindowDataset, calibration_observations, load_episodes


def write(path, demos, mask=None):
    """A robomimic-layout file: ``demos`` maps a demo name to ``{"obs/state": array, "actions": array, ...}``
    (``None`` leaves a key out); every demo gets ``num_samples`` = its number of actions unless given."""
    with h5py.File(path, "w") as f:
        for name, content in demos.items():
            g = f.create_group(f"data/{name}")
            for key, value in content.items():
                if key == "num_samples":
                    g.attrs["num_samples"] = value
                elif value is not None:
                    g.create_dataset(key, data=value)
            if "num_samples" not in content and content.get("actions") is not None:
                g.attrs["num_samples"] = len(content["actions"])
        if mask is not None:
            f["mask/train"] = np.array(mask, dtype="S")
    return path


def demo(rows=10, obs_rows=None, obs_width=3, action_width=2):
    rng = np.random.default_rng(rows)
    return {"obs/state": rng.normal(size=(rows if obs_rows is None else obs_rows, obs_width)),
            "actions": rng.uniform(-1, 1, size=(rows, action_width))}


def good(**changed):
    """Three good demos; ``changed`` replaces demo_1's content (the faulty one)."""
    demos = {"demo_0": demo(10), "demo_1": demo(12), "demo_2": demo(8)}
    demos["demo_1"] = {**demos["demo_1"], **changed}
    return demos


def refused(kind, path, *names, **kwargs):
    with pytest.raises(kind) as err:
        WindowDataset(path, horizon=4, n_obs_steps=2, **kwargs)
    assert type(err.value) is kind, f"{type(err.value).__name__}: {err.value}"
    for name in (str(path), *names):
        assert name in str(err.value), f"{name!r} not in: {err.value}"
    return err.value


def test_a_good_file_loads(tmp_path):
    ds = WindowDataset(write(tmp_path / "ok.hdf5", good()), horizon=4, n_obs_steps=2, state_dim=3, action_dim=2)
    assert ds.demos == ["demo_0", "demo_1", "demo_2"] and len(ds) == 30
    assert ds.state_dim == 3 and ds.action_dim == 2


def test_missing_keys(tmp_path):
    refused(DataKeyError, write(tmp_path / "a.hdf5", good(actions=None)), "data/demo_1", "'actions'")
    refused(DataKeyError, write(tmp_path / "b.hdf5", good(**{"obs/state": None, "obs/other": np.zeros((12, 3))})),
            "data/demo_1", "obs key 'state'", "other")
    no_obs = good()
    del no_obs["demo_1"]["obs/state"]
    refused(DataKeyError, write(tmp_path / "c.hdf5", no_obs), "data/demo_1", "no 'obs' group")
    err = refused(DataKeyError, write(tmp_path / "d.hdf5", good()), "no filter key 'train'", filter_key="train")
    assert isinstance(err, KeyError) and isinstance(err, bac.DataError)  # older callers catch KeyError
    refused(DataKeyError, write(tmp_path / "e.hdf5", good(), mask=["demo_0", "demo_7"]), "demo_7", filter_key="train")
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        f["other"] = np.zeros(3)
    refused(DataKeyError, tmp_path / "f.hdf5", "no 'data' group")


def test_short_actions(tmp_path):
    path = write(tmp_path / "short.hdf5", good(**demo(40, obs_rows=41)))
    refused(bac.DataError, path, "data/demo_1: actions has 40 rows, obs/state 41")
    path = write(tmp_path / "attr.hdf5", good(num_samples=11))
    refused(bac.DataError, path, "data/demo_1: num_samples attribute says 11, actions has 12 rows")
    path = write(tmp_path / "empty.hdf5", good(**demo(0)))
    refused(bac.DataError, path, "data/demo_1: actions has 0 rows")


def test_wide_actions_and_observations(tmp_path):
    path = write(tmp_path / "wide.hdf5", good(**demo(12, action_width=3)))
    refused(bac.DataError, path, "data/demo_1: actions is 3 wide, demo_0's is 2")
    path = write(tmp_path / "obs.hdf5", good(**demo(12, obs_width=4)))
    refused(bac.DataError, path, "data/demo_1: obs/state is 4 wide, demo_0's is 3")
    path = write(tmp_path / "ok.hdf5", good())  # consistent, but not what the policy reads
    refused(bac.DataError, path, "data/demo_0: actions are 2 wide, the policy expects 4", action_dim=4)
    refused(bac.DataError, path, "data/demo_0: observations (obs/state) are 3 wide, the policy expects 39", state_dim=39)
    with pytest.raises(bac.DataError, match="the policy expects 39") as err:
        calibration_observations(path, 4, state_dim=39)
    assert str(path) in str(err.value)
    path = write(tmp_path / "image.hdf5", good(**{"obs/state": np.zeros((12, 3, 8, 8))}))
    refused(bac.DataError, path, "data/demo_1/obs: state has shape [12, 3, 8, 8]")


@pytest.mark.parametrize("key", ["actions", "obs/state"])
@pytest.mark.parametrize("value", [np.nan, np.inf, 1e39])  # 1e39: finite in float64, inf in float32
def test_nan_and_inf_are_refused(tmp_path, key, value):
    content = demo(12)
    content[key][5, 1] = value
    path = write(tmp_path / "nan.hdf5", good(**content))
    field = key.split("/")[-1]
    refused(bac.DataError, path, "data/demo_1", f"{field} has 1 NaN/inf value(s), the first at row 5, column 1")


def test_not_a_dataset(tmp_path):
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5 at all")
    refused(bac.DataError, tmp_path / "junk.hdf5", "not a readable HDF5 file")
    err = refused(DataFileNotFoundError, tmp_path / "absent.hdf5", "does not exist")
    assert isinstance(err, FileNotFoundError)
    path = write(tmp_path / "names.hdf5", {"episode_a": demo(5)})
    refused(bac.DataError, path, "episode_a", "not robomimic demo names")
    path = write(tmp_path / "text.hdf5", good(actions=np.array([b"a", b"b"])))
    with pytest.raises(bac.DataError, match="data/demo_1: actions is not numeric"):
        load_episodes(path)
