"""``python -m stable_dfl info``: versions, backends built and usable here, agreement check."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .backend_checks import agreement, agrees, backend_availability
from .ops import _library


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
    for availability in backend_availability():
        label = f"{availability.backend:>9} on {availability.device:<4}"
        if not availability.usable:
            print(f"{label}  not usable: {availability.reason}")
            continue
        errors = agreement(availability.backend, torch.device(availability.device))
        ok = agrees(errors)
        healthy &= ok
        verdict = "OK" if ok else "DISAGREES"
        print(
            f"{label}  {verdict}: max |loss - ref| {errors['loss']:.2e}, max |grad - ref| {errors['grad']:.2e}"
        )
    return 0 if healthy else 1
