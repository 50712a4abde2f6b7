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
