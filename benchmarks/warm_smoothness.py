"""Smoothness at chunk seams, warm-started against cold calls: the executed actions of seeded closed-loop episodes.

    python -m benchmarks.warm_smoothness [--checkpoint dpt-metaworld-hard] [--episodes 20] [--out outputs/warm_smoothness.json]

For each configuration (a sampler, optionally a warm start) the harder suite's tasks run ``--episodes`` seeded
episodes each through ``select_action`` (the evaluator's loop, the same seeds for every configuration); every
executed action is recorded. Per episode, over the steps it ran (each a ``[A]`` action of the policy, before
clipping to the action space):

* ``jerk``: the norm of the action sequence's second difference ``a[t+1] - 2 a[t] + a[t-1]`` (Meta-World's
  actions are end-effector displacements, so this is the commanded motion's jerk up to a constant), mean and
  95th percentile over the episode's steps;
* ``seam jump``: the norm of ``a[t] - a[t-1]`` where ``a[t]`` is the first action of a new chunk, mean over the
  episode's seams, beside the same norm within chunks (``step change``).

The JSON holds the per-configuration means over episodes and the successes; recorded: benchmarks/results/warm/.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bac
from bac.envs.metaworld_env import make_vector_env
from bac.envs.tasks import HARD_SUITE
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.policy import DiffusionPolicy
from bac.runtime import EnvPool, run_episodes

#: name -> (sampler, steps, warm-start arguments or None)
CONFIGURATIONS = {
    "ddim-10": ("ddim", 10, None),
    "ddim-4": ("ddim", 4, None),
    "ddim-3": ("ddim", 3, None),
    "ddim-2": ("ddim", 2, None),
    "warm1-ddim4": ("ddim", 4, {"start": 1}),
    "warm2-ddim6": ("ddim", 6, {"start": 2}),
    "warm1-ddim3": ("ddim", 3, {"start": 1}),
}
#: name -> uniform M=2 caching on top of the configuration's sampler
CACHED = {"uniform-M2-ddim4": ("ddim", 4, None), "uniform-M2-warm2-ddim6": ("ddim", 6, {"start": 2})}


class Recorder:
    """A policy view that records every action it returns and whether it began a new chunk."""

    def __init__(self, view: DiffusionPolicy):
        self.view, self.actions, self.seams = view, [], []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.view, name)

    def reset(self) -> None:
        self.view.reset()

    def select_action(self, batch, generator=None):
        self.seams.append(self.view.chunk_due)
        action = self.view.select_action(batch, generator=generator)
        self.actions.append(action.detach().cpu().numpy())
        return action

    def episodes(self, steps: list[int]) -> list[dict]:
        """Per env of the last wave, its metrics over the steps it ran; then forget the wave."""
        actions, seams = np.stack(self.actions, axis=1), np.array(self.seams)  # [B, T, A], [T]
        self.actions, self.seams = [], []
        out = []
        for row, n in enumerate(steps):
            a = actions[row, :n]
            jerk = np.linalg.norm(a[2:] - 2 * a[1:-1] + a[:-2], axis=1) if n > 2 else np.zeros(1)
            change = np.linalg.norm(np.diff(a, axis=0), axis=1) if n > 1 else np.zeros(1)
            seam = seams[1:n]  # change[t - 1] is a[t] - a[t - 1]
            out.append({"jerk_mean": float(jerk.mean()), "jerk_p95": float(np.percentile(jerk, 95)),
                        "seam_jump": float(change[seam].mean()) if seam.any() else 0.0,
                        "step_change": float(change[~seam].mean()) if (~seam).any() else 0.0})
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="dpt-metaworld-hard")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=300000)
    parser.add_argument("--tasks", nargs="*", default=list(HARD_SUITE))
    parser.add_argument("--out", default="outputs/warm_smoothness.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = DiffusionPolicy.load(resolve_checkpoint(args.checkpoint))
    seeds = list(range(args.seed, args.seed + args.episodes))
    results: dict[str, dict] = {}
    begin = time.perf_counter()
    with EnvPool(make_vector_env) as envs:
        for name, (sampler, steps, warm) in {**CONFIGURATIONS, **CACHED}.items():
            view = policy.with_sampler(sampler, steps)
            handle = (view.accelerate(bac.build_method("uniform", view.model, num_steps=steps,
                                                       scheduler=view.sampler.scheduler, M=2))
                      if name in CACHED else None)
            recorder = Recorder(view.with_warm_start(**warm) if warm else view)
            episodes, successes = [], 0
            for task in args.tasks:
                for wave in (seeds[i:i + 10] for i in range(0, len(seeds), 10)):
                    generator = torch.Generator().manual_seed(wave[0])
                    done = list(run_episodes(recorder, task, wave, num_envs=10, generator=generator, envs=envs))
                    episodes += recorder.episodes([r["steps"] for r in done])
                    successes += sum(r["success"] for r in done)
            results[name] = {"episodes": len(episodes), "successes": successes,
                             **{k: float(np.mean([e[k] for e in episodes])) for k in episodes[0]},
                             "warm_counts": recorder.view.warm_counts}
            print(name, json.dumps(results[name]), flush=True)
            if handle is not None:
                handle.remove()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "tasks": args.tasks, "seeds": [seeds[0], seeds[-1]],
                               "configurations": {k: {"sampler": s, "steps": n, "warm": w,
                                                      "cache": "uniform M=2" if k in CACHED else None}
                                                  for k, (s, n, w) in {**CONFIGURATIONS, **CACHED}.items()},
                               "results": results, "wall_seconds": round(time.perf_counter() - begin, 1),
                               "packages": {"torch": torch.__version__},
                               "machine": {"platform": platform.platform()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
