"""The training loop of a diffusion policy (``bac-train`` runs it on collected demonstrations).

AdamW with linear warm-up and cosine decay (diffusers' schedule), EMA
weights (diffusers' ``EMAModel``), deterministic seeding. Every
``checkpoint_every`` steps the full training state goes to ``run_dir`` (resumed
automatically after an interruption) and the EMA policy is exported to
``export_dir`` as safetensors + JSON (``export_half=true``: the denoiser's weights stored as float16).
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from datetime import datetime, timezone
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bac.configs.settings import BOOL, FLOAT, INT, SEQ, STR
from bac.errors import CheckpointError, ConfigError

from .checkpointing import TrainingState, check_state_fits
from .config import PolicyConfig
from .constants import ACTION, IMAGE_PREFIX, STATE, TASK
from .policy import DiffusionPolicy
from .vla import frames_to_images


def _optimizer(policy: DiffusionPolicy, cfg: DictConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in policy.model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith(("pos_emb", "camera_emb")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def policy_config(cfg: DictConfig, state_dim: int, action_dim: int, tasks: list[str]) -> PolicyConfig:
    """The typed config of the policy to train: ``cfg.policy`` (architecture, model) and the chunking settings."""
    try:
        policy = OmegaConf.to_container(cfg.policy, resolve=True)
        return PolicyConfig.build(cfg.policy.architecture, policy["model"], state_dim=state_dim, action_dim=action_dim,
                                  tasks=tasks, horizon=cfg.horizon, n_obs_steps=cfg.n_obs_steps,
                                  n_action_steps=cfg.n_action_steps, noise_scheduler=policy.get("noise_scheduler"),
                                  state_keys=policy.get("state_keys"))
    except ValueError as err:
        raise ConfigError(f"policy settings ({cfg.policy.name}): {err}") from err


def train(cfg: DictConfig, data: Any, tasks: list[str], *,
          success_check: Callable[[DiffusionPolicy], dict[str, float]] | None = None,
          extra_instructions: Sequence[str] = ()) -> Path:
    """Train a policy on ``data`` (the windows of ``tasks``: :class:`bac.envs.windows.TrainingWindows` or
    any object with its fields) with the settings of ``configs/train.yaml``.

    ``success_check(policy)``: closed-loop success per task, run every ``eval_every`` steps on the exported
    policy; ``extra_instructions``: encoded with the demonstrations' ones (held-out paraphrases).
    Returns the export folder.
    """
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    run_dir, export_dir = Path(cfg.run_dir), Path(cfg.export_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    obs, actions, task_index = data.state, data.actions, data.task_index
    frames, instructions, sources = data.frames, data.instructions, data.sources
    policy = DiffusionPolicy(policy_config(cfg, obs.shape[-1], actions.shape[-1], tasks))
    policy.obs_normalizer.fit(obs)
    policy.action_normalizer.fit(actions)
    if instructions is not None:
        # Encoded once and saved with the checkpoint: the demonstrations' instructions, and the held-out
        # paraphrases too (the encoder is frozen, so this leaks nothing), so evaluation needs no language model.
        policy.language.add(instructions + list(extra_instructions))
    policy.to(device).train()
    obs, actions, task_index = obs.to(device), actions.to(device), task_index.to(device)

    def training_batch(index: torch.Tensor) -> dict:
        batch = {STATE: obs[index], ACTION: actions[index]}
        if instructions is None:
            batch[TASK] = task_index[index]
            return batch
        batch[TASK] = [instructions[i] for i in task_index[index].tolist()]
        for camera, f in frames.items():  # uint8 in memory, float [0, 1] per batch
            batch[IMAGE_PREFIX + camera] = frames_to_images(f[index.cpu()]).to(device)
        return batch

    optimizer = _optimizer(policy, cfg)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(policy.model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, power=cfg.ema_power)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    settings = OmegaConf.to_container(cfg, resolve=True)

    training_state = TrainingState(policy, optimizer, lr_schedule, ema, generator)
    state_path = run_dir / "train_state.pt"
    if cfg.resume and state_path.exists():
        def same_run(state: dict) -> None:
            if state["settings"]["policy"] != settings["policy"] or state["settings"]["task"] != settings["task"]:
                raise CheckpointError(f"{state_path} belongs to another policy or task; use another run_dir or "
                                      "resume=false")
            check_state_fits(policy, state["model"], f"this {policy.architecture} policy")

        state = training_state.restore(state_path, same_run)
        step, elapsed = int(state["step"]), float(state["elapsed"])
        print(f"resumed {state_path} at step {step}")

    def export(loss: float) -> None:
        exported = copy.deepcopy(policy).eval()
        ema.copy_to(exported.model.parameters())
        exported.provenance = {
            "command": "bac-train " + " ".join(sys.argv[1:]),
            "settings": settings,
            "step": step,
            "loss": loss,
            "train_seconds": round(elapsed, 1),
            "datasets": sources,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }
        exported.save(export_dir, half=bool(cfg.export_half))

    log = open(run_dir / "log.jsonl", "a")
    smoothed = math.nan
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc=f"train {cfg.policy.name}-{cfg.task}")
    while step < cfg.steps:
        started = time.perf_counter()
        batch = torch.randint(0, len(obs), (cfg.batch_size,), generator=generator, device=device)
        loss = policy.compute_loss(training_batch(batch), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(policy.model.parameters())
        step += 1
        elapsed += time.perf_counter() - started
        value = loss.item()
        smoothed = value if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr_schedule.get_last_lr()[0]:.1e}")
        if step % cfg.log_every == 0:
            log.write(json.dumps({"step": step, "loss": smoothed, "lr": lr_schedule.get_last_lr()[0],
                                  "elapsed": round(elapsed, 1)}) + "\n")
            log.flush()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            training_state.save(state_path, step=step, elapsed=elapsed, settings=settings)
            export(smoothed)
        if success_check is not None and cfg.eval_every and step % cfg.eval_every == 0:
            exported = DiffusionPolicy.load(export_dir, device=device)
            rates = success_check(exported, tasks, cfg.eval_episodes)
            tqdm.write(f"step {step}: closed-loop success " + ", ".join(f"{t} {r:.0%}" for t, r in rates.items()))
            log.write(json.dumps({"step": step, "success": rates}) + "\n")
            log.flush()
    bar.close()
    log.close()
    return export_dir


# Checked before any data is collected (bac.configs.settings.check_settings); the policy group checks its own fields.
SETTINGS = {
    "task": (STR, None, False), "suite": (SEQ, None, False), "episodes": (INT, 1, False),
    "data_dir": (STR, None, True), "action_noise": (FLOAT, 0, False), "horizon": (INT, 1, False),
    "n_obs_steps": (INT, 1, False), "n_action_steps": (INT, 1, False), "steps": (INT, 1, False),
    "batch_size": (INT, 1, False), "lr": (FLOAT, 0, False), "weight_decay": (FLOAT, 0, False),
    "warmup_steps": (INT, 0, False), "ema_power": (FLOAT, 0, False), "ema_max_decay": (FLOAT, 0, False),
    "seed": (INT, 0, False), "device": (STR, None, False), "threads": (INT, 1, True),
    "run_dir": (STR, None, False), "export_dir": (STR, None, False), "export_half": (BOOL, None, False),
    "checkpoint_every": (INT, 1, False),
    "log_every": (INT, 1, False), "resume": (BOOL, None, False), "eval_every": (INT, 0, False),
    "eval_episodes": (INT, 1, False), "progress": (BOOL, None, False),
}


