"""One and two torch threads for a short rollout, quiet and beside a busy process (the evaluator's ``threads``).

    python -m benchmarks.threads [OUT.json]      # default outputs/threads.json; recorded: benchmarks/results/threads.json
"""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
import torch
from bac.envs.metaworld_env import make_vector_env
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.policy import DiffusionPolicy
from bac.runtime import EnvPool, run_episodes

task, seeds = "peg-insert-side", list(range(100000, 100010))
policy = DiffusionPolicy.load(resolve_checkpoint("dpt-metaworld-hard"))
runs = []
samplers = [("ddim", 10), ("ddim", 4)]
def rollout(threads, sampler, steps):
    torch.set_num_threads(threads)
    view = policy.with_sampler(sampler, steps)
    g = torch.Generator().manual_seed(seeds[0])
    with EnvPool(make_vector_env) as envs:
        envs.get(task, len(seeds), None, {})  # env construction outside the timing
        t = time.perf_counter()
        res = list(run_episodes(view, task, seeds, num_envs=10, generator=g, envs=envs))
        wall = time.perf_counter() - t
    return wall, sum(r["success"] for r in res), sum(r["steps"] for r in res)

rollout(1, "ddim", 2)  # warm-up
for condition in ("quiet", "busy"):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
    try:
        time.sleep(1)
        for repeat in range(2):
            for sampler, steps in samplers:
                for threads in ((1, 2) if repeat == 0 else (2, 1)):
                    wall, succ, st = rollout(threads, sampler, steps)
                    load = os.getloadavg()[0]
                    runs.append({"condition": condition, "threads": threads, "sampler": f"{sampler}{steps}",
                                 "repeat": repeat, "wall_s": round(wall, 2), "successes": succ, "env_steps": st,
                                 "loadavg_1min": load})
                    print(runs[-1], flush=True)
    finally:
        if busy is not None:
            busy.kill(); busy.wait()
out = {"what": "10 episodes of peg-insert-side (one wave, num_envs=10), dpt-metaworld-hard, wall seconds of "
               "run_episodes with torch.set_num_threads(threads); busy = one `python -c 'while True: pass'` beside it",
       "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "torch": torch.__version__,
       "runs": runs}
path = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/threads.json")
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(out, indent=1) + "\n")
