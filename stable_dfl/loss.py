"""StableDFLLoss: a drop-in Distribution Focal Loss with a probability floor and a loss cap.

The math is defined by :func:`stable_dfl.ops.reference.dfl_reference`; this module
validates arguments, flattens shapes and reduces. It knows nothing of backends: it
names one, and :mod:`stable_dfl.ops` picks and runs it.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import nn

from .ops.backends import BACKEND_CHOICES, BackendName
from .ops.dfl import dfl_rows, resolve_backend
from .ops.reference import DEFAULT_EPS, DEFAULT_MAX_LOSS, MAX_BINS, compute_dtype

Reduction = Literal["none", "mean", "sum"]
REDUCTIONS = ("none", "mean", "sum")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _rows(pred: torch.Tensor, target: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``pred`` as ``[target.numel(), n_bins]``, or a ValueError naming the shapes."""
    if pred.dim() >= 1 and pred.shape[-1] == n_bins and pred.shape[:-1] == target.shape:
        return pred.reshape(-1, n_bins)
    if (
        pred.dim() >= 1
        and target.dim() >= 1
        and pred.shape[:-1] == target.shape[:-1]
        and pred.shape[-1] == target.shape[-1] * n_bins
    ):
        return pred.reshape(-1, n_bins)
    raise ValueError(
        f"pred of shape {_shape(pred)} does not fit target of shape {_shape(target)} with "
        f"n_bins={n_bins}: expected pred [..., n_bins] with target [...], or pred "
        f"[..., k * n_bins] with target [..., k] (for example pred [M, {4 * n_bins}] with target [M, 4])"
    )


def _broadcastable(
    name: str, value: torch.Tensor, target: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``value``, checked to broadcast to ``target``'s shape (and, unless it is the mask, to hold
    real numbers that fit ``dtype``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if name != "mask" and (value.dtype == torch.bool or value.is_complex()):
        raise TypeError(f"{name} must hold real numbers, got {value.dtype}")
    if value.device != target.device:
        raise ValueError(f"{name} is on {value.device} but target is on {target.device}")
    try:
        value.expand(target.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {_shape(value)} cannot be broadcast to target's shape {_shape(target)}"
        ) from None
    if name != "mask" and _narrows(value.dtype, dtype) and not torch.compiler.is_compiling():
        # Checked in its own precision: a finite weight that the cast would make infinite
        # (compiled code cannot branch on values: there such a row's loss is NaN, reported).
        too_large = value.isfinite() & (value.abs() > torch.finfo(dtype).max)
        if bool(too_large.any()):
            raise ValueError(
                f"{name} holds finite values beyond the range of {dtype}, the dtype the loss "
                "is computed in for these logits"
            )
    return value


def _row_weights(
    weight: torch.Tensor | None, mask: torch.Tensor | None, target: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | int]:
    """The flat weights of the rows (``weight * mask``, broadcast to ``target``; see
    :func:`_weights_of_row_groups`) and the number of rows a 'mean' divides by. ``weight * mask``
    is computed at the shape the two broadcast to (a weight and a mask per anchor: one value per
    anchor, not one per side)."""
    count: torch.Tensor | int = max(target.numel(), 1)
    weights = None if weight is None else _broadcastable("weight", weight, target, dtype)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}"
            )
        mask = _broadcastable("mask", mask, target, dtype)
        # A masked-out row's weight is its weight times 0: 0, or NaN for a NaN/Inf weight, to be
        # reported. torch.where writes it in one pass, several times faster than a bool * float
        # product.
        if weights is None:
            weights = torch.where(mask, 1.0, 0.0)
        else:
            weights = torch.where(mask, weights, weights * 0)
        # Broadcasting repeats every mask element target.numel() / mask.numel() times.
        repeats = target.numel() // mask.numel() if mask.numel() else 0
        count = (mask.sum() * repeats).clamp(min=1)
    if weights is None:
        return None, count
    return _weights_of_row_groups(weights.to(dtype), target), count


def _weights_of_row_groups(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``weights`` (broadcastable to ``target``) flat, for the rows in ``target``'s order: where
    they vary along ``target``'s leading dims only (a weight per anchor ``[M, 1]`` for its four
    sides ``[M, 4]``), one weight per group of consecutive rows, which the kernels take as it is;
    otherwise one weight per row."""
    shape = (1,) * (target.dim() - weights.dim()) + tuple(weights.shape)
    varying = len(shape)
    while varying > 0 and shape[varying - 1] == 1:
        varying -= 1
    if shape[:varying] == tuple(target.shape[:varying]):
        return weights.reshape(-1)
    return weights.expand(target.shape).reshape(-1)


def _narrows(source: torch.dtype, dtype: torch.dtype) -> bool:
    """True when a finite ``source`` value can overflow as ``dtype``."""
    return source.is_floating_point and torch.finfo(source).max > torch.finfo(dtype).max


def _flat_target(target: torch.Tensor, n_bins: int, dtype: torch.dtype) -> torch.Tensor:
    """``target`` flattened, as ``dtype``. A finite value that the cast would make infinite
    is first clamped in its own precision to just outside the bins (which the loss clamps to
    the edge bins anyway); NaN and Inf stay as they are, to be reported."""
    flat = target.reshape(-1)
    if _narrows(flat.dtype, dtype):
        flat = torch.where(flat.isfinite(), flat.clamp(-1, n_bins), flat)
    return flat.to(dtype)


def _real_number(name: str, value: object, expected: str = "a number") -> None:
    """TypeError unless ``value`` is a real number (not a bool), or None where ``expected``
    allows it."""
    if value is None and expected.endswith("or None"):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _check_args(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    eps: float,
    max_loss: float | None,
    reduction: str,
    loss_weight: float,
    avg_factor: float | torch.Tensor | None,
    backend: str,
) -> None:
    """Every argument checked once, before anything is computed."""
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a torch.Tensor, got {type(pred).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if pred.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(
            f"pred must be float16, bfloat16, float32 or float64 logits, got {pred.dtype}"
        )
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold real numbers (bin units), got {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target is on {target.device}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if not 2 <= n_bins <= MAX_BINS:
        raise ValueError(f"n_bins must be in [2, {MAX_BINS}], got {n_bins}")
    _real_number("eps", eps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    _real_number("max_loss", max_loss, "a number or None")
    if max_loss is not None and not max_loss > 0:
        raise ValueError(f"max_loss must be positive or None, got {max_loss}")
    _real_number("loss_weight", loss_weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if avg_factor is not None:
        if reduction != "mean":
            raise ValueError(
                f"avg_factor divides a 'mean' loss; it cannot be used with reduction={reduction!r}"
            )
        _check_avg_factor(avg_factor, pred.device)
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def _value_is_readable(tensor: torch.Tensor) -> bool:
    """True where reading a tensor's value is free: on the CPU, outside compiled code."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_avg_factor(avg_factor: float | torch.Tensor, device: torch.device) -> None:
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1:
            raise ValueError(f"avg_factor must hold one number, got shape {_shape(avg_factor)}")
        if avg_factor.dtype == torch.bool or avg_factor.is_complex():
            raise TypeError(f"avg_factor must hold a real number, got {avg_factor.dtype}")
        if avg_factor.device != device and avg_factor.device.type != "cpu":
            raise ValueError(f"avg_factor is on {avg_factor.device} but pred is on {device}")
        if not _value_is_readable(avg_factor):
            return  # see _avg_factor: a bad value there gives a NaN loss
        number = float(avg_factor)
        # A NaN (a count computed from NaN outputs) is data, not a bad argument: it gives a
        # NaN loss, reported downstream.
        if math.isnan(number):
            return
    else:
        _real_number("avg_factor", avg_factor, "a number, a tensor or None")
        number = avg_factor
    if not 0 < number < math.inf:
        raise ValueError(f"avg_factor must be positive and finite, got {number}")


def stable_dfl_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    avg_factor: float | torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    n_bins: int = 16,
    eps: float = DEFAULT_EPS,
    max_loss: float | None = DEFAULT_MAX_LOSS,
    reduction: Reduction = "mean",
    loss_weight: float = 1.0,
    backend: BackendName = "auto",
) -> torch.Tensor:
    """Numerically stable Distribution Focal Loss; see :class:`StableDFLLoss`."""
    loss, _ = _stable_dfl_loss(
        pred,
        target,
        weight,
        avg_factor,
        mask,
        n_bins,
        eps,
        max_loss,
        reduction,
        loss_weight,
        backend,
    )
    return loss


def _stable_dfl_loss(
    pred, target, weight, avg_factor, mask, n_bins, eps, max_loss, reduction, loss_weight, backend
) -> tuple[torch.Tensor, str]:
    _check_args(pred, target, n_bins, eps, max_loss, reduction, loss_weight, avg_factor, backend)
    rows = _rows(pred, target, n_bins)
    dtype = compute_dtype(pred.dtype)
    flat_target = _flat_target(target, n_bins, dtype)
    flat_weight, count = _row_weights(weight, mask, target, dtype)

    chosen = resolve_backend(backend, pred.device)
    reduced = reduction != "none"
    loss = dfl_rows(rows, flat_target, flat_weight, float(eps), reduced, chosen)
    if not reduced:
        return loss.reshape(target.shape) * loss_weight, chosen
    if reduction == "mean":
        loss = loss / _avg_factor(avg_factor, count, loss)
    if max_loss is not None:
        # The cap bounds finite losses; an infinite one stays infinite, to be seen.
        loss = torch.where(torch.isinf(loss), loss, loss.clamp(max=max_loss))
    return loss * loss_weight, chosen


def _avg_factor(
    avg_factor: float | torch.Tensor | None, count: torch.Tensor | int, like: torch.Tensor
) -> torch.Tensor | float:
    """The divisor of a 'mean' loss (``avg_factor`` already checked by _check_args)."""
    if avg_factor is None:
        return count
    if not isinstance(avg_factor, torch.Tensor):
        return float(avg_factor)
    value = avg_factor.reshape(()).to(device=like.device, dtype=like.dtype)
    if _value_is_readable(avg_factor):
        return value
    # Not read (a GPU tensor, or compiled code), so not checked: a value that is not
    # positive and finite gives a NaN loss instead of a host sync.
    return torch.where((value > 0) & (value < math.inf), value, float("nan"))


class StableDFLLoss(nn.Module):
    r"""Distribution Focal Loss with a probability floor and a cap on the reduced loss.

    Per element: ``-(wl * log p[tl] + wr * log p[tl + 1])`` with ``p = softmax(pred).clamp(min=eps)``,
    ``t = target.clamp(0, n_bins - 1 - 0.01)``, ``tl = floor(t)``, ``wl = tl + 1 - t``, ``wr = t - tl``.
    A 'mean' or 'sum' result is capped at ``max_loss`` (its gradient is then zero, as for
    ``torch.clamp``), then multiplied by ``loss_weight``.

    Args:
        n_bins: bins per distribution (ultralytics ``reg_max=16`` -> 16; mmdetection GFL
            ``reg_max=16`` -> 17).
        eps: probability floor; each element's loss is at most ``-log(eps)`` (13.8 by
            default) times its weight. ``eps=0`` gives the plain log-softmax form.
        max_loss: cap on the reduced loss (15.0); None disables it.
        reduction: 'mean' (sum / number of elements, or / ``avg_factor``, or / number of
            masked-in elements), 'sum' or 'none' (per-element losses shaped like target).
        loss_weight: factor applied last.
        backend: 'auto', 'cpu' (compiled C++), 'cuda' (compiled CUDA), 'triton' or
            'reference' (eager PyTorch). ``last_backend`` tells which one ran.

    Shapes: ``pred [..., n_bins]`` with ``target [...]``, or ``pred [..., k * n_bins]`` with
    ``target [..., k]`` (e.g. ``[M, 64]`` with ``[M, 4]``). ``weight`` and ``mask`` broadcast to
    ``target``. Gradients flow to ``pred`` only; ``target`` and ``weight`` are constants (as in
    ultralytics and mmdetection, which detach them). The result is fp32 (fp64 for fp64 logits).
    Empty input gives 0 for 'mean'/'sum'. A NaN or Inf in ``pred`` or ``target`` gives a NaN
    loss: it is reported, never clamped away.
    """

    def __init__(
        self,
        n_bins: int = 16,
        eps: float = DEFAULT_EPS,
        max_loss: float | None = DEFAULT_MAX_LOSS,
        reduction: Reduction = "mean",
        loss_weight: float = 1.0,
        backend: BackendName = "auto",
    ) -> None:
        super().__init__()
        if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral):
            raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
        _check_args(
            torch.empty(0, n_bins),
            torch.empty(0),
            n_bins,
            eps,
            max_loss,
            reduction,
            loss_weight,
            None,
            backend,
        )
        self.n_bins = n_bins
        self.eps = eps
        self.max_loss = max_loss
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.backend = backend
        self.last_backend: str | None = None

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        avg_factor: float | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss, self.last_backend = _stable_dfl_loss(
            pred,
            target,
            weight,
            avg_factor,
            mask,
            self.n_bins,
            self.eps,
            self.max_loss,
            self.reduction,
            self.loss_weight,
            self.backend,
        )
        return loss

    def extra_repr(self) -> str:
        return (
            f"n_bins={self.n_bins}, eps={self.eps}, max_loss={self.max_loss}, "
            f"reduction={self.reduction!r}, loss_weight={self.loss_weight}, backend={self.backend!r}"
        )
