"""Meta-World v3 task names, episode caps and gymnasium registration, without Meta-World.

Everything here is static, so ``import bac.envs`` (which registers the gymnasium ids)
loads neither Meta-World nor MuJoCo; the environments themselves are built by
:mod:`envs.metaworld_env` only when ``gymnasium.make`` is called (string entry point).
``tests/envs/test_render.py`` checks that :data:`ALL_TASKS` equals Meta-World's own list.
"""

from __future__ import annotations

import difflib

from bac.errors import ConfigError

__all__ = [
    "ALL_TASKS",
    "DEFAULT_SUITE",
    "EXPERT_SUCCESSES",
    "HARD_CANDIDATES",
    "HARD_SUITE",
    "MAX_EPISODE_STEPS",
    "METAWORLD_MAX_PATH_LENGTH",
    "UnknownTaskError",
    "check_task",
    "env_id",
    "register_envs",
]

#: Every Meta-World v3 task, by short name (``"push"`` for ``push-v3``), in the order of
#: metaworld 3.1.1's ``ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE``.
ALL_TASKS: tuple[str, ...] = (
    "assembly", "basketball", "bin-picking", "box-close", "button-press-topdown",
    "button-press-topdown-wall", "button-press", "button-press-wall", "coffee-button",
    "coffee-pull", "coffee-push", "dial-turn", "disassemble", "door-close", "door-lock",
    "door-open", "door-unlock", "hand-insert", "drawer-close", "drawer-open", "faucet-open",
    "faucet-close", "hammer", "handle-press-side", "handle-press", "handle-pull-side",
    "handle-pull", "lever-pull", "pick-place-wall", "pick-out-of-hole", "pick-place",
    "plate-slide", "plate-slide-side", "plate-slide-back", "plate-slide-back-side",
    "peg-insert-side", "peg-unplug-side", "soccer", "stick-push", "stick-pull", "push",
    "push-wall", "push-back", "reach", "reach-wall", "shelf-place", "sweep-into", "sweep",
    "window-open", "window-close",
)  # fmt: skip

#: Default suite, roughly easy to hard: the tasks the shipped policy is trained and
#: evaluated on (configs/train.yaml ``suite``). The scripted experts solve them on all or
#: nearly all seeds (door-open not quite: collection keeps successes only; figures in
#: docs/guide/policies.md). pick-place and peg-insert-side are harder extensions, not in the default.
DEFAULT_SUITE: tuple[str, ...] = (
    "reach",
    "button-press-topdown",
    "drawer-open",
    "window-open",
    "push",
    "door-open",
)

#: Candidates of the harder suite (docs/results/harder-suite.md): the shipped ``*-metaworld-hard`` policies
#: are trained on all twelve; a DDIM-step sweep chose the evaluated suite among them.
HARD_CANDIDATES: tuple[str, ...] = (
    "pick-place", "peg-insert-side", "basketball", "sweep-into", "push", "plate-slide",
    "handle-press", "faucet-open", "coffee-button", "door-open", "assembly", "hammer",
)  # fmt: skip

#: The harder suite (``tasks=[hard]`` in ``python -m bac.eval``), chosen by the sweep of
#: docs/results/harder-suite.md (``benchmarks.suite_study.choose_suite``): full computation >= 70 % on both
#: architectures, the eight largest drops in success from full computation to DDIM-2, DDIM-3 and bac at M=10.
HARD_SUITE: tuple[str, ...] = (
    "pick-place", "peg-insert-side", "push", "plate-slide", "handle-press", "faucet-open", "assembly", "hammer",
)  # fmt: skip

#: Scripted-expert successes on seeds 0-19 at each task's episode cap, without action noise (a test
#: replays them). With the demonstrations' DART noise (0.3) experts fail more often (docs/guide/policies.md,
#: "Experts and demonstrations"); collection keeps successes only.
EXPERT_SUCCESSES: dict[str, int] = {
    "pick-place": 20, "peg-insert-side": 19, "basketball": 20, "sweep-into": 19, "push": 20, "plate-slide": 20,
    "handle-press": 20, "faucet-open": 20, "coffee-button": 20, "door-open": 19, "assembly": 20, "hammer": 20,
}  # fmt: skip

#: Episode-length caps. Meta-World's own limit is 500 steps, but its scripted experts
#: first succeed on these tasks far sooner, with rare outliers (docs/guide/policies.md,
#: "Simulated tasks"). The cap is about twice the expert's usual longest episode, at
#: least 200: a learned policy that has not succeeded by then practically never does,
#: and every extra step costs a diffusion-policy inference in closed-loop evaluation.
#: The outliers are simply not kept as demonstrations. Tasks not listed use
#: Meta-World's 500. Override per env.
MAX_EPISODE_STEPS: dict[str, int] = {
    "reach": 200,
    "button-press-topdown": 200,
    "drawer-open": 200,
    "window-open": 200,
    "push": 200,
    "door-open": 250,
    "pick-place": 200,
    "peg-insert-side": 300,
    # The harder suite's candidates (scripted experts over 30 seeds, no noise: first success within
    # 36-107 steps at the 90th percentile; assembly 98, basketball 107 with one outlier at 428).
    "basketball": 250,
    "sweep-into": 200,
    "plate-slide": 200,
    "coffee-button": 200,
    "assembly": 250,
    "hammer": 200,
    # The language-conditioned suite (envs.instructions.LANGUAGE_SUITE); its experts first succeed well
    # within 200 steps (docs/guide/policies.md, "Simulated tasks").
    "faucet-open": 200,
    "faucet-close": 200,
    "window-close": 200,
    "drawer-close": 200,
    "handle-press": 200,
    "handle-pull": 250,
}

#: Meta-World's own episode limit (``max_path_length``), the cap of unlisted tasks.
METAWORLD_MAX_PATH_LENGTH = 500


class UnknownTaskError(ConfigError, KeyError):
    """A task name that is not a Meta-World v3 task: a :class:`bac.ConfigError` that ``except KeyError``
    (the error of earlier versions) also catches."""

    __str__ = Exception.__str__  # KeyError's str() would quote the message


def check_task(task: str) -> str:
    """The short name of a task (``"push-v3"`` -> ``"push"``); :class:`UnknownTaskError` if unknown."""
    if not isinstance(task, str):
        raise UnknownTaskError(f"a task is a Meta-World task name, got {task!r}")
    task = task.removesuffix("-v3")
    if task not in ALL_TASKS:
        close = difflib.get_close_matches(task, ALL_TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownTaskError(f"unknown Meta-World task {task!r}{hint}; known: {', '.join(ALL_TASKS)}")
    return task


def episode_cap(task: str) -> int:
    """Default truncation length of a task (:data:`MAX_EPISODE_STEPS`, else 500)."""
    return MAX_EPISODE_STEPS.get(check_task(task), METAWORLD_MAX_PATH_LENGTH)


def env_id(task: str) -> str:
    """Gymnasium id of a task, e.g. ``env_id("push") == "bac/metaworld-push-v3"``."""
    return f"bac/metaworld-{check_task(task)}-v3"


def register_envs() -> None:
    """Register ``bac/metaworld-<task>-v3`` for every Meta-World v3 task (idempotent).

    Runs on ``import bac.envs`` (and on import of :mod:`envs.metaworld_env`). Only
    strings are registered, so nothing heavy is imported until ``gymnasium.make``.
    ``gymnasium.make(id)`` truncates at the task's :data:`MAX_EPISODE_STEPS` cap
    (``env.spec.max_episode_steps``), ``gymnasium.make(id, max_episode_steps=n)`` at
    ``n``, as usual in gymnasium. ``terminate_on_success=True``,
    ``render_mode="rgb_array"``, ``camera_name``, ``width`` and ``height`` may be passed
    as make kwargs.
    """
    import gymnasium as gym

    entry_point = f"{__package__}.metaworld_env:_make_registered"
    for task in ALL_TASKS:
        gid = env_id(task)
        if gid in gym.registry:
            continue
        gym.register(
            id=gid,
            entry_point=entry_point,
            kwargs={"task": task},
            max_episode_steps=episode_cap(task),
        )
