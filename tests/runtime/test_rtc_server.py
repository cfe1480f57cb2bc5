"""Real-time chunking in the policy server: the ``delay`` request field (the frozen prefix), each session's last
chunk (dropped on reset, on disconnect and on an observation jump, never shared), the ``rtc`` serve setting and
its description. Tiny models, loopback sockets."""
import logging

import numpy as np
import pytest

from bac.errors import ConfigError
from bac.policies.warm import DEFAULT_JUMP, jumped
from bac.runtime.client import ObservationError, PolicyClient
from bac.runtime.loading import describe, load_policy, metadata, real_time_chunking

from .test_server import SHIPPED, STATE, serving, tiny_policy
from .test_server_faults import OpenpiStyleClient
from .test_warm_runtime import local_chunks, normalised, same, walk

pytestmark = pytest.mark.usefixtures("one_thread")
HORIZON = 16  # the tiny policy's; it returns n_action_steps = 8 actions by default


def rtc_policy(steps=3, **settings):
    return tiny_policy(steps).with_rtc(**settings)


def requests(client, observations, task, **fields):
    """One request per observation; ``fields`` as in :func:`local_chunks`."""
    return [client.infer({STATE: o, "task": task, **{key: values[i] for key, values in fields.items()}})["actions"]
            for i, o in enumerate(observations)]


# ------------------------------------------------------------------------------ the frozen prefix
def test_a_request_with_delay_returns_the_previous_chunks_actions_advanced_by_shift():
    policy = rtc_policy()
    episode = walk(0.5, 3, 7)
    shifts, delays = [0, 3, 10], [0, 4, 100]  # the last: more than the 6 actions the previous chunk has left
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        got = requests(client, episode, "reach", shift=shifts, delay=delays, num_actions=[HORIZON] * 3)
    first, second, third = got
    assert np.array_equal(second[:4], first[3:7])  # the frozen prefix, exactly
    assert np.array_equal(third[:6], second[10:16])  # clipped to the overlap
    assert not np.array_equal(second[4], first[7])  # past the prefix: guided, not copied
    plain, _ = local_chunks(tiny_policy(3), episode[:1], "reach", 0, num_actions=[HORIZON])
    assert np.array_equal(first, plain[0])  # a session's first call is a plain call
    expected, state = local_chunks(policy, episode, "reach", 0, shift=shifts, delay=delays,
                                   num_actions=[HORIZON] * 3)
    assert same(got, expected) and state.guided_calls == 2


def test_bad_delay_values_get_a_clear_error_and_change_nothing():
    policy = rtc_policy()
    episode = walk(0.5, 2, 8)
    expected, _ = local_chunks(policy, episode, "reach", 0, shift=[0, 2], delay=[0, 3])
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        assert client.metadata["rtc"] == {"max_guidance": 5.0} and client.metadata["warm_start"] is None
        first = client.infer({STATE: episode[0], "task": "reach", "delay": np.int64(0), "shift": 0})["actions"]
        for bad in (-1, True, "2", 1.5, 2**40, [3]):
            with pytest.raises(ObservationError, match=r"'delay' must be an integer in \[0, 2\*\*31\): the actions "
                                                       "of the client's current chunk"):
                client.infer({STATE: episode[1], "task": "reach", "delay": bad, "shift": 2})
        second = client.infer({STATE: episode[1], "task": "reach", "delay": 3, "shift": 2})["actions"]
    assert same([first, second], expected)  # the refused requests left the session as it was
    for other in (tiny_policy(3), tiny_policy(3).with_warm_start(1)):
        with serving(other) as server, PolicyClient(port=server.port) as client:
            assert client.metadata["rtc"] is None
            with pytest.raises(ObservationError, match=r"'delay' is read only by a policy with real-time chunking: "
                                                       r"this server's metadata has rtc null; serve it with the "
                                                       r"setting rtc=\{max_guidance:5\}"):
                client.infer({STATE: episode[0], "task": "reach", "delay": 2})


# ------------------------------------------------------------------------------ the session's last chunk
def test_a_reset_or_a_disconnect_drops_the_last_chunk(caplog):
    """After either, the next call is a fresh session's first call (a plain call), bit for bit."""
    caplog.set_level(logging.INFO, logger="bac.runtime.server")
    policy = rtc_policy()
    episode = walk(0.5, 6, 5)  # one smooth episode: nothing but the disconnect or the reset starts over
    fields = {"shift": [0, 2, 2], "delay": [0, 2, 2]}
    expected, state = local_chunks(policy, episode[3:], "reach", 0, **fields)
    assert state.guided_calls == 2
    with serving(policy) as server:
        with PolicyClient(port=server.port) as client:
            requests(client, episode[:3], "reach", **fields)
        with PolicyClient(port=server.port) as client:
            after_disconnect = requests(client, episode[3:], "reach", **fields)
        with PolicyClient(port=server.port) as client:
            requests(client, episode[:3], "reach", **fields)
            client.reset(seed=0)
            after_reset = requests(client, episode[3:], "reach", **fields)
        with PolicyClient(port=server.port) as client:  # the control: the same session, no reset, goes on guided
            requests(client, episode[:3], "reach", **fields)
            continued = requests(client, episode[3:], "reach", **fields)
    assert same(after_disconnect, expected) and same(after_reset, expected)
    assert not np.array_equal(continued[0], expected[0])
    lines = " | ".join(r.getMessage() for r in caplog.records if "disconnected" in r.getMessage())
    for counts in ("3 request(s); 2 of 3 calls guided (real-time chunking), 0 new episode(s) on an observation jump",
                   "6 request(s); 4 of 6 calls guided", "6 request(s); 5 of 6 calls guided"):
        assert counts in lines, lines
    assert "calls warm" not in lines  # real-time chunking alone: no warm start to count


def test_two_sessions_never_share_the_last_chunk():
    policy = rtc_policy()
    ours, theirs = walk(0.5, 4, 3), walk(0.6, 4, 4)  # close enough that a shared chunk would be continued
    fields = {"shift": [0, 3, 3, 3], "delay": [0, 2, 2, 2]}
    expected_ours, _ = local_chunks(policy, ours, "reach", 0, **fields)
    expected_theirs, state = local_chunks(policy, theirs, "push", 0, **fields)
    assert state.guided_calls == 3
    with serving(policy) as server, PolicyClient(port=server.port) as a, PolicyClient(port=server.port) as b:
        got_ours, got_theirs = [], []
        for i, (o, t) in enumerate(zip(ours, theirs)):
            request = {key: values[i] for key, values in fields.items()}
            got_ours.append(a.infer({STATE: o, "task": "reach", **request})["actions"])
            got_theirs.append(b.infer({STATE: t, "task": "push", **request})["actions"])
    assert same(got_ours, expected_ours) and same(got_theirs, expected_theirs)


def test_an_observation_jump_begins_a_new_episode_without_a_warm_start():
    """Real-time chunking alone uses the default jump: openpi's client (whose reset() sends nothing) gets two
    fresh connections' chunks for two episodes on one connection."""
    policy = rtc_policy()
    assert policy.warm is None
    episode1, episode2 = walk(1.5, 3, 1), walk(-1.5, 3, 2)
    assert jumped(normalised(policy, episode1[-1:]), normalised(policy, episode2[:1]), DEFAULT_JUMP)
    fields = {"shift": [0, 2, 2], "delay": [0, 1, 1]}
    expected1, _ = local_chunks(policy, episode1, "reach", 0, **fields)
    expected2, _ = local_chunks(policy, episode2, "reach", 0, **fields)
    with serving(policy) as server:
        reused = OpenpiStyleClient(server.port)
        first = requests(reused, episode1, "reach", **fields)
        reused.reset()  # a no-op, as openpi-client 0.1.2's
        second = requests(reused, episode2, "reach", **fields)
        reused.close()
    assert same(first, expected1) and same(second, expected2)


def test_shift_alone_needs_no_delay_and_a_warm_started_view_combines():
    """An RTC server reads ``shift`` (delay 0: nothing frozen, the overlap guided); with a warm start both apply."""
    policy = tiny_policy(4).with_warm_start(2).with_rtc()
    episode = walk(0.5, 3, 9)
    expected, state = local_chunks(policy, episode, "reach", 0, shift=[0, 4, 4], delay=[None, None, 2])
    assert state.warm_calls == state.guided_calls == 2
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        assert client.metadata["warm_start"]["start"] == 2 and client.metadata["rtc"] == {"max_guidance": 5.0}
        got = [client.infer({STATE: episode[0], "task": "reach"})["actions"],
               client.infer({STATE: episode[1], "task": "reach", "shift": 4})["actions"],
               client.infer({STATE: episode[2], "task": "reach", "shift": 4, "delay": 2})["actions"]]
    assert same(got, expected)
    assert np.array_equal(got[2][:2], got[1][4:6])


# ------------------------------------------------------------------------------ the serve setting
def test_the_rtc_setting_is_checked_and_described():
    policy = tiny_policy(4)
    view = real_time_chunking(policy, {"max_guidance": None})
    assert view.rtc.max_guidance == 5.0 and policy.rtc is None
    assert real_time_chunking(policy, {"max_guidance": 2}).rtc.max_guidance == 2
    meta = metadata(real_time_chunking(policy, {}))
    assert meta["rtc"] == {"max_guidance": 5.0} and metadata(policy)["rtc"] is None
    assert "real-time chunking (max_guidance 5)" in describe(meta) and "real-time" not in describe(metadata(policy))
    falcon = policy.with_warm_start(2, variant="falcon", threshold=0.2)
    for target, rtc, error in ((policy, {"beta": 5}, r"setting rtc: unknown key\(s\) \['beta'\]"),
                               (policy, 5, "setting rtc must be a mapping"),
                               (policy, {"max_guidance": -1}, "setting rtc: real-time chunking: max_guidance must be"),
                               (falcon, {}, "setting rtc: real-time chunking combines with plain warm starts")):
        with pytest.raises(ConfigError, match=error):
            real_time_chunking(target, rtc)
    with pytest.raises(ConfigError, match="setting rtc: real-time chunking's guided steps run eagerly"):
        load_policy(SHIPPED, sampler="ddim", steps=4, compile="whole", rtc={})
    served = load_policy(SHIPPED, sampler="ddim", steps=4, method="uniform", method_params={"interval": 2},
                         warm={"start": 2}, rtc={"max_guidance": 3})
    assert served.policy.warm.start == 2 and served.policy.rtc.max_guidance == 3


def test_serve_checks_the_rtc_setting_before_loading():
    from hydra import compose, initialize_config_dir

    from bac.apps.serve import serve
    from bac.configs import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        assert compose("serve").rtc is None  # off by default
        for overrides, error in ((["rtc=3"], "setting rtc must be a mapping"),
                                 (["rtc={max_guidance:x}"], "setting rtc.max_guidance must be a number"),
                                 (["rtc={max_guidance:-1}"], "setting rtc.max_guidance must be >= 0")):
            with pytest.raises(ConfigError, match=error):
                serve(compose("serve", overrides=overrides))
