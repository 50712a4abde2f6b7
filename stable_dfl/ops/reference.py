"""The specification of the loss, in eager PyTorch.

Every backend must match :func:`dfl_reference`. For logits ``pred[N, n_bins]``,
continuous targets ``target[N]`` in bin units and optional weights ``weight[N]``::

    t  = target.clamp(0, n_bins - 1 - 0.01)
    tl = floor(t); tr = tl + 1; wl = tr - t; wr = t - tl
    p  = softmax(pred, -1).clamp(min=eps)                  # probability floor
    l  = -(wl * log p[tl] + wr * log p[tr])                # per row
    l  = l * weight                                        # if given

computed in fp32 for fp16/bf16/fp32 logits and in fp64 for fp64 logits.
A row whose logits or target hold a NaN or an Inf yields NaN (loss and gradient):
non-finite input is reported, never clamped into a finite loss.
"""

from __future__ import annotations

import torch

#: Probability floor: a row's loss is at most ``-log(DEFAULT_EPS)`` = 13.8 (times its weight).
DEFAULT_EPS = 1e-6
#: Cap on the reduced ('mean'/'sum') loss, as in the original stage-2 fix.
DEFAULT_MAX_LOSS = 15.0
#: Largest bin count the kernels accept (csrc/dfl_row.h kMaxBins).
MAX_BINS = 128
#: Targets are clamped to ``[0, n_bins - 1 - TARGET_MARGIN]`` so that bin ``floor(t) + 1`` exists.
TARGET_MARGIN = 0.01


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed (and returned) in for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dfl_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Per-row DFL of ``pred[N, n_bins]`` against ``target[N]``; returns ``[N]``.

    Differentiable with respect to ``pred`` through autograd.
    """
    dtype = compute_dtype(pred.dtype)
    n_bins = pred.shape[-1]
    logits = pred.to(dtype)
    target = target.to(dtype)
    bad_row = ~(torch.isfinite(logits).all(dim=-1) & torch.isfinite(target))
    # Adding NaN to the whole row makes its loss and its gradient NaN.
    logits = logits + torch.where(bad_row, float("nan"), 0.0).to(dtype).unsqueeze(-1)
    t = torch.nan_to_num(target, nan=0.0).clamp(0, n_bins - 1 - TARGET_MARGIN)
    left = t.floor()
    right = left + 1
    w_left = right - t
    w_right = t - left
    log_p = torch.softmax(logits, dim=-1).clamp(min=eps).log()
    logp_left = log_p.gather(-1, left.long().unsqueeze(-1)).squeeze(-1)
    logp_right = log_p.gather(-1, right.long().unsqueeze(-1)).squeeze(-1)
    loss = -(w_left * logp_left + w_right * logp_right)
    if weight is not None:
        loss = loss * weight.to(dtype)
    return loss
