"""Test setup: Triton kernels run in Triton's interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, hence here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
