"""The runtime: how a policy is driven on a robot or a simulated one, step by step.

A policy (:class:`bac.runtime.episodes.ChunkingPolicy`, e.g. ``bac.policies.policy.DiffusionPolicy``)
predicts a chunk of actions per sampling call; the runtime turns observations into the policy's feature
dicts, executes the chunk's actions and keeps score: seeded episodes in waves on vector envs
(:func:`run_episodes`), one recorded episode (:func:`record_episode`), the real-time control loop
(:func:`run_control_episode`, :func:`summarize_runs`) and the policy server and its client. It holds no task
knowledge: it takes an env factory (:class:`EnvFactory`). docs/guide/realtime.md and docs/guide/server.md.
"""
from .episodes import (ChunkingPolicy, EnvFactory, EnvPool, check_compatible, observation_batch, observation_slices,
                       record_episode, run_episodes, run_wave)

__all__ = ["ChunkingPolicy", "EnvFactory", "EnvPool", "check_compatible", "observation_batch", "observation_slices",
           "record_episode", "run_episodes", "run_wave"]

# The real-time control loop.
from .control import (EpisodeTrace, VirtualClock, WallClock, auto_lead, constant_latency, format_summary,
                      make_control_env, run_control_episode, sampled_latency, summarize_runs)

__all__ += ["EpisodeTrace", "VirtualClock", "WallClock", "auto_lead", "constant_latency", "format_summary",
            "make_control_env", "run_control_episode", "sampled_latency", "summarize_runs"]

# The policy server and its client (extra ``serve``: websockets, msgpack), imported on first use so that
# the runtime works without that extra.
_SERVE_EXPORTS = {"PolicyServer": "server", "load_served_policy": "server", "PolicyClient": "client",
                  "RemotePolicy": "client", "ServerError": "client", "ObservationError": "client"}
__all__ += list(_SERVE_EXPORTS)


def __getattr__(name: str):
    if name in _SERVE_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_SERVE_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
