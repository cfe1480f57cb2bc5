"""Language instructions for the Meta-World tasks of the language-conditioned (VLA) suite.

Every task has several paraphrases: the first :data:`TRAIN_PARAPHRASES` label the demonstrations, the rest
are held out for evaluation, so a policy is scored on wording it never saw. The suite is four pairs of tasks
that share a scene (:data:`SHARED_SCENE_PAIRS`), so the instruction, not only the scene, must say what to do; only
faucet-open and faucet-close also start alike (docs/guide/policies.md, "The prefix, data and training").
Nothing here imports Meta-World.
"""
from __future__ import annotations

from .tasks import check_task

__all__ = ["INSTRUCTIONS", "LANGUAGE_SUITE", "SHARED_SCENE_PAIRS", "TRAIN_PARAPHRASES", "instruction",
           "held_out_instructions", "train_instructions", "swapped_task"]

#: How many of each task's paraphrases the demonstrations use; the rest are held out.
TRAIN_PARAPHRASES = 4

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "faucet-open": (
        "open the faucet",
        "turn the faucet on",
        "rotate the faucet handle to open it",
        "twist the tap open",
        "turn on the tap",                                   # held out
        "swing the faucet handle to the open side",          # held out
    ),
    "faucet-close": (
        "close the faucet",
        "turn the faucet off",
        "rotate the faucet handle to close it",
        "twist the tap closed",
        "turn off the tap",
        "swing the faucet handle to the closed side",
    ),
    "window-open": (
        "open the window",
        "slide the window open",
        "push the window sash to open it",
        "move the window pane to the open position",
        "slide the window to open it up",
        "get the window open",
    ),
    "window-close": (
        "close the window",
        "slide the window shut",
        "push the window sash to close it",
        "move the window pane to the closed position",
        "slide the window closed",
        "shut the window",
    ),
    "drawer-open": (
        "open the drawer",
        "pull the drawer out",
        "slide the drawer open",
        "pull the drawer handle to open it",
        "draw the drawer out toward you",
        "get the drawer open",
    ),
    "drawer-close": (
        "close the drawer",
        "push the drawer in",
        "slide the drawer shut",
        "push the drawer handle to close it",
        "shove the drawer back in",
        "shut the drawer",
    ),
    "handle-press": (
        "press the handle down",
        "push the handle down",
        "press down on the lever",
        "push the lever to the bottom",
        "press the handle all the way down",
        "move the handle downward",
    ),
    "handle-pull": (
        "pull the handle up",
        "lift the handle",
        "pull up on the lever",
        "raise the lever to the top",
        "pull the handle all the way up",
        "move the handle upward",
    ),
}

#: The language-conditioned multi-task suite, in pairs that share a scene.
LANGUAGE_SUITE: tuple[str, ...] = tuple(INSTRUCTIONS)

#: Task pairs with the same scene and objects. faucet-open / faucet-close start from the same configuration
#: distribution (language alone tells them apart); in the others the articulation starts where the other
#: task ends (closed vs open, up vs down), so the first frame also hints at the task.
SHARED_SCENE_PAIRS: tuple[tuple[str, str], ...] = (
    ("faucet-open", "faucet-close"),
    ("window-open", "window-close"),
    ("drawer-open", "drawer-close"),
    ("handle-press", "handle-pull"),
)


def _paraphrases(task: str) -> tuple[str, ...]:
    task = check_task(task)
    if task not in INSTRUCTIONS:
        raise KeyError(f"task {task!r} has no instructions; the language suite is {list(LANGUAGE_SUITE)}")
    return INSTRUCTIONS[task]


def train_instructions(task: str) -> tuple[str, ...]:
    """The paraphrases demonstrations of ``task`` are labelled with."""
    return _paraphrases(task)[:TRAIN_PARAPHRASES]


def held_out_instructions(task: str) -> tuple[str, ...]:
    """The paraphrases no demonstration uses (for evaluation)."""
    return _paraphrases(task)[TRAIN_PARAPHRASES:]


def instruction(task: str, index: int, held_out: bool = False) -> str:
    """The ``index``-th training (or held-out) paraphrase of ``task``, cycling."""
    pool = held_out_instructions(task) if held_out else train_instructions(task)
    return pool[int(index) % len(pool)]


def swapped_task(task: str) -> str:
    """The other task of ``task``'s shared-scene pair (``faucet-open`` -> ``faucet-close``)."""
    task = check_task(task)
    for a, b in SHARED_SCENE_PAIRS:
        if task in (a, b):
            return b if task == a else a
    raise KeyError(f"task {task!r} is in no shared-scene pair {SHARED_SCENE_PAIRS}")
