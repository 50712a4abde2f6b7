"""The gradient sum-of-squares / non-finite ops, on every backend this machine can run."""

from __future__ import annotations

import math

import pytest
import torch

from stable_dfl import grad_norm_and_nonfinite
from stable_dfl.ops import backends
from stable_dfl.ops.grad_norm import grad_sumsq_nonfinite, grad_sumsq_nonfinite_reference

from ..support.markers import needs_cuda

CPU = torch.device("cpu")
BACKENDS_HERE = [
    b for b in backends.BACKENDS if backends.unavailable_reason(b, CPU, backends.GRAD_SUMSQ) is None
]


def needs_compiled_cpu(test):
    """Runs the compiled CPU kernel: skipped without it, and rerun under each CPU level."""
    skip = pytest.mark.skipif(
        not backends.compiled_available("cpu", backends.GRAD_SUMSQ),
        reason="stable_dfl._C not built",
    )
    return pytest.mark.cpu_kernel(skip(test))


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def random_grads(seed: int, n: int = 12, max_numel: int = 70_000) -> list[torch.Tensor]:
    """Mixed dtypes and sizes, an empty tensor, a 0-dim one and non-contiguous layouts."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i in range(n):
        numel = int(torch.randint(1, max_numel, (1,), generator=gen))
        dtype = DTYPES[i % len(DTYPES)]
        scale = float(torch.empty(()).uniform_(1e-3, 10.0, generator=gen))
        grads.append((torch.randn(numel, generator=gen) * scale).to(dtype))
    grads.append(torch.empty(0))
    grads.append(torch.randn((), generator=gen))
    grads.append(torch.randn(40, 30, generator=gen).t())  # transposed: dense, not contiguous
    grads.append(torch.randn(20, 30, generator=gen)[:, ::3])  # strided: not dense
    grads.append(torch.randn(2, 3, 5, 7, generator=gen).to(memory_format=torch.channels_last))
    return grads


def memory_order(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a flat view, in memory order."""
    return tensor.as_strided((tensor.numel(),), (1,))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def float64_sumsq(grads: list[torch.Tensor], skip: set[int] = frozenset()) -> float:
    return sum(g.double().square().sum().item() for i, g in enumerate(grads) if i not in skip)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("seed", [0, 1])
def test_sum_of_squares_matches_float64(backend: str, seed: int) -> None:
    grads = random_grads(seed)
    sumsq, found, nonfinite = grad_sumsq_nonfinite(grads, backend=backend)
    assert sumsq.dtype == torch.float64 and sumsq.shape == ()
    assert found.dtype == torch.float32 and found.item() == 0.0
    assert nonfinite.dtype == torch.bool and not nonfinite.any() and len(nonfinite) == len(grads)
    assert sumsq.item() == pytest.approx(float64_sumsq(grads), rel=2e-6)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_large_tensors_and_many_chunks(backend: str) -> None:
    grads = [torch.randn(1_000_000), torch.randn(999_999).half(), torch.randn(1)]
    total_norm, nonfinite = grad_norm_and_nonfinite(grads, backend=backend)
    assert total_norm.item() == pytest.approx(math.sqrt(float64_sumsq(grads)), rel=1e-6)
    assert not nonfinite.any()


def plant(grads: list[torch.Tensor], where: str, value: float) -> int:
    """Writes ``value`` into one element; returns the index of the tensor it went to."""
    if where == "first element":
        index, position = 0, 0
    elif where == "last element":  # of the last tensor, in memory order
        index = len(grads) - 1
        position = grads[index].numel() - 1
    elif where == "1-element tensor":
        grads.append(torch.randn(1))
        index, position = len(grads) - 1, 0
    else:  # inside a float16 tensor, past the first chunk
        index = next(i for i, g in enumerate(grads) if g.dtype == torch.float16)
        grads[index] = torch.randn(100_000).half()
        position = 70_001
    memory_order(grads[index])[position] = value
    return index


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("where", ["first element", "last element", "1-element tensor", "float16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_is_caught_and_located(backend: str, where: str, value: float) -> None:
    grads = random_grads(3, n=5, max_numel=5000)
    bad = plant(grads, where, value)
    sumsq, found, nonfinite = grad_sumsq_nonfinite(grads, backend=backend)
    assert found.item() == 1.0
    assert nonfinite.nonzero().flatten().tolist() == [bad]
    # The other tensors' norm stays readable.
    assert sumsq.item() == pytest.approx(float64_sumsq(grads, skip={bad}), rel=2e-6)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_unscale_in_place_is_bitwise_gradscalers_unscale(backend: str) -> None:
    grads = [g for g in random_grads(4, n=8, max_numel=3000) if g.dtype != torch.float64]
    grads[2].view(-1)[0] = float("inf")
    inv_scale = torch.tensor([2.0**-13], dtype=torch.float32)
    expected = [g.clone() for g in grads]
    found_inf = torch.zeros(())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        same = [g for g in expected if g.dtype == dtype]
        torch._amp_foreach_non_finite_check_and_unscale_(same, found_inf, inv_scale)

    sumsq, found, nonfinite = grad_sumsq_nonfinite(grads, inv_scale, in_place=True, backend=backend)
    for got, want in zip(grads, expected, strict=True):
        assert torch.equal(bits(got), bits(want))
    assert found.item() == found_inf.item() == 1.0
    assert nonfinite.nonzero().flatten().tolist() == [2]
    assert sumsq.item() == pytest.approx(float64_sumsq(expected, skip={2}), rel=2e-6)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_read_only_unscale_measures_unscaled_values_without_writing(backend: str) -> None:
    grads = random_grads(5, n=6, max_numel=3000)
    originals = [g.clone() for g in grads]
    sumsq, _, _ = grad_sumsq_nonfinite(grads, torch.tensor(0.125), backend=backend)
    for got, want in zip(grads, originals, strict=True):
        assert torch.equal(got, want)
    unscaled, _, _ = grad_sumsq_nonfinite_reference(
        [g.clone() for g in grads], torch.tensor([0.125]), in_place=True
    )
    assert sumsq.item() == pytest.approx(unscaled.item(), rel=2e-6)
    assert sumsq.item() == pytest.approx(float64_sumsq(grads) / 64, rel=1e-3)


@needs_compiled_cpu
def test_cpu_kernel_is_deterministic_across_thread_counts() -> None:
    grads = random_grads(6, n=40, max_numel=200_000)
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            results.append(grad_sumsq_nonfinite(grads, torch.tensor(0.5), backend="cpu")[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r.view(torch.int64), results[0].view(torch.int64)) for r in results)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_float16_grads_whose_torch_norm_overflows_get_a_finite_norm(backend: str) -> None:
    grads = [torch.full((10_000,), 1000.0, dtype=torch.float16), torch.ones(3, dtype=torch.float16)]
    # The norm, 1e5, is past float16's 65504: torch's float16 norm is inf.
    assert torch.isinf(torch.linalg.vector_norm(grads[0]))
    total_norm, nonfinite = grad_norm_and_nonfinite(grads, backend=backend)
    assert total_norm.dtype == torch.float32
    assert total_norm.item() == pytest.approx(math.sqrt(1000.0**2 * 10_000 + 3), rel=1e-6)
    assert not nonfinite.any()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_finite_float32_gradients_never_overflow_or_underflow_the_sum(backend: str) -> None:
    # Squared in float32, 3e38 overflows and 1e-30 flushes to 0: in float64 neither does.
    grads = [torch.full((4,), 3e38), torch.ones(2), torch.full((3,), 1e-30)]
    sumsq, found, nonfinite = grad_sumsq_nonfinite(grads, backend=backend)
    assert sumsq.item() == pytest.approx(4 * 3e38**2 + 2, rel=1e-6)
    assert found.item() == 0.0 and not nonfinite.any()
    tiny, _, _ = grad_sumsq_nonfinite([torch.full((3,), 1e-30)], backend=backend)
    assert tiny.item() == pytest.approx(3e-60, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_a_float64_sum_that_overflows_is_flagged_but_no_tensor_is(backend: str) -> None:
    grads = [torch.full((4,), 1e300, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    sumsq, found, nonfinite = grad_sumsq_nonfinite(grads, backend=backend)
    assert math.isinf(sumsq.item()) and found.item() == 1.0 and not nonfinite.any()


@pytest.mark.cpu_kernel
def test_empty_inputs() -> None:
    total_norm, nonfinite = grad_norm_and_nonfinite([])
    assert total_norm.item() == 0.0 and nonfinite.shape == (0,)
    for backend in BACKENDS_HERE:
        sumsq, found, nonfinite = grad_sumsq_nonfinite(
            [torch.empty(0), torch.empty(0, 3)], backend=backend
        )
        assert sumsq.item() == 0.0 and found.item() == 0.0
        assert nonfinite.tolist() == [False, False]


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match="sparse"):
        grad_norm_and_nonfinite([torch.randn(3), torch.eye(3).to_sparse()])
    with pytest.raises(TypeError, match="float32, float16"):
        grad_norm_and_nonfinite([torch.arange(3)])
    with pytest.raises(TypeError, match=r"not a torch\.Tensor"):
        grad_norm_and_nonfinite([torch.randn(2), 3.0])
    with pytest.raises(ValueError, match="one device"):
        grad_norm_and_nonfinite([torch.randn(2), torch.randn(2, device="meta")])
    with pytest.raises(ValueError, match="inv_scale"):
        grad_sumsq_nonfinite([torch.randn(2)], in_place=True)
    with pytest.raises(ValueError, match="one element"):
        grad_norm_and_nonfinite([torch.randn(2)], torch.ones(2))
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        grad_norm_and_nonfinite([torch.randn(2)], backend="cuda")
    with pytest.raises(TypeError, match=r"got one tensor: pass \[tensor\]"):
        grad_norm_and_nonfinite(torch.randn(3, 2))
    with pytest.raises(ValueError, match="meta device"):
        grad_norm_and_nonfinite([torch.randn(2, device="meta")])
    for bad_scale in (0.0, -1.0, math.inf, torch.tensor(0.0), torch.tensor([-2.0])):
        with pytest.raises(ValueError, match="inv_scale must be positive and finite"):
            grad_norm_and_nonfinite([torch.randn(2)], bad_scale)
    with pytest.raises(ValueError, match="inv_scale is on the meta device"):
        grad_norm_and_nonfinite([torch.randn(2)], torch.ones(1, device="meta"))
    with pytest.raises(TypeError, match="inv_scale must be a number or a tensor, got str"):
        grad_norm_and_nonfinite([torch.randn(2)], "0.5")


@needs_compiled_cpu
def test_compiled_op_checks_its_arguments() -> None:
    op = torch.ops.stable_dfl.grad_sumsq_nonfinite
    with pytest.raises(NotImplementedError, match="SparseCPU"):  # the dispatcher stops it
        op([torch.eye(2).to_sparse()], None)
    with pytest.raises(TypeError, match="inv_scale must be float32"):
        op([torch.randn(2)], torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="one element"):
        op([torch.randn(2)], torch.ones(2))


def opcheck_cases() -> list[tuple[object, tuple]]:
    grads = [torch.randn(5), torch.randn(3, 4).half(), torch.randn(7).bfloat16(), torch.empty(0)]
    inv_scale = torch.tensor([0.5])
    pairs = [  # (read-only op, in-place op)
        (backends.op(b, backends.GRAD_SUMSQ), backends.op(b, backends.UNSCALE_GRAD_SUMSQ))
        for b in BACKENDS_HERE
        if b != "reference"
    ]
    cases = []
    for read_only, in_place in pairs:
        cases.append((read_only.default, (grads, None)))
        cases.append((read_only.default, (grads, inv_scale)))
        cases.append((in_place.default, (grads, inv_scale)))
    return cases


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case: int) -> None:
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


@needs_compiled_cpu
def test_usable_under_torch_compile() -> None:
    grads = [torch.randn(100), torch.randn(10, 10).half()]
    grads[1][0, 0] = float("nan")

    def norm_and_unscale(grads: list[torch.Tensor], inv_scale: torch.Tensor):
        total_norm, nonfinite = grad_norm_and_nonfinite(grads)
        sumsq, found, _ = grad_sumsq_nonfinite(grads, inv_scale, in_place=True)
        return total_norm, nonfinite, sumsq, found

    eager_grads = [g.clone() for g in grads]
    expected = norm_and_unscale(eager_grads, torch.tensor(0.5))
    compiled = torch.compile(norm_and_unscale, backend="aot_eager", fullgraph=True)
    got = compiled(grads, torch.tensor(0.5))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    for g, e in zip(grads, eager_grads, strict=True):  # the in-place unscale happened
        torch.testing.assert_close(g, e, equal_nan=True)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_backends_match_reference(backend: str) -> None:
    reason = backends.unavailable_reason(backend, torch.device("cuda"), backends.GRAD_SUMSQ)
    if reason is not None:
        pytest.skip(reason)
    grads = [g.cuda() for g in random_grads(7, n=30, max_numel=300_000)]
    memory_order(grads[3])[-1] = float("nan")
    inv_scale = torch.tensor([2.0**-10], device="cuda")
    expected_grads = [g.clone() for g in grads]
    expected = grad_sumsq_nonfinite_reference(expected_grads, inv_scale, in_place=True)
    got = grad_sumsq_nonfinite(grads, inv_scale, in_place=True, backend=backend)
    torch.testing.assert_close(got[0], expected[0], rtol=2e-6, atol=0)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.equal(bits(g), bits(e))
    again = grad_sumsq_nonfinite(grads, backend=backend)[0]
    assert torch.equal(again, grad_sumsq_nonfinite(grads, backend=backend)[0])  # deterministic


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.cuda
@needs_two_gpus
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gradients_on_another_gpu_than_the_current_one(backend: str) -> None:
    grads = [torch.randn(70_000, device="cuda:1"), torch.randn(3, device="cuda:1").half()]
    with torch.cuda.device(0):
        sumsq, found, nonfinite = grad_sumsq_nonfinite(grads, backend=backend)
    assert sumsq.device == torch.device("cuda:1") and found.item() == 0.0
    assert not nonfinite.any()
    assert sumsq.item() == pytest.approx(float64_sumsq(grads), rel=2e-6)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync(backend: str) -> None:
    grads = [torch.randn(70_000, device="cuda"), torch.randn(5, device="cuda").bfloat16()]
    inv_scale = torch.full((1,), 0.5, device="cuda")
    grad_sumsq_nonfinite(grads, inv_scale, backend=backend)  # compiles outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad_sumsq_nonfinite(grads, inv_scale, in_place=True, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fused_backends_refuse_cuda_graph_capture(backend) -> None:
    grads = [torch.randn(100, device="cuda")]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            grad_sumsq_nonfinite(grads, backend=backend)
