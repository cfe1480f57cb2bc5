"""The evaluator behind ``python -m bac.eval``: success and control frequency for every method.

Data path: load the policy checkpoint -> calibration observations from the
demonstrations -> load or calibrate the plans (cached under ``plan_cache``)
-> seeded, paired, vectorised rollouts per task and method (appended as JSON
lines, resumable) -> interleaved batch-1 latency -> report JSON, Markdown table
and plots in the output directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import bac
from bac.configs import CONFIG_DIR
from bac.configs.settings import BOOL, FLOAT, INT, SEQ, STR, check_settings
from bac.envs.calibration_inputs import CALIBRATION_INPUTS, calibration_inputs_facts, draw_calibration_inputs, \
    shipped_calibration_inputs
from bac.envs.collect import collect, default_data_dir
from bac.envs.dataset import ImageLanguageWindows, calibration_observations
from bac.envs.instructions import instruction, swapped_task
from bac.envs.metaworld_env import ALL_TASKS, make_env, make_vector_env
from bac.envs.tasks import HARD_SUITE
from bac.envs.video import video_path, write_video
from bac.errors import ConfigError
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.config import PolicyConfig
from bac.policies.policy import DiffusionPolicy
from bac.policies.tuned import TunedConfig
from bac.policies.vla import frames_to_images
from bac.runtime import EnvPool, check_compatible, observation_slices, record_episode

from . import report as reporting
from . import shards
from .budget import build_budgeted
from .closed_loop import run_task
from .latency import PREFIX, flops_per_call, measure_latency
from .timing import summarize
from .variants import Variant, applied, flops_target, load_or_build, parse_variants, plan_path

UNTRAINED = "untrained:"


class EvalError(ConfigError):
    """A bad evaluation setting: reported as one clear line and exit status 2."""


# Checked before any work starts (bac.configs.settings.check_settings); the policy and methods check their own fields.
SETTINGS = {
    "checkpoint": (STR, None, False), "untrained_tasks": (SEQ, None, False), "tasks": (SEQ, None, False),
    "episodes": (INT, 0, False), "seed": (INT, 0, False), "max_episode_steps": (INT, 1, True),
    "num_envs": (INT, 1, False), "sampler.kind": (STR, None, True), "sampler.steps": (INT, 1, True),
    "instructions": (STR, None, False),
    "M": (INT, 1, False), "n": (INT, 0, False), "run_methods": (SEQ, None, False),
    "calibration.samples": (INT, 1, False), "calibration.seed": (INT, 0, False),
    "calibration.episodes": (INT, 1, False), "calibration.recompute": (BOOL, None, False),
    "tolerance_points": (FLOAT, 0, False), "threads": (INT, 1, True),
    "latency.repeats": (INT, 1, False), "latency.warmup": (INT, 0, False), "latency.threads": (INT, 1, False),
    "device": (STR, None, False), "plan_cache": (STR, None, False), "video": (BOOL, None, False),
    "video_settings.size": (INT, 16, False), "video_settings.fps": (INT, 1, False),
    "out_dir": (STR, None, False), "progress": (BOOL, None, False), "tuned": (STR, None, True),
    "mode": (STR, None, False), "realtime.clock": (STR, None, False), "realtime.blend": (INT, 0, False),
    "realtime.on_late": (STR, None, False), "realtime.execute_steps": (INT, 1, True),
    "realtime.adapt_lead": (BOOL, None, False), "shard.index": (INT, 0, False), "shard.count": (INT, 1, False),
}


def check_eval_settings(cfg: DictConfig) -> None:
    check_settings(cfg, SETTINGS, CONFIG_DIR / "eval.yaml")


def apply_threads(cfg: DictConfig) -> None:
    """``threads``: torch's intra-op threads for everything the run computes but the batch-1 latency
    (``latency.threads``); null keeps torch's default (``OMP_NUM_THREADS``, else one per core)."""
    threads = cfg.get("threads")
    if threads is not None:
        torch.set_num_threads(int(threads))


def weights_digest(checkpoint: Path) -> str:
    """Short SHA-256 of a checkpoint's weights: retrained weights of the same shape get a new one."""
    digest = hashlib.sha256()
    with open(checkpoint / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_policy(cfg: DictConfig) -> tuple[DiffusionPolicy, Path, bool]:
    """The policy to evaluate, where its plans are cached, and whether it is trained.

    Plans and calibration of a checkpoint live in ``<plan_cache>/<checkpoint>-<weights digest>/``
    (a shipped checkpoint may sit in a read-only install): their fit check compares the model's
    structure only, so a retrained checkpoint of the same shape must not find (and silently
    reuse) the plans of its predecessor.
    """
    def env_spaces(task: str):
        env = make_env(task)
        try:
            return env.observation_space, env.action_space, observation_slices(env)
        finally:
            env.close()

    if str(cfg.checkpoint).startswith(UNTRAINED):
        name = str(cfg.checkpoint)[len(UNTRAINED):]
        config_path = CONFIG_DIR / "policy" / f"{name}.yaml"
        if not config_path.exists():
            raise EvalError(f"unknown policy config {name!r} (no configs/policy/{name}.yaml)")
        spec = OmegaConf.load(config_path)
        tasks = list(cfg.untrained_tasks)
        if not tasks:
            raise EvalError("untrained_tasks is empty: an untrained policy takes its shapes from the first task's env")
        observation_space, action_space, _ = env_spaces(tasks[0])  # the feature shapes come from the env
        try:
            config = PolicyConfig.build(spec.architecture, OmegaConf.to_container(spec.model, resolve=True),
                                        state_dim=int(observation_space.shape[0]), action_dim=int(action_space.shape[0]),
                                        tasks=tasks, provenance={"untrained": name})
        except ValueError as err:
            raise EvalError(f"configs/policy/{name}.yaml: {err}") from err
        torch.manual_seed(0)  # deterministic random weights, so cached plans stay valid
        policy = DiffusionPolicy(config)
        obs = np.concatenate([calibration_observations(collect(t, cfg.calibration.episodes, progress=False), 256)
                              for t in tasks])
        policy.obs_normalizer.fit(obs)
        bounds = np.stack([action_space.low, action_space.high])
        if np.isfinite(bounds).all():  # actions span the env's action space (Meta-World's [-1, 1]: the identity)
            policy.action_normalizer.fit(bounds)
        return policy.to(cfg.device).eval(), Path(cfg.plan_cache) / f"untrained-{name}", False
    directory = resolve_checkpoint(cfg.checkpoint)
    try:
        policy = DiffusionPolicy.load(directory, device=cfg.device)
        if policy.tasks:  # the checkpoint's features must fit the env it is evaluated on
            check_compatible(policy, *env_spaces(policy.tasks[0]))
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    return policy, Path(cfg.plan_cache) / f"{directory.name}-{weights_digest(directory)}", True


def resolve_tasks(cfg: DictConfig, policy: DiffusionPolicy) -> list[str]:
    tasks = list(cfg.tasks)
    if tasks == ["suite"]:
        tasks = list(policy.tasks)
    elif tasks == ["hard"]:
        tasks = list(HARD_SUITE)
    for task in tasks:
        if task not in ALL_TASKS:
            raise EvalError(f"unknown task {task!r}; Meta-World tasks include {', '.join(ALL_TASKS[:8])}, ...")
        if policy.tasks and task not in policy.tasks:
            raise EvalError(f"the policy was trained on {policy.tasks}, not on {task!r}")
    if not tasks:
        raise EvalError("no tasks to evaluate")
    return tasks


INSTRUCTION_SETS = ("held_out", "train", "swapped")


def episode_instructions(cfg: DictConfig, policy: DiffusionPolicy, task: str):
    """The instruction of each episode (``seed -> text``) for a policy that reads instructions, else None.

    ``instructions``: ``held_out`` (the paraphrases no demonstration uses, in turn by seed), ``train``
    (the demonstrations' own), or ``swapped`` (the held-out paraphrases of the *other* task of the
    shared-scene pair: does the policy follow the words or the scene?).
    """
    if not policy.reads_instructions:
        return None
    if cfg.instructions not in INSTRUCTION_SETS:
        raise EvalError(f"instructions must be one of {INSTRUCTION_SETS}, got {cfg.instructions!r}")
    try:
        source = swapped_task(task) if cfg.instructions == "swapped" else task
        instruction(source, 0)
    except KeyError as err:
        raise EvalError(str(err.args[0])) from err
    held_out = cfg.instructions != "train"
    return lambda seed: instruction(source, seed, held_out=held_out)


def calibration_settings(cfg: DictConfig, policy: DiffusionPolicy) -> dict:
    return dict(samples=int(cfg.calibration.samples), episodes=int(cfg.calibration.episodes),
                seed=int(cfg.calibration.seed), n_obs_steps=policy.n_obs_steps)


def calibration_batch(cfg: DictConfig, policy: DiffusionPolicy) -> tuple[dict, str]:
    """Calibration observations from the demonstrations (never from evaluation episodes), spread over tasks,
    and where they came from (for the report).

    One policy batch: ``observation.state`` ``[N, n_obs_steps, D]`` and a ``task`` name per sample; for a
    policy that reads images and instructions, the demonstrations' frames and instructions too. A state
    checkpoint that ships its calibration inputs (``calibration_inputs.safetensors``, drawn with this run's
    ``calibration`` settings) needs no demonstrations: the shipped observations are the ones drawn here.
    """
    tasks = policy.tasks or [cfg.tasks[0]]
    per_task = -(-int(cfg.calibration.samples) // len(tasks))
    drawn = (f"drawn from {int(cfg.calibration.episodes)} expert demonstrations per task (collected on demand "
             f"under {default_data_dir()})")
    if policy.cameras:
        return image_calibration_batch(cfg, policy, tasks, per_task), drawn
    settings = calibration_settings(cfg, policy)
    states = None
    if policy.tasks and not str(cfg.checkpoint).startswith(UNTRAINED):
        directory = resolve_checkpoint(str(cfg.checkpoint))
        states = shipped_calibration_inputs(directory, calibration_inputs_facts(tasks, **settings), policy.obs_dim)
    if states is not None:
        names, source = [task for task in tasks for _ in range(per_task)], \
            f"shipped with the checkpoint ({directory / CALIBRATION_INPUTS})"
    else:
        (states, names), source = draw_calibration_inputs(tasks, **settings), drawn
    return {"observation.state": torch.as_tensor(states, dtype=torch.float32), "task": names}, source


def image_calibration_batch(cfg: DictConfig, policy: DiffusionPolicy, tasks: list[str], per_task: int) -> dict:
    """``calibration_batch`` of a vision-language policy: state, frames and instructions of demonstration frames."""
    size = policy.config.model.image_size
    keys = policy.input_features["observation.state"].keys or ("state",)
    # The demonstrations the head was trained on (image datasets are large: no second, noise-free set).
    action_noise = float(policy.provenance.get("settings", {}).get("action_noise", 0.0))
    state, images, texts = [], {c: [] for c in policy.cameras}, []
    for task in tasks:
        path = collect(task, cfg.calibration.episodes, progress=False, cameras=policy.cameras, image_size=size,
                       action_noise=action_noise)
        data = ImageLanguageWindows(path, keys, policy.cameras, horizon=1, n_obs_steps=policy.n_obs_steps,
                                    image_size=size, state_dim=policy.obs_dim)
        index = np.random.default_rng(cfg.calibration.seed).choice(len(data), size=per_task, replace=per_task > len(data))
        state.append(data.windows.window(index)[0])
        for camera in policy.cameras:
            images[camera].append(data.frames[camera][index])
        texts += [data.instructions[i] for i in index]
    batch = {"observation.state": torch.as_tensor(np.concatenate(state), dtype=torch.float32), "task": texts}
    for camera, frames in images.items():
        batch[f"observation.images.{camera}"] = frames_to_images(np.concatenate(frames)).to(policy.device)
    return batch


def load_or_calibrate(cfg: DictConfig, policy: DiffusionPolicy, plan_dir: Path, batch: dict) -> bac.Calibration:
    path = plan_dir / (f"calibration-{policy.sampler_kind}{policy.num_inference_steps}"
                       f"-n{cfg.calibration.samples}-seed{cfg.calibration.seed}.safetensors")
    if path.exists() and not cfg.calibration.recompute:
        calibration = bac.Calibration.load(path)
        try:
            calibration.check_fits(bac.describe(policy.model), policy.num_inference_steps, policy.sampler)
        except bac.PlanMismatchError as err:
            raise EvalError(f"cached calibration {path} does not fit this policy or sampler ({err}); "
                            "re-run with calibration.recompute=true to replace it") from err
        return calibration
    calibration = bac.calibrate(policy.model, policy.predict_action_chunk, [batch], seed=cfg.calibration.seed,
                                scheduler=policy.sampler)
    calibration.save(path)
    return calibration


def tuned_variant(policy: DiffusionPolicy, path: Path) -> tuple[Variant, bac.Method | None, Path | None]:
    """The ``tuned=`` variant: a ``python -m bac.tune`` pick, its method (plan checked to fit) and plan file."""
    tuned = TunedConfig.load(path)
    variant = Variant("tuned", tuned.sampler, tuned.steps, tuned.method, dict(tuned.params))
    policy.set_sampler(tuned.sampler, tuned.steps)
    method = tuned.method_for(policy)  # the stand-in policy.use_tuned(path) applies
    if method is not None:
        method.schedule.check_fits(bac.describe(policy.model), num_steps=policy.num_inference_steps,
                                   scheduler=policy.sampler)
    return variant, method, tuned.plan_path()


def settings_digest(cfg: DictConfig) -> str:
    keys = ("checkpoint", "tasks", "episodes", "seed", "sampler", "methods", "run_methods", "calibration", "M", "n",
            "tuned")
    relevant = {k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in keys}
    relevant["calibration"] = {k: v for k, v in relevant["calibration"].items() if k != "recompute"}
    if relevant["tuned"] is None:  # no tuned file: the digest of runs made before the setting existed
        del relevant["tuned"]
    if cfg.instructions != "held_out":  # other instructions are another run (the default keeps earlier digests)
        relevant["instructions"] = cfg.instructions
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    if (checkpoint / "model.safetensors").is_file():  # a retrained checkpoint is another run
        relevant["weights"] = weights_digest(checkpoint)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


def output_dir(cfg: DictConfig, kind: str = "eval", digest: str | None = None) -> Path:
    """``out_dir``, or with ``auto`` ``outputs/<kind>/<checkpoint>-<settings digest>`` (one folder per run)."""
    if cfg.out_dir != "auto":
        return Path(cfg.out_dir)
    name = str(cfg.checkpoint).replace(UNTRAINED, "untrained-").rstrip("/").split("/")[-1]
    return Path("outputs") / kind / f"{name}-{digest or settings_digest(cfg)}"


def _versions() -> dict:
    names = ("torch", "diffusers", "gymnasium", "metaworld", "mujoco", "numpy", "hydra-core", "bac")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def save_videos(cfg: DictConfig, policy: DiffusionPolicy, variants: list, built: dict, tasks: list[str],
                out: Path) -> list[dict]:
    """One rollout GIF per variant and task (``video=true``): the first evaluation seed, at batch 1.

    Existing videos are kept, so a resumed run records only what is missing.
    """
    settings, records = cfg.video_settings, []
    for variant in variants:
        for task in tasks:
            path = video_path(out, variant.name, task)
            record = {"method": variant.name, "task": task, "seed": int(cfg.seed), "path": str(path)}
            if path.exists():
                records.append(record)
                continue
            with applied(policy, variant, built.get(variant.name)):
                generator = torch.Generator(device=policy.device).manual_seed(int(cfg.seed))
                result, frames = record_episode(policy, task, int(cfg.seed), make_env=make_vector_env, generator=generator,
                                                max_episode_steps=cfg.max_episode_steps,
                                                camera_name=str(settings.camera), size=int(settings.size))
            write_video(frames, path, fps=float(settings.fps))
            records.append(record | result)
    return records


def claim_out_dir(cfg: DictConfig, out: Path, digest: str) -> None:
    """Make ``out`` this run's (``run.json``: settings digest and config); one holding another run's is refused."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()).get("digest") != digest:
        raise EvalError(f"{out} holds a run with other settings; pick another out_dir (or out_dir=auto)")
    run_file.write_text(json.dumps({"digest": digest, "config": OmegaConf.to_container(cfg, resolve=True)}, indent=1))


def budget_path(out: Path, variant: Variant) -> Path:
    return out / "plans" / f"{variant.name}.json"


def budget_plans(cfg: DictConfig, policy: DiffusionPolicy, variants: list[Variant], built: dict,
                 calibrations: dict, batch: dict, out: Path, control_hz: float | None = None,
                 actions_per_chunk: int | None = None) -> dict[str, dict]:
    """Make (or, when resuming a run, reload) the plans of the budget variants; what each was made for."""
    budgeted = [v for v in variants if v.budgeted]
    saved = {v.name: budget_path(out, v) for v in budgeted}
    if budgeted and all(path.exists() for path in saved.values()):  # a resumed run keeps the plans its episodes used
        info = {}
        for variant in budgeted:
            record = json.loads(saved[variant.name].with_suffix(".budget.json").read_text())
            built[variant.name] = bac.Method("budget", bac.Plan.load(saved[variant.name]), params=record["params"])
            info[variant.name] = record["budget"] | {"reloaded": True}
        return info
    info = build_budgeted(policy, variants, built, calibrations, batch, threads=int(cfg.latency.threads),
                          repeats=int(cfg.latency.repeats), warmup=int(cfg.latency.warmup), control_hz=control_hz,
                          actions_per_chunk=actions_per_chunk)
    for variant in budgeted:
        built[variant.name].schedule.save(saved[variant.name])
        saved[variant.name].with_suffix(".budget.json").write_text(json.dumps(
            {"params": built[variant.name].params, "budget": info[variant.name]}, indent=1))
    return info


@dataclasses.dataclass
class Setup:
    """What every evaluation mode starts from: the policy at its full sampler and the compared variants, built."""
    policy: DiffusionPolicy
    plan_dir: Path
    trained: bool
    tasks: list[str]
    base_sampler: str
    base_steps: int
    method_config: dict
    demo_obs: dict
    variants: list[Variant]
    calibrations: dict[str, bac.Calibration]
    built: dict[str, bac.Method]
    tuned_plan: Path | None
    seconds: dict = dataclasses.field(default_factory=dict)  # wall time per phase of this invocation
    calibration_inputs: str = ""  # where the calibration observations came from

    @property
    def latency_batch(self) -> dict:
        """Batch 1: one demonstration observation."""
        return {key: value[:1] for key, value in self.demo_obs.items()}


def prepare(cfg: DictConfig) -> Setup:
    """Load the policy, set its full sampler, calibrate and build every variant but the budget ones."""
    check_eval_settings(cfg)
    apply_threads(cfg)
    policy, plan_dir, trained = load_policy(cfg)
    tasks = resolve_tasks(cfg, policy)
    try:
        if cfg.sampler.kind is not None:  # null: the policy's own default sampler
            policy.set_sampler(cfg.sampler.kind, cfg.sampler.steps)
        elif cfg.sampler.steps is not None:
            policy.set_sampler(policy.sampler_kind, cfg.sampler.steps)
    except ValueError as err:
        raise EvalError(str(err)) from err
    base_sampler, base_steps = policy.sampler_kind, policy.num_inference_steps
    method_config = OmegaConf.to_container(cfg.methods, resolve=True)
    start = time.perf_counter()
    demo_obs, inputs_source = calibration_batch(cfg, policy)
    seconds = {"calibration_inputs": time.perf_counter() - start}
    start = time.perf_counter()

    try:
        variants = parse_variants(method_config, cfg.run_methods, base_sampler, base_steps, auto_steps=base_steps)
        # One calibration per sampler and step count that a calibrated method runs on (a plan is made for
        # the sampler it caches: bac on DDIM-10 beside full DDPM-100 in one run).
        calibrations: dict[str, bac.Calibration] = {}
        built: dict[str, bac.Method] = {}
        for variant in variants:
            if variant.method is not None:
                policy.set_sampler(variant.sampler, variant.steps)
                calibration = None
                if variant.calibrated:
                    key = f"{variant.sampler}{variant.steps}"
                    if key not in calibrations:
                        calibrations[key] = load_or_calibrate(cfg, policy, plan_dir, demo_obs)
                    calibration = calibrations[key]
                if not variant.budgeted:  # made by budget_plans, once the others exist (one may be its target)
                    built[variant.name] = load_or_build(policy, variant, calibration, plan_dir,
                                                        cfg.calibration.recompute)
        tuned_plan = None
        if cfg.tuned is not None:  # a bac.tune pick, evaluated beside the configured methods
            variant, method, tuned_plan = tuned_variant(policy, Path(cfg.tuned))
            variants.append(variant)
            if method is not None:
                built[variant.name] = method
        policy.set_sampler(base_sampler, base_steps)
    except (ValueError, bac.PlanMismatchError) as err:
        raise EvalError(str(err)) from err
    seconds["calibration_and_plans"] = time.perf_counter() - start
    return Setup(policy, plan_dir, trained, tasks, base_sampler, base_steps, method_config, demo_obs, variants,
                 calibrations, built, tuned_plan, seconds, inputs_source)


def count_flops(setup: Setup, built: dict[str, bac.Method]) -> tuple[dict[str, int], dict[str, float], int]:
    """FLOPs and skipped share per variant, and full computation's FLOPs; resolves ``steps: auto[:<name>]``
    variants (in ``setup.variants``) to as many steps as that variant's FLOPs (``bac`` by default)."""
    policy, variants = setup.policy, setup.variants
    per_step, flops, skipped, prepare_flops = flops_per_call(policy, variants, built, setup.latency_batch)
    auto = {v.name: target for v in variants
            if (target := flops_target(setup.method_config.get(v.name, {}).get("steps"))) is not None}
    matched = {}
    for name, target in auto.items():  # as many steps as the target method costs
        if target not in built:
            raise EvalError(f"method {name!r} matches the FLOPs of {target!r}, which is not a caching method "
                            "of this run")
        # the denoiser's FLOPs only: the per-call work (a VLA head's prefix) is paid once whatever the step count
        target_steps = next(v.steps for v in variants if v.name == target)
        matched[name] = max(1, round((flops[target] - prepare_flops(target_steps)) / per_step))
        flops[name] = matched[name] * per_step + prepare_flops(matched[name])
    setup.variants = [dataclasses.replace(v, steps=matched[v.name]) if v.name in matched else v for v in variants]
    return flops, skipped, setup.base_steps * per_step + prepare_flops(setup.base_steps)


def run(cfg: DictConfig) -> dict:
    setup = prepare(cfg)
    policy, trained, tasks = setup.policy, setup.trained, setup.tasks
    base_sampler, base_steps, built = setup.base_sampler, setup.base_steps, setup.built
    latency_batch, calibrations = setup.latency_batch, setup.calibrations
    out = output_dir(cfg)
    if int(cfg.shard.count) > 1 and not (trained and cfg.episodes > 0):
        raise EvalError("shards share out episodes: a run without episodes (episodes=0, an untrained policy) is "
                        "not sharded (shard.count=1)")
    if int(cfg.shard.count) > 1 and any(v.budgeted for v in setup.variants):
        # Each shard would measure its own plan on its own (loaded) machine: not one run any more.
        raise EvalError("budget variants are made from latency measured in the run: evaluate them unsharded "
                        "(shard.count=1)")
    try:
        budgets = budget_plans(cfg, policy, setup.variants, built, calibrations, latency_batch, out)
    except (ValueError, bac.PlanMismatchError) as err:
        raise EvalError(str(err)) from err
    finally:
        policy.set_sampler(base_sampler, base_steps)
    flops, skipped, full_flops = count_flops(setup, built)
    variants = setup.variants

    claim_out_dir(cfg, out, settings_digest(cfg))

    # Closed-loop success, paired over seeds; a shard runs its share of the cells (eval/shards.py).
    seeds = list(range(int(cfg.seed), int(cfg.seed) + int(cfg.episodes)))
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    cells = [(task, v.name) for task in tasks for v in variants]
    try:
        mine = set(shards.shard_cells(cells, index, count))
    except ValueError as err:
        raise EvalError(str(err)) from err
    if trained and cfg.episodes > 0:
        logged = shards.logged_episodes(out)
        log_path = shards.log_path(out, index, count)
        by_name = {v.name: v for v in variants}
        start = time.perf_counter()
        with EnvPool(make_vector_env) as envs:  # one set of environments per task, shared by every method
            for task, name in (cell for cell in cells if cell in mine):
                with applied(policy, by_name[name], built.get(name)):
                    run_task(policy, task, name, seeds, log_path, num_envs=int(cfg.num_envs),
                             max_episode_steps=cfg.max_episode_steps, progress=cfg.progress,
                             instructions=episode_instructions(cfg, policy, task), envs=envs, logged=logged)
        setup.seconds["rollouts"] = time.perf_counter() - start
        left = shards.missing(out, cells, seeds)
        if count > 1 and (left or not shards.claim_report(out)):  # another shard still runs, or reports
            print(f"[bac.eval] shard {index} of {count} done in {out}; {left} episodes of other shards to go"
                  + ("" if left else "; another shard writes the report"))
            return {"out_dir": str(out), "shard": {"index": index, "count": count, "episodes_left": left}}
    try:
        return report(cfg, setup, out, budgets, flops, skipped, full_flops, seeds)
    finally:
        if count > 1:
            shards.release_report(out)


def report(cfg: DictConfig, setup: Setup, out: Path, budgets: dict, flops: dict, skipped: dict, full_flops: int,
           seeds: list[int]) -> dict:
    """Latency of every variant (interleaved, batch 1) and the report of the episodes logged in ``out``."""
    policy, trained, tasks, variants, built = setup.policy, setup.trained, setup.tasks, setup.variants, setup.built
    latency_batch, calibrations, tuned_plan, plan_dir = (setup.latency_batch, setup.calibrations, setup.tuned_plan,
                                                         setup.plan_dir)
    base_sampler, base_steps = setup.base_sampler, setup.base_steps
    episodes: dict[str, list[dict]] = {v.name: [] for v in variants}
    if trained and cfg.episodes > 0:
        logged = {(e["task"], e["method"], e["seed"]): e for e in shards.logged_episodes(out)}
        for v in variants:
            episodes[v.name] = [logged[(task, v.name, seed)] for task in tasks for seed in seeds]
    videos = save_videos(cfg, policy, variants, built, tasks, out) if trained and cfg.video else []

    start = time.perf_counter()
    latencies = measure_latency(policy, variants, built, latency_batch, repeats=int(cfg.latency.repeats),
                                warmup=int(cfg.latency.warmup), threads=int(cfg.latency.threads))
    setup.seconds["latency"] = time.perf_counter() - start
    prefix_times = latencies.pop(PREFIX, None)
    reference = "full" if "full" in latencies else variants[0].name
    full_p50 = float(np.median(latencies[reference]))
    result = {
        "schema": reporting.REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bac.eval " + " ".join(sys.argv[1:]),
        "out_dir": str(out),
        "policy": {"checkpoint": str(cfg.checkpoint), "architecture": policy.architecture, "trained": trained,
                   "tasks": policy.tasks, "model": policy.model_kwargs,
                   "training_step": policy.provenance.get("step")},
        "environment": {"benchmark": "Meta-World v3, goal-observable, " + (
                            f"images ({', '.join(policy.cameras)}) and instructions ({cfg.instructions})"
                            if policy.cameras else "state observations"), "tasks": tasks,
                        "episodes_per_task": int(cfg.episodes) if trained else 0,
                        "seeds": [int(cfg.seed), int(cfg.seed) + int(cfg.episodes) - 1] if cfg.episodes > 0 else [],
                        "noise_seed": "per wave of num_envs episodes: its first episode seed"},
        "sampler": {"kind": base_sampler, "steps": base_steps},
        "calibration": {key: c.facts() | {"from": "demonstrations", "inputs": setup.calibration_inputs,
                                          "file_dir": str(plan_dir)}
                        for key, c in calibrations.items()} or None,
        "latency_settings": {"batch": 1, "threads": int(cfg.latency.threads), "repeats": int(cfg.latency.repeats),
                             "warmup": int(cfg.latency.warmup), "device": str(policy.device), "interleaved": True},
        "reference_method": reference,
        # A VLA head's vision-language prefix runs once per call and caching never touches it: its share of a
        # call bounds the end-to-end speedup (the speedups below are end to end).
        "prefix": None if prefix_times is None else {
            "latency": summarize(prefix_times), "share_of_reference": float(np.median(prefix_times)) / full_p50},
        "videos": videos,
        # this invocation's wall time per phase (a resumed run counts only the episodes it ran)
        "wall_seconds": {key: round(value, 2) for key, value in setup.seconds.items()},
        "threads": torch.get_num_threads(),
        "methods": {},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0]},
        "packages": _versions(),
    }
    for variant in variants:
        entry = {
            "config": variant.describe(),
            "plan_file": (str(tuned_plan) if variant.name == "tuned"
                          else str(plan_path(plan_dir, variant)) if variant.keeps_plan_file
                          else str(budget_path(out, variant)) if variant.budgeted else None),
            "latency": summarize(latencies[variant.name]),
            "speedup": full_p50 / float(np.median(latencies[variant.name])),
            "flops_per_call": int(flops[variant.name]),
            # FLOPs of the reference (full computation of the base sampler, or the first method) per call
            "ideal_speedup": (full_flops if reference == "full" else flops[reference]) / flops[variant.name],
            "skipped_share": skipped[variant.name],
        }
        if variant.name in budgets:
            entry["budget"] = budgets[variant.name]
            matched = variant.params.get("match")
            if matched in episodes and episodes[variant.name]:  # the claim to check: as good at equal latency
                entry["paired_vs_matched"] = {"method": matched, **reporting.paired_difference(
                    episodes[variant.name], episodes[matched])}
        if prefix_times is not None:
            entry["prefix_share"] = float(np.median(prefix_times)) / float(np.median(latencies[variant.name]))
        if episodes[variant.name]:
            entry["success"] = reporting.success_summary(episodes[variant.name])
            entry["per_task"] = {t: reporting.success_summary([e for e in episodes[variant.name] if e["task"] == t])
                                 for t in tasks}
            entry["paired_vs_full"] = reporting.paired_difference(episodes[variant.name], episodes[reference])
        result["methods"][variant.name] = entry
    # the tuner passes its evaluation no tolerance_points (it applies its own): the evaluator's default then
    result["verdict"] = reporting.verdict(result["methods"], reference, float(cfg.get("tolerance_points", 2.0)))
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(reporting.markdown(result))
    bac_plan = next((built[v.name].schedule for v in variants if v.method == "bac"), None)
    result["plots"] = reporting.plots(result, latencies, out, bac_plan)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
