"""python -m bac.eval mode=realtime: methods at fixed control rates, paired, resumable, reproducible."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import bac
import bac.evaluation.realtime as realtime
from bac.configs import CONFIG_DIR
from bac.evaluation.realtime import realtime_digest, run_realtime
from bac.evaluation.settings import EvalError, output_dir
from bac.runtime import auto_lead

@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def config(checkpoint, out, *extra):
    overrides = [
        f"checkpoint={checkpoint}", "mode=realtime", "methods=realtime", "tasks=[reach]", "episodes=2",
        "max_episode_steps=24", "sampler.steps=6", "M=2", "n=2", "calibration.samples=4", "calibration.episodes=3",
        "latency.repeats=3", "latency.warmup=1", f"out_dir={out}", "progress=false",
        f"plan_cache={Path(checkpoint).parent / 'plans'}", "realtime.control_hz=[20,40]", "realtime.latency_ms=60",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_every_method_at_every_rate_paired_with_a_budget_plan_per_rate(checkpoint, tmp_path):
    report = run_realtime(config(checkpoint, tmp_path / "a"))
    assert list(report["rates"]) == ["20", "40"]
    for rate, methods in report["rates"].items():
        assert list(methods) == ["full", "ddim", "bac", "budget"]
        for name, entry in methods.items():
            control = entry["control"]
            assert control["episodes"] == 2 and entry["success"]["episodes"] == 2
            assert control["latency_ms"]["p50"] == 60.0  # the modelled latency
            # 60 ms is 2 ticks at 20 Hz, 3 at 40 Hz: each chunk arrives that many ticks after its observation
            assert control["mean_delay_ticks"] == {"20": 2, "40": 3}[rate]
            assert control["achieved_hz"] == pytest.approx(float(rate))  # a virtual clock never overruns
            if name != "full":
                assert entry["paired_vs_full"]["pairs"] == 2
        budget = methods["budget"]["budget"]
        assert budget["budget_ms"] == pytest.approx(0.5 * 8 * 1000 / float(rate))  # 8 actions at the rate, half
        assert budget["target"] == {"control_hz": "target", "n": 2}
    out = tmp_path / "a"
    assert (out / "realtime.png").exists() and "## 40 Hz" in (out / "report.md").read_text()
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 4  # seeds x rates x methods
    # resumed: nothing repeated; and a modelled latency makes the whole run reproducible, byte for byte
    run_realtime(config(checkpoint, tmp_path / "a"))
    assert (out / "episodes.jsonl").read_text().splitlines() == lines
    run_realtime(config(checkpoint, tmp_path / "b"))
    assert (tmp_path / "b" / "episodes.jsonl").read_text().splitlines() == lines


def test_a_modelled_run_derives_nothing_from_the_machines_timing(checkpoint, tmp_path, monkeypatch):
    """A host 100 times slower (latency measured before the episodes) and no plan timer at all: the same episodes,
    leads from the modelled latency, budget plans from the modelled cost."""
    lines = _episodes_of(run_realtime(config(checkpoint, tmp_path / "here")))
    measure = realtime.measure_latency

    def slow_host(*args, **kwargs):
        return {name: [100 * s for s in samples] for name, samples in measure(*args, **kwargs).items()}

    def no_timer(*args, **kwargs):
        raise AssertionError("a modelled run timed a plan")

    monkeypatch.setattr(realtime, "measure_latency", slow_host)
    monkeypatch.setattr(bac, "plan_timer", no_timer)
    report = run_realtime(config(checkpoint, tmp_path / "loaded"))
    assert _episodes_of(report) == lines
    for rate, methods in report["rates"].items():
        for entry in methods.values():
            assert entry["lead"] == auto_lead([60.0], float(rate), 8)
        budget = methods["budget"]["budget"]
        assert budget["cost"]["source"] == "modelled" and budget["measured_ms"] is None
        assert budget["computed_share"] == 1.0  # every call takes 60 ms whatever it skips: the budget buys all of it


def _episodes_of(report: dict) -> list[str]:
    return (Path(report["out_dir"]) / "episodes.jsonl").read_text().splitlines()


def test_a_budget_below_the_modelled_latency_is_refused_before_any_episode(checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EvalError, match=r"method 'budget': its budget of 100 ms is below the modelled latency "
                                        r"realtime.latency_ms=400"):
        run_realtime(config(checkpoint, out, "realtime.control_hz=[40]", "realtime.latency_ms=400"))
    assert not (out / "episodes.jsonl").exists()


def test_a_chunk_slower_than_its_deadline_misses_ticks(checkpoint, tmp_path):
    """400 ms for 8 actions at 40 Hz (200 ms): every chunk after the first is late."""
    report = run_realtime(config(checkpoint, tmp_path, "realtime.control_hz=[40]", "realtime.latency_ms=400",
                                 "run_methods=[full]", "realtime.on_late=hold"))
    control = report["rates"]["40"]["full"]["control"]
    assert control["missed_ticks"] > 0 and control["late_chunks"] > 0 and control["mean_delay_ticks"] == 16


@pytest.mark.parametrize("overrides, message", [
    (["realtime.clock=sundial"], "realtime.clock"),
    (["realtime.control_hz=[]"], "control_hz"),
    (["realtime.control_hz=[0]"], "control_hz"),
    (["realtime.clock=wall"], "needs realtime.clock=virtual"),
    (["realtime.lead=soon"], "realtime.lead"),
])
def test_bad_realtime_settings_are_refused_before_any_work(checkpoint, tmp_path, overrides, message):
    with pytest.raises(EvalError, match=message):
        run_realtime(config(checkpoint, tmp_path, *overrides))


def test_the_entry_point_runs_the_mode_and_refuses_an_unknown_one(checkpoint, tmp_path):
    args = [sys.executable, "-m", "bac.eval", f"checkpoint={checkpoint}", "mode=sometimes", f"out_dir={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "mode must be closed_loop or realtime" in result.stderr


def test_auto_out_dir_is_not_the_closed_loop_runs(checkpoint, tmp_path):
    cfg = config(checkpoint, "auto")
    realtime = output_dir(cfg, "realtime", realtime_digest(cfg))
    assert realtime.parts[:2] == ("outputs", "realtime") and realtime != output_dir(cfg)
    faster = config(checkpoint, "auto", "realtime.control_hz=[50]")
    assert output_dir(faster, "realtime", realtime_digest(faster)) != realtime  # another rate is another run
