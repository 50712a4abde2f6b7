"""The trainer's switches that turn one stage-2 fix off (for the before/after experiment)."""

from __future__ import annotations

import math

import torch

from stable_dfl import GradGuard, stable_dfl_loss
from stable_dfl.models import DualHeadDetector
from stable_dfl.models.naive_dfl import naive_dfl_loss
from stable_dfl.train.config import parse_config
from stable_dfl.train.plain_step import PlainClipStep

N_BINS = 16


def plain_log_softmax_dfl(pred, target):
    """-(wl * log_softmax[tl] + wr * log_softmax[tr]), averaged over elements."""
    log_probs = torch.log_softmax(pred.double(), -1)
    left = target.floor().long()
    wl = left + 1 - target
    picked_left = log_probs.gather(-1, left[:, None]).squeeze(-1)
    picked_right = log_probs.gather(-1, (left + 1)[:, None]).squeeze(-1)
    return -(wl * picked_left + (1 - wl) * picked_right).mean()


def test_naive_dfl_equals_plain_log_softmax_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(256, N_BINS, generator=generator) * 3
    target = torch.rand(256, generator=generator) * (N_BINS - 1.01)
    naive = naive_dfl_loss(pred, target, n_bins=N_BINS)
    assert math.isclose(naive.item(), plain_log_softmax_dfl(pred, target).item(), rel_tol=1e-5)
    stable = stable_dfl_loss(pred, target, n_bins=N_BINS, eps=0.0, max_loss=None)
    assert math.isclose(naive.item(), stable.item(), rel_tol=1e-5)


def test_naive_dfl_is_unclamped_and_overflows_in_fp16():
    target = torch.full((8,), 3.5)
    pred = torch.full((8, N_BINS), 30.0)
    pred[:, 3:5] = -30.0  # all mass away from the target bins
    naive = naive_dfl_loss(pred, target, n_bins=N_BINS)
    assert naive.item() > 50  # no floor, no cap: grows with the logit gap
    assert stable_dfl_loss(pred, target, n_bins=N_BINS).item() <= 15.0
    # In fp16 the target bins' probabilities round to 0: Inf loss.
    assert math.isinf(naive_dfl_loss(pred, target, n_bins=N_BINS, dtype=torch.float16).item())


def test_naive_dfl_masks_before_the_log():
    """Masked-out rows whose log(0) is -inf must not put NaN into the gradient."""
    pred = torch.zeros(2, 4, N_BINS)
    pred[1, :, 3:5] = -1e4
    pred.requires_grad_()
    target = torch.full((2, 4), 3.5)
    mask = torch.tensor([[True], [False]])
    loss = naive_dfl_loss(pred, target, torch.ones(2, 1), mask=mask, n_bins=N_BINS)
    loss.backward()
    assert math.isclose(loss.item(), math.log(N_BINS), rel_tol=1e-5)
    assert torch.isfinite(pred.grad).all()


def test_default_head_init_differs_from_small_init():
    def build(head_init):
        torch.manual_seed(0)
        return DualHeadDetector(3, N_BINS, width=4, fpn_channels=16, head_init=head_init)

    small, default = build("small"), build("default")
    for name, parameter in small.named_parameters():
        other = dict(default.named_parameters())[name]
        if name.startswith(("backbone", "fpn")):
            assert torch.equal(parameter, other), name
    box_small = small.standard_head.box_branch[-1]
    box_default = default.standard_head.box_branch[-1]
    assert box_default.weight.std() > 3 * box_small.weight.std()
    assert box_small.bias.abs().max() == 0 and box_default.bias.abs().max() > 0


def test_switches_parse_and_default_to_the_fix():
    config = parse_config([])
    assert (config.dfl_impl, config.head_init, config.nan_guard) == ("stable", "small", "on")
    config = parse_config(["--dfl_impl", "naive", "--head_init", "default", "--nan_guard", "off"])
    assert (config.dfl_impl, config.head_init, config.nan_guard) == ("naive", "default", "off")


def _nan_gradient_model():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.tensor([[math.nan, 1.0]])).sum().backward()
    return model, optimizer


def test_without_the_guard_a_nan_step_reaches_the_weights():
    model, optimizer = _nan_gradient_model()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 / fp32: no loss scaling
    result = PlainClipStep(model, max_norm=0.5).step(optimizer, scaler)
    assert not result.finite and not result.skipped
    assert torch.isnan(model.weight).any()


def test_with_the_guard_the_same_step_is_skipped():
    model, optimizer = _nan_gradient_model()
    before = model.weight.detach().clone()
    result = GradGuard(model, max_norm=0.5).step(optimizer)
    assert result.skipped and result.offenders == ["weight"]
    assert torch.equal(model.weight, before)
