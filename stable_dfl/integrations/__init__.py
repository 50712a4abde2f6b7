"""Drop-in replacements for the DFL of detection frameworks, backed by the fused kernel.

- :mod:`stable_dfl.integrations.ultralytics`: ``DFLoss`` (same constructor and call as
  ``ultralytics.utils.loss.DFLoss``), ``patch()`` / ``unpatch()`` to swap it into an
  installed ultralytics, ``patch_criterion()`` / ``unpatch_criterion()`` for a built loss.
- :mod:`stable_dfl.integrations.mmdet`: ``DistributionFocalLoss`` (same constructor and
  forward as mmdetection's), registered into ``mmdet.registry.MODELS`` as
  ``StableDistributionFocalLoss`` when mmdetection is importable.

Nothing here imports a framework until it is used: this package imports neither submodule,
and each submodule imports its framework only when asked to patch or register.
"""
