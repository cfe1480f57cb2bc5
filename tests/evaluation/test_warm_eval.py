"""Warm-started variants in the evaluator: parsed and checked up front, run closed loop, their calls counted
(and kept across a resumed run), latency and FLOPs per call between the cold and the warm call."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bac.evaluation.closed_loop as closed_loop
from bac.configs import CONFIG_DIR
from bac.evaluation.provenance import settings_digest
from bac.evaluation.run import run
from bac.evaluation.settings import EvalError
from bac.evaluation.variants import parse_variants

REPO = Path(__file__).resolve().parents[2]


def config(checkpoint, out, *extra):
    overrides = ["methods=warm", f"checkpoint={checkpoint}", "tasks=[reach]", "episodes=3", "num_envs=2",
                 "max_episode_steps=16", "calibration.samples=4", "calibration.episodes=3", "latency.repeats=3",
                 "latency.warmup=1", f"out_dir={out}", "progress=false",
                 f"plan_cache={Path(checkpoint).parent / 'plans'}", "run_methods=[ddim-4,warm1-ddim4]", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_a_warm_variant_runs_closed_loop_with_fewer_evaluations_per_call(tiny_checkpoint, tmp_path):
    report = run(config(tiny_checkpoint, tmp_path / "out"))
    cold, warm = report["methods"]["ddim-4"], report["methods"]["warm1-ddim4"]
    assert warm["config"]["warm"] == {"start": 1, "variant": "plain", "threshold": None, "jump": 0.75}
    assert "warm" not in cold["config"] and (cold["evaluations_per_call"], cold["warm_share"]) == (4.0, 0.0)
    calls = warm["warm"]["calls"]
    # 16 steps of 8 actions per chunk: two calls per wave, the second warm (3 evaluations)
    assert calls["calls"] == 4 and calls["warm_calls"] == 2 and calls["evaluations"] == 2 * 4 + 2 * 3
    assert warm["evaluations_per_call"] == 3.5 < 4 and warm["warm_share"] == 0.5
    assert warm["warm"]["warm_call"]["evaluations"] == 3 and warm["warm"]["cold_call"]["evaluations"] == 4
    # per call: halfway between the two measured calls, in latency and in FLOPs
    halfway = (warm["warm"]["cold_call"]["flops"] + warm["warm"]["warm_call"]["flops"]) / 2
    assert warm["flops_per_call"] == round(halfway) and warm["warm"]["warm_call"]["flops"] < cold["flops_per_call"]
    cold_ms, warm_ms = warm["warm"]["cold_call"]["mean_ms"], warm["warm"]["warm_call"]["mean_ms"]
    assert warm["latency"]["mean_ms"] == pytest.approx((cold_ms + warm_ms) / 2)
    lines = closed_loop.read_episodes(tmp_path / "out" / "episodes.jsonl")
    assert all(("warm" in e) == (e["method"] == "warm1-ddim4") for e in lines)
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| evals/call | warm % |" in table and "| 3.50 | 50.0 |" in table


def test_a_resumed_run_reports_the_same_calls(tiny_checkpoint, tmp_path, monkeypatch):
    real, waves = closed_loop.run_episodes, {"n": 0}

    def interrupted(*args, **kwargs):
        waves["n"] += 1
        if waves["n"] == 4:  # ddim-4's two waves, the warm variant's first: then stop
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(closed_loop, "run_episodes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(tiny_checkpoint, tmp_path / "out"))
    monkeypatch.setattr(closed_loop, "run_episodes", real)
    resumed = run(config(tiny_checkpoint, tmp_path / "out"))
    fresh = run(config(tiny_checkpoint, tmp_path / "fresh"))
    for key in ("success", "evaluations_per_call", "warm_share", "flops_per_call"):
        assert resumed["methods"]["warm1-ddim4"][key] == fresh["methods"]["warm1-ddim4"][key], key
    assert resumed["methods"]["warm1-ddim4"]["warm"]["calls"] == fresh["methods"]["warm1-ddim4"]["warm"]["calls"]


@pytest.mark.parametrize("block, message", [
    ("{sampler: ddim, steps: 4, warm: {start: 4}}", "does not fit a sampler of 4 steps"),
    ("{sampler: ddim, steps: 4, warm: {variant: plain}}", "start required"),
    ("{sampler: ddim, steps: 4, warm: {start: 1, colour: red}}", "start required"),
    ("{sampler: ddim, steps: 4, warm: {start: 1, variant: checked, threshold: 0.5}}", "use plain for start=1"),
    ("{sampler: ddim, steps: 4, warm: {start: 2, variant: falcon}}", "needs threshold"),
    ("{sampler: ddim, steps: 4, warm: {start: 2, variant: sideways}}", "variant must be one of"),
    ("{sampler: ddim, steps: 4, cache: fbcache, warm: {start: 2}}", "runtime rule 'fbcache'"),
    ("{sampler: ddim, steps: auto, cache: null, warm: {start: 2}}", "give steps"),
])
def test_a_bad_warm_block_is_refused_before_any_work_naming_the_method(tiny_checkpoint, tmp_path, block, message):
    out = tmp_path / "out"
    cfg = config(tiny_checkpoint, out, f"+methods.odd={block}", "run_methods=[ddim-4,odd]")
    with pytest.raises(EvalError, match="methods.odd: method 'odd'") as err:
        run(cfg)
    assert message in str(err.value)
    assert not out.exists()


def test_a_cold_variant_describes_and_digests_as_before(tiny_checkpoint, tmp_path):
    (cold,) = parse_variants({"u": {"sampler": "ddim", "steps": 4, "cache": "uniform", "M": 2}}, [], "ddpm", 100)
    assert cold.describe() == {"sampler": "ddim", "steps": 4, "cache": "uniform", "M": 2}
    # recorded closed-loop runs keep their digests (their folders): runs without warm starts digest as before
    for name in ("metaworld-front", "main-job-eager", "main-job-whole", "sweep-dpt-hard", "ablation-dit-hard",
                 "vla-gr00t", "vla-rdt-ddpm100"):
        path = REPO / "benchmarks" / "results" / name / "run.json"
        run_record = json.loads(path.read_text())
        assert settings_digest(OmegaConf.create(run_record["config"])) == run_record["digest"], path
    # and a warm start is another run
    plain = config(tiny_checkpoint, tmp_path, "methods=steps", "run_methods=[]")
    warm = config(tiny_checkpoint, tmp_path, "methods=steps", "run_methods=[]",
                  "+methods.warm1-ddim4={sampler: ddim, steps: 4, warm: {start: 1}}")
    assert settings_digest(plain) != settings_digest(warm)


def test_realtime_runs_a_warm_variant_and_reports_its_evaluations(tiny_checkpoint, tmp_path):
    from bac.evaluation.realtime import run_realtime

    cfg = config(tiny_checkpoint, tmp_path / "rt", "mode=realtime", "episodes=1", "realtime.control_hz=[20]",
                 "realtime.latency_ms=30")
    report = run_realtime(cfg)
    methods = report["rates"]["20"]
    assert methods["ddim-4"]["evaluations_per_call"] == 4.0
    warm = methods["warm1-ddim4"]
    assert warm["control"]["warm"]["warm_calls"] > 0 and 3 <= warm["evaluations_per_call"] < 4
    assert "Denoiser evaluations per call of the warm-started methods" in (tmp_path / "rt" / "report.md").read_text()
