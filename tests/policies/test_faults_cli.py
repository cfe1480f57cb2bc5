"""Ordinary mistakes in bac-train and bac-collect (folders, disk, device, tasks, impossible values) and in a
policy's inputs: each one error of the project's kinds with a clear message, for the commands exit status 2
and one ``error:`` line without a traceback, refused before any work and leaving nothing behind."""
import errno
import pathlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import bac
import bac.envs.tasks
import bac.files
from bac.apps import collect as collect_app
from bac.apps import train as train_app
from bac.configs import CONFIG_DIR
from bac.envs import collect as collect_module
from bac.envs.collect import DatasetExistsError, collect, dataset_path
from bac.envs.tasks import UnknownTaskError
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy
from bac.policies.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["policy.model.width=32", "policy.model.num_layers=1", "progress=false", "threads=1"]


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def no_work(monkeypatch):
    """Make any data collection, episode or optimisation step fail the test: the error must come first."""
    def started(*args, **kwargs):
        raise AssertionError("work started before the mistake was refused")

    for module, name in ((train_app, "load_windows"), (train_app, "load_image_windows"),
                         (collect_module, "rollout_expert")):
        monkeypatch.setattr(module, name, started)


def run_command(main, program, overrides, monkeypatch, capsys):
    """Run a Hydra command in-process; its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", [program, *overrides])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def with_defaults(defaults, overrides):
    """``overrides`` and the ``defaults`` they do not set (Hydra refuses a key given twice)."""
    keys = {item.split("=")[0] for item in overrides}
    return [*overrides, *(item for item in defaults if item.split("=")[0] not in keys)]


def refused_by_command(main, program, overrides, message, monkeypatch, capsys, folder):
    before = files_under(folder)
    code, err = run_command(main, program, overrides, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert files_under(folder) == before, "something was written before the mistake was refused"
    return errors[0]


def unwritable(monkeypatch):
    """A folder the user may not write (as a read-only mount or another user's folder; tests may run as root,
    for whom chmod does not take the permission away): the write probe is refused."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(bac.files.tempfile, "mkstemp", refuse)


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def a_file(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    return "taken"


# ------------------------------------------------------------------------------------------ bac-train
TRAIN_CASES = {
    "export_dir is a file": (lambda tmp, mp: [f"export_dir={a_file(tmp)}"],
                             "setting export_dir: taken is not a folder"),
    "run_dir under a file": (lambda tmp, mp: [f"run_dir={a_file(tmp)}/run"],
                             "setting run_dir: taken/run is not a folder (its parent taken is a file)"),
    "run_dir unwritable": (lambda tmp, mp: unwritable(mp) or ["run_dir=runs/x"],
                           "setting run_dir: cannot write in . (Permission denied)"),
    "data_dir is a file": (lambda tmp, mp: [f"data_dir={a_file(tmp)}"], "setting data_dir: taken is not a folder"),
    "cuda on a CPU build": (lambda tmp, mp: no_cuda(mp) or ["device=cuda"], "setting device=cuda: this is a"),
    "a GPU that is not there": (lambda tmp, mp: one_gpu(mp) or ["device=cuda:3"],
                                "setting device=cuda:3: only 1 GPU(s) are visible"),
    "not a device": (lambda tmp, mp: ["device=gpu0"], "setting device: 'gpu0' is not a torch device"),
    "unknown task": (lambda tmp, mp: ["task=pusj"], "setting task: unknown Meta-World task 'pusj' (did you mean "
                                                    "'push'?)"),
    "unknown suite task": (lambda tmp, mp: ["task=suite", "suite=[reach,nope]"],
                           "setting suite: unknown Meta-World task 'nope'"),
    "empty suite": (lambda tmp, mp: ["task=suite", "suite=[]"], "setting suite is empty"),
    "a task twice": (lambda tmp, mp: ["task=suite", "suite=[reach,push,reach-v3]"], "setting suite lists a task twice"),
    "lr=0": (lambda tmp, mp: ["lr=0"], "setting lr must be a finite number > 0, got 0"),
    "lr=nan": (lambda tmp, mp: ["lr=nan"], "setting lr must be a finite number > 0, got nan"),
    "weight_decay=inf": (lambda tmp, mp: ["weight_decay=inf"], "setting weight_decay must be a finite number >= 0"),
    "ema_max_decay=2": (lambda tmp, mp: ["ema_max_decay=2"], "setting ema_max_decay must be a finite number in [0, 1]"),
    "ema_power=0": (lambda tmp, mp: ["ema_power=0"], "setting ema_power must be a finite number > 0, got 0"),
    "batch too large": (lambda tmp, mp: ["batch_size=100000000"], "setting batch_size must be <= 65536"),
    "VLA on tasks without instructions": (
        lambda tmp, mp: ["--config-name", "train_vla", "task=suite", "suite=[faucet-open,push]"],
        "a vision-language-action head trains on instructions, and ['push'] have none"),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_bac_train_refuses_before_collecting_any_data(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    no_work(monkeypatch)
    overrides, message = TRAIN_CASES[case]
    refused_by_command(train_app.main, "bac-train", with_defaults(TINY, overrides(tmp_path, monkeypatch)), message,
                       monkeypatch, capsys, tmp_path)


def test_unknown_tasks_are_config_errors_that_older_callers_catch_as_key_errors():
    with pytest.raises(UnknownTaskError) as caught:
        bac.envs.tasks.check_task("pusj")
    assert isinstance(caught.value, bac.ConfigError) and isinstance(caught.value, KeyError)
    assert str(caught.value).startswith("unknown Meta-World task 'pusj' (did you mean 'push'?); known: assembly")


def training_config(tmp_path, *overrides):
    settings = ["task=suite", "suite=[reach,push]", f"run_dir={tmp_path / 'run'}", "steps=4", "batch_size=4",
                "warmup_steps=1", "checkpoint_every=2", "log_every=2", *TINY, *overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=settings)


def synthetic_windows(cfg, n=12):
    generator = torch.Generator().manual_seed(0)
    return SimpleNamespace(state=torch.randn(n, cfg.n_obs_steps, 39, generator=generator),
                           actions=torch.rand(n, cfg.horizon, 4, generator=generator) * 2 - 1,
                           task_index=torch.arange(n) % 2, sources={}, frames={}, instructions=None)


def test_training_without_the_room_for_its_checkpoints_stops_before_the_first_step(tmp_path, monkeypatch):
    cfg = training_config(tmp_path)
    monkeypatch.setattr(bac.files.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=0, free=1000))
    with pytest.raises(bac.ConfigError) as caught:
        train(cfg, synthetic_windows(cfg), ["reach", "push"])
    message = str(caught.value)
    assert message.startswith(f"setting run_dir: {tmp_path / 'run'} has 1 KB free, the training state and the export")
    assert "needs about" in message and "MB" in message
    assert files_under(tmp_path) == []


def test_a_disk_that_fills_during_training_stops_it_keeps_the_last_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    cfg = training_config(tmp_path)
    written = []
    real_write = pathlib.Path.write_bytes

    def fills_at_the_second_checkpoint(path, data):
        written.append(path.name)
        if len(written) > 3:  # the first checkpoint (weights, config, training state) fits; then the disk is full
            real_write(path, bytes(data)[: len(data) // 2])  # a part was written when the disk filled
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", fills_at_the_second_checkpoint)
    with pytest.raises(bac.ConfigError) as caught:
        train(cfg, synthetic_windows(cfg), ["reach", "push"])
    assert "training stopped: cannot write" in str(caught.value)
    assert "No space left on device" in str(caught.value) and "run again to resume" in str(caught.value)
    assert not [name for name in files_under(tmp_path) if ".tmp" in name]
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == 2  # the complete one
    monkeypatch.undo()
    train(training_config(tmp_path), synthetic_windows(cfg), ["reach", "push"])  # space again: it resumes
    assert DiffusionPolicy.load(tmp_path / "run" / "policy").provenance["step"] == 4


# ---------------------------------------------------------------------------------------- bac-collect
def existing_dataset(tmp_path):
    path = dataset_path("reach", 1, out_dir=tmp_path / "data")
    path.parent.mkdir()
    path.write_bytes(b"an older, broken or foreign file")
    return ["out_dir=data"]


COLLECT_CASES = {
    "unknown task": (lambda tmp, mp: ["task=pusj"], "unknown Meta-World task 'pusj'"),
    "valid_fraction=2": (lambda tmp, mp: ["valid_fraction=2"], "valid_fraction is the share of demos held out for "
                                                               "validation, in [0, 1), got 2"),
    "valid_fraction=1": (lambda tmp, mp: ["valid_fraction=1"], "in [0, 1), got 1"),
    "action_noise=nan": (lambda tmp, mp: ["action_noise=nan"], "action_noise is the standard deviation"),
    "image_size too large": (lambda tmp, mp: ["image_size=100000"], "image_size must be an integer in [8, 1024]"),
    "unknown camera": (lambda tmp, mp: ["cameras=[corner9]"], "cameras must be distinct names from"),
    "out_dir is a file": (lambda tmp, mp: [f"out_dir={a_file(tmp)}"], "setting out_dir: taken is not a folder"),
    "out_dir unwritable": (lambda tmp, mp: unwritable(mp) or ["out_dir=data"],
                           "setting out_dir: cannot write in . (Permission denied)"),
    "a billion episodes": (lambda tmp, mp: ["episodes=1000000000", "out_dir=data"],
                           "1000000000 demos (estimated at half the 200-step episode cap each)"),
    "a dataset with other settings": (lambda tmp, mp: existing_dataset(tmp), "exists but was collected with other "
                                                                             "settings"),
}


@pytest.mark.parametrize("case", COLLECT_CASES)
def test_bac_collect_refuses_before_any_episode(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    no_work(monkeypatch)
    overrides, message = COLLECT_CASES[case]
    refused_by_command(collect_app.main, "bac-collect",
                       with_defaults(["task=reach", "episodes=1", "progress=false"], overrides(tmp_path, monkeypatch)),
                       message, monkeypatch, capsys, tmp_path)


def test_a_dataset_in_the_way_is_still_a_file_exists_error():
    assert issubclass(DatasetExistsError, bac.ConfigError) and issubclass(DatasetExistsError, FileExistsError)


def test_an_expert_that_cannot_succeed_names_the_settings_to_change(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = refused_by_command(collect_app.main, "bac-collect",
                              ["task=reach", "episodes=1", "max_episode_steps=1", "progress=false", "out_dir=data"],
                              "the expert succeeded on only 0 of 22 episodes of reach (max_episode_steps=1",
                              monkeypatch, capsys, tmp_path)
    assert "raise max_episode_steps or lower action_noise" in line


def test_a_disk_that_fills_while_writing_a_dataset_leaves_no_file(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(collect_module, "_write_demo", disk_full)
    with pytest.raises(bac.ConfigError, match=r"setting out_dir: cannot write .*metaworld_reach_1demos_seed0.hdf5: "
                                              r"\[Errno 28\] No space left on device"):
        collect("reach", 1, out_dir=tmp_path, progress=False)
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------------------------------ policy inputs
@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    config = PolicyConfig.build("dpt", {"width": 32, "num_layers": 1, "heads": 2}, state_dim=39, action_dim=4,
                                tasks=["reach", "push", "door-open"])
    policy = DiffusionPolicy(config)
    policy.obs_normalizer.fit(torch.randn(100, 39))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    return policy.eval().with_sampler("ddim", 3)


def chunk(policy, state, task):
    return policy.predict_action_chunk({"observation.state": state, "task": task},
                                       generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_task_indices_of_any_integer_dtype_are_the_same_tasks(policy, dtype):
    state = torch.randn(3, 2, 39)
    names = chunk(policy, state, ["push", "reach", "door-open"])
    assert torch.equal(chunk(policy, state, torch.tensor([1, 0, 2], dtype=dtype)), names)
    assert not torch.equal(chunk(policy, state, torch.tensor([0, 1, 2], dtype=dtype)), names)


INPUT_CASES = {
    "float task indices": ({"task": torch.tensor([1.0, 0.0])}, "task indices must be an integer tensor, got torch.float32"),
    "boolean task indices": ({"task": torch.tensor([True, False])}, "task indices must be an integer tensor, got torch.bool"),
    "boolean state (torch)": ({"observation.state": torch.ones(2, 2, 39, dtype=torch.bool)}, "is a boolean array"),
    "boolean state (numpy)": ({"observation.state": np.ones((2, 2, 39), dtype=bool)}, "is a boolean array"),
    "boolean state (lists)": ({"observation.state": [[[True] * 39] * 2] * 2}, "is a boolean array"),
    "complex state (torch)": ({"observation.state": torch.ones(2, 2, 39, dtype=torch.complex64)}, "is a complex array"),
    "complex state (numpy)": ({"observation.state": np.ones((2, 2, 39)) * (1 + 2j)}, "is a complex array"),
}


@pytest.mark.parametrize("case", INPUT_CASES)
def test_inputs_a_cast_would_change_are_data_errors(policy, case):
    change, message = INPUT_CASES[case]
    batch = {"observation.state": torch.randn(2, 2, 39), "task": ["push", "reach"], **change}
    with pytest.raises(bac.DataError) as caught:
        policy.predict_action_chunk(batch)
    assert message in str(caught.value)
    assert "observation.state" in str(caught.value) or "task" in str(caught.value)

