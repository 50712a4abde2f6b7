"""The DFL op: backend choice, fake kernels and autograd, in one place.

Kernels (C++/CUDA in ``stable_dfl._C``, Triton in :mod:`.triton_dfl`) compute, in one
pass, each row's loss (or their deterministic sum) and, when a gradient is needed,
the gradient of that sum in its own buffer. Backward only scales that buffer by the
incoming gradient (``dfl_backward``). It scales into a new tensor rather than in place:
the saved buffer must survive for ``retain_graph=True``, ``gradcheck`` and Jacobians,
which run backward through the same graph more than once.
"""

from __future__ import annotations

import torch

from . import _library
from .reference import compute_dtype, dfl_reference


# Availability is fixed for the process; under torch.compile the choice is a constant.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs the DFL for ``backend`` ('auto' or a name) on tensors of ``device``.

    Raises BackendUnavailableError, saying why, when an explicit backend cannot run.
    """
    return _library.resolve_backend(backend, device, "dfl_forward")


def _fake_dfl_forward(pred, target, weight, eps, reduce_sum, need_grad):
    dtype = compute_dtype(pred.dtype)
    loss = (
        pred.new_empty((), dtype=dtype)
        if reduce_sum
        else pred.new_empty((pred.shape[0],), dtype=dtype)
    )
    grad = torch.empty_like(pred) if need_grad else pred.new_empty((0,))
    return loss, grad


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
    if _library.has_kernel("dfl_backward", grad.device):
        return torch.ops.stable_dfl.dfl_backward(grad, grad_loss)
    # An fp32 [1, 1] / [N, 1] factor keeps the product in fp32 until the final cast.
    scale = grad_loss.reshape(1, 1) if grad_loss.dim() == 0 else grad_loss.unsqueeze(-1)
    return (grad * scale).to(grad.dtype)


def register_dfl_op(op) -> None:
    """Registers the fake kernel and autograd of a ``dfl_forward``-schema op."""
    torch.library.register_fake(op)(_fake_dfl_forward)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


if _library.EXTENSION_ERROR is None:
    register_dfl_op("stable_dfl::dfl_forward")
    torch.library.register_fake("stable_dfl::dfl_backward")(
        lambda grad, grad_loss: torch.empty_like(grad)
    )


def _triton_op():
    from . import triton_dfl

    return triton_dfl.dfl_forward_triton


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
    op = _triton_op() if backend == "triton" else torch.ops.stable_dfl.dfl_forward
    loss, _ = op(pred, target, weight, eps, reduce_sum, need_grad)
    return loss
