"""What the first GPU run must show, beyond the shared backend suites: the four GPU paths (DFL
and gradient check, CUDA and Triton) on another GPU than the current one, offsets past 2**31
elements, thousands of tensors in one call, fp64 at the bin-count extremes, every tile and
bin-count kernel, misaligned views, no host sync in the guard, and fp16 overflow from an
unscale. Skipped without a GPU; ``bash bench/gpu.sh`` runs them."""

from __future__ import annotations

import warnings

import pytest
import torch

from stable_dfl import GradGuard
from stable_dfl.ops import backends
from stable_dfl.ops.grad_norm import grad_sumsq_nonfinite, grad_sumsq_nonfinite_reference

from ..support.dfl_cases import assert_close_to_reference, random_case
from ..support.fused_backend_suite import run_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)
GPU_BACKENDS = ["cuda", "triton"]


def _skip_unless_available(backend: str, family: str) -> None:
    reason = backends.unavailable_reason(backend, torch.device("cuda"), family)
    if reason is not None:
        pytest.skip(reason)


def _dfl_op(backend: str):
    _skip_unless_available(backend, backends.DFL_FORWARD)
    return backends.op(backend, backends.DFL_FORWARD)


@needs_two_gpus
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dfl_runs_on_the_tensors_gpu_while_another_is_current(backend):
    op = _dfl_op(backend)
    pred, target, weight = random_case(3000, 16, torch.float16, weighted=True, device="cuda:1")
    target, weight = target.float(), weight.float()
    with torch.cuda.device(0):
        loss, grad = op(pred, target, weight, 1e-6, False, True)
    assert loss.device == grad.device == torch.device("cuda:1")
    assert_close_to_reference(loss, grad, pred, target, weight)


@pytest.mark.slow  # 9 GB and a few seconds: left out of `bench/gpu.sh --quick`
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dfl_rows_past_2_31_elements_are_computed_where_they_are(backend):
    op = _dfl_op(backend)
    n_rows = 2**31 // 16 + 4_097  # the last rows start past element 2**31
    generator = torch.Generator(device="cuda").manual_seed(0)
    pred = torch.randn(n_rows, 16, device="cuda", dtype=torch.float16, generator=generator)
    target = torch.rand(n_rows, device="cuda", generator=generator) * 15
    loss, grad = op(pred, target, None, 1e-6, False, True)
    tail = slice(n_rows - 8_192, n_rows)
    tail_loss, tail_grad = op(
        pred[tail].contiguous(), target[tail].contiguous(), None, 1e-6, False, True
    )
    assert torch.equal(loss[tail], tail_loss) and torch.equal(grad[tail], tail_grad)
    total, _ = op(pred, target, None, 1e-6, True, False)
    assert torch.isfinite(total) and total.item() == pytest.approx(
        loss.double().sum().item(), rel=1e-6
    )


@pytest.mark.parametrize("n_bins", [2, 128])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dfl_float64_at_the_bin_count_extremes(backend, n_bins):
    _skip_unless_available(backend, backends.DFL_FORWARD)
    pred, target, weight = random_case(1_000, n_bins, torch.float64, weighted=True, device="cuda")
    loss, grad = run_backend(backend, pred, target, weight)
    assert_close_to_reference(loss, grad, pred, target, weight)
    pred[7, n_bins - 1] = float("inf")
    target[8] = float("nan")
    loss, grad = run_backend(backend, pred, target, weight)
    assert torch.isnan(loss[[7, 8]]).all() and torch.isnan(grad[[7, 8]]).all()
    assert torch.isfinite(loss[:7]).all() and torch.isfinite(grad[9:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "n_bins, n_rows", [(33, 255), (64, 257), (65, 129), (127, 65), (100, 4_097), (48, 1)]
)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dfl_tiles_and_wide_bin_kernels(backend, n_bins, n_rows, dtype):
    _skip_unless_available(backend, backends.DFL_FORWARD)
    pred, target, weight = random_case(n_rows, n_bins, dtype, weighted=True, device="cuda")
    loss, grad = run_backend(backend, pred, target, weight)
    assert_close_to_reference(loss, grad, pred, target, weight)


@pytest.mark.parametrize("n_bins", [16, 64])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dfl_misaligned_half_view_with_an_even_bin_count(backend, n_bins):
    op = _dfl_op(backend)
    storage = (torch.randn(1 + 999 * n_bins, device="cuda") * 3).half()
    pred = storage[1:].view(999, n_bins)  # 2 bytes past a 16-byte boundary
    assert pred.data_ptr() % 16 == 2
    target = torch.rand(999, device="cuda") * n_bins
    loss, grad = op(pred, target, None, 1e-6, False, True)
    assert_close_to_reference(loss, grad, pred, target)


def _grad_backend(backend: str) -> str:
    _skip_unless_available(backend, backends.GRAD_SUMSQ)
    return backend


@needs_two_gpus
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grad_check_of_another_gpu_with_unscale(backend):
    backend = _grad_backend(backend)
    grads = [torch.randn(5_000, device="cuda:1").half(), torch.randn(70_000, device="cuda:1")]
    expected = grad_sumsq_nonfinite_reference(
        [g.clone() for g in grads], torch.tensor([0.5], device="cuda:1")
    )
    with torch.cuda.device(0):
        got = grad_sumsq_nonfinite(grads, torch.tensor([0.5], device="cuda:1"), backend=backend)
    assert got[0].device == torch.device("cuda:1")
    torch.testing.assert_close(got[0], expected[0], rtol=2e-6, atol=0)
    assert torch.equal(got[2], expected[2])


@pytest.mark.slow  # 4 GB: left out of `bench/gpu.sh --quick`
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grad_check_of_a_tensor_past_2_31_elements(backend):
    backend = _grad_backend(backend)
    ones = torch.ones(2**31 + 1_000, device="cuda", dtype=torch.float16)
    sumsq, found, nonfinite = grad_sumsq_nonfinite([ones], backend=backend)
    assert sumsq.item() == float(ones.numel()) and found.item() == 0.0  # 1s sum exactly in fp64
    ones[-1] = float("nan")
    _, found, nonfinite = grad_sumsq_nonfinite([ones], backend=backend)
    assert found.item() == 1.0 and nonfinite.tolist() == [True]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grad_check_of_ten_thousand_small_tensors(backend):
    backend = _grad_backend(backend)
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 100, (10_000,), generator=generator).tolist()
    grads = [torch.randn(n, generator=generator).cuda() for n in sizes]
    grads[9_998][-1] = float("inf")
    expected = grad_sumsq_nonfinite_reference(grads)
    got = grad_sumsq_nonfinite(grads, backend=backend)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-9, atol=0)
    assert torch.equal(got[2], expected[2]) and got[2].nonzero().flatten().tolist() == [9_998]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_unscale_by_more_than_1_overflowing_half_is_reported(backend):
    backend = _grad_backend(backend)
    grads = [torch.full((3_000,), 60_000.0, device="cuda").half(), torch.ones(10, device="cuda")]
    inv_scale = torch.tensor([2.0], device="cuda")
    expected_grads = [g.clone() for g in grads]
    expected = grad_sumsq_nonfinite_reference(expected_grads, inv_scale, in_place=True)
    got = grad_sumsq_nonfinite(grads, inv_scale, in_place=True, backend=backend)
    assert got[1].item() == 1.0 and got[2].tolist() == [True, False] == expected[2].tolist()
    assert torch.isinf(grads[0]).all() and torch.equal(grads[1], expected_grads[1])
    torch.testing.assert_close(got[0], expected[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_empty_list_on_the_gpu(backend):
    backend = _grad_backend(backend)
    sumsq, found, nonfinite = grad_sumsq_nonfinite(
        [], torch.tensor([1.0], device="cuda"), backend=backend
    )
    assert sumsq.device.type == found.device.type == nonfinite.device.type == "cuda"
    assert sumsq.item() == 0.0 and found.item() == 0.0 and nonfinite.numel() == 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_guard_checks_and_clips_without_a_host_sync(backend):
    backend = _grad_backend(backend)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    guard = GradGuard(model, max_norm=0.5, backend=backend)

    def backward():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(32, 64, device="cuda")).float().square().mean()
        scaler.scale(loss).backward()

    backward()
    guard.step(optimizer, scaler)  # compiles and warms up outside the checks
    backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        guard.check_and_clip(optimizer, scaler)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scaler.step(optimizer)
    scaler.update()

    backward()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard.step(optimizer, scaler)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, "step reads one flag from the device, nothing more"
