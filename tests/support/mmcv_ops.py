"""A test-only stand-in for ``mmcv._ext``, the compiled ops that mmcv-lite leaves out.

mmdetection 3.3 imports ``mmcv.ops`` (through ``mmdet.models``), and ``mmcv.ops`` loads its
compiled functions from ``mmcv._ext`` at import time. The tests need none of them: DFL, GFL's
head, its assigner and its other losses are plain torch. This module answers every lookup of a
compiled function with one that raises, naming the op, so a test that ever reaches a compiled
op fails loudly instead of computing something else.
"""

from __future__ import annotations

import sys
import types


class CompiledOpCalled(RuntimeError):
    """A compiled mmcv op was called: the stand-in has no implementation of it."""


class _StandInExtension(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def compiled_op(*args, **kwargs):
            raise CompiledOpCalled(
                f"mmcv._ext.{name} was called, but mmcv._ext here is the test stand-in of "
                "tests/support/mmcv_ops.py (mmcv-lite has no compiled ops)"
            )

        compiled_op.__name__ = name
        return compiled_op


def install() -> None:
    """Puts the stand-in in place of ``mmcv._ext`` unless a real one is importable."""
    try:
        import mmcv._ext  # noqa: F401  (a full mmcv build: use its ops)
    except ImportError:
        sys.modules["mmcv._ext"] = _StandInExtension("mmcv._ext")
