"""Train a diffusion policy on scripted-expert demonstrations.

    python -m bac.policies.train policy=dpt task=push
    python -m bac.policies.train policy=dpt task=suite export_dir=policies/checkpoints/dpt-metaworld

Datasets are generated on demand (``envs.collect``) and read in robomimic's
layout. AdamW with linear warm-up and cosine decay (diffusers' schedule), EMA
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
from pathlib import Path

import hydra
import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bac.cli import BOOL, FLOAT, INT, SEQ, STR, check_settings, report_errors
from bac.configs import CONFIG_DIR
from bac.errors import CheckpointError, ConfigError
from bac.envs.collect import collect
from bac.envs.dataset import ImageLanguageWindows, WindowDataset

from .checkpointing import TrainingState, check_fits
from .config import IMAGE_PREFIX, PolicyConfig
from .policy import DiffusionPolicy
from .vla import frames_to_images


def task_list(cfg: DictConfig) -> list[str]:
    return list(cfg.suite) if cfg.task == "suite" else [str(cfg.task)]


def load_windows(tasks: list[str], episodes: int, data_dir, horizon: int, n_obs_steps: int,
                 action_noise: float = 0.0, obs_dim: int | None = None, action_dim: int | None = None):
    """All training windows of every task: obs ``[N, To, D]``, actions ``[N, H, A]``, task index ``[N]``.

    Every demo is validated at load (:mod:`bac.envs.dataset`: keys, lengths, NaN); its widths must be
    ``obs_dim`` / ``action_dim`` when given, and otherwise those of the first task's file (one policy
    is trained on all of them). Each failure is a :class:`bac.DataError` naming the file and the demo.
    """
    obs, actions, task_index, sources = [], [], [], {}
    for i, task in enumerate(tasks):
        path = collect(task, episodes, out_dir=data_dir, action_noise=action_noise, progress=False)
        data = WindowDataset(path, horizon=horizon, n_obs_steps=n_obs_steps, filter_key="train",
                             obs_dim=obs_dim, action_dim=action_dim)
        obs_dim, action_dim = data.obs_dim, data.action_dim
        o, a = data.window(np.arange(len(data)))
        obs.append(o)
        actions.append(a)
        task_index.append(np.full(len(data), i))
        sources[task] = {"file": path.name, "train_demos": len(data.demos), "windows": len(data)}
    as_tensor = lambda parts, dtype: torch.as_tensor(np.concatenate(parts), dtype=dtype)
    return as_tensor(obs, torch.float32), as_tensor(actions, torch.float32), as_tensor(task_index, torch.long), sources


def load_image_windows(tasks: list[str], episodes: int, data_dir, horizon: int, n_obs_steps: int, action_noise: float,
                       state_keys: list[str], cameras: tuple[str, ...], image_size: int):
    """The windows of a vision-language-action head: state ``[N, To, D]``, actions ``[N, H, A]``, every
    window's current frame per camera (uint8 ``[N, S, S, 3]``, kept as uint8 in memory) and the index
    of its instruction in the returned list of instructions."""
    state, actions, frames, instruction_index, instructions, sources = [], [], {c: [] for c in cameras}, [], [], {}
    for task in tasks:
        path = collect(task, episodes, out_dir=data_dir, action_noise=action_noise, progress=False,
                       cameras=cameras, image_size=image_size)
        data = ImageLanguageWindows(path, state_keys, cameras, horizon, n_obs_steps, "train", image_size=image_size)
        o, a = data.windows.window(np.arange(len(data)))
        state.append(o)
        actions.append(a)
        for camera in cameras:
            frames[camera].append(data.frames[camera])
        for text in data.instructions:
            if text not in instructions:
                instructions.append(text)
        instruction_index.append(np.array([instructions.index(t) for t in data.instructions]))
        sources[task] = {"file": path.name, "train_demos": len(data.windows.demos), "windows": len(data)}
    return (torch.as_tensor(np.concatenate(state)), torch.as_tensor(np.concatenate(actions)),
            {c: torch.as_tensor(np.concatenate(f)) for c, f in frames.items()},
            torch.as_tensor(np.concatenate(instruction_index)), instructions, sources)


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


def success_check(policy: DiffusionPolicy, tasks: list[str], episodes: int) -> dict[str, float]:
    """Closed-loop success rate per task on held-out seeds (100000 and up)."""
    from bac.runtime import run_episodes

    rates = {}
    for task in tasks:
        results = list(run_episodes(policy, task, range(100_000, 100_000 + episodes)))
        rates[task] = sum(r["success"] for r in results) / len(results)
    return rates


def train(cfg: DictConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    tasks = task_list(cfg)
    run_dir, export_dir = Path(cfg.run_dir), Path(cfg.export_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    checked = policy_config(cfg, 1, 1, tasks)  # refuse bad policy settings before collecting any data
    if checked.is_vla:
        state_keys = list(checked.input_features["observation.state"].keys or ["state"])
        obs, actions, frames, task_index, instructions, sources = load_image_windows(
            tasks, cfg.episodes, cfg.data_dir, cfg.horizon, cfg.n_obs_steps, cfg.action_noise, state_keys,
            checked.cameras, checked.model.image_size)
    else:
        obs, actions, task_index, sources = load_windows(tasks, cfg.episodes, cfg.data_dir, cfg.horizon,
                                                         cfg.n_obs_steps, cfg.action_noise)
        frames, instructions = {}, None
    policy = DiffusionPolicy(policy_config(cfg, obs.shape[-1], actions.shape[-1], tasks))
    policy.obs_normalizer.fit(obs)
    policy.action_normalizer.fit(actions)
    if instructions is not None:
        # Encoded once and saved with the checkpoint: the demonstrations' instructions, and the held-out
        # paraphrases too (the encoder is frozen, so this leaks nothing), so evaluation needs no language model.
        from bac.envs.instructions import INSTRUCTIONS

        policy.language.add(instructions + [t for task in tasks for t in INSTRUCTIONS.get(task, ())])
    policy.to(device).train()
    obs, actions, task_index = obs.to(device), actions.to(device), task_index.to(device)

    def training_batch(index: torch.Tensor) -> dict:
        batch = {"observation.state": obs[index], "action": actions[index]}
        if instructions is None:
            batch["task"] = task_index[index]
            return batch
        batch["task"] = [instructions[i] for i in task_index[index].tolist()]
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
            check_fits(policy, state["model"], f"this {policy.architecture} policy")

        state = training_state.restore(state_path, same_run)
        step, elapsed = int(state["step"]), float(state["elapsed"])
        print(f"resumed {state_path} at step {step}")

    def export(loss: float) -> None:
        exported = copy.deepcopy(policy).eval()
        ema.copy_to(exported.model.parameters())
        exported.provenance = {
            "command": "python -m bac.policies.train " + " ".join(sys.argv[1:]),
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
        if cfg.eval_every and step % cfg.eval_every == 0:
            exported = DiffusionPolicy.load(export_dir, device=device)
            rates = success_check(exported, tasks, cfg.eval_episodes)
            tqdm.write(f"step {step}: closed-loop success " + ", ".join(f"{t} {r:.0%}" for t, r in rates.items()))
            log.write(json.dumps({"step": step, "success": rates}) + "\n")
            log.flush()
    bar.close()
    log.close()
    return export_dir


# Checked before any data is collected (bac.cli.check_settings); the policy group checks its own fields.
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


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    check_settings(cfg, SETTINGS, CONFIG_DIR / "train.yaml")
    path = train(cfg)
    print(f"policy checkpoint: {path}")


if __name__ == "__main__":
    main()
