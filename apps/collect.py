"""``bac-collect``: scripted-expert demonstrations of a Meta-World task in robomimic's HDF5 layout.

    bac-collect task=push episodes=100
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bac.apps.common import report_errors
from bac.configs import CONFIG_DIR
from bac.configs.settings import BOOL, FLOAT, INT, SEQ, STR, check_settings
from bac.envs.collect import collect


def main() -> None:
    """Write expert demonstrations of one task (Hydra ``configs/collect.yaml``)."""
    settings = {
        "task": (STR, None, False), "episodes": (INT, 1, False), "seed_offset": (INT, 0, False),
        "out_dir": (STR, None, True), "overwrite": (BOOL, None, False), "post_success_steps": (INT, 0, False),
        "action_noise": (FLOAT, 0, False), "max_episode_steps": (INT, 1, True),
        "valid_fraction": (FLOAT, 0, False), "progress": (BOOL, None, False),
        "cameras": (SEQ, None, False), "image_size": (INT, 8, False),
    }

    @hydra.main(config_path=str(CONFIG_DIR), config_name="collect", version_base="1.3")
    @report_errors
    def run(cfg: DictConfig) -> None:
        check_settings(cfg, settings, CONFIG_DIR / "collect.yaml")
        path = collect(
            task=cfg.task,
            episodes=cfg.episodes,
            seed_offset=cfg.seed_offset,
            out_dir=cfg.out_dir,
            overwrite=cfg.overwrite,
            post_success_steps=cfg.post_success_steps,
            action_noise=cfg.action_noise,
            max_episode_steps=cfg.max_episode_steps,
            valid_fraction=cfg.valid_fraction,
            progress=cfg.progress,
            cameras=tuple(cfg.cameras),
            image_size=cfg.image_size,
        )
        print(path)

    run()


if __name__ == "__main__":
    main()
