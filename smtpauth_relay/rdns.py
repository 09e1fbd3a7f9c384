"""
Forward-confirmed reverse DNS of clients, for the C{Received} header
(C{[server] reverse_dns}, off by default).

A PTR name counts only when it resolves back to the client's address, so a
client cannot make the header claim any name it likes by controlling its own
reverse zone.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.names import dns

from smtpauth_relay.policy import clientAddress

log = Logger()

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

LOOKUP_TIMEOUT = (2, 3)
"""Seconds for each try of each lookup (Twisted's resolver convention)."""


async def _confirmedName(resolver: Any, host: str) -> str | None:
    address = clientAddress(host)
    if address is None:
        return None
    answers, _, _ = await resolver.lookupPointer(
        address.reverse_pointer, timeout=LOOKUP_TIMEOUT
    )
    # DNS labels may hold any octet (CR, LF, parentheses): only a name that
    # is a plain host name may reach the Received header.
    names = [
        name
        for name in (
            str(rr.payload.name) for rr in answers if rr.type == dns.PTR and rr.payload
        )
        if _HOSTNAME.fullmatch(name.rstrip("."))
    ]
    for name in names[:3]:
        if address.version == 4:
            forward, _, _ = await resolver.lookupAddress(name, timeout=LOOKUP_TIMEOUT)
            wanted = dns.A
        else:
            forward, _, _ = await resolver.lookupIPV6Address(
                name, timeout=LOOKUP_TIMEOUT
            )
            wanted = dns.AAAA
        for rr in forward:
            if (
                rr.type == wanted
                and ipaddress.ip_address(rr.payload.address) == address
            ):
                return name.rstrip(".")
    return None


def confirmedName(resolver: Any, host: str) -> Deferred[str | None]:
    """
    The forward-confirmed PTR name of C{host}, or C{None} when there is none
    or a lookup fails (never an error: the header then says C{unknown}).
    """

    def failed(failure: Any) -> None:
        log.debug(
            "reverse DNS of {host} failed: {error}",
            host=host,
            error=failure.getErrorMessage(),
        )
        return None

    return Deferred.fromCoroutine(_confirmedName(resolver, host)).addErrback(failed)
