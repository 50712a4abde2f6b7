"""The unprotected DFL that the stable loss replaces, kept for experiments.

``-(wl * log(softmax(x))[tl] + wr * log(softmax(x))[tr])`` computed as written, in a
chosen (low) precision, with no probability floor and no cap on the loss. In fp16 a
softmax probability below ~6e-8 rounds to 0 and its log is -inf, so one confidently
wrong side makes the loss Inf and the gradients NaN: the failure the stable loss removes.
Same call as :class:`stable_dfl.StableDFLLoss` in the detection loss.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.reference import TARGET_MARGIN


def naive_dfl_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    avg_factor: float | torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    n_bins: int = 16,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain ``log(softmax)`` DFL in ``dtype`` (default: ``pred``'s); reduced like the stable
    loss's ``'mean'``: the weighted sum over masked-in elements divided by ``avg_factor``,
    else by their number."""
    logits = pred.reshape(*target.shape, n_bins)
    target = target.float().clamp(0, n_bins - 1 - TARGET_MARGIN)
    if mask is not None:
        # Index the foreground first, as the frameworks do: a masked-out row whose log(0)
        # is -inf would otherwise put 0 * inf = NaN into the gradient through torch.where.
        selected = mask.expand_as(target)
        logits, target = logits[selected], target[selected]
        weight = weight.expand_as(selected)[selected] if weight is not None else None
    if dtype is not None:
        logits = logits.to(dtype)
    log_probs = torch.log(torch.softmax(logits, dim=-1)).float()
    left = target.floor().long()
    weight_left = left + 1 - target
    loss = -(
        weight_left * log_probs.gather(-1, left[..., None]).squeeze(-1)
        + (1 - weight_left) * log_probs.gather(-1, (left + 1)[..., None]).squeeze(-1)
    )
    if weight is not None:
        loss = loss * weight
    denominator = avg_factor if avg_factor is not None else max(loss.numel(), 1)
    return loss.sum() / denominator


class NaiveDFLLoss(nn.Module):
    def __init__(self, n_bins: int = 16, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.dtype = dtype

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        avg_factor: float | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return naive_dfl_loss(
            pred, target, weight, avg_factor, mask=mask, n_bins=self.n_bins, dtype=self.dtype
        )
