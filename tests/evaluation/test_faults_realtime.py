"""Faults in the ``realtime.*`` settings of ``mode=realtime``: each one a clear EvalError naming the setting and
the value, before any work (no traceback, no episode, no run folder)."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bac.configs import CONFIG_DIR
from bac.evaluation.realtime import MAX_CONTROL_HZ, MAX_LATENCY_MS, MAX_RATES, check_realtime_settings, run_realtime
from bac.evaluation.settings import EvalError


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=["mode=realtime", *overrides])


def raises_eval_error(call, *fragments):
    """``call()`` raises exactly EvalError, its message holding every fragment."""
    with pytest.raises(EvalError) as err:
        call()
    assert type(err.value) is EvalError, f"{type(err.value).__name__}: {err.value}"
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


TOO_MANY_RATES = "[" + ",".join(str(r) for r in range(1, MAX_RATES + 2)) + "]"

SETTING_FAULTS = {
    # a scalar where a list is expected (a traceback before): the fix is in the message
    "control_hz scalar": (["realtime.control_hz=10"],
                          ["realtime.control_hz must be a list", "realtime.control_hz=[10]"]),
    "control_hz null": (["realtime.control_hz=null"], ["realtime.control_hz must be a list", "None"]),
    "control_hz empty": (["realtime.control_hz=[]"], ["realtime.control_hz must list 1 to"]),
    "control_hz too many": ([f"realtime.control_hz={TOO_MANY_RATES}"],
                            [f"1 to {MAX_RATES} rates, got {MAX_RATES + 1}"]),
    "control_hz zero": (["realtime.control_hz=[0]"], ["realtime.control_hz", "got 0"]),
    "control_hz negative": (["realtime.control_hz=[20,-5]"], ["realtime.control_hz", "got -5"]),
    "control_hz over bound": ([f"realtime.control_hz=[{2 * MAX_CONTROL_HZ:g}]"], [f"(0, {MAX_CONTROL_HZ:g}] Hz"]),
    "control_hz text": (["realtime.control_hz=[20,fast]"], ["realtime.control_hz", "'fast'"]),
    "control_hz boolean": (["realtime.control_hz=[true]"], ["realtime.control_hz", "True"]),
    "control_hz nan": (["realtime.control_hz=[nan]"], ["realtime.control_hz", "nan"]),
    "control_hz repeated": (["realtime.control_hz=[20,40,20.0]"], ["lists 20 Hz twice"]),
    "clock unknown": (["realtime.clock=sundial"], ["realtime.clock must be one of", "'sundial'"]),
    "clock list": (["realtime.clock=[virtual]"], ["realtime.clock must be one of"]),
    "latency_ms text": (["realtime.latency_ms=slow"], ["realtime.latency_ms", "'slow'"]),
    "latency_ms negative": (["realtime.latency_ms=-1"], ["realtime.latency_ms", "got -1"]),
    "latency_ms nan": (["realtime.latency_ms=nan"], ["realtime.latency_ms", "got nan"]),
    "latency_ms inf": (["realtime.latency_ms=inf"], ["realtime.latency_ms", "got inf"]),
    "latency_ms boolean": (["realtime.latency_ms=true"], ["realtime.latency_ms", "got True"]),
    "latency_ms over bound": ([f"realtime.latency_ms={2 * MAX_LATENCY_MS:g}"], [f"[0, {MAX_LATENCY_MS:g}]"]),
    "latency_ms on a wall clock": (["realtime.latency_ms=60", "realtime.clock=wall"],
                                   ["needs realtime.clock=virtual"]),
    "on_late unknown": (["realtime.on_late=sometimes"], ["realtime.on_late must be one of", "'sometimes'"]),
    "on_late list": (["realtime.on_late=[hold]"], ["realtime.on_late must be one of"]),
    "adapt_lead text": (["realtime.adapt_lead=maybe"], ["realtime.adapt_lead must be true or false", "'maybe'"]),
    "blend negative": (["realtime.blend=-1"], ["realtime.blend must be an integer >= 0", "got -1"]),
    "blend fraction": (["realtime.blend=1.5"], ["realtime.blend", "got 1.5"]),
    "blend boolean": (["realtime.blend=true"], ["realtime.blend", "got True"]),
    "execute_steps zero": (["realtime.execute_steps=0"], ["realtime.execute_steps must be null or an integer >= 1"]),
    "execute_steps text": (["realtime.execute_steps=all"], ["realtime.execute_steps", "'all'"]),
    "lead text": (["realtime.lead=soon"], ["realtime.lead must be auto or an integer >= 0", "'soon'"]),
    "lead negative": (["realtime.lead=-2"], ["realtime.lead", "got -2"]),
    "lead fraction": (["realtime.lead=2.5"], ["realtime.lead", "got 2.5"]),
    "lead over execute_steps": (["realtime.lead=5", "realtime.execute_steps=4"],
                                ["realtime.lead=5 is over realtime.execute_steps=4"]),
    "unknown setting": (["+realtime.leed=3"], ["unknown setting realtime.leed", "lead"]),
    "block not a block": (["realtime=null"], ["realtime must be the block of settings"]),
}


@pytest.mark.parametrize("overrides, fragments", list(SETTING_FAULTS.values()), ids=list(SETTING_FAULTS))
def test_a_bad_realtime_setting_is_a_clear_error(overrides, fragments):
    raises_eval_error(lambda: check_realtime_settings(config(*overrides)), *fragments)


@pytest.mark.parametrize("overrides", [
    [], ["realtime.control_hz=[7.5,20]", "realtime.latency_ms=0"], ["realtime.clock=wall", "realtime.lead=0"],
    ["realtime.execute_steps=4", "realtime.lead=4", "realtime.blend=2", "realtime.on_late=hold"],
    [f"realtime.control_hz=[{MAX_CONTROL_HZ:g}]", f"realtime.latency_ms={MAX_LATENCY_MS:g}"],
])
def test_good_realtime_settings_pass(overrides):
    check_realtime_settings(config(*overrides))


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def run_config(checkpoint, out, *overrides):
    return config(f"checkpoint={checkpoint}", "methods=realtime", "run_methods=[full]", "tasks=[reach]", "episodes=1",
                  "max_episode_steps=8", "sampler.steps=4", "latency.repeats=1", "latency.warmup=0", f"out_dir={out}",
                  "progress=false", f"plan_cache={Path(checkpoint).parent / 'plans'}", "realtime.control_hz=[20]",
                  *overrides)


# the tiny checkpoint: horizon 16, n_action_steps 8
POLICY_FAULTS = {
    "execute_steps over the horizon": (["realtime.execute_steps=17"],
                                       ["realtime.execute_steps=17 is over the policy's horizon of 16"]),
    "blend over the horizon": (["realtime.blend=17"], ["realtime.blend=17 is over the policy's horizon of 16"]),
    "lead over n_action_steps": (["realtime.lead=9"], ["realtime.lead=9 is over the 8 actions planned per chunk"]),
}


@pytest.mark.parametrize("overrides, fragments", list(POLICY_FAULTS.values()), ids=list(POLICY_FAULTS))
def test_a_setting_over_the_policys_horizon_is_refused_before_any_episode(checkpoint, tmp_path, overrides, fragments):
    out = tmp_path / "run"
    raises_eval_error(lambda: run_realtime(run_config(checkpoint, out, *overrides)), *fragments)
    assert not out.exists()  # refused before the run's folder (and any episode) was made


def test_the_entry_point_reports_a_scalar_rate_in_one_line(checkpoint, tmp_path):
    args = [sys.executable, "-m", "bac.eval", f"checkpoint={checkpoint}", "mode=realtime", "realtime.control_hz=10",
            f"out_dir={tmp_path / 'run'}"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "realtime.control_hz=[10]" in result.stderr
    assert not (tmp_path / "run").exists()
