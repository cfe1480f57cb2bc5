"""The server's compiled modes (runtime/loading.py ``compile_policy``; bac-serve ``compile``, ``backend``,
``onnx``): a whole-call server answers as the eager one does (same seeds, within 1e-5 of the chunk's largest
magnitude: inductor reorders float32 operations), its graph is built before it listens, and what cannot be
compiled or served (a runtime rule as a whole call, settings that do not go together, an ONNX file that is
unreadable or made for another configuration) is refused at load with a clear error. Tiny saved policies."""
import numpy as np
import pytest
import torch

import bac
from bac.errors import CheckpointError, ConfigError, PlanMismatchError
from bac.policies.config import PolicyConfig
from bac.policies.dpt import BRANCHES
from bac.policies.policy import DiffusionPolicy
from bac.runtime.client import PolicyClient
from bac.runtime.loading import check_compile, compile_policy, load_policy
from bac.runtime.server import PolicyServer

STATE = "observation.state"
RTOL = 1e-5  # against the eager server, relative to the chunk's largest magnitude
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy(architecture):
    torch.manual_seed(0)
    config = PolicyConfig.build(architecture, {"width": 32, "num_layers": 2, "heads": 2}, state_dim=39, action_dim=4,
                                tasks=["reach", "push"])
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():  # adaLN-Zero starts at the identity: give every branch some signal
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 39))
    return policy


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny DP-T and a tiny DiT, saved."""
    folder = tmp_path_factory.mktemp("policies")
    for architecture in ("dpt", "dit"):
        tiny_policy(architecture).save(folder / architecture)
    return folder


def settings(checkpoint, **more):
    return {"checkpoint": str(checkpoint), "sampler": {"kind": "ddim", "steps": 4}, "method": "uniform",
            "method_params": {"M": 2}, "port": 0, "warmup": 1, "seed": 5, **more}


def served_chunks(server, observations):
    """Chunks for current observations sent one per request, after a reset to seed 3 and on the server's seed."""
    with PolicyClient(port=server.port) as client:
        chunks = [client.infer({STATE: state, "task": "push"})["actions"] for state in observations]
        client.reset(3)
        chunks.append(client.infer({STATE: observations[0], "task": "reach"})["actions"])
    return np.stack(chunks), client.metadata


def test_a_whole_call_server_answers_like_the_eager_one(checkpoints):
    observations = np.random.default_rng(0).normal(size=(3, 39)).astype(np.float32)
    with PolicyServer.from_config(settings(checkpoints / "dpt")).start() as server:
        eager, _ = served_chunks(server, observations)
    compiled = PolicyServer.from_config(settings(checkpoints / "dpt", compile="whole"))
    graph = compiled.policy.graph
    assert graph is not None and graph.batch_sizes == (1,) and graph.graphs  # built at load, before listening
    with compiled.start() as server:
        got, meta = served_chunks(server, observations)
    assert meta["acceleration"]["compile"] == "whole" and meta["acceleration"]["backend"] == "torch"
    assert np.abs(got - eager).max() <= RTOL * np.abs(eager).max()
    assert not np.allclose(got[0], got[1])  # the requests differ: the comparison compares something
    stats = compiled.handle.stats()
    assert stats["sampling_calls"] == 1 + len(got) and stats["skipped"] > 0  # warm-up + requests, cached


def test_compile_settings_are_checked_before_loading():
    check_compile("none", "torch", None)
    check_compile("whole", "onnxruntime", "model.onnx")
    for args, match in [(("all", "torch", None), "compile must be one of"),
                        (("whole", "tensorrt", None), "backend must be one of"),
                        (("none", "onnxruntime", None), "set compile=whole"),
                        (("blocks", "onnxruntime", None), "set compile=whole"),
                        (("whole", "torch", "model.onnx"), "backend=onnxruntime")]:
        with pytest.raises(ConfigError, match=match):
            check_compile(*args)


def test_what_cannot_be_compiled_is_refused_at_load(checkpoints):
    with pytest.raises(ConfigError, match="runtime rule"):
        load_policy(checkpoints / "dpt", sampler="ddim", steps=4, method="fbcache", compile="whole")
    with pytest.raises(ConfigError, match="compile=blocks compiles a DP-T"):
        load_policy(checkpoints / "dit", sampler="ddim", steps=4, compile="blocks")
    served = load_policy(checkpoints / "dpt", sampler="ddim", steps=4, method="fbcache", compile="blocks")
    assert all(layer.branches is not BRANCHES for layer in served.policy.model.decoder.layers)
    assert served.source["compile"] == "blocks"


def test_an_onnx_file_that_is_unreadable_or_made_for_another_configuration_is_refused(checkpoints, tmp_path):
    policy = load_policy(checkpoints / "dpt", sampler="ddim", steps=4, method="uniform",
                         method_params={"M": 2}).policy
    exported = policy.export_onnx(tmp_path / "ddim4-uniform.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    serve = dict(compile="whole", backend="onnxruntime")
    with pytest.raises(CheckpointError, match="not an ONNX model"):
        PolicyServer.from_config(settings(checkpoints / "dpt", **serve, onnx=str(tmp_path / "garbage.onnx")))
    with pytest.raises(CheckpointError, match="cannot read"):
        PolicyServer.from_config(settings(checkpoints / "dpt", **serve, onnx=str(tmp_path / "missing.onnx")))
    with pytest.raises(PlanMismatchError, match="another configuration.*sampler"):
        load_policy(checkpoints / "dpt", sampler="ddim", steps=3, **serve, onnx=exported)
    with pytest.raises(PlanMismatchError, match="another configuration.*plan"):
        load_policy(checkpoints / "dpt", sampler="ddim", steps=4, **serve, onnx=exported)
    with pytest.raises(ConfigError, match="one batch size"):
        compile_policy(policy, "whole", "onnxruntime", exported, batch_sizes=(1, 2))
    served = load_policy(checkpoints / "dpt", sampler="ddim", steps=4, method="uniform", method_params={"M": 2},
                         **serve, onnx=exported)
    obs = {STATE: torch.randn(1, 2, 39), "task": "push"}
    want = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    got = served.policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))
    assert (got - want).abs().max() <= RTOL * want.abs().max()
    assert served.source == {"method_source": "by name", "compile": "whole", "backend": "onnxruntime",
                             "onnx": str(exported)}
    assert bac.get_handle(served.policy.model) is served.handle


def test_bac_serve_checks_the_compile_settings():
    """Through Hydra (``++``: whether or not configs/serve.yaml lists the setting)."""
    from hydra import compose, initialize_config_dir

    from bac.apps.serve import serve
    from bac.configs import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for overrides, error in ((["++compile=all"], "setting compile must be one of none, blocks, whole"),
                                 (["++compile=whole", "++backend=onnx"], "setting backend must be one of"),
                                 (["++backend=onnxruntime"], "set compile=whole"),
                                 (["++compile=1"], "setting compile must be a string")):
            with pytest.raises(ConfigError, match=error):
                serve(compose("serve", overrides=overrides))


def test_torch_compile_without_a_cpp_compiler_is_refused_at_load(monkeypatch):
    """inductor builds CPU kernels with a C++ compiler: without one, compile=whole|blocks (backend=torch) is a
    clear ConfigError at load, not a compiler traceback on the first request; ONNX Runtime needs none."""
    from bac import graphs

    monkeypatch.setattr(graphs, "inductor_compiler", lambda: None)
    policy = tiny_policy("dpt").with_sampler("ddim", 3)
    for mode in ("whole", "blocks"):
        with pytest.raises(bac.ConfigError, match="C\\+\\+ compiler"):
            compile_policy(policy, mode, "torch")
    assert compile_policy(policy, "whole", "onnxruntime").graph.backend == "onnxruntime"
