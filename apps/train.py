"""``bac-train``: train a diffusion policy on scripted-expert demonstrations (Hydra ``configs/train.yaml``).

    bac-train policy=dpt task=push
    bac-train policy=dpt task=suite export_dir=policies/checkpoints/dpt-metaworld

Demonstrations are collected on demand (:mod:`bac.envs.collect`) and read in robomimic's layout;
the loop itself is :func:`bac.policies.train.train`; ``eval_every`` runs a closed-loop check on
held-out seeds (:func:`bac.runtime.run_episodes`).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from bac.apps.common import report_errors
from bac.configs import CONFIG_DIR
from bac.configs.settings import check_settings
from bac.envs.instructions import INSTRUCTIONS
from bac.envs.metaworld_env import make_vector_env
from bac.envs.tasks import check_task
from bac.envs.windows import load_image_windows, load_windows
from bac.errors import ConfigError
from bac.files import existing_folder
from bac.policies.constants import STATE
from bac.policies.policy import DiffusionPolicy
from bac.policies.train import SETTINGS, check_training_settings, policy_config, train
from bac.runtime import run_episodes


def success_rates(policy: DiffusionPolicy, tasks: list[str], episodes: int) -> dict[str, float]:
    """Closed-loop success rate per task on held-out seeds (100000 and up)."""
    rates = {}
    for task in tasks:
        results = list(run_episodes(policy, task, range(100_000, 100_000 + episodes), make_env=make_vector_env))
        rates[task] = sum(r["success"] for r in results) / len(results)
    return rates


def training_tasks(cfg: DictConfig) -> list[str]:
    """The tasks to train on (``task``, or ``suite`` for ``task=suite``), checked: known, distinct, not none."""
    tasks = list(cfg.suite) if cfg.task == "suite" else [cfg.task]
    if not tasks:
        raise ConfigError("setting suite is empty: list the tasks of task=suite")
    try:
        short = [check_task(task) for task in tasks]
    except ConfigError as err:
        raise ConfigError(f"setting {_task_setting(cfg)}: {err}") from None
    if len(set(short)) != len(short):
        raise ConfigError(f"setting suite lists a task twice: {tasks}")
    return tasks


def _task_setting(cfg: DictConfig) -> str:
    return "suite" if cfg.task == "suite" else "task"


def run_training(cfg: DictConfig) -> Path:
    """Collect (or reuse) the demonstrations of ``cfg``'s tasks, train, export; returns the export folder.

    Every setting is checked before any data is collected: the tasks, the policy, the training values,
    the device and the folders."""
    tasks = training_tasks(cfg)
    checked = policy_config(cfg, 1, 1, tasks)
    check_training_settings(cfg)
    if cfg.data_dir is not None:
        existing_folder(cfg.data_dir, "data_dir")  # written only when demonstrations must be collected
    extra_instructions = []
    if checked.is_vla:
        unlabelled = [task for task in tasks if check_task(task) not in INSTRUCTIONS]
        if unlabelled:
            raise ConfigError(f"setting {_task_setting(cfg)}: a vision-language-action head trains on "
                              f"instructions, and {unlabelled} have none; the tasks with instructions: "
                              f"{sorted(INSTRUCTIONS)}")
        state_keys = list(checked.input_features[STATE].keys or ["state"])
        data = load_image_windows(tasks, cfg.episodes, cfg.data_dir, cfg.horizon, cfg.n_obs_steps, cfg.action_noise,
                                  state_keys, checked.cameras, checked.model.image_size)
        extra_instructions = [t for task in tasks for t in INSTRUCTIONS.get(task, ())]
    else:
        data = load_windows(tasks, cfg.episodes, cfg.data_dir, cfg.horizon, cfg.n_obs_steps, cfg.action_noise)
    return train(cfg, data, tasks, extra_instructions=extra_instructions,
                 success_check=lambda policy: success_rates(policy, tasks, cfg.eval_episodes))


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    check_settings(cfg, SETTINGS, CONFIG_DIR / "train.yaml")
    print(f"policy checkpoint: {run_training(cfg)}")


if __name__ == "__main__":
    main()
