"""The runtime: how a policy is driven on a robot or a simulated one, step by step.

A policy (:class:`bac.runtime.episodes.ChunkingPolicy`, e.g.
``bac.policies.policy.DiffusionPolicy``) predicts a chunk of actions per sampling
call; the runtime turns environment observations into the policy's feature dicts
(``observation.state``, ``task``), executes the chunk's actions open loop (Diffusion
Policy's receding horizon, through the policy's own action queue), clips them to
the environment's action space and keeps score.

Today: chunked execution of seeded episodes in waves on gymnasium vector envs
(:func:`run_episodes`) and one recorded episode with a frame per step
(:func:`record_episode`, the evaluator's ``video=true``), used by the evaluator (``bac.evaluation``) and the
trainer's success check. The real-time control loop (:func:`run_control_episode`, in
``control``) drives one robot at a fixed control rate and overlaps the next chunk's
sampling with the execution of the current one, on a wall clock (a worker thread) or a
deterministic virtual clock; :func:`summarize_runs` gives its latency percentiles,
deadline misses and achieved rate.

``envs/`` holds the tasks and the data; the runtime holds no task knowledge: it takes an env
factory (:class:`EnvFactory`; the shipped tasks' is ``bac.envs.metaworld_env.make_vector_env``).
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
