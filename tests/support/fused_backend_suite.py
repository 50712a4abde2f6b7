"""Tests every fused backend must pass, against the float64 reference.

They take two fixtures, ``backend`` (a backend name) and ``device`` (where the tensors live),
which the importing test module defines: test_dfl_cpu.py (the compiled CPU kernel),
test_dfl_triton.py (Triton, interpreted on CPU tensors without a GPU) and test_dfl_cuda.py
(the compiled CUDA kernel).
"""

from __future__ import annotations

import pytest
import torch

from stable_dfl import StableDFLLoss, stable_dfl_loss
from stable_dfl.ops.reference import TARGET_MARGIN

from .dfl_cases import (
    assert_close_to_reference,
    expected,
    max_error,
    random_case,
    upper_bound,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_IDS = ("fp32", "fp16", "bf16", "fp64")


def run_backend(backend, pred, target, weight=None, reduction="none", grad_out=None, eps=1e-6):
    """Loss (no cap) and pred's gradient of ``sum(loss * grad_out)`` through the public API.

    The leaf keeps pred's strides, so non-contiguous logits reach the backend as they are.
    """
    x = torch.empty_strided(pred.shape, pred.stride(), dtype=pred.dtype, device=pred.device)
    x = x.copy_(pred).requires_grad_()
    loss = stable_dfl_loss(
        x,
        target,
        weight,
        n_bins=pred.shape[-1],
        eps=eps,
        reduction=reduction,
        max_loss=None,
        backend=backend,
    )
    (loss * (1.0 if grad_out is None else grad_out)).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_bins", [8, 16, 17, 32, 33])
@pytest.mark.parametrize("n_rows", [0, 1, 7, 300])
def test_matches_float64_reference(backend, device, n_rows, n_bins, dtype):
    pred, target, weight = random_case(
        n_rows, n_bins, dtype, weighted=n_rows % 2 == 1, device=device
    )
    loss, grad = run_backend(backend, pred, target, weight)
    assert loss.shape == (n_rows,)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_reference(loss, grad, pred, target, weight)
    total, grad_of_sum = run_backend(backend, pred, target, weight, reduction="sum")
    ref_total = expected(pred, target, weight)[0].sum().item()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert total.shape == () and abs(total.item() - ref_total) <= tol * max(1.0, abs(ref_total))
    # The reduced and per-row launches compute the same gradient.
    assert torch.equal(grad_of_sum, grad)


@pytest.mark.parametrize("n_bins", [2, 3, 64, 100, 128])
def test_bin_counts_up_to_the_limit(backend, device, n_bins):
    pred, target, weight = random_case(37, n_bins, torch.float32, weighted=True, device=device)
    loss, grad = run_backend(backend, pred, target, weight)
    assert_close_to_reference(loss, grad, pred, target, weight)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=DTYPE_IDS[:3])
@pytest.mark.parametrize("n_bins", [16, 17])
def test_targets_on_bin_edges_and_clamp_limits(backend, device, dtype, n_bins):
    last = n_bins - 1
    limit = last - TARGET_MARGIN  # the upper clamp of the target
    values = [0.0, 1.0, 7.0, last - 1, limit, last, last + 0.5, -0.0, -0.5, -3.0, 100.0, 0.01]
    target = torch.tensor(values, dtype=torch.float64, device=device)
    pred, _, weight = random_case(target.numel(), n_bins, dtype, weighted=True, device=device)
    loss, grad = run_backend(backend, pred, target, weight)
    assert_close_to_reference(loss, grad, pred, target, weight)
    # Targets beyond the range are clamped: -3 behaves like 0, 100 like n_bins - 1.01.
    row = pred[:1].repeat(4, 1)
    edges = torch.tensor([-3.0, 0.0, 100.0, limit], device=device)
    clamped, _ = run_backend(backend, row, edges)
    assert clamped[0] == clamped[1] and clamped[2] == clamped[3]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_probability_floor_blocks_the_gradient_below_it(backend, device, eps):
    # Large logits put many target-bin probabilities below the floor.
    pred, target, _ = random_case(60, 16, torch.float32, scale=20.0, device=device)
    loss, grad = run_backend(backend, pred, target, eps=eps)
    ref_loss, ref_grad = expected(pred, target, eps=eps)
    assert max_error(loss, ref_loss) <= 1e-5 * max(1.0, ref_loss.abs().max().item())
    assert max_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize(
    "dtype, magnitude", [(torch.float32, 3e38), (torch.float16, 65504.0), (torch.bfloat16, 3e38)]
)
@pytest.mark.parametrize("n_bins", [16, 17])
def test_extreme_finite_logits_give_finite_bounded_loss(backend, device, dtype, magnitude, n_bins):
    signs = torch.randint(0, 2, (64, n_bins)).double() * 2 - 1
    pred = (signs * magnitude).to(dtype).to(device)
    pred[0] = magnitude  # all maxima equal
    pred[1] = -magnitude
    target = (torch.rand(64, dtype=torch.float64) * (n_bins - 1)).to(device)
    loss, grad = run_backend(backend, pred, target)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss >= 0).all() and (loss <= upper_bound() + 1e-5).all()
    assert_close_to_reference(loss, grad, pred, target)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=DTYPE_IDS[:3])
def test_non_finite_logit_is_reported_not_hidden(backend, device, bad, dtype):
    pred, target, _ = random_case(5, 17, dtype, device=device)
    pred[2, 7] = bad
    loss, grad = run_backend(backend, pred, target)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(loss[[0, 1, 3, 4]]).all() and torch.isfinite(grad[[0, 1, 3, 4]]).all()
    total, _ = run_backend(backend, pred, target, reduction="sum")
    assert torch.isnan(total)
    capped = stable_dfl_loss(pred, target, n_bins=17, backend=backend)
    assert torch.isnan(capped), "the max_loss cap must not turn a NaN into 15"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_target_is_reported(backend, device, bad):
    pred, target, _ = random_case(4, 16, torch.float32, device=device)
    target[1] = bad
    loss, grad = run_backend(backend, pred, target)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2, 3]]).all() and torch.isfinite(grad[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_of_weight_zero_cost_nothing_but_still_report_non_finite_input(backend, device, dtype):
    # 10% foreground in runs and alone, across several 256-row chunks of the CPU kernel.
    n_rows = 1_100
    pred, target, weight = random_case(n_rows, 16, dtype, weighted=True, device=device)
    keep = torch.rand(n_rows, generator=torch.Generator().manual_seed(1)) < 0.1
    keep[40:80] = True
    weight = torch.where(keep.to(device), weight, 0.0)
    background = (~keep).nonzero().flatten()
    bad_logit, bad_target = background[3].item(), background[500].item()
    pred[bad_logit, 5] = float("nan") if dtype != torch.float64 else float("inf")
    target[bad_target] = float("nan")

    loss, grad = run_backend(backend, pred, target, weight)
    bad = torch.zeros(n_rows, dtype=torch.bool)
    bad[[bad_logit, bad_target]] = True
    clean = (~keep & ~bad).to(device)
    assert (loss[clean] == 0).all() and (grad[clean] == 0).all()
    assert torch.isnan(loss[bad.to(device)]).all() and torch.isnan(grad[bad.to(device)]).all()
    assert torch.isnan(run_backend(backend, pred, target, weight, reduction="sum")[0])
    # Each foreground row gets the bits it gets when computed without the masked rows.
    rows = keep.nonzero().flatten().to(device)
    alone_loss, alone_grad = run_backend(backend, pred[rows], target[rows], weight[rows])
    assert torch.equal(loss[rows], alone_loss) and torch.equal(grad[rows], alone_grad)
    assert_close_to_reference(loss[rows], grad[rows], pred[rows], target[rows], weight[rows])


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=DTYPE_IDS[:3])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_a_weight_per_anchor_gives_the_bits_of_the_same_weight_per_side(
    backend, device, dtype, reduction
):
    # Anchors of 3 sides, so that some straddle the CPU kernel's 256-row chunks; most masked
    # out (the zero-weight path); one NaN weight, reported on every side of its anchor.
    anchors, sides, n_bins = 300, 3, 16
    pred, target, _ = random_case(anchors * sides, n_bins, dtype, device=device)
    pred, target = pred.view(anchors, sides * n_bins), target.view(anchors, sides)
    generator = torch.Generator().manual_seed(2)
    weight = torch.rand(anchors, 1, generator=generator)
    weight[torch.rand(anchors, 1, generator=generator) < 0.8] = 0.0
    weight[7] = float("nan")
    weight = weight.to(device)
    foreground = weight != 0

    def loss_and_grad(**weights):
        x = pred.clone().requires_grad_()
        loss = stable_dfl_loss(
            x, target, **weights, reduction=reduction, max_loss=None, backend=backend
        )
        loss.sum().backward()
        return loss.detach(), x.grad

    def per_side(anchor_values):
        return anchor_values.expand(anchors, sides).contiguous()

    for per_anchor, same_per_side in (
        ({"weight": weight}, {"weight": per_side(weight)}),
        (
            {"weight": weight, "mask": foreground},
            {"weight": per_side(weight), "mask": per_side(foreground)},
        ),
    ):
        got, want = loss_and_grad(**per_anchor), loss_and_grad(**same_per_side)
        for got_value, wanted in zip(got, want, strict=True):
            torch.testing.assert_close(got_value, wanted, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(got[1][7]).all() and torch.isfinite(got[1][8:]).all()


@pytest.mark.parametrize("layout", ["transposed", "column_slice"])
def test_non_contiguous_inputs(backend, device, layout):
    if layout == "transposed":
        pred = torch.randn(16, 40, 3, device=device)[:, :, 1].t()  # [40, 16], strides (3, 120)
    else:
        pred = torch.randn(40, 48, device=device)[:, ::3]  # [40, 16], strides (48, 3)
    target = (torch.rand(80, device=device) * 15)[::2]
    weight = torch.rand(120, device=device)[::3]
    assert not pred.is_contiguous() and not target.is_contiguous() and not weight.is_contiguous()
    loss, grad = run_backend(backend, pred, target, weight)
    assert_close_to_reference(loss, grad, pred.contiguous(), target.contiguous(), weight)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=DTYPE_IDS[:3])
def test_grad_output_other_than_one(backend, device, dtype):
    pred, target, weight = random_case(33, 17, dtype, weighted=True, device=device)
    grad_out = torch.randn(33, dtype=torch.float64, device=device).float()
    _, grad = run_backend(backend, pred, target, weight, grad_out=grad_out)
    _, ref_grad = expected(pred, target, weight, grad_out=grad_out)
    bound = 1e-5 if dtype == torch.float32 else 2.0**-7 * ref_grad.abs().max().item()
    assert max_error(grad, ref_grad) <= bound
    _, grad_of_sum = run_backend(backend, pred, target, weight, reduction="sum", grad_out=2.5)
    _, ref_grad_of_sum = expected(pred, target, weight, grad_out=torch.full_like(grad_out, 2.5))
    bound = 1e-5 if dtype == torch.float32 else 2.0**-7 * ref_grad_of_sum.abs().max().item()
    assert max_error(grad_of_sum, ref_grad_of_sum) <= bound


def test_reduced_loss_and_gradient_are_bitwise_deterministic(backend, device):
    pred, target, weight = random_case(1_000, 17, torch.float32, weighted=True, device=device)
    first = run_backend(backend, pred, target, weight, reduction="sum")
    second = run_backend(backend, pred, target, weight, reduction="sum")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_module_reports_the_backend_it_ran(backend, device):
    pred, target, weight = random_case(32, 16, torch.float32, weighted=True, device=device)
    module = StableDFLLoss(n_bins=16, backend=backend)
    loss = module(pred.view(8, 64), target.view(8, 4), weight.view(8, 4))
    assert module.last_backend == backend
    reference = stable_dfl_loss(pred, target, weight, n_bins=16, backend="reference")
    torch.testing.assert_close(loss, reference)


def test_logits_are_never_modified(backend, device):
    pred, target, _ = random_case(100, 16, torch.float16, device=device)
    x = pred.clone().requires_grad_()
    stable_dfl_loss(x, target, backend=backend).backward()
    assert torch.equal(x.detach(), pred)


def test_torch_compile_fullgraph_matches_eager(backend, device):
    pred, target, weight = random_case(200, 16, torch.float32, weighted=True, device=device)
    module = StableDFLLoss(n_bins=16, backend=backend)

    def step(p, t, w):
        return module(p.view(50, 64), t.view(50, 4), w.view(50, 4))

    x = pred.clone().requires_grad_()
    eager_loss = step(x, target, weight)
    compiled_loss = torch.compile(step, fullgraph=True)(x, target, weight)
    torch.testing.assert_close(compiled_loss, eager_loss)
    (eager_grad,) = torch.autograd.grad(eager_loss, x)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, x)
    torch.testing.assert_close(compiled_grad, eager_grad)


# Star-imported by the backend test modules, which collect these tests with their fixtures.
__all__ = [name for name in dir() if name.startswith("test_")]
