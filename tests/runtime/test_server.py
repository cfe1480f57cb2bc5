"""The policy server and its client: openpi's wire format, actions bit-identical to the local policy (also
to a client in another process driving closed-loop episodes), clear errors that leave the server serving,
per-client isolation under concurrency, disconnects, health and graceful shutdown. Real loopback sockets,
ephemeral ports."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import bac
from bac.errors import ConfigError, DataError
from bac.policies.config import PolicyConfig
from bac.policies.language import TOKEN_DIM, LanguageCache
from bac.policies.policy import DiffusionPolicy
from bac.policies.tuned import TunedConfig
from bac.policies.vla import frames_to_images
from bac.runtime import run_wave
from bac.runtime.client import ObservationError, PolicyClient, RemotePolicy, ServerError
from bac.runtime.msgpack_numpy import packb, unpackb
from bac.runtime.loading import choose_sampler, load_policy, metadata
from bac.runtime.protocol import parse_observation
from bac.runtime.server import PolicyServer, load_served_policy
from bac.runtime.sessions import new_session

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "policies" / "checkpoints" / "dpt-metaworld"
STATE = "observation.state"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy(steps=3):
    """As tests/runtime/test_runtime.py's: a 2-layer DP-T with random weights, DDIM-3."""
    torch.manual_seed(0)
    config = PolicyConfig.build("dpt", {"width": 32, "num_layers": 2, "heads": 2}, state_dim=39, action_dim=4,
                                tasks=["reach", "push"])
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 39))
    return policy.eval().with_sampler("ddim", steps)


def accelerated(policy):
    policy.accelerate(bac.build_method("uniform", policy.model, num_steps=policy.sampler.steps,
                                       scheduler=policy.sampler, interval=2))
    return policy


def states(seed, count=4):
    return np.random.default_rng(seed).normal(size=(count, 39)).astype(np.float32)


def local_chunks(policy, observations, task, seed):
    """What a server session gives for current observations ``[D]`` sent one per request after reset(seed)."""
    generator = torch.Generator().manual_seed(seed)
    history, chunks = None, []
    for state in observations:
        history = np.repeat(state[None], 2, 0) if history is None else np.concatenate([history[1:], state[None]])
        batch = {STATE: torch.from_numpy(history)[None], "task": task}
        chunks.append(policy.predict_action_chunk(batch, generator=generator)[0].numpy())
    return chunks


@contextlib.contextmanager
def serving(policy, **settings):
    server = PolicyServer(policy, port=0, **{"warmup": 1, **settings}).start()
    try:
        yield server
    finally:
        server.stop()


def contexts(server):
    """The cache contexts alive on the inference thread (where every session's context lives)."""
    return server.call_in_inference_thread(lambda: server.handle.context_names())


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Gate:
    """Wraps ``policy.predict_action_chunk``: each call announces itself, then waits to be released."""

    def __init__(self, policy):
        self.original, self.started, self.release, self.calls = policy.predict_action_chunk, threading.Event(), \
            threading.Event(), 0
        policy.predict_action_chunk = self

    def __call__(self, batch, generator=None, **kwargs):
        self.calls += 1
        self.started.set()
        assert self.release.wait(20)
        return self.original(batch, generator=generator, **kwargs)


# ------------------------------------------------------------------------------ wire format and engine
def test_codec_writes_openpi_msgpack_numpy_maps():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]  # not contiguous: sent in C order
    raw = msgpack.unpackb(packb({"a": array, "s": np.float32(1.5), "n": np.int64(3), "f": np.float64(2.5)}))
    assert raw["a"] == {b"__ndarray__": True, b"data": np.ascontiguousarray(array).tobytes(), b"dtype": "<f4",
                        b"shape": [2, 2]}
    assert raw["s"] == {b"__npgeneric__": True, b"data": 1.5, b"dtype": "<f4"}
    assert raw["n"] == {b"__npgeneric__": True, b"data": 3, b"dtype": "<i8"}
    assert raw["f"] == 2.5  # a float64 scalar is a Python float: msgpack packs it natively (as openpi's does)
    decoded = unpackb(packb({"a": array, "u": np.zeros((2, 2, 3), np.uint8), "s": np.float32(2.5), "t": "x"}))
    assert np.array_equal(decoded["a"], array) and decoded["a"].dtype == np.float32
    assert decoded["u"].dtype == np.uint8 and decoded["u"].shape == (2, 2, 3)
    assert decoded["s"] == np.float32(2.5) and type(decoded["s"]) is np.float32 and decoded["t"] == "x"
    with pytest.raises(ValueError, match="object"):
        packb(np.array([object()]))
    with pytest.raises(TypeError, match="cannot encode set"):
        packb({1, 2})
    short = msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "<f4", b"shape": [2]})
    with pytest.raises(ValueError, match="needs 8 bytes"):
        unpackb(short)


def test_drop_context_forgets_a_context_and_keeps_its_counts():
    policy = accelerated(tiny_policy())
    handle = bac.get_handle(policy.model)
    batch = {STATE: torch.from_numpy(states(0, 2))[None], "task": "reach"}
    with handle.context("client-1"):
        policy.predict_action_chunk(batch, generator=torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match="active"):
            handle.drop_context("client-1")
    before = handle.stats()
    assert handle.drop_context("client-1") is True
    assert "client-1" not in handle.context_names()
    after = handle.stats()
    assert (after["computed"], after["skipped"], after["per_block"]) == (before["computed"], before["skipped"],
                                                                         before["per_block"])
    assert handle.drop_context("client-1") is False
    with pytest.raises(ValueError, match="default"):
        handle.drop_context("default")


# ------------------------------------------------------------------------------ requests
def test_round_trip_gives_the_local_policys_actions():
    policy = tiny_policy()
    with serving(policy, seed=7) as server, PolicyClient(port=server.port) as client:
        meta = client.metadata
        assert (meta["protocol"], meta["protocol_version"], meta["horizon"], meta["n_obs_steps"],
                meta["n_action_steps"]) == ("bac-policy-server", 1, 16, 2, 8)
        assert meta["features"][STATE] == {"type": "state", "shape": [39]} and meta["action"] == {"shape": [4]}
        assert meta["sampler"] == {"kind": "ddim", "steps": 3} and meta["acceleration"] is None
        assert meta["tasks"] == ["reach", "push"] and meta["policy"]["architecture"] == "dpt"
        # a new connection is seeded with the server's seed; current observations build the history
        obs = states(1)
        replies = [client.infer({STATE: s, "task": "push"}) for s in obs]
        for reply, expected in zip(replies, local_chunks(policy, obs, "push", seed=7)):
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (8, 4)
            assert np.array_equal(reply["actions"], expected)
            assert reply["server_timing"]["infer_ms"] > 0
        # reset: new episode, history cleared, generator reseeded; a full history is taken as it is
        assert client.reset(3) == {"reset": True, "seed": 3}
        history = states(2, 2)
        expected = policy.predict_action_chunk({STATE: torch.from_numpy(history)[None], "task": "reach"},
                                               generator=torch.Generator().manual_seed(3))[0].numpy()
        assert np.array_equal(client.infer({STATE: history, "task": "reach"})["actions"], expected)
        assert client.reset(3) and np.array_equal(client.infer({STATE: history.astype(np.float64),
                                                                "task": "reach"})["actions"], expected)
        # torch tensors and lists are sent as arrays; num_actions is passed through to predict_action_chunk
        assert client.reset(3) and np.array_equal(client.infer({STATE: torch.from_numpy(history), "task": "reach",
                                                                "num_actions": 5})["actions"], expected[:5])
        remote = RemotePolicy(client, seed=3)  # a local policy's interface: batches, tensors
        remote.reset()
        chunk = remote.predict_action_chunk({STATE: torch.from_numpy(history)[None], "task": ["reach"]})
        assert chunk.shape == (1, 8, 4) and np.array_equal(chunk[0].numpy(), expected)
        with pytest.raises(ConfigError, match="draws its noise on the server"):
            remote.predict_action_chunk({STATE: torch.from_numpy(history)[None]}, generator=torch.Generator())
        assert client.reset() == {"reset": True, "seed": 7}
        assert np.array_equal(client.infer({STATE: obs[0].tolist(), "task": "push"})["actions"],
                              local_chunks(policy, obs[:1], "push", seed=7)[0])


def test_a_session_keeps_its_history_only_when_its_call_succeeds():
    policy = tiny_policy()
    obs = states(4, 2)
    requests = [parse_observation(policy, {STATE: state, "task": "reach"}) for state in obs]
    session = new_session("client-1", "", seed=5, device="cpu")
    original = policy.predict_action_chunk

    def failing(batch, generator=None, **kwargs):
        raise RuntimeError("the policy call failed")

    policy.predict_action_chunk = failing
    with pytest.raises(RuntimeError, match="failed"):
        session.predict(policy, requests[0])
    assert session.history is None
    policy.predict_action_chunk = original
    first = session.predict(policy, requests[0])
    assert torch.equal(session.history[0], torch.from_numpy(np.repeat(obs[:1], 2, 0)))  # first one repeated
    session.predict(policy, requests[1])
    assert torch.equal(session.history[0], torch.from_numpy(obs))  # the last n_obs_steps
    session.reset(5)
    assert session.history is None and np.array_equal(session.predict(policy, requests[0]), first)
    assert np.array_equal(first, local_chunks(policy, obs[:1], "reach", seed=5)[0])


def test_warm_up_runs_before_listening_in_a_context_of_its_own():
    policy = accelerated(tiny_policy())
    gate = Gate(policy)
    gate.release.set()
    with serving(policy, warmup=2) as server:
        assert gate.calls == 2 and server.requests_served == 0
        assert contexts(server) == ["default"]  # the warm-up's context is gone
    with pytest.raises(ConfigError, match=r"warm-up example does not fit.*got \[5\]"):
        PolicyServer(tiny_policy(), port=0, example={STATE: np.zeros(5), "task": "reach"}).start()


def test_num_actions_is_refused_clearly_when_the_policy_does_not_take_it():
    policy = tiny_policy()
    original = policy.predict_action_chunk
    policy.predict_action_chunk = lambda batch, generator=None: original(batch, generator=generator)
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        assert client.metadata["accepts_num_actions"] is False
        with pytest.raises(ObservationError, match="takes no num_actions; leave the key out"):
            client.infer({STATE: states(0)[0], "task": "reach", "num_actions": 4})
        assert client.infer({STATE: states(0)[0], "task": "reach"})["actions"].shape == (8, 4)


BAD_REQUESTS = [  # (what is sent, a piece of the error it must get)
    ({"task": "reach"}, r"missing key\(s\) \['observation.state'\].*float \[39\] or \[2, 39\]"),
    ({STATE: np.zeros(39, np.float32)}, r"missing key\(s\) \['task'\]"),
    ({STATE: np.zeros(38, np.float32), "task": "reach"}, r"'observation.state' must have shape \[39\].* or "
                                                         r"\[2, 39\].*got \[38\]"),
    ({STATE: np.zeros((3, 39), np.float32), "task": "reach"}, r"got \[3, 39\]"),
    ({STATE: np.zeros(39, bool), "task": "reach"}, r"'observation.state' has dtype bool"),
    ({STATE: np.array(["1"] * 39), "task": "reach"}, r"'observation.state' has dtype <U1"),
    ({STATE: np.full(39, np.nan, np.float32), "task": "reach"}, r"'observation.state' contains NaN or inf \(at \[0"),
    ({STATE: np.r_[np.zeros(38), np.inf], "task": "reach"}, r"contains NaN or inf \(at \[38\]"),
    ({STATE: np.zeros(39, np.float32), "task": "door-open"}, r"unknown task 'door-open'.*\['reach', 'push'\]"),
    ({STATE: np.zeros(39, np.float32), "task": 3}, r"'task' must be a string"),
    ({STATE: np.zeros(39, np.float32), "task": "reach", "prompt": "x"}, r"unknown key\(s\) \['prompt'\]"),
    ({STATE: np.zeros(39, np.float32), "task": "reach", "num_actions": 17}, r"'num_actions' must be an integer in "
                                                                            r"\[1, horizon=16\]"),
    ({"reset": True, "seed": -1}, r"'seed' must be an integer"),
    ({"reset": 1}, r"a reset message is"),
    ([1, 2, 3], r"a request is a msgpack map \(dict\).*got list"),
    ("not msgpack", r"got a text frame: send binary frames of msgpack"),
    (b"\xc1", r"could not decode the message as msgpack"),
    (msgpack.packb({STATE: {b"__ndarray__": True, b"data": b"\0", b"dtype": "<f4", b"shape": [39]}, "task": "reach"}),
     r"could not decode.*needs 156 bytes"),
]


def test_bad_requests_get_clear_errors_and_the_same_client_goes_on():
    policy = tiny_policy()
    obs = states(5)
    expected = local_chunks(policy, obs, "reach", seed=0)
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        assert client.reset(0)
        for i, (request, error) in enumerate(BAD_REQUESTS):
            frame = request if isinstance(request, (bytes, str)) else packb(request)
            with pytest.raises(ObservationError, match=error) as caught:
                client.send_raw(frame)
            assert caught.value.kind == "DataError" and isinstance(caught.value, DataError)
            if i < len(obs):  # a refused request changes nothing: the history and generator go on as if unsent
                assert np.array_equal(client.infer({STATE: obs[i], "task": "reach"})["actions"], expected[i])
        assert server.health()["errors"] == len(BAD_REQUESTS)
        assert server.health()["requests_served"] == len(obs)


def tiny_image_policy():
    """A GR00T-style head reading one 16-px camera and instructions (token cache: no language model)."""
    torch.manual_seed(0)
    config = PolicyConfig.build("gr00t", {"width": 32, "num_layers": 2, "heads": 2, "image_size": 16, "crop_pad": 2},
                                state_dim=4, action_dim=4, tasks=["faucet-open"],
                                noise_scheduler={"kind": "flow_matching"},
                                state_keys=["hand_pos", "gripper"], horizon=8, n_obs_steps=1, n_action_steps=4)
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 4))
    policy.language = LanguageCache({"open the faucet": torch.randn(3, TOKEN_DIM)})
    return policy.eval()


def test_images_as_uint8_frames_or_float_chw():
    policy = tiny_image_policy()
    camera = "observation.images." + policy.cameras[0]
    frame = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    state = np.array([0.1, 0.2, 0.3, 0.5], np.float32)
    batch = {STATE: torch.from_numpy(state)[None, None], camera: frames_to_images(frame)[None],
             "task": "open the faucet"}
    expected = policy.predict_action_chunk(batch, generator=torch.Generator().manual_seed(0))[0].numpy()
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        assert client.metadata["features"][camera] == {"type": "image", "shape": [3, 16, 16]}
        assert client.metadata["reads_instructions"] is True and client.metadata["tasks"] == []
        for image in (frame, frames_to_images(frame).numpy()):
            client.reset(0)
            actions = client.infer({STATE: state, camera: image, "task": "open the faucet"})["actions"]
            assert np.array_equal(actions, expected)
        with pytest.raises(ObservationError, match=rf"'{camera}' must be uint8 \[16, 16, 3\] \(HWC.*or float \[3, 16, "
                                                   r"16\].*got uint8 \[3, 16, 16\]"):
            client.infer({STATE: state, camera: np.zeros((3, 16, 16), np.uint8), "task": "open the faucet"})
        with pytest.raises(ObservationError, match=r"values in \[2, 2\]; float images are in \[0, 1\]"):
            client.infer({STATE: state, camera: np.full((3, 16, 16), 2.0, np.float32), "task": "open the faucet"})
        with pytest.raises(ObservationError, match=r"missing key\(s\) \['observation.images.corner3'\]"):
            client.infer({STATE: state, "task": "open the faucet"})


# ------------------------------------------------------------------------------ sessions
def test_concurrent_clients_get_exactly_what_each_gets_alone():
    policy = accelerated(tiny_policy())
    plan = {name: (seed, states(seed), task) for name, seed, task in
            (("a", 11, "reach"), ("b", 12, "push"), ("c", 13, "reach"))}
    threads_used, contexts_used = set(), set()
    original = policy.predict_action_chunk

    def recording(batch, generator=None, **kwargs):
        threads_used.add(threading.get_ident())
        contexts_used.add(bac.get_handle(policy.model).active_context)
        return original(batch, generator=generator, **kwargs)

    policy.predict_action_chunk = recording

    def run(port, name, barrier=None):
        seed, observations, task = plan[name]
        with PolicyClient(port=port) as client:
            client.reset(seed)
            chunks = []
            for state in observations:
                if barrier is not None:
                    barrier.wait(10)  # every round, the three requests arrive together
                chunks.append(client.infer({STATE: state, "task": task})["actions"])
            return chunks

    with serving(policy) as server:
        alone = {name: run(server.port, name) for name in plan}
        together, barrier = {}, threading.Barrier(len(plan))
        workers = [threading.Thread(target=lambda n=name: together.__setitem__(n, run(server.port, n, barrier)))
                   for name in plan]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        wait_until(lambda: not server.sessions)
        assert contexts(server) == ["default"]
    for name in plan:
        assert len(together[name]) == len(alone[name]) == 4
        assert all(np.array_equal(x, y) for x, y in zip(together[name], alone[name])), name
    assert not np.array_equal(alone["a"][0], alone["c"][0])  # same task, other seed and observations
    assert len(threads_used) == 1 and threading.get_ident() not in threads_used  # one inference thread
    assert len(contexts_used - {"default", "warmup"}) == 6  # one cache context per session, 2 x 3 sessions


def test_a_client_leaving_mid_request_leaves_nothing_behind():
    policy = accelerated(tiny_policy())
    obs = states(3)
    with serving(policy) as server:
        gate = Gate(policy)
        running, queued = PolicyClient(port=server.port), PolicyClient(port=server.port)
        running._ws.send(packb({STATE: obs[0], "task": "reach"}))
        assert gate.started.wait(10)
        queued._ws.send(packb({STATE: obs[0], "task": "reach"}))  # waits behind the running one
        time.sleep(0.1)
        running.close()
        queued.close()
        wait_until(lambda: server.health()["clients"] == 0 and not server.sessions)  # already, mid-call
        gate.release.set()
        assert contexts(server) == ["default"]  # the running call's context was dropped after it finished
        assert gate.calls == 1  # the departed client's queued request was never run
        with PolicyClient(port=server.port) as client:
            client.reset(0)
            reply = client.infer({STATE: obs[1], "task": "reach"})["actions"]
        policy.predict_action_chunk = gate.original
        assert np.array_equal(reply, local_chunks(policy, obs[1:2], "reach", seed=0)[0])
        wait_until(lambda: not server.sessions)
        assert contexts(server) == ["default"]


def test_health_endpoint():
    with serving(tiny_policy()) as server:
        url = f"http://127.0.0.1:{server.port}/healthz"
        with PolicyClient(port=server.port) as client:
            client.infer({STATE: states(0)[0], "task": "reach"})
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200 and response.headers["Content-Type"] == "application/json"
                health = json.loads(response.read())
        assert health["status"] == "ok" and health["clients"] == 1 and health["requests_served"] == 1
        assert health["errors"] == 0 and health["architecture"] == "dpt"


def test_stop_finishes_the_request_in_flight_then_closes():
    policy = tiny_policy()
    server = PolicyServer(policy, port=0, warmup=0).start()
    gate = Gate(policy)
    client = PolicyClient(port=server.port)
    client._ws.send(packb({STATE: states(0)[0], "task": "reach"}))
    assert gate.started.wait(10)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: server.health()["status"] == "stopping")
    with pytest.raises(ServerError, match="cannot connect"):  # no longer accepting
        PolicyClient(port=server.port, open_timeout=2)
    gate.release.set()
    reply = client._receive()  # the request in flight is answered ...
    assert reply["actions"].shape == (8, 4)
    with pytest.raises(ServerError, match="closed the connection"):  # ... then the connection is closed
        client.infer({STATE: states(0)[0], "task": "reach"})
    stopper.join(10)
    assert not stopper.is_alive() and server.health()["status"] == "stopped"
    server.stop()  # idempotent


# ------------------------------------------------------------------------------ loading and the entry point
def test_load_served_policy_accelerates_one_way(tmp_path):
    tiny_policy().save(tmp_path / "policy")
    policy = DiffusionPolicy.load(tmp_path / "policy").with_sampler("ddim", 3)
    plan = bac.make_plan(policy.model, "uniform", num_steps=3, scheduler=policy.sampler, interval=2)
    plan.save(tmp_path / "plan.json")
    TunedConfig(sampler="ddim", steps=3, method="uniform", params={"interval": 2}, plan="plan.json").save(
        tmp_path / "tuned.json")
    for how in ({"plan": tmp_path / "plan.json", "sampler": "ddim", "steps": 3}, {"tuned": tmp_path / "tuned.json"},
                {"method": "uniform", "method_params": {"interval": 2}, "sampler": "ddim", "steps": 3}):
        served, source = load_served_policy(tmp_path / "policy", **how)
        meta = PolicyServer(served, port=0, source=source).metadata
        assert meta["sampler"] == {"kind": "ddim", "steps": 3}
        assert meta["acceleration"]["method"] == "uniform" and meta["acceleration"]["skipped"] == 6
    with pytest.raises(ConfigError, match="one of tuned, plan, method"):
        load_served_policy(tmp_path / "policy", plan=tmp_path / "plan.json", method="uniform")
    with pytest.raises(ConfigError, match="make its plan file first"):
        load_served_policy(tmp_path / "policy", method="bac", sampler="ddim", steps=3)
    with pytest.raises(ConfigError, match="leave sampler.kind and sampler.steps null"):
        load_served_policy(tmp_path / "policy", tuned=tmp_path / "tuned.json", steps=3)
    with pytest.raises(ConfigError, match="takes parameters"):
        load_served_policy(tmp_path / "policy", method="uniform", method_params={"intervall": 2}, steps=3)


def test_load_policy_keeps_the_handle_that_accelerating_returned(tmp_path):
    tiny_policy().save(tmp_path / "policy")
    plain = load_policy(tmp_path / "policy", sampler="ddim", steps=3)
    assert plain.handle is None and plain.source == {} and PolicyServer(plain.policy, port=0).handle is None
    served = load_policy(tmp_path / "policy", method="uniform", method_params={"interval": 2}, sampler="ddim", steps=3)
    assert served.handle is not None and served.handle is bac.get_handle(served.policy.model)
    server = PolicyServer(served.policy, port=0, source=served.source, handle=served.handle)
    assert server.handle is served.handle and PolicyServer(served.policy, port=0).handle is served.handle
    assert server.metadata["acceleration"]["skipped"] == 6
    assert server.metadata["acceleration"]["method_source"] == "by name"


def test_choose_sampler_changes_only_what_it_is_given():
    base = tiny_policy()
    policy, choice = choose_sampler(base)
    assert policy is base and (choice.kind, choice.steps) == ("ddim", 3)
    policy, choice = choose_sampler(policy, steps=5)
    assert (base.sampler.kind, base.sampler.steps) == ("ddim", 3)  # a view: the loaded policy is unchanged
    assert (choice.kind, choice.steps) == ("ddim", 5)
    policy, choice = choose_sampler(policy, "ddpm", 7)
    assert (choice.kind, choice.steps) == ("ddpm", 7)
    assert metadata(policy)["sampler"] == {"kind": "ddpm", "steps": 7}  # the policy returned samples with it


SERVER_MODULES = ("server", "loading", "protocol", "sessions", "lifecycle")


def test_the_server_reads_no_private_state_but_its_own():
    """Every ``x._name`` in the server's modules is on ``self``: the policy and the engine only through
    their public API (``bac.get_handle``, ``handle.context``, ...)."""
    import ast

    for module in SERVER_MODULES:
        path = ROOT / "runtime" / f"{module}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert isinstance(node.value, ast.Name) and node.value.id == "self", \
                    f"{path.name}:{node.lineno} reads .{node.attr} of {ast.unparse(node.value)}"


def test_settings_are_checked_before_loading():
    from hydra import compose, initialize_config_dir

    from bac.configs import CONFIG_DIR
    from bac.apps.serve import serve

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for overrides, error in ((["port=x"], "setting port must be an integer, got 'x'"),
                                 (["+prot=1"], "unknown setting 'prot'.*did you mean 'port'"),
                                 (["method_params=3"], "method_params must be a mapping"),
                                 (["port=70000"], "port must be <= 65535")):
            with pytest.raises(ConfigError, match=error):
                serve(compose("serve", overrides=overrides))


def test_entry_point_serves_until_sigterm():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "bac.apps.serve", "checkpoint=dpt-metaworld", "port=0",
                                "sampler.kind=ddim", "sampler.steps=4", "method=uniform", "method_params={interval:2}",
                                "warmup=1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "serving" in line:
                break
        match = re.search(r"on ws://127\.0\.0\.1:(\d+)", "".join(lines))
        assert match, "".join(lines)
        with PolicyClient(port=int(match.group(1))) as client:
            assert client.metadata["acceleration"]["method"] == "uniform"
            assert client.metadata["policy"]["checkpoint"] == "dpt-metaworld"
            assert client.infer({STATE: np.zeros(39, np.float32), "task": "reach"})["actions"].shape == (8, 4)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


CLIENT = """
import sys
import numpy as np
from bac.envs.metaworld_env import make_vector_env
from bac.runtime import run_wave
from bac.runtime.client import PolicyClient, RemotePolicy

port, task, cap, out = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
seeds = [int(s) for s in sys.argv[5:]]
with PolicyClient(port=port) as client:
    policy = RemotePolicy(client)
    select, actions, results = policy.select_action, [], []
    policy.select_action = lambda batch, generator=None: actions.append(select(batch, generator)) or actions[-1]
    venv = make_vector_env(task, 1, max_episode_steps=cap, terminate_on_success=True)
    for seed in seeds:
        policy.seed = seed
        results += run_wave(policy, venv, task, [seed])
    venv.close()
np.savez(out, actions=np.concatenate([a.numpy() for a in actions]), steps=[r["steps"] for r in results],
         success=[r["success"] for r in results])
"""


def test_closed_loop_episodes_from_another_process_match_the_local_policy(tmp_path):
    """The shipped DP-T (DDIM-10, uniform caching) served; a client process runs seeded Meta-World episodes."""
    task, cap, seeds = "reach", 20, [100000, 100001]
    served = accelerated(DiffusionPolicy.load(SHIPPED).with_sampler("ddim", 10))
    with serving(served) as server:
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(server.port), task, str(cap),
                                   str(tmp_path / "remote.npz"), *map(str, seeds)],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        local = accelerated(DiffusionPolicy.load(SHIPPED).with_sampler("ddim", 10))
        from bac.envs.metaworld_env import make_vector_env

        actions, results = [], []
        select = local.select_action
        local.select_action = lambda batch, generator=None: actions.append(select(batch, generator)) or actions[-1]
        venv = make_vector_env(task, 1, max_episode_steps=cap, terminate_on_success=True)
        for seed in seeds:
            results += run_wave(local, venv, task, [seed], generator=torch.Generator().manual_seed(seed))
        venv.close()
        assert client.wait(60) == 0
        assert server.requests_served == sum(-(-r["steps"] // 8) for r in results)
    remote = np.load(tmp_path / "remote.npz")
    assert list(remote["steps"]) == [r["steps"] for r in results] and sum(r["steps"] for r in results) > 16
    assert list(remote["success"]) == [r["success"] for r in results]
    assert np.array_equal(remote["actions"], torch.cat(actions).numpy())  # bit-identical, every step
