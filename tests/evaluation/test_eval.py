"""The evaluator: report schema, resume without loss or repeats, reproducibility, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bac
import bac.evaluation.closed_loop as closed_loop
from bac.configs import CONFIG_DIR
from bac.evaluation.run import run
from bac.evaluation.settings import EvalError
from bac.evaluation.setup import load_policy
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy

REPO = Path(__file__).resolve().parents[2]


def tiny_config(width=32, state_dim=39):
    return PolicyConfig.build("dpt", {"width": width, "num_layers": 2, "heads": 2}, state_dim=state_dim, action_dim=4,
                              tasks=["reach", "push"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_config())
    policy.obs_normalizer.fit(torch.randn(100, 39))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    return policy.save(tmp_path_factory.mktemp("ckpt") / "tiny")


def plan_cache(checkpoint):
    return Path(checkpoint).parent / "plans"


def config(checkpoint, tmp_path, *extra):
    overrides = [  # methods=default: the comparison these tests were written for (the main job's is methods=quick)
        "methods=default", f"checkpoint={checkpoint}", "tasks=[reach,push]", "episodes=3", "num_envs=2",
        "max_episode_steps=16",
        "sampler.steps=6", "M=2", "n=2", "calibration.samples=4", "calibration.episodes=3",
        "latency.repeats=3", "latency.warmup=1", f"out_dir={tmp_path / 'out'}", "progress=false",
        f"plan_cache={plan_cache(checkpoint)}", *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_caching_on_a_few_step_sampler_beside_full(checkpoint, tmp_path):
    """methods=front: bac on DDIM-4 runs in the same run as full DDPM, with its own calibration."""
    cfg = config(checkpoint, tmp_path, "methods=front", "run_methods=[full,ddim-4,bac-M2-ddim4]", "episodes=2",
                 "tasks=[reach]")
    report = run(cfg)
    assert sorted(report["calibration"]) == ["ddim4"]  # full and plain DDIM need none
    entry = report["methods"]["bac-M2-ddim4"]
    plan = bac.Plan.load(entry["plan_file"])
    assert plan.num_steps == 4 and plan.params["M"] == 2 and "ddim4" in Path(entry["plan_file"]).name
    ddim = report["methods"]["ddim-4"]
    assert entry["flops_per_call"] < ddim["flops_per_call"] < report["methods"]["full"]["flops_per_call"]
    assert entry["success"]["episodes"] == 2 and entry["paired_vs_full"]["pairs"] == 2


def test_report_schema_and_files(checkpoint, tmp_path):
    result = run(config(checkpoint, tmp_path))
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "bac-eval-report/2"
    assert set(report["methods"]) == {"full", "ddim", "uniform", "unified-acs", "acs", "bac"}
    for name, m in report["methods"].items():
        assert m["success"]["episodes"] == 6 and 0 <= m["success"]["rate"] <= 1
        lo, hi = m["success"]["wilson95"]
        assert 0 <= lo <= m["success"]["rate"] <= hi <= 1
        assert set(m["per_task"]) == {"reach", "push"}
        assert m["paired_vs_full"]["pairs"] == 6
        assert {"mean_ms", "p50_ms", "p95_ms", "p99_ms", "hz"} <= set(m["latency"])
        assert m["latency"]["repeats"] == 3 and m["flops_per_call"] > 0
    assert report["methods"]["full"]["speedup"] == 1.0 and report["methods"]["full"]["skipped_share"] == 0.0
    bac_entry = report["methods"]["bac"]
    plan = bac.Plan.load(bac_entry["plan_file"])
    assert plan.num_steps == 6 and plan.params["M"] == 2
    assert bac_entry["skipped_share"] == pytest.approx(plan.skipped_count() / (len(plan.blocks) * 6))
    ddim_steps = report["methods"]["ddim"]["config"]["steps"]
    assert ddim_steps == max(1, round(6 * bac_entry["flops_per_call"] / report["methods"]["full"]["flops_per_call"]))
    assert list(report["calibration"]) == ["ddpm6"] and report["calibration"]["ddpm6"]["samples"] == 4
    assert report["environment"]["seeds"] == [100000, 100002]
    assert bac_entry["paired_vs_full"]["ci_method"] == "newcombe-10" and 0 <= bac_entry["paired_vs_full"]["mcnemar_p"] <= 1
    assert {"torch", "diffusers", "metaworld"} <= set(report["packages"])
    for name in ("report.md", "success_vs_speedup.png", "latency.png", "bac_plan.png", "episodes.jsonl"):
        assert (out / name).stat().st_size > 0
    assert "| bac |" in (out / "report.md").read_text()
    assert result["methods"].keys() == report["methods"].keys()


def episode_keys(path):
    return [(e["task"], e["method"], e["seed"]) for e in closed_loop.read_episodes(path)]


def test_interrupted_run_resumes_without_losing_or_repeating(checkpoint, tmp_path, monkeypatch):
    cfg = config(checkpoint, tmp_path, "run_methods=[full,bac]")
    real = closed_loop.run_episodes
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # one call per wave: reach/full x2, reach/bac x1, then stop
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    monkeypatch.setattr(closed_loop, "run_episodes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    log = tmp_path / "out" / "episodes.jsonl"
    first = episode_keys(log)
    assert len(first) == 5 and len(set(first)) == 5  # reach/full (3) + the first reach/bac wave (2)
    with open(log, "a") as f:
        f.write('{"task": "reach", "method": "bac", "se')  # a torn line, as a kill mid-write leaves
    monkeypatch.setattr(closed_loop, "run_episodes", real)
    run(cfg)
    keys = episode_keys(log)
    assert keys[:5] == first
    assert len(keys) == len(set(keys)) == 2 * 2 * 3
    reference = run(config(checkpoint, tmp_path / "fresh", "run_methods=[full,bac]"))
    resumed = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in ("full", "bac"):
        assert resumed["methods"][name]["success"] == reference["methods"][name]["success"]


def test_same_seed_same_results(checkpoint, tmp_path):
    a = run(config(checkpoint, tmp_path / "a", "run_methods=[full,uniform]"))
    b = run(config(checkpoint, tmp_path / "b", "run_methods=[full,uniform]"))
    log = lambda path: (path / "out" / "episodes.jsonl").read_bytes()
    assert log(tmp_path / "a") == log(tmp_path / "b")  # byte-identical, in the same order
    assert a["methods"]["uniform"]["success"] == b["methods"]["uniform"]["success"]


def test_changed_settings_in_the_same_out_dir_are_refused(checkpoint, tmp_path):
    run(config(checkpoint, tmp_path, "run_methods=[full]"))
    with pytest.raises(EvalError, match="other settings"):
        run(config(checkpoint, tmp_path, "run_methods=[full]", "episodes=4"))


def cli(*overrides):
    return subprocess.run([sys.executable, "-m", "bac.eval", "methods=default", *overrides], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tasks=[fly-to-moon]"], "unknown task 'fly-to-moon'"),
        (["run_methods=[full,teleport]"], "unknown method(s) ['teleport']"),
        (["checkpoint=/nonexistent"], "not a policy checkpoint"),
    ],
)
def test_bad_overrides_exit_non_zero_with_a_clear_message(checkpoint, tmp_path, overrides, message):
    done = cli(f"checkpoint={checkpoint}", f"out_dir={tmp_path}", f"plan_cache={tmp_path / 'plans'}", "tasks=[push]", "calibration.episodes=3", *overrides)
    assert done.returncode == 2
    assert message in done.stderr


def test_plan_for_another_model_is_refused(checkpoint, tmp_path):
    cfg = config(checkpoint, tmp_path, "run_methods=[bac]", "episodes=0")
    run(cfg)
    plan_files = list(plan_cache(checkpoint).glob("tiny-*/calibration-*/bac-*-ddpm6.json"))
    assert plan_files
    other = DiffusionPolicy(tiny_config(width=64))
    foreign = bac.make_plan(other.model, "uniform", num_steps=6, M=2)
    for path in plan_files:
        foreign.save(path)
    done = cli(f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'cli'}", f"plan_cache={plan_cache(checkpoint)}",
               "tasks=[push]", "run_methods=[bac]", "episodes=0",
               "sampler.steps=6", "M=2", "n=2", "calibration.samples=4", "calibration.episodes=3")
    assert done.returncode == 2
    assert "does not fit this policy/sampler" in done.stderr and "recompute=true" in done.stderr
    run(config(checkpoint, tmp_path / "again", "run_methods=[bac]", "episodes=0", "calibration.recompute=true"))
    assert bac.Plan.load(plan_files[0]).model["width"] == 32


def test_every_caching_method_runs_closed_loop(checkpoint, tmp_path):
    report = run(config(checkpoint, tmp_path, "methods=all", "tasks=[push]", "episodes=2"))
    assert set(report["methods"]) == {"full", "ddim", "uniform", "unified-acs", "acs", "bac", "bac-taylor",
                                      "taylorseer", "fbcache", "cg-taylor", "sortblock"}
    for name, m in report["methods"].items():
        assert m["success"]["episodes"] == 2 and m["latency"]["repeats"] == 3, name
        assert 0 <= m["skipped_share"] < 1 and m["flops_per_call"] > 0, name
    assert report["methods"]["taylorseer"]["config"]["cache"] == "taylorseer"
    assert report["methods"]["taylorseer"]["plan_file"] is None and report["methods"]["bac"]["plan_file"]
    assert report["methods"]["taylorseer"]["skipped_share"] == pytest.approx(1 - 3 / 6)  # steps 0, 1, 5 of 6


def test_untrained_policy_takes_its_features_from_the_env(tmp_path):
    cfg = config("untrained:dpt", tmp_path, "untrained_tasks=[reach,push]")
    policy, _, trained = load_policy(cfg)
    assert not trained and policy.tasks == ["reach", "push"]
    assert policy.input_features["observation.state"].shape == (39,) and "task" in policy.input_features
    assert policy.output_features["action"].shape == (4,)
    assert torch.equal(policy.action_normalizer.scale, torch.ones(4))  # Meta-World's [-1, 1]: the identity
    assert torch.equal(policy.action_normalizer.offset, torch.zeros(4))


def test_checkpoint_that_does_not_fit_the_env_is_refused(tmp_path):
    DiffusionPolicy(tiny_config(state_dim=38)).save(tmp_path / "wrong")
    with pytest.raises(EvalError, match=r"'observation.state' is \[38\], the environment's observations are \[39\]"):
        load_policy(config(tmp_path / "wrong", tmp_path))


def test_video_writes_one_gif_per_method_and_task(checkpoint, tmp_path):
    from PIL import Image

    report = run(config(checkpoint, tmp_path, "run_methods=[full,bac]", "tasks=[reach]", "episodes=1", "video=true",
                        "video_settings.size=32"))
    videos = {(v["method"], v["task"]): v for v in report["videos"]}
    assert set(videos) == {("full", "reach"), ("bac", "reach")}
    for v in videos.values():
        with Image.open(v["path"]) as gif:
            assert gif.size == (32, 32) and gif.n_frames > 1
        assert v["seed"] == 100000 and 1 <= v["steps"] <= 16
    again = run(config(checkpoint, tmp_path, "run_methods=[full,bac]", "tasks=[reach]", "episodes=1", "video=true",
                       "video_settings.size=32"))
    assert all("steps" not in v for v in again["videos"])  # resumed: kept, not recorded again


def eval_overrides(checkpoint, out):
    return ["methods=default", f"checkpoint={checkpoint}", "tasks=[reach,push]", "episodes=3", "num_envs=2",
            "max_episode_steps=16",
            "sampler.steps=6", "M=2", "n=2", "calibration.samples=4", "calibration.episodes=3",
            "latency.repeats=2", "latency.warmup=0", f"out_dir={out}", "progress=false",
            f"plan_cache={plan_cache(checkpoint)}", "run_methods=[full,bac]"]


@pytest.mark.parametrize("lines_before_kill", [1, 4])
def test_killed_run_resumes_with_nothing_lost_or_repeated(checkpoint, tmp_path, lines_before_kill):
    """SIGKILL while episodes are being written (then a torn line, as a kill mid-write leaves): the rerun
    completes the log with every episode once and the same results as an uninterrupted run."""
    import os
    import signal
    import time

    out = tmp_path / "killed"
    log = out / "episodes.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "bac.eval", *eval_overrides(checkpoint, out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and log.read_text().count("\n") >= lines_before_kill:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(log, "a") as f:
        f.write('{"task": "push", "method": "bac", "se')
    resumed = cli(*eval_overrides(checkpoint, out))
    assert resumed.returncode == 0, resumed.stderr
    reference = cli(*eval_overrides(checkpoint, tmp_path / "fresh"))
    assert reference.returncode == 0, reference.stderr
    keys = episode_keys(log)
    assert len(keys) == len(set(keys)) == 2 * 2 * 3
    episodes = lambda path: sorted(map(json.dumps, closed_loop.read_episodes(path)))
    assert episodes(log) == episodes(tmp_path / "fresh" / "episodes.jsonl")
    report = lambda path: {k: m["success"] for k, m in json.loads((path / "report.json").read_text())["methods"].items()}
    assert report(out) == report(tmp_path / "fresh")


@pytest.mark.parametrize(
    "module, overrides, message",
    [
        ("bac.eval", ["episodes=-3"], "setting episodes must be >= 0, got -3"),
        ("bac.eval", ["seed=-5"], "setting seed must be >= 0, got -5"),
        ("bac.eval", ["num_envs=0"], "setting num_envs must be >= 1, got 0"),
        ("bac.eval", ["sampler.steps=0"], "setting sampler.steps must be >= 1, got 0"),
        ("bac.eval", ["episodes=ten"], "setting episodes must be an integer, got 'ten'"),
        ("bac.eval", ["video=1"], "setting video must be true or false"),
        ("bac.eval", ["+episode=2"], "unknown setting 'episode' (not in eval.yaml); did you mean 'episodes'?"),
        ("bac.apps.train", ["steps=0"], "setting steps must be >= 1, got 0"),
        ("bac.apps.train", ["+lr_decay=2"], "unknown setting 'lr_decay'"),
        ("bac.apps.collect", ["episodes=0"], "setting episodes must be >= 1, got 0"),
    ],
)
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, module, overrides, message):
    done = subprocess.run([sys.executable, "-m", module, *overrides], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: " + message] or (len(errors) == 1 and message in errors[0]), done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir()), "work started (files were written) before the setting was refused"


def test_debug_mode_keeps_the_traceback(tmp_path):
    import os

    done = subprocess.run([sys.executable, "-m", "bac.eval", "num_envs=0"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={**os.environ, "BAC_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "num_envs must be >= 1" in done.stderr


@pytest.mark.parametrize("n", [1, 6, 11, 21, 22, 27, 31, 44, 100])
@pytest.mark.parametrize("all_succeed", [True, False])
def test_wilson_interval_contains_the_rate_at_zero_and_full_success(n, all_succeed):
    from bac.evaluation.report import wilson

    k = n if all_succeed else 0
    lo, hi = wilson(k, n)
    rate = k / n
    assert 0.0 <= lo <= rate <= hi <= 1.0
    assert (rate - lo) >= 0 and (hi - rate) >= 0  # matplotlib error bars
    assert (hi == 1.0) if all_succeed else (lo == 0.0)


# ------------------------------------------------------------------ the tuner (python -m bac.tune)
def tune_config(checkpoint, tmp_path, *extra):
    overrides = [
        f"checkpoint={checkpoint}", "tasks=[reach]", "episodes=2", "num_envs=2", "max_episode_steps=16",
        "sampler.steps=6", "n=2", "calibration.samples=4", "calibration.episodes=3", "latency.repeats=3",
        "latency.warmup=1", "run_methods=[full,ddim-4,bac-M2-ddim4]", f"out_dir={tmp_path / 'tune'}",
        "progress=false", f"plan_cache={plan_cache(checkpoint)}", *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="tune", overrides=overrides)


def test_tuner_picks_the_fastest_candidate_within_tolerance_and_it_loads_in_one_line(checkpoint, tmp_path):
    from bac.evaluation.tune import tune
    from bac.policies.tuned import TunedConfig

    result = tune(tune_config(checkpoint, tmp_path))
    candidates = result["candidates"]
    assert set(candidates) == {"full", "ddim-4", "bac-M2-ddim4"} and result["calibration_seeds"] == [0, 1]
    reference = candidates["full"]["rate"]
    within = [n for n, c in candidates.items() if 100 * (reference - c["rate"]) <= 2.0]
    assert result["lossless"] and result["pick"] == min(within, key=lambda n: candidates[n]["p50_ms"])
    for name, c in candidates.items():  # the front: nobody at least as good on both and better on one
        dominated = any(o["successes"] >= c["successes"] and o["p50_ms"] <= c["p50_ms"]
                        and (o["successes"] > c["successes"] or o["p50_ms"] < c["p50_ms"]) for o in candidates.values())
        assert c["on_front"] == (not dominated)
    out = tmp_path / "tune"
    assert (out / "front.png").stat().st_size > 0 and json.loads((out / "tune.json").read_text())["pick"] == result["pick"]

    tuned = TunedConfig.load(out / "tuned.json")
    picked = candidates[result["pick"]]["config"]
    assert (tuned.sampler, tuned.steps, tuned.method) == (picked["sampler"], picked["steps"], picked["cache"])
    policy, by_hand = DiffusionPolicy.load(checkpoint), DiffusionPolicy.load(checkpoint)
    handle = policy.use_tuned(out / "tuned.json")
    assert (policy.sampler.kind, policy.sampler.steps) == (tuned.sampler, tuned.steps)
    by_hand = by_hand.with_sampler(tuned.sampler, tuned.steps)
    plan = tuned.load_plan()
    hand_handle = by_hand.accelerate(plan) if plan is not None else None
    obs = {"observation.state": torch.randn(1, 2, 39), "task": "reach"}
    assert torch.equal(policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1)),
                       by_hand.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1)))
    assert (handle is None) == (hand_handle is None) == (tuned.method is None)

    # The evaluator takes the pick as method "tuned", beside the others.
    report = run(config(checkpoint, tmp_path / "eval", "run_methods=[full]", "episodes=1", "tasks=[reach]",
                        f"tuned={out / 'tuned.json'}"))
    assert set(report["methods"]) == {"full", "tuned"}
    assert report["methods"]["tuned"]["config"]["steps"] == tuned.steps


@pytest.mark.parametrize("extra, message", [
    (["seed=99990", "episodes=20"], "reach the evaluation seeds"),
    (["budget_ms=0.001"], "no candidate fits the budget"),
    (["budget_ms=10", "rate_hz=50"], "budget_ms or rate_hz, not both"),
    (["tolerance_points=-1"], "tolerance_points must be >= 0"),
    (["run_methods=[ddim-4]", "methods=steps", "~methods.full"], "need 'full'"),
])
def test_tuner_refuses_bad_settings(checkpoint, tmp_path, extra, message):
    from bac.evaluation.tune import tune

    with pytest.raises(bac.ConfigError, match=message):
        tune(tune_config(checkpoint, tmp_path, *extra))


def test_pick_rules():
    from bac.evaluation.tune import pick

    def c(successes, ms):
        return {"successes": successes, "rate": successes / 100, "p50_ms": ms}

    candidates = {"full": c(90, 100.0), "a": c(89, 10.0), "b": c(87, 5.0), "c": c(80, 1.0)}
    assert pick(candidates, 2.0, None) == ("a", True)
    assert pick(candidates, 3.0, None) == ("b", True)
    assert pick(candidates, 3.0, 4.0) == ("c", False)  # nothing lossless fits: the most successful that does
    with pytest.raises(bac.ConfigError, match="no candidate fits"):
        pick(candidates, 2.0, 0.5)


@pytest.mark.parametrize("edit, message", [
    ({"color": "red"}, r"unknown field\(s\) \['color'\]"),
    ({"steps": "4"}, "field 'steps' has the wrong type"),
    ({"steps": True}, "field 'steps' has the wrong type"),
    ({"plan": "missing.json"}, "does not exist"),
    ({"plan": None}, "'method' and 'plan' must both be set or both be null"),
    ({"format": "bac-tuned/0"}, "field 'format' must be"),
])
def test_tuned_file_reader_is_strict(tmp_path, edit, message):
    from bac.policies.tuned import TunedConfig

    (tmp_path / "plan.json").write_text("{}")
    path = TunedConfig("ddim", 4, "bac", {"M": 2}, "plan.json").save(tmp_path / "tuned.json")
    data = json.loads(path.read_text()) | edit
    path.write_text(json.dumps(data))
    with pytest.raises(bac.ConfigError, match=message):
        TunedConfig.load(path)


@pytest.fixture(scope="module")
def vla_checkpoint(tmp_path_factory):
    from bac.policies.language import LanguageCache, TOKEN_DIM

    torch.manual_seed(0)
    config = PolicyConfig.build("gr00t", {"width": 32, "num_layers": 2, "heads": 2, "image_size": 32, "crop_pad": 2},
                                state_dim=4, action_dim=4, tasks=["faucet-open", "faucet-close"],
                                noise_scheduler={"kind": "flow_matching"}, state_keys=["hand_pos", "gripper"],
                                horizon=8, n_obs_steps=1, n_action_steps=4)
    policy = DiffusionPolicy(config)
    policy.obs_normalizer.fit(torch.randn(100, 4))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    from bac.envs.instructions import INSTRUCTIONS

    # stand-in tokens for every instruction of the two tasks: the evaluator needs no language model then
    policy.language = LanguageCache({t: torch.randn(5, TOKEN_DIM) for task in config.tasks for t in INSTRUCTIONS[task]})
    return policy.save(tmp_path_factory.mktemp("vla") / "tiny-gr00t")


def test_a_vision_language_head_is_evaluated_with_images_instructions_and_its_prefix_share(vla_checkpoint, tmp_path):
    cfg = config(vla_checkpoint, tmp_path, "methods=vla", "run_methods=[full,fewer-steps,bac,fbcache]",
                 "tasks=[faucet-open,faucet-close]", "episodes=2", "sampler.steps=4", "max_episode_steps=8",
                 "calibration.episodes=2")
    report = run(cfg)
    assert report["sampler"] == {"kind": "flow", "steps": 4}
    assert "images (corner3) and instructions (held_out)" in report["environment"]["benchmark"]
    assert sorted(report["calibration"]) == ["flow4"]
    assert 0 < report["prefix"]["share_of_reference"] < 1
    for name, entry in report["methods"].items():
        assert entry["success"]["episodes"] == 4 and 0 < entry["prefix_share"] < 1, name
    assert report["methods"]["bac"]["skipped_share"] > 0
    # fewer-steps matches bac's denoiser FLOPs: the prefix, paid once per call, is not counted as steps
    fewer, full, cached = (report["methods"][m] for m in ("fewer-steps", "full", "bac"))
    assert fewer["config"]["steps"] < 4
    per_step = (full["flops_per_call"] - fewer["flops_per_call"]) / (4 - fewer["config"]["steps"])
    assert abs(fewer["flops_per_call"] - cached["flops_per_call"]) <= 0.5 * per_step * 1.01
    episodes = [json.loads(line) for line in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    assert {e["task"] for e in episodes} == {"faucet-open", "faucet-close"}


def test_instruction_sets_are_held_out_train_or_swapped(vla_checkpoint):
    from bac.envs.instructions import held_out_instructions, train_instructions
    from bac.evaluation.setup import episode_instructions

    policy = DiffusionPolicy.load(vla_checkpoint)

    def settings(name):
        return type("Cfg", (), {"instructions": name})()

    held = episode_instructions(settings("held_out"), policy, "faucet-open")
    assert {held(s) for s in range(10)} == set(held_out_instructions("faucet-open"))
    assert {episode_instructions(settings("train"), policy, "faucet-open")(s) for s in range(10)} == set(
        train_instructions("faucet-open"))
    swapped = episode_instructions(settings("swapped"), policy, "faucet-open")
    assert {swapped(s) for s in range(10)} == set(held_out_instructions("faucet-close"))
    with pytest.raises(EvalError, match="instructions must be one of"):
        episode_instructions(settings("random"), policy, "faucet-open")
    with pytest.raises(EvalError, match="no shared-scene pair|no instructions"):
        episode_instructions(settings("swapped"), policy, "reach")


def test_each_instruction_set_is_its_own_run(vla_checkpoint, tmp_path):
    """out_dir=auto must not resume held-out episodes into a swapped-instruction run (or the other way)."""
    from bac.evaluation.provenance import settings_digest

    digests = {name: settings_digest(config(vla_checkpoint, tmp_path, f"instructions={name}"))
               for name in ("held_out", "train", "swapped")}
    assert len(set(digests.values())) == 3
    assert digests["held_out"] == settings_digest(config(vla_checkpoint, tmp_path))  # the default's digest


def test_budget_plan_is_made_for_a_measured_latency_and_kept_when_resuming(checkpoint, tmp_path):
    """methods=budget: bac.plan_for_budget at bac's latency measured in the same run; a resumed run reuses the plan."""
    cfg = config(checkpoint, tmp_path, "methods=budget", "run_methods=[full,bac,budget]", "episodes=2",
                 "tasks=[reach]")
    report = run(cfg)
    entry = report["methods"]["budget"]
    made = entry["budget"]
    assert made["target"] == {"match": "bac", "n": 2}
    assert made["budget_ms"] == pytest.approx(made["matched_ms"]) and made["measured_ms"] > 0
    plan = bac.Plan.load(entry["plan_file"])
    assert plan.method == "budget" and plan.num_steps == 6 and plan.params["n"] == 2
    assert made["predicted_ms"] <= made["budget_ms"]
    assert entry["success"]["episodes"] == 2 and entry["paired_vs_full"]["pairs"] == 2
    assert entry["paired_vs_matched"]["method"] == "bac" and entry["paired_vs_matched"]["pairs"] == 2
    again = run(cfg)
    assert again["methods"]["budget"]["budget"]["reloaded"]
    assert bac.Plan.load(again["methods"]["budget"]["plan_file"]) == plan


@pytest.mark.parametrize("method, message", [
    ("{budget: {}}", "exactly one of"),
    ("{budget: {latency_ms: 5, match: bac}}", "exactly one of"),
    ("{budget: {match: full}, cache: bac}", "its own method"),
    ("{budget: {match: nothing}}", "same sampler"),
])
def test_bad_budget_settings_are_refused(checkpoint, tmp_path, method, message):
    cfg = config(checkpoint, tmp_path, "methods=budget", "run_methods=[bac,odd]", "episodes=0",
                 f"+methods.odd={method}")
    with pytest.raises(EvalError, match=message):
        run(cfg)


def test_fewer_steps_can_match_the_flops_of_any_named_method(checkpoint, tmp_path):
    result = run(config(checkpoint, tmp_path, "episodes=0", "sampler.steps=12", "M=4",
                        "+methods.ddim-u={sampler: ddim, steps: 'auto:uniform'}", "run_methods=[full,uniform,ddim-u]"))
    methods = result["methods"]
    assert methods["ddim-u"]["config"]["steps"] == 4  # uniform updates every block at 4 of the 12 steps
    assert methods["ddim-u"]["flops_per_call"] == pytest.approx(methods["uniform"]["flops_per_call"], rel=0.05)
    with pytest.raises(EvalError, match="'teleport'"):
        run(config(checkpoint, tmp_path / "bad", "episodes=0", "+methods.ddim-u={sampler: ddim, steps: 'auto:teleport'}",
                   "run_methods=[full,ddim-u]"))


def test_hard_names_the_harder_suite_which_the_shipped_hard_policies_were_trained_on(checkpoint, tmp_path):
    from bac.envs.tasks import HARD_CANDIDATES, HARD_SUITE
    from bac.evaluation.setup import resolve_tasks
    from bac.policies.checkpointing import resolve_checkpoint

    for name in ("dpt-metaworld-hard", "dit-metaworld-hard"):
        policy = DiffusionPolicy.load(resolve_checkpoint(name))
        assert policy.tasks == list(HARD_CANDIDATES)
        assert resolve_tasks(config(checkpoint, tmp_path, "tasks=[hard]"), policy) == list(HARD_SUITE)
    with pytest.raises(EvalError, match="not on 'pick-place'"):  # the tiny policy knows reach and push only
        resolve_tasks(config(checkpoint, tmp_path, "tasks=[hard]"), DiffusionPolicy.load(checkpoint))


# -- a main job that answers in minutes: shipped calibration inputs, the default, the verdict, threads, --help ----

def test_the_main_jobs_default_and_the_previous_default_by_explicit_settings():
    from bac.evaluation.variants import parse_variants

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        default = compose(config_name="eval")
        previous = compose(config_name="eval", overrides=["methods=default", "tasks=[peg-insert-side]", "episodes=10",
                                                          "threads=null"])
    assert list(default.methods)[0] == "ddim-10" and default.threads == 1 and default.episodes == 100
    assert list(default.tasks) == ["peg-insert-side", "push"] and default.checkpoint == "dpt-metaworld-hard"
    variants = parse_variants(OmegaConf.to_container(default.methods, resolve=True), [], "ddpm", 100)
    assert all(v.sampler == "ddim" and v.steps <= 10 for v in variants)  # no DDPM-100 in the default job
    # the previous default: DDPM-100 full and the paper's methods, 10 episodes of peg-insert-side, torch's threads
    assert set(previous.methods) == {"full", "ddim", "uniform", "unified-acs", "acs", "bac"}
    assert (previous.episodes, previous.num_envs, previous.seed, previous.threads) == (10, 10, 100000, None)
    assert list(previous.tasks) == ["peg-insert-side"] and previous.sampler.kind is None


@pytest.mark.parametrize("name, task", [("dpt-metaworld", "reach"), ("dpt-metaworld-hard", "handle-press")])
def test_shipped_calibration_inputs_equal_freshly_drawn_ones(name, task, tmp_path, monkeypatch):
    """The shipped observations of one task are the ones the evaluator draws from freshly collected
    demonstrations (one cheap task of the checkpoint's; each task's are drawn independently)."""
    import numpy as np

    from bac.envs.calibration_inputs import calibration_inputs_facts, draw_calibration_inputs, shipped_calibration_inputs
    from bac.policies.checkpointing import resolve_checkpoint

    defaults = OmegaConf.load(CONFIG_DIR / "eval.yaml").calibration
    directory = resolve_checkpoint(name)
    policy = DiffusionPolicy.load(directory)
    settings = dict(samples=int(defaults.samples), episodes=int(defaults.episodes), seed=int(defaults.seed),
                    n_obs_steps=policy.n_obs_steps)
    shipped = shipped_calibration_inputs(directory, calibration_inputs_facts(policy.tasks, **settings), policy.state_dim)
    assert shipped is not None, f"{name} ships no calibration inputs for the default calibration settings"
    per_task = -(-settings["samples"] // len(policy.tasks))
    assert shipped.shape == (per_task * len(policy.tasks), policy.n_obs_steps, policy.state_dim)
    monkeypatch.setenv("BAC_DATA_DIR", str(tmp_path))  # freshly collected demonstrations
    fresh, names = draw_calibration_inputs([task], **{**settings, "samples": per_task})
    row = policy.tasks.index(task) * per_task
    assert names == [task] * per_task and fresh.dtype == shipped.dtype == np.float32
    assert np.array_equal(fresh, shipped[row : row + per_task])


def test_every_shipped_state_checkpoint_has_its_calibration_inputs():
    import numpy as np
    from safetensors import safe_open

    from benchmarks.calibration_inputs import state_checkpoints
    from bac.envs.calibration_inputs import CALIBRATION_INPUTS

    arrays = {}
    for directory in state_checkpoints():
        config = json.loads((directory / "config.json").read_text())
        with safe_open(str(directory / CALIBRATION_INPUTS), framework="numpy") as f:
            meta = f.metadata()
            arrays.setdefault(meta["tasks"], []).append(f.get_tensor("observation.state"))
        assert json.loads(meta["tasks"]) == config["tasks"] and int(meta["n_obs_steps"]) == config["n_obs_steps"]
        assert (directory / CALIBRATION_INPUTS).stat().st_size < 64 << 10
    assert len(arrays) == 2  # the six-task policy and the harder suite's four, which share tasks and histories
    for same in arrays.values():
        assert all(np.array_equal(same[0], other) for other in same[1:])


def test_the_evaluator_uses_shipped_calibration_inputs_only_for_its_settings(checkpoint, tmp_path, monkeypatch):
    """With the shipped inputs no demonstration is collected and calibration and plans are those of a run that
    collected them; other calibration settings collect as before."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    import bac.envs.calibration_inputs as inputs
    import bac.evaluation.setup as evaluation

    monkeypatch.setenv("BAC_DATA_DIR", str(tmp_path / "data"))
    collected_ckpt, shipped_ckpt = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"  # own plan caches (parent/plans)
    for target in (collected_ckpt, shipped_ckpt):
        shutil.copytree(checkpoint, target)
    extra = ("run_methods=[full,bac]", "tasks=[reach]", "episodes=2")
    collected = run(config(collected_ckpt, tmp_path / "collected", *extra))
    assert collected["calibration"]["ddpm6"]["inputs"].startswith("drawn from 3 expert demonstrations")

    policy = DiffusionPolicy.load(shipped_ckpt)
    settings = dict(samples=4, episodes=3, seed=0, n_obs_steps=policy.n_obs_steps)
    states, _ = inputs.draw_calibration_inputs(policy.tasks, **settings)
    inputs.save_calibration_inputs(shipped_ckpt / inputs.CALIBRATION_INPUTS, states,
                                   inputs.calibration_inputs_facts(policy.tasks, **settings))

    def no_collecting(*args, **kwargs):
        raise AssertionError("collected demonstrations")

    monkeypatch.setattr(evaluation, "collect", no_collecting)
    monkeypatch.setattr(inputs, "collect", no_collecting)
    shipped = run(config(shipped_ckpt, tmp_path / "shipped", *extra))
    assert shipped["calibration"]["ddpm6"]["inputs"].startswith("shipped with the checkpoint")
    files = [Path(report["methods"]["bac"]["plan_file"]) for report in (collected, shipped)]
    calibrations = [load_file(str(next(f.parent.glob("calibration-*.safetensors")))) for f in files]
    assert calibrations[0].keys() == calibrations[1].keys()
    assert all(np.array_equal(calibrations[0][key], calibrations[1][key]) for key in calibrations[0])
    plans = [json.loads(f.read_text()) for f in files]
    for plan in plans:
        plan["calibration"].pop("date")  # when each was made: the one field that differs
    assert plans[0] == plans[1]
    assert [m["success"] for m in collected["methods"].values()] == [m["success"] for m in shipped["methods"].values()]
    for i, other in enumerate(("calibration.seed=1", "calibration.samples=5", "calibration.episodes=4")):
        with pytest.raises(AssertionError, match="collected demonstrations"):
            run(config(shipped_ckpt, tmp_path / f"other{i}", *extra, other))


def entries(reference, **methods):
    """Report entries: ``name=(successes, speedup)`` paired with the reference's successes."""
    from bac.evaluation import report as reporting

    ref = [{"task": "t", "seed": i, "success": bool(s)} for i, s in enumerate(reference)]
    out = {"ref": {"speedup": 1.0, "paired_vs_full": reporting.paired_difference(ref, ref),
                   "success": reporting.success_summary(ref)}}
    for name, (successes, speedup) in methods.items():
        episodes = [{"task": "t", "seed": i, "success": bool(s)} for i, s in enumerate(successes)]
        out[name] = {"speedup": speedup, "paired_vs_full": reporting.paired_difference(episodes, ref),
                     "success": reporting.success_summary(episodes)}
    return out


def test_verdict_names_the_fastest_method_within_tolerance_and_whether_that_is_significant():
    from bac.evaluation.report import verdict, verdict_line

    few = [1] * 9 + [0]  # 10 paired episodes: nothing is significant
    v = verdict(entries(few, fast=(few, 4.0), faster=([0] * 10, 8.0)), "ref", 2.0)
    assert v["pick"] == "fast" and not v["lossless_at_95"] and v["pairs_needed"] >= 100
    line = verdict_line(v)
    assert "**fast**" in line and "not significant** at 10 paired episodes" in line and "\n" not in line
    assert "faster (8.0x) -90.0 points" in line and "(a significant loss)" in line

    many = [1] * 950 + [0] * 50  # 1,000 pairs that agree everywhere: lossless
    v = verdict(entries(many, cached=(many, 3.0)), "ref", 2.0)
    assert v["pick"] == "cached" and v["lossless_at_95"] and "lossless at 95%" in verdict_line(v)

    v = verdict(entries(few, lossy=([0] * 10, 5.0)), "ref", 2.0)  # nothing faster within the tolerance
    assert v["pick"] == "ref" and "nothing faster than the reference ref" in verdict_line(v)
    assert verdict({"ref": {"speedup": 1.0}}, "ref", 2.0)["pick"] is None  # latency only: no verdict


def test_report_ends_in_the_verdict_and_threads_are_set_before_the_run(checkpoint, tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        report = run(config(checkpoint, tmp_path, "run_methods=[full,uniform]", "tasks=[reach]", "episodes=2",
                            "threads=1"))
        assert torch.get_num_threads() == 1 and report["threads"] == 1
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "out" / "report.md").read_text().rstrip().splitlines()
    assert text[-1].startswith("**Verdict:**") and report["verdict"]["reference"] == "full"
    assert report["verdict"]["pairs"] == 2 or report["verdict"]["pick"] == "full"
    assert {"calibration_inputs", "calibration_and_plans", "rollouts", "latency"} <= set(report["wall_seconds"])


def test_the_progress_bar_advances_with_every_step_and_stays(checkpoint, tmp_path, capsys, monkeypatch):
    from bac.envs.metaworld_env import make_vector_env
    from bac.runtime import EnvPool

    policy = DiffusionPolicy.load(checkpoint)
    policy = policy.with_sampler("ddim", 2)
    moves = []
    step = closed_loop.StepProgress.step

    def recorded(self, *args):
        before = self.bar.n
        step(self, *args)
        moves.append(self.bar.n - before)

    monkeypatch.setattr(closed_loop.StepProgress, "step", recorded)
    with EnvPool(make_vector_env) as envs:
        results = closed_loop.run_task(policy, "reach", "m", [0, 1, 2], tmp_path / "log.jsonl", num_envs=2,
                                       max_episode_steps=5, progress=True, envs=envs)
    assert len(results) == 3
    # one move per environment step of each wave (two waves of at most 5 steps); a wave's reset moves nothing
    steps = [m for m in moves if m]
    assert moves.count(0) == 2 and set(steps) == {1} and 2 <= len(steps) <= 10
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # left on screen
    assert "reach / m" in final and "10/10" in final and "episodes 3/3" in final


@pytest.mark.parametrize("module, names", [
    ("bac.eval", ["python -m bac.eval", "checkpoint=", "methods=", "tasks=", "episodes=", "threads=",
                  "tolerance_points=", "quick", "[dpt-metaworld-hard]"]),
    ("bac.tune", ["python -m bac.tune", "tolerance_points=", "budget_ms=", "rate_hz=", "tuned.json"]),
    ("bac.apps.train", ["bac-train", "policy=", "task=", "steps=", "export_dir="]),
    ("bac.apps.collect", ["bac-collect", "task=", "episodes=", "cameras="]),
    ("bac.apps.serve", ["bac-serve", "checkpoint=", "tuned=", "plan=", "port="]),
])
def test_help_describes_the_command_and_its_main_settings(module, names):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr
    for name in names:
        assert name in done.stdout, (name, done.stdout)
    assert "powered by Hydra" not in done.stdout and "== Config ==" not in done.stdout


def test_the_default_job_prints_no_warning(tmp_path):
    """The main job's default settings, latency only: nothing on stderr (no warning, no demonstrations collected:
    the shipped checkpoint carries its calibration inputs)."""
    done = subprocess.run([sys.executable, "-m", "bac.eval", "episodes=0", "latency.repeats=2", f"out_dir={tmp_path}",
                           f"plan_cache={tmp_path / 'plans'}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.rstrip().splitlines()[-3] == "**Verdict:** none: no episodes (latency only)."
    assert not (tmp_path / "data").exists()
