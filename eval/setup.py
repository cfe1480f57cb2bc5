"""What every evaluation mode starts from (:func:`prepare`): the policy at its base sampler, the tasks, the
calibration observations and the compared variants with their calibrations and plans; and the FLOPs of each
variant (:func:`count_flops`).

The policy is never re-pointed at another sampler: each variant samples through a view of it
(``policy.with_sampler``, :func:`bac.evaluation.variants.applied`).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import bac
from bac.envs.calibration_inputs import CALIBRATION_INPUTS, calibration_inputs_facts, draw_calibration_inputs, \
    shipped_calibration_inputs
from bac.envs.collect import collect, default_data_dir
from bac.envs.dataset import ImageLanguageWindows, calibration_observations
from bac.envs.instructions import held_out_instructions, instruction, train_instructions
from bac.envs.metaworld_env import make_env
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.constants import IMAGE_PREFIX, STATE, TASK
from bac.policies.policy import DiffusionPolicy
from bac.policies.tuned import TunedConfig
from bac.policies.vla import frames_to_images
from bac.runtime import check_compatible, observation_slices

from .budget import budget_path
from .latency import flops_per_call
from .provenance import checkpoint_digest
# INSTRUCTION_SETS and resolve_tasks live in .preflight; imported here, where they were documented before
from .preflight import INSTRUCTION_SETS, check_before_work, instruction_source, resolve_tasks, \
    untrained_config  # noqa: F401
from .settings import UNTRAINED, EvalError, apply_threads
from .variants import Variant, flops_target, load_or_build, plan_path, sampling_view


def load_policy(cfg: DictConfig) -> tuple[DiffusionPolicy, Path, bool]:
    """The policy to evaluate, where its plans are cached, and whether it is trained.

    Plans and calibration of a checkpoint live in ``<plan_cache>/<checkpoint>-<weights digest>/`` (in a
    folder per calibration setting, :func:`calibration_folder`)
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
        tasks = list(cfg.untrained_tasks)
        observation_space, action_space, _ = env_spaces(tasks[0])  # the feature shapes come from the env
        config = untrained_config(cfg, int(observation_space.shape[0]), int(action_space.shape[0]))
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
    return policy, Path(cfg.plan_cache) / f"{directory.name}-{checkpoint_digest(directory)}", True


def run_instructions(cfg: DictConfig, policy: DiffusionPolicy, tasks: list[str]) -> list[str]:
    """Every instruction an episode of ``tasks`` can read (:func:`episode_instructions`); none for a state policy."""
    if not policy.reads_instructions:
        return []
    pool = train_instructions if cfg.instructions == "train" else held_out_instructions
    return [text for task in tasks for text in pool(instruction_source(cfg.instructions, task))]


def episode_instructions(cfg: DictConfig, policy: DiffusionPolicy, task: str):
    """The instruction of each episode (``seed -> text``) for a policy that reads instructions, else None.

    ``instructions``: ``held_out`` (the paraphrases no demonstration uses, in turn by seed), ``train``
    (the demonstrations' own), or ``swapped`` (the held-out paraphrases of the *other* task of the
    shared-scene pair: does the policy follow the words or the scene?).
    """
    if not policy.reads_instructions:
        return None
    source = instruction_source(cfg.instructions, task)
    held_out = cfg.instructions != "train"
    return lambda seed: instruction(source, seed, held_out=held_out)


def calibration_folder(plan_dir: Path, cfg: DictConfig) -> Path:
    """Where the calibrations and the plans made from them are cached: one folder per calibration setting
    (``samples``, ``seed``, ``episodes``), so a run with other settings never reuses them."""
    c = cfg.calibration
    return plan_dir / f"calibration-n{int(c.samples)}-seed{int(c.seed)}-episodes{int(c.episodes)}"


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
        states = shipped_calibration_inputs(directory, calibration_inputs_facts(tasks, **settings), policy.state_dim)
    if states is not None:
        names, source = [task for task in tasks for _ in range(per_task)], \
            f"shipped with the checkpoint ({directory / CALIBRATION_INPUTS})"
    else:
        (states, names), source = draw_calibration_inputs(tasks, **settings), drawn
    return {STATE: torch.as_tensor(states, dtype=torch.float32), TASK: names}, source


def image_calibration_batch(cfg: DictConfig, policy: DiffusionPolicy, tasks: list[str], per_task: int) -> dict:
    """``calibration_batch`` of a vision-language policy: state, frames and instructions of demonstration frames."""
    size = policy.config.model.image_size
    keys = policy.input_features[STATE].keys or ("state",)
    # The demonstrations the head was trained on (image datasets are large: no second, noise-free set).
    action_noise = float(policy.provenance.get("settings", {}).get("action_noise", 0.0))
    state, images, texts = [], {c: [] for c in policy.cameras}, []
    for task in tasks:
        path = collect(task, cfg.calibration.episodes, progress=False, cameras=policy.cameras, image_size=size,
                       action_noise=action_noise)
        data = ImageLanguageWindows(path, keys, policy.cameras, horizon=1, n_obs_steps=policy.n_obs_steps,
                                    image_size=size, state_dim=policy.state_dim)
        index = np.random.default_rng(cfg.calibration.seed).choice(len(data), size=per_task, replace=per_task > len(data))
        state.append(data.windows.window(index)[0])
        for camera in policy.cameras:
            images[camera].append(data.frames[camera][index])
        texts += [data.instructions[i] for i in index]
    batch = {STATE: torch.as_tensor(np.concatenate(state), dtype=torch.float32), TASK: texts}
    for camera, frames in images.items():
        batch[f"{IMAGE_PREFIX}{camera}"] = frames_to_images(np.concatenate(frames)).to(policy.device)
    return batch


def load_or_calibrate(cfg: DictConfig, policy: DiffusionPolicy, plan_dir: Path, batch: dict,
                      attention: bool = False) -> bac.Calibration:
    """The calibration of ``policy``'s sampler on ``batch``: its cached file when that fits, else made and saved.
    ``attention``: it must profile attention (ProfilingDiT); a cached file without the profile is made again
    (profiling leaves every other statistic as it was)."""
    sampler = policy.sampler
    path = plan_dir / (f"calibration-{sampler.kind}{sampler.steps}"
                       f"-n{cfg.calibration.samples}-seed{cfg.calibration.seed}.safetensors")
    if path.exists() and not cfg.calibration.recompute:
        calibration = bac.Calibration.load(path)
        try:
            calibration.check_fits(bac.describe(policy.model), sampler.steps, sampler.scheduler)
        except bac.PlanMismatchError as err:
            raise EvalError(f"cached calibration {path} does not fit this policy or sampler ({err}); "
                            "re-run with calibration.recompute=true to replace it") from err
        if calibration.focus is not None or not attention:
            return calibration
    calibration = bac.calibrate(policy.model, policy.predict_action_chunk, [batch], seed=cfg.calibration.seed,
                                scheduler=sampler.scheduler, attention=attention)
    calibration.save(path)
    return calibration


def tuned_variant(policy: DiffusionPolicy, path: Path) -> tuple[Variant, bac.Method | None, Path | None]:
    """The ``tuned=`` variant: a ``python -m bac.tune`` pick, its method (plan checked to fit) and plan file."""
    tuned = TunedConfig.load(path)
    variant = Variant("tuned", tuned.sampler, tuned.steps, tuned.method, dict(tuned.params), tuned.warm_start())
    view = sampling_view(policy, variant)
    method = tuned.method_for(view)  # the stand-in policy.use_tuned(path) applies
    if method is not None:
        method.schedule.check_fits(bac.describe(view.model), num_steps=view.sampler.steps,
                                   scheduler=view.sampler.scheduler)
    return variant, method, tuned.plan_path()


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every evaluation mode starts from: the policy at its base sampler and the compared variants, built.

    ``policy`` samples with the run's base sampler (``sampler.kind``, ``sampler.steps``); ``built`` holds the
    method of every caching variant but the budget ones (made in the run, :func:`bac.evaluation.budget.budget_plans`).
    """
    policy: DiffusionPolicy
    plan_dir: Path
    trained: bool
    tasks: list[str]
    method_config: dict
    demo_obs: dict
    variants: list[Variant]
    calibrations: dict[str, bac.Calibration]
    built: dict[str, bac.Method]
    tuned_plan: Path | None
    seconds: dict = dataclasses.field(default_factory=dict)  # wall time per phase of preparing
    calibration_inputs: str = ""  # where the calibration observations came from

    @property
    def base_sampler(self) -> str:
        return self.policy.sampler.kind

    @property
    def base_steps(self) -> int:
        return self.policy.sampler.steps

    @property
    def latency_batch(self) -> dict:
        """Batch 1: one demonstration observation."""
        return {key: value[:1] for key, value in self.demo_obs.items()}

    def plan_file(self, variant: Variant, out: Path) -> Path | None:
        """The plan file a variant runs (``out``: the run's output folder, which keeps the budget plans)."""
        if variant.name == "tuned":
            return self.tuned_plan
        if variant.keeps_plan_file:
            return plan_path(self.plan_dir, variant)
        return budget_path(out, variant) if variant.budgeted else None


def prepare(cfg: DictConfig) -> Setup:
    """Check every setting (:func:`bac.evaluation.preflight.check_before_work`), then load the policy at its base
    sampler, calibrate and build every variant but the budget ones."""
    variants = check_before_work(cfg)
    apply_threads(cfg)
    policy, checkpoint_dir, trained = load_policy(cfg)
    plan_dir = calibration_folder(checkpoint_dir, cfg)
    tasks = resolve_tasks(cfg, policy)
    try:
        if cfg.sampler.kind is not None or cfg.sampler.steps is not None:  # null, null: the policy's own default
            kind = cfg.sampler.kind if cfg.sampler.kind is not None else policy.sampler.kind
            policy = policy.with_sampler(kind, cfg.sampler.steps)
    except ValueError as err:
        raise EvalError(str(err)) from err
    method_config = OmegaConf.to_container(cfg.methods, resolve=True)
    start = time.perf_counter()
    demo_obs, inputs_source = calibration_batch(cfg, policy)
    seconds = {"calibration_inputs": time.perf_counter() - start}
    start = time.perf_counter()

    try:
        # One calibration per sampler and step count that a calibrated method runs on (a plan is made for
        # the sampler it caches: bac on DDIM-10 beside full DDPM-100 in one run).
        calibrations: dict[str, bac.Calibration] = {}
        built: dict[str, bac.Method] = {}
        profiled = {f"{v.sampler}{v.steps}" for v in variants  # ProfilingDiT's calibration profiles attention
                    if v.method is not None and not v.budgeted and bac.method_info(v.method).needs_attention}
        for variant in variants:
            if variant.method is not None:
                view = policy.with_sampler(variant.sampler, variant.steps)
                calibration = None
                if variant.calibrated:
                    key = f"{variant.sampler}{variant.steps}"
                    if key not in calibrations:
                        calibrations[key] = load_or_calibrate(cfg, view, plan_dir, demo_obs, key in profiled)
                    calibration = calibrations[key]
                if not variant.budgeted:  # made by budget_plans, once the others exist (one may be its target)
                    built[variant.name] = load_or_build(view, variant, calibration, plan_dir,
                                                        cfg.calibration.recompute)
        tuned_plan = None
        if cfg.tuned is not None:  # a bac.tune pick, evaluated beside the configured methods
            variant, method, tuned_plan = tuned_variant(policy, Path(cfg.tuned))
            variants.append(variant)
            if method is not None:
                built[variant.name] = method
    except (ValueError, bac.PlanMismatchError) as err:
        raise EvalError(str(err)) from err
    seconds["calibration_and_plans"] = time.perf_counter() - start
    return Setup(policy, plan_dir, trained, tasks, method_config, demo_obs, variants, calibrations, built,
                 tuned_plan, seconds, inputs_source)


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs per call of every variant (``variants``: ``steps: auto`` resolved; a warm-started one's: of its cold
    call), its share of block evaluations skipped, the FLOPs of full computation on the base sampler, and of
    each warm-started variant's warm call."""
    variants: list[Variant]
    flops: dict[str, int]
    skipped: dict[str, float]
    full_flops: int
    warm_flops: dict[str, int] = dataclasses.field(default_factory=dict)


def count_flops(setup: Setup, variants: list[Variant], built: dict[str, bac.Method]) -> FlopCount:
    """The FLOPs of ``variants`` cached by ``built``; ``steps: auto[:<name>]`` variants get as many steps as that
    variant's FLOPs (``bac`` by default): the returned ``variants`` (``variants`` itself is left as it is)."""
    per_step, flops, skipped, prepare_flops, warm_flops = flops_per_call(setup.policy, variants, built, setup.latency_batch)
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
    resolved = [dataclasses.replace(v, steps=matched[v.name]) if v.name in matched else v for v in variants]
    return FlopCount(resolved, flops, skipped, setup.base_steps * per_step + prepare_flops(setup.base_steps),
                     warm_flops)
