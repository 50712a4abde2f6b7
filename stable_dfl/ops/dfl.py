"""The DFL ops: their definitions, fakes and autograd, and the dispatch to a backend.

Two ops share one schema, ``(pred, target, weight?, eps, reduce_sum, need_grad) ->
(loss, grad)``: ``stable_dfl::dfl_forward`` (C++/CUDA kernels registered by
``stable_dfl._C``) and ``stable_dfl::dfl_forward_triton`` (defined here, its kernel in
:mod:`.triton_dfl`). Each computes, in one pass, each row's loss (or their deterministic
sum) and, when a gradient is needed, the gradient of that sum in its own buffer. Backward
only scales that buffer by the incoming gradient (``dfl_backward``). It scales into a new
tensor rather than in place: the saved buffer must survive for ``retain_graph=True``,
``gradcheck`` and Jacobians, which run backward through the same graph more than once.
"""

from __future__ import annotations

import torch

from . import backends
from .reference import MAX_BINS, compute_dtype, dfl_reference

DFL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Availability is fixed for the process; under torch.compile the choice is a constant.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs the DFL for ``backend`` ('auto' or a name) on tensors of ``device``.

    Raises BackendUnavailableError, saying why, when an explicit backend cannot run.
    """
    return backends.resolve(backend, device, backends.DFL_FORWARD)


def check_dfl_forward_args(
    op_name: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
) -> None:
    """The checks of csrc/dfl_checks.h, in the same words: a direct call of an op never reads
    out of bounds, and a traced call (fake tensors, symbolic shapes) fails as an eager one."""
    torch._check_value(
        pred.dim() == 2, lambda: f"{op_name}: pred must be [N, n_bins], got {tuple(pred.shape)}"
    )
    torch._check_type(
        pred.dtype in DFL_DTYPES,
        lambda: f"{op_name}: pred must be float16, bfloat16, float32 or float64, got {pred.dtype}",
    )
    n_bins = pred.shape[1]
    torch._check_value(
        2 <= n_bins <= MAX_BINS,
        lambda: f"{op_name}: n_bins must be in [2, {MAX_BINS}], got {n_bins}",
    )
    _check_per_row(op_name, "target", target, pred)
    if weight is not None:
        _check_per_row(op_name, "weight", weight, pred)
    torch._check_value(0.0 <= eps < 1.0, lambda: f"{op_name}: eps must be in [0, 1), got {eps}")


def _check_per_row(op_name: str, name: str, value: torch.Tensor, pred: torch.Tensor) -> None:
    n_rows = pred.shape[0]
    torch._check_value(
        value.dim() == 1 and value.shape[0] == n_rows,
        lambda: f"{op_name}: {name} must be [N] with N = {n_rows}, got {tuple(value.shape)}",
    )
    torch._check_type(
        value.is_floating_point(),
        lambda: f"{op_name}: {name} must be floating point, got {value.dtype}",
    )
    torch._check_value(
        value.device == pred.device,
        lambda: f"{op_name}: {name} is on {value.device} but pred is on {pred.device}",
    )


@torch.library.custom_op("stable_dfl::dfl_forward_triton", mutates_args=())
def _dfl_forward_triton(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    reduce_sum: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_dfl_forward_args("stable_dfl::dfl_forward_triton", pred, target, weight, eps)
    from .triton_dfl import run_dfl_forward  # Triton is imported only when it runs

    return run_dfl_forward(pred, target, weight, eps, reduce_sum, need_grad)


def _fake_dfl_forward(op_name: str):
    def fake(pred, target, weight, eps, reduce_sum, need_grad):
        check_dfl_forward_args(op_name, pred, target, weight, eps)
        dtype = compute_dtype(pred.dtype)
        loss = pred.new_empty(() if reduce_sum else (pred.shape[0],), dtype=dtype)
        grad = torch.empty_like(pred) if need_grad else pred.new_empty((0,))
        return loss, grad

    return fake


def _fake_dfl_backward(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    op_name = "stable_dfl::dfl_backward"
    torch._check_value(
        grad.dim() == 2, lambda: f"{op_name}: grad must be [N, n_bins], got {tuple(grad.shape)}"
    )
    torch._check_value(
        grad_loss.dim() == 0 or (grad_loss.dim() == 1 and grad_loss.shape[0] == grad.shape[0]),
        lambda: (
            f"{op_name}: grad_loss must be 0-dim or [N] with N = {grad.shape[0]}, "
            f"got {tuple(grad_loss.shape)}"
        ),
    )
    torch._check_type(
        grad.dtype in DFL_DTYPES,
        lambda: f"{op_name}: grad must be float16, bfloat16, float32 or float64, got {grad.dtype}",
    )
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # Otherwise autograd hands backward a zero-filled tensor the size of pred for the unused
    # gradient of `grad`: a wasted allocation and memset as large as the kernel's own output.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:  # the loss did not reach the output being differentiated
        return None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    return scale_saved_grad(grad, grad_loss), None, None, None, None, None


def scale_saved_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad * grad_loss`` per row (``grad_loss`` 0-dim or ``[N]``), computed in fp32 and rounded
    once to grad's dtype: the compiled ``dfl_backward`` kernel where one exists for the device."""
    if backends.compiled_available(grad.device.type, "dfl_backward"):
        return torch.ops.stable_dfl.dfl_backward(grad, grad_loss)
    # An fp32 [1, 1] / [N, 1] factor keeps the product in fp32 until the final cast.
    scale = grad_loss.reshape(1, 1) if grad_loss.dim() == 0 else grad_loss.unsqueeze(-1)
    return (grad * scale).to(grad.dtype)


def _register(op_name: str) -> None:
    torch.library.register_fake(op_name)(_fake_dfl_forward(op_name))
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


_register("stable_dfl::dfl_forward_triton")
if backends.extension_error() is None:
    _register("stable_dfl::dfl_forward")
    torch.library.register_fake("stable_dfl::dfl_backward")(_fake_dfl_backward)


def dfl_rows(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    reduce_sum: bool,
    backend: str,
) -> torch.Tensor:
    """Loss of ``pred[N, n_bins]`` rows against ``target[N]`` on a resolved ``backend``.

    Returns the per-row losses ``[N]``, or their sum as a 0-dim tensor when ``reduce_sum``;
    in fp32 (fp64 for fp64 logits). Differentiable with respect to ``pred``.
    """
    if backend == "reference":
        # Gradients flow to pred only, as from the compiled kernels: target and weight are
        # constants of the loss (ultralytics and mmdetection detach them too).
        constant_weight = None if weight is None else weight.detach()
        loss = dfl_reference(pred, target.detach(), constant_weight, eps)
        return loss.sum() if reduce_sum else loss
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    op = backends.op(backend, backends.DFL_FORWARD)
    loss, _ = op(pred, target, weight, eps, reduce_sum, need_grad)
    return loss
