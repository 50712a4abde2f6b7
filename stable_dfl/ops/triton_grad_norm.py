"""Triton kernels of the gradient sum of squares and non-finite check.

For GPUs without the compiled CUDA kernels; they also run in Triton's interpreter on
CPU tensors (TRITON_INTERPRET=1). Same contract as ``stable_dfl::grad_sumsq_nonfinite``
(see :mod:`.grad_norm`).

A Triton kernel cannot take a list of tensors, so each dtype group is addressed from one
base pointer (the group's first tensor) plus per-chunk element offsets: all tensors share
one address space and every tensor of a dtype is aligned to its element size, so the
offsets are exact. The work is cut into chunks of ``CHUNK_ELEMENTS`` that never cross a
tensor boundary; a few persistent programs per dtype reduce the chunks into their own
slots, so the number of launches depends on the number of dtypes (at most 4), never on
the number of tensors, and a single-program kernel adds the slots in a fixed order.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

CHUNK_ELEMENTS = 1 << 16
BLOCK = 4096
FINALIZE_BLOCK = 1024
CHUNK_NUM_WARPS = 8
FINALIZE_NUM_WARPS = 4
# Programs per SM of the chunk kernel; each loops over chunks.
PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another: a couple is enough.
INTERPRETER_PROGRAMS = 2


@triton.jit
def _chunk_sumsq_kernel(
    base_ptr,
    chunk_offset_ptr,
    chunk_length_ptr,
    chunk_tensor_ptr,
    n_chunks,
    inv_scale_ptr,
    partial_ptr,
    tensor_flag_ptr,
    UNSCALE: tl.constexpr,
    WRITE_BACK: tl.constexpr,
    OPMATH_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # GradScaler unscales in opmath (float64 for float64 gradients, else float32); the squares
    # are float64 whatever the dtype, so a finite gradient never overflows or underflows them.
    opmath = tl.float64 if OPMATH_FP64 else tl.float32
    if UNSCALE:
        inv_scale = tl.load(inv_scale_ptr).to(opmath)
    for chunk in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        start = tl.load(chunk_offset_ptr + chunk)
        length = tl.load(chunk_length_ptr + chunk)
        sumsq = tl.zeros([BLOCK], tl.float64)
        bad = tl.zeros([BLOCK], tl.int32)
        for offset in range(0, length, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            mask = index < length
            x = tl.load(base_ptr + start + index, mask=mask, other=0.0)
            if UNSCALE:
                # GradScaler's rounding: multiply in opmath, round once to the dtype.
                x = (x.to(opmath) * inv_scale).to(base_ptr.dtype.element_ty)
                if WRITE_BACK:
                    tl.store(base_ptr + start + index, x, mask=mask)
            x = x.to(tl.float64)
            sumsq += x * x
            # |x| < inf is false exactly for NaN and +-Inf (no libdevice isfinite needed).
            bad = tl.maximum(bad, (~(tl.abs(x) < float("inf"))).to(tl.int32))
        tl.store(partial_ptr + chunk, tl.sum(sumsq, axis=0))
        # int32 max is an OR that any number of chunks of one tensor can race on.
        tl.atomic_max(tensor_flag_ptr + tl.load(chunk_tensor_ptr + chunk), tl.max(bad, axis=0))


@triton.jit
def _finalize_kernel(
    partial_ptr,
    chunk_tensor_ptr,
    n_chunks,
    tensor_flag_ptr,
    n_tensors,
    sumsq_ptr,
    found_ptr,
    nonfinite_ptr,
    BLOCK: tl.constexpr,
):
    total = tl.zeros([BLOCK], tl.float64)
    for offset in range(0, n_chunks, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        mask = index < n_chunks
        partial = tl.load(partial_ptr + index, mask=mask, other=0.0)
        tensor = tl.load(chunk_tensor_ptr + index, mask=mask, other=0)
        tensor_bad = tl.load(tensor_flag_ptr + tensor, mask=mask, other=1)
        total += tl.where(tensor_bad == 0, partial, 0.0)
    any_bad = tl.zeros([BLOCK], tl.int32)
    for offset in range(0, n_tensors, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        mask = index < n_tensors
        flag = tl.load(tensor_flag_ptr + index, mask=mask, other=0)
        tl.store(nonfinite_ptr + index, (flag != 0).to(tl.uint8), mask=mask)
        any_bad = tl.maximum(any_bad, flag)
    sumsq = tl.sum(total, axis=0)
    found = (tl.max(any_bad, axis=0) > 0) | ~(sumsq < float("inf"))
    tl.store(sumsq_ptr, sumsq)
    tl.store(found_ptr, found.to(tl.float32))


def _program_count(n_chunks: int, device: torch.device) -> int:
    # Elsewhere (CPU tensors) the dispatcher only sends work under TRITON_INTERPRET=1.
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(n_chunks, PROGRAMS_PER_SM * sms)
    return min(n_chunks, INTERPRETER_PROGRAMS)


def grad_sumsq_nonfinite_triton(
    grads: list[torch.Tensor], inv_scale: torch.Tensor | None, write_back: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sumsq, found_nonfinite, nonfinite)`` of ``grads`` (dense, one device).

    With ``inv_scale``, values are unscaled first, and stored back when ``write_back``.
    """
    device = grads[0].device
    on_gpu = device.type == "cuda"
    if on_gpu and torch.cuda.is_current_stream_capturing():
        # A captured graph would replay the host-built chunk table of the capture, whatever
        # the gradients of the replay hold.
        raise RuntimeError(
            "the Triton gradient check cannot be captured in a CUDA graph (its chunk table is "
            "built on the host at each call); use backend='cuda' or run it outside the graph"
        )
    n_tensors = len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, grad in enumerate(grads):
        if grad.numel() > 0:
            by_dtype.setdefault(grad.dtype, []).append(index)

    # Chunk tables, grouped by dtype: element offset from the group's base, length, tensor.
    offsets: list[int] = []
    lengths: list[int] = []
    tensors: list[int] = []
    groups: list[tuple[torch.Tensor, int, int]] = []  # (base, first chunk, chunk count)
    for indices in by_dtype.values():
        base = grads[indices[0]]
        first_chunk = len(offsets)
        for index in indices:
            grad = grads[index]
            start = (grad.data_ptr() - base.data_ptr()) // grad.element_size()
            for begin in range(0, grad.numel(), CHUNK_ELEMENTS):
                offsets.append(start + begin)
                lengths.append(min(CHUNK_ELEMENTS, grad.numel() - begin))
                tensors.append(index)
        groups.append((base, first_chunk, len(offsets) - first_chunk))
    n_chunks = len(offsets)
    # One host-to-device copy for all tables, from pinned memory: asynchronous, no host sync.
    table = torch.tensor([offsets, lengths, tensors], dtype=torch.int64, pin_memory=on_gpu)
    table = table.to(device, non_blocking=True)
    chunk_offset, chunk_length, chunk_tensor = table[0], table[1], table[2]

    # Triton launches on the current device: make it the gradients' one.
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
        partial = torch.empty(n_chunks, dtype=torch.float64, device=device)
        tensor_flag = torch.zeros(n_tensors, dtype=torch.int32, device=device)
        for base, first_chunk, count in groups:
            chunks = slice(first_chunk, first_chunk + count)
            _chunk_sumsq_kernel[(_program_count(count, device),)](
                base,
                chunk_offset[chunks],
                chunk_length[chunks],
                chunk_tensor[chunks],
                count,
                inv_scale if inv_scale is not None else partial,  # unread unless UNSCALE
                partial[chunks],
                tensor_flag,
                UNSCALE=inv_scale is not None,
                WRITE_BACK=write_back,
                OPMATH_FP64=base.dtype == torch.float64,
                BLOCK=BLOCK,
                num_warps=CHUNK_NUM_WARPS,
            )

        sumsq = torch.empty((), dtype=torch.float64, device=device)
        found = torch.empty((), dtype=torch.float32, device=device)
        nonfinite = torch.empty(n_tensors, dtype=torch.uint8, device=device)
        _finalize_kernel[(1,)](
            partial,
            chunk_tensor,
            n_chunks,
            tensor_flag,
            n_tensors,
            sumsq,
            found,
            nonfinite,
            BLOCK=FINALIZE_BLOCK,
            num_warps=FINALIZE_NUM_WARPS,
        )
    return sumsq, found, nonfinite.view(torch.bool)
