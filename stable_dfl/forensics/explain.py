"""``explain_step``: replay one batch with hooks and say where its first NaN/Inf came from.

The replay runs from the model's state as it is when called (the state before the bad
step, when the step was skipped) and leaves it so: parameters and their ``.grad`` are not
touched (gradients are computed with ``torch.autograd.grad``), buffers (BatchNorm
statistics) are put back, and the RNG state is restored. It looks, in order, at:

1. the inputs (NaN/Inf pixels: the data);
2. the forward pass: the first module, in execution order, whose output holds a NaN/Inf or
   a value beyond the autocast dtype's range (65504 under fp16), run again in float32 to
   tell an overflow of the autocast dtype (precision) from a NaN that float32 makes too;
3. the loss: the first non-finite component ``loss_fn`` returns;
4. the backward pass, at the step's loss scale: the first gradient to go non-finite in
   backward order and the backward that produced it, then again at scale 1 (finite there:
   an fp16 loss-scale overflow, which GradScaler handles by lowering the scale) and in
   float32 (finite there: an overflow of the autocast dtype).

Then, within ``max_replays`` further passes, it bisects the batch for the images that
alone reproduce the fault. Each pass costs about one training step's forward (and, for a
backward origin, backward).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .images import label_problems, pixel_facts
from .select import select_batch
from .trace import ForwardFault, Magnitude, PassTrace, dtype_limit, float_tensors

LossFn = Callable[[Any, Any], "torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]"]
Select = Callable[[torch.Tensor, Any, list[int]], tuple[torch.Tensor, Any]]

#: Where the first NaN/Inf showed: ``Origin.stage``.
STAGES = ("input", "forward", "loss", "backward", "none")
#: ``Origin.cause``.
NONFINITE_INPUT = "non-finite input"
AUTOCAST_OVERFLOW = "autocast overflow"
"""Beyond the autocast dtype's range; finite in float32."""
NONFINITE_IN_FP32 = "non-finite in float32"
LOSS_SCALE_OVERFLOW = "loss-scale overflow"
"""Gradients beyond fp16's range at the loss scale, finite at scale 1."""
NOT_REPRODUCED = "not reproduced"
#: ``Origin.verdict``: what to change.
VERDICTS = ("data", "precision", "loss scale", "model", "unknown")

_AMP_NAMES = {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Origin:
    """Where the first NaN/Inf of a step appeared."""

    stage: str
    """One of :data:`STAGES`."""
    where: str
    """The module, loss component or gradient (empty for ``input`` and ``none``)."""
    cause: str
    verdict: str
    """Whether the data, the precision, the loss scale or the model (weights, learning
    rate, loss) made it: one of :data:`VERDICTS`."""
    message: str
    """One line, as logged after ``NaN/Inf origin: ``."""
    details: dict[str, Any] = field(default_factory=dict)
    """Magnitudes (:class:`Magnitude` as dicts) and names behind the message."""


@dataclass(frozen=True)
class StepExplanation:
    """What :func:`explain_step` found; ``to_json`` is what ``forensics/step_<k>.json`` holds."""

    origin: Origin
    step: int | None
    autocast: str
    loss_scale: float
    losses: dict[str, float]
    """The replay's loss components (empty when the forward already failed)."""
    images: list[dict[str, Any]]
    """Per image of the batch: ``position``, ``name``, pixel facts and the caller's facts."""
    reproduced_by: list[int] | None
    """Batch positions that reproduce the fault without the rest of the batch (None: no
    smaller part was found to)."""
    bisection: str
    replays: int
    """Passes run after the first (the float32 and scale-1 checks and the bisection)."""
    seconds: float

    def log_lines(self) -> list[str]:
        where = "" if self.step is None else f" (batch {self.step})"
        lines = [f"NaN/Inf origin{where}: {self.origin.message}"]
        if self.origin.stage != "none":
            lines.append(f"  {self.bisection}; verdict: {self.origin.verdict}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "origin": {
                "stage": self.origin.stage,
                "where": self.origin.where,
                "cause": self.origin.cause,
                "verdict": self.origin.verdict,
                "message": self.origin.message,
                **self.origin.details,
            },
            "autocast": self.autocast,
            "loss_scale": self.loss_scale,
            "losses": self.losses,
            "reproduced_by": self.reproduced_by,
            "bisection": self.bisection,
            "images": self.images,
            "replays": self.replays,
            "seconds": self.seconds,
        }


# ------------------------------------------------------------------------- checks


def _check_arguments(
    model: Any,
    loss_fn: Any,
    inputs: Any,
    autocast_dtype: Any,
    loss_scale: Any,
    image_names: Any,
    image_facts: Any,
    max_replays: Any,
) -> int:
    """Raises TypeError/ValueError naming the bad argument; returns the batch size."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if inputs.ndim == 0 or len(inputs) == 0:
        raise ValueError(
            f"inputs must hold a batch of at least one image, got shape {tuple(inputs.shape)}"
        )
    if autocast_dtype not in _AMP_NAMES:
        raise ValueError(
            f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype}"
        )
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real):
        raise TypeError(f"loss_scale must be a number, got {type(loss_scale).__name__}")
    if not (math.isfinite(loss_scale) and loss_scale > 0):
        raise ValueError(f"loss_scale must be positive and finite, got {loss_scale}")
    if isinstance(max_replays, bool) or not isinstance(max_replays, numbers.Integral):
        raise TypeError(f"max_replays must be an int, got {type(max_replays).__name__}")
    if max_replays < 0:
        raise ValueError(f"max_replays must be >= 0, got {max_replays}")
    batch = len(inputs)
    for name, value in (("image_names", image_names), ("image_facts", image_facts)):
        if value is not None and len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {batch} images")
    return batch


# ------------------------------------------------------------------- the replay


class _ReplayState:
    """The model's buffers and the RNG, saved on entry and put back on exit (and before
    every pass, so that each pass starts from the same state)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]
        self.device = device
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _ReplayState:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self._stack.enter_context(torch.random.fork_rng(devices=devices))
        self._stack.enter_context(torch.enable_grad())
        return self

    def reset(self) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.saved, strict=True):
                buffer.copy_(saved)

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.reset()
        finally:
            self._stack.close()


@dataclass
class _Replay:
    """One batch and how to run it: the passes that ``explain_step`` and its bisection make."""

    model: nn.Module
    loss_fn: LossFn
    autocast_dtype: torch.dtype | None
    loss_scale: float
    state: _ReplayState
    passes: int = 0

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None or not enabled:
            return torch.autocast(self.state.device.type, enabled=False)
        return torch.autocast(self.state.device.type, dtype=self.autocast_dtype)

    def forward(self, trace: PassTrace, inputs: torch.Tensor, autocast: bool = True) -> Any:
        self.state.reset()
        self.passes += 1
        with trace, self.autocast(autocast):
            return self.model(inputs)

    def loss(self, output: Any, targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss_fn``'s total and components (outside autocast, as a training step runs it)."""
        with torch.autocast(self.state.device.type, enabled=False):
            result = self.loss_fn(output, targets)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
            loss, components = result
        elif isinstance(result, torch.Tensor):
            loss, components = result, {}
        else:
            raise TypeError(
                "loss_fn must return a loss tensor or (loss, {name: component}), "
                f"got {type(result).__name__}"
            )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a one-element loss, got {_shape(loss)}")
        return loss.reshape(()), {
            str(name): torch.as_tensor(value).detach().float().reshape(-1)[0]
            for name, value in components.items()
        }

    def gradients(self, loss: torch.Tensor, scale: float) -> list[torch.Tensor | None]:
        parameters = self.parameters
        if not loss.requires_grad or not parameters:
            return []
        return list(
            torch.autograd.grad(loss * scale, parameters, allow_unused=True, retain_graph=True)
        )

    def fault_up_to(self, stage: str, inputs: torch.Tensor, targets: Any) -> bool:
        """Whether a pass on this (part of the) batch finds a NaN/Inf by ``stage``."""
        trace = PassTrace(self.model, dtype_limit(self.autocast_dtype), gradients=False)
        output = self.forward(trace, inputs)
        if trace.forward_fault is not None:
            return True
        if stage == "forward":
            return False
        loss, components = self.loss(output, targets)
        if not _all_finite([loss, *components.values()]):
            return True
        if stage == "loss":
            return False
        return not _all_finite([g for g in self.gradients(loss, self.loss_scale) if g is not None])


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {key: _to_float32(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        converted = [_to_float32(item) for item in value]
        return type(value)(*converted) if hasattr(value, "_fields") else type(value)(converted)
    return value


# ------------------------------------------------------------------ the stages


def _input_origin(pixels: list[dict[str, Any]]) -> Origin | None:
    bad = [
        (i, facts["nonfinite_pixels"])
        for i, facts in enumerate(pixels)
        if facts["nonfinite_pixels"]
    ]
    if not bad:
        return None
    listed = ", ".join(f"image {i} ({count} pixels)" for i, count in bad)
    return Origin(
        "input",
        "",
        NONFINITE_INPUT,
        "data",
        f"the input holds NaN/Inf: {listed}",
        {"images": [i for i, _ in bad]},
    )


def _forward_origin(replay: _Replay, fault: ForwardFault, amp: str) -> Origin:
    details: dict[str, Any] = {
        "module": fault.module,
        "caller": fault.caller,
        "input": fault.inputs.to_json(),
        "output": fault.output.to_json(),
        "weights_finite": fault.weights_finite,
    }
    if fault.caller is not None and not fault.inputs_are_model_inputs:
        # The module got its NaN/Inf from the code of a caller, outside any submodule.
        return Origin(
            "forward",
            fault.caller,
            NONFINITE_IN_FP32 if fault.inputs.nonfinite else AUTOCAST_OVERFLOW,
            "model",
            f"forward of {fault.caller} (its own code, not a submodule's: {fault.module} got "
            f"input {fault.inputs.describe()})",
            details,
        )
    fp32 = _rerun_in_float32(replay, fault) if replay.autocast_dtype is not None else None
    if fp32 is not None:
        details["output_fp32"] = fp32.to_json()
    if fp32 is not None and fp32.nonfinite == 0:
        return Origin(
            "forward",
            fault.module,
            AUTOCAST_OVERFLOW,
            "precision",
            f"forward output of {fault.module} ({amp} overflow, max |x| {fp32.max_abs:.3g} in "
            f"float32; input {fault.inputs.describe()})",
            details,
        )
    why = (
        "its weights are not finite"
        if not fault.weights_finite
        else f"input {fault.inputs.describe()}"
    )
    if any(True for _ in fault.call[0].children()):
        why += "; made by its own code, not by a submodule"
    return Origin(
        "forward",
        fault.module,
        NONFINITE_IN_FP32,
        "model",
        f"forward output of {fault.module} ({fault.output.describe()}"
        f"{', in float32 too' if fp32 is not None else ''}; {why})",
        details,
    )


def _rerun_in_float32(replay: _Replay, fault: ForwardFault) -> Magnitude | None:
    """The faulty module's output on float32 copies of its arguments, autocast off."""
    module, args, kwargs = fault.call
    replay.passes += 1
    try:
        with torch.no_grad(), replay.autocast(enabled=False):
            output = module(*_to_float32(args), **_to_float32(kwargs))
    except (RuntimeError, TypeError, ValueError):  # e.g. a module whose weights are half
        return None
    return Magnitude.of(float_tensors(output))


def _loss_origin(loss: torch.Tensor, components: dict[str, torch.Tensor]) -> Origin | None:
    for name, value in [*components.items(), ("the total loss", loss.detach())]:
        if not bool(torch.isfinite(value)):
            return Origin(
                "loss",
                name,
                NONFINITE_IN_FP32,
                "model",
                f"loss component {name} = {float(value)} (the model's outputs are finite)",
                {"component": name},
            )
    return None


def _backward_origin(
    replay: _Replay,
    trace: PassTrace,
    loss: torch.Tensor,
    inputs: torch.Tensor,
    targets: Any,
    amp: str,
) -> Origin:
    fault = trace.gradient_fault
    if fault is None:
        return Origin(
            "none",
            "",
            NOT_REPRODUCED,
            "unknown",
            "not reproduced: the replay's forward, loss and gradients are all finite "
            f"(at loss scale {replay.loss_scale:g})",
        )
    details = {
        "gradient_of": fault.name,
        "gradient_kind": fault.kind,
        "produced_by": fault.produced_by,
        "gradient": fault.gradient.to_json(),
        "gradients_before": fault.order,
    }
    what = (
        f"gradient of {fault.name}"
        if fault.kind == "parameter"
        else f"gradient of the output {fault.name}"
    )
    head = f"{what}, made by the backward of {fault.produced_by}"
    if replay.autocast_dtype == torch.float16 and replay.loss_scale != 1.0:
        trace.reset_gradients()
        replay.passes += 1
        with trace:
            replay.gradients(loss, 1.0)
        details["finite_at_scale_1"] = trace.gradient_fault is None
        if trace.gradient_fault is None:
            return Origin(
                "backward",
                fault.name,
                LOSS_SCALE_OVERFLOW,
                "loss scale",
                f"{head} (fp16 loss-scale overflow at scale {replay.loss_scale:g}: finite at "
                "scale 1; GradScaler lowers the scale)",
                details,
            )
    if replay.autocast_dtype is not None:
        fp32_trace = PassTrace(replay.model, math.inf, gradients=True)
        output = replay.forward(fp32_trace, inputs, autocast=False)
        fp32_loss, _ = replay.loss(output, targets)
        with fp32_trace:
            replay.gradients(fp32_loss, 1.0)
        finite = (
            fp32_trace.forward_fault is None
            and bool(torch.isfinite(fp32_loss))
            and fp32_trace.gradient_fault is None
        )
        details["finite_in_float32"] = finite
        if finite:
            return Origin(
                "backward",
                fault.name,
                AUTOCAST_OVERFLOW,
                "precision",
                f"{head} ({amp} overflow in backward: finite in float32)",
                details,
            )
    return Origin(
        "backward",
        fault.name,
        NONFINITE_IN_FP32,
        "model",
        f"{head} ({fault.gradient.describe()}"
        f"{', in float32 too' if replay.autocast_dtype is not None else ''})",
        details,
    )


# --------------------------------------------------------------------- bisection


def _bisect(
    replay: _Replay,
    stage: str,
    inputs: torch.Tensor,
    targets: Any,
    select: Select,
    max_replays: int,
) -> tuple[list[int] | None, str]:
    """The smallest part of the batch found, halving, that alone reproduces the fault:
    each half is replayed; one that does is halved again, until both do (the fault is
    not the images') or neither does (it needs images of both)."""
    if max_replays == 0:
        return None, "not bisected (max_replays=0)"
    candidates = list(range(len(inputs)))
    if len(candidates) == 1:
        return None, "a batch of one image"
    budget = max_replays
    refused: str | None = None  # why a part of the batch could not run on its own

    def reproduces(part: list[int]) -> bool:
        nonlocal refused
        part_inputs, part_targets = select(inputs, targets, part)
        try:
            return replay.fault_up_to(stage, part_inputs, part_targets)
        except Exception as error:  # e.g. BatchNorm of a single image: the part cannot run
            refused = refused or f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            return False

    found: list[int] | None = None
    while len(candidates) > 1 and budget >= 2:
        budget -= 2
        middle = len(candidates) // 2
        halves = candidates[:middle], candidates[middle:]
        reproduced = [reproduces(half) for half in halves]
        if all(reproduced):
            if found is None:
                return None, "every half of the batch reproduces it: not particular images"
            break
        if not any(reproduced):
            break
        candidates = found = halves[reproduced.index(True)]
    why_not_smaller = f"; a smaller part could not run alone ({refused})" if refused else ""
    if found is None:
        return None, f"no half of the batch reproduces it alone{why_not_smaller}"
    listed = ", ".join(str(i) for i in found)
    if len(found) == 1:
        return found, f"image {listed} of the batch alone reproduces it"
    return found, f"images {listed} of the batch reproduce it{why_not_smaller}"


def _image_listing(
    inputs: torch.Tensor,
    image_names: Sequence[str] | None,
    image_facts: Sequence[Mapping[str, Any]] | None,
) -> list[dict[str, Any]]:
    images = []
    for position, pixels in enumerate(pixel_facts(inputs)):
        entry: dict[str, Any] = {"position": position}
        if image_names is not None:
            entry["name"] = str(image_names[position])
        entry.update(pixels)
        if image_facts is not None:
            entry.update(image_facts[position])
        images.append(entry)
    return images


def _with_images(bisection: str, found: list[int] | None, images: list[dict[str, Any]]) -> str:
    """The bisection's sentence, naming the images found (when named) and their suspect labels."""
    named = []
    for position in (found or [])[:4]:
        entry = images[position]
        problems = label_problems(entry)
        text = ": ".join(filter(None, [entry.get("name"), ", ".join(problems)]))
        if text:
            named.append(text)
    if not named:
        return bisection
    more = ", ..." if found and len(found) > 4 else ""
    return f"{bisection} ({'; '.join(named)}{more})"


def _verdict_with_labels(
    origin: Origin, found: list[int] | None, images: list[dict[str, Any]]
) -> Origin:
    """A loss or backward fault that images with suspect labels alone reproduce: the data."""
    if origin.stage not in ("loss", "backward") or origin.verdict != "model" or not found:
        return origin
    if any(label_problems(images[p]) for p in found):
        return Origin(
            origin.stage, origin.where, origin.cause, "data", origin.message, origin.details
        )
    return origin


def explain_step(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: Any = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    loss_scale: float = 1.0,
    image_names: Sequence[str] | None = None,
    image_facts: Sequence[Mapping[str, Any]] | None = None,
    select: Select | None = None,
    max_replays: int = 8,
    step: int | None = None,
) -> StepExplanation:
    """Replays ``loss_fn(model(inputs), targets)`` and its backward, and says where the first
    NaN/Inf appeared (see the module doc).

    Args:
        model: the bare module (not a DDP wrapper), in the mode of the step (``train()``).
        loss_fn: ``loss_fn(model_output, targets)`` returns the loss, or ``(loss,
            {name: component})``; components are checked in their order.
        inputs: the batch's images ``[B, ...]``, on the model's device.
        autocast_dtype: the step's autocast dtype (None: full precision).
        loss_scale: the GradScaler's scale of the step (``scaler.get_scale()`` before
            ``scaler.update()``); 1 without loss scaling.
        image_names, image_facts: per image, a name (file, dataset index) and facts (e.g.
            :func:`~stable_dfl.forensics.detection_label_facts`) for the report.
        select: ``select(inputs, targets, positions)`` returns that part of the batch, for
            the bisection; default :func:`~stable_dfl.forensics.select_batch` (indexes
            every tensor whose first dimension is the batch).
        max_replays: passes the bisection may run (0: none).
        step: the step's number, for the report.

    The model is left as it was: parameters, ``.grad``, buffers and the RNG state.
    """
    batch = _check_arguments(
        model, loss_fn, inputs, autocast_dtype, loss_scale, image_names, image_facts, max_replays
    )
    started = time.perf_counter()
    amp = _AMP_NAMES[autocast_dtype]
    select = select or select_batch
    device = next((p.device for p in model.parameters()), inputs.device)
    images = _image_listing(inputs, image_names, image_facts)
    losses: dict[str, float] = {}
    found: list[int] | None = None
    bisection = ""
    with _ReplayState(model, device) as state:
        replay = _Replay(model, loss_fn, autocast_dtype, float(loss_scale), state)
        origin = _input_origin(images)
        if origin is not None:
            found = origin.details["images"]
            bisection = f"image{'s' if len(found) > 1 else ''} {', '.join(map(str, found))} of the batch hold NaN/Inf pixels"
        else:
            trace = PassTrace(model, dtype_limit(autocast_dtype), gradients=True)
            output = replay.forward(trace, inputs)
            if trace.forward_fault is not None:
                origin = _forward_origin(replay, trace.forward_fault, amp)
            else:
                loss, components = replay.loss(output, targets)
                losses = {name: float(value) for name, value in components.items()}
                losses.setdefault("total_loss", float(loss.detach()))
                origin = _loss_origin(loss, components)
                if origin is None:
                    with trace:
                        replay.gradients(loss, replay.loss_scale)
                    origin = _backward_origin(replay, trace, loss, inputs, targets, amp)
            if origin.stage != "none":
                found, bisection = _bisect(
                    replay, origin.stage, inputs, targets, select, max_replays
                )
                bisection = _with_images(bisection, found, images)
                origin = _verdict_with_labels(origin, found, images)
        passes = replay.passes
    return StepExplanation(
        origin=origin,
        step=step,
        autocast=amp,
        loss_scale=float(loss_scale),
        losses=losses,
        images=images,
        reproduced_by=found,
        bisection=bisection or ("not bisected" if batch > 1 else "a batch of one image"),
        replays=max(passes - 1, 0),
        seconds=time.perf_counter() - started,
    )
