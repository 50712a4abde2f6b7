"""The compiled CPU kernel against the float64 reference, and the op's contracts."""

from __future__ import annotations

import pytest
import torch

from stable_dfl import stable_dfl_loss
from stable_dfl.ops import _library

from .dfl_cases import assert_close_to_reference, expected, random_case, upper_bound

pytestmark = pytest.mark.skipif(
    not _library.compiled_cpu_available(),
    reason=f"stable_dfl._C not loaded: {_library.EXTENSION_ERROR}",
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def run_cpu(pred, target, weight=None, reduction="none", grad_out=None):
    """Loss and pred's gradient through the public API on the compiled CPU kernel."""
    x = pred.detach().clone().requires_grad_()
    loss = stable_dfl_loss(
        x, target, weight, reduction=reduction, max_loss=None, backend="cpu", n_bins=pred.shape[-1]
    )
    if grad_out is None:
        loss.sum().backward()
    else:
        (loss * grad_out).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_bins", [2, 8, 16, 17, 32, 33, 128])
@pytest.mark.parametrize("n_rows", [0, 1, 7, 4097])
def test_matches_float64_reference(n_rows, n_bins, dtype):
    pred, target, weight = random_case(n_rows, n_bins, dtype, weighted=n_rows % 2 == 1)
    loss, grad = run_cpu(pred, target, weight)
    assert loss.shape == (n_rows,)
    assert_close_to_reference(loss, grad, pred, target, weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_sum_matches_reference(dtype):
    pred, target, _ = random_case(100_000, 16, dtype)
    total, grad = run_cpu(pred, target, reduction="sum")
    ref_loss, _ = expected(pred, target)
    assert total.item() == pytest.approx(ref_loss.sum().item(), rel=1e-6)
    assert_close_to_reference(run_cpu(pred, target)[0], grad, pred, target)


def test_float64_gradcheck():
    pred, target, weight = random_case(6, 17, torch.float64, weighted=True)
    pred.requires_grad_()
    for reduction in ("none", "sum", "mean"):

        def loss_fn(x, reduction=reduction):
            return stable_dfl_loss(x, target, weight, n_bins=17, reduction=reduction, backend="cpu")

        assert torch.autograd.gradcheck(loss_fn, (pred,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_targets_on_bin_edges_and_clamp_limits(dtype):
    n_bins = 16
    target = torch.tensor(
        [0.0, 1.0, 7.0, 14.0, 14.99, 15.0, 15.5, -0.5, -3.0, 100.0, 7.5, 0.01], dtype=torch.float64
    )
    pred = torch.randn(target.numel(), n_bins, dtype=torch.float64).to(dtype)
    loss, grad = run_cpu(pred, target)
    assert_close_to_reference(loss, grad, pred, target)
    # Targets beyond the range are clamped: -3 behaves like 0, 100 like 14.99.
    row = pred[:1].expand(4, n_bins)
    clamped, _ = run_cpu(row, torch.tensor([-3.0, 0.0, 100.0, 14.99]))
    assert clamped[0] == clamped[1] and clamped[2] == clamped[3]


@pytest.mark.parametrize(
    "dtype, magnitude", [(torch.float32, 3e38), (torch.float16, 65504.0), (torch.bfloat16, 3e38)]
)
def test_extreme_finite_logits_give_finite_bounded_loss_and_gradient(dtype, magnitude):
    n_bins = 16
    signs = torch.randint(0, 2, (64, n_bins)).double() * 2 - 1
    pred = (signs * magnitude).to(dtype)
    pred[0] = magnitude  # all equal maxima
    pred[1] = -magnitude
    target = torch.rand(64, dtype=torch.float64) * 15
    loss, grad = run_cpu(pred, target)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss >= 0).all() and (loss <= upper_bound() + 1e-5).all()
    # Each gradient row sums to ~0: softmax minus the two-hot target (where no clamp blocks it).
    assert_close_to_reference(loss, grad, pred, target)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_logit_is_reported_not_hidden(bad, dtype):
    pred, target, _ = random_case(5, 16, dtype)
    pred[2, 7] = bad
    loss, grad = run_cpu(pred, target)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(loss[[0, 1, 3, 4]]).all() and torch.isfinite(grad[[0, 1, 3, 4]]).all()
    total = stable_dfl_loss(pred, target, backend="cpu")
    assert torch.isnan(total), "the max_loss cap must not turn a NaN into 15"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_target_is_reported(bad):
    pred, target, _ = random_case(4, 16, torch.float32)
    target[1] = bad
    loss, grad = run_cpu(pred, target)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2, 3]]).all()


def test_non_contiguous_inputs():
    base = torch.randn(16, 40, 3)
    pred = base[:, :, 1].t()  # [40, 16], strided
    target = (torch.rand(80) * 15)[::2]
    assert not pred.is_contiguous() and not target.is_contiguous()
    loss, grad = run_cpu(pred, target)
    assert_close_to_reference(loss, grad, pred.contiguous(), target.contiguous())


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_output_other_than_one(dtype):
    pred, target, weight = random_case(33, 17, dtype, weighted=True)
    grad_out = torch.randn(33, dtype=torch.float64).float()
    _, grad = run_cpu(pred, target, weight, grad_out=grad_out)
    _, ref_grad = expected(pred, target, weight, grad_out=grad_out)
    bound = 1e-5 if dtype == torch.float32 else 2.0**-7 * ref_grad.abs().max().item()
    assert (grad.double() - ref_grad).abs().max().item() <= bound


def test_deterministic_whatever_the_thread_count():
    pred, target, weight = random_case(20_011, 16, torch.float32, weighted=True)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, max(2, threads)):
            torch.set_num_threads(n)
            loss, grad = run_cpu(pred, target, weight, reduction="sum")
            results.append((loss, grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("reduce_sum", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(reduce_sum, dtype):
    pred, target, weight = random_case(9, 16, dtype, weighted=True)
    pred.requires_grad_()
    torch.library.opcheck(
        torch.ops.stable_dfl.dfl_forward,
        (
            pred,
            target.to(pred.dtype if dtype == torch.float64 else torch.float32),
            weight,
            1e-6,
            reduce_sum,
            True,
        ),
    )


def test_logits_are_never_modified():
    pred, target, _ = random_case(100, 16, torch.float32)
    x = pred.clone().requires_grad_()
    stable_dfl_loss(x, target, backend="cpu").backward()
    assert torch.equal(x.detach(), pred)


def test_backward_twice_through_the_same_graph_gives_the_same_gradient():
    pred, target, _ = random_case(10, 16, torch.float32)
    x = pred.clone().requires_grad_()
    loss = stable_dfl_loss(x, target, backend="cpu") * 3.0
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)


def test_no_gradient_buffer_without_grad():
    pred, target, _ = random_case(10, 16, torch.float32)
    _, grad = torch.ops.stable_dfl.dfl_forward(pred, target.float(), None, 1e-6, True, False)
    assert grad.numel() == 0


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("per_row", [False, True])
def test_backward_kernel_scales_in_full_precision_and_rounds_once(dtype, per_row):
    grad = torch.randn(37, 17, dtype=torch.float64).to(dtype)
    # 1 / 537600: rounded to fp16 first it would lose 3% (a subnormal), so the factor must stay fp32.
    grad_loss = torch.rand(37) if per_row else torch.tensor(1.0 / 537_600)
    if dtype == torch.float64:
        grad_loss = grad_loss.double()
    out = torch.ops.stable_dfl.dfl_backward(grad, grad_loss)
    factor = grad_loss.double()[:, None] if per_row else grad_loss.double()
    exact = grad.double() * factor
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}.get(
        dtype, 2.0**-53
    )
    assert out.dtype == dtype
    subnormal_step = torch.finfo(dtype).smallest_normal * 2 * unit
    assert ((out.double() - exact).abs() <= unit * exact.abs() + subnormal_step / 2).all()
    torch.library.opcheck(torch.ops.stable_dfl.dfl_backward, (grad, grad_loss))
