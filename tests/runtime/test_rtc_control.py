"""Real-time chunking in the control loop: each call freezes the ticks its chunk will take (from the modelled
latency, else the recent chunks'), the frozen actions are the running chunk's, and traces measure the seams."""
import math

import numpy as np
import pytest
import torch

from bac.envs.metaworld_env import make_vector_env
from bac.runtime.control import DELAY_WINDOW, constant_latency, run_control_episode, smoothness, summarize_runs

from .test_server import tiny_policy
from .test_warm_runtime import recording

pytestmark = pytest.mark.usefixtures("one_thread")


def rtc_episode(policy, latency_model=None, steps=40):
    calls = recording(policy)
    returned, predict = [], policy.predict_action_chunk

    def keep(batch, **kwargs):
        returned.append(predict(batch, **kwargs)[0].numpy())
        return torch.from_numpy(returned[-1])[None]
    policy.predict_action_chunk = keep
    env = make_vector_env("push", 1, max_episode_steps=steps, terminate_on_success=True)
    try:
        trace = run_control_episode(policy, env, "push", seed=5, control_hz=20, on_late="continue",
                                    generator=torch.Generator().manual_seed(5), latency_model=latency_model)
    finally:
        env.close()
    return trace, calls, returned


def test_each_call_freezes_the_ticks_of_its_modelled_latency():
    trace, calls, chunks = rtc_episode(tiny_policy(3).with_rtc(), constant_latency(120))  # 2.4 ticks at 20 Hz
    assert [c["kwargs"]["delay"] for c in calls] == [3] * len(calls)
    assert all(c.delay_ticks == 3 for c in trace.chunks[1:])
    assert trace.warm["guided_calls"] == trace.warm["calls"] - 1  # the first call has no chunk to continue
    for k in range(1, len(chunks)):
        shift = calls[k]["kwargs"]["shift"]
        assert np.array_equal(chunks[k][:3], chunks[k - 1][shift:shift + 3])  # the frozen prefix, unchanged
    # the ticks the chunk took ran the old chunk: what executed at a takeover's tick came from the new chunk's index 3
    assert all(index == 3 for (chunk, index), before in zip(trace.sources[1:], trace.sources) if chunk != before[0])


def test_without_a_latency_model_the_delay_is_the_slowest_recent_chunks():
    trace, calls, _ = rtc_episode(tiny_policy(3).with_rtc())
    latencies = [c.latency_ms for c in trace.chunks]
    expected = [0] + [math.ceil(max(latencies[max(0, k - DELAY_WINDOW):k]) / 1e3 * 20 - 1e-9)
                      for k in range(1, len(latencies))]
    assert [c["kwargs"]["delay"] for c in calls[:len(latencies)]] == expected


def test_smoothness_measures_takeover_jumps_and_the_second_difference():
    actions = np.array([[0.0], [1.0], [2.0], [5.0], [6.0], [6.0]])
    sources = [(0, 0), (0, 1), (0, 2), (1, 1), (1, -1), (2, 0)]  # takeovers at ticks 3 and 5 (tick 4 held)
    seams, jerk = smoothness(actions, sources)
    assert seams == [3.0, 0.0]
    second = np.array([0.0, 2.0, 2.0, 1.0])  # |a[t+1] - 2 a[t] + a[t-1]|
    assert jerk == {"mean": pytest.approx(second.mean()), "p95": pytest.approx(np.percentile(second, 95)), "ticks": 4}


def test_summaries_pool_the_seams_and_average_the_steps_to_success():
    rows = [{"success": True, "steps": 10, "seam_jumps": [1.0, 3.0], "jerk": {"mean": 1.0, "p95": 2.0, "ticks": 8},
             "ticks": 10, "elapsed_s": 1.0, "time_to_first_action_s": 0.1, "control_hz": 20.0, "chunks": [],
             "missed_ticks": [], "overrun_ticks": []},
            {"success": False, "steps": 30, "seam_jumps": [2.0], "jerk": {"mean": 4.0, "p95": 6.0, "ticks": 24},
             "ticks": 30, "elapsed_s": 2.0, "time_to_first_action_s": 0.1, "control_hz": 20.0, "chunks": [],
             "missed_ticks": [], "overrun_ticks": []}]
    summary = summarize_runs(rows)
    assert summary["steps_to_success"] == 10.0
    assert summary["smoothness"] == {"seams": 3, "seam_jump_mean": 2.0, "seam_jump_p95": 3.0,
                                     "jerk_mean": (8 * 1.0 + 24 * 4.0) / 32, "jerk_p95": 4.0}
