"""``python -m stable_dfl info``: versions, backends built and usable here, agreement check."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .loss import stable_dfl_loss
from .ops import _library
from .ops.reference import dfl_reference

AGREEMENT_TOLERANCE = {"loss": 1e-4, "grad": 1e-5}


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def agreement(
    backend: str, device: torch.device, n_rows: int = 2048, n_bins: int = 16
) -> dict[str, float]:
    """Max abs difference of loss and gradient between ``backend`` and the float64 reference."""
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(n_rows, n_bins, generator=generator) * 4
    target = torch.rand(n_rows, generator=generator) * (n_bins + 1) - 0.5
    weight = torch.rand(n_rows, generator=generator)
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


def run_info() -> int:
    print(f"stable_dfl {__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()})")
    print(
        f"torch      {torch.__version__} (CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()})"
    )
    triton_error = _library.triton_import_error()
    if triton_error is None:
        import triton

        print(f"triton     {triton.__version__}")
    else:
        print(f"triton     unavailable: {triton_error}")
    if _library.EXTENSION_ERROR is None:
        cuda_built = "with" if _library.compiled_cuda_available() else "without"
        print(f"extension  stable_dfl._C loaded, built {cuda_built} CUDA kernels")
    else:
        print(f"extension  not loaded: {_library.EXTENSION_ERROR}")
    print()
    healthy = True
    for device in _devices():
        for backend in _library.BACKENDS:
            reason = _library.unavailable_reason(backend, device)
            label = f"{backend:>9} on {device.type:<4}"
            if reason is not None:
                print(f"{label}  not usable: {reason}")
                continue
            errors = agreement(backend, device)
            ok = all(errors[k] <= AGREEMENT_TOLERANCE[k] for k in errors)
            healthy &= ok
            verdict = "OK" if ok else "DISAGREES"
            print(
                f"{label}  {verdict}: max |loss - ref| {errors['loss']:.2e}, max |grad - ref| {errors['grad']:.2e}"
            )
    return 0 if healthy else 1
