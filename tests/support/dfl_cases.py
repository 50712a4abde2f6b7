"""Inputs and float64 expectations shared by the DFL backend tests."""

from __future__ import annotations

import math

import torch

from stable_dfl.ops.reference import TARGET_MARGIN, dfl_reference

LOW_PRECISION = (torch.float16, torch.bfloat16)


def random_case(
    n_rows: int,
    n_bins: int,
    dtype: torch.dtype,
    scale: float = 3.0,
    weighted: bool = False,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits, targets spread over (and a little beyond) the bin range, optional weights."""
    pred = (torch.randn(n_rows, n_bins, dtype=torch.float64) * scale).to(dtype).to(device)
    target = (torch.rand(n_rows, dtype=torch.float64) * (n_bins + 1) - 0.5).to(device)
    weight = torch.rand(n_rows, dtype=torch.float64).to(device) if weighted else None
    return pred, target, weight


def expected(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and the gradient of ``sum(loss * grad_out)``, in float64, on pred's exact values."""
    x = pred.detach().double().requires_grad_()
    loss = dfl_reference(x, target.double(), None if weight is None else weight.double(), eps)
    (loss * (1.0 if grad_out is None else grad_out.double())).sum().backward()
    return loss.detach(), x.grad


def eager_low_precision(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same formula run by eager PyTorch entirely in pred's dtype: the accuracy bar for
    fp16/bf16 (a kernel's error may be at most twice this one's)."""
    x = pred.detach().clone().requires_grad_()
    n_bins = x.shape[-1]
    # Targets stay fp32 (in bf16 the clamp limit n_bins - 1.01 rounds up to n_bins - 1).
    t = target.float().clamp(0, n_bins - 1 - TARGET_MARGIN)
    left = t.floor()
    w_left, w_right = left + 1 - t, t - left
    log_p = torch.softmax(x, -1).clamp(min=eps).log()
    loss = -(
        w_left * log_p.gather(-1, left.long()[:, None])[:, 0]
        + w_right * log_p.gather(-1, (left.long() + 1)[:, None])[:, 0]
    )
    if weight is not None:
        loss = loss * weight.float()
    loss.sum().backward()
    return loss.detach(), x.grad


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference (NaN when either side has a NaN where the other has not)."""
    return max_abs(actual.double() - reference.double())


def max_finite_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the elements ``actual`` got finite."""
    error = (actual.double() - reference.double()).abs()
    return max_abs(error[torch.isfinite(error)])


def max_abs(values: torch.Tensor) -> float:
    return values.abs().max().item() if values.numel() else 0.0


def assert_close_to_reference(
    actual_loss: torch.Tensor,
    actual_grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> None:
    """fp32/fp64: tight tolerances. fp16/bf16: at most 2x the error of eager PyTorch in that dtype
    (plus a floor of one rounding of the value's magnitude)."""
    ref_loss, ref_grad = expected(pred, target, weight)
    if pred.dtype in LOW_PRECISION:
        eager_loss, eager_grad = eager_low_precision(pred, target, weight)
        unit = 2.0 ** -(8 if pred.dtype == torch.bfloat16 else 11)
        loss_bound = 2 * max_finite_error(eager_loss, ref_loss) + 1e-5 * max(1.0, max_abs(ref_loss))
        grad_bound = 2 * max_finite_error(eager_grad, ref_grad) + unit * max_abs(ref_grad)
        assert max_error(actual_loss, ref_loss) <= loss_bound
        assert max_error(actual_grad, ref_grad) <= grad_bound
        return
    tol = 1e-12 if pred.dtype == torch.float64 else 2e-5
    assert max_error(actual_loss, ref_loss) <= tol * max(1.0, max_abs(ref_loss))
    assert max_error(actual_grad, ref_grad) <= tol
    assert actual_grad.dtype == pred.dtype


def upper_bound(eps: float = 1e-6) -> float:
    """A row's loss is at most -log(eps) (times its weight)."""
    return -math.log(eps)
