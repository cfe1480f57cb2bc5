"""``bac-tune`` / ``python -m bac.tune``: the fastest sampler and caching configuration within a success tolerance.

Hydra config ``configs/tune.yaml`` (the evaluator's settings plus the tuner's); the search itself
lives in the project's ``eval`` package (:mod:`bac.evaluation.tune`).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bac.apps.common import report_errors
from bac.configs import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="tune", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    from bac.evaluation.tune import tune  # here, not above: --help answers without loading torch and MuJoCo

    result = tune(cfg)
    print(f"{'candidate':<20}{'success':>10}{'p50 ms':>9}{'speedup':>9}  front")
    for name, c in sorted(result["candidates"].items(), key=lambda kv: kv[1]["p50_ms"]):
        mark = " <- pick" if name == result["pick"] else ""
        print(f"{name:<20}{c['successes']:>5}/{c['episodes']:<4}{c['p50_ms']:9.2f}{c['speedup']:8.1f}x  "
              f"{'yes' if c['on_front'] else '':<3}{mark}")
    verdict = "within" if result["lossless"] else "NOT within (no candidate was; most successful shown)"
    print(f"pick: {result['pick']} ({verdict} {result['tolerance_points']:g} points of {result['reference']}); "
          f"caching {'picked' if result['caching_picked'] else 'not picked'}")
    print(f"tuned: {result['eval_report'].rsplit('/eval/', 1)[0]}/tuned.json")


if __name__ == "__main__":
    main()
