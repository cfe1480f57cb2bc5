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
trainer's success check. Next: the real-time control loop, which overlaps the next
chunk's sampling with the execution of the current one.

``envs/`` holds the tasks and the data; the runtime holds no task knowledge (its
episodes use ``bac.envs.metaworld_env.make_vector_env``, the only environments today).
"""
from .episodes import (ChunkingPolicy, EnvPool, check_compatible, observation_batch, record_episode, run_episodes,
                       run_wave)

__all__ = ["ChunkingPolicy", "EnvPool", "check_compatible", "observation_batch", "record_episode", "run_episodes",
           "run_wave"]
