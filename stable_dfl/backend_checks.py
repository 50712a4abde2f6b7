"""Which DFL backends run here, and whether they agree with the float64 reference.

Shared by ``python -m stable_dfl info`` and ``python -m stable_dfl doctor``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import torch

from . import __version__
from .loss import stable_dfl_loss
from .ops import backends
from .ops.reference import dfl_reference

#: Max abs difference from the float64 reference that counts as agreement (fp32 kernels).
AGREEMENT_TOLERANCE = {"loss": 1e-4, "grad": 1e-5}
#: Input sets: ``random`` (logits ~ N(0, 4^2), the usual range) and ``extreme`` (logits up
#: to +-1e4, so the probability floor is active, and targets on and beyond the edge bins).
INPUT_KINDS = ("random", "extreme")


@dataclass(frozen=True)
class BackendAvailability:
    backend: str
    device: str
    reason: str | None
    """Why it cannot run here; None when usable."""

    @property
    def usable(self) -> bool:
        return self.reason is None


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    return found


def backend_availability() -> list[BackendAvailability]:
    return [
        BackendAvailability(backend, device.type, backends.unavailable_reason(backend, device))
        for device in devices()
        for backend in backends.BACKENDS
    ]


def _inputs(kind: str, n_rows: int, n_bins: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(n_rows, n_bins, generator=generator) * 4
    target = torch.rand(n_rows, generator=generator) * (n_bins + 1) - 0.5
    weight = torch.rand(n_rows, generator=generator)
    if kind == "extreme":
        pred = torch.sign(pred) * 1e4 * torch.rand(n_rows, n_bins, generator=generator)
        edges = torch.tensor([0.0, n_bins - 1.01, -3.0, n_bins + 5.0])
        target[: 4 * (n_rows // 8)] = edges.repeat(n_rows // 8)
    elif kind != "random":
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    return pred, target, weight


def agreement(
    backend: str,
    device: torch.device,
    kind: str = "random",
    n_rows: int = 2048,
    n_bins: int = 16,
) -> dict[str, float]:
    """Max abs difference of per-element loss and gradient between ``backend`` and the
    float64 reference, on the ``kind`` input set."""
    pred, target, weight = _inputs(kind, n_rows, n_bins)
    x = pred.to(device, copy=True).requires_grad_()
    loss = stable_dfl_loss(
        x, target.to(device), weight.to(device), n_bins=n_bins, reduction="none", backend=backend
    )
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = pred.double().requires_grad_()
    ref = dfl_reference(x64, target.double(), weight.double())
    ref.sum().backward()
    return {
        "loss": (loss.detach().cpu().double() - ref.detach()).abs().max().item(),
        "grad": (grad.cpu().double() - x64.grad).abs().max().item(),
    }


def agrees(errors: dict[str, float]) -> bool:
    return all(errors[key] <= AGREEMENT_TOLERANCE[key] for key in AGREEMENT_TOLERANCE)


def installation() -> dict[str, Any]:
    """Versions, the compiled extension and the CPU kernel levels, as ``info`` and ``doctor``
    report them (JSON-ready)."""
    triton_error = backends.triton_import_error()
    triton_version = None
    if triton_error is None:
        import triton

        triton_version = triton.__version__
    return {
        "versions": {
            "stable_dfl": __version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": triton_version,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "gpu": torch.cuda.is_available(),
        "extension": {
            "loaded": backends.extension_error() is None,
            "error": backends.extension_error(),
            "with_cuda": backends.compiled_available("cuda"),
        },
        "triton_error": triton_error,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernel_isa": backends.cpu_kernel_isa(),
        "cpu_kernel_isas": list(backends.cpu_kernel_isas()),
        "cpu_block_cache": cpu_block_cache_limit(),
    }


def cpu_block_cache_limit() -> dict[str, Any]:
    """The CPU op's block cache limit (``limit_bytes``; None without the extension), or
    ``error``: why the environment's STABLE_DFL_CPU_CACHE_MB is refused."""
    try:
        info = backends.cpu_block_cache_info()
    except ValueError as error:
        return {"limit_bytes": None, "error": str(error)}
    return {"limit_bytes": None if info is None else info["limit_bytes"], "error": None}


def cpu_block_cache_line(summary: dict[str, Any]) -> str:
    """'up to 512 MiB of released gradient blocks kept for reuse (...)', or what is wrong."""
    cache = summary["cpu_block_cache"]
    if cache["error"] is not None:
        return f"refused: {cache['error']}"
    if cache["limit_bytes"] is None:
        return "none (the compiled extension is not loaded)"
    return (
        f"up to {cache['limit_bytes'] / 2**20:g} MiB of released gradient blocks kept for reuse "
        "(STABLE_DFL_CPU_CACHE_MB sets it; 0 keeps none)"
    )


def cpu_kernel_line(summary: dict[str, Any]) -> str:
    """'avx2 (built: default, avx2, avx512; ATen capability AVX2)', or why there is none."""
    if summary["cpu_kernel_isa"] is None:
        return "none (the compiled extension is not loaded)"
    built = ", ".join(summary["cpu_kernel_isas"])
    return (
        f"{summary['cpu_kernel_isa']} (built: {built}; ATen capability "
        f"{summary['aten_cpu_capability']}, ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers it)"
    )
