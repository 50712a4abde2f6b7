"""The fused DFL as an mmdetection loss (GFL and the heads that use its ``DistributionFocalLoss``).

In an mmdetection 3.x config::

    custom_imports = dict(imports=["stable_dfl.integrations.mmdet"], allow_failed_imports=False)
    model = dict(bbox_head=dict(loss_dfl=dict(type="StableDistributionFocalLoss", loss_weight=0.25)))

Importing this module registers :class:`DistributionFocalLoss` into ``mmdet.registry.MODELS``
as ``StableDistributionFocalLoss`` when mmdetection is importable (without it the class
still works on its own). ``register(force=True)`` also registers it as
``DistributionFocalLoss``, so configs that name mmdetection's class get this one unchanged.

Same constructor, forward signature and reduction semantics as mmdetection 3.x's
``DistributionFocalLoss`` with ``weight_reduce_loss`` ('mean' with ``avg_factor`` divides the
weighted sum by ``avg_factor + torch.finfo(torch.float32).eps``). Differences:

- probabilities are floored at ``eps`` (1e-6): an element's loss is at most 13.8 and its
  gradient zero where the floor is active, for hopeless predictions only; mmdetection's
  grows with the logit gap, without bound;
- targets are clamped to ``[0, n_bins - 1 - 0.01]``; mmdetection expects the head to clamp
  them (GFL clamps to ``reg_max - 0.1``) and fails on a target at or above ``n_bins - 1``;
- the result is fp32 (fp64 for fp64 logits), also for fp16/bf16 logits;
- gradients flow to ``pred`` only, never to ``weight``;
- an unknown ``reduction_override`` raises ValueError (mmdetection: AssertionError);
- empty input gives 0 for 'mean' (mmdetection: NaN);
- mmdetection 2.x divided by ``avg_factor`` without the eps: relative difference 1.2e-7 / avg_factor.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

import torch
from torch import nn

from .. import DEFAULT_EPS, stable_dfl_loss

__all__ = ["REGISTERED_NAME", "DistributionFocalLoss", "StableDistributionFocalLoss", "register"]

Reduction = Literal["none", "mean", "sum"]
REDUCTIONS = ("none", "mean", "sum")
REGISTERED_NAME = "StableDistributionFocalLoss"
MMDET_NAME = "DistributionFocalLoss"
# mmdetection 3.x adds this to avg_factor so that avg_factor = 0 (no positives) gives 0, not NaN.
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


class DistributionFocalLoss(nn.Module):
    r"""mmdetection's ``DistributionFocalLoss``, computed by the fused stable_dfl kernel.

    Args:
        reduction: 'mean', 'sum' or 'none'.
        loss_weight: factor applied to the loss.
        eps: probability floor (``eps=0`` gives mmdetection's formula exactly).
        max_loss: cap on a reduced loss; None (the default) disables it, because mmdetection's
            GFL head calls this loss with ``avg_factor=4.0`` and normalises later, so the value
            here is a sum over positives that a cap would clip, zeroing healthy gradients.

    Forward: ``pred [N, n + 1]`` logits and ``target [N]`` distances in bin units, optional
    ``weight [N]``, ``avg_factor`` (number or one-element tensor), ``reduction_override``.
    """

    def __init__(
        self,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        eps: float = DEFAULT_EPS,
        max_loss: float | None = None,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.eps = eps
        self.max_loss = max_loss

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        avg_factor: float | torch.Tensor | None = None,
        reduction_override: Reduction | None = None,
    ) -> torch.Tensor:
        if reduction_override not in (None, *REDUCTIONS):
            raise ValueError(
                f"reduction_override must be None or one of {REDUCTIONS}, got {reduction_override!r}"
            )
        reduction = reduction_override or self.reduction
        if avg_factor is not None:
            if reduction == "sum":
                raise ValueError('avg_factor can not be used with reduction="sum"')
            # mmdetection ignores avg_factor for 'none'.
            avg_factor = avg_factor + AVG_FACTOR_EPS if reduction == "mean" else None
        return stable_dfl_loss(
            pred,
            target,
            weight,
            avg_factor,
            n_bins=pred.shape[-1],
            eps=self.eps,
            max_loss=self.max_loss,
            reduction=reduction,
            loss_weight=self.loss_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, loss_weight={self.loss_weight}, eps={self.eps}, "
            f"max_loss={self.max_loss}"
        )


class _MMDetNotInstalledError(ImportError):
    pass


def _mmdet_model_registry() -> Any:
    try:
        registry_module = importlib.import_module("mmdet.registry")
    except ModuleNotFoundError as error:
        # Only a missing mmdetection (or a 2.x one, without mmdet.registry) gets this message;
        # a missing dependency of an installed mmdetection keeps its own.
        if error.name not in ("mmdet", "mmdet.registry"):
            raise
        raise _MMDetNotInstalledError(
            "registering into mmdetection needs mmdetection 3.x (mmdet.registry): pip install mmdet"
        ) from error
    return registry_module.MODELS


def register(force: bool = False) -> None:
    """Register :class:`DistributionFocalLoss` into ``mmdet.registry.MODELS``. Idempotent.

    Always as ``StableDistributionFocalLoss``; with ``force=True`` also as
    ``DistributionFocalLoss``, replacing mmdetection's class for every config that names it.
    Raises ImportError if mmdetection 3.x is not installed.
    """
    models = _mmdet_model_registry()
    # force=True for our own name: registering this class again (a second call, a module
    # reload) is not a conflict.
    models.register_module(name=REGISTERED_NAME, force=True, module=DistributionFocalLoss)
    if force:
        # mmdetection registers its own class, without force, when mmdet.models.losses is first
        # imported; that would fail on a name we already took, so let it register first.
        importlib.import_module("mmdet.models.losses")
        models.register_module(name=MMDET_NAME, force=True, module=DistributionFocalLoss)


#: The class by the name it is registered under, for code that imports it by that name.
StableDistributionFocalLoss = DistributionFocalLoss

# Registering on import is what mmdetection's `custom_imports` expects of a plugin module.
try:
    register()
except _MMDetNotInstalledError:
    pass  # nothing to register into; the class works on its own
