"""GradGuard: unscale, measure, check and clip gradients in one fused pass, then step or skip.

The usual AMP recipe reads every gradient several times::

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                                    # pass 1 (read + write)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)       # pass 2 (read), 3 (read + write)
    if not torch.isfinite(norm): ...                              # host sync
    scaler.step(optimizer)                                        # host sync, silent skip
    scaler.update()

computes the norm in the gradients' dtype (float16 gradients give a false ``inf``) and
never says which tensor went bad. With the guard::

    guard = GradGuard(model, max_norm=10.0)
    ...
    scaler.scale(loss).backward()
    result = guard.step(optimizer, scaler)     # pass 1 (read + write), pass 2 (read + write)*
    if result.skipped:
        log.warning("NaN/Inf gradient in %s", ", ".join(result.offenders))

Pass 1 is :func:`stable_dfl.ops.grad_norm.grad_sumsq_nonfinite`: GradScaler's unscale, the
sum of squares (float64) and a per-tensor NaN/Inf flag, fused. Pass 2 is the
clip, ``torch._foreach_mul_`` by ``min(max_norm / (norm + 1e-6), 1)`` computed on the
device, as ``torch.nn.utils.clip_grad_norm_`` does, so clipping needs no host sync.
(*) On the CPU, where reading the coefficient is free, pass 2 is skipped when it is 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import scaler_state
from .ops.grad_norm import grad_sumsq_nonfinite

#: Added to the norm before dividing, as in ``torch.nn.utils.clip_grad_norm_``.
CLIP_EPS = 1e-6

NamedParameters = nn.Module | Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor]


class GradGuardResult:
    """What the guard saw in one step.

    The ``*_tensor`` attributes live on the device. The Python values (``total_norm``,
    ``clip_coef``, ``finite``, ``skipped``, ``offenders``) come from a single device-to-host
    copy made the first time any of them is read (never, if none is read). ``step`` reads
    ``finite`` to decide whether to call the optimizer.
    """

    __slots__ = (
        "_host",
        "clip_coef_tensor",
        "found_nonfinite_tensor",
        "max_offenders",
        "names",
        "nonfinite_tensor",
        "sumsq_tensor",
        "total_norm_tensor",
    )

    def __init__(
        self,
        sumsq: torch.Tensor,
        total_norm: torch.Tensor,
        found_nonfinite: torch.Tensor,
        clip_coef: torch.Tensor,
        nonfinite: torch.Tensor,
        names: list[str],
        max_offenders: int,
    ) -> None:
        #: Sum of squares of the finite gradients (float64, 0-dim), after any cross-rank sum.
        self.sumsq_tensor = sumsq
        #: Total L2 norm before clipping (float32, 0-dim; the square root taken in float64).
        self.total_norm_tensor = total_norm
        #: Nonzero when a gradient holds a NaN/Inf or the norm overflows float32 (with a
        #: reducer, the ranks' count of NaN/Inf gradients).
        self.found_nonfinite_tensor = found_nonfinite
        #: ``min(max_norm / (total_norm + 1e-6), 1)`` (1 when the guard does not clip).
        self.clip_coef_tensor = clip_coef
        #: One bool per checked gradient, in the order of ``names``.
        self.nonfinite_tensor = nonfinite
        #: Names of the parameters whose gradients were checked (those with a ``.grad``).
        self.names = names
        self.max_offenders = max_offenders
        self._host: list[float] | None = None

    def _host_values(self) -> list[float]:
        if self._host is None:
            packed = torch.cat(
                [
                    self.total_norm_tensor.reshape(1),
                    self.clip_coef_tensor.reshape(1),
                    self.found_nonfinite_tensor.reshape(1),
                    self.nonfinite_tensor.to(self.total_norm_tensor.dtype),
                ]
            )
            self._host = packed.tolist()
        return self._host

    @property
    def total_norm(self) -> float:
        """L2 norm of the gradients before clipping, over the tensors free of NaN/Inf."""
        return self._host_values()[0]

    @property
    def clip_coef(self) -> float:
        """Factor the gradients were multiplied by (1.0 when not clipped)."""
        return self._host_values()[1]

    @property
    def finite(self) -> bool:
        """No gradient held a NaN/Inf and their norm did not overflow float32 (which takes
        finite gradients near float32's largest value)."""
        return self._host_values()[2] == 0.0

    @property
    def skipped(self) -> bool:
        """The optimizer step was skipped (``step``) or must be (``check_and_clip``)."""
        return not self.finite

    @property
    def offenders(self) -> list[str]:
        """Names of the first ``max_offenders`` parameters whose gradients hold a NaN/Inf.

        Empty when the gradients are finite, or when only their norm overflowed float32
        (``finite`` False, ``total_norm`` inf).
        """
        flags = self._host_values()[3:]
        bad = [name for name, flag in zip(self.names, flags, strict=True) if flag]
        return bad[: self.max_offenders]

    def __repr__(self) -> str:
        return (
            f"GradGuardResult(total_norm={self.total_norm:.6g}, clip_coef={self.clip_coef:.6g}, "
            f"finite={self.finite}, skipped={self.skipped}, offenders={self.offenders})"
        )


def _named_parameters(parameters: NamedParameters) -> list[tuple[str, torch.Tensor]]:
    if isinstance(parameters, nn.Module):
        return list(parameters.named_parameters())
    if isinstance(parameters, torch.Tensor):
        return [("param0", parameters)]
    named = []
    for index, item in enumerate(parameters):
        if isinstance(item, torch.Tensor):
            named.append((f"param{index}", item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            named.append((str(item[0]), item[1]))
        else:
            raise TypeError(
                "parameters must be an nn.Module, (name, tensor) pairs or tensors; "
                f"item {index} is a {type(item).__name__}"
            )
    return named


def _multiply_(grads: list[torch.Tensor], factor: torch.Tensor) -> None:
    """``grads *= factor``, one ``_foreach_mul_`` per dtype as ``clip_grad_norm_`` groups them."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same_dtype in by_dtype.values():
        torch._foreach_mul_(same_dtype, factor)


class GradGuard:
    """Fused gradient unscale + norm + NaN/Inf check + clip, and a step that skips bad steps.

    Args:
        parameters: an ``nn.Module`` (its ``named_parameters()``), ``(name, parameter)``
            pairs, or parameters (named ``param0``, ``param1``, ...). Names appear in
            ``GradGuardResult.offenders``.
        max_norm: clip the total L2 norm to this; ``None`` checks without clipping.
        max_offenders: how many offending parameter names a result reports.
        reduce_across_ranks: for sharded gradients (see below); ``None`` otherwise.
        backend: ``'auto'`` or a backend of :func:`stable_dfl.ops.grad_norm.grad_sumsq_nonfinite`.

    ``step(optimizer, scaler)`` replaces ``scaler.unscale_`` + ``clip_grad_norm_`` +
    ``scaler.step`` + ``scaler.update`` (or ``clip_grad_norm_`` + ``optimizer.step()``
    without a scaler). On finite gradients it clips exactly as
    ``clip_grad_norm_(norm_type=2)`` does (same norm to float32 rounding) and steps. On
    NaN/Inf gradients it skips ``optimizer.step()``, so parameters and optimizer state stay
    bit-identical, and the scaler backs off. ``step`` reads one flag from the device (as
    ``GradScaler.step`` does); ``check_and_clip`` reads nothing.

    Parameters without a ``.grad`` are skipped. Sparse gradients raise TypeError.
    Gradients on several devices are measured per device and combined on the device of
    the first one.

    With a GradScaler whose ``unscale_`` has not been called this step, the guard unscales
    in its own pass (``inv_scale = 1 / scale`` as GradScaler computes it) and records its
    NaN/Inf flag as the scaler's ``found_inf`` for the optimizer, as ``scaler.unscale_``
    would, so a later ``scaler.step``/``scaler.update`` skips and backs off correctly (this
    uses GradScaler's private state: see :mod:`stable_dfl.scaler_state` for the torch
    versions it knows). Every parameter of the optimizer that has a gradient must then be
    one of the guard's.
    float16 gradients are unscaled too (``scaler.unscale_`` refuses them). After an explicit
    ``scaler.unscale_``, the guard only measures. ``step`` calls ``scaler.update()``: with
    several optimizers on one scaler, use ``check_and_clip`` per optimizer, then
    ``scaler.step`` each and ``scaler.update()`` once.

    Distributed training: under DDP the gradients are already all-reduced when ``backward``
    returns, so every rank computes the same norm and makes the same skip decision; nothing
    to add. With sharded gradients (FSDP, ZeRO, tensor parallel) each rank holds a part of
    the sum of squares; pass ``reduce_across_ranks=torch.distributed.all_reduce`` (or any
    callable that sums, in place, a 2-element float64 tensor ``[sum of squares, NaN/Inf
    count]`` over the ranks sharing the model, e.g. ``lambda t: dist.all_reduce(t,
    group=pg)``). The norm, the clip coefficient, the skip decision and the scaler's
    ``found_inf`` then cover all shards; ``offenders`` names this rank's parameters. The
    local sum of squares is also available as ``GradGuardResult.sumsq_tensor`` (after the
    reduction) for custom schemes.
    """

    def __init__(
        self,
        parameters: NamedParameters,
        max_norm: float | None,
        *,
        max_offenders: int = 5,
        reduce_across_ranks: Callable[[torch.Tensor], Any] | None = None,
        backend: str = "auto",
    ) -> None:
        if max_norm is not None and (
            isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real)
        ):
            raise TypeError(f"max_norm must be a number or None, got {type(max_norm).__name__}")
        if isinstance(max_offenders, bool) or not isinstance(max_offenders, numbers.Integral):
            raise TypeError(f"max_offenders must be an int, got {type(max_offenders).__name__}")
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive finite number or None, got {max_norm}")
        if max_offenders < 0:
            raise ValueError(f"max_offenders must be >= 0, got {max_offenders}")
        self.named_parameters = _named_parameters(parameters)
        self.max_norm = max_norm
        self.max_offenders = max_offenders
        self.reduce_across_ranks = reduce_across_ranks
        self.backend = backend
        self._parameter_ids = {id(p) for _, p in self.named_parameters}

    def _grads_by_device(self) -> dict[torch.device, tuple[list[str], list[torch.Tensor]]]:
        groups: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
        for name, param in self.named_parameters:
            grad = param.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise TypeError(
                    f"the gradient of {name} is {grad.layout}: GradGuard does not support sparse "
                    "gradients (densify them, or leave the parameter out of the guard)"
                )
            names, grads = groups.setdefault(grad.device, ([], []))
            names.append(name)
            grads.append(grad)
        return groups

    def _fused_unscale_inv_scale(
        self, optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None
    ) -> torch.Tensor | None:
        """``1 / scale`` when the guard must unscale for ``scaler``, else None."""
        if scaler is None or not scaler.is_enabled():
            return None
        if optimizer is None:
            raise ValueError(
                "pass the optimizer with the scaler: GradScaler unscales per optimizer"
            )
        if scaler_state.is_stepped(scaler, optimizer):
            raise RuntimeError("GradGuard ran after scaler.step(); run it before")
        if scaler_state.is_unscaled(scaler, optimizer):
            return None  # scaler.unscale_ was called: gradients are already unscaled
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None and id(param) not in self._parameter_ids:
                    raise ValueError(
                        "the optimizer has a parameter with a gradient that the guard does not "
                        f"cover (shape {tuple(param.shape)}); it would stay scaled. Build the guard "
                        "from every parameter the optimizer steps, or call scaler.unscale_ first"
                    )
        return scaler_state.inv_scale(scaler)

    def check_and_clip(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> GradGuardResult:
        """Unscales (with a scaler, see the class doc), measures, checks and clips; no step.

        With a scaler, follow with ``scaler.step(optimizer)`` and ``scaler.update()``: they
        skip and back off on NaN/Inf. Without one, skip ``optimizer.step()`` yourself when
        ``result.skipped``. No host sync.
        """
        inv_scale = self._fused_unscale_inv_scale(optimizer, scaler)
        groups = self._grads_by_device()
        primary = next(iter(groups), None)
        if primary is None:
            primary = inv_scale.device if inv_scale is not None else torch.device("cpu")

        names: list[str] = []
        flags: list[torch.Tensor] = []
        found_per_device: dict[torch.device, torch.Tensor] = {}
        stats = torch.zeros(2, dtype=torch.float64, device=primary)  # [sumsq, found]
        for device, (device_names, grads) in groups.items():
            sumsq, found, nonfinite = grad_sumsq_nonfinite(
                grads,
                None if inv_scale is None else inv_scale.to(device, non_blocking=True),
                in_place=inv_scale is not None,
                backend=self.backend,
            )
            stats += torch.stack([sumsq, found]).to(primary, non_blocking=True)
            found_per_device[device] = found
            names += device_names
            flags.append(nonfinite.to(primary, non_blocking=True))
        if self.reduce_across_ranks is not None:
            self.reduce_across_ranks(stats)
        if self.reduce_across_ranks is not None or not groups:
            # The scaler needs a found_inf even with no gradient. A copy: with several optimizers, scaler.update() adds found_infs in place.
            found_per_device = {primary: stats[1].float()}
        if inv_scale is not None:
            scaler_state.record_unscaled(scaler, optimizer, found_per_device)

        sumsq = stats[0]
        # float64 squares: a finite float32/16 gradient never overflows the sum, and only a
        # norm beyond float32's range (gradients near its largest value) is not finite.
        total_norm = sumsq.sqrt().float()
        found = stats[1] + torch.isinf(total_norm)
        if self.max_norm is None:
            clip_coef = torch.ones((), dtype=torch.float32, device=primary)
        else:
            clip_coef = torch.clamp(self.max_norm / (total_norm + CLIP_EPS), max=1.0)
            # Multiplying by 1.0 leaves every bit as it is. On the CPU the coefficient is
            # read for free, and skipping that multiply saves a read and a write of every
            # gradient; on a GPU, deciding would cost a host sync, so the multiply is queued.
            if primary.type != "cpu" or clip_coef.item() != 1.0:
                for device, (_, grads) in groups.items():
                    _multiply_(grads, clip_coef.to(device, non_blocking=True))
        nonfinite = torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool, device=primary)
        return GradGuardResult(
            sumsq, total_norm, found, clip_coef, nonfinite, names, self.max_offenders
        )

    def step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
    ) -> GradGuardResult:
        """``check_and_clip``, then ``optimizer.step()`` unless a gradient is NaN/Inf, then
        ``scaler.update()``. Reads one flag from the device to decide.
        """
        result = self.check_and_clip(optimizer, scaler)
        if result.finite:
            optimizer.step()
        if scaler is not None and scaler.is_enabled():
            # What scaler.step would have done: the step is taken (or skipped) above.
            scaler_state.record_stepped(scaler, optimizer)
            scaler.update()
        return result
