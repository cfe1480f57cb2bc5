"""bac's caching as one named hook in a diffusers transformer's ``HookRegistry``.

diffusers hands its stateful hooks the pipeline's ``cache_context(name)`` through their
``StateManager``s and calls their ``reset_state`` at the end of every pipeline call (``CacheMixin``
models: ``maybe_free_model_hooks`` -> ``_reset_stateful_cache``). :class:`BacHook`, registered as
``"bac"``, turns the first into bac's context of that name and the second into the end of the
trajectory; :class:`PipelineCalls` starts each call's trajectory at its first denoiser call. Other
hooks may sit before or after it and be removed in any order; a diffusers cache (a stateful hook)
on the same model is refused. Why and how: docs/guide/diffusers.md ("Hooks and trajectories").
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from ..engine import CacheHandle, get_handle
from ..errors import CacheStateError, PlanMismatchError

HOOK_NAME = "bac"


class BacCache:
    """A ``CacheMixin`` transformer's ``_cache_config`` while bac caches it, as diffusers' own caches set
    theirs: ``transformer.is_cache_enabled`` is true and ``transformer.enable_cache(...)`` refuses a second
    cache ("Caching has already been enabled with <class 'bac.diffusers.hook.BacCache'>")."""

    def __repr__(self) -> str:
        return "BacCache(): disable with bac.diffusers.disable_cache"


class _Contexts(StateManager):
    """The ``StateManager`` through which ``cache_context(name)`` reaches bac: it enters the accelerating
    handle's context ``name`` (per thread) until the pipeline leaves ``cache_context``."""

    def __init__(self, transformer: nn.Module):
        super().__init__(BaseState)
        self._transformer = transformer
        self._entered = threading.local()

    def set_context(self, context) -> None:
        super().set_context(context)
        stack = getattr(self._entered, "stack", None)
        if stack is not None:  # leaving, or a new name replacing the last (diffusers: the last one set wins)
            self._entered.stack = None
            stack.close()
        handle = get_handle(self._transformer)
        if context is not None and handle is not None:
            stack = contextlib.ExitStack()
            stack.enter_context(handle.context(context.name))
            self._entered.stack = stack


class BacHook(ModelHook):
    """bac in the transformer's ``HookRegistry`` (name ``"bac"``).

    ``cache_context(name)`` selects bac's context ``name`` (classifier-free guidance); ``reset_state`` ends a
    pipeline call's trajectory (``calls``); at each trajectory's first denoiser call a diffusers cache added
    since is refused. Removing the hook from the registry, by :func:`bac.diffusers.disable_cache` or directly,
    undoes everything ``undo`` holds (the engine's handle); a short
    last sampling call found then is kept in ``report`` for ``disable_cache`` to raise.
    """

    _is_stateful = True  # so diffusers hands it cache_context and reset_state

    def __init__(self, transformer: nn.Module, calls: PipelineCalls | None = None,
                 undo: contextlib.ExitStack | None = None):
        super().__init__()
        self.contexts = _Contexts(transformer)
        self.calls = calls
        self.undo = undo or contextlib.ExitStack()
        self.report: CacheStateError | None = None

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        if self.calls is not None:  # bac's own handle (accelerated with step_hooks=False): this hook drives it
            self.calls.at_denoiser_call(module, args)
            handle = self.calls.handle
            handle.begin_call(args, kwargs)
            if handle.step == 0:  # once per trajectory
                refuse_diffusers_caches(module, "a diffusers cache was added after bac")
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        if self.calls is not None:
            return self.calls.handle.end_call(output)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        if self.calls is not None:
            self.calls.end()
        return module

    def deinitalize_hook(self, module: nn.Module) -> nn.Module:  # diffusers' spelling
        self.contexts.set_context(None)
        try:
            self.undo.close()
        except CacheStateError as err:  # raising here would leave the registry half-updated
            self.report = err
        return module


class _CallState(threading.local):
    """Per thread: whether the pipeline's end-of-call reset ran since the last denoiser call, and the
    scheduler's timesteps when this thread's current call started."""

    def __init__(self):
        self.ended = False
        self.timesteps = None


class PipelineCalls:
    """Each sampling call one trajectory, with the method made for its step count.

    :meth:`at_denoiser_call`, called by :class:`BacHook` before each denoiser call, starts a new trajectory
    at the first denoiser call after the pipeline's scheduler was set to new timesteps (every diffusers
    pipeline calls ``set_timesteps`` once per call, before its loop) or after :meth:`end` (the pipeline's
    end-of-call reset, ``BacHook.reset_state``). The call's step count is the number of its timesteps;
    ``for_steps(steps, timesteps)`` makes the method for it or raises :class:`bac.PlanMismatchError`.
    """

    def __init__(self, handle: CacheHandle, pipe: Any, steps: int, for_steps: Callable[..., Any]):
        self.handle, self.pipe, self.steps, self.for_steps = handle, pipe, steps, for_steps
        self._thread = _CallState()

    def at_denoiser_call(self, module: nn.Module, args: tuple) -> None:
        thread = self._thread
        timesteps = getattr(self.pipe.scheduler, "timesteps", None) if self.pipe is not None else None
        restarted = timesteps is not None and timesteps is not thread.timesteps
        if restarted and not thread.ended:
            # a pipeline runs every timestep it set unless an exception stops it, and a CacheMixin model is
            # reset after every call that returns: the last call broke off, so its length says nothing
            with contextlib.suppress(CacheStateError):
                self.handle.end_trajectory()
        if thread.ended or restarted:
            if timesteps is not None:
                self._follow(len(timesteps), host_timesteps(timesteps))
            self.handle.new_trajectory()
            thread.ended, thread.timesteps = False, timesteps

    def _follow(self, steps: int, timesteps) -> None:
        if steps != self.steps:
            made = self.for_steps(steps, timesteps)  # raises where the method cannot follow: nothing changed
            self.handle.reschedule(made, num_steps=steps, scheduler=self.pipe.scheduler)
            self.steps = steps

    def end(self) -> None:
        """The pipeline call is over: check it ran the steps the plan covers (the cache stays until the next)."""
        self._thread.ended = True
        ran = self.handle.steps_run()
        try:
            self.handle.end_trajectory()
        except CacheStateError as err:
            raise PlanMismatchError(f"the plan covers {self.steps} denoiser calls per context, the pipeline "
                                    f"ran {ran}") from err


def host_timesteps(timesteps):
    """Timesteps as float64 on the host."""
    return torch.as_tensor(timesteps).detach().double().cpu().numpy()


def registry_of(transformer: nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(transformer)


def bac_hook(transformer: nn.Module) -> BacHook | None:
    """The :class:`BacHook` in ``transformer``'s registry, if bac caches it."""
    registry = getattr(transformer, "_diffusers_hook", None)  # where HookRegistry keeps a module's registry
    return registry.get_hook(HOOK_NAME) if registry is not None else None


def diffusers_caches(transformer: nn.Module) -> list[str]:
    """What diffusers caches ``transformer`` with: its ``CacheMixin`` config, and every stateful hook other
    than bac's on it or its sub-modules (diffusers' caches are its stateful hooks, reset after every call)."""
    config = getattr(transformer, "_cache_config", None)
    found = [] if config is None or isinstance(config, BacCache) else [type(config).__name__]
    for path, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name, hook in (registry.hooks.items() if registry is not None else ()):
            if hook._is_stateful and not isinstance(hook, BacHook):
                found.append(f"hook {name!r} on {path or 'the transformer'}")
    return found


def refuse_diffusers_caches(transformer: nn.Module, what: str) -> None:
    found = diffusers_caches(transformer)
    if found:
        raise CacheStateError(
            f"{what}: {type(transformer).__name__} has a diffusers cache ({', '.join(found)}), and bac and a "
            "diffusers cache cannot cache one model at once. Remove the diffusers cache (transformer.disable_cache(), "
            "or HookRegistry.remove_hook for hooks applied directly) first"
        )


@contextlib.contextmanager
def contexts_hooked(transformer: nn.Module):
    """bac's hook for the duration, without trajectory control: ``cache_context(name)`` selects the context
    ``name`` of whichever handle accelerates ``transformer`` (calibration and refinement make their own)."""
    if bac_hook(transformer) is not None:
        raise CacheStateError("bac caching is enabled on this transformer; call bac.diffusers.disable_cache first")
    refuse_diffusers_caches(transformer, "bac cannot calibrate or refine this transformer")
    registry = registry_of(transformer)
    registry.register_hook(BacHook(transformer), HOOK_NAME)
    try:
        yield
    finally:
        registry.remove_hook(HOOK_NAME, recurse=False)
