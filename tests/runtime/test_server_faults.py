"""The policy server under faults a real client brings: refused values clipped in replies and logs (a flood of
large strings stays bounded), a bounded language cache, the optional API key, what a reset does and what a
client that never resets gets, and bac-serve's own setting and install mistakes. Real loopback sockets."""
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import urllib.request
import weakref

import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from bac.errors import ConfigError
from bac.policies.language import ENTRY_BYTES, MAX_TOKENS, TOKEN_DIM, LanguageCache
from bac.runtime.client import ObservationError, PolicyClient, ServerError
from bac.runtime.msgpack_numpy import packb, unpackb
from bac.runtime.protocol import MAX_ERROR_CHARS, MAX_INSTRUCTION_CHARS, MAX_QUOTED
from bac.runtime.server import PolicyServer

from .test_server import STATE, local_chunks, states, tiny_image_policy, tiny_policy

pytestmark = pytest.mark.usefixtures("one_thread")
BIG = 2_000_000  # characters: large enough that echoing it would show, small enough for a quick test


@contextlib.contextmanager
def serving(policy, **settings):
    server = PolicyServer(policy, port=0, **{"warmup": 0, **settings}).start()
    try:
        yield server
    finally:
        server.stop()


class OpenpiStyleClient:
    """What openpi-client 0.1.2's ``WebsocketClientPolicy`` does on the wire: an ``Authorization: Api-Key`` header
    when it has a key, metadata on connect, one frame per ``infer``, and a ``reset()`` that sends nothing."""

    def __init__(self, port, api_key=None):
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._exit = contextlib.ExitStack()  # openpi calls connect() bare; websockets 17 asks for a context manager
        self.ws = self._exit.enter_context(connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None,
                                                   additional_headers=headers))
        self.metadata = unpackb(self.ws.recv())

    def infer(self, obs):
        self.ws.send(packb(obs))
        reply = self.ws.recv()
        if isinstance(reply, str):
            raise RuntimeError(f"Error in inference server:\n{reply}")
        return unpackb(reply)

    def reset(self):
        pass

    def close(self):
        self._exit.close()


def server_records(caplog):
    return [r for r in caplog.records if r.name == "bac.runtime.server"]


# ------------------------------------------------------------------------------ refusals: clipped, rate-limited
FLOODS = {  # kind of refused value -> the request carrying it (all refused as DataError)
    "unknown task": lambda big: {STATE: np.zeros(39, np.float32), "task": big},
    "unknown key": lambda big: {STATE: np.zeros(39, np.float32), "task": "reach", big: 1},
    "reset seed": lambda big: {"reset": True, "seed": big},
    "num_actions": lambda big: {STATE: np.zeros(39, np.float32), "task": "reach", "num_actions": big},
    "non-string task": lambda big: {STATE: np.zeros(39, np.float32), "task": [big]},
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_a_flood_of_large_refused_values_keeps_replies_and_log_bounded(kind, caplog):
    caplog.set_level(logging.DEBUG, logger="bac.runtime.server")
    policy = tiny_policy()
    big = "x" * BIG
    expected = local_chunks(policy, states(5, 1), "reach", 0)[0]
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        replies = []
        for _ in range(10):
            with pytest.raises(ObservationError) as caught:
                client.send_raw(packb(FLOODS[kind](big)))
            replies.append(str(caught.value))
        assert client.infer({STATE: states(5, 1)[0], "task": "reach"})["actions"].tolist() == expected.tolist()
    for reply in replies:
        assert len(reply) <= MAX_ERROR_CHARS + 40 and "x" * (MAX_QUOTED + 1) not in reply, reply[:300]
        assert "..." in reply  # says it was clipped
    records = server_records(caplog)
    log_chars = sum(len(r.getMessage()) for r in records)
    assert log_chars <= 10 * (MAX_ERROR_CHARS + 200), log_chars  # every line, DEBUG included, is bounded
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "DataError" in warnings[0].getMessage()  # one per client and kind
    assert any("(10 DataError refused)" in r.getMessage() for r in records if r.levelno == logging.INFO)


def test_an_internal_error_is_logged_once_with_its_stack_and_clipped(caplog):
    caplog.set_level(logging.DEBUG, logger="bac.runtime.server")
    policy = tiny_policy()

    def broken(batch, generator=None, **kwargs):
        raise RuntimeError("y" * BIG)

    policy.predict_action_chunk = broken
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        for _ in range(3):
            with pytest.raises(ServerError, match=r"InternalError: RuntimeError: y+\.\.\. \(\d+ more\)") as caught:
                client.infer({STATE: np.zeros(39, np.float32), "task": "reach"})
            assert caught.value.kind == "InternalError" and len(str(caught.value)) <= MAX_ERROR_CHARS + 40
    errors = [r for r in server_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "in broken" in errors[0].getMessage()  # the stack, once
    assert sum(len(r.getMessage()) for r in server_records(caplog)) < 4 * MAX_ERROR_CHARS + 5000


# ------------------------------------------------------------------------------ the language cache
class CountingEncoder:
    """Stands in for the sentence encoder: random tokens, counted, each kept by weak reference (to see it freed)."""

    def __init__(self):
        self.encoded, self.alive = [], []

    def encode(self, sentence):
        tokens = torch.randn(3 + len(sentence) % 5, TOKEN_DIM)
        self.encoded.append(sentence)
        self.alive.append(weakref.ref(tokens))
        return tokens

    def count_alive(self):
        gc.collect()
        return sum(ref() is not None for ref in self.alive)


def test_the_language_cache_keeps_at_most_its_bound_of_encoded_sentences():
    cache = LanguageCache({"open the faucet": torch.randn(3, TOKEN_DIM)}, max_encoded=64)
    encoder = cache._encoder = CountingEncoder()
    for i in range(2000):
        tokens, mask = cache([f"instruction {i}", "open the faucet"])
        assert tokens.shape[0] == 2 and mask[1].sum() == 3
        assert len(cache) <= 1 + 64
    assert len(encoder.encoded) == 2000 and encoder.count_alive() <= 64  # the evicted tokens are freed
    assert "open the faucet" in cache  # the checkpoint's instructions are kept
    cache.tokens("instruction 1950")  # recently used: still cached
    assert len(encoder.encoded) == 2000
    cache.tokens("instruction 1936")  # the oldest kept, touched: now the most recent
    cache.tokens("instruction 0")  # evicted long ago: encoded again, evicting the oldest kept (1937)
    assert len(encoder.encoded) == 2001 and "instruction 1936" in cache and "instruction 1937" not in cache
    stored = sum(t.numel() * t.element_size() for t in cache.entries.values())
    assert stored <= (1 + 64) * ENTRY_BYTES and ENTRY_BYTES == MAX_TOKENS * TOKEN_DIM * 4
    cache.max_encoded = 8  # lowering the bound trims at once
    assert len(cache) == 1 + 8 and encoder.count_alive() <= 8
    with pytest.raises(ConfigError, match="max_encoded must be"):
        cache.max_encoded = 0


def test_a_served_vla_keeps_at_most_its_language_cache_size_and_refuses_huge_instructions():
    policy = tiny_image_policy()
    encoder = policy.language._encoder = CountingEncoder()
    camera = "observation.images." + policy.cameras[0]
    request = {STATE: np.zeros(4, np.float32), camera: np.zeros((16, 16, 3), np.uint8)}
    with serving(policy, language_cache_size=8) as server, PolicyClient(port=server.port) as client:
        for i in range(40):
            assert client.infer({**request, "task": f"open faucet number {i}"})["actions"].shape == (4, 4)
        assert len(policy.language) <= 1 + 8 and encoder.count_alive() <= 8
        with pytest.raises(ObservationError, match=rf"instruction of {MAX_INSTRUCTION_CHARS + 1} characters; at most "):
            client.infer({**request, "task": "o" * (MAX_INSTRUCTION_CHARS + 1)})
        assert len(encoder.encoded) == 40  # refused before the encoder saw it
        assert client.infer({**request, "task": "open the faucet"})["actions"].shape == (4, 4)
    assert policy.language.max_encoded == 8


# ------------------------------------------------------------------------------ the API key
def test_with_an_api_key_the_right_key_is_served_and_a_wrong_or_missing_one_refused(caplog):
    caplog.set_level(logging.DEBUG, logger="bac.runtime.server")
    policy = tiny_policy()
    expected = local_chunks(policy, states(3, 2), "push", 0)
    with serving(policy, api_key="s3cret-key") as server:
        with PolicyClient(port=server.port, api_key="s3cret-key") as client:  # bac's client
            assert [client.infer({STATE: s, "task": "push"})["actions"].tolist() for s in states(3, 2)] == \
                [e.tolist() for e in expected]
        openpi = OpenpiStyleClient(server.port, api_key="s3cret-key")  # openpi's header, as it sends it
        assert openpi.metadata["protocol"] == "bac-policy-server"
        assert openpi.infer({STATE: states(3, 2)[0], "task": "push"})["actions"].tolist() == expected[0].tolist()
        openpi.close()
        for key in (None, "wrong", "s3cret-key-", "S3CRET-KEY"):
            with pytest.raises(ServerError, match=r"AuthError: this policy server needs an API key: send the header "
                                                  r"'Authorization: Api-Key <key>'") as caught:
                PolicyClient(port=server.port, api_key=key)
            assert caught.value.kind == "AuthError"
        with pytest.raises(Exception, match="401"):
            OpenpiStyleClient(server.port, api_key="wrong")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"  # health asks for no key
        assert server.health()["clients"] == 0 and server.health()["requests_served"] == 3
    refusals = [r for r in server_records(caplog) if "without the right API key" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING  # 5 refused, one line per minute
    assert "s3cret" not in caplog.text


def test_without_an_api_key_any_client_is_served_as_before():
    policy = tiny_policy()
    with serving(policy) as server:
        for key in (None, "anything"):
            with PolicyClient(port=server.port, api_key=key) as client:
                assert client.infer({STATE: states(4, 1)[0], "task": "reach"})["actions"].shape == (8, 4)
    with pytest.raises(ConfigError, match="api_key must be a non-empty string"):
        PolicyServer(policy, port=0, api_key=" ")


# ------------------------------------------------------------------------------ episodes and resets
def test_a_reset_starts_a_fresh_episode_and_without_one_the_session_continues():
    """Episode 2 on a reused connection equals a fresh connection's episode after a reset message, and
    continues episode 1's history and noise without one (openpi's client's reset() sends nothing)."""
    policy = tiny_policy()
    episode1, episode2 = states(21, 3), states(22, 3)
    fresh = local_chunks(policy, episode2, "reach", 0)
    continued = local_chunks(policy, np.concatenate([episode1, episode2]), "reach", 0)[len(episode1):]
    with serving(policy) as server:
        with PolicyClient(port=server.port) as client:  # a new connection: a fresh episode
            assert all(np.array_equal(client.infer({STATE: s, "task": "reach"})["actions"], e)
                       for s, e in zip(episode2, fresh))
        with PolicyClient(port=server.port) as client:  # bac's client: reset() sends the reset message
            for s in episode1:
                client.infer({STATE: s, "task": "reach"})
            client.reset()
            assert all(np.array_equal(client.infer({STATE: s, "task": "reach"})["actions"], e)
                       for s, e in zip(episode2, fresh))
        openpi = OpenpiStyleClient(server.port)  # openpi's client: reset() is a no-op, the session goes on
        for s in episode1:
            openpi.infer({STATE: s, "task": "reach"})
        openpi.reset()
        second = [openpi.infer({STATE: s, "task": "reach"})["actions"] for s in episode2]
        assert openpi.infer({"reset": True}) == {"reset": True, "seed": 0}  # the documented way to reset with it
        after_reset = [openpi.infer({STATE: s, "task": "reach"})["actions"] for s in episode2]
        openpi.close()
    assert all(np.array_equal(a, e) for a, e in zip(second, continued))
    assert not np.array_equal(second[0], fresh[0])  # not a fresh episode: documented, and reconnecting is the fix
    assert all(np.array_equal(a, e) for a, e in zip(after_reset, fresh))


# ------------------------------------------------------------------------------ bac-serve's mistakes
def run_serve(args, blocked=(), env=None):
    """``bac-serve args`` in a subprocess with the modules ``blocked`` made unimportable."""
    code = textwrap.dedent(f"""
        import sys
        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(blocked)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Missing())
        sys.argv = ["bac-serve", *{list(args)!r}]
        from bac.apps.serve import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_an_unknown_log_level_is_a_clear_error():
    out = run_serve(["log_level=LOUD", "port=0"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "setting log_level must be one of debug, info, warning, error, critical, got 'LOUD'" in out.stderr


def test_without_the_serve_extra_help_works_and_serving_names_the_extra():
    help_out = run_serve(["--help"], blocked=("msgpack",))
    assert help_out.returncode == 0 and "Usage: bac-serve" in help_out.stdout, help_out.stderr
    for missing in ("msgpack", "websockets"):
        out = run_serve(["port=0"], blocked=(missing,))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"bac-serve needs the 'serve' extra ({missing} is not installed): pip install 'bac[serve]'" in out.stderr


def test_api_key_and_language_cache_settings_are_checked():
    from hydra import compose, initialize_config_dir

    from bac.apps.serve import serve
    from bac.configs import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        assert compose("serve").api_key is None  # no key asked unless set
        for overrides, error in ((["api_key=' '"], "setting api_key is empty"),
                                 (["language_cache_size=0"], "setting language_cache_size must be >= 1"),
                                 (["log_level=loud"], "setting log_level must be one of")):
            with pytest.raises(ConfigError, match=error):
                serve(compose("serve", overrides=overrides))
    os.environ["BAC_SERVE_API_KEY"] = "from-the-environment"
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            assert compose("serve").api_key == "from-the-environment"
    finally:
        del os.environ["BAC_SERVE_API_KEY"]
