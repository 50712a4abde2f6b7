"""The Triton backend: the shared fused-backend tests, plus the op's own contracts.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), where every program costs milliseconds: the cases stay small.
"""

from __future__ import annotations

import pytest
import torch

from stable_dfl import BackendUnavailableError, resolve_backend, stable_dfl_loss
from stable_dfl.ops import backends

from ..support.autograd_contract_suite import *  # noqa: F403  (the shared tests, run here with the fixtures below)
from ..support.dfl_cases import random_case
from ..support.fused_backend_suite import *  # noqa: F403  (the shared tests, run here with the fixtures below)

pytestmark = [
    pytest.mark.triton,
    # Interpreted kernels do their intended overflow (x - max -> -inf) and poison (inf - inf ->
    # NaN) arithmetic in numpy, which warns about it.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.skipif(
        backends.triton_import_error() is not None, reason=str(backends.triton_import_error())
    ),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def backend() -> str:
    return "triton"


@pytest.fixture
def device() -> str:
    return DEVICE


def _triton_op():
    return backends.op("triton", backends.DFL_FORWARD)


@pytest.mark.parametrize("rows_per_weight", [1, 3])
@pytest.mark.parametrize("reduce_sum", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(reduce_sum, dtype, rows_per_weight):
    pred, target, weight = random_case(9, 16, dtype, weighted=True, device=DEVICE)
    weight = weight[::rows_per_weight]
    # need_grad=False is what dfl_rows passes when pred needs no gradient.
    for args in (
        (pred.requires_grad_(), target.float(), weight, 1e-6, reduce_sum, True),
        (pred.detach(), target.float(), None, 0.0, reduce_sum, False),
    ):
        torch.library.opcheck(_triton_op(), args)


def test_no_gradient_buffer_without_grad():
    pred, target, _ = random_case(10, 16, torch.float32, device=DEVICE)
    loss, grad = _triton_op()(pred, target, None, 1e-6, True, False)
    assert grad.numel() == 0 and loss.shape == ()


def test_empty_input_launches_nothing_and_sums_to_zero():
    pred = torch.empty(0, 16, device=DEVICE)
    loss, grad = _triton_op()(pred, torch.empty(0, device=DEVICE), None, 1e-6, True, True)
    assert loss.item() == 0.0 and grad.shape == (0, 16)


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda p, t: (torch.zeros(4, 129, device=p.device), t), ValueError, "n_bins must be in"),
        (lambda p, t: (torch.zeros(4, 1, device=p.device), t), ValueError, "n_bins must be in"),
        (lambda p, t: (p, t[:3]), ValueError, "target must be"),
        (lambda p, t: (p.reshape(-1), t), ValueError, "pred must be"),
        (lambda p, t: (p.to(torch.int32), t), TypeError, "pred must be"),
        (lambda p, t: (p, t.long()), TypeError, "target must be floating point"),
    ],
)
def test_op_rejects_bad_arguments(make_args, error, message):
    pred, target, _ = random_case(4, 8, torch.float32, device=DEVICE)
    with pytest.raises(error, match=message):
        _triton_op()(*make_args(pred, target), None, 1e-6, True, False)


def test_op_rejects_bad_weight_and_eps():
    pred, target, _ = random_case(4, 8, torch.float32, device=DEVICE)
    with pytest.raises(TypeError, match="weight must be floating point"):
        _triton_op()(
            pred, target, torch.ones(4, dtype=torch.int64, device=DEVICE), 1e-6, True, False
        )
    with pytest.raises(ValueError, match="eps must be"):
        _triton_op()(pred, target, None, 1.0, True, False)


def test_unavailable_backends_say_why(monkeypatch):
    pred, target, _ = random_case(4, 16, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        stable_dfl_loss(pred, target, backend="tpu")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        stable_dfl_loss(pred, target, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="Triton kernels need CUDA tensors"):
        stable_dfl_loss(pred, target, backend="triton")
    assert resolve_backend("auto", torch.device("cpu")) != "triton"
