"""The specification of the loss, in eager PyTorch.

Every backend must match :func:`dfl_reference`. For logits ``pred[N, n_bins]``,
continuous targets ``target[N]`` in bin units and optional weights ``weight[N]`` (or
``weight[G]``, G dividing N: one weight per group of N / G consecutive rows, such as an
anchor's four sides; :func:`weight_per_row`)::

    t  = target.clamp(0, n_bins - 1 - 0.01)
    tl = floor(t); tr = tl + 1; wl = tr - t; wr = t - tl
    lp = log_softmax(pred, -1).clamp(min=log(eps))        # probability floor, in log space
    l  = -(wl * lp[tl] + wr * lp[tr])                      # per row; a zero wl or wr adds 0
    l  = l * weight                                        # if given

computed in fp32 for fp16/bf16/fp32 logits and in fp64 for fp64 logits. The log-space
floor is ``log(softmax(pred).clamp(min=eps))`` without the underflow: with ``eps=0`` a
probability too small for the dtype still has its finite log. The gradient, with respect
to ``pred`` only (target and weight are constants), is :func:`dfl_reference_grad`.
A row whose logits, target or weight hold a NaN or an Inf yields NaN (loss and gradient):
non-finite input is reported, never clamped into a finite loss.
"""

from __future__ import annotations

import math

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


def _two_hot(target: torch.Tensor, n_bins: int):
    t = torch.nan_to_num(target, nan=0.0).clamp(0, n_bins - 1 - TARGET_MARGIN)
    left = t.floor()
    return left.long(), (left + 1) - t, t - left


def _poisoned_logits(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Logits in the compute dtype, a row all NaN where its logits, target or weight are not
    finite."""
    logits = pred.to(compute_dtype(pred.dtype))
    bad_row = ~(torch.isfinite(logits).all(dim=-1) & torch.isfinite(target))
    if weight is not None:
        bad_row = bad_row | ~torch.isfinite(weight)
    return logits + torch.where(bad_row, float("nan"), 0.0).to(logits.dtype).unsqueeze(-1)


def _log_eps(eps: float) -> float:
    return math.log(eps) if eps > 0 else -math.inf


def _target_log_probs(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None):
    """What the loss and its gradient share: the rows' log-probabilities (unfloored), the
    two-hot target (left bin, its weight, the right bin's weight) and the log-probabilities
    of the two target bins."""
    logits = _poisoned_logits(pred, target, weight)
    left, w_left, w_right = _two_hot(target, pred.shape[-1])
    log_p = torch.log_softmax(logits, dim=-1)

    def at(index: torch.Tensor) -> torch.Tensor:
        return log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1)

    return log_p, left, w_left, w_right, at(left), at(left + 1)


def weight_per_row(weight: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``weight[G]``, G dividing ``n_rows`` (a weight per row, or per group of ``n_rows / G``
    consecutive rows), as one weight per row."""
    n_weights = weight.shape[0]
    if n_weights == n_rows:
        return weight
    return weight.unsqueeze(-1).expand(n_weights, n_rows // n_weights).reshape(n_rows)


def row_scale(
    grad_loss: torch.Tensor, weight: torch.Tensor | None, target: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Each row's factor in the gradient of ``sum(row_losses * grad_loss)``: ``grad_loss``
    (0-dim or ``[N]``) times the row weight, as ``dtype`` and shaped like ``target``."""
    scale = grad_loss.to(dtype).expand(target.shape)
    if weight is None:
        return scale
    return scale * weight_per_row(weight.detach(), target.shape[0]).to(dtype)


def _weighted(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weight * value``, exactly 0 where the weight is 0 (even for an infinite value)."""
    return torch.where(weight == 0, 0.0, weight * value)


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
    target = target.to(dtype)
    weight = None if weight is None else weight_per_row(weight, target.shape[0])
    _, _, w_left, w_right, logp_left, logp_right = _target_log_probs(pred, target, weight)
    floor = _log_eps(eps)  # the probability floor, in log space
    loss = -(
        _weighted(w_left, logp_left.clamp(min=floor))
        + _weighted(w_right, logp_right.clamp(min=floor))
    )
    if weight is not None:
        loss = loss * weight.to(dtype)
    return loss


def dfl_reference_grad(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    grad_loss: torch.Tensor,
) -> torch.Tensor:
    """The gradient of ``sum(dfl_reference(pred, ...) * grad_loss)`` with respect to ``pred``
    (``grad_loss`` 0-dim or ``[N]``), in closed form, computed in the compute dtype and rounded
    once to pred's dtype.

    Written with differentiable ops, so that it has derivatives of its own: double backward,
    ``torch.func`` transforms and Hessians go through it. Per row, with ``lp`` the log
    probabilities and ``a_k = w_k`` where ``lp[k] >= log(eps)`` (the floor passes no gradient
    below it), else 0: ``weight * (softmax(pred) * (a_l + a_r) - a_l * onehot(tl) - a_r *
    onehot(tr))``.
    """
    dtype = compute_dtype(pred.dtype)
    target = target.detach().to(dtype)
    weight = None if weight is None else weight_per_row(weight, target.shape[0])
    log_p, left, w_left, w_right, logp_left, logp_right = _target_log_probs(pred, target, weight)
    log_eps = _log_eps(eps)
    active_left = torch.where(logp_left >= log_eps, w_left, 0.0)
    active_right = torch.where(logp_right >= log_eps, w_right, 0.0)
    scale = row_scale(grad_loss, weight, target, dtype)
    two_hot = torch.zeros_like(log_p)
    two_hot = two_hot.scatter_add(-1, left.unsqueeze(-1), active_left.unsqueeze(-1))
    two_hot = two_hot.scatter_add(-1, (left + 1).unsqueeze(-1), active_right.unsqueeze(-1))
    grad = log_p.exp() * (active_left + active_right).unsqueeze(-1) - two_hot
    return (grad * scale.unsqueeze(-1)).to(pred.dtype)
