"""
Tests for L{smtpauth_relay.proxyprotocol}: the header parser, the wrapper
driven with string transports and a clock, and the relay's session behind
it (its EHLO, policy, limits, lockout, Received header, STARTTLS, and an
implicit-TLS listener with a real TLS handshake in memory).
"""

from __future__ import annotations

import ipaddress
import os
import struct
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import (
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay.config import LimitsConfig, LockoutConfig
from smtpauth_relay.proxyprotocol import (
    V1_MAX_LENGTH,
    V2_MAX_ADDRESS_LENGTH,
    V2_SIGNATURE,
    InvalidProxyHeader,
    ProxyHeader,
    ProxyProtocolFactory,
    ProxyProtocolWrapper,
    parseProxyHeader,
)
from smtpauth_relay.server import RelayESMTP, tlsInfo
from smtpauth_relay.testing import TLSStringTransport
from smtpauth_relay.tls import generateSelfSigned, serverContextFactory
from tests.support import Harness, Session, plain

PROXY = IPv4Address("TCP", "10.0.0.5", 51000)
"""The proxy's own end of the connection."""
LISTENER = IPv4Address("TCP", "10.0.0.1", 2587)
"""The relay's end of the connection from the proxy."""
TRUSTED = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64"))
CLIENT = "203.0.113.9"


def v1(
    protocol: str = "TCP4",
    source: str = CLIENT,
    destination: str = "192.0.2.1",
    sourcePort: object = 40000,
    destinationPort: object = 587,
) -> bytes:
    """
    A version 1 header.
    """
    return (
        f"PROXY {protocol} {source} {destination} {sourcePort} {destinationPort}\r\n"
    ).encode()


def v2(
    command: int = 1,
    family: int = 0x11,
    source: str = CLIENT,
    destination: str = "192.0.2.1",
    sourcePort: int = 40000,
    destinationPort: int = 587,
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    """
    A version 2 header; C{family} 0x11 and 0x21 get addresses, others none.
    """
    if family in (0x11, 0x21):
        addresses = (
            ipaddress.ip_address(source).packed
            + ipaddress.ip_address(destination).packed
            + struct.pack("!HH", sourcePort, destinationPort)
        )
    else:
        addresses = b""
    body = addresses + tlvs
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family])
        + struct.pack("!H", len(body))
        + body
    )


# -- the parser -----------------------------------------------------------------


class ParseV1Tests(SynchronousTestCase):
    def test_tcp4(self) -> None:
        """
        A C{TCP4} header gives the client's and the destination's IPv4
        addresses and ports, and its length.
        """
        header = v1()
        self.assertEqual(
            parseProxyHeader(header + b"EHLO x\r\n"),
            ProxyHeader(
                1,
                len(header),
                IPv4Address("TCP", CLIENT, 40000),
                IPv4Address("TCP", "192.0.2.1", 587),
            ),
        )

    def test_tcp6(self) -> None:
        """
        A C{TCP6} header gives IPv6 addresses, in canonical form.
        """
        parsed = parseProxyHeader(v1("TCP6", "2001:DB8:0::9", "2001:db8::1"))
        assert parsed is not None
        self.assertEqual(parsed.source, IPv6Address("TCP", "2001:db8::9", 40000))
        self.assertEqual(parsed.destination, IPv6Address("TCP", "2001:db8::1", 587))

    def test_ipv4Mapped(self) -> None:
        """
        An IPv4-mapped client address (a dual-stack proxy's view of an IPv4
        client) becomes the IPv4 address.
        """
        parsed = parseProxyHeader(v1("TCP6", "::ffff:203.0.113.9", "2001:db8::1"))
        assert parsed is not None
        self.assertEqual(parsed.source, IPv4Address("TCP", CLIENT, 40000))

    def test_unknown(self) -> None:
        """
        C{UNKNOWN}, with or without the rest of the line, names no address.
        """
        for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
            self.assertEqual(parseProxyHeader(line), ProxyHeader(1, len(line)))

    def test_incomplete(self) -> None:
        """
        Every proper prefix of a header asks for more.
        """
        header = v1("TCP6", "2001:db8::9", "2001:db8::1")
        for end in range(len(header)):
            self.assertIsNone(parseProxyHeader(header[:end]), header[:end])

    def test_longestAccepted(self) -> None:
        """
        The longest header the specification allows (107 octets, an
        C{UNKNOWN} one with the longest addresses) is read.
        """
        address = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        header = v1("UNKNOWN", address, address, 65535, 65535)
        self.assertEqual(len(header), V1_MAX_LENGTH)
        self.assertEqual(parseProxyHeader(header), ProxyHeader(1, V1_MAX_LENGTH))

    def assertInvalid(self, data: bytes, reason: str) -> None:
        error = self.assertRaises(InvalidProxyHeader, parseProxyHeader, data)
        self.assertIn(reason, str(error))

    def test_notProxy(self) -> None:
        """
        Data that is not a PROXY header is refused from its first wrong
        octet, without waiting for more.
        """
        for data in (b"EHLO client\r\n", b"G", b"PROXZ", b"proxy ", b"PROXY\r\n"):
            self.assertInvalid(data, "not a PROXY header")

    def test_tooLong(self) -> None:
        """
        No CRLF within 107 octets closes, whatever follows.
        """
        self.assertInvalid(b"PROXY UNKNOWN " + b"x" * 93, "no CRLF in the first 107")
        self.assertIsNone(parseProxyHeader(b"PROXY UNKNOWN " + b"x" * 92))

    def test_bareLF(self) -> None:
        """
        A header must end with CRLF, not LF alone.
        """
        self.assertInvalid(b"PROXY UNKNOWN\n", "not ended by CRLF")

    def test_badPorts(self) -> None:
        """
        Ports are decimal 0-65535 without sign or leading zero.
        """
        for port in ("65536", "-1", "+1", "0080", "", "x", "1 ", "99999999"):
            self.assertInvalid(v1(sourcePort=port), "")
        for port in ("0", "1", "65535"):
            self.assertIsNotNone(parseProxyHeader(v1(destinationPort=port)))

    def test_badAddresses(self) -> None:
        """
        Addresses must be of the named family, without scope, leading zeros
        or shorthand.
        """
        for protocol, address in (
            ("TCP4", "2001:db8::1"),
            ("TCP4", "1.2.3"),
            ("TCP4", "010.1.2.3"),
            ("TCP4", "1.2.3.256"),
            ("TCP4", "localhost"),
            ("TCP6", "203.0.113.9"),
            ("TCP6", "fe80::1%eth0"),
        ):
            self.assertInvalid(v1(protocol, source=address), "bad address")

    def test_badFields(self) -> None:
        """
        Fields are separated by single spaces, six of them, with a known
        protocol.
        """
        self.assertInvalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields")
        self.assertInvalid(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "7 fields")
        self.assertInvalid(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unsupported")
        self.assertInvalid(b"PROXY \r\n", "unsupported")
        self.assertInvalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "7 fields")


class ParseV2Tests(SynchronousTestCase):
    def test_tcp4(self) -> None:
        """
        A version 2 PROXY header over TCP4 gives both addresses and ports.
        """
        header = v2()
        self.assertEqual(
            parseProxyHeader(header + b"rest"),
            ProxyHeader(
                2,
                len(header),
                IPv4Address("TCP", CLIENT, 40000),
                IPv4Address("TCP", "192.0.2.1", 587),
            ),
        )

    def test_tcp6(self) -> None:
        """
        A version 2 PROXY header over TCP6 gives IPv6 addresses.
        """
        parsed = parseProxyHeader(
            v2(family=0x21, source="2001:db8::9", destination="::1")
        )
        assert parsed is not None
        self.assertEqual(parsed.source, IPv6Address("TCP", "2001:db8::9", 40000))
        self.assertEqual(parsed.destination, IPv6Address("TCP", "::1", 587))

    def test_local(self) -> None:
        """
        The LOCAL command (a health check) names no address, whatever its
        address block holds.
        """
        for header in (
            v2(command=0, family=0),
            v2(command=0),
            v2(command=0, family=0x31),
        ):
            self.assertEqual(parseProxyHeader(header), ProxyHeader(2, len(header)))

    def test_unspec(self) -> None:
        """
        PROXY with C{AF_UNSPEC} names no address either.
        """
        header = v2(family=0x00, tlvs=b"\x04\x00\x01x")
        self.assertEqual(parseProxyHeader(header), ProxyHeader(2, len(header)))

    def test_tlvsIgnored(self) -> None:
        """
        TLVs after the addresses are skipped as part of the header.
        """
        tlvs = b"\x02\x00\x0bexample.org" + b"\x04\x00\x03abc"
        header = v2(tlvs=tlvs)
        parsed = parseProxyHeader(header + b"EHLO")
        assert parsed is not None
        self.assertEqual(parsed.length, len(header))
        self.assertEqual(parsed.source, IPv4Address("TCP", CLIENT, 40000))

    def test_incomplete(self) -> None:
        """
        Every proper prefix of a header asks for more.
        """
        header = v2(family=0x21, source="2001:db8::9", destination="::1", tlvs=b"xyz")
        for end in range(len(header)):
            self.assertIsNone(parseProxyHeader(header[:end]), header[:end])

    def assertInvalid(self, data: bytes, reason: str) -> None:
        error = self.assertRaises(InvalidProxyHeader, parseProxyHeader, data)
        self.assertIn(reason, str(error))

    def test_badSignature(self) -> None:
        """
        A wrong octet anywhere in the signature is refused at once.
        """
        for index in range(len(V2_SIGNATURE)):
            broken = bytearray(v2())
            broken[index] ^= 0x40
            self.assertInvalid(bytes(broken[: index + 1]), "not a PROXY header")

    def test_badVersion(self) -> None:
        """
        Only version 2 is read.
        """
        self.assertInvalid(v2(version=1), "unsupported version 1")
        self.assertInvalid(v2(version=3)[:13], "unsupported version 3")

    def test_badCommand(self) -> None:
        """
        Only LOCAL and PROXY are known commands.
        """
        self.assertInvalid(v2(command=2)[:13], "unsupported command 2")

    def test_unsupportedFamily(self) -> None:
        """
        UDP, UNIX sockets and unknown families are refused, as soon as the
        family octet is in.
        """
        for family in (0x12, 0x22, 0x31, 0x32, 0x10, 0x41, 0x01):
            self.assertInvalid(v2(family=family)[:14], f"family 0x{family:02x}")

    def test_truncatedAddresses(self) -> None:
        """
        An address block shorter than the family's addresses is refused.
        """
        header = bytearray(v2())
        header[14:16] = struct.pack("!H", 11)
        self.assertInvalid(bytes(header[:27]), "11 octets of addresses")
        header6 = bytearray(v2(family=0x21, source="::1", destination="::2"))
        header6[14:16] = struct.pack("!H", 12)
        self.assertInvalid(bytes(header6[:28]), "12 octets of addresses")

    def test_tooLong(self) -> None:
        """
        A length past L{V2_MAX_ADDRESS_LENGTH} is refused from the length
        field, before anything is buffered.
        """
        header = (
            V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_ADDRESS_LENGTH + 1)
        )
        self.assertInvalid(header, "too long")
        padding = V2_MAX_ADDRESS_LENGTH - 12 - 3
        largest = v2(tlvs=b"\x04" + struct.pack("!H", padding) + b"\0" * padding)
        self.assertEqual(len(largest), 16 + V2_MAX_ADDRESS_LENGTH)
        self.assertIsNotNone(parseProxyHeader(largest))


class ParsePropertyTests(SynchronousTestCase):
    @settings(derandomize=True, max_examples=300)
    @given(
        st.ip_addresses(v=4) | st.ip_addresses(v=6),
        st.ip_addresses(v=4) | st.ip_addresses(v=6),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.booleans(),
        st.binary(max_size=20),
    )
    def test_roundTrip(
        self,
        source: Any,
        destination: Any,
        sourcePort: int,
        destinationPort: int,
        binary: bool,
        rest: bytes,
    ) -> None:
        """
        Any addresses of one family, written as either version, parse back
        (IPv4-mapped ones as IPv4), with the header's length; every proper
        prefix asks for more.
        """
        if source.version != destination.version:
            destination = (
                ipaddress.IPv4Address(int(destination) & 0xFFFFFFFF)
                if source.version == 4
                else ipaddress.IPv6Address(int(destination))
            )
        if binary:
            family = 0x11 if source.version == 4 else 0x21
            header = v2(
                family=family,
                source=str(source),
                destination=str(destination),
                sourcePort=sourcePort,
                destinationPort=destinationPort,
            )
        else:
            protocol = "TCP4" if source.version == 4 else "TCP6"
            header = v1(
                protocol, str(source), str(destination), sourcePort, destinationPort
            )
        parsed = parseProxyHeader(header + rest)
        assert parsed is not None

        def expected(ip: Any, port: int) -> Any:
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            kind = IPv4Address if ip.version == 4 else IPv6Address
            return kind("TCP", str(ip), port)

        self.assertEqual(parsed.length, len(header))
        self.assertEqual(parsed.source, expected(source, sourcePort))
        self.assertEqual(parsed.destination, expected(destination, destinationPort))
        for end in range(len(header)):
            self.assertIsNone(parseProxyHeader(header[:end]))

    @settings(derandomize=True, max_examples=500)
    @given(
        st.sampled_from([b"", b"PROXY ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]),
        st.binary(max_size=200),
    )
    def test_anyInput(self, start: bytes, data: bytes) -> None:
        """
        Whatever the input, the parser returns a header within the input,
        asks for more only while under the longest header, or raises
        L{InvalidProxyHeader}: nothing else.
        """
        data = start + data
        try:
            parsed = parseProxyHeader(data)
        except InvalidProxyHeader:
            return
        if parsed is None:
            self.assertLess(len(data), 16 + V2_MAX_ADDRESS_LENGTH)
            if not data.startswith(V2_SIGNATURE[:1]):
                self.assertLess(len(data), V1_MAX_LENGTH)
        else:
            self.assertLessEqual(parsed.length, len(data))


# -- the wrapper ----------------------------------------------------------------


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """
    The wrapped protocol: records its transport's view of the connection.
    """

    transport: Any

    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.peerAtConnect: Any = None
        self.hostAtConnect: Any = None
        self.received = b""
        self.lost: Failure | None = None
        self.handshakes = 0
        self.closeOnConnect = False

    def connectionMade(self) -> None:
        self.peerAtConnect = self.transport.getPeer()
        self.hostAtConnect = self.transport.getHost()
        if self.closeOnConnect:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class RecorderFactory(Factory):
    """
    Builds L{Recorder}s and keeps them; C{refuse} makes it build none.
    """

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.refuse = False
        self.closeOnConnect = False
        self.starts = 0
        self.stops = 0

    def buildProtocol(self, addr: Any) -> Recorder | None:  # type: ignore[override]
        if self.refuse:
            return None
        p = Recorder(addr)
        p.closeOnConnect = self.closeOnConnect
        self.built.append(p)
        return p

    def doStart(self) -> None:
        self.starts += 1

    def doStop(self) -> None:
        self.stops += 1


class Connection:
    """
    One connection to a L{ProxyProtocolFactory} over a string transport.
    """

    def __init__(
        self,
        factory: ProxyProtocolFactory,
        peer: Any = PROXY,
        transport: StringTransport | None = None,
    ) -> None:
        self.transport = transport or StringTransport(
            hostAddress=LISTENER, peerAddress=peer
        )
        wrapper = factory.buildProtocol(peer)
        assert wrapper is not None
        self.wrapper: ProxyProtocolWrapper = wrapper
        wrapper.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.wrapper.dataReceived(data)

    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def aborted(self) -> bool:
        return bool(self.transport.disconnected)


class WrapperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.wrapped = RecorderFactory()
        self.factory = ProxyProtocolFactory(self.wrapped, TRUSTED, self.clock)

    def connect(self, peer: Any = PROXY) -> Connection:
        return Connection(self.factory, peer)

    def only(self) -> Recorder:
        self.assertEqual(len(self.wrapped.built), 1)
        return self.wrapped.built[0]

    def test_v1TCP4(self) -> None:
        """
        After a version 1 TCP4 header the wrapped protocol is built for the
        client's address and, from C{connectionMade} on, its transport's
        peer is the client and its host the header's destination.
        """
        c = self.connect()
        c.send(v1())
        p = self.only()
        self.assertEqual(p.addr, IPv4Address("TCP", CLIENT, 40000))
        self.assertEqual(p.peerAtConnect, IPv4Address("TCP", CLIENT, 40000))
        self.assertEqual(p.hostAtConnect, IPv4Address("TCP", "192.0.2.1", 587))
        self.assertIs(p.transport, c.wrapper)
        self.assertEqual(c.wrapper.header, parseProxyHeader(v1()))
        self.assertFalse(c.closed())

    def test_v1TCP6(self) -> None:
        """
        A TCP6 header gives the wrapped protocol an L{IPv6Address} peer.
        """
        c = self.connect()
        c.send(v1("TCP6", "2001:db8::9", "2001:db8::1", 1234, 465))
        p = self.only()
        self.assertEqual(p.peerAtConnect, IPv6Address("TCP", "2001:db8::9", 1234))
        self.assertEqual(p.hostAtConnect, IPv6Address("TCP", "2001:db8::1", 465))

    def test_unknown(self) -> None:
        """
        After C{PROXY UNKNOWN} the session is the proxy's own connection.
        """
        c = self.connect()
        c.send(b"PROXY UNKNOWN\r\n")
        p = self.only()
        self.assertEqual(p.peerAtConnect, PROXY)
        self.assertEqual(p.hostAtConnect, LISTENER)

    def test_v2TCP4(self) -> None:
        """
        A version 2 TCP4 header gives the client's address.
        """
        c = self.connect()
        c.send(v2(sourcePort=5555))
        self.assertEqual(self.only().peerAtConnect, IPv4Address("TCP", CLIENT, 5555))

    def test_v2TCP6(self) -> None:
        """
        A version 2 TCP6 header gives the client's IPv6 address.
        """
        c = self.connect()
        c.send(v2(family=0x21, source="2001:db8::9", destination="2001:db8::1"))
        self.assertEqual(
            self.only().peerAtConnect, IPv6Address("TCP", "2001:db8::9", 40000)
        )

    def test_v2Local(self) -> None:
        """
        A version 2 LOCAL header (a health check) gives the proxy's own
        address.
        """
        c = self.connect()
        c.send(v2(command=0, family=0))
        self.assertEqual(self.only().peerAtConnect, PROXY)

    def test_dataAfterHeader(self) -> None:
        """
        What follows the header in the same packet goes to the wrapped
        protocol, after its C{connectionMade}.
        """
        for header in (v1(), v2()):
            self.wrapped.built.clear()
            c = self.connect()
            c.send(header + b"EHLO client\r\nNOOP\r\n")
            self.assertEqual(self.only().received, b"EHLO client\r\nNOOP\r\n")
            c.send(b"QUIT\r\n")
            self.assertEqual(self.only().received, b"EHLO client\r\nNOOP\r\nQUIT\r\n")

    def test_byteByByte(self) -> None:
        """
        A header and data arriving one octet at a time: nothing is built
        until the header's last octet, and then every octet is passed on.
        """
        for header in (v1("TCP6", "2001:db8::9", "::1"), v2(tlvs=b"\x04\x00\x01z")):
            self.wrapped.built.clear()
            c = self.connect()
            for octet in header[:-1]:
                c.send(bytes([octet]))
            self.assertEqual(self.wrapped.built, [])
            c.send(header[-1:])
            p = self.only()
            for octet in b"EHLO x\r\n":
                c.send(bytes([octet]))
            self.assertEqual(p.received, b"EHLO x\r\n")
            self.assertFalse(c.closed())

    def test_untrustedPeer(self) -> None:
        """
        A connection from outside C{trustedProxies} is refused by the
        factory (the listening port closes it at once): no wrapper, no
        wrapped protocol, and a log line.
        """
        for peer in (
            IPv4Address("TCP", "10.0.1.5", 1),
            IPv4Address("TCP", CLIENT, 1),
            IPv6Address("TCP", "2001:db8::1", 1),
            IPv6Address("TCP", "::ffff:192.0.2.1", 1),
            UNIXAddress(b"/run/relay.sock"),
            None,
        ):
            with capturedLogs() as events:
                self.assertIsNone(self.factory.buildProtocol(peer))
            self.assertEqual(
                [formatEvent(e) for e in events],
                [
                    "refused connection from "
                    f"{getattr(peer, 'host', peer)}: not a trusted proxy"
                ],
            )
        self.assertEqual(self.wrapped.built, [])

    def test_trustedPeers(self) -> None:
        """
        Trusted proxies may connect over IPv4, IPv6, and IPv4-mapped IPv6
        (matched against the IPv4 networks).
        """
        for peer in (
            PROXY,
            IPv6Address("TCP", "fd00::7", 1),
            IPv6Address("TCP", "::ffff:10.0.0.9", 1),
        ):
            self.assertIsInstance(
                self.factory.buildProtocol(peer), ProxyProtocolWrapper
            )

    def test_malformed(self) -> None:
        """
        A malformed header aborts the connection, logged, without building
        the wrapped protocol; later data is ignored.
        """
        tooLong = b"PROXY UNKNOWN " + b"x" * 100
        truncated = bytearray(v2())
        truncated[14:16] = struct.pack("!H", 6)
        for data in (
            b"EHLO client.example\r\n",
            b"\x16\x03\x01\x02\x00",
            tooLong,
            v1(sourcePort=70000),
            v1(destinationPort="0587"),
            v2(version=1),
            v2(family=0x31),
            bytes(truncated),
        ):
            c = self.connect()
            with capturedLogs() as events:
                c.send(data)
            self.assertTrue(c.aborted(), data)
            self.assertEqual(len(events), 1)
            self.assertTrue(
                formatEvent(events[0]).startswith("bad PROXY header from 10.0.0.5: "),
                formatEvent(events[0]),
            )
            c.send(v1())
            self.assertEqual(self.wrapped.built, [])

    def test_bufferCapped(self) -> None:
        """
        A proxy that sends a version 1 header without end is cut off at
        107 octets, however it splits them.
        """
        c = self.connect()
        c.send(b"PROXY ")
        for _ in range(V1_MAX_LENGTH - len(b"PROXY ") - 1):
            c.send(b"x")
        self.assertFalse(c.aborted())
        c.send(b"x")
        self.assertTrue(c.aborted())

    def test_timeout(self) -> None:
        """
        A proxy that has not sent a whole header within C{timeout} seconds
        is cut off, logged; the wrapped protocol is never built.
        """
        c = self.connect()
        c.send(v1()[:10])
        self.clock.advance(9.9)
        self.assertFalse(c.aborted())
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.assertTrue(c.aborted())
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["no PROXY header from 10.0.0.5 within 10.0s: closing"],
        )
        c.send(v1()[10:])
        self.assertEqual(self.wrapped.built, [])

    def test_timeoutSetting(self) -> None:
        """
        The timeout is the factory's, on the factory's clock.
        """
        factory = ProxyProtocolFactory(self.wrapped, TRUSTED, self.clock, timeout=2.5)
        c = Connection(factory)
        self.clock.advance(2.4)
        self.assertFalse(c.aborted())
        self.clock.advance(0.1)
        self.assertTrue(c.aborted())

    def test_timeoutCancelled(self) -> None:
        """
        Once the header is in, or the connection is gone, the timeout does
        nothing.
        """
        c = self.connect()
        c.send(v1())
        lost = self.connect()
        lost.wrapper.connectionLost(Failure(Exception("gone")))
        self.clock.advance(3600)
        self.assertFalse(c.closed())
        self.assertFalse(lost.aborted())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lostBeforeHeader(self) -> None:
        """
        A connection closed before the header built nothing and logs
        nothing (a proxy's TCP health check does just that).
        """
        c = self.connect()
        c.send(b"PROXY TCP4")
        with capturedLogs() as events:
            c.wrapper.connectionLost(Failure(Exception("gone")))
        self.assertEqual(list(events), [])
        self.assertEqual(self.wrapped.built, [])

    def test_connectionLost(self) -> None:
        """
        The wrapped protocol learns that the connection is gone, and the
        wrapper lets go of it.
        """
        c = self.connect()
        c.send(v1())
        reason = Failure(Exception("gone"))
        c.wrapper.connectionLost(reason)
        self.assertIs(self.only().lost, reason)
        self.assertIsNone(c.wrapper.wrappedProtocol)
        self.assertTrue(c.wrapper.disconnecting)

    def test_wrappedFactoryRefuses(self) -> None:
        """
        If the wrapped factory builds no protocol, the connection is closed.
        """
        self.wrapped.refuse = True
        c = self.connect()
        c.send(v1() + b"EHLO")
        self.assertTrue(c.closed())

    def test_closedInConnectionMade(self) -> None:
        """
        What follows the header is not passed to a wrapped protocol that
        closed the connection in C{connectionMade} (as a socket that stopped
        reading would not).
        """
        self.wrapped.closeOnConnect = True
        c = self.connect()
        c.send(v1() + b"EHLO x\r\n")
        self.assertEqual(self.only().received, b"")
        self.assertTrue(c.wrapper.disconnecting)

    def test_transportPassThrough(self) -> None:
        """
        The wrapped protocol's writes, closes, and producer calls reach the
        real transport; the wrapper provides what the transport does.
        """
        c = self.connect()
        c.send(v1())
        t = self.only().transport
        verifyObject(ITransport, t)
        verifyObject(IPushProducer, t)
        t.write(b"220 hello\r\n")
        t.writeSequence([b"250 ", b"ok\r\n"])
        self.assertEqual(c.transport.value(), b"220 hello\r\n250 ok\r\n")
        producer = Protocol()
        t.registerProducer(producer, True)
        self.assertIs(c.transport.producer, producer)
        t.pauseProducing()
        self.assertEqual(c.transport.producerState, "paused")
        t.resumeProducing()
        self.assertEqual(c.transport.producerState, "producing")
        t.unregisterProducer()
        self.assertIsNone(c.transport.producer)
        self.assertFalse(t.disconnecting)
        t.loseConnection()
        self.assertTrue(t.disconnecting)
        self.assertTrue(c.closed())
        self.assertFalse(c.aborted())

    def test_abortPassThrough(self) -> None:
        """
        C{abortConnection} reaches the real transport.
        """
        c = self.connect()
        c.send(v1())
        self.only().transport.abortConnection()
        self.assertTrue(c.aborted())
        self.assertTrue(c.wrapper.disconnecting)

    def test_disconnectingFollowsTransport(self) -> None:
        """
        C{disconnecting} is true when the real transport is closing, however
        that started.
        """
        c = self.connect()
        c.send(v1())
        c.transport.loseConnection()
        self.assertTrue(self.only().transport.disconnecting)

    def test_otherAttributes(self) -> None:
        """
        Other transport attributes are the real transport's; the wrapper's
        own peer and host are the proxy's before the header.
        """
        c = self.connect()
        self.assertEqual(c.wrapper.getPeer(), PROXY)
        self.assertEqual(c.wrapper.getHost(), LISTENER)
        c.transport.someAttribute = "x"  # type: ignore[attr-defined]
        self.assertEqual(cast(Any, c.wrapper).someAttribute, "x")
        self.assertRaises(AttributeError, getattr, c.wrapper, "noSuchAttribute")

    def test_startTLS(self) -> None:
        """
        C{startTLS} starts TLS on the real transport, after which the
        wrapper provides L{ISSLTransport} and its C{getHandle}; the TLS
        layer's C{handshakeCompleted} reaches the wrapped protocol.
        """
        transport = TLSStringTransport(hostAddress=LISTENER, peerAddress=PROXY)
        c = Connection(self.factory, transport=transport)
        c.send(v1())
        t = self.only().transport
        self.assertFalse(ISSLTransport.providedBy(t))
        self.assertTrue(IHandshakeListener.providedBy(c.wrapper))
        t.startTLS("context")
        self.assertEqual(transport.tlsStarted, "context")
        self.assertTrue(ISSLTransport.providedBy(t))
        self.assertEqual(t.getHandle().get_protocol_version_name(), "TLSv1.3")
        c.wrapper.handshakeCompleted()
        self.assertEqual(self.only().handshakes, 1)

    def test_notHandshakeListener(self) -> None:
        """
        The wrapper is an L{IHandshakeListener} only when the wrapped
        protocol is one.
        """
        factory = ProxyProtocolFactory(
            Factory.forProtocol(Protocol), TRUSTED, self.clock
        )
        c = Connection(factory)
        c.send(v1())
        self.assertFalse(IHandshakeListener.providedBy(c.wrapper))
        c.wrapper.handshakeCompleted()

    def test_factory(self) -> None:
        """
        Starting and stopping the factory starts and stops the wrapped one;
        its log prefix says PROXY.
        """
        self.factory.doStart()
        self.factory.doStop()
        self.assertEqual((self.wrapped.starts, self.wrapped.stops), (1, 1))
        self.assertEqual(self.factory.logPrefix(), "RecorderFactory (PROXY)")

    def test_noTrustedProxies(self) -> None:
        """
        A factory that would trust nobody is a configuration mistake.
        """
        self.assertRaises(
            ValueError, ProxyProtocolFactory, self.wrapped, (), self.clock
        )


# -- the relay behind it ------------------------------------------------------------


def proxied(
    harness: Harness,
    header: bytes | None = None,
    proxy: Any = PROXY,
    transport: StringTransport | None = None,
) -> Session:
    """
    A session of C{harness}'s relay reached through a proxy: the header
    (by default a client at L{CLIENT}) is sent, and the greeting read.
    """
    factory = ProxyProtocolFactory(harness.factory, TRUSTED, harness.clock)
    connection = Connection(
        factory,
        proxy,
        transport or TLSStringTransport(hostAddress=LISTENER, peerAddress=proxy),
    )
    connection.send(v1() if header is None else header)
    # The session talks to the wrapper: pipelined input, STARTTLS's
    # handshake, everything goes through it.
    return Session(
        cast(RelayESMTP, connection.wrapper),
        cast(TLSStringTransport, connection.transport),
    )


def relayOf(session: Session) -> RelayESMTP:
    wrapper = cast(ProxyProtocolWrapper, session.protocol)
    return cast(RelayESMTP, wrapper.wrappedProtocol)


class RelayBehindProxyTests(SynchronousTestCase):
    def test_ehloShowsClient(self) -> None:
        """
        The relay greets and answers EHLO with the client's address from
        the header, not the proxy's, for both versions.
        """
        for header in (v1(), v2(), v1("TCP6", "2001:db8::9", "2001:db8::1")):
            session = proxied(Harness(), header)
            self.assertEqual(
                session.greeting, [b"220 relay.example.org ESMTP smtpauth-relay"]
            )
            address = b"2001:db8::9" if b"TCP6" in header else CLIENT.encode()
            self.assertEqual(
                session.command(b"EHLO client.example")[0],
                b"250-relay.example.org Hello client.example [" + address + b"]",
            )

    def test_pipelinedWithHeader(self) -> None:
        """
        An EHLO in the same packet as the header is answered after the
        greeting.
        """
        harness = Harness()
        factory = ProxyProtocolFactory(harness.factory, TRUSTED, harness.clock)
        c = Connection(factory, transport=TLSStringTransport(peerAddress=PROXY))
        c.send(v2() + b"EHLO client.example\r\n")
        lines = c.transport.value().split(b"\r\n")
        self.assertEqual(lines[0], b"220 relay.example.org ESMTP smtpauth-relay")
        self.assertEqual(
            lines[1], b"250-relay.example.org Hello client.example [203.0.113.9]"
        )

    def test_healthCheck(self) -> None:
        """
        Behind a LOCAL header the session is the proxy's.
        """
        session = proxied(Harness(), v2(command=0, family=0))
        self.assertEqual(
            session.command(b"EHLO client.example")[0],
            b"250-relay.example.org Hello client.example [10.0.0.5]",
        )

    def test_trustedNetworksUseClient(self) -> None:
        """
        C{trusted_networks} is matched against the client: a client in it
        may relay without AUTH through the proxy, while the proxy's own
        address being trusted gives other clients nothing.
        """
        harness = Harness(trustedNetworks=("203.0.113.0/24",))
        session = proxied(harness)
        session.command(b"EHLO client.example")
        self.assertEqual(
            session.last(b"MAIL FROM:<a@example.org>"), b"250 2.1.0 Sender ok"
        )

        harness = Harness(trustedNetworks=("10.0.0.0/24",))
        session = proxied(harness)
        session.command(b"EHLO client.example")
        self.assertEqual(session.last(b"MAIL FROM:<a@example.org>")[:9], b"530 5.7.0")

    def test_connectionLimitPerClient(self) -> None:
        """
        C{max_connections_per_ip} counts clients, not the proxy they all
        come through.
        """
        harness = Harness(maxPerAddress=1)
        first = proxied(harness, v1(source="203.0.113.1"))
        second = proxied(harness, v1(source="203.0.113.2"))
        self.assertTrue(first.greeting[0].startswith(b"220 "))
        self.assertTrue(second.greeting[0].startswith(b"220 "))
        third = proxied(harness, v1(source="203.0.113.1"))
        self.assertEqual(third.greeting[0][:10], b"421 4.7.0 ")
        self.assertEqual(
            dict(harness.limiter.perAddress), {"203.0.113.1": 2, "203.0.113.2": 1}
        )

    def test_rateLimitPerClient(self) -> None:
        """
        C{connections_per_minute} counts each client's connections.
        """
        harness = Harness(limits=LimitsConfig(connections_per_minute=1))
        proxied(harness, v1(source="203.0.113.1"))
        self.assertTrue(
            proxied(harness, v1(source="203.0.113.2")).greeting[0].startswith(b"220 ")
        )
        self.assertEqual(
            proxied(harness, v1(source="203.0.113.1")).greeting[0][:10], b"421 4.7.0 "
        )

    def test_lockoutPerClient(self) -> None:
        """
        Failed logins lock out the client that made them, after STARTTLS
        through the wrapper; another client behind the same proxy may still
        log in (the lockout also counts per user and /24).
        """
        harness = Harness(lockout=LockoutConfig(max_failures=1, tarpit=0))
        session = proxied(harness, v1(source="203.0.113.1"))
        session.startTLS()
        session.command(b"EHLO client.example")
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "guess"))[:9], b"535 5.7.8"
        )
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland"))[:9],
            b"454 4.7.0",
        )
        other = proxied(harness, v1(source="198.51.100.2"))
        other.startTLS()
        self.assertEqual(other.login(), b"235 2.7.0 Authentication successful")

    def test_receivedHeader(self) -> None:
        """
        The Received header and the envelope name the client; after
        STARTTLS through the wrapper the header has the TLS details of the
        real transport.
        """
        harness = Harness()
        session = proxied(harness)
        session.startTLS()
        self.assertEqual(session.login(), b"235 2.7.0 Authentication successful")
        session.command(b"MAIL FROM:<alice@example.org>")
        session.command(b"RCPT TO:<bob@example.net>")
        session.command(b"DATA")
        self.assertEqual(
            session.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")[0][:3], b"250"
        )
        [(envelope, message)] = harness.spool.messages.values()
        self.assertEqual(envelope.clientAddress, CLIENT)
        self.assertTrue(
            message.startswith(
                b"Received: from client.example ([203.0.113.9])\n"
                b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\n"
            ),
            message[:200],
        )

    def test_logsNameClient(self) -> None:
        """
        The relay's log lines name the client.
        """
        harness = Harness()
        session = proxied(harness)
        with capturedLogs() as events:
            session.command(b"QUIT")
            relayOf(session).connectionLost(Failure(Exception("closed")))
        self.assertIn(
            "connection from 203.0.113.9 closed",
            " ".join(formatEvent(e) for e in events),
        )


class ImplicitTLSTests(SynchronousTestCase):
    """
    An implicit-TLS listener behind a proxy: the header comes first on the
    wire, then the TLS handshake, so the TLS layer sits inside the wrapper.
    """

    def test_handshakeAfterHeader(self) -> None:
        """
        A real TLS client that sends the header and then its handshake gets
        the greeting over TLS; the session sees the client's address, the
        handshake's completion, and the real TLS version.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        certificate = os.path.join(directory, "cert.pem")
        key = os.path.join(directory, "key.pem")
        generateSelfSigned(certificate, key, "relay.example.org")

        harness = Harness(tlsMode="implicit")
        tlsFactory = TLSMemoryBIOFactory(
            serverContextFactory(certificate, key),
            False,
            harness.factory,
            harness.clock,
        )
        factory = ProxyProtocolFactory(tlsFactory, TRUSTED, harness.clock)
        server = factory.buildProtocol(PROXY)
        assert server is not None

        received: list[bytes] = []

        class Client(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        client = Client()
        clientTLS: Any = TLSMemoryBIOFactory(
            ssl.CertificateOptions(),
            True,
            Factory.forProtocol(lambda: client),
            harness.clock,
        ).buildProtocol(None)

        class HeaderThenTLS(Protocol):
            """
            Writes the PROXY header in the clear, then speaks TLS.
            """

            def makeConnection(self, transport: Any) -> None:
                transport.write(v2(source="198.51.100.7"))
                clientTLS.makeConnection(transport)

            def dataReceived(self, data: bytes) -> None:
                clientTLS.dataReceived(data)

            def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
                clientTLS.connectionLost(reason)

        headerClient = HeaderThenTLS()
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, LISTENER, PROXY),
            headerClient,
            iosim.FakeTransport(headerClient, False),
            clock=harness.clock,
        )
        pump.flush()
        self.assertEqual(
            b"".join(received), b"220 relay.example.org ESMTP smtpauth-relay\r\n"
        )
        tls = server.wrappedProtocol
        self.assertIsInstance(tls, TLSMemoryBIOProtocol)
        relay = cast(TLSMemoryBIOProtocol, tls).wrappedProtocol
        self.assertIsInstance(relay, RelayESMTP)
        self.assertFalse(relay._handshakePending)
        info = tlsInfo(relay.transport)
        assert info is not None
        self.assertIn(info.version, ("TLSv1.2", "TLSv1.3"))

        del received[:]
        client.transport.write(b"EHLO client.example\r\n")
        pump.flush()
        lines = b"".join(received).split(b"\r\n")
        self.assertEqual(
            lines[0], b"250-relay.example.org Hello client.example [198.51.100.7]"
        )
        self.assertIn(b"250 AUTH PLAIN LOGIN", lines)
