"""The commands: each a thin composition of the layers below it (Hydra configs in ``bac.configs``).

``bac-eval`` (:mod:`bac.apps.eval`, also ``python -m bac.eval``), ``bac-tune``, ``bac-train``,
``bac-collect``, ``bac-serve`` and ``bac-plan``.
"""
