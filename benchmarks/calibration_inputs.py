"""Ship each state checkpoint's calibration observations with it, so the main job needs no demonstrations.

    python -m benchmarks.calibration_inputs                       # every shipped state checkpoint
    python -m benchmarks.calibration_inputs --checkpoints dpt-metaworld-hard --check   # compare, write nothing

The evaluator (``python -m bac.eval``) calibrates caching plans on ``calibration.samples`` observations drawn
(seed ``calibration.seed``) from ``calibration.episodes`` expert demonstrations of every task the policy was
trained on. Drawing them means collecting those demonstrations first (1,200 episodes for a 12-task policy) in
every new working directory. This script draws them exactly as the evaluator does
(:func:`bac.envs.calibration_inputs.draw_calibration_inputs`, the settings of ``configs/eval.yaml``) and writes them to
``<checkpoint>/calibration_inputs.safetensors`` with what they were drawn with in the header (tasks, samples,
episodes, seed, observation history, collector format, Meta-World version). The evaluator uses the file only
when all of those equal its run's, and otherwise collects as before; plans come out the same either way.

Vision-language checkpoints (cameras) are skipped: their calibration batch holds rendered frames from image
demonstrations and keeps the collecting path. Demonstrations are written under ``$BAC_DATA_DIR`` (default
``./data``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from bac.configs import CONFIG_DIR
from bac.policies.constants import STATE
from bac.envs.calibration_inputs import (CALIBRATION_INPUTS, calibration_inputs_facts, draw_calibration_inputs,
                                       save_calibration_inputs, shipped_calibration_inputs)

CHECKPOINTS = Path(__file__).resolve().parents[1] / "policies" / "checkpoints"


def state_checkpoints(root: Path = CHECKPOINTS) -> list[Path]:
    """Shipped checkpoints whose policy reads state only (no image input feature)."""
    found = []
    for directory in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        config = json.loads((directory / "config.json").read_text())
        if not any(f.get("type") == "image" for f in config["input_features"].values()):
            found.append(directory)
    return found


def inputs_for(directory: Path, samples: int, episodes: int, seed: int) -> tuple[np.ndarray, dict]:
    config = json.loads((directory / "config.json").read_text())
    tasks, n_obs_steps = list(config["tasks"]), int(config["n_obs_steps"])
    facts = calibration_inputs_facts(tasks, samples=samples, episodes=episodes, seed=seed, n_obs_steps=n_obs_steps)
    states, _ = draw_calibration_inputs(tasks, samples=samples, episodes=episodes, seed=seed, n_obs_steps=n_obs_steps)
    state_dim = int(config["input_features"][STATE]["shape"][0])
    if states.shape[-1] != state_dim:
        raise SystemExit(f"{directory.name}: demonstrations have {states.shape[-1]}-d states, the policy reads {state_dim}")
    return states, facts


def main(argv=None) -> None:
    defaults = OmegaConf.load(CONFIG_DIR / "eval.yaml").calibration
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", default=None,
                        help="names under policies/checkpoints (default: every state checkpoint there)")
    parser.add_argument("--samples", type=int, default=int(defaults.samples))
    parser.add_argument("--episodes", type=int, default=int(defaults.episodes))
    parser.add_argument("--seed", type=int, default=int(defaults.seed))
    parser.add_argument("--check", action="store_true", help="compare with the shipped files; write nothing")
    args = parser.parse_args(argv)
    directories = ([CHECKPOINTS / name for name in args.checkpoints] if args.checkpoints else state_checkpoints())
    failed = False
    for directory in directories:
        start = time.perf_counter()
        states, facts = inputs_for(directory, args.samples, args.episodes, args.seed)
        path = directory / CALIBRATION_INPUTS
        if args.check:
            shipped = shipped_calibration_inputs(directory, facts, states.shape[-1])
            same = shipped is not None and np.array_equal(shipped, states)
            failed |= not same
            print(f"{directory.name}: {'equal to' if same else 'DIFFERENT from'} {path} "
                  f"({time.perf_counter() - start:.0f} s)")
            continue
        save_calibration_inputs(path, states, facts)
        print(f"{directory.name}: wrote {path} ({states.shape[0]} observations {list(states.shape[1:])}, "
              f"{path.stat().st_size} bytes, {time.perf_counter() - start:.0f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
