"""The training loop of a diffusion policy (``bac-train`` runs it on collected demonstrations).

AdamW with linear warm-up and cosine decay (diffusers' schedule), EMA
weights (diffusers' ``EMAModel``), deterministic seeding. Every
``checkpoint_every`` steps the full training state goes to ``run_dir`` (resumed
automatically after an interruption) and the EMA policy is exported to
``export_dir`` as safetensors + JSON (``export_half=true``: the denoiser's weights stored as float16).

Settings are checked before any work (:func:`check_training_settings`: impossible values, the device, the
output folders), free space before the first step; a write that fails later stops training with a
:class:`bac.ConfigError` and keeps the last complete checkpoint.
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
from typing import IO, Any

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bac.configs.settings import BOOL, FLOAT, INT, SEQ, STR
from bac.checks import check_device
from bac.errors import CheckpointError, ConfigError
from bac.files import check_free_space, check_output_folder

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


MAX_BATCH_SIZE = 65_536  # a batch's windows are drawn at once: a larger one only exhausts memory
# Values the settings' types and minimums let through but training cannot use: (the rule in words, the test).
_VALUE_RULES = {
    "lr": ("> 0", lambda v: v > 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "ema_power": ("> 0", lambda v: v > 0),
    "ema_max_decay": ("in [0, 1]", lambda v: 0 <= v <= 1),
}


def check_training_settings(cfg: DictConfig) -> None:
    """Refuse, before any data is read or collected, what ``check_settings``' types and minimums let through:
    a learning rate of 0 or NaN, decays beyond 1, a batch too large for memory, a device this machine lacks,
    and a ``run_dir`` or ``export_dir`` that is a file or cannot be written. Each a :class:`bac.ConfigError`."""
    for key, (rule, holds) in _VALUE_RULES.items():
        value = cfg[key]
        if not (math.isfinite(value) and holds(value)):
            raise ConfigError(f"setting {key} must be a finite number {rule}, got {value!r}")
    if cfg.batch_size > MAX_BATCH_SIZE:
        raise ConfigError(f"setting batch_size must be <= {MAX_BATCH_SIZE}, got {cfg.batch_size}")
    check_device(cfg.device)
    check_output_folder(cfg.run_dir, "run_dir")
    check_output_folder(cfg.export_dir, "export_dir")


def train(cfg: DictConfig, data: Any, tasks: list[str], *,
          success_check: Callable[[DiffusionPolicy], dict[str, float]] | None = None,
          extra_instructions: Sequence[str] = ()) -> Path:
    """Train a policy on ``data`` (the windows of ``tasks``: :class:`bac.envs.windows.TrainingWindows` or
    any object with its fields) with the settings of ``configs/train.yaml``.

    ``success_check(policy)``: closed-loop success per task, run every ``eval_every`` steps on the exported
    policy; ``extra_instructions``: encoded with the demonstrations' ones (held-out paraphrases).
    Returns the export folder.
    """
    check_training_settings(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)  # before the policy is made: its initial weights come from this stream
    device = torch.device(cfg.device)
    run_dir, export_dir = Path(cfg.run_dir), Path(cfg.export_dir)
    policy = _fitted_policy(cfg, data, tasks, extra_instructions, device)
    _check_room(policy, run_dir, export_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    training_batch = _batch_maker(data, device)
    state = _training_state(policy, cfg, device)
    settings = OmegaConf.to_container(cfg, resolve=True)
    state_path = run_dir / "train_state.pt"
    step, elapsed = _resumed(state, state_path, settings) if cfg.resume and state_path.exists() else (0, 0.0)

    try:
        _train_steps(cfg, state, training_batch, data, settings, step, elapsed, success_check, device)
    except OSError as err:  # a disk filled (or a folder made read-only) since the checks
        raise ConfigError(f"training stopped: cannot write {err.filename or run_dir} "
                          f"({err.strerror or err}); the last complete checkpoint is kept: free some space "
                          "(or choose another run_dir / export_dir) and run again to resume") from err
    return export_dir


def _train_steps(cfg: DictConfig, state: TrainingState, training_batch: Callable[[torch.Tensor], dict], data: Any,
                 settings: dict, step: int, elapsed: float,
                 success_check: Callable[[DiffusionPolicy], dict[str, float]] | None, device: torch.device) -> None:
    """Optimise from ``step`` to ``cfg.steps``, logging, checkpointing and exporting on the way."""
    run_dir, export_dir = Path(cfg.run_dir), Path(cfg.export_dir)
    state_path = run_dir / "train_state.pt"
    with open(run_dir / "log.jsonl", "a") as log:
        smoothed = math.nan  # the loss's moving average, for the bar, the log and the export (not resumed)
        bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress,
                   desc=f"train {cfg.policy.name}-{cfg.task}")
        while step < cfg.steps:
            started = time.perf_counter()
            loss = _optimisation_step(state, training_batch, len(data.state), cfg.batch_size)
            step += 1
            elapsed += time.perf_counter() - started
            value = loss.item()
            smoothed = value if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * value
            lr = state.lr_schedule.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.1e}")
            if step % cfg.log_every == 0:
                _append(log, {"step": step, "loss": smoothed, "lr": lr, "elapsed": round(elapsed, 1)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                # the export first: a run resumed after a failed write exports again at its next checkpoint
                _export(state, export_dir, bool(cfg.export_half),
                        _provenance(settings, step, smoothed, elapsed, data.sources))
                state.save(state_path, step=step, elapsed=elapsed, settings=settings)
            if success_check is not None and cfg.eval_every and step % cfg.eval_every == 0:
                rates = success_check(DiffusionPolicy.load(export_dir, device=device))
                tqdm.write(f"step {step}: closed-loop success "
                           + ", ".join(f"{t} {r:.0%}" for t, r in rates.items()))
                _append(log, {"step": step, "success": rates})
        bar.close()


def _check_room(policy: DiffusionPolicy, run_dir: Path, export_dir: Path) -> None:
    """Refuse to train when the output folders lack the space for the checkpoints, before the first step."""
    weights = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    # the training state holds the weights, AdamW's two moments and the EMA copy (4x), the export 1x;
    # each is written beside the previous file before replacing it (2x)
    needed = 10 * weights
    what = "the training state and the export (10 times the weights' size, temporary copies included)"
    for setting, folder in (("run_dir", run_dir), ("export_dir", export_dir)):
        check_free_space(folder, needed, setting, what)


def _fitted_policy(cfg: DictConfig, data: Any, tasks: list[str], extra_instructions: Sequence[str],
                   device: torch.device) -> DiffusionPolicy:
    """A new policy for ``data``'s widths, its normalisers fitted to the data, on ``device`` in training mode."""
    policy = DiffusionPolicy(policy_config(cfg, data.state.shape[-1], data.actions.shape[-1], tasks))
    policy.obs_normalizer.fit(data.state)
    policy.action_normalizer.fit(data.actions)
    if data.instructions is not None:
        # Encoded once and saved with the checkpoint: the demonstrations' instructions, and the held-out
        # paraphrases too (the encoder is frozen, so this leaks nothing), so evaluation needs no language model.
        policy.language.add(data.instructions + list(extra_instructions))
    return policy.to(device).train()


def _batch_maker(data: Any, device: torch.device) -> Callable[[torch.Tensor], dict]:
    """``training_batch(index)``: the windows at ``index`` as a policy batch (tasks by index, or by
    instruction for a vision-language head, with its camera frames)."""
    state, actions, task_index = data.state.to(device), data.actions.to(device), data.task_index.to(device)
    frames, instructions = data.frames, data.instructions

    def training_batch(index: torch.Tensor) -> dict:
        batch = {STATE: state[index], ACTION: actions[index]}
        if instructions is None:
            batch[TASK] = task_index[index]
            return batch
        batch[TASK] = [instructions[i] for i in task_index[index].tolist()]
        for camera, f in frames.items():  # uint8 in memory, float [0, 1] per batch
            batch[IMAGE_PREFIX + camera] = frames_to_images(f[index.cpu()]).to(device)
        return batch

    return training_batch


def _training_state(policy: DiffusionPolicy, cfg: DictConfig, device: torch.device) -> TrainingState:
    """The policy with a fresh optimiser, LR schedule, EMA and random stream (seeded by ``cfg.seed``)."""
    optimizer = _optimizer(policy, cfg)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(policy.model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, power=cfg.ema_power)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return TrainingState(policy, optimizer, lr_schedule, ema, generator)


def _resumed(state: TrainingState, state_path: Path, settings: dict) -> tuple[int, float]:
    """Restore ``state`` from an interrupted run of the same policy and task; its step and training seconds."""
    policy = state.model

    def same_run(saved: dict) -> None:
        if saved["settings"]["policy"] != settings["policy"] or saved["settings"]["task"] != settings["task"]:
            raise CheckpointError(f"{state_path} belongs to another policy or task; use another run_dir or "
                                  "resume=false")
        check_state_fits(policy, saved["model"], f"this {policy.architecture} policy")

    saved = state.restore(state_path, same_run)
    step, elapsed = int(saved["step"]), float(saved["elapsed"])
    print(f"resumed {state_path} at step {step}")
    return step, elapsed


def _optimisation_step(state: TrainingState, training_batch: Callable[[torch.Tensor], dict], n_windows: int,
                       batch_size: int) -> torch.Tensor:
    """One AdamW step on a random batch of windows (drawn from ``state.generator``); the batch's loss."""
    policy, generator = state.model, state.generator
    index = torch.randint(0, n_windows, (batch_size,), generator=generator, device=generator.device)
    loss = policy.compute_loss(training_batch(index), generator=generator)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
    state.optimizer.step()
    state.lr_schedule.step()
    state.ema.step(policy.model.parameters())
    return loss


def _provenance(settings: dict, step: int, loss: float, elapsed: float, sources: Any) -> dict:
    """How an exported policy was made (saved in its config)."""
    return {
        "command": "bac-train " + " ".join(sys.argv[1:]),
        "settings": settings,
        "step": step,
        "loss": loss,
        "train_seconds": round(elapsed, 1),
        "datasets": sources,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def _export(state: TrainingState, export_dir: Path, half: bool, provenance: dict) -> None:
    """Save a copy of the policy with the EMA weights as the inference checkpoint; training goes on with its own."""
    exported = copy.deepcopy(state.model).eval()
    state.ema.copy_to(exported.model.parameters())
    exported.provenance = provenance
    exported.save(export_dir, half=half)


def _append(log: IO[str], record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()  # a killed run keeps every line written so far


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


