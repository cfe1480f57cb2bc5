"""``python -m bac.eval``: closed-loop success and control frequency for every caching method.

``mode=realtime``: the same methods driving one robot at fixed control rates (``realtime.*``),
the next chunk sampled while the current one executes (``bac.evaluation.realtime``).

The entry point of the product's main job (Hydra config ``configs/eval.yaml``, also ``bac-eval``
and ``python -m bac.eval``); the evaluation itself lives in :mod:`bac.evaluation`.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from bac.apps.common import report_errors
from bac.configs import CONFIG_DIR
from bac.errors import ConfigError


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    # The evaluator (torch, MuJoCo) is imported here, not above: --help answers without loading it.
    if cfg.mode == "realtime":
        from bac.evaluation.realtime import run_realtime as run
    elif cfg.mode == "closed_loop":
        from bac.evaluation.run import run
    else:
        raise ConfigError(f"mode must be closed_loop or realtime, got {cfg.mode!r}")
    result = run(cfg)
    if "shard" in result:  # a shard that left the report to the last one (bac.evaluation.shards)
        return
    print((Path(result["out_dir"]) / "report.md").read_text())
    print(f"report: {result['out_dir']}/report.json")


if __name__ == "__main__":
    main()
