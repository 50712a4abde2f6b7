"""The GPU kernel report reads ptxas' register and spill counts right, and covers each Triton
variant the dispatcher can launch."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_kernel_report.py"
PTXAS_OUTPUT = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_dfl_forward_kernel' for 'sm_90a'
ptxas info    : Function properties for _dfl_forward_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 114 registers, used 1 barriers
ptxas info    : Compiling entry function '_Z6kernelI6__halfLi4EEvv' for 'sm_80'
ptxas info    : Function properties for _Z6kernelI6__halfLi4EEvv
    384 bytes stack frame, 256 bytes spill stores, 384 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 64 bytes smem
"""


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("gpu_kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_ptxas_output_is_read_per_entry_function(report):
    first, second = report.parse_ptxas(PTXAS_OUTPUT)
    assert first == dict(
        name="_dfl_forward_kernel",
        arch=90,
        registers=114,
        spill_stores=0,
        spill_loads=0,
        stack_bytes=0,
    )
    assert (second["arch"], second["registers"]) == (80, 255)
    assert (second["spill_stores"], second["spill_loads"], second["stack_bytes"]) == (256, 384, 384)


def test_cuda_kernel_dtypes_come_from_their_template_arguments(report):
    assert report.cuda_dtype("__half, 32, 4") == "fp16"
    assert report.cuda_dtype("__nv_bfloat16, 2, 1") == "bf16"
    assert report.cuda_dtype("double") == "fp64"
    assert report.cuda_dtype("float, 8, 1") == "fp32"


def test_every_triton_variant_the_dispatcher_picks_is_compiled(report):
    pytest.importorskip("triton")
    from stable_dfl.ops import triton_dfl

    variants = list(report.triton_variants())
    dfl = [v for v in variants if v[4] == "dfl_forward"]
    assert {v[6] for v in variants} == {"fp16", "bf16", "fp32", "fp64"}
    assert len(dfl) == 4 * 7 * 2  # dtypes x padded bin counts 2..128 x with/without gradient
    for _fn, _signature, constexprs, num_warps, _kernel, _variant, dtype in dfl:
        fp64 = dtype == "fp64"
        assert constexprs["BLOCK_ROWS"] == triton_dfl.gpu_block_rows(constexprs["BLOCK_BINS"], fp64)
        assert num_warps == triton_dfl.GPU_NUM_WARPS
