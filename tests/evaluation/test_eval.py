"""The evaluator: report schema, resume without loss or repeats, reproducibility, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import bac
import bac.evaluation.closed_loop as closed_loop
from bac.configs import CONFIG_DIR
from bac.evaluation.run import EvalError, load_policy, run
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
    overrides = [
        f"checkpoint={checkpoint}", "tasks=[reach,push]", "episodes=3", "num_envs=2", "max_episode_steps=16",
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
    return subprocess.run([sys.executable, "-m", "bac.eval", *overrides], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


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
    plan_files = list(plan_cache(checkpoint).glob("tiny-*/bac-*-ddpm6.json"))
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
    return [f"checkpoint={checkpoint}", "tasks=[reach,push]", "episodes=3", "num_envs=2", "max_episode_steps=16",
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
        ("bac.policies.train", ["steps=0"], "setting steps must be >= 1, got 0"),
        ("bac.policies.train", ["+lr_decay=2"], "unknown setting 'lr_decay'"),
        ("bac.envs.collect", ["episodes=0"], "setting episodes must be >= 1, got 0"),
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
    assert (policy.sampler_kind, policy.num_inference_steps) == (tuned.sampler, tuned.steps)
    by_hand.set_sampler(tuned.sampler, tuned.steps)
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
    from bac.evaluation.run import episode_instructions

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
    from bac.evaluation.run import settings_digest

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
    from bac.evaluation.run import resolve_tasks
    from bac.policies.checkpointing import resolve_checkpoint

    for name in ("dpt-metaworld-hard", "dit-metaworld-hard"):
        policy = DiffusionPolicy.load(resolve_checkpoint(name))
        assert policy.tasks == list(HARD_CANDIDATES)
        assert resolve_tasks(config(checkpoint, tmp_path, "tasks=[hard]"), policy) == list(HARD_SUITE)
    with pytest.raises(EvalError, match="not on 'pick-place'"):  # the tiny policy knows reach and push only
        resolve_tasks(config(checkpoint, tmp_path, "tasks=[hard]"), DiffusionPolicy.load(checkpoint))
