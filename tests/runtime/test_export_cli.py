"""``bac-export`` (apps/export.py) on the shipped dpt-metaworld: the file it writes names its plan, sampler and
features in its metadata, and the server serves it with the eager server's actions (within 1e-5 of the chunk's
largest magnitude: ONNX Runtime reorders float32 operations); a plan that does not fit, a runtime rule and a
malformed method are refused with one line on stderr and exit status 2, writing nothing."""
import numpy as np
import pytest

import bac
from bac.apps.export import main
from bac.graphs import OnnxCall
from bac.runtime.client import PolicyClient
from bac.runtime.loading import load_policy
from bac.runtime.server import PolicyServer

STATE = "observation.state"
RTOL = 1e-5
CONFIGURATION = ["dpt-metaworld", "--sampler", "ddim", "--steps", "4"]
pytestmark = pytest.mark.usefixtures("one_thread")


def served_chunks(settings, observations):
    """A server's chunks for current observations sent one per request on its seed, then after a reset."""
    with PolicyServer.from_config({"checkpoint": "dpt-metaworld", "sampler": {"kind": "ddim", "steps": 4},
                                   "port": 0, "warmup": 1, "seed": 5, **settings}).start() as server, \
            PolicyClient(port=server.port) as client:
        task = client.metadata["tasks"][1]
        chunks = [client.infer({STATE: state, "task": task})["actions"] for state in observations]
        client.reset(3)
        chunks.append(client.infer({STATE: observations[0], "task": task})["actions"])
        return np.stack(chunks), client.metadata


def test_an_exported_call_names_its_configuration_and_serves_the_eager_actions(tmp_path, capsys):
    out = tmp_path / "models" / "dpt-ddim4-uniform.onnx"
    main([*CONFIGURATION, "--method", "uniform", "M=2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"wrote {out} (" in printed and "ddim-4, plan uniform (M=2" in printed
    deviation = float(printed.split("max deviation from the eager call: ")[1].split()[0])
    assert 0 <= deviation < 1e-4
    meta = OnnxCall(out).metadata
    assert meta["sampler"] == {"kind": "ddim", "steps": 4} and meta["batch"] == 1
    assert meta["plan"]["method"] == "uniform" and meta["plan"]["params"]["M"] == 2
    assert meta["plan"]["num_steps"] == 4 and meta["architecture"] == "dpt"
    assert meta["features"]["input"]["observation.state"]["shape"] == [39]

    observations = np.random.default_rng(0).normal(size=(3, 39)).astype(np.float32)
    cached = {"method": "uniform", "method_params": {"M": 2}}
    eager, _ = served_chunks(cached, observations)
    got, served = served_chunks({**cached, "compile": "whole", "backend": "onnxruntime", "onnx": str(out)},
                                observations)
    assert served["acceleration"]["onnx"] == str(out)
    assert np.abs(got - eager).max() <= RTOL * np.abs(eager).max()
    uncached, _ = served_chunks({}, observations[:1])
    assert not np.allclose(uncached[0], eager[0])  # the plan is in the file: it changes the actions


def test_what_does_not_fit_is_one_line_and_exit_status_2(tmp_path, capsys):
    policy = load_policy("dpt-metaworld", sampler="ddim", steps=10).policy
    bac.make_plan(policy.model, "uniform", num_steps=10, M=2, scheduler=policy.sampler).save(tmp_path / "p10.json")
    out = tmp_path / "model.onnx"
    for caching, match in [(["--plan", str(tmp_path / "p10.json")], "made for 10 denoising steps"),
                           (["--method", "fbcache"], "runtime rule"),
                           (["--method", "uniform", "M"], "KEY=VALUE")]:
        with pytest.raises(SystemExit) as exit_:
            main([*CONFIGURATION, *caching, "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and match in err
        assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
