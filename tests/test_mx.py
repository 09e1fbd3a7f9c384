"""
Tests for L{smtpauth_relay.delivery.mx}: MX delivery against a scripted
resolver and scripted upstreams in memory, and once end to end over
loopback sockets with a real twisted.names server.
"""

from __future__ import annotations

import os
from random import Random
from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.delivery.client import RelayClient, RelayClientFactory
from smtpauth_relay.delivery.mx import (
    BAD_DOMAIN_REPLY,
    NO_ADDRESS_REPLY,
    NOT_FOUND_REPLY,
    NULL_MX_REPLY,
    MXDelivery,
    makeResolver,
    mergeReports,
    parseNameserver,
)
from smtpauth_relay.envelope import DeliveryReport, Envelope
from smtpauth_relay.interfaces import IDeliveryAgent
from smtpauth_relay.tls import generateSelfSigned, serverContextFactory
from tests.dnssupport import FakeResolver, serverFactory
from tests.fakeupstream import (
    FakeTLSContext,
    FakeUpstream,
    MemoryConnector,
    UpstreamScript,
)

HELO = "relay.example.org"


def envelope(*recipients: str, queueId: str = "Q1") -> Envelope:
    return Envelope(
        queueId=queueId,
        sender="alice@example.org",
        recipients=recipients or ("bob@example.net",),
    )


class MXTestCase(SynchronousTestCase):
    """
    An L{MXDelivery} on a L{Clock}, a L{FakeResolver}, and a scripted
    upstream per IP address (other addresses refuse connections).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.resolver = FakeResolver()
        self.connectors: dict[str, MemoryConnector] = {}
        self.connects: list[tuple[str, int]] = []

    def upstream(self, address: str) -> UpstreamScript:
        """
        A scripted upstream listening on C{address}.
        """
        script = UpstreamScript()
        self.connectors[address] = MemoryConnector(script)
        return script

    def connect(
        self, address: str, port: int, factory: RelayClientFactory
    ) -> Deferred[RelayClient]:
        self.connects.append((address, port))
        connector = self.connectors.get(address)
        if connector is None:
            return fail(ConnectionRefusedError())
        result: Deferred[RelayClient] = connector(factory)
        return result

    def agent(self, **kw: Any) -> MXDelivery:
        options: dict[str, Any] = dict(
            random=Random(0), connect=self.connect, tlsOptions=FakeTLSContext()
        )
        options.update(kw)
        return MXDelivery(self.clock, self.resolver, HELO, **options)

    def flush(self) -> None:
        """
        Move bytes between every client and upstream until all are quiet.
        """
        for _ in range(100000):
            progressed = False
            for connector in list(self.connectors.values()):
                for pump in list(connector.pumps):
                    if pump.pump():
                        progressed = True
            if not progressed:
                return

    def message(self) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"Subject: hi\n\nhello\n")
        return path

    def deliver(
        self, agent: MXDelivery, *recipients: str, queueId: str = "Q1"
    ) -> Deferred[DeliveryReport]:
        return agent.deliver(envelope(*recipients, queueId=queueId), self.message())

    def report(self, d: Deferred[DeliveryReport]) -> DeliveryReport:
        self.flush()
        return self.successResultOf(d)

    def simpleDomain(
        self, domain: str = "example.net", address: str = "192.0.2.10"
    ) -> UpstreamScript:
        """
        C{domain} with one MX, C{mx1.<domain>}, at C{address}.
        """
        self.resolver.mx(domain, (10, f"mx1.{domain}"))
        self.resolver.add(f"mx1.{domain}", dns.Record_A(address))
        return self.upstream(address)


class DeliveryTests(MXTestCase):
    def test_interface(self) -> None:
        """
        L{MXDelivery} provides L{IDeliveryAgent}.
        """
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent()))

    def test_delivered(self) -> None:
        """
        A message goes to the domain's mail exchanger on port 25: MAIL FROM,
        RCPT and the data, with our name in EHLO; the report names the mail
        exchanger.
        """
        script = self.simpleDomain()
        report = self.report(self.deliver(self.agent(), "bob@example.net"))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(report.host, "mx1.example.net")
        self.assertEqual(self.connects, [("192.0.2.10", 25)])
        self.assertEqual(script.commands[0], b"EHLO " + HELO.encode())
        (transaction,) = script.transactions
        self.assertEqual(transaction.recipients, [b"bob@example.net"])
        self.assertEqual(transaction.data, b"Subject: hi\r\n\r\nhello\r\n")

    def test_port(self) -> None:
        """
        Mail exchangers are connected to on the configured port.
        """
        self.simpleDomain()
        self.report(self.deliver(self.agent(port=2525)))
        self.assertEqual(self.connects, [("192.0.2.10", 2525)])

    def test_noRecipients(self) -> None:
        """
        An envelope without recipients gives an empty report and no lookup.
        """
        empty = Envelope(queueId="Q1", sender="alice@example.org", recipients=())
        report = self.successResultOf(self.agent().deliver(empty, "x"))
        self.assertEqual(report, DeliveryReport())
        self.assertEqual(self.resolver.queries, [])

    def test_recipientWithoutDomain(self) -> None:
        """
        A recipient without a domain fails permanently, without a lookup.
        """
        report = self.report(self.deliver(self.agent(), "postmaster"))
        self.assertEqual(report.failed, {"postmaster": BAD_DOMAIN_REPLY})
        self.assertEqual(self.resolver.queries, [])

    def test_smtpReplyIsFinal(self) -> None:
        """
        A reply to the transaction decides for the domain: a recipient
        refused (5xx) or deferred (4xx) by the first mail exchanger is not
        offered to the next one.
        """
        self.resolver.mx(
            "example.net", (10, "mx1.example.net"), (20, "mx2.example.net")
        )
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        self.resolver.add("mx2.example.net", dns.Record_A("192.0.2.2"))
        self.upstream("192.0.2.1")
        second = self.upstream("192.0.2.2")
        report = self.report(
            self.deliver(self.agent(), "reject@example.net", "tempfail@example.net")
        )
        self.assertEqual(
            report.failed, {"reject@example.net": "550 5.1.1 No such user"}
        )
        self.assertEqual(
            report.deferred, {"tempfail@example.net": "451 4.2.0 Try again later"}
        )
        self.assertEqual(second.connections, 0)


def manyExchangers(resolver: FakeResolver, domain: str, count: int) -> list[str]:
    """
    Give C{domain} C{count} mail exchangers of preference 10, 20, ... each
    with one address; return the addresses in preference order.
    """
    addresses = []
    for i in range(count):
        host = f"mx{i}.{domain}"
        resolver.mx(domain, ((i + 1) * 10, host))
        address = f"192.0.2.{100 + i}"
        resolver.add(host, dns.Record_A(address))
        addresses.append(address)
    return addresses


class ExchangerOrderTests(MXTestCase):
    def test_preferenceOrder(self) -> None:
        """
        Mail exchangers are tried by preference, lowest first, whatever the
        order of the records.
        """
        self.resolver.mx(
            "example.net",
            (30, "mx3.example.net"),
            (10, "mx1.example.net"),
            (20, "mx2.example.net"),
        )
        for i in (1, 2, 3):
            self.resolver.add(f"mx{i}.example.net", dns.Record_A(f"192.0.2.{i}"))
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(
            [address for address, _ in self.connects],
            ["192.0.2.1", "192.0.2.2", "192.0.2.3"],
        )
        self.assertEqual(list(report.deferred), ["bob@example.net"])

    def test_fallbackOnRefusal(self) -> None:
        """
        When the preferred mail exchanger refuses the connection, the next
        one gets the message, and the report names it.
        """
        self.resolver.mx(
            "example.net", (10, "mx1.example.net"), (20, "mx2.example.net")
        )
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        self.resolver.add("mx2.example.net", dns.Record_A("192.0.2.2"))
        script = self.upstream("192.0.2.2")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(report.host, "mx2.example.net")
        self.assertEqual(len(script.transactions), 1)

    def test_greetingRefusalTriesNextHost(self) -> None:
        """
        A mail exchanger greeting with 421 is a connection-level failure:
        the next one gets the message.
        """
        self.resolver.mx(
            "example.net", (10, "mx1.example.net"), (20, "mx2.example.net")
        )
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        self.resolver.add("mx2.example.net", dns.Record_A("192.0.2.2"))
        busy = self.upstream("192.0.2.1")
        busy.greeting = b"421 4.3.2 Too busy"
        script = self.upstream("192.0.2.2")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(busy.transactions, [])
        self.assertEqual(len(script.transactions), 1)

    def test_equalPreferenceShuffled(self) -> None:
        """
        Mail exchangers of equal preference are tried in an order drawn
        from the injected random generator (the same for the same seed,
        different across seeds), and always before those of a higher
        preference.
        """
        self.resolver.mx(
            "example.net",
            (10, "a.example.net"),
            (10, "b.example.net"),
            (10, "c.example.net"),
            (20, "d.example.net"),
        )
        addresses = {}
        for i, name in enumerate("abcd"):
            addresses[f"192.0.2.{i + 1}"] = name
            self.resolver.add(f"{name}.example.net", dns.Record_A(f"192.0.2.{i + 1}"))

        def order(seed: int) -> str:
            self.connects = []
            self.report(self.deliver(self.agent(random=Random(seed))))
            return "".join(addresses[address] for address, _ in self.connects)

        orders = {seed: order(seed) for seed in range(10)}
        for tried in orders.values():
            self.assertEqual(sorted(tried[:3]), ["a", "b", "c"])
            self.assertEqual(tried[3], "d")
        self.assertGreater(len(set(orders.values())), 1)
        self.assertEqual(order(3), orders[3])

    def test_duplicatesIgnored(self) -> None:
        """
        A mail exchanger listed twice (at any preference, in any case) is
        tried once.
        """
        self.resolver.mx(
            "example.net",
            (10, "mx1.example.net"),
            (20, "MX1.example.net"),
            (30, "mx1.example.net."),
        )
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        self.report(self.deliver(self.agent()))
        self.assertEqual(self.connects, [("192.0.2.1", 25)])

    def test_hostsCapped(self) -> None:
        """
        At most L{MXDelivery.maxHosts} mail exchangers are tried per
        attempt, so a domain with many cannot hold the message for long.
        """
        addresses = manyExchangers(self.resolver, "example.net", 8)
        agent = self.agent()
        report = self.report(self.deliver(agent))
        self.assertEqual(
            [address for address, _ in self.connects], addresses[: agent.maxHosts]
        )
        self.assertIn("bob@example.net", report.deferred)

    def test_malformedExchangerSkipped(self) -> None:
        """
        An MX record naming something that is not a host name is skipped.
        """
        self.resolver.mx(
            "example.net", (10, "bad name.example.net"), (20, "mx2.example.net")
        )
        self.resolver.add("mx2.example.net", dns.Record_A("192.0.2.2"))
        self.upstream("192.0.2.2")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertNotIn(("bad name.example.net", "A"), self.resolver.queries)

    def test_allRefusedDefersWithLastError(self) -> None:
        """
        When every mail exchanger fails at connection level, the domain's
        recipients are deferred with the last error.
        """
        self.resolver.mx(
            "example.net", (10, "mx1.example.net"), (20, "mx2.example.net")
        )
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        self.resolver.add("mx2.example.net", dns.Record_A("192.0.2.2"))
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ())
        self.assertEqual(report.failed, {})
        self.assertTrue(
            report.deferred["bob@example.net"].startswith(
                "mx2.example.net[192.0.2.2]: Connection was refused"
            ),
            report.deferred,
        )
        self.assertEqual(report.host, "mx2.example.net")


class DNSOutcomeTests(MXTestCase):
    def test_nullMX(self) -> None:
        """
        A null MX (RFC 7505) fails every recipient of the domain for good,
        without any connection or address lookup.
        """
        self.resolver.add("example.net", dns.Record_MX(0, b""))
        report = self.report(
            self.deliver(self.agent(), "bob@example.net", "carol@example.net")
        )
        self.assertEqual(
            report.failed,
            {"bob@example.net": NULL_MX_REPLY, "carol@example.net": NULL_MX_REPLY},
        )
        self.assertEqual(self.connects, [])
        self.assertEqual(self.resolver.queries, [("example.net", "MX")])

    def test_nullMXWithDot(self) -> None:
        """
        A null MX written with the root name "." is one too.
        """
        self.resolver.add("example.net", dns.Record_MX(0, b"."))
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.failed, {"bob@example.net": NULL_MX_REPLY})
        self.assertTrue(NULL_MX_REPLY.startswith("556 5.1.10 "))

    def test_nxdomain(self) -> None:
        """
        A domain that does not exist fails permanently.
        """
        report = self.report(self.deliver(self.agent(), "bob@nowhere.example"))
        self.assertEqual(report.failed, {"bob@nowhere.example": NOT_FOUND_REPLY})
        self.assertEqual(NOT_FOUND_REPLY, "550 5.1.2 domain not found")
        self.assertEqual(self.connects, [])

    def test_implicitMX(self) -> None:
        """
        A domain without MX records is its own mail exchanger: its A record
        is connected to.
        """
        self.resolver.add("example.net", dns.Record_A("192.0.2.7"))
        self.upstream("192.0.2.7")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(report.host, "example.net")
        self.assertEqual(self.connects, [("192.0.2.7", 25)])

    def test_implicitMXIPv6(self) -> None:
        """
        A domain without MX records but with an AAAA record gets the message
        over IPv6.
        """
        self.resolver.add("example.net", dns.Record_AAAA("2001:db8::7"))
        self.upstream("2001:db8::7")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(self.connects, [("2001:db8::7", 25)])

    def test_implicitMXWithoutAddress(self) -> None:
        """
        A domain with neither MX nor address records cannot take mail: a
        permanent failure.
        """
        self.resolver.exists("example.net")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.failed, {"bob@example.net": NO_ADDRESS_REPLY})

    def test_mxLookupServerFailure(self) -> None:
        """
        A failing DNS server (SERVFAIL) defers the domain's recipients.
        """
        self.resolver.fail("example.net", dns.MX, DNSServerError("SERVFAIL"))
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.failed, {})
        self.assertTrue(report.deferred["bob@example.net"].startswith("451 4.4.3 "))
        self.assertEqual(self.connects, [])

    def test_mxLookupTimeout(self) -> None:
        """
        A DNS timeout defers the domain's recipients.
        """
        self.resolver.fail("example.net", dns.MX, defer.TimeoutError())
        report = self.report(self.deliver(self.agent()))
        self.assertIn("bob@example.net", report.deferred)

    def test_implicitMXLookupFailure(self) -> None:
        """
        When the A and AAAA lookups of a domain without MX fail, the
        recipients are deferred, not failed.
        """
        self.resolver.exists("example.net")
        self.resolver.fail("example.net", dns.A, defer.TimeoutError())
        self.resolver.fail("example.net", dns.AAAA, defer.TimeoutError())
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.failed, {})
        self.assertTrue(report.deferred["bob@example.net"].startswith("451 4.4.3 "))

    def test_exchangerWithoutAddressSkipped(self) -> None:
        """
        A mail exchanger whose name does not resolve is skipped.
        """
        self.resolver.mx(
            "example.net", (10, "gone.example.net"), (20, "mx2.example.net")
        )
        self.resolver.add("mx2.example.net", dns.Record_A("192.0.2.2"))
        self.upstream("192.0.2.2")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(self.connects, [("192.0.2.2", 25)])

    def test_exchangerLookupFailureSkipped(self) -> None:
        """
        A mail exchanger whose addresses cannot be looked up is skipped;
        if no other is usable, the recipients are deferred with the lookup
        error.
        """
        self.resolver.mx("example.net", (10, "mx1.example.net"))
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        self.resolver.fail("mx1.example.net", dns.A, DNSServerError("SERVFAIL"))
        self.resolver.fail("mx1.example.net", dns.AAAA, DNSServerError("SERVFAIL"))
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(self.connects, [])
        self.assertIn("mx1.example.net", report.deferred["bob@example.net"])

    def test_unusableAddressesSkipped(self) -> None:
        """
        Unspecified and multicast addresses are never connected to.
        """
        self.resolver.mx("example.net", (10, "mx1.example.net"))
        self.resolver.add(
            "mx1.example.net",
            dns.Record_A("0.0.0.0"),
            dns.Record_A("224.0.0.1"),
            dns.Record_AAAA("::"),
            dns.Record_A("192.0.2.1"),
        )
        self.report(self.deliver(self.agent()))
        self.assertEqual(self.connects, [("192.0.2.1", 25)])


class AddressTests(MXTestCase):
    def test_ipv6Used(self) -> None:
        """
        A mail exchanger with only an AAAA record is reached over IPv6.
        """
        self.resolver.mx("example.net", (10, "mx1.example.net"))
        self.resolver.add("mx1.example.net", dns.Record_AAAA("2001:db8::25"))
        self.upstream("2001:db8::25")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(self.connects, [("2001:db8::25", 25)])

    def test_addressesInterleaved(self) -> None:
        """
        A mail exchanger's addresses are tried IPv6 first, then IPv4, in
        turn, until one takes the message.
        """
        self.resolver.mx("example.net", (10, "mx1.example.net"))
        self.resolver.add(
            "mx1.example.net",
            dns.Record_A("192.0.2.1"),
            dns.Record_A("192.0.2.2"),
            dns.Record_AAAA("2001:db8::1"),
            dns.Record_AAAA("2001:db8::2"),
        )
        self.upstream("192.0.2.2")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(
            [address for address, _ in self.connects],
            ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"],
        )
        self.assertIn(("mx1.example.net", "AAAA"), self.resolver.queries)
        self.assertIn(("mx1.example.net", "A"), self.resolver.queries)

    def test_addressLiteral(self) -> None:
        """
        An IPv4 address literal is connected to directly, without DNS.
        """
        self.upstream("192.0.2.9")
        report = self.report(self.deliver(self.agent(), "bob@[192.0.2.9]"))
        self.assertEqual(report.delivered, ("bob@[192.0.2.9]",))
        self.assertEqual(self.connects, [("192.0.2.9", 25)])
        self.assertEqual(self.resolver.queries, [])

    def test_ipv6AddressLiteral(self) -> None:
        """
        An IPv6 address literal is connected to directly, without DNS.
        """
        self.upstream("2001:db8::9")
        report = self.report(self.deliver(self.agent(), "bob@[IPv6:2001:DB8::9]"))
        self.assertEqual(report.delivered, ("bob@[IPv6:2001:DB8::9]",))
        self.assertEqual(self.connects, [("2001:db8::9", 25)])
        self.assertEqual(self.resolver.queries, [])

    def test_badAddressLiteral(self) -> None:
        """
        A bracketed domain that is no valid address literal fails
        permanently.
        """
        report = self.report(
            self.deliver(self.agent(), "bob@[999.0.0.1]", "carol@[x-tag:foo]")
        )
        self.assertEqual(
            report.failed,
            {
                "bob@[999.0.0.1]": BAD_DOMAIN_REPLY,
                "carol@[x-tag:foo]": BAD_DOMAIN_REPLY,
            },
        )
        self.assertEqual(self.connects, [])

    def test_tcpEndpoints(self) -> None:
        """
        By default an IPv6 address is connected to over TCP6 and an IPv4
        address over TCP4, with the connect timeout; a failed connection
        moves on to the next address.
        """
        reactor = MemoryReactorClock()
        self.resolver.mx("example.net", (10, "mx1.example.net"))
        self.resolver.add(
            "mx1.example.net",
            dns.Record_AAAA("2001:db8::25"),
            dns.Record_A("192.0.2.25"),
        )
        agent = MXDelivery(reactor, self.resolver, HELO, connectTimeout=7.0)
        d = self.deliver(agent)
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("2001:db8::25", 25, 7.0))
        factory.clientConnectionFailed(
            reactor.connectors[0], Failure(ConnectionRefusedError())
        )
        host, port, factory, timeout, _ = reactor.tcpClients[1]
        self.assertEqual((host, port, timeout), ("192.0.2.25", 25, 7.0))
        self.assertNoResult(d)


class DomainTests(MXTestCase):
    def test_oneTransactionPerDomain(self) -> None:
        """
        Recipients of two domains make two transactions, each with its own
        recipients, and one merged report naming both mail exchangers.
        """
        first = self.simpleDomain("example.net", "192.0.2.1")
        second = self.simpleDomain("example.com", "192.0.2.2")
        report = self.report(
            self.deliver(
                self.agent(),
                "bob@example.net",
                "carol@example.com",
                "dave@example.net",
            )
        )
        self.assertEqual(
            report.delivered,
            ("bob@example.net", "carol@example.com", "dave@example.net"),
        )
        self.assertEqual(report.host, "mx1.example.net, mx1.example.com")
        self.assertEqual(
            [t.recipients for t in first.transactions],
            [[b"bob@example.net", b"dave@example.net"]],
        )
        self.assertEqual(
            [t.recipients for t in second.transactions], [[b"carol@example.com"]]
        )

    def test_domainsCaseInsensitive(self) -> None:
        """
        Domains differing only in case are one destination; each recipient
        is sent as given.
        """
        script = self.simpleDomain()
        report = self.report(
            self.deliver(self.agent(), "bob@Example.NET", "carol@example.net")
        )
        self.assertEqual(report.delivered, ("bob@Example.NET", "carol@example.net"))
        self.assertEqual(
            [t.recipients for t in script.transactions],
            [[b"bob@Example.NET", b"carol@example.net"]],
        )

    def test_domainsInParallel(self) -> None:
        """
        A slow domain does not hold up another: its transaction completes
        while the first one's MX lookup is still pending.
        """
        slow = self.simpleDomain("example.net", "192.0.2.1")
        fast = self.simpleDomain("example.com", "192.0.2.2")
        release = self.resolver.hold("example.net", dns.MX)
        d = self.deliver(self.agent(), "bob@example.net", "carol@example.com")
        self.flush()
        self.assertEqual(len(fast.transactions), 1)
        self.assertEqual(slow.transactions, [])
        self.assertNoResult(d)
        release.callback(None)
        report = self.report(d)
        self.assertEqual(report.delivered, ("bob@example.net", "carol@example.com"))

    def test_mixedOutcomes(self) -> None:
        """
        The merged report keeps each domain's outcome: delivered, failed
        (NXDOMAIN) and deferred (DNS failure).
        """
        self.simpleDomain("example.net", "192.0.2.1")
        self.resolver.fail("example.org", dns.MX, DNSServerError("SERVFAIL"))
        report = self.report(
            self.deliver(
                self.agent(),
                "bob@example.net",
                "carol@nowhere.test",
                "dave@example.org",
            )
        )
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(report.failed, {"carol@nowhere.test": NOT_FOUND_REPLY})
        self.assertEqual(list(report.deferred), ["dave@example.org"])
        self.assertEqual(report.host, "mx1.example.net")

    def test_mergeReportsOrder(self) -> None:
        """
        Merged recipients follow the envelope's order, and each host is
        named once.
        """
        env = envelope("a@x.test", "b@y.test", "c@x.test", "d@y.test")
        merged = mergeReports(
            env,
            [
                DeliveryReport(delivered=("c@x.test", "a@x.test"), host="mx.x.test"),
                DeliveryReport(
                    delivered=("b@y.test",),
                    failed={"d@y.test": "550 no"},
                    host="mx.x.test",
                ),
            ],
        )
        self.assertEqual(merged.delivered, ("a@x.test", "b@y.test", "c@x.test"))
        self.assertEqual(merged.failed, {"d@y.test": "550 no"})
        self.assertEqual(merged.host, "mx.x.test")


class TLSTests(MXTestCase):
    def test_opportunisticTLS(self) -> None:
        """
        STARTTLS is used when the mail exchanger offers it.
        """
        script = self.simpleDomain()
        script.tls = True
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(script.commands[1], b"STARTTLS")
        self.assertEqual(script.connections, 1)

    def test_plainWithoutTLS(self) -> None:
        """
        A mail exchanger that does not offer STARTTLS gets the message in
        the clear.
        """
        script = self.simpleDomain()
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertNotIn(b"STARTTLS", script.commands)

    def test_defaultTLSOptionsUnverified(self) -> None:
        """
        Without injected options, STARTTLS uses unverified certificate
        options (mail exchangers' certificates are rarely valid for their
        MX name).
        """
        agent = MXDelivery(Clock(), self.resolver, HELO)
        self.assertFalse(agent.tlsOptions.verify)

    def test_tlsHandshakeFailureRetriedInClear(self) -> None:
        """
        When the TLS handshake fails, the same address is tried once more
        without STARTTLS, and takes the message.
        """
        script = self.simpleDomain()
        script.tls = True
        script.tlsAccepts = False
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(self.connects, [("192.0.2.10", 25)] * 2)
        self.assertEqual(script.connections, 2)
        self.assertEqual(script.commands.count(b"STARTTLS"), 1)
        self.assertEqual(len(script.transactions), 1)

    def test_startTLSRefusedRetriedInClear(self) -> None:
        """
        A mail exchanger that offers STARTTLS but refuses the command gets
        the message over a new connection without TLS.
        """
        script = self.simpleDomain()
        script.extensions.append(b"STARTTLS")
        report = self.report(self.deliver(self.agent()))
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.assertEqual(script.connections, 2)
        self.assertEqual(script.commands.count(b"STARTTLS"), 1)

    def test_otherFailureNotRetriedInClear(self) -> None:
        """
        A connection-level failure that is not about TLS is not retried on
        the same address.
        """
        script = self.simpleDomain()
        script.greeting = b"421 4.3.2 Too busy"
        report = self.report(self.deliver(self.agent()))
        self.assertIn("bob@example.net", report.deferred)
        self.assertEqual(script.connections, 1)


class PoolTests(MXTestCase):
    def test_connectionReusedAcrossDomains(self) -> None:
        """
        Domains whose mail exchangers share an address share its
        connections: a second message within the linger time reuses the
        first one's connection.
        """
        script = self.simpleDomain("example.net", "192.0.2.1")
        self.resolver.mx("example.com", (10, "mx.example.com"))
        self.resolver.add("mx.example.com", dns.Record_A("192.0.2.1"))
        agent = self.agent()
        self.report(self.deliver(agent, "bob@example.net"))
        report = self.report(self.deliver(agent, "carol@example.com", queueId="Q2"))
        self.assertEqual(report.host, "mx.example.com")
        self.assertEqual(script.connections, 1)
        self.assertEqual(len(script.transactions), 2)

    def test_connectionsPerAddressLimited(self) -> None:
        """
        At most C{maxPerDestination} connections are open to one address,
        however many messages go there at once.
        """
        script = self.simpleDomain()
        agent = self.agent(maxPerDestination=2)
        results = [
            self.deliver(agent, f"user{i}@example.net", queueId=f"Q{i}")
            for i in range(6)
        ]
        self.flush()
        for d in results:
            self.assertEqual(len(self.successResultOf(d).delivered), 1)
        self.assertEqual(script.connections, 2)
        self.assertEqual(len(script.transactions), 6)

    def test_idlePoolsDropped(self) -> None:
        """
        Once its connections have QUIT after the linger time, a pool is
        forgotten.
        """
        script = self.simpleDomain()
        agent = self.agent(linger=2.0)
        self.report(self.deliver(agent))
        self.assertEqual(len(agent.pools), 1)
        self.clock.advance(2)
        self.flush()
        self.assertEqual(script.commands[-1], b"QUIT")
        self.assertEqual(agent.pools, {})

    def test_failedPoolsDropped(self) -> None:
        """
        Pools of addresses that refused the connection are not kept.
        """
        self.resolver.mx("example.net", (10, "mx1.example.net"))
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        agent = self.agent()
        self.report(self.deliver(agent))
        self.assertEqual(agent.pools, {})

    def test_closeQuitsLingering(self) -> None:
        """
        L{MXDelivery.close} makes lingering connections QUIT at once, and
        fires when none is left.
        """
        script = self.simpleDomain()
        agent = self.agent(linger=60.0)
        self.report(self.deliver(agent))
        d = agent.close()
        self.assertNoResult(d)
        self.flush()
        self.successResultOf(d)
        self.assertEqual(script.commands[-1], b"QUIT")
        self.assertEqual(agent.pools, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeLetsMessagesFinish(self) -> None:
        """
        A message under way when L{MXDelivery.close} is called is still
        delivered; its connection then QUITs without lingering, and the
        close completes.
        """
        script = self.simpleDomain()
        agent = self.agent(linger=60.0)
        d = self.deliver(agent)
        closed = agent.close()
        self.assertNoResult(closed)
        report = self.report(d)
        self.assertEqual(report.delivered, ("bob@example.net",))
        self.successResultOf(closed)
        self.assertEqual(script.commands[-1], b"QUIT")

    def test_closeWithoutConnections(self) -> None:
        """
        With no connection open, L{MXDelivery.close} fires at once.
        """
        self.successResultOf(self.agent().close())

    def test_deadline(self) -> None:
        """
        A mail exchanger that never answers holds the domain no longer than
        the timeout; the next one is not tried after it, and the recipients
        are deferred.
        """
        self.resolver.mx(
            "example.net", (10, "mx1.example.net"), (20, "mx2.example.net")
        )
        self.resolver.add("mx1.example.net", dns.Record_A("192.0.2.1"))
        self.resolver.add("mx2.example.net", dns.Record_A("192.0.2.2"))
        self.upstream("192.0.2.1").silent = True
        second = self.upstream("192.0.2.2")
        d = self.deliver(self.agent(timeout=100.0))
        self.flush()
        self.assertNoResult(d)
        self.clock.advance(100)
        report = self.report(d)
        self.assertIn("within 100s", report.deferred["bob@example.net"])
        self.assertEqual(second.connections, 0)


class ResolverTests(SynchronousTestCase):
    def test_nameservers(self) -> None:
        """
        Nameservers are given as an address with an optional port, IPv6 in
        brackets when it has a port.
        """
        resolver: Any = makeResolver(
            MemoryReactorClock(), ("127.0.0.1:5353", "::1", "[::1]:5300", "192.0.2.53")
        )
        self.assertEqual(
            resolver.servers,
            [("127.0.0.1", 5353), ("::1", 53), ("::1", 5300), ("192.0.2.53", 53)],
        )

    def test_badNameservers(self) -> None:
        """
        A nameserver that is not an IP address, or has a bad port, is
        refused.
        """
        for value in ("ns.example.net", "127.0.0.1:0", "[::1]x", "[::1", "1.2.3.4:x"):
            self.assertRaises(ValueError, parseNameserver, value)

    def test_systemResolver(self) -> None:
        """
        Without nameservers, those of C{/etc/resolv.conf} are used.
        """
        reactor = MemoryReactorClock()
        resolver: Any = makeResolver(reactor, ())
        self.assertEqual(resolver.resolv, "/etc/resolv.conf")
        self.assertEqual(resolver.servers, [])


class TLSUpstream(FakeUpstream):
    """
    A L{FakeUpstream} that starts real TLS on STARTTLS.
    """

    def __init__(self, script: UpstreamScript, context: Any) -> None:
        FakeUpstream.__init__(self, script)
        self.context = context

    def lineReceived(self, line: bytes) -> None:
        if not self.inData and line.upper() == b"STARTTLS" and self.script.tls:
            self.script.commands.append(line)
            self.sendLine(b"220 2.0.0 Ready to start TLS")
            transport: Any = self.transport
            transport.startTLS(self.context)
            self.secure = True
            return
        FakeUpstream.lineReceived(self, line)


class LoopbackTests(TestCase):
    """
    MX delivery over real sockets on loopback: a twisted.names server
    answering from a L{FakeResolver}, and a scripted upstream SMTP server.
    """

    timeout = 30

    def setUp(self) -> None:
        from twisted.internet import reactor as globalReactor

        reactor: Any = globalReactor
        self.reactor = reactor
        self.records = FakeResolver()
        self.script = UpstreamScript()
        self.serverContext: Any = None
        protocol = dns.DNSDatagramProtocol(serverFactory(self.records))
        udp = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.dnsPort = udp.getHost().port
        smtpFactory: Any = Factory.forProtocol(
            lambda: TLSUpstream(self.script, self.serverContext)
        )
        tcp = reactor.listenTCP(0, smtpFactory, interface="127.0.0.1")
        self.addCleanup(tcp.stopListening)
        self.smtpPort = tcp.getHost().port
        self.records.mx("example.test", (10, "mx1.example.test"))
        self.records.add("mx1.example.test", dns.Record_A("127.0.0.1"))

    def useTLS(self, minimumVersion: str = "TLSv1.2") -> None:
        """
        Make the upstream offer STARTTLS with a self-signed certificate.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        cert = os.path.join(directory, "cert.pem")
        key = os.path.join(directory, "key.pem")
        generateSelfSigned(cert, key, "mx1.example.test")
        self.serverContext = serverContextFactory(cert, key, minimumVersion)
        self.script.tls = True

    async def deliver(self, *recipients: str, **kw: Any) -> DeliveryReport:
        resolver = makeResolver(self.reactor, (f"127.0.0.1:{self.dnsPort}",))
        agent = MXDelivery(
            self.reactor,
            resolver,
            "relay.test",
            port=self.smtpPort,
            allowLoopback=True,
            **kw,
        )
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"Subject: loopback\n\nhello over loopback\n")
        try:
            return await agent.deliver(envelope(*recipients), path)
        finally:
            await agent.close()

    def test_delivered(self) -> Deferred[None]:
        """
        The MX record and the mail exchanger's address come from a real DNS
        server; the message reaches the upstream SMTP server.
        """

        async def run() -> None:
            report = await self.deliver("bob@example.test")
            self.assertEqual(report.delivered, ("bob@example.test",))
            self.assertEqual(report.host, "mx1.example.test")
            (transaction,) = self.script.transactions
            self.assertEqual(transaction.recipients, [b"bob@example.test"])
            self.assertEqual(
                transaction.data, b"Subject: loopback\r\n\r\nhello over loopback\r\n"
            )
            self.assertEqual(self.script.commands[-1], b"QUIT")

        return Deferred.fromCoroutine(run())

    def test_startTLS(self) -> Deferred[None]:
        """
        An upstream offering STARTTLS with a self-signed certificate gets
        the message over TLS (unverified, as between MTAs), on one
        connection.
        """
        self.useTLS()

        async def run() -> None:
            report = await self.deliver("bob@example.test")
            self.assertEqual(report.delivered, ("bob@example.test",))
            self.assertEqual(self.script.commands[1], b"STARTTLS")
            self.assertTrue(self.script.commands[2].startswith(b"EHLO "))
            self.assertEqual(self.script.connections, 1)
            self.assertEqual(len(self.script.transactions), 1)

        return Deferred.fromCoroutine(run())

    def test_nxdomain(self) -> Deferred[None]:
        """
        The real resolver's NXDOMAIN answer is a permanent failure.
        """

        async def run() -> None:
            report = await self.deliver("bob@missing.test")
            self.assertEqual(report.failed, {"bob@missing.test": NOT_FOUND_REPLY})
            self.assertEqual(self.script.connections, 0)

        return Deferred.fromCoroutine(run())

    def test_tlsFailureRetriedInClear(self) -> Deferred[None]:
        """
        When the TLS handshake really fails (no common protocol version),
        the message goes over a second connection without TLS.
        """
        self.useTLS(minimumVersion="TLSv1.3")
        tlsOptions = ssl.CertificateOptions(
            verify=False, lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2
        )

        async def run() -> None:
            report = await self.deliver("bob@example.test", tlsOptions=tlsOptions)
            self.assertEqual(report.delivered, ("bob@example.test",))
            self.assertEqual(self.script.connections, 2)
            self.assertEqual(self.script.commands.count(b"STARTTLS"), 1)
            self.assertEqual(len(self.script.transactions), 1)

        return Deferred.fromCoroutine(run())


class LocalAddressTests(SynchronousTestCase):
    def test_loopbackRefused(self) -> None:
        """
        Mail is never delivered to loopback, link-local or reserved
        addresses (an MX or an address literal pointing there would loop or
        reach services on this host): nothing is connected, and an address
        literal fails permanently.
        """
        resolver = FakeResolver()
        resolver.mx("loop.example", (10, "mx.loop.example"))
        resolver.add("mx.loop.example", dns.Record_A("127.0.0.1"))
        connections: list[tuple[str, int]] = []

        def connect(ip: str, port: int, factory: Any) -> Any:
            connections.append((ip, port))
            raise AssertionError("no connection expected")

        agent = MXDelivery(Clock(), resolver, HELO, connect=connect)
        for recipient in ("b@[127.0.0.1]", "c@[169.254.1.1]"):
            d = agent.deliver(envelope(recipient), "/nonexistent")
            report = self.successResultOf(d)
            self.assertIn(recipient, report.failed, report)
        # An MX whose only addresses are local has no usable address: not
        # delivered (retried, then bounced at expiry like any dead domain).
        report = self.successResultOf(
            agent.deliver(envelope("a@loop.example"), "/nonexistent")
        )
        self.assertEqual(report.delivered, ())
        self.assertEqual(connections, [])
