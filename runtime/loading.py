"""The served policy: loaded from a checkpoint, given its sampler, accelerated at most one way, warm-started
and given real-time chunking if asked, compiled or served from an exported file if asked, described for the metadata a client receives on
connect (``docs/guide/server.md``)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import bac
from bac import graphs
from bac.errors import BacError, ConfigError
from bac.policies.checkpointing import resolve_checkpoint
from bac.policies.constants import ACTION
from bac.policies.policy import DiffusionPolicy
from bac.policies.sampler import Sampler

from .protocol import PROTOCOL, PROTOCOL_VERSION, accepts_num_actions, real_time_chunked, warm_started


@dataclasses.dataclass(frozen=True)
class ServedPolicy:
    """A policy ready to serve: ``handle`` is the cache handle its acceleration returned (``None``: not
    accelerated); ``source`` says where the acceleration came from, for the metadata."""

    policy: DiffusionPolicy
    handle: bac.CacheHandle | None
    source: dict[str, Any]


def choose_sampler(policy: DiffusionPolicy, kind: str | None = None,
                   steps: int | None = None) -> tuple[DiffusionPolicy, Sampler]:
    """``policy`` sampling with ``kind``/``steps`` (both ``None``: as it does) and its sampler.

    A new sampler gives a view of ``policy`` sharing its weights (``with_sampler``); ``policy`` is unchanged."""
    if kind is not None or steps is not None:
        policy = policy.with_sampler(kind or policy.sampler.kind, steps)
    return policy, policy.sampler


def load_policy(checkpoint: str | Path, *, device: str = "cpu", sampler: str | None = None,
                steps: int | None = None, tuned: str | Path | None = None, plan: str | Path | None = None,
                method: str | None = None, method_params: Mapping[str, Any] | None = None,
                compile: str = "none", backend: str = "torch", onnx: str | Path | None = None,
                batch_sizes: Sequence[int] = (1,), warm: Mapping[str, Any] | None = None,
                rtc: Mapping[str, Any] | None = None) -> ServedPolicy:
    """Load a policy, accelerate it at most one way, warm-start it and give it real-time chunking if asked,
    then compile it as :func:`compile_policy` says.

    ``tuned``: a ``python -m bac.tune`` result (sets the sampler too, so ``sampler``/``steps`` must be
    unset); ``plan``: a plan file; ``method``: an uncalibrated method by name with ``method_params``
    (a calibrated one, ``bac``/``acs``, needs a plan file: ``bac-plan``). ``warm``: ``None``, or the
    setting ``{start, variant, threshold, jump}`` (:func:`warm_start`). ``rtc``: ``None``, or the setting
    ``{max_guidance}`` (:func:`real_time_chunking`), applied after the warm start. Every problem is a
    :class:`bac.ConfigError` (or the plan's and checkpoint's own errors).
    """
    check_compile(compile, backend, onnx)
    if rtc is not None and compile == "whole":
        raise ConfigError("setting rtc: real-time chunking's guided steps run eagerly (a vector-Jacobian product "
                          "through the denoiser at each step), not as a whole-call graph: set compile=none or "
                          "compile=blocks, or rtc=null")
    served = _accelerated(checkpoint, device=device, sampler=sampler, steps=steps, tuned=tuned, plan=plan,
                          method=method, method_params=method_params)
    if warm is not None:
        served = ServedPolicy(warm_start(served.policy, warm), served.handle, served.source)
    if rtc is not None:
        served = ServedPolicy(real_time_chunking(served.policy, rtc), served.handle, served.source)
    if compile == "none":
        return served
    policy = compile_policy(served.policy, compile, backend, onnx, batch_sizes)
    source = {**served.source, "compile": compile, "backend": backend, **({"onnx": str(onnx)} if onnx else {})}
    return ServedPolicy(policy, served.handle, source)


#: the keys of the serve setting ``warm`` (``DiffusionPolicy.with_warm_start``'s arguments)
WARM_KEYS = ("start", "variant", "threshold", "jump")


def warm_start(policy: DiffusionPolicy, warm: Mapping[str, Any]) -> DiffusionPolicy:
    """``policy.with_warm_start(**warm)`` for the serve setting ``warm`` (``start`` required; ``variant``,
    ``threshold`` and ``jump`` optional, null meaning the default), refused with a :class:`bac.ConfigError`
    naming the setting where it does not fit: an unknown key, a start outside the sampler's steps, or a
    runtime rule's acceleration (it decides from the steps before, so a call cannot begin after step 0)."""
    if not isinstance(warm, Mapping):
        raise ConfigError(f"setting warm must be a mapping (warm={{start:2}}) or null, got {warm!r}")
    unknown = sorted(set(map(str, warm)) - set(WARM_KEYS))
    if unknown:
        raise ConfigError(f"setting warm: unknown key(s) {unknown}; it takes {list(WARM_KEYS)}")
    if warm.get("start") is None:
        raise ConfigError("setting warm needs start: the sampler step a warm call begins at (warm={start:2})")
    handle = bac.get_handle(policy.model)
    if warm["start"] and handle is not None and not handle.schedule.static:
        raise ConfigError(f"setting warm: {handle.schedule.name!r} is a runtime rule (it decides from the steps "
                          "before), so a call cannot begin after step 0: accelerate with a plan, or leave warm null")
    try:
        return policy.with_warm_start(**{key: value for key, value in warm.items() if value is not None})
    except ConfigError as err:
        raise ConfigError(f"setting warm: {err}") from err


#: the keys of the serve setting ``rtc`` (``DiffusionPolicy.with_rtc``'s arguments)
RTC_KEYS = ("max_guidance",)


def real_time_chunking(policy: DiffusionPolicy, rtc: Mapping[str, Any]) -> DiffusionPolicy:
    """``policy.with_rtc(**rtc)`` for the serve setting ``rtc`` (``max_guidance`` optional, null meaning the
    default), refused with a :class:`bac.ConfigError` naming the setting where it does not fit: an unknown key,
    a guidance clip that is not a number >= 0, or a warm start other than plain."""
    if not isinstance(rtc, Mapping):
        raise ConfigError(f"setting rtc must be a mapping (rtc={{max_guidance:5}}, or rtc={{}} for the defaults) "
                          f"or null, got {rtc!r}")
    unknown = sorted(set(map(str, rtc)) - set(RTC_KEYS))
    if unknown:
        raise ConfigError(f"setting rtc: unknown key(s) {unknown}; it takes {list(RTC_KEYS)}")
    try:
        return policy.with_rtc(**{key: value for key, value in rtc.items() if value is not None})
    except ConfigError as err:
        raise ConfigError(f"setting rtc: {err}") from err


def _accelerated(checkpoint: str | Path, *, device: str, sampler: str | None, steps: int | None,
                 tuned: str | Path | None, plan: str | Path | None, method: str | None,
                 method_params: Mapping[str, Any] | None) -> ServedPolicy:
    chosen = [name for name, value in (("tuned", tuned), ("plan", plan), ("method", method)) if value]
    if len(chosen) > 1:
        raise ConfigError(f"accelerate one way: set one of tuned, plan, method (got {chosen})")
    if method_params and not method:
        raise ConfigError(f"method_params {dict(method_params)} given without a method")
    policy = DiffusionPolicy.load(resolve_checkpoint(checkpoint), device=device)
    if tuned:
        if sampler is not None or steps is not None:
            raise ConfigError(f"{tuned} sets the sampler (the tuner's pick): leave sampler.kind and sampler.steps null")
        return ServedPolicy(policy, policy.use_tuned(tuned), {"tuned": str(tuned)})
    policy, choice = choose_sampler(policy, sampler, steps)
    if plan:
        return ServedPolicy(policy, policy.accelerate(bac.Plan.load(plan)), {"plan": str(plan)})
    if method:
        built = _method_by_name(policy, choice, method, dict(method_params or {}))
        return ServedPolicy(policy, policy.accelerate(built), {"method_source": "by name"})
    return ServedPolicy(policy, None, {})


# ----------------------------------------------------------------------------- compiled or exported
#: How a served call runs (``compile``) and what runs a compiled one (``backend``): the evaluator's settings.
COMPILE_MODES, SERVE_BACKENDS = graphs.COMPILE_MODES, graphs.SETTING_BACKENDS


def check_compile(compile: str, backend: str, onnx: str | Path | None) -> None:
    """Refuse a combination of the settings ``compile``, ``backend`` and ``onnx`` that means nothing."""
    if compile not in COMPILE_MODES:
        raise ConfigError(f"setting compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if backend not in SERVE_BACKENDS:
        raise ConfigError(f"setting backend must be one of {', '.join(SERVE_BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime" and compile != "whole":
        raise ConfigError(f"backend=onnxruntime runs a whole-call graph: set compile=whole (got compile={compile})")
    if onnx and backend != "onnxruntime":
        raise ConfigError(f"onnx={onnx} is served by ONNX Runtime: set compile=whole backend=onnxruntime")


def compile_policy(policy: DiffusionPolicy, compile: str = "none", backend: str = "torch",
                   onnx: str | Path | None = None, batch_sizes: Sequence[int] = (1,)) -> DiffusionPolicy:
    """``policy`` (accelerated as it will run) ready to call: as it is (``compile="none"``), its DP-T
    branches compiled in place (``"blocks"``: ``compile_blocks``), or a view whose sampling calls for
    ``batch_sizes`` run as one graph with the current plan baked in (``"whole"``: ``compile_call``, with
    ``torch.compile``'s inductor or ONNX Runtime; ``onnx``: serve that exported file, whose metadata must
    describe this policy, sampler and plan). Graphs are built here, so the first call pays no compilation
    (a VLA head's: on the first call with each instruction length). A runtime rule cannot be a whole call."""
    check_compile(compile, backend, onnx)
    if compile == "none":
        return policy
    unavailable = graphs.torch_compile_unavailable(policy.device) if backend == "torch" else None
    if unavailable:
        raise ConfigError(f"compile={compile} with backend=torch: {unavailable}; or use compile=whole "
                          "backend=onnxruntime")
    if compile == "blocks":
        if not hasattr(policy.model, "compile_blocks"):
            raise ConfigError(f"compile=blocks compiles a DP-T's branches; {policy.architecture} has none: "
                              "use compile=whole")
        policy.model.compile_blocks()
        return policy
    handle = bac.get_handle(policy.model)
    if handle is not None and not handle.schedule.static:
        raise ConfigError(f"compile=whole needs a static plan, but {handle.schedule.name!r} is a runtime rule "
                          "(it decides on the host from tensor values at every step): use a plan, or compile=none "
                          "or compile=blocks")
    sizes = list(batch_sizes)
    if onnx:
        if len(sizes) != 1:
            raise ConfigError(f"an exported file serves one batch size, not {sizes}")
        return policy.compile_call(sizes[0], backend="onnxruntime", onnx=str(onnx))
    return policy.compile_call(sizes, backend="inductor" if backend == "torch" else backend)


def load_served_policy(checkpoint: str | Path, **how: Any) -> tuple[DiffusionPolicy, dict[str, Any]]:
    """:func:`load_policy` as ``(policy, source)``; the handle is ``bac.get_handle(policy.model)``."""
    served = load_policy(checkpoint, **how)
    return served.policy, served.source


def _method_by_name(policy: Any, sampler: Sampler, method: str, params: dict[str, Any]) -> bac.Method:
    try:
        if bac.needs_calibration(method):
            raise ConfigError(f"method {method!r} plans from a calibration: make its plan file first "
                              "(bac-plan, or python -m bac.tune) and pass plan=<file>")
        return bac.build_method(method, policy.model, num_steps=sampler.steps, scheduler=sampler.scheduler, **params)
    except (ValueError, TypeError) as err:
        if isinstance(err, BacError):
            raise
        raise ConfigError(f"method {method!r} with {params}: {err}") from err


# ----------------------------------------------------------------------------- its description
def acceleration_summary(policy: Any, source: Mapping[str, Any] | None = None,
                         handle: bac.CacheHandle | None = None) -> dict | None:
    """What the policy's cache handle does (``None``: not accelerated), as plain data for the metadata.
    ``handle``: the policy's (default: ``bac.get_handle(policy.model)``)."""
    handle = handle if handle is not None else bac.get_handle(policy.model)
    if handle is None:
        return {"method": None, **source} if source else None
    info: dict[str, Any] = {"method": handle.schedule.name, "params": dict(handle.schedule.params),
                            **handle.standin.describe(), "static": bool(handle.schedule.static), **(source or {})}
    if handle.plan is not None:
        computed, skipped = handle.plan.computed_count(), handle.plan.skipped_count()
        info.update(num_steps=handle.plan.num_steps, blocks=len(handle.plan.blocks), computed=computed,
                    skipped=skipped, skipped_share=skipped / max(computed + skipped, 1))
    return json.loads(json.dumps(info, default=str))  # msgpack-safe: tuples, numpy numbers, paths


def metadata(policy: Any, checkpoint: str | None = None, source: Mapping[str, Any] | None = None,
             handle: bac.CacheHandle | None = None) -> dict:
    """The map sent on connect (``docs/guide/server.md``); ``handle`` as in :func:`acceleration_summary`."""
    features = {name: {"type": f.type, "shape": list(f.shape), **({"keys": list(f.keys)} if f.keys else {})}
                for name, f in policy.input_features.items()}
    sampler = policy.sampler
    return {
        "protocol": PROTOCOL,
        "protocol_version": PROTOCOL_VERSION,
        "server": {"bac": bac.__version__},
        "policy": {"type": "diffusion", "architecture": policy.architecture, "checkpoint": checkpoint,
                   "model": json.loads(json.dumps(policy.model_kwargs, default=str))},
        "features": features,
        "action": {"shape": list(policy.output_features[ACTION].shape)},
        "tasks": [] if policy.reads_instructions else list(policy.tasks),
        "reads_instructions": bool(policy.reads_instructions),
        "horizon": policy.horizon,
        "n_obs_steps": policy.n_obs_steps,
        "n_action_steps": policy.n_action_steps,
        "sampler": {"kind": sampler.kind, "steps": sampler.steps},
        "acceleration": acceleration_summary(policy, source, handle),
        "accepts_num_actions": accepts_num_actions(policy),
        "warm_start": policy.warm.describe() if warm_started(policy) else None,
        "rtc": policy.rtc.describe() if real_time_chunked(policy) else None,
    }


def describe(metadata: Mapping[str, Any]) -> str:
    """One line for the log: checkpoint (or architecture), sampler, caching method, warm start and real-time
    chunking."""
    acceleration = (metadata["acceleration"] or {}).get("method") or "no caching"
    warm, rtc = metadata.get("warm_start"), metadata.get("rtc")
    warm_text = f", warm start at step {warm['start']} ({warm['variant']})" if warm else ""
    rtc_text = f", real-time chunking (max_guidance {rtc['max_guidance']:g})" if rtc else ""
    return (f"{metadata['policy']['checkpoint'] or metadata['policy']['architecture']} "
            f"({metadata['sampler']['kind']}-{metadata['sampler']['steps']}, {acceleration}{warm_text}{rtc_text})")
