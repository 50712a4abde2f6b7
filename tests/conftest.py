"""Test setup: Triton kernels run in Triton's interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, hence here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks ``cpu_kernel`` every test parametrized with ``backend='cpu'``: with the modules
    and tests marked by hand, these are what scripts/run_tests.sh runs again under each lower
    SIMD level (ATEN_CPU_CAPABILITY) of the compiled CPU kernels."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "cpu":
            item.add_marker(pytest.mark.cpu_kernel)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_cpu_thread():
    """One intra-op thread: on a small shared machine, OpenMP threads of tiny convolutions
    spin against each other and a tiny training run takes seconds instead of a fraction."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
