"""Hooks that follow one replayed forward and backward pass and note the first NaN/Inf.

Forward hooks fire when a module returns, so a module's hook fires before its parent's:
the first module whose output is bad is the innermost one that made it. Gradient hooks
(on each module's outputs and on each parameter) fire in backward order; the first bad
gradient names the backward that produced it: a parameter's module, or the module (or
the loss) that consumed the activation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: How a message names the model itself (``named_modules`` calls it "").
ROOT_NAME = "(model)"
#: Who consumed an activation that no module took as input: the loss function.
LOSS_CONSUMER = "the loss"
#: Containers are searched for tensors this deep, no deeper.
_MAX_DEPTH = 6


def named_tensors(value: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` (tensors, sequences, mappings, dataclasses, NamedTuples)
    with its place in it: ``""`` for a tensor, else ``[0]``, ``.box_logits``, ``[key]``."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from named_tensors(item, f"{path}[{key}]", depth + 1)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        for key, item in zip(value._fields, value, strict=True):
            yield from named_tensors(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from named_tensors(item, f"{path}[{index}]", depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from named_tensors(getattr(value, item.name), f"{path}.{item.name}", depth + 1)


def float_tensors(value: Any) -> list[torch.Tensor]:
    return [t for _, t in named_tensors(value) if t.is_floating_point()]


@dataclass(frozen=True)
class Magnitude:
    """What a set of tensors holds: how many NaN/Inf, and the largest finite ``|x|``."""

    nonfinite: int
    nan: int
    max_abs: float
    """Over the finite values (0 when there are none)."""
    dtype: str
    """The dtype of the first tensor (of the first non-finite one, if any)."""

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> Magnitude:
        nonfinite = nan = 0
        max_abs = 0.0
        dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else "none"
        first_bad_dtype = None
        for tensor in tensors:
            if tensor.numel() == 0:
                continue
            values = tensor.detach()
            finite = torch.isfinite(values)
            bad = int(finite.numel() - finite.sum())
            if bad:
                nonfinite += bad
                nan += int(torch.isnan(values).sum())
                first_bad_dtype = first_bad_dtype or str(tensor.dtype).removeprefix("torch.")
            largest = values.float().abs().masked_fill(~finite, 0).max()
            max_abs = max(max_abs, float(largest))
        return cls(nonfinite, nan, max_abs, first_bad_dtype or dtype)

    def exceeds(self, limit: float) -> bool:
        """Holds a NaN/Inf, or a finite value beyond ``limit``."""
        return self.nonfinite > 0 or self.max_abs > limit

    def describe(self) -> str:
        if self.nonfinite:
            kinds = "NaN" if self.nonfinite == self.nan else "NaN/Inf" if self.nan else "Inf"
            return f"{self.nonfinite} {kinds} ({self.dtype}), max finite |x| {self.max_abs:.3g}"
        return f"max |x| {self.max_abs:.3g} ({self.dtype})"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ForwardFault:
    """The first module whose output was non-finite or beyond the autocast dtype's range."""

    module: str
    caller: str | None
    """When the module's inputs were already bad: the innermost running module whose own
    inputs were fine, whose code (outside its submodules) made them (None otherwise)."""
    inputs: Magnitude
    output: Magnitude
    inputs_are_model_inputs: bool
    weights_finite: bool
    call: tuple[nn.Module, tuple, dict]
    """The module and its arguments, to run it again in float32."""


@dataclass(frozen=True)
class GradientFault:
    """The first gradient to go non-finite in backward order."""

    kind: str
    """``parameter`` (a parameter's gradient) or ``activation`` (a module output's)."""
    name: str
    """The parameter, or the module output it is the gradient of (the module's name, then
    the output's place in what the module returns: ``head.box_logits``, ``fpn[0]``)."""
    produced_by: str
    """The backward that produced it: the parameter's module, or the activation's consumer."""
    gradient: Magnitude
    order: int
    """How many gradients came before it in backward order."""


def _module_of(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0] or ROOT_NAME


class PassTrace:
    """Hooks on every module (and parameter) of ``model`` while the ``with`` block runs.

    ``overflow_limit``: an output holding a finite ``|x|`` beyond it counts as bad (the
    autocast dtype's largest value; ``inf`` without autocast). With ``gradients=True``
    the backward of the traced forward is traced too. ``paused`` stops the tracing (to
    run a module again without noting it).
    """

    def __init__(self, model: nn.Module, overflow_limit: float, gradients: bool) -> None:
        self.model = model
        self.overflow_limit = overflow_limit
        self.gradients = gradients
        self.forward_fault: ForwardFault | None = None
        self.gradient_fault: GradientFault | None = None
        self.gradients_seen = 0
        self.paused = False
        self._handles: list[Any] = []
        self._stack: list[tuple[str, tuple, dict]] = []  # running modules and their arguments
        self._model_input_ids: set[int] = set()
        # id(tensor) -> innermost modules that took it as input; the tensors are kept alive
        # so that an id is never reused during the pass.
        self._consumers: dict[int, list[str]] = {}
        self._kept: list[torch.Tensor] = []

    def __enter__(self) -> PassTrace:
        for name, module in self.model.named_modules():
            name = name or ROOT_NAME
            self._handles.append(
                module.register_forward_pre_hook(self._before(name), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._after(name), with_kwargs=True))
        if self.gradients:
            for name, parameter in self.model.named_parameters():
                if parameter.requires_grad:
                    self._handles.append(
                        parameter.register_hook(self._on_gradient("parameter", name, []))
                    )
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._kept.clear()

    def reset_gradients(self) -> None:
        """Before another backward through the same graph."""
        self.gradient_fault = None
        self.gradients_seen = 0

    def _before(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.paused:
                return
            inputs = float_tensors((args, kwargs))
            if not self._stack:
                self._model_input_ids = {id(t) for t in inputs}
            for tensor in inputs:
                consumers = self._consumers.setdefault(id(tensor), [])
                if not consumers:
                    self._kept.append(tensor)
                # A child taking its parent's input is the one that computes on it.
                if consumers and (
                    consumers[-1] == ROOT_NAME or name.startswith(consumers[-1] + ".")
                ):
                    consumers[-1] = name
                elif name not in consumers:
                    consumers.append(name)
            self._stack.append((name, args, kwargs))

        return hook

    def _after(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.paused:
                return
            self._stack.pop()
            outputs = float_tensors(output)
            if self.forward_fault is None:
                magnitude = Magnitude.of(outputs)
                if magnitude.exceeds(self.overflow_limit):
                    inputs = float_tensors((args, kwargs))
                    input_magnitude = Magnitude.of(inputs)
                    self.forward_fault = ForwardFault(
                        module=name,
                        caller=self._caller()
                        if input_magnitude.exceeds(self.overflow_limit)
                        else None,
                        inputs=input_magnitude,
                        output=magnitude,
                        inputs_are_model_inputs=bool(inputs)
                        and all(id(t) in self._model_input_ids for t in inputs),
                        weights_finite=all(
                            bool(torch.isfinite(p).all()) for p in module.parameters(recurse=False)
                        ),
                        call=(module, args, kwargs),
                    )
            if self.gradients:
                for place, tensor in named_tensors(output):
                    if tensor.is_floating_point() and tensor.requires_grad:
                        self._kept.append(tensor)
                        consumers = self._consumers.setdefault(id(tensor), [])
                        # An in-place module returns its input: it did not consume it.
                        if name in consumers:
                            consumers.remove(name)
                        tensor.register_hook(
                            self._on_gradient("activation", name + place, consumers)
                        )

        return hook

    def _caller(self) -> str | None:
        for name, args, kwargs in reversed(self._stack):
            if not Magnitude.of(float_tensors((args, kwargs))).exceeds(self.overflow_limit):
                return name
        return None

    def _on_gradient(self, kind: str, name: str, consumers: list[str]):
        def hook(gradient: torch.Tensor) -> None:
            if self.paused:
                return
            self.gradients_seen += 1
            if self.gradient_fault is not None:
                return
            magnitude = Magnitude.of([gradient])
            if magnitude.nonfinite:
                produced_by = (
                    _module_of(name)
                    if kind == "parameter"
                    else ", ".join(consumers) or LOSS_CONSUMER
                )
                self.gradient_fault = GradientFault(
                    kind, name, produced_by, magnitude, self.gradients_seen - 1
                )

        return hook


def dtype_limit(dtype: torch.dtype | None) -> float:
    """The largest finite value of ``dtype`` (``inf`` for full precision)."""
    if dtype is None:
        return math.inf
    return float(torch.finfo(dtype).max)
