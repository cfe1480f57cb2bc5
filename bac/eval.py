"""``python -m bac.eval``: closed-loop success and control frequency for every caching method.

The entry point of the product's main job (Hydra config ``configs/eval.yaml``);
the evaluation itself lives in the project's ``eval`` package. This module is
the one place ``bac`` reaches outside the core.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from bac.cli import report_errors
from bac.configs import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    from bac.evaluation.run import run

    result = run(cfg)
    print((Path(result["out_dir"]) / "report.md").read_text())
    print(f"report: {result['out_dir']}/report.json")


if __name__ == "__main__":
    main()
