"""pytest-benchmark settings of the benchmark suite (``pytest bench/ --benchmark-only``).

``--bench-quick`` times small sizes with few rounds: the smoke run of CI (with
``--benchmark-disable`` each case runs once, untimed). ``bench/`` is on ``sys.path`` (pytest
inserts the folder of a test module), so the modules import ``common`` and ``bench_dfl``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-quick", action="store_true", help="small sizes, few rounds (a smoke run)"
    )


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    return request.config.getoption("--bench-quick")
