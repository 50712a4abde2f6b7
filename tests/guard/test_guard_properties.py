"""The gradient guard's norm and NaN/Inf check, property-based, on every backend available
here. Fixed seeds and no example database, so CI runs the same examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stable_dfl import grad_norm_and_nonfinite
from stable_dfl.ops import unavailable_reason
from stable_dfl.ops.backends import GRAD_SUMSQ

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

GUARD_BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            unavailable_reason(name, torch.device("cpu"), GRAD_SUMSQ) is not None,
            reason=str(unavailable_reason(name, torch.device("cpu"), GRAD_SUMSQ)),
        ),
    )
    for name in ("cpu", "reference")
]


@st.composite
def gradient_sets(draw):
    """1-8 tensors of 1-300 elements (1-element ones included), fp32/fp16/bf16."""
    count = draw(st.integers(1, 8))
    tensors = []
    for _ in range(count):
        size = draw(st.sampled_from([1, 2, 7, 64, 300]))
        dtype = draw(st.sampled_from(DTYPES))
        scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        values = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * scale
        tensors.append(values.to(dtype))
    return tensors


@pytest.mark.parametrize("backend", GUARD_BACKENDS)
def test_guard_catches_and_names_every_planted_nan_or_inf(backend):
    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(gradient_sets(), st.data())
    def check(tensors, data):
        bad = data.draw(st.sets(st.integers(0, len(tensors) - 1), min_size=1))
        for index in bad:
            tensor = tensors[index]
            where = data.draw(st.sampled_from([0, tensor.numel() - 1, tensor.numel() // 2]))
            tensor[where] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        norm, nonfinite = grad_norm_and_nonfinite(tensors, backend=backend)
        assert nonfinite.tolist() == [i in bad for i in range(len(tensors))]
        finite = [t.double() for i, t in enumerate(tensors) if i not in bad]
        expected = torch.cat(finite).norm() if finite else torch.tensor(0.0)
        assert float(norm) == pytest.approx(float(expected), rel=1e-5, abs=1e-30)

    check()


@pytest.mark.parametrize("backend", GUARD_BACKENDS)
def test_guard_norm_of_finite_gradients_matches_torch(backend):
    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(gradient_sets())
    def check(tensors):
        norm, nonfinite = grad_norm_and_nonfinite(tensors, backend=backend)
        assert not nonfinite.any()
        expected = torch.nn.utils.get_total_norm([t.float() for t in tensors])
        torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)

    check()
