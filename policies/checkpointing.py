"""What every trainer here shares: resumable training state and state dicts checked before loading."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.training_utils import EMAModel
from torch import nn


def check_fits(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise, naming every missing, unexpected or mis-shaped tensor, unless ``state`` loads into ``module``."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise ValueError(f"checkpoint does not fit {what} ({len(problems)} problems): " + "; ".join(problems[:6]))


class TrainingState:
    """Model, optimiser, LR schedule, EMA and random streams, saved atomically and restored exactly."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule, ema: EMAModel,
                 generator: torch.Generator):
        self.model, self.optimizer, self.lr_schedule, self.ema, self.generator = (
            model, optimizer, lr_schedule, ema, generator)

    def save(self, path: Path, **extra: Any) -> None:
        """Write the state and ``extra`` (tensors and plain values only) to ``path``; a crash leaves the old file."""
        tmp = path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_schedule": self.lr_schedule.state_dict(), "ema": self.ema.state_dict(),
                    "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), **extra}, tmp)
        os.replace(tmp, path)

    def restore(self, path: Path, check: Callable[[dict], None] | None = None) -> dict:
        """Load ``path`` (``weights_only``), let ``check`` refuse a foreign run, restore; returns the saved dict."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if check is not None:
            check(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(next(self.model.parameters()).device)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return state
