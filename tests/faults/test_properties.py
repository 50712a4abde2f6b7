"""Adversarial inputs, property-based: the DFL loss on every backend available here (the
gradient guard's are in tests/guard/). Fixed seeds and no example database, so CI runs the
same examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stable_dfl import stable_dfl_loss
from stable_dfl.ops import unavailable_reason
from stable_dfl.ops.reference import DEFAULT_EPS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Triton runs in its interpreter here (slow): fewer and smaller examples.
EXAMPLES = {"cpu": 60, "reference": 60, "triton": 8, "cuda": 60}
MAX_ROWS = {"cpu": 24, "reference": 24, "triton": 4, "cuda": 24}
LOSS_BOUND = -math.log(DEFAULT_EPS)


def _device(backend: str) -> str:
    return (
        "cuda"
        if backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
        else "cpu"
    )


def _backends() -> list:
    marks = {"triton": [pytest.mark.triton], "cuda": [pytest.mark.cuda]}
    return [
        pytest.param(
            name,
            marks=[
                *marks.get(name, []),
                pytest.mark.skipif(
                    unavailable_reason(name, torch.device(_device(name))) is not None,
                    reason=str(unavailable_reason(name, torch.device(_device(name)))),
                ),
            ],
        )
        for name in ("cpu", "reference", "triton", "cuda")
    ]


@st.composite
def dfl_inputs(draw, max_rows: int):
    """Finite logits of one magnitude per row (1e-3 up to the dtype's max), targets inside,
    on the edges of and outside the bin range, weights >= 0 (zero included)."""
    dtype = draw(st.sampled_from(DTYPES))
    n_bins = draw(st.sampled_from([2, 3, 16, 17]))
    rows = draw(st.integers(1, max_rows))
    largest = torch.finfo(dtype).max
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4, largest / 4, largest]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    unit = torch.rand(rows, n_bins, generator=generator, dtype=torch.float64) * 2 - 1
    pred = (unit * magnitude).clamp(-largest, largest).to(dtype)
    edges = [-1e9, -1.0, 0.0, 0.5, n_bins - 1.01, n_bins - 1.0, n_bins - 0.5, 1e9]
    target = torch.tensor(
        draw(
            st.lists(
                st.sampled_from(edges) | st.floats(-2.0, n_bins + 1.0, allow_nan=False),
                min_size=rows,
                max_size=rows,
            )
        ),
        dtype=torch.float32,
    )
    weight = torch.tensor(
        draw(
            st.lists(st.sampled_from([0.0, 1.0]) | st.floats(0, 1e3), min_size=rows, max_size=rows)
        ),
        dtype=torch.float32,
    )
    return pred, target, weight


def _loss_and_grad(pred, target, weight, backend):
    device = _device(backend)
    x = pred.to(device).requires_grad_()
    loss = stable_dfl_loss(
        x,
        target.to(device),
        weight.to(device),
        reduction="none",
        n_bins=pred.shape[-1],
        backend=backend,
    )
    loss.sum().backward()
    return loss.detach().cpu(), x.grad.cpu()


@pytest.mark.parametrize("backend", _backends())
def test_finite_input_gives_bounded_loss_zero_sum_gradients_and_matches_the_reference(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None, database=None, derandomize=True)
    @given(dfl_inputs(MAX_ROWS[backend]))
    def check(case):
        pred, target, weight = case
        loss, grad = _loss_and_grad(pred, target, weight, backend)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        slack = 1e-5 * (1 + weight)
        assert (loss >= -slack).all()
        assert (loss <= LOSS_BOUND * weight + slack * LOSS_BOUND).all()
        # Each of the two target-bin terms, -log p[k], has the gradient softmax - onehot(k),
        # which sums to 0 over the row; the floor only removes a term (its gradient is 0
        # where p[k] < eps). So every finite row sums to 0 times its weight, up to the
        # rounding of the gradient to the logits' dtype.
        resolution = torch.finfo(pred.dtype).eps
        row_sum = grad.double().sum(-1)
        assert (row_sum.abs() <= weight * (4 * resolution + pred.shape[-1] * 1e-6) + 1e-30).all()
        if backend != "reference":
            expected_loss, expected_grad = _loss_and_grad(pred, target, weight, "reference")
            torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-4)
            scale = 1 + weight.unsqueeze(-1)
            torch.testing.assert_close(
                grad.double() / scale, expected_grad.double() / scale, rtol=0, atol=2 * resolution
            )

    check()


@pytest.mark.parametrize("backend", _backends())
def test_non_finite_input_never_gives_a_finite_loss(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None, database=None, derandomize=True)
    @given(
        dfl_inputs(MAX_ROWS[backend]),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.booleans(),
        st.data(),
    )
    def check(case, bad_value, in_target, data):
        pred, target, weight = case
        row = data.draw(st.integers(0, pred.shape[0] - 1))
        if in_target:
            target[row] = bad_value
        else:
            pred[row, data.draw(st.integers(0, pred.shape[1] - 1))] = bad_value
        device = _device(backend)
        inputs = (pred.to(device), target.to(device), weight.to(device))
        per_row, total = (
            stable_dfl_loss(*inputs, reduction=reduction, n_bins=pred.shape[-1], backend=backend)
            for reduction in ("none", "sum")
        )
        assert math.isnan(per_row[row]) and math.isnan(total)

    check()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p, t: (p, t[:3]), ValueError, "does not fit target"),
        (lambda p, t: (p[:, :1], t), ValueError, "does not fit target"),
        (lambda p, t: (p.long(), t), TypeError, "must be float16, bfloat16, float32 or float64"),
        (lambda p, t: (p, t.to("meta")), ValueError, "is on .* but target is on meta"),
    ],
    ids=["target_shape", "one_bin", "integer_logits", "other_device"],
)
def test_wrong_shapes_dtypes_and_devices_raise_the_documented_error(backend, make, error, message):
    device = _device(backend)
    pred, target = make(torch.randn(4, 16, device=device), torch.rand(4, device=device) * 15)
    with pytest.raises(error, match=message):
        stable_dfl_loss(pred, target, reduction="none", backend=backend)
