"""mode=realtime's lead=auto from a warm-up of in-loop calls: sized by them, recorded, kept on resume; none under a
modelled latency or with realtime.warmup_calls=0."""
import hashlib
import json
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bac.evaluation.realtime as realtime
from bac.configs import CONFIG_DIR
from bac.envs.metaworld_env import make_vector_env
from bac.evaluation.provenance import settings_digest
from bac.evaluation.realtime import (LEADS_FILE, MAX_WARMUP_CALLS, check_realtime_settings, realtime_digest,
                                     run_realtime, warm_up)
from bac.evaluation.settings import EvalError
from bac.policies.policy import DiffusionPolicy
from bac.runtime import EnvPool, auto_lead, make_control_env

SLOW_MS = 80.0  # an in-loop call at least this slow: 3.2 ticks at 40 Hz, so a lead of at least 5


def config(checkpoint, out, *extra):
    """One method at 40 Hz on measured latency (no realtime.latency_ms), a warm-up of 4 calls."""
    overrides = [
        f"checkpoint={checkpoint}", "mode=realtime", "methods=realtime", "run_methods=[full]", "tasks=[reach]",
        "episodes=2", "max_episode_steps=24", "sampler.steps=4", "latency.repeats=2", "latency.warmup=0",
        f"out_dir={out}", "progress=false", f"plan_cache={Path(checkpoint).parent / 'plans'}",
        "realtime.control_hz=[40]", "realtime.warmup_calls=4", "realtime.adapt_lead=false", *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


@pytest.fixture
def batch1_ms(monkeypatch):
    """The batch-1 benchmark before the episodes reports every call at 1 ms (a lead of 2 at 40 Hz)."""
    def measured(policy, variants, *args, **kwargs):
        return {v.name: [1e-3] * 2 for v in variants}

    monkeypatch.setattr(realtime, "measure_latency", measured)


@pytest.fixture
def slow_calls(monkeypatch):
    """Every policy call in the loop takes at least SLOW_MS (the batch-1 benchmark, patched above, does not)."""
    call = DiffusionPolicy.predict_action_chunk

    def slow(self, *args, **kwargs):
        time.sleep(SLOW_MS / 1e3)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionPolicy, "predict_action_chunk", slow)


def no_warm_up(*args, **kwargs):
    raise AssertionError("a warm-up ran")


def episodes(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]


def old_digest(cfg) -> str:
    """realtime_digest before realtime.warmup_calls existed."""
    block = OmegaConf.to_container(cfg.realtime, resolve=True)
    del block["warmup_calls"]
    extra = json.dumps(block, sort_keys=True)
    return hashlib.sha256(f"{settings_digest(cfg)}|realtime|{extra}".encode()).hexdigest()[:10]


def test_slow_in_loop_calls_raise_the_lead_the_batch1_latency_gives(tiny_checkpoint, tmp_path, batch1_ms,
                                                                     slow_calls):
    cfg = config(tiny_checkpoint, tmp_path / "run")
    report = run_realtime(cfg)
    entry = report["rates"]["40"]["full"]
    warmup = entry["warmup"]
    assert warmup["latency"]["repeats"] == 4 and warmup["latency"]["max_ms"] >= SLOW_MS
    assert entry["lead"] == warmup["lead"] == auto_lead([warmup["latency"]["max_ms"]], 40.0, 8)
    assert entry["lead"] >= 5 > auto_lead([1.0], 40.0, 8)  # the batch-1 samples alone would give 2
    assert {e["lead"] for e in episodes(tmp_path / "run")} == {entry["lead"]}  # adapt_lead=false: as started
    recorded = json.loads((tmp_path / "run" / LEADS_FILE).read_text())
    assert recorded["rates"]["40"]["full"] == {"lead": entry["lead"], "warmup": warmup}
    # a warm-up run is another run than one sized by the batch-1 latency
    assert realtime_digest(cfg) != old_digest(cfg)
    # the report's new figures
    assert set(entry["control"]["smoothness"]) >= {"seam_jump_mean", "seam_jump_p95", "jerk_mean", "jerk_p95"}
    assert "steps_to_success" in entry["control"]
    table = (tmp_path / "run" / "report.md").read_text()
    assert "seam jump mean / p95 | jerk mean / p95 | steps to success |" in table
    assert "in-loop calls of a warm-up" in table


@pytest.mark.parametrize("overrides", [["realtime.warmup_calls=0"], ["realtime.latency_ms=30"],
                                       ["realtime.lead=3"]], ids=["no warm-up", "modelled", "lead set"])
def test_without_a_warm_up_the_leads_and_digest_are_todays(tiny_checkpoint, tmp_path, monkeypatch, overrides):
    """The batch-1 benchmark (30 ms: 2.2 ticks), the modelled latency or the setting give the lead, as before the
    warm-up existed; the run's digest is the one it had then."""
    monkeypatch.setattr(realtime, "measure_latency", lambda policy, variants, *a, **k: {v.name: [0.03, 0.02]
                                                                                         for v in variants})
    monkeypatch.setattr(realtime, "warm_up", no_warm_up)
    cfg = config(tiny_checkpoint, tmp_path, "episodes=1", *overrides)
    report = run_realtime(cfg)
    entry = report["rates"]["40"]["full"]
    assert entry["lead"] == auto_lead([30.0], 40.0, 8) == 3 and entry["warmup"] is None
    assert realtime_digest(cfg) == old_digest(cfg)
    if "realtime.warmup_calls=0" not in overrides:  # there warmup_calls changes nothing: nor the digest
        assert realtime_digest(config(tiny_checkpoint, tmp_path, "episodes=1", *overrides,
                                      "realtime.warmup_calls=9")) == realtime_digest(cfg)


def test_a_resumed_run_keeps_the_leads_recorded_when_it_began(tiny_checkpoint, tmp_path, batch1_ms, monkeypatch):
    out = tmp_path / "run"
    run_realtime(config(tiny_checkpoint, out))
    logged = (out / "episodes.jsonl").read_text().splitlines()
    # the run stopped after its first episode; its record says lead 7 (what a slower host measured)
    (out / "episodes.jsonl").write_text(logged[0] + "\n")
    record = json.loads((out / LEADS_FILE).read_text())
    record["rates"]["40"]["full"]["lead"] = 7
    (out / LEADS_FILE).write_text(json.dumps(record))
    monkeypatch.setattr(realtime, "warm_up", no_warm_up)  # resumed: nothing measured again
    report = run_realtime(config(tiny_checkpoint, out))
    assert report["rates"]["40"]["full"]["lead"] == 7
    resumed = episodes(out)
    assert json.dumps(resumed[0]) == logged[0] and resumed[1]["lead"] == 7  # adapt_lead=false: the lead it began with


@pytest.mark.parametrize("change, message", [
    (lambda r: r["rates"].pop("40"), "KeyError"),
    (lambda r: r["rates"]["40"]["full"].update(lead=9), "lead 9 of full at 40 Hz is not in [0, 8]"),
    (lambda r: r["rates"]["40"]["full"].update(lead="auto"), "lead 'auto'"),
], ids=["a rate missing", "lead over execute_steps", "lead not an integer"])
def test_a_leads_record_that_is_not_this_runs_is_refused(tiny_checkpoint, tmp_path, batch1_ms, change, message):
    out = tmp_path / "run"
    run_realtime(config(tiny_checkpoint, out, "episodes=1"))
    record = json.loads((out / LEADS_FILE).read_text())
    change(record)
    (out / LEADS_FILE).write_text(json.dumps(record))
    with pytest.raises(EvalError, match="does not hold this run's leads") as err:
        run_realtime(config(tiny_checkpoint, out, "episodes=1"))
    assert message in str(err.value) and "delete it" in str(err.value)


def test_the_warm_up_needs_calls_after_each_episodes_first_chunk(tiny_checkpoint):
    """One-step episodes have only the chunk the robot waits for: nothing sizes the lead, and the error says so."""
    policy = DiffusionPolicy.load(tiny_checkpoint).with_sampler("ddim", 2)
    with EnvPool(make_vector_env) as pool:
        def env_for(task):
            return make_control_env(policy, task, pool=pool, max_episode_steps=1)

        with pytest.raises(EvalError, match="no policy call after their first chunk"):
            warm_up(policy, env_for, ["reach"], range(2), 5, control_hz=40, execute_steps=8)
        asked = []

        def recorded_env_for(task):
            asked.append(task)
            return make_control_env(policy, task, pool=pool)

        warmup = warm_up(policy, recorded_env_for, tasks=["reach", "push"], seeds=range(10), calls=5, control_hz=40,
                         execute_steps=8, max_steps=24)
    assert len(warmup.latencies_ms) == 5 and warmup.lead == auto_lead(warmup.latencies_ms, 40, 8)
    # each task its share of the calls, one after the other (a pooled env built once per task)
    assert asked == sorted(asked, key=["reach", "push"].index) and set(asked) == {"reach", "push"}


@pytest.mark.parametrize("value, shown", [("-1", "got -1"), ("2.5", "got 2.5"), ("many", "'many'"),
                                          ("true", "got True"), ("null", "got None"),
                                          (str(MAX_WARMUP_CALLS + 1), f"got {MAX_WARMUP_CALLS + 1}")])
def test_a_bad_warmup_calls_is_a_clear_error(value, shown):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["mode=realtime", f"realtime.warmup_calls={value}"])
    with pytest.raises(EvalError) as err:
        check_realtime_settings(cfg)
    assert f"realtime.warmup_calls must be an integer in [0, {MAX_WARMUP_CALLS}]" in str(err.value)
    assert shown in str(err.value)


@pytest.mark.parametrize("value", [0, MAX_WARMUP_CALLS])
def test_warmup_calls_within_bounds_pass(value):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        check_realtime_settings(compose(config_name="eval", overrides=[f"realtime.warmup_calls={value}"]))
