"""The DFL ops: their definitions, fakes, autograd and batching rules, and the dispatch.

Two ops share one schema, ``(pred, target, weight?, eps, reduce_sum, need_grad) ->
(loss, grad)``: ``stable_dfl::dfl_forward`` (C++/CUDA kernels registered by
``stable_dfl._C``) and ``stable_dfl::dfl_forward_triton`` (defined here, its kernel in
:mod:`.triton_dfl`). Each computes, in one pass over the logits, each row's loss (or their
deterministic sum) and, with ``need_grad``, the gradient of the (weighted) sum. The forward
of a loss asks for no gradient; its backward calls the same kernel again with the incoming
gradient folded into the weights (:func:`dfl_grad`), so nothing gradient-sized is kept
between the two and ``retain_graph=True``, ``gradcheck`` and Jacobians can run backward
through the same graph any number of times.
"""

from __future__ import annotations

import inspect

import torch

from . import backends
from .reference import MAX_BINS, compute_dtype, dfl_reference, dfl_reference_grad, row_scale

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
    n_rows = pred.shape[0]
    torch._check_value(
        target.dim() == 1 and target.shape[0] == n_rows,
        lambda: f"{op_name}: target must be [N] with N = {n_rows}, got {tuple(target.shape)}",
    )
    _check_row_values(op_name, "target", target, pred)
    if weight is not None:
        torch._check_value(
            weight.dim() == 1
            and (n_rows % weight.shape[0] == 0 if weight.shape[0] > 0 else n_rows == 0),
            lambda: (
                f"{op_name}: weight must be [G] with G dividing N = {n_rows} (a weight per "
                f"row, or per group of N / G consecutive rows), got {tuple(weight.shape)}"
            ),
        )
        _check_row_values(op_name, "weight", weight, pred)
    torch._check_value(0.0 <= eps < 1.0, lambda: f"{op_name}: eps must be in [0, 1), got {eps}")


def _check_row_values(op_name: str, name: str, value: torch.Tensor, pred: torch.Tensor) -> None:
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


def dfl_grad(
    op: torch._ops.OpOverloadPacket,
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    grad_loss: torch.Tensor,
) -> torch.Tensor:
    """The gradient of ``sum(row_losses * grad_loss)`` with respect to ``pred`` (``grad_loss``
    0-dim or ``[N]``), by the kernel ``op`` that computed the forward.

    A row's gradient is linear in its weight, so the kernel computes it with ``weight *
    grad_loss`` as the weights: in fp32 (fp64 for fp64 logits) and rounded once to pred's
    dtype, reading the logits again rather than a gradient buffer kept since the forward
    (one gradient-sized allocation per forward + backward). Where the gradient must itself be
    differentiable (``create_graph=True``, ``torch.func`` transforms), the closed form of the
    reference computes it instead.
    """
    if torch.is_grad_enabled() or _is_functorch_tensor(grad_loss):
        return dfl_reference_grad(pred, target, weight, eps, grad_loss)
    dtype = compute_dtype(pred.dtype)
    if grad_loss.dim() == 0:
        # One factor for every row: the weights stay as given (per row or per group of rows),
        # and no weight is the factor alone, one weight for all rows.
        factor = grad_loss.to(dtype)
        row_weight = factor.reshape(1) if weight is None else weight.to(dtype) * factor
    else:
        row_weight = row_scale(grad_loss, weight, target, dtype)
    _, grad = op(pred, target, row_weight.contiguous(), eps, True, True)
    return grad


def _is_functorch_tensor(tensor: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _op_autograd(op_name: str):
    """setup_context and backward of an op called directly (``torch.ops.stable_dfl.*``)."""
    op = getattr(torch.ops.stable_dfl, op_name.removeprefix("stable_dfl::"))

    def setup_context(ctx, inputs, output):
        pred, target, weight, eps, _, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(pred, target, weight)
        ctx.eps = eps

    def backward(ctx, grad_loss, _grad_of_grad):
        if grad_loss is None:  # the loss did not reach the output being differentiated
            return None, None, None, None, None, None
        pred, target, weight = ctx.saved_tensors
        return dfl_grad(op, pred, target, weight, ctx.eps, grad_loss), None, None, None, None, None

    return setup_context, backward


class DFLRows(torch.autograd.Function):
    """The loss of rows on a kernel backend, as one autograd node that ``torch.func`` can
    transform: ``grad``/``vjp`` through :func:`dfl_grad`, ``jvp``/``jacfwd`` through
    :meth:`jvp`, ``vmap`` through the ops' batching rules. Gradients flow to pred only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pred, target, weight, eps, reduce_sum, backend):
        loss, _ = backends.op(backend, backends.DFL_FORWARD)(
            pred, target, weight, eps, reduce_sum, False
        )
        return loss

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target, weight, eps, reduce_sum, backend = inputs
        ctx.save_for_backward(pred, target, weight)
        ctx.save_for_forward(pred, target, weight)
        ctx.eps, ctx.reduce_sum, ctx.backend = eps, reduce_sum, backend

    @staticmethod
    def backward(ctx, grad_loss):
        pred, target, weight = ctx.saved_tensors
        op = backends.op(ctx.backend, backends.DFL_FORWARD)
        return dfl_grad(op, pred, target, weight, ctx.eps, grad_loss), None, None, None, None, None

    @staticmethod
    def jvp(ctx, pred_tangent, *_constant_tangents):
        pred, target, weight = ctx.saved_tensors
        ones = torch.ones(target.shape, dtype=compute_dtype(pred.dtype), device=pred.device)
        row_grad = dfl_reference_grad(pred, target, weight, ctx.eps, ones)
        dtype = compute_dtype(pred.dtype)
        row_tangent = (row_grad.to(dtype) * pred_tangent.to(dtype)).sum(-1)
        return row_tangent.sum() if ctx.reduce_sum else row_tangent


# autograd.Function.apply binds its arguments to forward's signature with inspect.signature on
# every call (setup_context is separate from forward), which computes the signature anew each
# time unless the function carries one: computed once here, it saves about 20 us per call.
DFLRows.forward.__signature__ = inspect.signature(DFLRows.forward)


def _batched_dfl_forward(op_name: str):
    """The vmap rule of a ``dfl_forward``-schema op: the batch is flattened into rows."""
    op = getattr(torch.ops.stable_dfl, op_name.removeprefix("stable_dfl::"))

    def rule(info, in_dims, pred, target, weight, eps, reduce_sum, need_grad):
        size = info.batch_size

        def batch_first(value, dim):
            if value is None:
                return None
            return value.movedim(dim, 0) if dim is not None else value.expand(size, *value.shape)

        pred = batch_first(pred, in_dims[0])
        target = batch_first(target, in_dims[1])
        weight = batch_first(weight, in_dims[2])
        n_rows, n_bins = pred.shape[1:]
        rows = pred.reshape(size * n_rows, n_bins)
        flat_weight = None if weight is None else weight.reshape(-1)
        loss, grad = op(rows, target.reshape(-1), flat_weight, eps, False, need_grad)
        loss = loss.reshape(size, n_rows)
        if reduce_sum:
            loss = loss.sum(-1)
        grad = grad.reshape(size, n_rows, n_bins) if need_grad else grad.new_empty(size, 0)
        return (loss, grad), (0, 0)

    return rule


def _register(op_name: str) -> None:
    torch.library.register_fake(op_name)(_fake_dfl_forward(op_name))
    setup_context, backward = _op_autograd(op_name)
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    torch.library.register_vmap(op_name, _batched_dfl_forward(op_name))


_register("stable_dfl::dfl_forward_triton")
if backends.extension_error() is None:
    _register("stable_dfl::dfl_forward")


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
    in fp32 (fp64 for fp64 logits). Differentiable with respect to ``pred`` only, to any
    order and under ``torch.func`` transforms.
    """
    if backend == "reference":
        # Gradients flow to pred only, as from the kernels: target and weight are constants
        # of the loss (ultralytics and mmdetection detach them too).
        constant_weight = None if weight is None else weight.detach()
        loss = dfl_reference(pred, target.detach(), constant_weight, eps)
        return loss.sum() if reduce_sum else loss
    target = target.detach()
    weight = None if weight is None else weight.detach()
    if torch.compiler.is_compiling():
        # Dynamo cannot trace a custom jvp: compiled code calls the op, whose own autograd
        # (the same dfl_grad) it traces instead.
        op = backends.op(backend, backends.DFL_FORWARD)
        return op(pred, target, weight, eps, reduce_sum, False)[0]
    return DFLRows.apply(pred, target, weight, eps, reduce_sum, backend)
