"""Part of a batch: what the bisection of :func:`~stable_dfl.forensics.explain_step` replays."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


def _part(value: Any, positions: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.ndim and len(value) == batch:
            return value.index_select(0, positions.to(value.device))
        return value
    if isinstance(value, Mapping):
        return type(value)({key: _part(item, positions, batch) for key, item in value.items()})
    if isinstance(value, list | tuple):
        items = [_part(item, positions, batch) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _part(getattr(value, f.name), positions, batch)
            for f in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    return value


def select_batch(
    inputs: torch.Tensor, targets: Any, positions: list[int]
) -> tuple[torch.Tensor, Any]:
    """The images at ``positions`` and their targets: every tensor in ``targets`` (in
    tuples, lists, dicts, NamedTuples and dataclasses) whose first dimension is the batch
    size is indexed; anything else is kept whole.

    Targets of another layout (e.g. ultralytics' flat ``batch_idx`` rows) need their own
    ``select``."""
    index = torch.tensor(positions, dtype=torch.long)
    batch = len(inputs)
    return inputs.index_select(0, index.to(inputs.device)), _part(targets, index, batch)
