"""
A scripted DNS resolver for MX delivery tests, usable directly (unit tests)
or behind a real twisted.names server on loopback (end-to-end tests).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.names import common, dns
from twisted.names.error import DNSNameError
from twisted.names.server import DNSServerFactory

TYPE_NAMES = {dns.MX: "MX", dns.A: "A", dns.AAAA: "AAAA"}


def _key(name: str | bytes) -> bytes:
    if isinstance(name, str):
        name = name.encode("idna")
    return name.lower().rstrip(b".")


class FakeResolver(common.ResolverBase):
    """
    An L{IResolver} answering from records added by the test.

    A name with no record at all does not exist (NXDOMAIN, L{DNSNameError});
    a name with records of other types only answers with no records (the
    DNS "NODATA"); L{exists} makes a name exist without records.  L{fail}
    and L{hold} script failures and answers the test fires itself.

    @ivar queries: C{(name, type name)} of each lookup, in order.
    """

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self.records: dict[bytes, list[Any]] = {}
        self.errors: dict[tuple[bytes, int], BaseException] = {}
        self.held: dict[tuple[bytes, int], Deferred[Any]] = {}
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, *payloads: Any) -> None:
        """
        Give C{name} these records (L{dns.Record_MX}, L{dns.Record_A}, ...).
        """
        self.records.setdefault(_key(name), []).extend(payloads)

    def mx(self, domain: str, *exchangers: tuple[int, str]) -> None:
        """
        Give C{domain} MX records: C{(preference, host)} each.
        """
        self.add(domain, *(dns.Record_MX(p, h.encode()) for p, h in exchangers))

    def exists(self, name: str) -> None:
        """
        Make C{name} exist, with no records.
        """
        self.records.setdefault(_key(name), [])

    def fail(self, name: str, type: int, error: BaseException) -> None:
        """
        Make lookups of C{type} for C{name} fail with C{error}.
        """
        self.errors[(_key(name), type)] = error

    def hold(self, name: str, type: int) -> Deferred[Any]:
        """
        Make the next lookup of C{type} for C{name} wait for the returned
        L{Deferred}; fire it with C{None} to let the lookup answer from the
        records.
        """
        d: Deferred[Any] = Deferred()
        self.held[(_key(name), type)] = d
        return d

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: Any
    ) -> Deferred[tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]]:
        key = _key(name)
        self.queries.append((key.decode("ascii"), TYPE_NAMES.get(type, str(type))))
        held = self.held.pop((key, type), None)
        if held is not None:
            return held.addCallback(lambda _: self._answer(name, key, cls, type))
        return self._answer(name, key, cls, type)

    def _answer(
        self, name: bytes, key: bytes, cls: int, type: int
    ) -> Deferred[tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]]:
        if (key, type) in self.errors:
            return fail(self.errors[(key, type)])
        if key not in self.records:
            return fail(DNSNameError(name))
        answers = [
            dns.RRHeader(name, p.TYPE, cls, 60, p, auth=True)
            for p in self.records[key]
            if p.TYPE == type
        ]
        return succeed((answers, [], []))


def serverFactory(resolver: FakeResolver) -> DNSServerFactory:
    """
    A twisted.names server answering from C{resolver}, as an authority
    (NXDOMAIN for unknown names).
    """
    return DNSServerFactory(authorities=[resolver])
