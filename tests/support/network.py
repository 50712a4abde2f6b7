"""No network in the tests: every attempt to resolve or connect is refused and recorded."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def refuse_network(
    attempts: list, set_attribute: Callable[[Any, str, Any], None] = setattr
) -> None:
    """Replaces ``socket``'s resolve and connect calls (through ``set_attribute``:
    ``monkeypatch.setattr`` to undo it after a test, plain ``setattr`` in a process of its own)
    with ones that append ``(name, args)`` to ``attempts`` and raise OSError."""

    def refuse(name: str):
        def refused(*args, **kwargs):
            attempts.append((name, args))
            raise OSError(f"network access attempted in a test: {name}{args}")

        return refused

    set_attribute(socket, "getaddrinfo", refuse("getaddrinfo"))
    set_attribute(socket, "create_connection", refuse("create_connection"))
    set_attribute(socket.socket, "connect", refuse("connect"))
