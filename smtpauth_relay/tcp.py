"""
TCP options the relay sets on its connections.
"""

from __future__ import annotations

from typing import Any


def noDelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on C{transport}'s TCP connection, under any
    TLS or PROXY protocol layers.  SMTP is a dialogue of small writes: with
    Nagle and the peer's delayed ACK, each reply or DATA tail can wait up to
    40 ms for an acknowledgement that is itself waiting.
    """
    for _ in range(4):
        if transport is None:
            return
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)
