"""The compiled CPU kernel: the shared fused-backend tests, plus what is CPU-specific
(large N, thread-count determinism, float64 gradcheck, the op contracts)."""

from __future__ import annotations

import pytest
import torch

from stable_dfl import stable_dfl_loss
from stable_dfl.ops import backends

from ..support.autograd_contract_suite import *  # noqa: F403  (the shared tests, run here with the fixtures below)
from ..support.dfl_cases import assert_close_to_reference, expected, random_case
from ..support.fused_backend_suite import *  # noqa: F403  (the shared tests, run here with the fixtures below)
from ..support.fused_backend_suite import run_backend

pytestmark = [
    pytest.mark.cpu_kernel,
    pytest.mark.skipif(
        not backends.compiled_available("cpu"),
        reason=f"stable_dfl._C not loaded: {backends.extension_error()}",
    ),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def backend() -> str:
    return "cpu"


@pytest.fixture
def device() -> str:
    return "cpu"


def run_cpu(pred, target, weight=None, reduction="none"):
    """Loss (no cap) and pred's gradient of ``sum(loss)`` on the compiled CPU kernel."""
    return run_backend("cpu", pred, target, weight, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_bins", [16, 33])
def test_rows_beyond_one_block_and_chunk(n_bins, dtype):
    # 4097 rows: many 256-row chunks and a partial SIMD block at the end.
    pred, target, weight = random_case(4097, n_bins, dtype, weighted=True)
    loss, grad = run_cpu(pred, target, weight)
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


@pytest.mark.parametrize("rows_per_weight", [1, 3])
@pytest.mark.parametrize("reduce_sum", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(reduce_sum, dtype, rows_per_weight):
    pred, target, weight = random_case(9, 16, dtype, weighted=True)
    weight = weight[::rows_per_weight]
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
