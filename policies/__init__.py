"""Transformer diffusion policies with LeRobot's policy interface.

- :mod:`policies.config`: typed configs (:class:`~bac.policies.config.PolicyConfig`, one model
  config per architecture) and the feature spec (``observation.state``, ``task``, ``action``),
  stored in a checkpoint's ``config.json``.
- :mod:`policies.policy`: :class:`~bac.policies.policy.DiffusionPolicy`, the thin policy: ``reset()``,
  ``predict_action_chunk(batch)``, ``select_action(batch)``, ``with_sampler(kind, steps)``; checkpoints.
- :mod:`policies.sampler`: :class:`~bac.policies.sampler.Sampler`, the sampler as a value.
- :mod:`policies.inputs`, :mod:`policies.normalize`, :mod:`policies.diffusion`, :mod:`policies.nonfinite`:
  the batch checks and condition, normalisation, the sampling loop and training loss, non-finite actions.
- :mod:`policies.dpt`, :mod:`policies.dit`: the DP-T and DiT denoisers.
- :mod:`policies.train`: the training loop (``bac-train``, :mod:`bac.apps.train`, runs it).

Nothing is imported here, so ``import bac.policies.dpt`` does not load diffusers.
"""
