"""Seeded closed-loop success with nothing lost: episode results are appended as JSON lines.

Every finished episode is one line ``{"task", "method", "seed", "success", "steps"}`` (a warm-started
method's also ``"warm"``: its wave's calls, see :func:`run_task`) written with a single ``write`` and
flushed, so an interrupted run (Ctrl-C, a killed job) leaves at most one torn last line, which is ignored. Re-running with
the same output file skips the episodes already there and repeats none, and gives
the same results as an uninterrupted run (waves are fixed slices of the seed list).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from bac.envs.tasks import episode_cap
from bac.runtime import ChunkingPolicy, EnvPool, run_episodes


def read_episodes(path: Path) -> list[dict]:
    """Complete lines of an episode log (a torn last line from an interruption is dropped)."""
    if not path.exists():
        return []
    episodes = []
    for line in path.read_text().splitlines():
        try:
            episodes.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return episodes


def repair(path: Path) -> None:
    """Drop a torn last line so that new lines start on a line of their own."""
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        lines = path.read_bytes().split(b"\n")
        path.write_bytes(b"\n".join(lines[:-1]) + (b"\n" if len(lines) > 1 else b""))


def run_task(
    policy: ChunkingPolicy,
    task: str,
    method: str,
    seeds: Iterable[int],
    log_path: Path,
    *,
    num_envs: int,
    max_episode_steps: int | None = None,
    progress: bool = True,
    instructions=None,
    envs: EnvPool | None = None,
    logged: Iterable[dict] | None = None,
) -> list[dict]:
    """Run the episodes of ``seeds`` not yet in ``log_path``; return every result for (task, method).

    The policy runs through ``bac.runtime`` (chunked execution, ``task`` passed as
    its ``task`` feature); each wave of episodes gets a generator on the policy's
    device seeded from its first seed, so every method sees the same initial noise
    on the same episodes (paired comparisons). ``instructions(seed)``: each episode's
    instruction, for a policy that reads instructions (see ``bac.runtime.run_episodes``). ``envs``: a pool
    shared by the methods run on one task, so their waves reuse one set of environments. ``logged``: the
    episodes already done (default: those in ``log_path``); a sharded run passes every shard's.

    A warm-started view (``policy.warm`` set) counts its calls (``policy.warm_counts``): what a wave's calls
    did, ``{"wave": its first seed, "calls", "warm_calls", "evaluations"}``, goes on every line of the wave
    (written with its episodes, so no episode is logged without it; a wave is rerun whole, with the same noise,
    so a resumed run records the same counts).
    """
    seeds = list(seeds)
    logged = read_episodes(log_path) if logged is None else logged
    done = {e["seed"]: e for e in logged if e["task"] == task and e["method"] == method}
    # Waves are fixed slices of the full seed list, so a wave's noise (seeded from its first seed) and its
    # batch never depend on where an earlier run stopped; a wave cut short is rerun whole, its missing
    # episodes written, the others (already logged) not repeated.
    waves = [seeds[i : i + num_envs] for i in range(0, len(seeds), num_envs)]
    todo = [wave for wave in waves if any(s not in done for s in wave)]
    repair(log_path)
    cap = int(max_episode_steps) if max_episode_steps else episode_cap(task)
    counted = getattr(policy, "warm", None) is not None
    with open(log_path, "a") as log, StepProgress(task, method, len(todo), cap, seeds, done,
                                                  progress and bool(todo)) as bar:
        for number, wave in enumerate(todo):
            generator = torch.Generator(device=policy.device).manual_seed(wave[0])
            before = policy.warm_counts if counted else None
            # the wave's results all come once it ends (run_wave): its counts are known before any is written
            results = list(run_episodes(policy, task, wave, num_envs=num_envs, max_episode_steps=max_episode_steps,
                                        generator=generator, instructions=instructions, envs=envs,
                                        on_step=bar.step))
            calls = {"wave": wave[0], **{key: value - before[key] for key, value in policy.warm_counts.items()}} \
                if counted else None
            for result in results:
                if result["seed"] in done:
                    continue
                record = {"task": task, "method": method, **result, **({"warm": calls} if counted else {})}
                log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())
                done[record["seed"]] = record
            bar.wave_done(number + 1)
    return [done[s] for s in seeds]


class StepProgress:
    """A progress bar over the environment steps of a (task, method) cell's waves that stays on screen.

    Its total is the waves' step caps (``cap`` per wave); it advances at every step of a wave and jumps to
    the wave's end when all its episodes are done (episodes end at their first success), and shows the
    episodes finished and their successes so far.
    """

    def __init__(self, task: str, method: str, waves: int, cap: int, seeds: list[int], done: dict,
                 enabled: bool) -> None:
        self.cap, self.seeds, self.done = cap, seeds, done
        self._wave_started = False
        self.bar = tqdm(total=waves * cap, disable=not enabled, desc=f"{task} / {method}", unit="step",
                        leave=True, dynamic_ncols=True, mininterval=0.5)
        self._postfix()

    def _postfix(self) -> None:
        finished = [self.done[s] for s in self.seeds if s in self.done]
        self.bar.set_postfix_str(f"episodes {len(finished)}/{len(self.seeds)}, "
                                 f"{sum(bool(e['success']) for e in finished)} succeeded", refresh=False)

    def step(self, venv=None) -> None:
        """``run_episodes``'s ``on_step``: called after a wave's reset (not a step), then after every step."""
        if self._wave_started:
            self.bar.update(1)
        self._wave_started = True

    def wave_done(self, waves: int) -> None:
        self._wave_started = False
        self._postfix()
        self.bar.update(waves * self.cap - self.bar.n)

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
