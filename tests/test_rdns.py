"""
Tests for L{smtpauth_relay.rdns} and its use in the Received header.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.rdns import confirmedName
from tests.support import Harness, plain


class FakeResolver:
    """
    Answers PTR, A and AAAA lookups from dicts; records what was asked.
    """

    def __init__(
        self,
        ptr: dict[str, str],
        a: dict[str, list[str]],
        aaaa: dict[str, list[str]] | None = None,
    ) -> None:
        self.ptr = ptr
        self.a = a
        self.aaaa = aaaa or {}
        self.asked: list[str] = []
        self.pending: list[Deferred[Any]] | None = None

    def _answer(self, name: str, records: list[Any]) -> Deferred[Any]:
        self.asked.append(name)
        answers = [dns.RRHeader(name=name, type=r.TYPE, payload=r) for r in records]
        if self.pending is not None:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d.addCallback(lambda _: (answers, [], []))
        if not answers:
            return fail(DNSNameError(name))
        return succeed((answers, [], []))

    def lookupPointer(self, name: str, timeout: Any = None) -> Deferred[Any]:
        target = self.ptr.get(name)
        return self._answer(name, [dns.Record_PTR(target)] if target else [])

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, [dns.Record_A(a) for a in self.a.get(name, [])])

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, [dns.Record_AAAA(a) for a in self.aaaa.get(name, [])])


class ConfirmedNameTests(SynchronousTestCase):
    def test_confirmed(self) -> None:
        """
        A PTR name that resolves back to the address is returned.
        """
        resolver = FakeResolver(
            {"10.2.0.192.in-addr.arpa": "pc1.office.example"},
            {"pc1.office.example": ["192.0.2.10"]},
        )
        self.assertEqual(
            self.successResultOf(confirmedName(resolver, "192.0.2.10")),
            "pc1.office.example",
        )

    def test_notConfirmed(self) -> None:
        """
        A PTR name that does not resolve back to the address is not used.
        """
        resolver = FakeResolver(
            {"10.2.0.192.in-addr.arpa": "bank.example"},
            {"bank.example": ["198.51.100.1"]},
        )
        self.assertIsNone(self.successResultOf(confirmedName(resolver, "192.0.2.10")))

    def test_unsafeNameRefused(self) -> None:
        """
        A PTR name with octets outside host-name syntax (CR, LF, spaces) is
        never used, even when it resolves back: it would inject header lines.
        """
        evil = "x\r\nX-Injected: yes.evil.example"
        resolver = FakeResolver(
            {"10.2.0.192.in-addr.arpa": evil}, {evil: ["192.0.2.10"]}
        )
        self.assertIsNone(self.successResultOf(confirmedName(resolver, "192.0.2.10")))
        self.assertEqual(resolver.asked, ["10.2.0.192.in-addr.arpa"])

    def test_ipv6(self) -> None:
        """
        IPv6 clients are confirmed with AAAA records.
        """
        ptr = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        resolver = FakeResolver(
            {ptr: "v6.office.example"}, {}, {"v6.office.example": ["2001:db8::1"]}
        )
        self.assertEqual(
            self.successResultOf(confirmedName(resolver, "2001:db8::1")),
            "v6.office.example",
        )

    def test_lookupFailure(self) -> None:
        """
        A failed lookup gives C{None}, not an error.
        """
        resolver = FakeResolver({}, {})
        self.assertIsNone(self.successResultOf(confirmedName(resolver, "192.0.2.10")))

    def test_notAnIPAddress(self) -> None:
        """
        A UNIX socket peer has no reverse name and nothing is looked up.
        """
        resolver = FakeResolver({}, {})
        self.assertIsNone(self.successResultOf(confirmedName(resolver, "/run/x.sock")))
        self.assertEqual(resolver.asked, [])


class ReceivedHeaderTests(SynchronousTestCase):
    def submit(self, resolver: FakeResolver) -> bytes:
        harness = Harness()
        harness.factory.resolver = resolver
        session = harness.connect()
        session.startTLS()
        session.command(b"EHLO client.example")
        session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        session.command(b"MAIL FROM:<alice@example.org>")
        session.command(b"RCPT TO:<bob@example.net>")
        session.command(b"DATA")
        session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        return harness.spool.messageBytes("Q0001").split(b"\n")[0]

    def test_nameInReceived(self) -> None:
        """
        With reverse DNS on, the confirmed name precedes the IP literal.
        """
        resolver = FakeResolver(
            {"10.2.0.192.in-addr.arpa": "pc1.office.example"},
            {"pc1.office.example": ["192.0.2.10"]},
        )
        self.assertEqual(
            self.submit(resolver),
            b"Received: from client.example (pc1.office.example [192.0.2.10])",
        )

    def test_unknownInReceived(self) -> None:
        """
        Without a confirmed name the header says C{unknown}, as Postfix does.
        """
        self.assertEqual(
            self.submit(FakeResolver({}, {})),
            b"Received: from client.example (unknown [192.0.2.10])",
        )

    def test_greetingNotDelayed(self) -> None:
        """
        The greeting does not wait for a slow DNS answer.
        """
        resolver = FakeResolver({}, {})
        resolver.pending = []
        harness = Harness()
        harness.factory.resolver = resolver
        session = harness.connect()
        self.assertTrue(session.greeting[0].startswith(b"220 "))
        self.assertEqual(len(resolver.pending), 1)
