"""Real-time chunking in the evaluator: an ``rtc`` block is parsed and checked up front, runs in
``mode=realtime`` (guided calls counted, seams measured), and is refused where it cannot run."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bac.configs import CONFIG_DIR
from bac.evaluation.realtime import run_realtime
from bac.evaluation.run import run
from bac.evaluation.settings import EvalError
from bac.evaluation.variants import parse_variants


def config(checkpoint, out, *extra):
    overrides = ["methods=rtc", f"checkpoint={checkpoint}", "tasks=[reach]", "episodes=1", "num_envs=1",
                 "max_episode_steps=24", "latency.repeats=2", "latency.warmup=1", f"out_dir={out}", "progress=false",
                 f"plan_cache={Path(checkpoint).parent / 'plans'}", "run_methods=[ddim4,ddim4-rtc]", "mode=realtime",
                 "realtime.control_hz=[20]", "realtime.latency_ms=120", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_realtime_runs_an_rtc_variant_with_guided_calls(tiny_checkpoint, tmp_path):
    report = run_realtime(config(tiny_checkpoint, tmp_path / "rt"))
    methods = report["rates"]["20"]
    plain, guided = methods["ddim4"], methods["ddim4-rtc"]
    assert guided["config"]["rtc"] == {"max_guidance": 5.0} and "rtc" not in plain["config"]
    calls = guided["control"]["warm"]
    assert calls["guided_calls"] == calls["calls"] - 1 > 0  # every call after the episode's first continues one
    assert "warm" not in plain["control"]
    for entry in (plain, guided):
        assert entry["control"]["smoothness"]["seams"] > 0


@pytest.mark.parametrize("block,message", [
    ("{sampler: ddim, steps: 4, rtc: 5}", "rtc must be"),
    ("{sampler: ddim, steps: 4, rtc: {beta: 5}}", "rtc must be"),
    ("{sampler: ddim, steps: 4, rtc: {max_guidance: -1}}", "max_guidance must be"),
    ("{sampler: ddim, steps: 4, warm: {start: 2, variant: checked, threshold: 1}, rtc: {}}", "plain warm starts"),
    ("{budget: {latency_ms: 40}, rtc: {}}", "drop rtc"),
])
def test_a_bad_rtc_block_is_refused_before_any_work_naming_the_method(tiny_checkpoint, tmp_path, block, message):
    out = tmp_path / "out"
    with pytest.raises(EvalError, match="methods.odd: method 'odd'") as err:
        run_realtime(config(tiny_checkpoint, out, f"+methods.odd={block}", "run_methods=[ddim4,odd]"))
    assert message in str(err.value)
    assert not out.exists()


def test_rtc_is_refused_in_the_closed_loop_and_as_a_whole_call_graph(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EvalError, match="is for mode=realtime"):
        run(config(tiny_checkpoint, out, "mode=closed_loop"))
    with pytest.raises(EvalError, match="guided steps run eagerly"):
        run_realtime(config(tiny_checkpoint, out, "compile=whole"))
    assert not out.exists()


def test_an_rtc_variant_describes_its_setting():
    (variant,) = parse_variants({"r": {"sampler": "ddim", "steps": 4, "rtc": {"max_guidance": 2.5}}}, [], "ddpm", 100)
    assert variant.describe() == {"sampler": "ddim", "steps": 4, "cache": None, "rtc": {"max_guidance": 2.5}}
    assert variant.rtc.max_guidance == 2.5 and variant.warm is None
