"""The eager reference keeps the autograd and numeric contract of every backend."""

from __future__ import annotations

import pytest

from ..support.autograd_contract_suite import *  # noqa: F403  (the shared tests, run here with the fixtures below)


@pytest.fixture
def backend() -> str:
    return "reference"


@pytest.fixture
def device() -> str:
    return "cpu"
