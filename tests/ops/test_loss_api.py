"""StableDFLLoss / stable_dfl_loss: shapes, reductions, clamps, errors, backends, torch.compile."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from stable_dfl import BackendUnavailableError, StableDFLLoss, dfl_reference, stable_dfl_loss
from stable_dfl.ops import backends, resolve_backend

loss_module = importlib.import_module("stable_dfl.loss")

CPU_BACKENDS = ["reference"] + (["cpu"] if backends.compiled_available("cpu") else [])


def box_case(n_anchors=50, n_bins=16):
    pred = torch.randn(n_anchors, 4 * n_bins, requires_grad=True)
    target = torch.rand(n_anchors, 4) * (n_bins - 1)
    return pred, target


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_box_layouts_agree(backend):
    pred, target = box_case()
    flat = stable_dfl_loss(pred, target, backend=backend)
    sides = stable_dfl_loss(pred.view(50, 4, 16), target, backend=backend)
    rows = stable_dfl_loss(pred.reshape(200, 16), target.reshape(200), backend=backend)
    by_hand = dfl_reference(pred.reshape(200, 16), target.reshape(200)).mean()
    torch.testing.assert_close(flat, by_hand)
    torch.testing.assert_close(sides, by_hand)
    torch.testing.assert_close(rows, by_hand)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions_weights_avg_factor_and_loss_weight(backend):
    pred, target = box_case()
    weight = torch.rand(50, 1)  # per anchor, broadcast over the 4 sides
    per_element = dfl_reference(pred.reshape(200, 16), target.reshape(200)).reshape(50, 4) * weight
    none = stable_dfl_loss(pred, target, weight, reduction="none", backend=backend, loss_weight=2.0)
    torch.testing.assert_close(none, 2.0 * per_element)
    total = stable_dfl_loss(pred, target, weight, reduction="sum", backend=backend, max_loss=None)
    torch.testing.assert_close(total, per_element.sum())
    mean = stable_dfl_loss(pred, target, weight, avg_factor=7.0, backend=backend, max_loss=None)
    torch.testing.assert_close(mean, per_element.sum() / 7.0)
    mean_t = stable_dfl_loss(
        pred, target, weight, avg_factor=torch.tensor(7.0), backend=backend, max_loss=None
    )
    torch.testing.assert_close(mean_t, mean)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mask_equals_boolean_indexing(backend):
    pred, target = box_case()
    fg = torch.rand(50) > 0.6
    indexed = stable_dfl_loss(pred[fg], target[fg], backend=backend)
    masked = stable_dfl_loss(pred, target, mask=fg[:, None], backend=backend)
    torch.testing.assert_close(masked, indexed)
    (g_indexed,) = torch.autograd.grad(indexed, pred)
    (g_masked,) = torch.autograd.grad(masked, pred)
    torch.testing.assert_close(g_masked, g_indexed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "weight_shape, mask_shape",
    [((50, 1), (50, 4)), ((50, 4), (50, 1)), ((), (50, 1)), ((4,), (50, 1)), ((1, 1), (1, 4))],
    ids=["anchor-weight,side-mask", "side-weight,anchor-mask", "scalar", "per-side", "broadcast"],
)
def test_weight_and_mask_of_any_broadcast_shapes_weigh_each_row_as_expanded(
    backend, weight_shape, mask_shape
):
    pred, target = box_case()
    weight = torch.rand(weight_shape) + 0.5
    mask = torch.rand(mask_shape) > 0.4
    row_weight = (weight * mask).expand(50, 4).contiguous()
    expected = stable_dfl_loss(pred, target, row_weight, reduction="sum", backend=backend)
    loss = stable_dfl_loss(pred, target, weight, mask=mask, reduction="sum", backend=backend)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(loss, pred)
    (expected_grad,) = torch.autograd.grad(expected, pred)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "weight_shape, rows_per_weight",
    [((50, 1), 4), ((), 200), ((1, 1), 200), ((50, 4), 1), ((1, 4), 1), ((4,), 1)],
    ids=["anchor", "scalar", "broadcast", "row", "side-broadcast", "per-side"],
)
def test_a_weight_per_anchor_reaches_the_kernel_as_it_is(
    monkeypatch, weight_shape, rows_per_weight
):
    # Weights varying along the leading dims only go to the kernel one per group of rows,
    # not copied out to one per row (at detector sizes, a copy of megabytes per call).
    passed = []
    run = loss_module.dfl_rows

    def spy(rows, target, weight, *args):
        passed.append(weight)
        return run(rows, target, weight, *args)

    monkeypatch.setattr(loss_module, "dfl_rows", spy)
    pred, target = box_case()
    weight = torch.rand(weight_shape)
    stable_dfl_loss(pred, target, weight, backend="reference")
    (row_weights,) = passed
    assert row_weights.shape == (200 // rows_per_weight,)
    if rows_per_weight > 1:
        assert row_weights.data_ptr() == weight.data_ptr()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mask_with_a_weight_per_anchor_equals_indexing_and_reports_bad_masked_out_weights(backend):
    pred, target = box_case()
    weight = torch.rand(50, 1) + 0.5
    fg = torch.rand(50) > 0.6
    indexed = stable_dfl_loss(pred[fg], target[fg], weight[fg], backend=backend)
    masked = stable_dfl_loss(pred, target, weight, mask=fg[:, None], backend=backend)
    torch.testing.assert_close(masked, indexed)
    # A NaN or infinite weight is reported (NaN loss) even where its anchor is masked out.
    first_background = int((~fg).nonzero()[0])
    for bad in (float("nan"), float("inf")):
        broken = weight.clone()
        broken[first_background] = bad
        loss = stable_dfl_loss(pred, target, broken, mask=fg[:, None], backend=backend)
        assert loss.isnan(), f"weight {bad} of a masked-out anchor gave {loss.item()}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_loss_caps_a_hopeless_prediction_and_stops_its_gradient(backend):
    n_bins = 16
    pred = torch.full((8, n_bins), -30.0)
    pred[:, 0] = 30.0  # all mass on bin 0
    pred.requires_grad_()
    target = torch.full((8,), 14.5)  # far away
    raw = stable_dfl_loss(
        pred, target, weight=torch.full((8,), 5.0), max_loss=None, backend=backend
    )
    assert raw.item() == pytest.approx(-5.0 * math.log(1e-6), rel=1e-5), "probability floor"
    capped = stable_dfl_loss(pred, target, weight=torch.full((8,), 5.0), backend=backend)
    assert capped.item() == 15.0
    (grad,) = torch.autograd.grad(capped, pred)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction, expected", [("mean", 0.0), ("sum", 0.0)])
def test_empty_input(backend, reduction, expected):
    pred = torch.randn(0, 64, requires_grad=True)
    loss = stable_dfl_loss(pred, torch.zeros(0, 4), reduction=reduction, backend=backend)
    assert loss.item() == expected
    loss.backward()
    assert pred.grad.shape == (0, 64)
    none = stable_dfl_loss(pred, torch.zeros(0, 4), reduction="none", backend=backend)
    assert none.shape == (0, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_result_dtype_is_fp32_for_low_precision_logits(backend):
    pred, target = box_case()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert (
            stable_dfl_loss(pred.detach().to(dtype), target, backend=backend).dtype == torch.float32
        )
    assert stable_dfl_loss(pred.detach().double(), target, backend=backend).dtype == torch.float64


def test_eps_zero_is_the_plain_log_softmax_form():
    pred, target = box_case()
    plain = -(
        torch.log_softmax(pred.reshape(200, 16), -1).gather(
            -1, target.reshape(200, 1).floor().long()
        )[:, 0]
        * (target.reshape(200).floor() + 1 - target.reshape(200))
        + torch.log_softmax(pred.reshape(200, 16), -1).gather(
            -1, target.reshape(200, 1).floor().long() + 1
        )[:, 0]
        * (target.reshape(200) - target.reshape(200).floor())
    ).mean()
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(stable_dfl_loss(pred, target, eps=0.0, backend=backend), plain)


def test_module_reports_the_backend_that_ran():
    pred, target = box_case()
    loss = StableDFLLoss(n_bins=16)
    loss(pred, target)
    assert loss.last_backend == ("cpu" if backends.compiled_available("cpu") else "reference")
    assert resolve_backend("auto", torch.device("cpu")) == loss.last_backend
    assert "n_bins=16" in repr(loss)


def test_unavailable_backend_says_why():
    pred, target = box_case()
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        stable_dfl_loss(pred, target, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        stable_dfl_loss(pred, target, backend="fast")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: stable_dfl_loss(torch.randn(10, 17), torch.rand(10)),
            ValueError,
            r"\(10, 17\).*\(10,\).*n_bins=16",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 64), torch.rand(10, 3)),
            ValueError,
            "does not fit target",
        ),
        (
            lambda: stable_dfl_loss(torch.randint(0, 5, (10, 16)), torch.rand(10)),
            TypeError,
            "pred must be float",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 16), torch.rand(10) > 0.5),
            TypeError,
            "target must hold real",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 16), [1.0] * 10),
            TypeError,
            "target must be a torch.Tensor",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 16), torch.rand(10), torch.rand(3)),
            ValueError,
            "weight of shape",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 16), torch.rand(10), mask=torch.ones(10)),
            TypeError,
            "mask must be a bool",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 16), torch.rand(10), reduction="avg"),
            ValueError,
            "reduction",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 16), torch.rand(10), avg_factor=0),
            ValueError,
            "avg_factor",
        ),
        (
            lambda: stable_dfl_loss(torch.randn(10, 1), torch.rand(10), n_bins=1),
            ValueError,
            "n_bins",
        ),
        (lambda: stable_dfl_loss(torch.randn(10, 16), torch.rand(10), eps=1.5), ValueError, "eps"),
        (
            lambda: stable_dfl_loss(torch.randn(10, 16), torch.rand(10), max_loss=0),
            ValueError,
            "max_loss",
        ),
        (lambda: StableDFLLoss(n_bins=16.0), TypeError, "n_bins must be an int"),
    ],
)
def test_bad_input_names_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    pred, target = box_case()
    fg = torch.rand(50) > 0.5
    module = StableDFLLoss(n_bins=16, backend=backend)

    def step(p, t, m):
        return module(p, t, weight=torch.ones_like(t), mask=m[:, None])

    compiled = torch.compile(step, fullgraph=True)
    eager_loss = step(pred, target, fg)
    compiled_loss = compiled(pred, target, fg)
    torch.testing.assert_close(compiled_loss, eager_loss)
    (g_eager,) = torch.autograd.grad(eager_loss, pred)
    (g_compiled,) = torch.autograd.grad(compiled_loss, pred)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_avg_factor_is_validated_whatever_its_type(backend: str):
    pred, target = torch.randn(6, 16), torch.rand(6) * 14
    for bad in (0.0, -1.0, math.inf, torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(math.inf)):
        with pytest.raises(ValueError, match="avg_factor must be positive and finite"):
            stable_dfl_loss(pred, target, avg_factor=bad, backend=backend)
    with pytest.raises(TypeError, match="avg_factor must hold a real number"):
        stable_dfl_loss(pred, target, avg_factor=torch.tensor(2 + 1j), backend=backend)
    with pytest.raises(ValueError, match="avg_factor is on meta"):
        stable_dfl_loss(pred, target, avg_factor=torch.tensor(2.0, device="meta"), backend=backend)
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match=f"cannot be used with reduction='{reduction}'"):
            stable_dfl_loss(pred, target, avg_factor=2.0, reduction=reduction, backend=backend)
    # A NaN count (computed from NaN outputs) is data, not a bad argument: reported as NaN.
    assert torch.isnan(stable_dfl_loss(pred, target, avg_factor=torch.tensor(math.nan)))
    halved = stable_dfl_loss(pred, target, avg_factor=torch.tensor(12.0), backend=backend)
    torch.testing.assert_close(halved, stable_dfl_loss(pred, target, backend=backend) / 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_wide_targets_are_clamped_before_the_cast_and_wide_weights_are_checked(backend: str):
    pred = torch.randn(3, 16)
    target = torch.tensor([1e39, -1e39, 7.5], dtype=torch.float64)
    loss = stable_dfl_loss(pred, target, reduction="none", backend=backend)
    edges = torch.tensor([16 - 1 - 0.01, 0.0, 7.5], dtype=torch.float64)
    torch.testing.assert_close(
        loss, stable_dfl_loss(pred, edges, reduction="none", backend=backend)
    )
    with pytest.raises(
        ValueError, match=r"weight holds finite values beyond the range of torch\.float32"
    ):
        stable_dfl_loss(pred, target, torch.tensor([1e39, 1.0, 1.0], dtype=torch.float64))
    # Non-finite targets stay non-finite, to be reported.
    target[2] = math.inf
    assert torch.isnan(stable_dfl_loss(pred, target, reduction="none", backend=backend)[2])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"weight": torch.ones(6, dtype=torch.complex64)},
            TypeError,
            "weight must hold real numbers",
        ),
        ({"weight": torch.ones(6, dtype=torch.bool)}, TypeError, "weight must hold real numbers"),
        ({"loss_weight": "2"}, TypeError, "loss_weight must be a number, got str"),
        ({"max_loss": "15"}, TypeError, "max_loss must be a number or None, got str"),
        ({"eps": "1e-6"}, TypeError, "eps must be a number, got str"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        stable_dfl_loss(torch.randn(6, 16), torch.rand(6) * 14, **kwargs)
    if "weight" not in kwargs:
        with pytest.raises(error, match=message):
            StableDFLLoss(**kwargs)
