"""The autograd and numeric contract every backend keeps, reference included: double
backward, ``torch.func`` transforms, gradients to pred only, one rounding of fp16/bf16
gradients, non-finite weights reported, and ``eps=0`` in log space.

Like fused_backend_suite.py, the tests take the ``backend`` and ``device`` fixtures of the
module that star-imports them (test_dfl_cpu, test_dfl_triton, test_dfl_cuda and
test_dfl_reference).
"""

from __future__ import annotations

import math

import pytest
import torch

from stable_dfl import stable_dfl_loss
from stable_dfl.ops.reference import dfl_reference

from .dfl_cases import expected, random_case


def _summed(backend, target, weight, n_bins):
    def loss(pred):
        return stable_dfl_loss(
            pred, target, weight, n_bins=n_bins, reduction="sum", max_loss=None, backend=backend
        )

    return loss


def _reference_sum(target, weight):
    # Autograd of the specification itself: independent of any closed-form gradient.
    return lambda pred: dfl_reference(pred, target, weight).sum()


def test_double_backward_matches_the_reference_hessian(backend, device):
    pred, target, weight = random_case(5, 8, torch.float64, weighted=True, device=device)
    loss, reference = _summed(backend, target, weight, 8), _reference_sum(target, weight)
    hessian = torch.autograd.functional.hessian(loss, pred)
    expected_hessian = torch.autograd.functional.hessian(reference, pred)
    assert expected_hessian.abs().sum() > 0.1  # a zero Hessian would pass anything below
    torch.testing.assert_close(hessian, expected_hessian, rtol=1e-6, atol=1e-9)
    x = pred.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
    assert grad.requires_grad
    assert torch.autograd.gradgradcheck(loss, (pred.clone().requires_grad_(),))


def test_torch_func_transforms_match_the_reference(backend, device):
    pred, target, weight = random_case(6, 16, torch.float64, weighted=True, device=device)
    loss, reference = _summed(backend, target, weight, 16), _reference_sum(target, weight)
    for transform in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd, torch.func.hessian):
        torch.testing.assert_close(
            transform(loss)(pred), transform(reference)(pred), rtol=1e-6, atol=1e-9
        )

    def per_row(p):
        return stable_dfl_loss(p, target, weight, reduction="none", backend=backend)

    torch.testing.assert_close(
        torch.func.jacrev(per_row)(pred),
        torch.func.jacrev(lambda p: dfl_reference(p, target, weight))(pred),
        rtol=1e-6,
        atol=1e-9,
    )
    batch = pred.unsqueeze(0) * torch.tensor([1.0, 2.0, 3.0], device=device).view(3, 1, 1)
    torch.testing.assert_close(
        torch.func.vmap(loss)(batch), torch.stack([reference(p) for p in batch]), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(loss))(batch),
        torch.stack([torch.func.grad(reference)(p) for p in batch]),
        rtol=1e-6,
        atol=1e-9,
    )


def test_torch_func_transforms_of_a_weight_per_anchor_are_those_of_the_weight_per_side(
    backend, device
):
    pred, target, _ = random_case(8, 16, torch.float64, device=device)
    pred, target = pred.view(4, 2 * 16), target.view(4, 2)
    weight = torch.rand(4, 1, dtype=torch.float64, device=device) + 0.5

    def summed(weights):
        return lambda p: stable_dfl_loss(
            p, target, weights, reduction="sum", max_loss=None, backend=backend
        )

    per_anchor, per_side = summed(weight), summed(weight.expand(4, 2).contiguous())
    batch = pred.unsqueeze(0) * torch.tensor([1.0, 2.0, 3.0], device=device).view(3, 1, 1)
    for transform, inputs in (
        (torch.func.grad, pred),
        (torch.func.jacfwd, pred),
        (torch.func.hessian, pred),
        (lambda f: torch.func.vmap(torch.func.grad(f)), batch),
    ):
        torch.testing.assert_close(
            transform(per_anchor)(inputs), transform(per_side)(inputs), rtol=0, atol=0
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_flow_to_pred_only(backend, device, reduction):
    pred, target, weight = random_case(6, 16, torch.float32, weighted=True, device=device)
    pred.requires_grad_()
    target = target.float().requires_grad_()
    weight = weight.float().requires_grad_()
    loss = stable_dfl_loss(pred, target, weight, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert target.grad is None and weight.grad is None


@pytest.mark.parametrize(
    "dtype, reduction, loss_scale",
    [(torch.float16, "mean", 65536.0), (torch.bfloat16, "sum", 1e-3)],
    ids=["fp16-mean-65536", "bf16-sum-1e-3"],
)
def test_low_precision_gradient_is_rounded_once(backend, device, dtype, reduction, loss_scale):
    """The fp16/bf16 gradient of a scaled loss is the fp32 gradient rounded once: bit for bit
    what the same backend computes for the same logits in fp32, then rounds. (Rounded twice,
    first unscaled, its error against float64 is 17x that of one rounding here, and tiny
    elements flush to 0 before the loss scale reaches them.)"""
    pred = (torch.randn(1000, 64, dtype=torch.float64) * 3).to(dtype).to(device)
    target = (torch.rand(1000, 4, dtype=torch.float64) * 14.9).to(device)

    def scaled_grad(logits):
        x = logits.clone().requires_grad_()
        loss = stable_dfl_loss(x, target, reduction=reduction, max_loss=None, backend=backend)
        (loss * loss_scale).backward()
        return x.grad

    grad = scaled_grad(pred)
    assert grad.dtype == dtype
    assert torch.equal(grad, scaled_grad(pred.float()).to(dtype))
    factor = loss_scale / (target.numel() if reduction == "mean" else 1)
    _, exact = expected(pred.reshape(-1, 16), target.reshape(-1))
    rounded_once = (exact * factor).reshape(pred.shape).to(dtype)
    flushed = (grad == 0) & (rounded_once != 0)
    assert not flushed.any(), f"{int(flushed.sum())} gradient elements flushed to zero"


def test_non_finite_weight_is_reported_and_never_capped(backend, device):
    pred, target, weight = random_case(6, 16, torch.float32, weighted=True, device=device)
    weight = weight.float()
    weight[2] = math.inf
    rows = stable_dfl_loss(pred, target, weight, reduction="none", backend=backend)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()
    x = pred.clone().requires_grad_()
    capped = stable_dfl_loss(x, target, weight, max_loss=15.0, backend=backend)
    capped.backward()
    assert torch.isnan(capped) and torch.isnan(x.grad[2]).all()


def test_eps_zero_is_the_log_softmax_form(backend, device):
    # Logits 200 apart: the softmax of the second underflows, its log is -200.
    x = torch.tensor([[100.0, -100.0]], device=device, requires_grad=True)
    half = torch.tensor([0.5], device=device)
    loss = stable_dfl_loss(x, half, n_bins=2, eps=0.0, max_loss=None, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(100.0, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, -0.5]], device=device))
    # A target on a bin gives its neighbour weight 0: exactly 0, even for a log of -inf.
    far = torch.tensor([[3e38, -3e38]], device=device, requires_grad=True)
    on_bin = torch.zeros(1, device=device)
    loss = stable_dfl_loss(far, on_bin, n_bins=2, eps=0.0, max_loss=None, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(far.grad).all()


# Star-imported by the backend test modules, which collect these tests with their fixtures.
__all__ = [name for name in dir() if name.startswith("test_")]
