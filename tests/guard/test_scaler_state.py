"""stable_dfl.scaler_state against the installed torch's GradScaler: it reads what
``unscale_``/``step``/``update`` record, and what it records is what they act on."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from stable_dfl import scaler_state


def scaled_backward(
    init_scale: float = 256.0,
) -> tuple[nn.Linear, torch.optim.Optimizer, torch.amp.GradScaler]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    scaler.scale(model(torch.ones(4, 3)).square().sum()).backward()
    return model, optimizer, scaler


def test_reads_the_stages_that_unscale_step_and_update_record() -> None:
    _, optimizer, scaler = scaled_backward()
    assert not scaler_state.is_unscaled(scaler, optimizer)
    assert not scaler_state.is_stepped(scaler, optimizer)
    scaler.unscale_(optimizer)
    assert scaler_state.is_unscaled(scaler, optimizer)
    scaler.step(optimizer)
    assert scaler_state.is_stepped(scaler, optimizer)
    scaler.update()
    assert not scaler_state.is_unscaled(scaler, optimizer)
    assert not scaler_state.is_stepped(scaler, optimizer)


def test_scale_tensor_and_inv_scale() -> None:
    _, _, scaler = scaled_backward(init_scale=3.0)
    scale = scaler_state.scale_tensor(scaler)
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert scale.item() == scaler.get_scale() == 3.0
    assert torch.equal(scaler_state.inv_scale(scaler), torch.tensor(1 / 3.0, dtype=torch.float32))

    with pytest.raises(RuntimeError, match=r"scaler\.scale\(loss\)"):
        scaler_state.scale_tensor(torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_recorded_unscale_decides_step_and_update(found_inf: float) -> None:
    model, optimizer, scaler = scaled_backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    scaler_state.record_unscaled(scaler, optimizer, {torch.device("cpu"): torch.tensor(found_inf)})
    assert scaler_state.is_unscaled(scaler, optimizer)

    scaler.step(optimizer)
    scaler.update()
    for p, grad, weight in zip(model.parameters(), grads, weights, strict=True):
        assert torch.equal(p.grad, grad)  # step did not unscale a second time
        assert torch.equal(p.detach(), weight) == bool(found_inf)  # skipped on a NaN/Inf
    assert scaler.get_scale() == (128.0 if found_inf else 256.0)


def test_recorded_step_blocks_a_second_step_and_lets_update_run() -> None:
    _, optimizer, scaler = scaled_backward()
    scaler_state.record_unscaled(scaler, optimizer, {torch.device("cpu"): torch.tensor(1.0)})
    scaler_state.record_stepped(scaler, optimizer)
    assert scaler_state.is_stepped(scaler, optimizer)
    with pytest.raises(RuntimeError, match="step"):
        scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 128.0


def test_an_unknown_private_layout_fails_clearly() -> None:
    _, optimizer, scaler = scaled_backward()
    scaler._per_optimizer_states = defaultdict(lambda: {"phase": 0})
    with pytest.raises(RuntimeError, match="does not know"):
        scaler_state.is_unscaled(scaler, optimizer)
    del scaler._per_optimizer_states
    with pytest.raises(RuntimeError, match="does not know"):
        scaler_state.record_stepped(scaler, optimizer)
    del scaler._scale
    with pytest.raises(RuntimeError, match="does not know"):
        scaler_state.scale_tensor(scaler)
