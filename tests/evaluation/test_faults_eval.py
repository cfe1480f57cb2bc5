"""Faults of the main job and the tuner: every bad setting is one clear error, raised before any work.

Each case asserts the error's kind and message and the order: the demonstration collection, the model loading
and the output writers are replaced by functions that fail the test if called, and the test's folder (the
working directory, ``out_dir`` and ``plan_cache``) stays empty. No episode runs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bac
import bac.evaluation.preflight as preflight
import bac.evaluation.settings as settings
import bac.evaluation.setup as setup
from bac.configs import CONFIG_DIR
from bac.envs.tasks import episode_cap
from bac.evaluation.provenance import settings_digest
from bac.evaluation.realtime import run_realtime
from bac.evaluation.run import run
from bac.evaluation.settings import EvalError
from bac.evaluation.tune import tune
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.policy import DiffusionPolicy

REPO = Path(__file__).resolve().parents[2]


def compose_config(name, checkpoint, folder, *extra):
    overrides = [
        "methods=default", f"checkpoint={checkpoint}", "tasks=[reach,push]", "episodes=3", "num_envs=2",
        "sampler.steps=6", "M=2", "n=2", "calibration.samples=4", "calibration.episodes=3", "latency.repeats=3",
        "latency.warmup=1", f"out_dir={folder / 'out'}", "progress=false", f"plan_cache={folder / 'plans'}", *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The test's working directory; what the run would do first fails the test instead."""
    def work_started(what):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{what} before the bad setting was refused")
        return refuse

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup, "collect", work_started("demonstrations collected"))
    monkeypatch.setattr(setup, "draw_calibration_inputs", work_started("demonstrations collected"))
    monkeypatch.setattr(DiffusionPolicy, "load", work_started("a model loaded"))
    monkeypatch.setattr(DiffusionPolicy, "__init__", work_started("a model built"))
    monkeypatch.setattr(settings.Path, "mkdir", work_started("a folder made"))
    for module in ("bac.evaluation.run", "bac.evaluation.realtime"):
        monkeypatch.setattr(f"{module}.claim_out_dir", work_started("the output folder claimed"))
    return tmp_path


def refused(call, cfg, folder, kind, message):
    with pytest.raises(kind, match=message):
        call(cfg)
    assert not any(folder.iterdir()), f"files were written: {sorted(folder.rglob('*'))}"


def a_file(folder_path: Path) -> Path:
    """A file outside the test's folder (which must stay empty) where a folder belongs."""
    path = folder_path.parent / f"{folder_path.name}-a-file"
    path.write_text("not a folder")
    return path


# (overrides, error kind, message): each a setting of the main job, or a combination of them
BAD_SETTINGS = {
    "run_methods typo": (["run_methods=[full,nope]"], EvalError, r"unknown method\(s\) \['nope'\]"),
    "run_methods twice": (["run_methods=[full,full]"], EvalError, "lists 'full' twice"),
    "empty methods group": (["methods=default", "~methods.full", "~methods.ddim", "~methods.uniform",
                             "~methods.unified-acs", "~methods.acs", "~methods.bac"], EvalError, "no methods"),
    "shard.index over count": (["shard.index=2", "shard.count=2"], EvalError, r"shard.index must be in \[0"),
    "shards without episodes": (["shard.count=2", "episodes=0"], EvalError, "shards share out episodes"),
    "shards with a budget plan": (["shard.count=2", "methods=budget"], EvalError, "budget variants"),
    "missing tuned file": (["tuned=nowhere/tuned.json"], bac.ConfigError, "tuned configuration .* does not exist"),
    "method M=-3": (["methods.bac.M=-3"], EvalError, r"methods.bac: M \(updates per block\) must be .* got -3"),
    "method n=-1": (["methods.bac.n=-1"], EvalError, "methods.bac: n .* got -1"),
    "method unknown parameter": (["+methods.odd={cache: bac, M: 2, bogus: 1}", "run_methods=[full,odd]"], EvalError,
                                 r"methods.odd: method 'bac' takes parameters .* not \['bogus'\]"),
    "method unknown cache": (["+methods.odd={cache: teleport}", "run_methods=[full,odd]"], EvalError,
                             "methods.odd: unknown caching method 'teleport'"),
    "method unknown sampler": (["+methods.odd={sampler: teleport, steps: 4}", "run_methods=[full,odd]"], EvalError,
                               "method 'odd': unknown sampler 'teleport'"),
    "method steps over training": (["+methods.odd={sampler: ddim, steps: 1000}", "run_methods=[full,odd]"], EvalError,
                                   r"method 'odd': sampler steps must be in \[1, 100\], got 1000"),
    "method FLOPs target": (["+methods.odd={sampler: ddim, steps: 'auto:teleport'}", "run_methods=[full,odd]"],
                            EvalError, "matches the FLOPs of 'teleport'"),
    "budget without a target": (["methods=budget", "run_methods=[bac,odd]", "+methods.odd={budget: {}}"], EvalError,
                                "exactly one of"),
    "base sampler of another kind": (["sampler.kind=flow", "sampler.steps=4"], EvalError,
                                     "sampler 'flow' does not fit a policy trained with DDPM"),
    "base sampler steps": (["sampler.steps=1000"], EvalError, r"sampler steps must be in \[1, 100\], got 1000"),
    "unknown task": (["tasks=[fly-to-moon]"], EvalError, "unknown task 'fly-to-moon'"),
    "task the policy does not know": (["tasks=[pick-place]"], EvalError, "not on 'pick-place'"),
    "no tasks": (["tasks=[]"], EvalError, "no tasks to evaluate"),
    "instructions on a state policy": (["instructions=foo"], EvalError, "reads no instructions"),
    "swapped instructions on a state policy": (["instructions=swapped"], EvalError, "reads no instructions"),
    "device cuda:99": (["device=cuda:99"], EvalError, r"CUDA is not available|GPU\(s\)"),
    "device not a device": (["device=gpu0"], EvalError, "not a torch device"),
    "device tpu": (["device=xla"], EvalError, "runs on cpu, cuda or mps"),
    "mode unknown": (["mode=openloop"], EvalError, "mode must be one of"),
    "episodes 10^9": (["episodes=1000000000"], EvalError, "setting episodes must be <= 100000, got 1000000000"),
    "num_envs 10^5": (["num_envs=100000"], EvalError, "setting num_envs must be <= 256"),
    "max_episode_steps 10^9": (["max_episode_steps=1000000000"], EvalError, "max_episode_steps must be <= 10000"),
    "calibration.samples 10^9": (["calibration.samples=1000000000"], EvalError, "calibration.samples must be <="),
    "calibration.episodes 10^9": (["calibration.episodes=1000000000"], EvalError, "calibration.episodes must be <="),
    "latency.repeats 10^9": (["latency.repeats=1000000000"], EvalError, "latency.repeats must be <="),
    "video size 10^5": (["video_settings.size=100000"], EvalError, "video_settings.size must be <= 1024"),
    "threads 10^6": (["threads=1000000"], EvalError, "setting threads must be <= 1024"),
    "seed 2^40": ([f"seed={2**40}"], EvalError, "setting seed must be <="),
    "realtime.control_hz scalar": (["realtime.control_hz=10"], EvalError, "realtime.control_hz"),
    "realtime.clock typo": (["realtime.clock=wal"], EvalError, "realtime.clock"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_a_bad_setting_is_refused_before_any_work(tiny_checkpoint, folder, case):
    overrides, kind, message = BAD_SETTINGS[case]
    refused(run, compose_config("eval", tiny_checkpoint, folder, *overrides), folder, kind, message)


@pytest.mark.parametrize("setting", ["out_dir", "plan_cache"])
def test_a_folder_that_is_a_file_is_refused_before_any_work(tiny_checkpoint, folder, setting):
    path = a_file(folder)
    refused(run, compose_config("eval", tiny_checkpoint, folder, f"{setting}={path / 'run'}"), folder, EvalError,
            f"{setting}=.*{path.name} is a file, not a folder")


def test_an_unwritable_output_folder_is_refused_before_any_work(tiny_checkpoint, folder, monkeypatch):
    parent = folder.parent / f"{folder.name}-read-only"
    os.mkdir(parent)  # Path.mkdir is one of the guarded writers
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: Path(path) != parent)  # root may write anywhere
    refused(run, compose_config("eval", tiny_checkpoint, folder, f"out_dir={parent / 'run'}"), folder, EvalError,
            "out_dir=.* is not writable")


def test_a_full_disk_is_refused_before_any_work_with_the_estimate(tiny_checkpoint, folder, monkeypatch):
    usage = preflight.shutil.disk_usage(folder)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=10 << 20))
    refused(run, compose_config("eval", tiny_checkpoint, folder), folder, EvalError,
            r"out_dir=.*: 10 MiB free on its disk, and this run may write up to \d+ MiB there \(an estimate, with "
            "a margin of 2\\)")


def test_the_write_estimate_grows_with_the_episodes_and_videos(tiny_checkpoint, folder, monkeypatch):
    needed = {}
    monkeypatch.setattr(preflight, "check_folder", lambda setting, path, size: needed.setdefault(setting, []).append(size))
    for extra in ([], ["episodes=1000"], ["episodes=1000", "video=true"]):
        preflight.check_before_work(compose_config("eval", tiny_checkpoint, folder, *extra))
    small, more, videos = needed["out_dir"]
    cap = max(episode_cap(task) for task in ("reach", "push"))
    # 2 tasks x 6 methods x 997 more episodes x 1 kB, twice; GIFs: 12 x cap steps x 128^2 px, twice
    assert more - small == 2 * 12 * 997 * 1024 and videos - more == 2 * 12 * cap * 128 * 128


def test_a_checkpoint_under_a_missing_folder_is_not_the_shipped_one_of_its_name(folder):
    shipped = resolve_checkpoint("dpt-metaworld-hard")
    assert (shipped / "model.safetensors").is_file()  # a bare shipped name still finds it
    assert resolve_checkpoint("runs/dpt-metaworld-hard") == Path("runs/dpt-metaworld-hard")
    cfg = compose_config("eval", "runs/dpt-metaworld-hard", folder, "tasks=[push]")
    refused(run, cfg, folder, EvalError, "runs/dpt-metaworld-hard is not a policy checkpoint")


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint=untrained:nope"], "unknown policy config 'nope'"),
    (["checkpoint=untrained:dpt", "untrained_tasks=[]"], "untrained_tasks is empty"),
    (["checkpoint=untrained:dpt", "untrained_tasks=[fly-to-moon]"], "untrained_tasks: unknown task 'fly-to-moon'"),
])
def test_a_bad_untrained_policy_is_refused_before_any_work(tiny_checkpoint, folder, overrides, message):
    refused(run, compose_config("eval", tiny_checkpoint, folder, "tasks=[reach]", *overrides), folder, EvalError,
            message)


@pytest.mark.parametrize("instructions, message", [
    ("foo", r"instructions must be one of \('held_out', 'train', 'swapped'\), got 'foo'"),
    ("swapped", "no shared-scene pair|no instructions"),
])
def test_instructions_a_vision_language_head_cannot_read_are_refused_before_any_work(tiny_checkpoint, folder,
                                                                                     instructions, message):
    cfg = compose_config("eval", tiny_checkpoint, folder, "checkpoint=untrained:gr00t", "tasks=[reach]",
                         f"instructions={instructions}")
    refused(run, cfg, folder, EvalError, message)


@pytest.mark.parametrize("overrides, message", [
    (["shard.count=2"], "mode=realtime is not sharded"),
    (["checkpoint=untrained:dpt", "tasks=[reach]"], "needs a trained checkpoint"),
    (["run_methods=[nope]"], r"unknown method\(s\) \['nope'\]"),
])
def test_a_bad_realtime_setting_is_refused_before_any_work(tiny_checkpoint, folder, overrides, message):
    refused(run_realtime, compose_config("eval", tiny_checkpoint, folder, "mode=realtime", *overrides), folder,
            EvalError, message)


@pytest.mark.parametrize("overrides, message", [
    (["budget_ms=0"], "budget_ms must be a number > 0"),
    (["rate_hz=0"], "rate_hz must be a number > 0"),
    (["budget_ms=-5"], "budget_ms must be >= 0"),
    (["budget_ms=nan"], "budget_ms must be a number > 0"),
    (["tolerance_points=101"], "tolerance_points must be <= 100"),
    (["run_methods=[full,nope]"], r"unknown method\(s\) \['nope'\]"),
    (["episodes=1000000000", "seed=0"], "reach the evaluation seeds|episodes must be <="),
    (["+methods.full.steps=0"], r"method 'full': sampler steps must be in \[1, 100\], got 0"),
])
def test_a_bad_tuner_setting_is_refused_before_any_candidate_runs(tiny_checkpoint, folder, overrides, message):
    cfg = compose_config("tune", tiny_checkpoint, folder, "methods=front", "tasks=[reach]", "episodes=2", "seed=0",
                         "run_methods=[full,ddim-4,bac-M2-ddim4]", *overrides)
    refused(tune, cfg, folder, bac.ConfigError, message)


# ---------------------------------------------------------------- run identity: a resumed run is the same run
def record(cfg, out: Path) -> None:
    """A run.json as a finished run leaves it (made outside the guarded folder's checks)."""
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"digest": settings_digest(cfg),
                                              "config": OmegaConf.to_container(cfg, resolve=True)}))


@pytest.mark.parametrize("recorded, now, message", [
    (["num_envs=2"], ["num_envs=3"], "num_envs=2 there, 3 now"),
    (["max_episode_steps=300"], ["max_episode_steps=20"], "max_episode_steps=300 there, 20 now"),
    ([], ["max_episode_steps=20"], "max_episode_steps=None there, 20 now"),
    (["episodes=3"], ["episodes=4"], "episodes=3 there, 4 now"),
])
def test_resuming_with_a_setting_that_changes_results_is_refused_naming_both_values(tiny_checkpoint, tmp_path,
                                                                                     recorded, now, message):
    out = tmp_path / "recorded"
    record(compose_config("eval", tiny_checkpoint, tmp_path, f"out_dir={out}", *recorded), out)
    before = (out / "run.json").read_text()
    with pytest.raises(EvalError, match=f"holds a run with other settings .*{message}"):
        run(compose_config("eval", tiny_checkpoint, tmp_path, f"out_dir={out}", *now))
    assert (out / "run.json").read_text() == before and sorted(p.name for p in out.iterdir()) == ["run.json"]
    assert not (tmp_path / "plans").exists()  # refused before any plan was made


def test_settings_that_change_results_name_another_folder_and_recorded_digests_stay(tiny_checkpoint, tmp_path):
    base = compose_config("eval", tiny_checkpoint, tmp_path, "out_dir=auto")
    digest = settings_digest(base)
    for extra in (["max_episode_steps=20"], ["device=cuda"], ["instructions=train"], ["episodes=4"]):
        assert settings_digest(compose_config("eval", tiny_checkpoint, tmp_path, "out_dir=auto", *extra)) != digest
    for extra in (["max_episode_steps=null"], ["device=cpu"], ["num_envs=5"], ["progress=true"], ["threads=2"]):
        assert settings_digest(compose_config("eval", tiny_checkpoint, tmp_path, "out_dir=auto", *extra)) == digest


def test_a_corrupt_run_record_is_a_clear_error(tiny_checkpoint, tmp_path):
    out = tmp_path / "recorded"
    out.mkdir()
    (out / "run.json").write_text("{not json")
    with pytest.raises(EvalError, match="run.json is not a run record"):
        run(compose_config("eval", tiny_checkpoint, tmp_path, f"out_dir={out}"))


def test_a_run_methods_typo_on_the_command_line_is_one_line_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bac.eval", "run_methods=[nope]"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().startswith("error: unknown method(s) ['nope']")
    assert not any(tmp_path.iterdir())


def test_every_upper_bound_is_documented():
    guide = (REPO / "docs" / "guide" / "evaluation.md").read_text()
    for key, limit in settings.LIMITS.items():
        assert f"`{key}` ≤ {limit:,}".replace(",", " ") in guide, key


@pytest.mark.parametrize("setting", ["samples=5", "seed=1", "episodes=7"])
def test_other_calibration_settings_never_reuse_cached_calibrations_or_plans(setting, tmp_path):
    """Calibrations and the plans made from them are cached per calibration setting: a run with another
    setting (once, ``calibration.episodes`` was in no cache name) finds none of them."""
    from bac.evaluation.setup import calibration_folder

    base = OmegaConf.create({"calibration": {"samples": 16, "seed": 0, "episodes": 100}})
    other = OmegaConf.merge(base, OmegaConf.from_dotlist([f"calibration.{setting}"]))
    assert calibration_folder(tmp_path, base) != calibration_folder(tmp_path, other)
    assert calibration_folder(tmp_path, base) == calibration_folder(tmp_path, OmegaConf.create(base))
