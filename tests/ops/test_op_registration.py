"""The backend table and the ops it hands out: one registration per op, and fakes that check
their arguments as the kernels do."""

from __future__ import annotations

import typing

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stable_dfl.loss import BACKEND_CHOICES as LOSS_BACKEND_CHOICES
from stable_dfl.ops import backends

OP_BACKENDS = [name for name, backend in backends.BACKEND_TABLE.items() if backend.op_names]


def test_every_op_backend_runs_every_op_family_and_the_names_agree():
    assert backends.BACKENDS == ("cpu", "cuda", "triton", "reference")
    assert typing.get_args(backends.BackendName) == backends.BACKEND_CHOICES
    assert LOSS_BACKEND_CHOICES is backends.BACKEND_CHOICES
    assert OP_BACKENDS == ["cpu", "cuda", "triton"]
    for name in OP_BACKENDS:
        assert set(backends.BACKEND_TABLE[name].op_names) == set(backends.OP_FAMILIES)


def test_the_reference_runs_eager_code_not_an_op():
    with pytest.raises(ValueError, match="eager code"):
        backends.op("reference")


@pytest.mark.parametrize("family", backends.OP_FAMILIES)
def test_each_available_backend_hands_out_a_registered_op(family):
    for name in OP_BACKENDS:
        device = torch.device("cuda" if name == "cuda" else "cpu")
        if backends.unavailable_reason(name, device, family) is not None:
            continue
        op = backends.op(name, family)
        assert isinstance(op, torch._ops.OpOverloadPacket)
        qualified = f"stable_dfl::{backends.BACKEND_TABLE[name].op_names[family]}"
        assert op.default.name() == qualified


def test_unknown_backend_and_op_family_are_named():
    with pytest.raises(ValueError, match="'gpu'"):
        backends.unavailable_reason("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="'dfl_backward'"):
        backends.unavailable_reason("cpu", torch.device("cpu"), "dfl_backward")


def _dfl_ops() -> list[str]:
    names = ["dfl_forward_triton"]
    if backends.compiled_available("cpu"):
        names.append("dfl_forward")
    return names


@pytest.mark.parametrize("op_name", _dfl_ops())
@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: (torch.randn(4, 16), torch.rand(3), None, 1e-6), ValueError, "target must be"),
        (
            lambda: (torch.randn(4, 16), torch.rand(4), torch.rand(5), 1e-6),
            ValueError,
            "weight must be",
        ),
        (
            lambda: (torch.randn(6, 16), torch.rand(6), torch.rand(4), 1e-6),
            ValueError,
            r"weight must be \[G\] with G dividing N = 6",
        ),
        (
            lambda: (torch.randn(4, 16), torch.rand(4), torch.rand(0), 1e-6),
            ValueError,
            "weight must be",
        ),
        (
            lambda: (torch.randn(4, 16), torch.rand(4), torch.rand(2, 2), 1e-6),
            ValueError,
            "weight must be",
        ),
        (lambda: (torch.randn(4, 1), torch.rand(4), None, 1e-6), ValueError, "n_bins must be"),
        (lambda: (torch.randn(4, 16, 1), torch.rand(4), None, 1e-6), ValueError, "pred must be"),
        (
            lambda: (torch.randn(4, 16).int(), torch.rand(4), None, 1e-6),
            TypeError,
            "pred must be float16",
        ),
        (
            lambda: (torch.randn(4, 16), torch.arange(4), None, 1e-6),
            TypeError,
            "target must be floating",
        ),
        (lambda: (torch.randn(4, 16), torch.rand(4), None, 1.0), ValueError, "eps must be"),
    ],
)
def test_fake_kernels_check_arguments_as_the_kernels_do(op_name, make_args, error, message):
    op = getattr(torch.ops.stable_dfl, op_name)
    with FakeTensorMode() as mode:
        pred, target, weight, eps = (
            mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in make_args()
        )
        with pytest.raises(error, match=f"stable_dfl::{op_name}: {message}"):
            op(pred, target, weight, eps, True, True)
    # The eager call says the same.
    with pytest.raises(error, match=f"stable_dfl::{op_name}: {message}"):
        op(*make_args(), True, True)


@pytest.mark.parametrize("op_name", _dfl_ops())
def test_a_weight_per_group_of_rows_weighs_each_row_of_its_group(op_name):
    op = getattr(torch.ops.stable_dfl, op_name)
    pred, target, weight = torch.randn(6, 16), torch.rand(6) * 15, torch.rand(2)
    with FakeTensorMode() as mode:
        loss, grad = op(*(mode.from_tensor(t) for t in (pred, target, weight)), 1e-6, False, True)
        assert (loss.shape, grad.shape) == ((6,), (6, 16))
    backend = "triton" if op_name == "dfl_forward_triton" else "cpu"
    if reason := backends.unavailable_reason(backend, torch.device("cpu"), backends.DFL_FORWARD):
        pytest.skip(reason)
    loss, grad = op(pred, target, weight, 1e-6, False, True)
    per_row = op(pred, target, weight.repeat_interleave(3), 1e-6, False, True)
    assert torch.equal(loss, per_row[0]) and torch.equal(grad, per_row[1])


@pytest.mark.parametrize("backend", [b for b in OP_BACKENDS if b != "cuda"])
def test_fake_gradient_ops_check_dtypes_and_inv_scale(backend):
    if backends.unavailable_reason(backend, torch.device("cpu"), backends.GRAD_SUMSQ):
        pytest.skip(backends.unavailable_reason(backend, torch.device("cpu"), backends.GRAD_SUMSQ))
    op = backends.op(backend, backends.GRAD_SUMSQ)
    with FakeTensorMode() as mode:
        good = mode.from_tensor(torch.randn(3))
        with pytest.raises(TypeError, match=r"tensor 1 is torch\.int32"):
            op([good, mode.from_tensor(torch.ones(2, dtype=torch.int32))], None)
        with pytest.raises(ValueError, match="inv_scale must be one float32 element, got"):
            op([good], mode.from_tensor(torch.ones(2)))
        with pytest.raises(ValueError, match="at least one tensor"):
            op([], None)
        sumsq, found, nonfinite = op([good, good], None)
        assert (sumsq.shape, found.shape, nonfinite.shape) == ((), (), (2,))
