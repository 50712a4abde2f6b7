"""The compiled CUDA kernel: the shared fused-backend tests on CUDA tensors, plus what only a
GPU can show for both GPU backends (CUDA and Triton): large and misaligned inputs, tile
boundaries, CUDA-graph capture, opcheck of the CUDA op and 'auto' dispatch."""

from __future__ import annotations

import pytest
import torch

from stable_dfl import BackendUnavailableError, resolve_backend, stable_dfl_loss
from stable_dfl.ops import backends

from ..support.autograd_contract_suite import *  # noqa: F403  (the shared tests, run here with the fixtures below)
from ..support.dfl_cases import assert_close_to_reference, expected, random_case
from ..support.fused_backend_suite import *  # noqa: F403  (the shared tests, run here with the fixtures below)
from ..support.fused_backend_suite import run_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_cuda_build = pytest.mark.skipif(
    not backends.compiled_available("cuda"),
    reason="stable_dfl._C was built without its CUDA kernels",
)
needs_triton = pytest.mark.skipif(
    backends.triton_import_error() is not None, reason=str(backends.triton_import_error())
)
GPU_BACKENDS = [
    pytest.param("cuda", marks=needs_cuda_build),
    pytest.param("triton", marks=[needs_triton, pytest.mark.triton]),
]


@pytest.fixture
def backend() -> str:
    if not backends.compiled_available("cuda"):
        pytest.skip("stable_dfl._C was built without its CUDA kernels")
    return "cuda"


@pytest.fixture
def device() -> str:
    return "cuda"


def _op(backend: str):
    return backends.op(backend, backends.DFL_FORWARD)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize("n_bins, n_rows", [(16, 255), (16, 256), (16, 4097), (128, 33), (17, 241)])
def test_tile_and_block_boundaries(gpu_backend, n_bins, n_rows):
    pred, target, weight = random_case(n_rows, n_bins, torch.float16, weighted=True, device="cuda")
    loss, grad = run_backend(gpu_backend, pred, target, weight)
    assert_close_to_reference(loss, grad, pred, target, weight)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_misaligned_logits(gpu_backend, dtype):
    # One element past a 16-byte boundary: the vector loads must fall back to scalar ones.
    storage = torch.randn(1 + 1000 * 17, device="cuda").mul(3).to(dtype)
    pred = storage[1:].view(1000, 17)
    assert pred.data_ptr() % 16 != 0
    target = torch.rand(1000, device="cuda") * 17
    # The op itself: the autograd front end would copy pred into an aligned leaf.
    loss, grad = _op(gpu_backend)(pred, target, None, 1e-6, False, True)
    assert_close_to_reference(loss, grad, pred, target)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_large_input_sum_and_gradient(gpu_backend):
    n_rows = 4_000_037
    pred, target, weight = random_case(n_rows, 16, torch.bfloat16, weighted=True, device="cuda")
    total, grad = run_backend(gpu_backend, pred, target, weight, reduction="sum")
    ref_loss, ref_grad = expected(pred, target, weight)
    assert abs(total.item() - ref_loss.sum().item()) <= 1e-6 * ref_loss.sum().item()
    assert (grad.double() - ref_grad).abs().max().item() <= 2.0**-8 * 2


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(gpu_backend):
    op = _op(gpu_backend)
    pred, target, weight = random_case(3000, 16, torch.float16, weighted=True, device="cuda")
    target, weight = target.float(), weight.float()

    def step():
        return op(pred, target, weight, 1e-6, True, True)

    side = torch.cuda.Stream()  # warm up (Triton compiles) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss, captured_grad = step()

    new_pred, new_target, new_weight = random_case(
        3000, 16, torch.float16, weighted=True, device="cuda"
    )
    pred.copy_(new_pred)
    target.copy_(new_target)
    weight.copy_(new_weight)
    graph.replay()
    eager_loss, eager_grad = step()
    assert torch.equal(captured_loss, eager_loss) and torch.equal(captured_grad, eager_grad)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
def test_runs_on_the_tensors_device_and_current_stream(gpu_backend):
    pred, target, weight = random_case(5000, 16, torch.float32, weighted=True, device="cuda")
    reference = run_backend(gpu_backend, pred, target, weight, reduction="sum")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = run_backend(gpu_backend, pred, target, weight, reduction="sum")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(reference[0], on_stream[0]) and torch.equal(reference[1], on_stream[1])


@needs_cuda_build
@pytest.mark.parametrize("rows_per_weight", [1, 3])
@pytest.mark.parametrize("reduce_sum", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_cuda_op(reduce_sum, dtype, rows_per_weight):
    pred, target, weight = random_case(9, 16, dtype, weighted=True, device="cuda")
    weight = weight[::rows_per_weight]
    for args in (
        (pred.clone().requires_grad_(), target.float(), weight, 1e-6, reduce_sum, True),
        (pred, target.float(), None, 0.0, reduce_sum, False),
    ):
        torch.library.opcheck(torch.ops.stable_dfl.dfl_forward, args)


@needs_cuda_build
def test_cuda_op_has_no_gradient_buffer_without_grad_and_handles_empty_input():
    pred, target, _ = random_case(10, 16, torch.float32, device="cuda")
    loss, grad = torch.ops.stable_dfl.dfl_forward(pred, target.float(), None, 1e-6, True, False)
    assert grad.numel() == 0 and loss.shape == ()
    empty = torch.empty(0, 16, device="cuda")
    loss, grad = torch.ops.stable_dfl.dfl_forward(empty, empty[:, 0], None, 1e-6, True, True)
    assert loss.item() == 0.0 and grad.shape == (0, 16)


@needs_cuda_build
def test_cuda_op_rejects_bad_arguments():
    pred, target, _ = random_case(4, 8, torch.float32, device="cuda")
    with pytest.raises(ValueError, match="n_bins must be in"):
        torch.ops.stable_dfl.dfl_forward(
            torch.zeros(4, 129, device="cuda"), target, None, 1e-6, True, False
        )
    with pytest.raises(ValueError, match="target is on"):
        torch.ops.stable_dfl.dfl_forward(pred, target.cpu(), None, 1e-6, True, False)


def test_auto_prefers_compiled_cuda_then_triton():
    chosen = resolve_backend("auto", torch.device("cuda"))
    if backends.compiled_available("cuda"):
        assert chosen == "cuda"
    elif backends.triton_import_error() is None:
        assert chosen == "triton"
    else:
        assert chosen == "reference"


def test_cpu_backend_on_cuda_tensors_says_why():
    pred, target, _ = random_case(4, 16, torch.float32, device="cuda")
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        stable_dfl_loss(pred, target, backend="cpu")
