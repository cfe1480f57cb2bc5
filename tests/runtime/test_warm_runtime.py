"""Warm starts in the runtime: the policy server keeps one warm-start state per session (reset by a reset message
or an observation jump, dropped on disconnect, never shared), the ``shift`` request field, the ``warm`` serve
setting; the real-time control loop passes each episode's state and the ticks between observations as ``shift``
(a late chunk is cold), and calls a policy without warm starts exactly as before. Tiny models, loopback sockets."""
import logging

import numpy as np
import pytest
import torch

import bac
from bac.envs.metaworld_env import make_vector_env
from bac.errors import ConfigError
from bac.policies.warm import WarmState, jumped
from bac.runtime.client import ObservationError, PolicyClient
from bac.runtime.control import VirtualClock, constant_latency, format_summary, run_control_episode, summarize_runs
from bac.runtime.loading import describe, load_policy, metadata, warm_start

from .test_control import _run_wave_actions
from .test_server import STATE, SHIPPED, serving, tiny_policy
from .test_server_faults import OpenpiStyleClient

pytestmark = pytest.mark.usefixtures("one_thread")
JUMP = 0.3  # the test policies' observation jump: well above a walk's step, well below an episode change


def warm_policy(steps=4, start=2, **settings):
    return tiny_policy(steps).with_warm_start(start, jump=JUMP, **settings)


def walk(start, count, seed):
    """One episode's current observations ``[count, 39]``: a small random walk from ``start`` (a float)."""
    rng = np.random.default_rng(seed)
    return (start + np.cumsum(0.01 * rng.normal(size=(count, 39)), axis=0)).astype(np.float32)


def normalised(policy, observations):
    return policy.obs_normalizer(torch.from_numpy(observations))


def local_chunks(policy, observations, task, seed, **fields):
    """What a fresh server session gives for current observations sent one per request, from a local policy
    with its own state: ``(chunks, state)``; ``fields``: per request, lists of ``shift``, ``delay`` and
    ``num_actions`` (the requests' fields)."""
    generator, state = torch.Generator().manual_seed(seed), WarmState()
    history, chunks = None, []
    for i, observation in enumerate(observations):
        history = np.repeat(observation[None], 2, 0) if history is None else \
            np.concatenate([history[1:], observation[None]])
        batch = {STATE: torch.from_numpy(history)[None], "task": task}
        kwargs = {key: values[i] for key, values in fields.items()}
        chunks.append(policy.predict_action_chunk(batch, generator=generator, warm_state=state, **kwargs)[0].numpy())
    return chunks, state


def infer_all(client, observations, task, **fields):
    return [client.infer({STATE: o, "task": task, **fields})["actions"] for o in observations]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ the server: sessions
def test_two_episodes_on_one_openpi_connection_equal_two_fresh_connections():
    """openpi's client's reset() sends nothing: the second episode's first observation jumps, so the session
    begins a new episode (history, warm state, generator as a reset without a seed leaves them)."""
    policy = warm_policy()
    episode1, episode2 = walk(1.0, 4, 1), walk(-1.0, 4, 2)
    assert jumped(normalised(policy, episode1[-1:]), normalised(policy, episode2[:1]), JUMP)
    assert not any(jumped(normalised(policy, e[i:i + 1]), normalised(policy, e[i + 1:i + 2]), JUMP)
                   for e in (episode1, episode2) for i in range(3))
    expected1, state = local_chunks(policy, episode1, "reach", 0)
    expected2, _ = local_chunks(policy, episode2, "reach", 0)
    assert state.warm_calls == 3  # every call after the first warm-started
    continued, _ = local_chunks(policy, np.concatenate([episode1, episode2]), "reach", 0)
    assert not np.array_equal(continued[4], expected2[0])  # without the new episode, episode 2 would differ
    with serving(policy) as server:
        fresh = []
        for episode in (episode1, episode2):
            client = OpenpiStyleClient(server.port)
            fresh.append(infer_all(client, episode, "reach"))
            client.close()
        reused = OpenpiStyleClient(server.port)
        first = infer_all(reused, episode1, "reach")
        reused.reset()  # a no-op, as openpi-client 0.1.2's
        second = infer_all(reused, episode2, "reach")
        reused.close()
    assert same(fresh[0], expected1) and same(fresh[1], expected2)
    assert same(first, fresh[0]) and same(second, fresh[1])


def test_interleaved_sessions_never_share_warm_state():
    policy = warm_policy()
    ours, theirs = walk(0.5, 5, 3), walk(0.6, 5, 4)  # close enough that a shared prior would be used
    expected_ours, _ = local_chunks(policy, ours, "reach", 0)
    expected_theirs, state = local_chunks(policy, theirs, "reach", 0)
    assert state.warm_calls == 4
    with serving(policy) as server, PolicyClient(port=server.port) as a, PolicyClient(port=server.port) as b:
        got_ours, got_theirs = [], []
        for o, t in zip(ours, theirs):
            got_ours.append(a.infer({STATE: o, "task": "reach"})["actions"])
            got_theirs.append(b.infer({STATE: t, "task": "reach"})["actions"])
    assert same(got_ours, expected_ours) and same(got_theirs, expected_theirs)


def test_a_disconnect_drops_the_warm_state_and_a_reset_message_resets_it(caplog):
    caplog.set_level(logging.INFO, logger="bac.runtime.server")
    policy = warm_policy()
    episode = walk(0.5, 6, 5)  # one smooth episode: nothing but the disconnect or the reset starts over
    expected, _ = local_chunks(policy, episode[3:], "reach", 0)
    with serving(policy) as server:
        with PolicyClient(port=server.port) as client:
            infer_all(client, episode[:3], "reach")
        with PolicyClient(port=server.port) as client:  # a new session: cold, its own generator and history
            after_disconnect = infer_all(client, episode[3:], "reach")
        with PolicyClient(port=server.port) as client:
            infer_all(client, episode[:3], "reach")
            client.reset(seed=0)
            after_reset = infer_all(client, episode[3:], "reach")
            assert len(server.sessions) == 1
        with PolicyClient(port=server.port) as client:  # the control: the same session, no reset, goes on warm
            infer_all(client, episode[:3], "reach")
            continued = infer_all(client, episode[3:], "reach")
    assert same(after_disconnect, expected) and same(after_reset, expected)
    assert not np.array_equal(continued[0], expected[0])
    lines = " | ".join(r.getMessage() for r in caplog.records if "disconnected" in r.getMessage())
    for counts in ("3 request(s); 2 of 3 calls warm, 0 new episode(s) on an observation jump",
                   "6 request(s); 4 of 6 calls warm", "6 request(s); 5 of 6 calls warm"):
        assert counts in lines, lines


def test_the_shift_field_aligns_the_prior_and_a_late_chunk_is_cold():
    policy = warm_policy()
    episode = walk(0.5, 4, 6)
    shifts = [0, 3, 16, 5]  # 16 = the horizon: the previous chunk has run out
    expected, state = local_chunks(policy, episode, "reach", 0, shift=shifts)
    assert state.warm_calls == 2  # the first and the late call are cold
    default, _ = local_chunks(policy, episode, "reach", 0)
    assert not np.array_equal(expected[1], default[1])  # shift 3 is not the default 8
    cold, _ = local_chunks(tiny_policy(4), episode, "reach", 0)  # the same generator: the same noise
    with serving(policy) as server, PolicyClient(port=server.port) as client:
        got = [client.infer({STATE: o, "task": "reach", "shift": s})["actions"] for o, s in zip(episode, shifts)]
        for bad in (-1, True, "2", 1.0, 2**40):
            with pytest.raises(ObservationError, match="'shift' must be an integer in \\[0, 2\\*\\*31\\)"):
                client.infer({STATE: episode[0], "task": "reach", "shift": bad})
    assert same(got, expected)
    assert np.array_equal(got[0], cold[0]) and not np.array_equal(got[1], cold[1])
    with serving(tiny_policy(4)) as server, PolicyClient(port=server.port) as client:
        assert client.metadata["warm_start"] is None
        with pytest.raises(ObservationError, match="'shift' is read only by a warm-started policy"):
            client.infer({STATE: episode[0], "task": "reach", "shift": 2})


# ------------------------------------------------------------------------------ the server: the setting
def test_the_warm_setting_is_checked_and_described():
    policy = tiny_policy(4)
    view = warm_start(policy, {"start": 2, "variant": None, "threshold": None, "jump": 0.5})
    assert (view.warm.start, view.warm.variant, view.warm.jump) == (2, "plain", 0.5) and policy.warm is None
    meta = metadata(view)
    assert meta["warm_start"] == {"start": 2, "variant": "plain", "threshold": None, "jump": 0.5}
    assert "warm start at step 2 (plain)" in describe(meta)
    assert warm_start(policy, {"start": 3, "variant": "checked", "threshold": 0.2}).warm.threshold == 0.2
    for warm, error in (({"start": 2, "stride": 1}, r"setting warm: unknown key\(s\) \['stride'\]"),
                        ({"variant": "plain"}, "setting warm needs start"),
                        (3, "setting warm must be a mapping"),
                        ({"start": 4}, "setting warm: warm start at step 4 does not fit a sampler of 4 steps"),
                        ({"start": 2, "variant": "falcon"}, "setting warm: .*needs threshold")):
        with pytest.raises(ConfigError, match=error):
            warm_start(policy, warm)
    policy.accelerate(bac.build_method("fbcache", policy.model, num_steps=4, scheduler=policy.sampler,
                                       threshold=0.1))
    with pytest.raises(ConfigError, match="setting warm: 'fbcache' is a runtime rule"):
        warm_start(policy, {"start": 2})
    assert warm_start(policy, {"start": 0}).warm.start == 0  # every call cold: any acceleration fits
    served = load_policy(SHIPPED, sampler="ddim", steps=4, method="uniform", method_params={"interval": 2},
                         warm={"start": 2})
    assert served.policy.warm.start == 2 and bac.get_handle(served.policy.model) is served.handle


def test_serve_checks_the_warm_setting_before_loading():
    from hydra import compose, initialize_config_dir

    from bac.apps.serve import serve
    from bac.configs import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        assert compose("serve").warm is None  # off by default
        for overrides, error in ((["warm=3"], "setting warm must be a mapping"),
                                 (["warm={start:x}"], "setting warm.start must be an integer"),
                                 (["warm={start:-1}"], "setting warm.start must be >= 0"),
                                 (["warm={start:2,jump:x}"], "setting warm.jump must be a number")):
            with pytest.raises(ConfigError, match=error):
                serve(compose("serve", overrides=overrides))


# ------------------------------------------------------------------------------ the control loop
def recording(policy):
    """Wrap ``policy.predict_action_chunk``: each call's keyword arguments and, after it, its warm state's counts."""
    calls, predict = [], policy.predict_action_chunk

    def record(batch, **kwargs):
        result = predict(batch, **kwargs)
        state = kwargs.get("warm_state")
        calls.append({"kwargs": dict(kwargs), "counts": None if state is None else state.counts()})
        return result
    policy.predict_action_chunk = record
    return calls


def test_zero_latency_warm_control_executes_what_select_action_executes():
    """lead 0, no latency: each request comes n_action_steps ticks after the last, select_action's shift."""
    policy = warm_policy(steps=4, start=2)
    env = make_vector_env("push", 1, max_episode_steps=27, terminate_on_success=True)
    try:
        result, actions = _run_wave_actions(policy, env, "push", 3)
        trace = run_control_episode(policy, env, "push", seed=3, control_hz=20, clock=VirtualClock(),
                                    generator=torch.Generator().manual_seed(3), lead=0,
                                    latency_model=constant_latency(0))
    finally:
        env.close()
    assert np.array_equal(trace.actions, actions) and trace.steps == result["steps"] == 27
    assert trace.warm == {"calls": 4, "warm_calls": 3, "guided_calls": 0, "evaluations": 4 + 3 * 2}
    assert policy.warm_counts == {"calls": 4, "warm_calls": 3, "guided_calls": 0, "evaluations": 10}  # select_action's own
    row = trace.to_dict()
    assert row["warm"] == trace.warm
    summary = summarize_runs([trace, trace])
    assert summary["warm"] == {"calls": 8, "warm_calls": 6, "guided_calls": 0, "evaluations": 20,
                              "evaluations_per_call": 2.5}
    assert "6 of 8 calls warm, 2.50 evaluations per call" in format_summary(summary)


def test_the_control_loop_shifts_by_the_ticks_between_observations_and_a_late_chunk_is_cold():
    policy = warm_policy(steps=4, start=2)
    calls = recording(policy)
    late = 2  # call 2 takes 1 s at 20 Hz: 20 ticks, past the horizon of 16
    env = make_vector_env("push", 1, max_episode_steps=60, terminate_on_success=True)
    try:
        trace = run_control_episode(policy, env, "push", seed=4, control_hz=20, lead=3,
                                    generator=torch.Generator().manual_seed(4),
                                    latency_model=lambda call: 1000.0 if call == late else 70.0)
        again = run_control_episode(policy, env, "push", seed=4, control_hz=20, lead=3,
                                    generator=torch.Generator().manual_seed(4),
                                    latency_model=lambda call: 1000.0 if call == late else 70.0)
    finally:
        env.close()
    starts = [c.start_tick for c in trace.chunks]
    assert [c["kwargs"]["shift"] for c in calls[:len(starts)]] == [0] + list(np.diff(starts))
    shifts = [c["kwargs"]["shift"] for c in calls]
    assert shifts[late + 1] >= policy.horizon > max(shifts[1:late + 1])
    warm_calls = [c["counts"]["warm_calls"] for c in calls[:len(shifts) // 2]]
    made_warm = np.diff([0] + warm_calls).tolist()
    assert made_warm == [0, 1, 1, 0] + [1] * (len(made_warm) - 4)  # the first and the late chunk's successor cold
    assert trace.warm["warm_calls"] == len(made_warm) - 2 and trace.warm["calls"] == len(made_warm)
    assert again.warm == trace.warm and np.array_equal(again.actions, trace.actions)  # fresh state per episode


def test_a_policy_without_warm_starts_is_called_as_before():
    policy = tiny_policy(4)
    calls = recording(policy)
    env = make_vector_env("push", 1, max_episode_steps=20, terminate_on_success=True)
    try:
        trace = run_control_episode(policy, env, "push", seed=3, control_hz=20, lead=2,
                                    generator=torch.Generator().manual_seed(3), latency_model=constant_latency(60))
    finally:
        env.close()
    assert calls and all(set(c["kwargs"]) == {"generator", "num_actions"} for c in calls)
    assert trace.warm is None and "warm" not in trace.to_dict() and "warm" not in summarize_runs([trace])
