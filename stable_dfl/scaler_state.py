"""What GradGuard reads from and tells a ``torch.amp.GradScaler``, in one place.

The guard unscales the gradients and takes (or skips) the optimizer step itself, so it must
leave the scaler as ``scaler.unscale_`` and ``scaler.step`` would have: the optimizer's
stage, and the ``found_inf`` tensors that ``scaler.update()`` sums to back off. GradScaler
has no public API for these, nor for its scale as a tensor (``get_scale()`` returns a float,
at the cost of a host sync). Every use of its private state in stable_dfl is here, so that
a torch that changes it fails in this module with a clear error rather than training wrong.

Written against ``torch/amp/grad_scaler.py`` of torch 2.13 and 2.14 (the same file in both;
tested on 2.13.0 and 2.14.1):

* ``_scale``: the scale, a 0-dim float32 tensor; None until the first ``scaler.scale()``;
* ``_per_optimizer_states[id(optimizer)]``: a defaultdict entry ``{"stage": OptState,
  "found_inf_per_device": {device: 0-dim float32 tensor}}``, reset by ``update()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState


def _unknown_layout() -> RuntimeError:
    return RuntimeError(
        f"torch {torch.__version__}'s GradScaler keeps its state in a form that stable_dfl does "
        "not know (it knows torch 2.13 and 2.14): GradGuard cannot unscale or step for it"
    )


def _optimizer_state(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict:
    try:
        state: Any = scaler._per_optimizer_states[id(optimizer)]
    except (AttributeError, KeyError, TypeError):
        raise _unknown_layout() from None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("stage"), OptState)
        and isinstance(state.get("found_inf_per_device"), dict)
    ):
        raise _unknown_layout()
    return state


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current scale, a 0-dim float32 tensor on its device (no host sync)."""
    try:
        scale = scaler._scale
    except AttributeError:
        raise _unknown_layout() from None
    if scale is None:
        raise RuntimeError(
            "the GradScaler has no scale yet: call scaler.scale(loss).backward() before the guard"
        )
    return scale


def inv_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """``1 / scale`` as ``GradScaler.unscale_`` computes it, so the unscaled bits match."""
    scale = scale_tensor(scaler)
    if scale.device.type == "mps":  # no float64 on MPS: GradScaler divides in float32 there
        return scale.reciprocal()
    return scale.double().reciprocal().float()


def is_unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer's gradients were unscaled since the last ``scaler.update()``."""
    return _optimizer_state(scaler, optimizer)["stage"] is OptState.UNSCALED


def is_stepped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)`` (or the guard's step) ran since the last ``scaler.update()``."""
    return _optimizer_state(scaler, optimizer)["stage"] is OptState.STEPPED


def record_unscaled(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    found_inf_per_device: dict[torch.device, torch.Tensor],
) -> None:
    """Records what ``scaler.unscale_(optimizer)`` would have: the gradients are unscaled, and
    ``found_inf_per_device`` (nonzero: a NaN/Inf) makes ``scaler.step`` skip and
    ``scaler.update`` back off."""
    state = _optimizer_state(scaler, optimizer)
    state["found_inf_per_device"] = found_inf_per_device
    state["stage"] = OptState.UNSCALED


def record_stepped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Records that the step ``scaler.step(optimizer)`` would take was taken (or skipped)."""
    _optimizer_state(scaler, optimizer)["stage"] = OptState.STEPPED
