"""GradGuard against the standard recipe: clip_grad_norm_, GradScaler, skipped steps."""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
from torch import nn

from stable_dfl import GradGuard, GradGuardResult
from stable_dfl.ops.backends import GRAD_SUMSQ, unavailable_reason

from ..support.markers import needs_cuda

BACKENDS_HERE = [
    b
    for b in ("cpu", "triton", "reference")
    if unavailable_reason(b, torch.device("cpu"), GRAD_SUMSQ) is None
]


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    ).to(dtype)


def backward(model: nn.Module, seed: int, scaler: torch.amp.GradScaler | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=gen).to(next(model.parameters()).dtype)
    loss = model(x).float().square().mean()
    (loss if scaler is None else scaler.scale(loss)).backward()


def twin_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with copies of its gradients (deepcopy leaves them out)."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Two state dicts (model or optimizer) hold the same bits."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_bitwise_equal(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("max_norm", [0.05, 1e4])
def test_equals_clip_grad_norm_on_finite_gradients(backend: str, max_norm: float) -> None:
    model = make_model()
    backward(model, seed=0)
    reference = twin_of(model)
    expected_norm = nn.utils.clip_grad_norm_(reference.parameters(), max_norm, foreach=True)

    result = GradGuard(model, max_norm, backend=backend).check_and_clip()
    assert result.total_norm == pytest.approx(expected_norm.item(), rel=1e-6)
    assert result.finite and not result.skipped and result.offenders == []
    if max_norm > expected_norm:
        assert result.clip_coef == 1.0
    else:
        assert result.clip_coef == pytest.approx(max_norm / expected_norm.item(), rel=1e-6)
    for got, want in zip(grads_of(model), grads_of(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_float16_gradients_whose_torch_norm_overflows() -> None:
    model = make_model(torch.float16)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2000.0)  # total norm ~7.5e4, past float16's 65504
    reference = twin_of(model)
    torch_norm = nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert torch.isinf(torch_norm)  # float16 norm: the standard recipe would skip this step

    result = GradGuard(model, max_norm=1.0).check_and_clip()
    n_elements = sum(p.numel() for p in model.parameters())
    assert result.finite and result.total_norm == pytest.approx(2000.0 * math.sqrt(n_elements))
    for p in model.parameters():  # clipped to norm 1, not zeroed
        assert torch.all(p.grad > 0)


def adamw_after_steps(model: nn.Module, n_steps: int) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(n_steps):
        optimizer.zero_grad()
        backward(model, seed=100 + step)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("with_scaler", [False, True])
def test_nonfinite_step_is_skipped_and_state_is_untouched(with_scaler: bool) -> None:
    model = make_model()
    optimizer = adamw_after_steps(model, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if with_scaler else None
    guard = GradGuard(model, max_norm=1.0)
    optimizer.zero_grad()
    backward(model, seed=7, scaler=scaler)
    model[4].weight.grad[1, 5] = float("nan")
    model[0].bias.grad[0] = float("inf")
    params_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())

    result = guard.step(optimizer, scaler)

    assert not result.finite and result.skipped
    assert result.offenders == ["0.bias", "4.weight"]
    assert math.isfinite(result.total_norm)
    assert_bitwise_equal(model.state_dict(), params_before)
    assert_bitwise_equal(optimizer.state_dict(), optimizer_before)
    if with_scaler:
        assert scaler.get_scale() == 512.0  # backed off

    # The next, healthy step goes through.
    optimizer.zero_grad()
    backward(model, seed=8, scaler=scaler)
    result = guard.step(optimizer, scaler)
    assert result.finite and not result.skipped
    assert optimizer.state_dict()["state"][0]["step"].item() == 3


def standard_amp_step(model, optimizer, scaler, max_norm: float) -> torch.Tensor:
    scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    return norm


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_fused_unscale_step_matches_the_standard_recipe_bitwise(backend: str) -> None:
    # max_norm is never reached, so the clip multiplies by exactly 1 and every bit must match.
    model = make_model()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    guard = GradGuard(model, max_norm=1e6, backend=backend)
    for step in range(5):
        for m, opt, sc in ((model, optimizer, scaler), (twin, twin_optimizer, twin_scaler)):
            opt.zero_grad()
            backward(m, seed=step, scaler=sc)
            if step == 2:
                m[4].bias.grad[0] = float("inf")
        result = guard.step(optimizer, scaler)
        norm = standard_amp_step(twin, twin_optimizer, twin_scaler, max_norm=1e6)
        assert result.skipped == (step == 2) == (not torch.isfinite(norm))
        assert scaler.state_dict() == twin_scaler.state_dict()  # scale and growth tracker
        assert_bitwise_equal(model.state_dict(), twin.state_dict())
        assert_bitwise_equal(optimizer.state_dict(), twin_optimizer.state_dict())


def test_check_and_clip_leaves_the_scaler_ready_for_step_and_update() -> None:
    model = make_model()
    optimizer = adamw_after_steps(model, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = GradGuard(model, max_norm=1e6)
    optimizer.zero_grad()
    backward(model, seed=3, scaler=scaler)
    expected = [g / 256.0 for g in grads_of(model)]

    result = guard.check_and_clip(optimizer, scaler)
    scaler.step(optimizer)  # must not unscale a second time
    scaler.update()
    assert result.finite and scaler.get_scale() == 256.0
    for p, want in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, want)
    assert optimizer.state_dict()["state"][0]["step"].item() == 2

    optimizer.zero_grad()
    backward(model, seed=4, scaler=scaler)
    model[0].weight.grad.view(-1)[0] = float("nan")
    params_before = copy.deepcopy(model.state_dict())
    result = guard.check_and_clip(optimizer, scaler)
    scaler.step(optimizer)
    scaler.update()
    assert result.skipped and result.offenders == ["0.weight"]
    assert scaler.get_scale() == 128.0
    assert_bitwise_equal(model.state_dict(), params_before)


def test_after_an_explicit_unscale_the_guard_only_measures() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    backward(model, seed=5, scaler=scaler)
    scaler.unscale_(optimizer)
    unscaled = grads_of(model)
    result = GradGuard(model, max_norm=None).check_and_clip(optimizer, scaler)
    for p, want in zip(model.parameters(), unscaled, strict=True):
        assert torch.equal(p.grad, want)
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in unscaled]))
    assert result.total_norm == pytest.approx(expected.item(), rel=1e-6)
    assert result.clip_coef == 1.0


def test_disabled_scaler_acts_as_no_scaler() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    backward(model, seed=6)
    before = grads_of(model)
    result = GradGuard(model, max_norm=1e6).step(optimizer, scaler)
    assert result.finite
    for p, want in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, want)


def test_host_values_are_read_once_and_only_when_asked() -> None:
    model = make_model()
    backward(model, seed=9)
    reads = []
    tolist = torch.Tensor.tolist

    def counting_tolist(tensor: torch.Tensor) -> list:
        reads.append(tensor.numel())
        return tolist(tensor)

    with mock.patch.object(torch.Tensor, "tolist", counting_tolist):
        result = GradGuard(model, max_norm=0.1).check_and_clip()
        assert reads == []
        values = (result.total_norm, result.clip_coef, result.finite, result.offenders)
        _ = (result.skipped, result.total_norm, repr(result))
    assert len(reads) == 1
    assert values[2] is True and 0 < values[1] < 1


def test_offenders_are_named_by_module_path_and_capped() -> None:
    model = make_model()
    backward(model, seed=10)
    for p in model.parameters():
        p.grad.view(-1)[-1] = float("nan")
    result = GradGuard(model, max_norm=1.0, max_offenders=3).check_and_clip()
    assert result.offenders == ["0.weight", "0.bias", "1.weight"]
    assert result.nonfinite_tensor.all() and len(result.names) == 6


def test_parameters_without_gradients_are_skipped_and_no_gradient_is_fine() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    guard = GradGuard(model, max_norm=1.0)
    scaler.scale(torch.ones(()))
    result = guard.step(optimizer, scaler)  # no backward yet: no gradient at all
    assert result.finite and result.total_norm == 0.0 and result.names == []

    backward(model, seed=11)
    model[4].weight.grad = None
    result = guard.check_and_clip()
    assert "4.weight" not in result.names and len(result.names) == 5
    expected = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert result.total_norm == pytest.approx(expected.item(), rel=1e-6)


def test_bad_input_raises_clear_errors() -> None:
    model = make_model()
    backward(model, seed=12)
    model[4].bias.grad = model[4].bias.grad.to_sparse()
    with pytest.raises(TypeError, match=r"4\.bias .*sparse"):
        GradGuard(model, max_norm=1.0).check_and_clip()
    with pytest.raises(ValueError, match="max_norm"):
        GradGuard(model, max_norm=-1.0)
    with pytest.raises(TypeError, match="item 0"):
        GradGuard([3.0], max_norm=1.0)

    other = make_model()
    optimizer = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    model[4].bias.grad = None
    backward(other, seed=13)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="does not cover"):
        GradGuard(model, max_norm=1.0).check_and_clip(optimizer, scaler)
    with pytest.raises(ValueError, match="optimizer"):
        GradGuard(model, max_norm=1.0).check_and_clip(None, scaler)


def test_named_pairs_and_plain_tensors_are_accepted() -> None:
    weight = nn.Parameter(torch.randn(3))
    weight.grad = torch.tensor([3.0, 4.0, 0.0])
    result = GradGuard([("head.w", weight)], max_norm=None).check_and_clip()
    assert result.total_norm == pytest.approx(5.0) and result.names == ["head.w"]
    assert GradGuard([weight], max_norm=None).check_and_clip().names == ["param0"]


def test_reduce_across_ranks_sees_sum_of_squares_and_flag() -> None:
    model = make_model()
    backward(model, seed=14)
    local = GradGuard(model, max_norm=None).check_and_clip()
    seen = []

    def two_identical_shards(stats: torch.Tensor) -> None:
        seen.append(stats.clone())
        stats.mul_(2)

    guard = GradGuard(model, max_norm=None, reduce_across_ranks=two_identical_shards)
    result = guard.check_and_clip()
    assert seen[0][0].item() == pytest.approx(local.total_norm**2, rel=1e-6)
    assert result.total_norm == pytest.approx(math.sqrt(2) * local.total_norm, rel=1e-6)

    model[1].weight.grad[0] = float("nan")
    result = guard.check_and_clip()
    assert not result.finite and result.offenders == ["1.weight"]


def test_result_type() -> None:
    model = make_model()
    backward(model, seed=15)
    result = GradGuard(model, max_norm=1.0).step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(result, GradGuardResult)
    assert isinstance(result.total_norm, float) and isinstance(result.clip_coef, float)
    assert isinstance(result.finite, bool) and isinstance(result.skipped, bool)
    assert result.total_norm_tensor.dtype == torch.float32


@needs_cuda
@pytest.mark.cuda
def test_gradients_on_two_devices_are_measured_per_device() -> None:
    model = make_model()
    backward(model, seed=16)
    model[4].cuda()  # moves the gradients too
    model[4].bias.grad[1] = float("nan")
    result = GradGuard(model, max_norm=None).check_and_clip()
    assert result.offenders == ["4.bias"]
    finite_part = [p.grad.cpu() for n, p in model.named_parameters() if n != "4.bias"]
    assert result.total_norm == pytest.approx(nn.utils.get_total_norm(finite_part).item(), rel=1e-6)


def _model_with_grads(*grads: torch.Tensor) -> nn.Module:
    model = nn.ParameterList([nn.Parameter(torch.zeros_like(g)) for g in grads])
    for parameter, grad in zip(model, grads, strict=True):
        parameter.grad = grad.clone()
    return model


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_finite_gradients_get_a_finite_norm_however_large_or_small(backend: str) -> None:
    huge = _model_with_grads(torch.tensor([1e20, 0.0]), torch.zeros(3))
    result = GradGuard(huge.named_parameters(), max_norm=1.0, backend=backend).check_and_clip()
    assert result.finite and not result.skipped and result.offenders == []
    assert result.total_norm == pytest.approx(1e20, rel=1e-6)
    assert huge[0].grad[0].item() == pytest.approx(1.0, rel=1e-5)  # clipped, not zeroed
    tiny = _model_with_grads(torch.tensor([3.2e-39, 0.0]))
    result = GradGuard(tiny.named_parameters(), max_norm=1.0, backend=backend).check_and_clip()
    assert result.finite and result.total_norm == pytest.approx(3.2e-39, rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_a_norm_beyond_float32_is_reported_as_such(backend: str) -> None:
    model = _model_with_grads(torch.full((4,), 3e38))
    result = GradGuard(model.named_parameters(), max_norm=1.0, backend=backend).check_and_clip()
    assert not result.finite and result.skipped and math.isinf(result.total_norm)
    assert result.offenders == []  # no gradient holds a NaN/Inf: the norm itself overflowed


def test_bad_guard_arguments_are_named() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="max_norm must be a number or None, got str"):
        GradGuard(model.named_parameters(), max_norm="1")
    with pytest.raises(TypeError, match="max_offenders must be an int, got float"):
        GradGuard(model.named_parameters(), max_norm=1.0, max_offenders=2.5)
