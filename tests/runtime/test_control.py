"""The real-time control loop: chunk alignment, late chunks, lead, blending, the first chunk's wait, clocks,
the synchronous loop as its special case, summaries, bad settings.

Most tests drive a fake env whose observation is its step count and a fake policy whose chunk ``c`` has
action ``[c, i]`` at index ``i``, so every executed action names the chunk and index it came from."""
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from bac.errors import ConfigError
from bac.envs.metaworld_env import make_vector_env
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy
from bac.runtime import run_wave
from bac.runtime.control import (EpisodeTrace, VirtualClock, WallClock, auto_lead, constant_latency, format_summary,
                                 make_control_env, run_control_episode, sampled_latency, summarize_runs)

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "checkpoints" / "dpt-metaworld"


def tiny_policy(tasks=("reach", "push"), steps=3):
    """As ``test_runtime.tiny_policy``: a 2-layer DP-T with perturbed weights, DDIM ``steps``."""
    torch.manual_seed(0)
    config = PolicyConfig.build("dpt", {"width": 32, "num_layers": 2, "heads": 2}, state_dim=39, action_dim=4,
                                tasks=list(tasks))
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 39))
    return policy.eval().with_sampler("ddim", steps)


class CountingEnv(gym.Env):
    """Observation ``[steps taken, 0, 0]``; succeeds (and terminates) at step ``success_at``."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-100.0, 100.0, (2,), np.float64)

    def __init__(self, success_at=None, step_sleep=0.0):
        self.success_at, self.step_sleep, self.count = success_at, step_sleep, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.count = 0
        return np.zeros(3), {}

    def step(self, action):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.count += 1
        success = self.count == self.success_at
        return np.array([self.count, 0.0, 0.0]), 0.0, success, False, {"success": success}


def counting_env(**kwargs):
    return gym.vector.SyncVectorEnv([lambda: CountingEnv(**kwargs)])


class FakePolicy:
    """Chunk ``c`` (0-based call) is ``[[c, 0], [c, 1], ..., [c, H - 1]]``; records the observation history
    (its last entry: the tick the inference started at) and the thread of every call."""

    def __init__(self, horizon=16, n_obs_steps=2, n_action_steps=8, state_dim=3, action_dim=2, cameras=(),
                 reads_instructions=False):
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.input_features = {"observation.state": SimpleNamespace(shape=(state_dim,))}
        self.input_features |= {f"observation.images.{c}": SimpleNamespace(shape=(3, 16, 16)) for c in cameras}
        self.output_features = {"action": SimpleNamespace(shape=(action_dim,))}
        self.reads_instructions, self.action_dim = reads_instructions, action_dim
        self.device = torch.device("cpu")
        self.calls, self.resets = [], 0

    def reset(self):
        self.resets += 1

    def select_action(self, batch, generator=None):
        raise AssertionError("the control loop samples chunks itself")

    def predict_action_chunk(self, batch, generator=None, num_actions=None):
        self.calls.append({"history": batch["observation.state"].clone(), "thread": threading.get_ident(),
                           "batch": batch})
        c = len(self.calls) - 1
        actions = torch.zeros(1, num_actions, self.action_dim)
        actions[0, :, 0] = c
        actions[0, :, 1] = torch.arange(num_actions, dtype=torch.float32)
        return actions

    @property
    def started_at(self):
        return [int(call["history"][0, -1, 0]) for call in self.calls]


def run(policy=None, env=None, **settings):
    settings = {"control_hz": 10, "seed": 0, "max_steps": 40, "lead": 0} | settings
    policy = policy or FakePolicy()
    env = env or counting_env()
    return run_control_episode(policy, env, "fake", **settings), policy


def executed(trace):
    return [tuple(a) for a in trace.actions.tolist()]


# ----------------------------------------------------------------------------- alignment and late chunks
def test_results_take_over_with_the_delay_dropped():
    """10 Hz, 150 ms: a result is visible 2 ticks after its observation; lead 3 of s = 8: the next inference
    starts 3 ticks before the planned end, its first 2 actions are dropped, and the next end is arrival + 8."""
    trace, policy = run(latency_model=constant_latency(150), lead=3, max_steps=30)
    assert policy.started_at == [0, 5, 12, 19, 26]  # planned ends 8, 15, 22, 29 minus the lead
    assert [(c.start_tick, c.arrival_tick, c.delay_ticks) for c in trace.chunks] == [
        (0, 0, 0), (5, 7, 2), (12, 14, 2), (19, 21, 2), (26, 28, 2)]
    expected = [(0, i) for i in range(7)] + [(c, 2 + i) for c in (1, 2, 3) for i in range(7)] + [(4, 2), (4, 3)]
    assert trace.sources == expected and executed(trace) == expected
    assert trace.missed_ticks == [] and trace.late_chunks == 0
    assert [c.executed for c in trace.chunks] == [7, 7, 7, 7, 2]
    # the history an inference reads: the last n_obs_steps observations, at the tick it starts
    assert policy.calls[1]["history"][0, :, 0].tolist() == [4.0, 5.0]
    assert policy.calls[0]["history"][0, :, 0].tolist() == [0.0, 0.0]  # the first observation repeated
    assert policy.resets >= 1 and trace.steps == trace.ticks == 30


@pytest.mark.parametrize("on_late", ["hold", "continue"])
def test_a_late_chunk_holds_or_continues_and_every_late_tick_is_a_miss(on_late):
    """lead 0, 250 ms at 10 Hz: each chunk arrives 3 ticks after its chunk's planned end."""
    trace, policy = run(latency_model=constant_latency(250), on_late=on_late, max_steps=24)
    assert policy.started_at == [0, 8, 19]
    late = [(0, 7)] * 3 if on_late == "hold" else [(0, 8), (0, 9), (0, 10)]
    assert executed(trace) == [(0, i) for i in range(8)] + late + [(1, 3 + i) for i in range(8)] + \
        ([(1, 10)] * 3 if on_late == "hold" else [(1, 11), (1, 12), (1, 13)]) + [(2, 3), (2, 4)]
    assert trace.sources[8] == ((0, -1) if on_late == "hold" else (0, 8))
    assert trace.missed_ticks == [8, 9, 10, 19, 20, 21]
    assert [c.missed_ticks for c in trace.chunks] == [0, 3, 3] and trace.late_chunks == 2
    assert [c.delay_ticks for c in trace.chunks] == [0, 3, 3]
    assert [c.executed for c in trace.chunks] == [8 + 3 * (on_late == "continue"), 8 + 3 * (on_late == "continue"), 2]


def test_continue_runs_to_the_end_of_the_chunk_then_holds_and_a_stale_chunk_is_skipped():
    """1.05 s at 10 Hz (11 ticks): chunk 1 (from tick 8) arrives at 19 with 5 actions left, planned to end at
    8 + H = 24 instead of 19 + 8; chunk 2 (from 24) arrives at 35. At 2.05 s a chunk arrives with none left."""
    trace, _ = run(latency_model=constant_latency(1050), on_late="continue", max_steps=36)
    assert executed(trace)[8:19] == [(0, i) for i in range(8, 16)] + [(0, 15)] * 3
    assert trace.sources[16:19] == [(0, -1)] * 3
    assert executed(trace)[19:24] == [(1, i) for i in range(11, 16)]
    assert executed(trace)[24:] == [(1, 15)] * 11 + [(2, 11)]
    assert trace.missed_ticks == list(range(8, 19)) + list(range(24, 35))

    trace, policy = run(latency_model=constant_latency(2050), on_late="hold", max_steps=60)
    assert policy.started_at[:3] == [0, 8, 29]  # chunk 1 arrives at 29 with delay 21 >= H: used at once
    stale = trace.chunks[1]
    assert (stale.delay_ticks, stale.executed, stale.missed_ticks) == (21, 0, 21)
    assert executed(trace)[8:50] == [(0, 7)] * 42  # held until chunk 2 (from 29) arrives at 50
    assert trace.sources[50] == (2, -1)  # it too is stale (delay 21): still holding
    assert all(t in trace.missed_ticks for t in range(8, 60))


def test_auto_lead_is_the_first_chunks_latency_in_ticks_plus_one():
    trace, policy = run(latency_model=constant_latency(150), lead="auto", max_steps=20)
    assert trace.lead == 3 and policy.started_at[:2] == [0, 5]
    trace, _ = run(latency_model=constant_latency(0), lead="auto", max_steps=20)
    assert trace.lead == 1 and trace.missed_ticks == []
    assert auto_lead([10_000], 10, 8) == 8 and auto_lead([100.0], 10, 8) == 2 and auto_lead([0.0], 40, 8) == 1
    assert auto_lead([20.0, 60.0], 50, 8) == 4  # the max: 60 ms = 3 ticks at 50 Hz


def test_adapt_lead_grows_with_the_slowest_chunk_so_far():
    """Call 2 takes 350 ms at 10 Hz: with adapt_lead, later chunks are requested ceil(3.5) + 1 = 5 ticks ahead
    (the 50 ms chunks ask for ceil(0.5) + 1 = 2, the lead both runs start with)."""
    latencies = [50, 50, 350, 50, 50, 50, 50, 50]
    model = lambda call: latencies[min(call, len(latencies) - 1)]  # noqa: E731
    fixed, fixed_policy = run(latency_model=model, lead=2, max_steps=40)
    adapted, adapted_policy = run(latency_model=model, lead=2, adapt_lead=True, max_steps=40)
    assert fixed.lead == 2 and adapted.lead == 5
    assert fixed_policy.started_at[:3] == adapted_policy.started_at[:3]  # the same until the slow chunk is back
    slow = adapted.chunks[2]
    next_start = adapted_policy.started_at[3]
    assert next_start == slow.arrival_tick + 8 - 5  # planned end (arrival + s) minus the adapted lead
    assert fixed_policy.started_at[3] == fixed.chunks[2].arrival_tick + 8 - 2


def test_blending_crossfades_from_what_the_previous_chunk_would_execute():
    # on time (lead 3, 150 ms): ticks 7, 8, 9 blend chunk 0's actions 7 (its plan), 8, 9 (past its plan, hold:
    # its last planned action, 7) into chunk 1's actions 2, 3, 4
    trace, _ = run(latency_model=constant_latency(150), lead=3, blend=3, max_steps=12)
    new = np.array([[1, 2], [1, 3], [1, 4]], np.float64)
    old = np.array([[0, 7], [0, 7], [0, 7]], np.float64)
    for j in range(3):
        w = (j + 1) / 4
        assert np.array_equal(trace.actions[7 + j], (1 - w) * old[j] + w * new[j])
    assert executed(trace)[10:12] == [(1, 5), (1, 6)]  # blend over
    # with on_late="continue" the previous chunk's own actions 8, 9 are the old ones
    trace, _ = run(latency_model=constant_latency(150), lead=3, blend=3, on_late="continue", max_steps=12)
    assert np.array_equal(trace.actions[8], 0.5 * np.array([0.0, 8.0]) + 0.5 * np.array([1.0, 3.0]))
    # late (lead 0, 250 ms, hold): from the held action
    trace, _ = run(latency_model=constant_latency(250), blend=2, max_steps=14)
    assert executed(trace)[8:11] == [(0, 7)] * 3
    held = np.array([0.0, 7.0])
    assert np.array_equal(trace.actions[11], (1 - 1 / 3) * held + (1 / 3) * np.array([1.0, 3.0]))
    assert np.array_equal(trace.actions[12], (1 - 2 / 3) * held + (2 / 3) * np.array([1.0, 4.0]))
    assert executed(trace)[13] == (1, 5)


def test_the_robot_waits_for_the_first_chunk():
    trace, _ = run(latency_model=constant_latency(150), max_steps=10)
    assert trace.first_wait_ticks == 2 and trace.time_to_first_action_s == pytest.approx(0.2)
    assert trace.chunks[0].delay_ticks == 0 and trace.sources[0] == (0, 0)  # nothing dropped: the env did not move
    assert trace.elapsed_s == pytest.approx((2 + trace.ticks) * 0.1)
    assert trace.achieved_hz == pytest.approx(10)  # the wait is reported on its own, not as a lower rate
    trace, _ = run(latency_model=constant_latency(0), max_steps=10)
    assert trace.first_wait_ticks == 0 and trace.time_to_first_action_s == 0 and trace.achieved_hz == pytest.approx(10)


def test_episodes_end_at_success_or_the_cap():
    trace, _ = run(env=counting_env(success_at=13), latency_model=constant_latency(0), max_steps=None)
    assert trace.success and trace.steps == 13
    trace, _ = run(env=counting_env(success_at=13), latency_model=constant_latency(0), max_steps=5)
    assert not trace.success and trace.steps == 5


def test_virtual_clock_runs_are_reproducible_with_a_latency_model():
    policy = tiny_policy(tasks=["reach"])
    env = make_vector_env("reach", 1, max_episode_steps=40, terminate_on_success=True)
    try:
        def once():
            return run_control_episode(policy, env, "reach", seed=7, control_hz=40, clock=VirtualClock(),
                                       generator=torch.Generator().manual_seed(7), lead="auto", blend=2,
                                       latency_model=sampled_latency([20, 45, 70, 130], seed=7))
        a, b = once(), once()
    finally:
        env.close()
    assert json.dumps(a.to_dict(actions=True)) == json.dumps(b.to_dict(actions=True))
    assert len({c.delay_ticks for c in a.chunks[1:]}) > 1  # the latencies varied
    model = sampled_latency([1, 2, 3], seed=4)
    assert [model(i) for i in (5, 0, 5)] == [model(5), model(0), model(5)]


# ------------------------------------------------------------------------------ the synchronous special case
def _run_wave_actions(policy, env, task, seed):
    recorded, step = [], env.step
    env.step = lambda action: (recorded.append(np.array(action)), step(action))[1]
    try:
        [result] = run_wave(policy, env, task, [seed], generator=torch.Generator().manual_seed(seed))
    finally:
        env.step = step
    return result, np.concatenate(recorded)


@pytest.mark.parametrize("seed", [3, 8])
def test_zero_latency_and_lead_0_is_the_synchronous_loop(seed):
    """The equivalence backbone: no latency, lead 0, s = n_action_steps executes what run_wave executes."""
    policy = tiny_policy(tasks=["push"])
    env = make_vector_env("push", 1, max_episode_steps=27, terminate_on_success=True)
    try:
        result, actions = _run_wave_actions(policy, env, "push", seed)
        trace = run_control_episode(policy, env, "push", seed=seed, control_hz=20, clock=VirtualClock(),
                                    generator=torch.Generator().manual_seed(seed), lead=0,
                                    latency_model=constant_latency(0))
    finally:
        env.close()
    assert (trace.success, trace.steps) == (result["success"], result["steps"]) == (False, 27)
    assert np.array_equal(trace.actions, actions)
    assert [c.start_tick for c in trace.chunks] == [0, 8, 16, 24] and trace.missed_ticks == []


def test_the_shipped_policy_succeeds_as_in_the_synchronous_loop():
    policy = DiffusionPolicy.load(SHIPPED).with_sampler("ddim", 10)
    env = make_control_env(policy, "reach", make_env=make_vector_env)
    try:
        result, actions = _run_wave_actions(policy, env, "reach", 100000)
        trace = run_control_episode(policy, env, "reach", seed=100000, control_hz=20,
                                    generator=torch.Generator().manual_seed(100000), lead=0,
                                    latency_model=constant_latency(0))
    finally:
        env.close()
    assert result["success"] and (trace.success, trace.steps) == (True, result["steps"])  # ends at its success
    assert np.array_equal(trace.actions, actions)


# ----------------------------------------------------------------------------------------- wall clock
def test_wall_clock_runs_inference_on_a_worker_thread():
    policy = tiny_policy(tasks=["reach"])
    calls, predict = [], policy.predict_action_chunk

    def recording(batch, generator=None, num_actions=None):
        calls.append(threading.get_ident())
        return predict(batch, generator=generator, num_actions=num_actions)

    policy.predict_action_chunk = recording
    env = make_vector_env("reach", 1, max_episode_steps=25, terminate_on_success=True)
    try:
        with WallClock() as clock:
            traces = [run_control_episode(policy, env, "reach", seed=s, control_hz=hz, clock=clock,
                                          generator=torch.Generator().manual_seed(s)) for s, hz in ((1, 50), (2, 100))]
    finally:
        env.close()
    for trace in traces:  # structural facts only: timings depend on the machine
        assert trace.clock == "wall" and trace.steps == trace.ticks == len(trace.actions) == 25
        assert len(trace.sources) == 25 and trace.sources[0] == (0, 0) and trace.chunks[0].delay_ticks == 0
        assert all(c.delay_ticks == c.arrival_tick - c.start_tick >= 0 for c in trace.chunks)
        assert 0 <= trace.lead <= trace.execute_steps and trace.elapsed_s > 0 and trace.time_to_first_action_s >= 0
        assert sum(c.executed for c in trace.chunks) + sum(i < 0 for _, i in trace.sources) == 25
        json.dumps(trace.to_dict(actions=True))
    assert calls and threading.get_ident() not in calls


def test_wall_clock_records_overruns():
    """An env step of 30 ms at 100 Hz overruns every tick (a sleep lasts at least as long as asked)."""
    with WallClock() as clock:
        trace, _ = run(env=counting_env(step_sleep=0.03), clock=clock, control_hz=100, max_steps=4)
    assert trace.overrun_ticks == [0, 1, 2, 3]


# ------------------------------------------------------------------------------- cameras, instructions
def test_cameras_are_rendered_only_when_an_inference_is_submitted():
    policy = FakePolicy(state_dim=39, action_dim=4, cameras=("corner3",))
    env = make_vector_env("reach", 1, max_episode_steps=20, terminate_on_success=True, width=16, height=16)
    renders, call = [], env.call
    env.call = lambda name, *args: (renders.append(name) if name == "render_camera" else None, call(name, *args))[1]
    try:
        trace, _ = run(policy, env, latency_model=constant_latency(0), max_steps=20)
    finally:
        env.close()
    assert len(policy.calls) == 3 and renders == ["render_camera"] * 3
    assert all(c["batch"]["observation.images.corner3"].shape == (1, 3, 16, 16) for c in policy.calls)
    assert policy.calls[0]["batch"]["task"] == ["fake"]


def test_instructions_as_run_wave_asks_for_them():
    policy = FakePolicy(reads_instructions=True)
    with pytest.raises(ConfigError, match="reads free-text instructions"):
        run(policy)
    run(policy, instruction="open the door", max_steps=3)
    assert policy.calls[0]["batch"]["task"] == ["open the door"]
    with pytest.raises(ConfigError, match="reads task names"):
        run(instruction="open the door")


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("settings, message", [
    ({"control_hz": 0}, "control_hz must be a positive number"),
    ({"control_hz": -5}, "control_hz must be a positive number"),
    ({"control_hz": float("nan")}, "control_hz must be a positive number"),
    ({"execute_steps": 17}, r"execute_steps .*horizon is 16.* must be an integer in \[1, 16\], got 17"),
    ({"execute_steps": 0}, r"execute_steps .* in \[1, 16\], got 0"),
    ({"on_late": "skip"}, r"on_late must be one of \('hold', 'continue'\), got 'skip'"),
    ({"lead": 9}, r"lead .* in \[0, 8\], got 9"),
    ({"lead": "soon"}, r"lead .* got 'soon'"),
    ({"blend": -1}, r"blend .* in \[0, 16\], got -1"),
    ({"max_steps": 0}, r"max_steps must be an integer in \[1, "),
    ({"latency_model": lambda i: -1.0}, r"latency_model\(0\) gave -1.0"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        run(**settings)


def test_env_and_clock_misuse_is_refused():
    with pytest.raises(ConfigError, match="a vector env of 1 env"):
        run(env=gym.vector.SyncVectorEnv([CountingEnv, CountingEnv]))
    with pytest.raises(ValueError, match="'observation.state' is \\[5\\]"):
        run(FakePolicy(state_dim=5))
    with WallClock() as clock, pytest.raises(ConfigError, match="latency_model needs a VirtualClock"):
        run(clock=clock, latency_model=constant_latency(1))


def test_predict_action_chunk_returns_the_first_num_actions():
    policy = tiny_policy()
    batch = {"observation.state": torch.randn(2, 2, 39, generator=torch.Generator().manual_seed(0)),
             "task": ["push", "reach"]}

    def chunk(**kw):
        return policy.predict_action_chunk(batch, generator=torch.Generator().manual_seed(1), **kw)

    default, full = chunk(), chunk(num_actions=16)
    assert default.shape == (2, 8, 4) and full.shape == (2, 16, 4)
    assert torch.equal(full[:, :8], default) and torch.equal(chunk(num_actions=3), default[:, :3])
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ConfigError, match=r"num_actions must be an integer in \[1, horizon=16\]"):
            chunk(num_actions=bad)


# -------------------------------------------------------------------------------------------- summary
def test_summary_leaves_out_warm_up_and_says_when_p99_is_the_largest():
    traces = [run(latency_model=constant_latency(250), max_steps=24)[0],
              run(latency_model=sampled_latency([10, 20, 30, 40, 500], seed=1), max_steps=40)[0]]
    summary = summarize_runs(traces)
    kept = sorted(l for t in traces for l in t.latencies_ms[1:])
    lat = summary["latency_ms"]
    assert lat["samples"] == len(kept) < 20 and lat["p99"] == lat["max"] == kept[-1]
    assert lat["p50"] == kept[-(-len(kept) // 2) - 1]  # nearest rank: an observed sample
    assert f"p99 of {len(kept)} samples = the largest" in summary["notes"]
    assert summary["missed_ticks"] == sum(len(t.missed_ticks) for t in traces)
    assert summary["late_chunks"] == sum(t.late_chunks for t in traces)
    assert summary["ticks"] == 64 and summary["episodes"] == 2 and summary["success_rate"] == 0
    assert summary["achieved_hz"] == pytest.approx(64 / sum(t.elapsed_s - t.time_to_first_action_s for t in traces))
    assert summary["mean_delay_ticks"] == pytest.approx(np.mean([d for t in traces for d in t.delays[1:]]))
    assert summarize_runs([t.to_dict() for t in traces]) == summary  # from the JSON form too
    json.dumps(summary)
    assert "late chunks" in format_summary(summary)
    everything = summarize_runs(traces, warmup_chunks=0)
    assert everything["latency_ms"]["samples"] == lat["samples"] + 2
    big = summarize_runs([run(latency_model=constant_latency(0), lead=8, max_steps=120)[0]])
    assert big["latency_ms"]["samples"] >= 100 and not big["notes"]


def test_trace_is_plain_data():
    trace, _ = run(latency_model=constant_latency(250), max_steps=12)
    assert isinstance(trace, EpisodeTrace)
    row = json.loads(json.dumps(trace.to_dict()))
    assert row["missed_ticks"] == [8, 9, 10] and row["late_chunks"] == 1 and "actions" not in row
    assert row["latencies_ms"] == [250.0, 250.0] and row["delays"] == [0, 3] and row["achieved_hz"] > 0
