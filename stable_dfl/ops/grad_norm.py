"""Sum of squares and non-finite check of a list of gradients: specification and dispatch.

:func:`grad_sumsq_nonfinite_reference` is the specification, in eager PyTorch. For
gradients ``g_0 .. g_{n-1}`` (float32/float16/bfloat16/float64, one device) and an
optional 1-element float32 ``inv_scale``::

    v_i         = g_i                                    # or, with inv_scale:
    v_i         = (g_i.to(opmath) * inv_scale).to(g_i.dtype)   # GradScaler's unscale
    nonfinite_i = any(!isfinite(v_i))
    sumsq       = sum over i with !nonfinite_i of sum(float64(v_i) ** 2)   # float64
    found       = 1.0 if any(nonfinite_i) or sumsq is inf, else 0.0

where opmath is float64 for float64 gradients and float32 otherwise. The in-place variant
also stores ``v_i`` into ``g_i``. Tensors holding a NaN/Inf are left out of ``sumsq``, so
the norm of the healthy tensors stays readable when one tensor goes bad.

Backends, all behind :func:`grad_sumsq_nonfinite`: the compiled C++ (CPU, float64
accumulation, deterministic) and CUDA (multi-tensor apply, float64 squares and sums) kernels of ``stable_dfl._C``, the Triton kernels of
:mod:`.triton_grad_norm` (GPUs without the compiled extension) and the reference.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from . import backends
from .backends import GRAD_SUMSQ, UNSCALE_GRAD_SUMSQ
from .reference import compute_dtype

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SumsqResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def grad_sumsq_nonfinite_reference(
    grads: list[torch.Tensor], inv_scale: torch.Tensor | None = None, in_place: bool = False
) -> SumsqResult:
    """The specification (module docstring): ``(sumsq, found_nonfinite, nonfinite)``."""
    device = grads[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    flags = []
    for grad in grads:
        values = grad
        if inv_scale is not None:
            opmath = compute_dtype(grad.dtype)
            values = (grad.to(opmath) * inv_scale.reshape(()).to(opmath)).to(grad.dtype)
            if in_place:
                grad.copy_(values)
        wide = values.double()
        bad = ~torch.isfinite(wide).all()
        flags.append(bad)
        total = total + torch.where(bad, 0.0, wide.square().sum())
    nonfinite = torch.stack(flags)
    sumsq = total
    found = (nonfinite.any() | torch.isinf(sumsq)).float()
    return sumsq, found, nonfinite


def _check_grad(index: int, grad: torch.Tensor, device: torch.device) -> None:
    torch._check_type(
        grad.dtype in GRAD_DTYPES,
        lambda: f"tensor {index} is {grad.dtype}; expected float32, float16, bfloat16 or float64",
    )
    torch._check_value(
        grad.device == device, lambda: f"tensor {index} is on {grad.device}, tensor 0 on {device}"
    )


def _fake_grad_sumsq_nonfinite(grads, inv_scale=None) -> SumsqResult:
    # The public entry point answers an empty list itself; the ops need one tensor.
    torch._check_value(len(grads) > 0, lambda: "the gradient ops need at least one tensor")
    for index, grad in enumerate(grads):
        _check_grad(index, grad, grads[0].device)
    if inv_scale is not None:
        torch._check_value(
            inv_scale.numel() == 1 and inv_scale.dtype == torch.float32,
            lambda: (
                "inv_scale must be one float32 element, got "
                f"{inv_scale.dtype} of shape {tuple(inv_scale.shape)}"
            ),
        )
    return (
        grads[0].new_empty((), dtype=torch.float64),
        grads[0].new_empty((), dtype=torch.float32),
        grads[0].new_empty((len(grads),), dtype=torch.bool),
    )


if backends.compiled_available("cpu", GRAD_SUMSQ):
    torch.library.register_fake("stable_dfl::grad_sumsq_nonfinite")(_fake_grad_sumsq_nonfinite)
    torch.library.register_fake("stable_dfl::unscale_grad_sumsq_nonfinite_")(
        _fake_grad_sumsq_nonfinite
    )


def _is_dense(tensor: torch.Tensor) -> bool:
    """True when the elements fill ``numel()`` consecutive slots (any dimension order)."""
    expected_stride = 1
    for dim in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.size(dim) != 1 and tensor.stride(dim) != expected_stride:
            return False
        expected_stride *= tensor.size(dim)
    return True


def _dense(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if _is_dense(g) else g.contiguous() for g in grads]


@torch.library.custom_op("stable_dfl::grad_sumsq_nonfinite_triton", mutates_args=())
def _grad_sumsq_nonfinite_triton(
    grads: list[torch.Tensor], inv_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_grad_norm import grad_sumsq_nonfinite_triton

    return grad_sumsq_nonfinite_triton(_dense(grads), inv_scale, write_back=False)


@torch.library.custom_op(
    "stable_dfl::unscale_grad_sumsq_nonfinite_triton_", mutates_args=("grads",)
)
def _unscale_grad_sumsq_nonfinite_triton(
    grads: list[torch.Tensor], inv_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_grad_norm import grad_sumsq_nonfinite_triton

    dense = _dense(grads)
    outputs = grad_sumsq_nonfinite_triton(dense, inv_scale, write_back=True)
    for grad, copy in zip(grads, dense, strict=True):
        if copy is not grad:
            grad.copy_(copy)
    return outputs


_grad_sumsq_nonfinite_triton.register_fake(_fake_grad_sumsq_nonfinite)
_unscale_grad_sumsq_nonfinite_triton.register_fake(_fake_grad_sumsq_nonfinite)


# Availability is fixed for the process; under torch.compile the choice is a constant.
@torch.compiler.assume_constant_result
def resolve_grad_norm_backend(backend: str, device: torch.device) -> str:
    """The backend that runs the gradient ops for ``backend`` ('auto' or a name) on ``device``.

    Raises BackendUnavailableError, saying why, when an explicit backend cannot run.
    """
    return backends.resolve(backend, device, GRAD_SUMSQ)


def _checked_grads(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(
            "tensors must be a list (or other iterable) of tensors, got one tensor: "
            "pass [tensor] to check a single tensor"
        )
    grads = list(tensors)
    for index, grad in enumerate(grads):
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"tensor {index} is a {type(grad).__name__}, not a torch.Tensor")
        if grad.layout != torch.strided:
            raise TypeError(
                f"tensor {index} has layout {grad.layout}: sparse gradients are not supported "
                "(densify them, or leave their parameters out)"
            )
        if grad.dtype not in GRAD_DTYPES:
            raise TypeError(
                f"tensor {index} is {grad.dtype}; expected float32, float16, bfloat16 or float64"
            )
    devices = {grad.device for grad in grads}
    if len(devices) > 1:
        raise ValueError(
            f"all tensors must be on one device, got {sorted(map(str, devices))}; "
            "call once per device (GradGuard does)"
        )
    if devices == {torch.device("meta")}:
        raise ValueError("the tensors are on the meta device: they hold no values to check")
    return grads


def _inv_scale_tensor(inv_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """``inv_scale`` as a 1-element float32 tensor on ``device``. Its value must be positive
    and finite; a tensor on a GPU is not read to check it (that would cost a host sync)."""
    if not isinstance(inv_scale, torch.Tensor):
        if isinstance(inv_scale, bool) or not isinstance(inv_scale, numbers.Real):
            raise TypeError(
                f"inv_scale must be a number or a tensor, got {type(inv_scale).__name__}"
            )
        if not (math.isfinite(inv_scale) and inv_scale > 0):
            raise ValueError(f"inv_scale must be positive and finite, got {inv_scale}")
        return torch.full((1,), float(inv_scale), dtype=torch.float32, device=device)
    if inv_scale.numel() != 1:
        raise ValueError(f"inv_scale must hold one element, got shape {tuple(inv_scale.shape)}")
    if inv_scale.device.type == "meta":
        raise ValueError("inv_scale is on the meta device: it holds no value")
    if not inv_scale.is_floating_point():
        raise TypeError(f"inv_scale must be a floating-point tensor, got {inv_scale.dtype}")
    if (
        inv_scale.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not (math.isfinite(float(inv_scale)) and float(inv_scale) > 0)
    ):
        raise ValueError(f"inv_scale must be positive and finite, got {float(inv_scale)}")
    return inv_scale.to(device=device, dtype=torch.float32).reshape(1)


def grad_sumsq_nonfinite(
    tensors: Iterable[torch.Tensor],
    inv_scale: torch.Tensor | float | None = None,
    *,
    in_place: bool = False,
    backend: str = "auto",
) -> SumsqResult:
    """One pass over ``tensors``: ``(sumsq, found_nonfinite, nonfinite)`` (module docstring).

    ``sumsq`` is 0-dim float64, ``found_nonfinite`` 0-dim float32, ``nonfinite`` bool, one flag per
    tensor, all on the tensors' device. With ``inv_scale`` the values are unscaled first;
    ``in_place=True`` stores the unscaled values back (GradScaler's unscale, fused).
    An empty list gives ``(0, 0, [])`` on ``inv_scale``'s device, else on the CPU.
    Raises TypeError for sparse or non-floating tensors, ValueError for mixed devices.
    """
    grads = _checked_grads(tensors)
    if in_place and inv_scale is None:
        raise ValueError("in_place=True unscales in place and needs inv_scale")
    if not grads:
        device = inv_scale.device if isinstance(inv_scale, torch.Tensor) else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return zero.double(), zero, torch.zeros(0, dtype=torch.bool, device=device)
    device = grads[0].device
    scale = None if inv_scale is None else _inv_scale_tensor(inv_scale, device)
    chosen = resolve_grad_norm_backend(backend, device)
    if chosen == "reference":
        return grad_sumsq_nonfinite_reference(grads, scale, in_place)
    return backends.op(chosen, UNSCALE_GRAD_SUMSQ if in_place else GRAD_SUMSQ)(grads, scale)


def grad_norm_and_nonfinite(
    tensors: Iterable[torch.Tensor],
    inv_scale: torch.Tensor | float | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm of the finite tensors of ``tensors`` and which tensors hold a NaN/Inf.

    Returns ``(total_norm, nonfinite)``: ``total_norm`` a 0-dim float32 tensor, the norm
    over the elements of the tensors free of NaN/Inf (squared and summed in float64, so no
    finite float32/16 gradient overflows it and no tiny one flushes it to 0; inf only when
    the norm itself exceeds float32's range);
    ``nonfinite`` a bool tensor with one flag per input tensor. One pass, no host sync;
    the inputs are never modified. With ``inv_scale`` (a GradScaler's ``1 / scale``) the
    norm is that of the unscaled values. Tensors must share one device.
    """
    sumsq, _, nonfinite = grad_sumsq_nonfinite(tensors, inv_scale, backend=backend)
    return sumsq.sqrt().float(), nonfinite
