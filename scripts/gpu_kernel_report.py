"""Compiles every GPU kernel for real GPU targets, without a GPU, and reports registers and spills.

- Triton: each kernel variant the dispatcher can pick (``stable_dfl.ops.triton_dfl``: every
  dtype, every padded bin count 2-128, with and without the gradient; ``triton_grad_norm``: every
  dtype and unscale mode, and the finalize kernel) through ``triton.compile`` for each target,
  then Triton's own ``ptxas -v`` on the PTX it produced.
- CUDA C++: ``nvcc -Xptxas -v`` on ``csrc/dfl_kernels.cu`` and ``csrc/grad_norm_kernels.cu``.

Writes ``--out`` (default ``bench/results/gpu_kernels``) ``.json`` and ``.md``. Exits 1 when a
kernel for fp16, bf16 or fp32 spills (fp64 spills are reported, not fatal); 2 when a compiler
is missing. Usage: ``python scripts/gpu_kernel_report.py [--archs 80 90] [--out STEM]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = ("dfl_kernels.cu", "grad_norm_kernels.cu")
FATAL_DTYPES = ("fp16", "bf16", "fp32")
#: ptxas -v, per entry function: its name, then its registers and spills.
ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\d+)a?'")
SPILLS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
REGISTERS = re.compile(r"Used (?P<registers>\d+) registers")
#: The dtype of a CUDA kernel, from its demangled template arguments.
CUDA_DTYPES = (("__half", "fp16"), ("__nv_bfloat16", "bf16"), ("double", "fp64"), ("float", "fp32"))


@dataclass
class KernelReport:
    source: str  # "triton" or "cuda"
    kernel: str
    variant: str
    dtype: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int

    @classmethod
    def of(cls, entry: dict, source: str, kernel: str, variant: str, dtype: str) -> KernelReport:
        """The report of one entry function of :func:`parse_ptxas`."""
        return cls(
            source,
            kernel,
            variant,
            dtype,
            entry["arch"],
            entry["registers"],
            entry["spill_stores"],
            entry["spill_loads"],
            entry["stack_bytes"],
        )

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(text: str) -> list[dict]:
    """Per entry function in ``ptxas -v`` output: name, arch, registers, spills, stack."""
    found = []
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", text):
        entry = ENTRY.search(block)
        if entry is None:
            continue
        registers, spills = REGISTERS.search(block), SPILLS.search(block)
        found.append(
            {
                "name": entry["name"],
                "arch": int(entry["arch"]),
                "registers": int(registers["registers"]) if registers else 0,
                "spill_stores": int(spills["stores"]) if spills else 0,
                "spill_loads": int(spills["loads"]) if spills else 0,
                "stack_bytes": int(spills["stack"]) if spills else 0,
            }
        )
    return found


def triton_variants():
    """(kernel function, signature, constexprs, num_warps, kernel name, variant, dtype) of
    every Triton kernel variant the dispatcher can launch on a GPU."""
    import triton.language as tl

    from stable_dfl.ops import triton_dfl, triton_grad_norm

    pointer = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        compute = "fp64" if dtype == "fp64" else "fp32"
        for block_bins in (2, 4, 8, 16, 32, 64, 128):
            for need_grad in (False, True):
                signature = {
                    "pred_ptr": pointer[dtype],
                    "target_ptr": pointer[compute],
                    "weight_ptr": pointer[compute],
                    "row_loss_ptr": pointer[compute],
                    "partial_sum_ptr": "*fp64",
                    "grad_ptr": pointer[dtype],
                    "n_rows": "i64",
                    "rows_per_weight": "i32",
                    "n_bins": "i32",
                    "stride_row": "i64",
                    "stride_bin": "i64",
                    "log_eps": "fp64",
                    "upper_limit": "fp64",
                }
                constexprs = {
                    "HAS_WEIGHT": True,
                    "REDUCE_SUM": True,
                    "NEED_GRAD": need_grad,
                    "COMPUTE_DTYPE": tl.float64 if dtype == "fp64" else tl.float32,
                    "BLOCK_ROWS": triton_dfl.gpu_block_rows(block_bins, dtype == "fp64"),
                    "BLOCK_BINS": block_bins,
                }
                variant = f"bins<={block_bins}, {'fwd+grad' if need_grad else 'fwd'}"
                yield (
                    triton_dfl._dfl_forward_kernel,
                    signature,
                    constexprs,
                    triton_dfl.GPU_NUM_WARPS,
                    "dfl_forward",
                    variant,
                    dtype,
                )
        for unscale, write_back in ((False, False), (True, False), (True, True)):
            signature = {
                "base_ptr": pointer[dtype],
                "chunk_offset_ptr": "*i64",
                "chunk_length_ptr": "*i64",
                "chunk_tensor_ptr": "*i64",
                "n_chunks": "i32",
                "inv_scale_ptr": "*fp32",
                "partial_ptr": "*fp64",
                "tensor_flag_ptr": "*i32",
            }
            constexprs = {
                "UNSCALE": unscale,
                "WRITE_BACK": write_back,
                "OPMATH_FP64": dtype == "fp64",
                "BLOCK": triton_grad_norm.BLOCK,
            }
            mode = "write back" if write_back else ("unscale" if unscale else "measure")
            yield (
                triton_grad_norm._chunk_sumsq_kernel,
                signature,
                constexprs,
                triton_grad_norm.CHUNK_NUM_WARPS,
                "grad_chunk_sumsq",
                mode,
                dtype,
            )
    signature = {
        "partial_ptr": "*fp64",
        "chunk_tensor_ptr": "*i64",
        "n_chunks": "i32",
        "tensor_flag_ptr": "*i32",
        "n_tensors": "i32",
        "sumsq_ptr": "*fp64",
        "found_ptr": "*fp32",
        "nonfinite_ptr": "*u8",
    }
    yield (
        triton_grad_norm._finalize_kernel,
        signature,
        {"BLOCK": triton_grad_norm.FINALIZE_BLOCK},
        triton_grad_norm.FINALIZE_NUM_WARPS,
        "grad_finalize",
        "all",
        "fp64",
    )


def triton_reports(archs: list[int]) -> list[KernelReport]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    reports = []
    with tempfile.TemporaryDirectory() as scratch:
        ptx_path = Path(scratch) / "kernel.ptx"
        for fn, signature, constexprs, num_warps, kernel, variant, dtype in triton_variants():
            for arch in archs:
                compiled = triton.compile(
                    ASTSource(
                        fn, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs
                    ),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": num_warps},
                )
                ptx_path.write_text(compiled.asm["ptx"])
                out = subprocess.run(
                    [
                        get_ptxas(arch).path,
                        "-v",
                        f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                        str(ptx_path),
                        "-o",
                        os.devnull,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                (entry,) = parse_ptxas(out.stdout + out.stderr)
                reports.append(KernelReport.of(entry, "triton", kernel, variant, dtype))
    return reports


def cuda_dtype(demangled: str) -> str:
    for needle, dtype in CUDA_DTYPES:
        if re.search(rf"\b{needle}\b", demangled):
            return dtype
    return "any"


def cuda_reports(archs: list[int], nvcc: str) -> list[KernelReport]:
    reports = []
    for source in CUDA_SOURCES:
        for arch in archs:
            out = subprocess.run(
                [
                    nvcc,
                    f"-arch=sm_{arch}",
                    "-O3",
                    "-std=c++17",
                    "-Xptxas",
                    "-v",
                    "-c",
                    str(ROOT / "csrc" / source),
                    "-I",
                    str(ROOT / "csrc"),
                    "-o",
                    os.devnull,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            entries = parse_ptxas(out.stdout + out.stderr)
            names = demangle([e["name"] for e in entries])
            for entry, name in zip(entries, names, strict=True):
                head = name.replace("(anonymous namespace)::", "").split("(")[0]
                kernel = head.split("<")[0].split("::")[-1]
                template = head[head.find("<") + 1 : head.rfind(">")] if "<" in head else ""
                reports.append(
                    KernelReport.of(entry, "cuda", kernel, template, cuda_dtype(template))
                )
    return reports


def demangle(names: list[str]) -> list[str]:
    """C++ names of mangled kernel symbols (binutils' c++filt reads nvcc's Itanium names)."""
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def markdown(reports: list[KernelReport]) -> str:
    lines = [
        "| source | kernel | variant | dtype | sm | registers | spill stores / loads (bytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        spill = f"**{r.spill_stores} / {r.spill_loads}**" if r.spills else "0 / 0"
        lines.append(
            f"| {r.source} | {r.kernel} | {r.variant} | {r.dtype} | {r.arch} | {r.registers} "
            f"| {spill} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_kernels")
    args = parser.parse_args()
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        print("error: nvcc not found (CUDA_HOME/bin or PATH)", file=sys.stderr)
        return 2
    reports = triton_reports(args.archs) + cuda_reports(args.archs, nvcc)
    args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in reports], indent=1))
    spilling = [r for r in reports if r.spills]
    summary = (
        f"{len(reports)} kernel variants compiled for sm_{', sm_'.join(map(str, args.archs))}; "
        f"max registers {max(r.registers for r in reports)}; "
        f"{len(spilling)} spill ({', '.join(sorted({f'{r.kernel} {r.dtype}' for r in spilling}))})"
        if spilling
        else f"{len(reports)} kernel variants compiled for sm_{', sm_'.join(map(str, args.archs))}; "
        f"max registers {max(r.registers for r in reports)}; none spills"
    )
    args.out.with_suffix(".md").write_text(summary + "\n\n" + markdown(reports) + "\n")
    print(summary)
    fatal = [r for r in spilling if r.dtype in FATAL_DTYPES]
    for r in fatal:
        print(
            f"error: {r.source} {r.kernel} ({r.variant}, {r.dtype}, sm_{r.arch}) spills "
            f"{r.spill_stores} B stores / {r.spill_loads} B loads",
            file=sys.stderr,
        )
    return 1 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
