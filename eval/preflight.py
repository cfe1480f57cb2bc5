"""Every setting of an evaluation checked before any work (:func:`check_before_work`): a bad one is reported
before a demonstration is collected, a model is loaded or a file is written.

What needs the policy is read from its checkpoint's ``config.json`` only (its kind, tasks and noise schedule),
never from its weights; an ``untrained:`` policy's from its ``configs/policy`` file. The checks, in order:
kinds, ranges and upper bounds (:mod:`.settings`), the device, the policy and its tasks, the instructions
against the policy's kind, the base sampler, every method (names, parameters, samplers, FLOPs targets), the
``tuned`` file, how the calls run (``compile``, ``backend``: against the policy and every method), the shards, the output and plan folders (folders, writable, free space for an estimate of what
the run writes) and, for a run that resumes, the recorded run's settings.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import bac
from bac import checks
from bac.configs import CONFIG_DIR
from bac.envs.instructions import instruction, swapped_task
from bac.envs.tasks import ALL_TASKS, HARD_SUITE, episode_cap
from bac.errors import BacError, ConfigError
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.config import PolicyConfig, read_config
from bac.policies.diffusion import training_scheduler
from bac.policies.sampler import DEFAULT_SAMPLERS, Sampler
from bac.policies.tuned import TunedConfig
from bac.graphs import COMPILE_MODES, SETTING_BACKENDS

from .provenance import settings_digest
from .settings import RECORDED_SETTINGS, UNTRAINED, EvalError, check_eval_settings, check_recorded_run, \
    output_dir
from . import variants as variants_module
from .variants import Variant, flops_target, parse_variants

INSTRUCTION_SETS = ("held_out", "train", "swapped")
MODES = ("closed_loop", "realtime")
# What a run may write, for the free-space check: an estimate with a margin of 2, plus room for the report,
# plots and plans (a few MB in every recorded run).
EPISODE_BYTES = {"closed_loop": 1 << 10, "realtime": 16 << 10}  # a log line (recorded: 90 bytes, 11 kB)
FIXED_BYTES = 64 << 20
MARGIN = 2


def check_before_work(cfg: DictConfig) -> list[Variant]:
    """Refuse a bad setting with one clear :class:`EvalError` before any work (the module docstring); returns
    the configured variants (the base sampler's steps filled in)."""
    check_eval_settings(cfg)
    if cfg.mode not in MODES:
        raise EvalError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    check_device(str(cfg.device))
    config = policy_config(cfg)
    if cfg.mode == "realtime" and str(cfg.checkpoint).startswith(UNTRAINED):
        raise EvalError("mode=realtime runs episodes: it needs a trained checkpoint")
    tasks = resolve_tasks(cfg, config)
    if config.is_vla:
        for task in tasks:
            instruction_source(cfg.instructions, task)
    elif cfg.instructions != "held_out":  # the default: a state policy reads no instructions
        raise EvalError(f"instructions={cfg.instructions}: the {config.architecture} policy reads no instructions "
                        "(a state policy; only vision-language heads do): leave instructions out")
    variants = configured_variants(cfg, config)
    guided = [v.name for v in variants if v.rtc is not None]
    if guided and cfg.mode != "realtime":
        raise EvalError(f"method {guided[0]!r} uses real-time chunking, which continues a chunk that runs while the "
                        "next is computed: it is for mode=realtime (a closed-loop call has no inference delay, and "
                        "its latency table times unguided calls)")
    check_compilation(cfg, config, variants)
    check_shards(cfg, variants)
    check_folders(cfg, len(tasks), len(variants) + (cfg.tuned is not None), max_steps(cfg, tasks))
    if cfg.mode == "closed_loop":  # a realtime run checks its own record (its own digest) before its episodes
        check_recorded_run(cfg, output_dir(cfg), settings_digest(cfg), RECORDED_SETTINGS)
    return variants


def configured_variants(cfg: DictConfig, config: PolicyConfig) -> list[Variant]:
    """The variants of ``run_methods`` (all of ``methods`` if empty), checked: names, parameters, samplers and
    step counts, FLOPs targets, and the ``tuned`` file."""
    scheduler = training_scheduler(config)
    base = base_sampler(cfg, config, scheduler)
    method_config = OmegaConf.to_container(cfg.methods, resolve=True)
    names = list(cfg.run_methods) or list(method_config)
    unknown = [name for name in names if name not in method_config]
    if unknown or not names:
        raise EvalError(f"unknown method(s) {unknown}; configured methods: {sorted(method_config)}" if unknown
                        else "no methods to compare: the methods group is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise EvalError(f"run_methods lists {repeated[0]!r} twice: each method runs once")
    variants = []
    for name in names:  # one at a time, so that an error names the method at fault
        try:
            variants += parse_variants(method_config, [name], base.kind, base.steps, auto_steps=base.steps)
        except ValueError as err:
            raise EvalError(f"methods.{name}: {err}") from err
    for variant in variants:
        check_sampler(f"method {variant.name!r}", variant.sampler, variant.steps, scheduler, config)
    caching = {v.name for v in variants if v.method is not None}
    if cfg.tuned is not None:
        tuned = TunedConfig.load(cfg.tuned)
        check_sampler(f"tuned={cfg.tuned}", tuned.sampler, tuned.steps, scheduler, config)
        caching |= {"tuned"} if tuned.method is not None else set()
    for variant in variants:
        target = flops_target((method_config[variant.name] or {}).get("steps"))
        if target is not None and target not in caching:
            raise EvalError(f"method {variant.name!r} matches the FLOPs of {target!r}, which is not a caching method "
                            "of this run")
    return variants


def check_compilation(cfg: DictConfig, config: PolicyConfig, variants: list[Variant]) -> None:
    """``compile`` and ``backend``: known values that fit together, the policy and every method (a runtime rule
    decides on the host at every step: it cannot run as one graph)."""
    mode, backend = cfg.compile, cfg.backend
    if mode not in COMPILE_MODES:
        raise EvalError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if backend not in SETTING_BACKENDS:
        raise EvalError(f"backend must be one of {SETTING_BACKENDS}, got {backend!r}")
    if backend == "onnxruntime" and mode != "whole":
        raise EvalError(f"backend=onnxruntime runs each policy call exported whole: it needs compile=whole, "
                        f"got compile={mode}")
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        raise EvalError("backend=onnxruntime needs onnx, onnxscript and onnxruntime: pip install 'bac[export]'")
    unavailable = variants_module.torch_compile_unavailable(cfg.device) if mode != "none" and backend == "torch" \
        else None
    if unavailable:
        raise EvalError(f"compile={mode} with backend=torch: {unavailable}; or use compile=whole "
                        "backend=onnxruntime, or compile=none")
    if mode == "blocks" and config.architecture != "dpt":
        raise EvalError(f"compile=blocks compiles DP-T's branches (TransformerForDiffusion.compile_blocks); the "
                        f"{config.architecture} policy has none: use compile=whole or compile=none")
    if mode == "whole":
        for variant in variants:
            if variant.rtc is not None:
                raise EvalError(f"method {variant.name!r} uses real-time chunking, whose guided steps run eagerly "
                                "(a vector-Jacobian product through the denoiser): use compile=none for it")
            if variant.method is not None and not variant.budgeted and not bac.method_info(variant.method).static:
                raise EvalError(f"method {variant.name!r} caches with the runtime rule {variant.method!r}, which "
                                "decides on the host at every step: it cannot run as one graph (compile=whole); "
                                "leave it out with run_methods=[...], or use compile=none")


def check_device(device: str) -> None:
    """``device``: a torch device this build of torch and this machine have (:func:`bac.checks.check_device`)."""
    try:
        checks.check_device(device)
    except ConfigError as err:
        raise EvalError(str(err)) from None


def policy_config(cfg: DictConfig) -> PolicyConfig:
    """The evaluated policy's config: a checkpoint's ``config.json`` (its weights are not read), or an
    ``untrained:`` policy's ``configs/policy`` file with its ``untrained_tasks``."""
    if not str(cfg.checkpoint).startswith(UNTRAINED):
        directory = resolve_checkpoint(str(cfg.checkpoint))
        missing = [name for name in ("config.json", "model.safetensors") if not (directory / name).is_file()]
        if missing:
            raise EvalError(f"checkpoint={cfg.checkpoint}: {directory} is not a policy checkpoint (needs "
                            f"config.json and model.safetensors; missing {missing})")
        return read_config(directory / "config.json")[0]
    # the dimensions come from the first task's env when the policy is built: these checks read none
    return untrained_config(cfg, state_dim=1, action_dim=1)


def untrained_config(cfg: DictConfig, state_dim: int, action_dim: int) -> PolicyConfig:
    """The config of the ``untrained:<name>`` policy (``configs/policy/<name>.yaml``) on ``untrained_tasks``."""
    name = str(cfg.checkpoint)[len(UNTRAINED):]
    config_path = CONFIG_DIR / "policy" / f"{name}.yaml"
    if not config_path.is_file():
        raise EvalError(f"unknown policy config {name!r} (no configs/policy/{name}.yaml)")
    tasks = list(cfg.untrained_tasks)
    if not tasks:
        raise EvalError("untrained_tasks is empty: an untrained policy takes its shapes from the first task's env")
    for task in tasks:
        check_task_name("untrained_tasks", task)
    spec = OmegaConf.load(config_path)
    try:
        return PolicyConfig.build(spec.architecture, OmegaConf.to_container(spec.model, resolve=True),
                                  state_dim=state_dim, action_dim=action_dim, tasks=tasks,
                                  provenance={"untrained": name})
    except ValueError as err:
        raise EvalError(f"configs/policy/{name}.yaml: {err}") from err


def check_task_name(setting: str, task) -> None:
    if task not in ALL_TASKS:
        raise EvalError(f"{setting}: unknown task {task!r}; Meta-World tasks include {', '.join(ALL_TASKS[:8])}, ...")


def resolve_tasks(cfg: DictConfig, policy) -> list[str]:
    """The evaluated tasks: ``tasks``, ``[suite]`` (``policy``'s, a policy or its config) or ``[hard]``."""
    tasks = list(cfg.tasks)
    if tasks == ["suite"]:
        tasks = list(policy.tasks)
    elif tasks == ["hard"]:
        tasks = list(HARD_SUITE)
    for task in tasks:
        if task not in ALL_TASKS:
            raise EvalError(f"unknown task {task!r}; Meta-World tasks include {', '.join(ALL_TASKS[:8])}, ...")
        if policy.tasks and task not in policy.tasks:
            raise EvalError(f"the policy was trained on {list(policy.tasks)}, not on {task!r}")
    if not tasks:
        raise EvalError("no tasks to evaluate")
    return tasks


def instruction_source(instructions: str, task: str) -> str:
    """The task whose instructions an episode of ``task`` reads (``instructions``: one of
    :data:`INSTRUCTION_SETS`; ``swapped``: the other task of its shared-scene pair)."""
    if instructions not in INSTRUCTION_SETS:
        raise EvalError(f"instructions must be one of {INSTRUCTION_SETS}, got {instructions!r}")
    try:
        source = swapped_task(task) if instructions == "swapped" else task
        instruction(source, 0)
    except KeyError as err:
        raise EvalError(str(err.args[0])) from err
    return source


def base_sampler(cfg: DictConfig, config: PolicyConfig, scheduler) -> Sampler:
    """The run's base sampler (``sampler.kind``, ``sampler.steps``; null: the policy's default), checked."""
    kind, steps = DEFAULT_SAMPLERS.get(config.architecture, ("ddpm", None))
    if cfg.sampler.kind is not None or cfg.sampler.steps is not None:
        kind, steps = cfg.sampler.kind if cfg.sampler.kind is not None else kind, cfg.sampler.steps
    return check_sampler(f"sampler.kind={kind}, sampler.steps={steps}", kind, steps, scheduler, config)


def check_sampler(what: str, kind: str, steps: int | None, scheduler, config: PolicyConfig) -> Sampler:
    try:
        return Sampler.make(kind, steps, scheduler, config.is_flow)
    except BacError as err:
        raise EvalError(f"{what}: {err}") from err


def check_shards(cfg: DictConfig, variants: list[Variant]) -> None:
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    if not index < count:
        raise EvalError(f"shard.index must be in [0, shard.count), got index {index} of count {count}")
    if count == 1:
        return
    if cfg.mode == "realtime":
        raise EvalError("mode=realtime is not sharded (its methods share the machine's timing): use shard.count=1")
    if str(cfg.checkpoint).startswith(UNTRAINED) or cfg.episodes == 0:
        raise EvalError("shards share out episodes: a run without episodes (episodes=0, an untrained policy) is "
                        "not sharded (shard.count=1)")
    if any(v.budgeted for v in variants):
        # Each shard would measure its own plan on its own (loaded) machine: not one run any more.
        raise EvalError("budget variants are made from latency measured in the run: evaluate them unsharded "
                        "(shard.count=1)")


def max_steps(cfg: DictConfig, tasks: list[str]) -> int:
    return int(cfg.max_episode_steps) if cfg.max_episode_steps else max(episode_cap(task) for task in tasks)


def check_folders(cfg: DictConfig, tasks: int, methods: int, steps: int) -> None:
    """``out_dir`` and ``plan_cache``: folders (or to be made), writable, with room for what the run writes."""
    rates = len(cfg.realtime.control_hz) if cfg.mode == "realtime" else 1
    episodes = tasks * methods * rates * int(cfg.episodes) * EPISODE_BYTES[cfg.mode]
    size = int(cfg.video_settings.size)
    videos = tasks * methods * steps * size * size if cfg.video else 0  # a GIF: at most a byte a pixel
    out = Path("outputs") / ("eval" if cfg.mode == "closed_loop" else cfg.mode) if cfg.out_dir == "auto" \
        else Path(cfg.out_dir)
    check_folder("out_dir", out, MARGIN * (episodes + videos) + FIXED_BYTES)
    check_folder("plan_cache", Path(cfg.plan_cache), FIXED_BYTES)


def check_folder(setting: str, path: Path, needed: int) -> None:
    """``path`` is a folder, or can be made in its nearest existing parent, writable, with ``needed`` bytes free."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise EvalError(f"{setting}={path}: {existing} is a file, not a folder; pick another {setting}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvalError(f"{setting}={path}: {existing} is not writable; pick another {setting}")
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise EvalError(f"{setting}={path}: {free / 2**20:.0f} MiB free on its disk, and this run may write up to "
                        f"{needed / 2**20:.0f} MiB there (an estimate, with a margin of {MARGIN}); free some space "
                        f"or pick another {setting}")
