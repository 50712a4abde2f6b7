"""Fused DFL in Triton: the kernel behind ``stable_dfl::dfl_forward_triton`` (:mod:`.dfl`), for
CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``).

One program handles a block of rows. Each row is padded to a power of two of bins
with masking; logits are loaded in their dtype and the math runs in fp32 (fp64 for
fp64 logits), mirroring ``csrc/dfl_row.h`` step for step, poison term included.
A reduced loss is a per-program fp64 partial sum followed by a fixed-order sum of the
partials: no atomics, so the result has the same bits on every run.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .backends import triton_interpreter_enabled
from .reference import TARGET_MARGIN, compute_dtype

# Elements of logits per program on a GPU: enough rows per program for a memory-bound
# kernel, few enough registers per thread at GPU_NUM_WARPS that nothing spills (fp64 holds
# twice the registers per element: half the elements). scripts/gpu_kernel_report.py compiles
# every variant for sm_80/sm_90 and checks.
_GPU_BLOCK_ELEMENTS = 2048
_GPU_BLOCK_ELEMENTS_FP64 = 1024
GPU_NUM_WARPS = 4
# The interpreter costs milliseconds per program whatever its size: few, large programs.
_INTERPRETER_BLOCK_ELEMENTS = 16384


@triton.jit
def _dfl_forward_kernel(
    pred_ptr,
    target_ptr,
    weight_ptr,
    row_loss_ptr,
    partial_sum_ptr,
    grad_ptr,
    n_rows,
    rows_per_weight,
    n_bins,
    stride_row,
    stride_bin,
    log_eps: tl.float64,
    upper_limit: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    REDUCE_SUM: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
):
    program = tl.program_id(0)
    rows = program.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bins = tl.arange(0, BLOCK_BINS)
    row_in = rows < n_rows
    bin_in = bins < n_bins
    tile_in = row_in[:, None] & bin_in[None, :]

    # Rows past n_rows read 0 logits and target 0, so their (discarded) math stays finite.
    offsets = rows[:, None] * stride_row + bins[None, :] * stride_bin
    x = tl.load(pred_ptr + offsets, mask=tile_in, other=0.0).to(COMPUTE_DTYPE)
    target = tl.load(target_ptr + rows, mask=row_in, other=0.0).to(COMPUTE_DTYPE)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + rows // rows_per_weight, mask=row_in, other=0.0).to(
            COMPUTE_DTYPE
        )
    else:
        weight = tl.full([BLOCK_ROWS], 1.0, COMPUTE_DTYPE)

    # two_hot: fmax/fmin semantics, so a NaN target clamps to 0 (reported by the poison term).
    t = tl.where(target >= 0.0, target, 0.0)
    # Adding the fp64 scalars to a zero vector rounds them once to COMPUTE_DTYPE, as the
    # C++ kernels' static_cast does (and works on the interpreter's plain Python floats).
    upper = (tl.zeros([BLOCK_ROWS], COMPUTE_DTYPE) + upper_limit).to(COMPUTE_DTYPE)
    t = tl.where(t <= upper, t, upper)
    left = tl.floor(t)
    w_left = (left + 1.0) - t
    w_right = t - left
    left_bin = left.to(tl.int32)
    is_left = bins[None, :] == left_bin[:, None]
    is_right = bins[None, :] == (left_bin + 1)[:, None]

    row_max = tl.max(tl.where(bin_in[None, :], x, -float("inf")), axis=1)
    shifted = x - row_max[:, None]
    exp_x = tl.exp(tl.where(bin_in[None, :], shifted, -float("inf")))
    # sum_j (x_j - x_j): 0 for a finite row, NaN as soon as a logit is NaN or +-Inf.
    nonfinite = tl.where(bin_in[None, :], x - x, 0.0)
    sum_exp = tl.sum(exp_x + nonfinite, axis=1)
    x_left = tl.sum(tl.where(is_left, shifted, 0.0), axis=1)
    x_right = tl.sum(tl.where(is_right, shifted, 0.0), axis=1)

    # finish_row
    log_sum = tl.log(sum_exp)
    poison = (log_sum - log_sum) + (target - target) + (weight - weight)
    logp_left = x_left - log_sum
    logp_right = x_right - log_sum
    eps_floor = (tl.zeros([BLOCK_ROWS], COMPUTE_DTYPE) + log_eps).to(COMPUTE_DTYPE)
    # torch.clamp(p, min=eps) passes the gradient where p >= eps and blocks it below;
    # the clamped value follows fmax (a NaN log-probability becomes the floor).
    left_active = logp_left >= eps_floor
    right_active = logp_right >= eps_floor
    active_left = tl.where(left_active, w_left, 0.0)
    active_right = tl.where(right_active, w_right, 0.0)
    clamped_left = tl.where(left_active, logp_left, eps_floor)
    clamped_right = tl.where(right_active, logp_right, eps_floor)
    # A target on a bin (w_right == 0) adds exactly 0, even at eps == 0 with a log of -inf.
    right_term = tl.where(w_right > 0.0, w_right * clamped_right, 0.0)
    loss = weight * -(w_left * clamped_left + right_term) + poison

    if REDUCE_SUM:
        block_sum = tl.sum(tl.where(row_in, loss, 0.0).to(tl.float64), axis=0)
        tl.store(partial_sum_ptr + program, block_sum)
    else:
        tl.store(row_loss_ptr + rows, loss, mask=row_in)

    if NEED_GRAD:
        grad_scale = weight * (active_left + active_right) / sum_exp + poison
        grad_left = weight * active_left
        grad_right = weight * active_right
        grad = (
            exp_x * grad_scale[:, None]
            - tl.where(is_left, grad_left[:, None], 0.0)
            - tl.where(is_right, grad_right[:, None], 0.0)
        )
        grad_offsets = rows[:, None] * n_bins + bins[None, :]
        tl.store(grad_ptr + grad_offsets, grad.to(grad_ptr.dtype.element_ty), mask=tile_in)


def gpu_block_rows(block_bins: int, fp64: bool) -> int:
    """Rows per program on a GPU; independent of N, so each bin count and dtype compiles one
    kernel."""
    return (_GPU_BLOCK_ELEMENTS_FP64 if fp64 else _GPU_BLOCK_ELEMENTS) // block_bins


def _block_rows(block_bins: int, fp64: bool) -> int:
    if triton_interpreter_enabled():
        return _INTERPRETER_BLOCK_ELEMENTS // block_bins
    return gpu_block_rows(block_bins, fp64)


def run_dfl_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    reduce_sum: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stable_dfl::dfl_forward`` in Triton: same arguments, same results (csrc/ops.cpp).

    The arguments are checked by the op that calls it (``stable_dfl::dfl_forward_triton``).
    """
    n_rows, n_bins = pred.shape
    dtype = compute_dtype(pred.dtype)
    target = target.to(dtype).contiguous()
    weight = None if weight is None else weight.to(dtype).contiguous()
    # Triton's interpreter casts fp32 to bf16 by truncation where GPUs round to nearest: there
    # the kernel writes an fp32 gradient and torch rounds it.
    round_in_torch = need_grad and pred.dtype == torch.bfloat16 and not pred.is_cuda
    grad_dtype = torch.float32 if round_in_torch else pred.dtype
    grad = pred.new_empty(pred.shape if need_grad else (0,), dtype=grad_dtype)
    if n_rows == 0:
        loss = pred.new_zeros((), dtype=dtype) if reduce_sum else pred.new_empty((0,), dtype=dtype)
        return loss, grad.to(pred.dtype)

    block_bins = triton.next_power_of_2(n_bins)
    block_rows = _block_rows(block_bins, dtype == torch.float64)
    n_programs = triton.cdiv(n_rows, block_rows)
    row_loss = pred.new_empty((0,) if reduce_sum else (n_rows,), dtype=dtype)
    partial_sums = pred.new_empty((n_programs,) if reduce_sum else (0,), dtype=torch.float64)
    device_guard = torch.cuda.device(pred.device) if pred.is_cuda else contextlib.nullcontext()
    with device_guard:
        _dfl_forward_kernel[(n_programs,)](
            pred,
            target,
            target if weight is None else weight,  # never read without HAS_WEIGHT
            row_loss,
            partial_sums,
            grad,
            n_rows,
            1 if weight is None else n_rows // weight.shape[0],
            n_bins,
            pred.stride(0),
            pred.stride(1),
            math.log(eps) if eps > 0 else -math.inf,
            float(n_bins - 1) - TARGET_MARGIN,
            HAS_WEIGHT=weight is not None,
            REDUCE_SUM=reduce_sum,
            NEED_GRAD=need_grad,
            COMPUTE_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
            BLOCK_ROWS=block_rows,
            BLOCK_BINS=block_bins,
            num_warps=GPU_NUM_WARPS,
        )
    loss = partial_sums.sum().to(dtype) if reduce_sum else row_loss
    return loss, grad.to(pred.dtype)
