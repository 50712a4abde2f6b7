"""``python -m stable_dfl info [--json]``: versions, the CPU kernel level, the backends built and
usable here, and their agreement with the float64 reference."""

from __future__ import annotations

import argparse
import json

import torch

from .backend_checks import (
    agreement,
    agrees,
    backend_availability,
    cpu_block_cache_line,
    cpu_kernel_line,
    installation,
)


def _backend_rows() -> list[dict]:
    rows = []
    for availability in backend_availability():
        row = {
            "backend": availability.backend,
            "device": availability.device,
            "usable": availability.usable,
            "reason": availability.reason,
            "agreement": None,
        }
        if availability.usable:
            errors = agreement(availability.backend, torch.device(availability.device))
            row["agreement"] = {
                "max_loss_error": errors["loss"],
                "max_grad_error": errors["grad"],
                "ok": agrees(errors),
            }
        rows.append(row)
    return rows


def run_info(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stable_dfl info",
        description="Versions, the CPU kernel level in use, the backends usable here and "
        "their agreement with the float64 reference. Exit 1 if a usable backend disagrees.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    summary = installation()
    backends = _backend_rows()
    ok = all(row["agreement"]["ok"] for row in backends if row["usable"])
    if args.json:
        print(json.dumps({**summary, "backends": backends, "ok": ok}, indent=2))
        return 0 if ok else 1

    versions = summary["versions"]
    print(f"stable_dfl {versions['stable_dfl']}")
    print(f"python     {versions['python']} ({versions['machine']})")
    print(f"torch      {versions['torch']} (CUDA {versions['torch_cuda']}, GPU: {summary['gpu']})")
    if versions["triton"] is not None:
        print(f"triton     {versions['triton']}")
    else:
        print(f"triton     unavailable: {summary['triton_error']}")
    extension = summary["extension"]
    if extension["loaded"]:
        cuda_built = "with" if extension["with_cuda"] else "without"
        print(f"extension  stable_dfl._C loaded, built {cuda_built} CUDA kernels")
    else:
        print(f"extension  not loaded: {extension['error']}")
    print(f"cpu kernel {cpu_kernel_line(summary)}")
    print(f"cpu cache  {cpu_block_cache_line(summary)}")
    print()
    for row in backends:
        label = f"{row['backend']:>9} on {row['device']:<4}"
        if not row["usable"]:
            print(f"{label}  not usable: {row['reason']}")
            continue
        result = row["agreement"]
        verdict = "OK" if result["ok"] else "DISAGREES"
        print(
            f"{label}  {verdict}: max |loss - ref| {result['max_loss_error']:.2e}, "
            f"max |grad - ref| {result['max_grad_error']:.2e}"
        )
    return 0 if ok else 1
