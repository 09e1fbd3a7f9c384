"""
The PROXY protocol (versions 1 and 2, as HAProxy sends them) on a listener,
so that behind a load balancer the relay still knows who its client is.

A proxy in front of the relay opens one connection per client and starts it
with a header naming the client's address and port.
L{ProxyProtocolFactory} wraps a listener's factory (the relay's
L{RelayServerFactory<smtpauth_relay.server.RelayServerFactory>}, or the
L{TLSMemoryBIOFactory} around it on an implicit-TLS listener: the header
comes before the TLS handshake on the wire) and differs from Twisted's own
C{haproxy:} endpoint in three ways:

  - only the proxies in C{trustedProxies} may connect at all: anyone else
    is refused before a byte is read, so nobody can claim an address by
    sending a header of their own;
  - the wrapped protocol is built and connected only once the whole header
    has been read, so from C{connectionMade} on C{transport.getPeer()} is
    the client (the connection limits, the rate limits, C{trusted_networks},
    the lockout, the logs and the Received header all see it);
  - a malformed header, an unsupported address family, a header that does
    not come within C{timeout} seconds, or one longer than the protocol
    allows closes the connection.

A header without a client address (version 1 C{UNKNOWN}, version 2 C{LOCAL}
as in health checks, or C{AF_UNSPEC}) leaves the connection's own addresses:
the session is the proxy's.

Specification: U{https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt}.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, directlyProvides, providedBy

from smtpauth_relay.policy import IPNetwork, inNetworks

__all__ = [
    "V1_MAX_LENGTH",
    "V2_MAX_ADDRESS_LENGTH",
    "V2_SIGNATURE",
    "InvalidProxyHeader",
    "ProxyHeader",
    "ProxyProtocolFactory",
    "ProxyProtocolWrapper",
    "parseProxyHeader",
]

log = Logger()

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
"""The longest version 1 header, CRLF included (the specification's limit)."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The twelve octets every version 2 header starts with."""
V2_FIXED_LENGTH = 16
"""Signature, version and command, family and protocol, length."""
V2_MAX_ADDRESS_LENGTH = 4096
"""
The longest address block (addresses and TLVs) of a version 2 header we
accept; the format allows 65535, but what proxies send is far shorter.
"""

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_ADDRESSES: dict[int, tuple[struct.Struct, Callable[[bytes], _IP]]] = {
    _V2_TCP4: (struct.Struct("!4s4sHH"), ipaddress.IPv4Address),
    _V2_TCP6: (struct.Struct("!16s16sHH"), ipaddress.IPv6Address),
}
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")

IPAddress = IPv4Address | IPv6Address


class InvalidProxyHeader(Exception):
    """
    What a connection started with is not a PROXY header we accept; the
    message says why.
    """


@dataclass(frozen=True)
class ProxyHeader:
    """
    A parsed PROXY header.

    @ivar version: 1 or 2.
    @ivar length: the header's length in octets; what follows is the
        client's.
    @ivar source: the client's address, or C{None} when the header names
        none (version 1 C{UNKNOWN}, version 2 C{LOCAL} or C{AF_UNSPEC}): the
        connection is then taken as the proxy's own.
    @ivar destination: the address the client connected to, or C{None} as
        for C{source}.
    """

    version: int
    length: int
    source: IPAddress | None = None
    destination: IPAddress | None = None


def _address(ip: _IP, port: int) -> IPAddress:
    """
    A Twisted TCP address; an IPv4-mapped IPv6 address (a dual-stack proxy's
    view of an IPv4 client) becomes the IPv4 address, so the client counts
    as one address for every limit however the proxy reached it.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", str(ip), port)


def parseProxyHeader(data: bytes) -> ProxyHeader | None:
    """
    Parse the PROXY header at the start of C{data}.

    @param data: what the connection has received so far.
    @return: the header, or C{None} if C{data} is the start of one that
        could still be valid.
    @raise InvalidProxyHeader: if C{data} cannot start a valid header (this
        is known as soon as it is not a prefix of one, so at most
        L{V1_MAX_LENGTH} or C{16 + V2_MAX_ADDRESS_LENGTH} octets are ever
        held).
    """
    if data[:1] == V1_PREFIX[:1]:
        return _parseV1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parseV2(data)
    if not data:
        return None
    raise InvalidProxyHeader("not a PROXY header")


def _parseV1(data: bytes) -> ProxyHeader | None:
    """
    A version 1 (text) header: C{PROXY TCP4|TCP6 source destination
    sourcePort destinationPort}, or C{PROXY UNKNOWN} and anything, then
    CRLF.
    """
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise InvalidProxyHeader("not a PROXY header")
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    if end == -1:
        if len(data) >= V1_MAX_LENGTH:
            raise InvalidProxyHeader(
                f"no CRLF in the first {V1_MAX_LENGTH} octets of a version 1 header"
            )
        return None
    if end == 0 or data[end - 1 : end] != b"\r":
        raise InvalidProxyHeader("version 1 header not ended by CRLF")
    line = data[: end - 1]
    fields = line.split(b" ")
    if len(fields) < 2 or fields[0] != V1_PREFIX.strip():
        raise InvalidProxyHeader("not a PROXY header")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        return ProxyHeader(version=1, length=end + 1)
    if protocol == b"TCP4":
        family: Any = ipaddress.IPv4Address
    elif protocol == b"TCP6":
        family = ipaddress.IPv6Address
    else:
        raise InvalidProxyHeader(f"unsupported protocol {_show(protocol)}")
    if len(fields) != 6:
        raise InvalidProxyHeader(f"{len(fields)} fields in a version 1 header, not 6")
    source, destination = (_v1Address(family, text) for text in fields[2:4])
    sourcePort, destinationPort = (_v1Port(text) for text in fields[4:6])
    return ProxyHeader(
        version=1,
        length=end + 1,
        source=_address(source, sourcePort),
        destination=_address(destination, destinationPort),
    )


def _show(text: bytes) -> str:
    """
    Untrusted header octets, fit for a log line.
    """
    return repr(text[:40])


def _v1Address(family: Any, text: bytes) -> Any:
    try:
        if b"%" in text:
            raise ValueError("a scope is not an address")
        return family(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader(f"bad address {_show(text)}") from None


def _v1Port(text: bytes) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise InvalidProxyHeader(f"bad port {_show(text)}")
    return int(text)


def _parseV2(data: bytes) -> ProxyHeader | None:
    """
    A version 2 (binary) header: signature, version and command, family and
    protocol, the length of the rest, the addresses, any TLVs (ignored).
    """
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise InvalidProxyHeader("not a PROXY header")
    if len(data) < len(V2_SIGNATURE) + 1:
        return None
    versionCommand = data[12]
    if versionCommand >> 4 != 2:
        raise InvalidProxyHeader(f"unsupported version {versionCommand >> 4}")
    command = versionCommand & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise InvalidProxyHeader(f"unsupported command {command}")
    if len(data) < 14:
        return None
    family = data[13]
    if command == _V2_PROXY and family != _V2_UNSPEC and family not in _V2_ADDRESSES:
        raise InvalidProxyHeader(f"unsupported address family 0x{family:02x}")
    if len(data) < V2_FIXED_LENGTH:
        return None
    (size,) = struct.unpack("!H", data[14:16])
    if size > V2_MAX_ADDRESS_LENGTH:
        raise InvalidProxyHeader(f"version 2 header of {size} octets is too long")
    length = V2_FIXED_LENGTH + size
    if len(data) < length:
        return None
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        return ProxyHeader(version=2, length=length)
    layout, parse = _V2_ADDRESSES[family]
    if size < layout.size:
        raise InvalidProxyHeader(
            f"{size} octets of addresses for family 0x{family:02x}, "
            f"not {layout.size} or more"
        )
    source, destination, sourcePort, destinationPort = layout.unpack_from(
        data, V2_FIXED_LENGTH
    )
    return ProxyHeader(
        version=2,
        length=length,
        source=_address(parse(source), sourcePort),
        destination=_address(parse(destination), destinationPort),
    )


def _hostOf(address: object) -> str:
    return str(getattr(address, "host", address))


class ProxyProtocolWrapper(Protocol):
    """
    One connection from a trusted proxy: reads the PROXY header, then builds
    the wrapped protocol and is its transport, with the client's address
    as peer and every other call passed to the real transport.

    Like Twisted's L{ProtocolWrapper<twisted.protocols.policies.ProtocolWrapper>},
    it provides what the real transport provides; after C{startTLS} it also
    provides L{ISSLTransport}, and it passes C{handshakeCompleted} on, so a
    STARTTLS session works through it as it would directly.

    @ivar wrappedProtocol: the protocol built once the header is read.
    @ivar header: the header, once read.
    """

    transport: Any

    def __init__(self, factory: ProxyProtocolFactory) -> None:
        self.factory = factory
        self.wrappedProtocol: IProtocol | None = None
        self.header: ProxyHeader | None = None
        self._buffer = b""
        self._timeoutCall: Any = None
        self._disconnecting = False
        self._peer: IAddress | None = None
        self._host: IAddress | None = None

    def logPrefix(self) -> str:
        return "ProxyProtocol"

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self._timeoutCall = self.factory.clock.callLater(
            self.factory.timeout, self._timedOut
        )

    def _timedOut(self) -> None:
        self._timeoutCall = None
        log.warn(
            "no PROXY header from {proxy} within {timeout}s: closing",
            proxy=_hostOf(self.transport.getPeer()),
            timeout=self.factory.timeout,
        )
        self.abortConnection()

    def _stopTimer(self) -> None:
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None

    def dataReceived(self, data: bytes) -> None:
        if self.header is not None:
            if self.wrappedProtocol is not None:
                self.wrappedProtocol.dataReceived(data)
            return
        if self._disconnecting:
            return
        self._buffer += data
        try:
            header = parseProxyHeader(self._buffer)
        except InvalidProxyHeader as e:
            log.warn(
                "bad PROXY header from {proxy}: {reason}",
                proxy=_hostOf(self.transport.getPeer()),
                reason=str(e),
            )
            self._buffer = b""
            self.abortConnection()
            return
        if header is None:
            return
        rest = self._buffer[header.length :]
        self._buffer = b""
        self._headerReceived(header, rest)

    def _headerReceived(self, header: ProxyHeader, rest: bytes) -> None:
        """
        Connect the wrapped protocol, as if the client had connected, and
        give it what came after the header.
        """
        self._stopTimer()
        self.header = header
        self._peer = header.source or self.transport.getPeer()
        self._host = header.destination or self.transport.getHost()
        wrapped = self.factory.wrappedFactory.buildProtocol(self._peer)
        if wrapped is None:
            self.loseConnection()
            return
        self.wrappedProtocol = wrapped
        if IHandshakeListener.providedBy(wrapped):
            alsoProvides(self, IHandshakeListener)
        wrapped.makeConnection(self)
        if rest and not self._disconnecting and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def handshakeCompleted(self) -> None:
        """
        A TLS layer started with C{startTLS} below us finished its handshake
        (L{IHandshakeListener}): tell the wrapped protocol.
        """
        wrapped = self.wrappedProtocol
        if IHandshakeListener.providedBy(wrapped):
            IHandshakeListener(wrapped).handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopTimer()
        self.connected = False
        self._disconnecting = True
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    # -- the wrapped protocol's transport ---------------------------------

    @property
    def disconnecting(self) -> bool:
        """
        Whether the connection is being closed, by us or by the transport.
        """
        return self._disconnecting or bool(
            getattr(self.transport, "disconnecting", False)
        )

    def getPeer(self) -> IAddress:
        """
        The client, as the header named it (the proxy before the header or
        when it named none).
        """
        if self._peer is not None:
            return self._peer
        peer: IAddress = self.transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        """
        Where the client connected to, as the header named it.
        """
        if self._host is not None:
            return self._host
        host: IAddress = self.transport.getHost()
        return host

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self._disconnecting = True
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._disconnecting = True
        self.transport.abortConnection()

    def getHandle(self) -> Any:
        return self.transport.getHandle()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def startTLS(self, contextFactory: Any, *args: Any) -> None:
        """
        Start TLS on the real transport (L{ITLSTransport}); from then on we
        provide L{ISSLTransport} as it does.
        """
        self.transport.startTLS(contextFactory, *args)
        alsoProvides(self, ISSLTransport)

    def __getattr__(self, name: str) -> Any:
        """
        Anything else (C{getTcpNoDelay}, C{getPeerCertificate}, ...) is the
        real transport's.
        """
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.transport, name)


class ProxyProtocolFactory(ServerFactory[ProxyProtocolWrapper]):
    """
    Wraps a listener's factory: connections must come from a trusted proxy
    and start with a PROXY header; see the module docstring.

    @ivar wrappedFactory: builds the protocol for each client.
    @ivar trustedProxies: the networks proxies may connect from.
    @ivar clock: schedules the header timeout.
    @ivar timeout: seconds a proxy has to send the whole header.
    """

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        trustedProxies: Sequence[IPNetwork],
        clock: Any,
        timeout: float = 10.0,
    ) -> None:
        """
        @raise ValueError: if C{trustedProxies} is empty: nobody could
            connect.
        """
        if not trustedProxies:
            raise ValueError("the PROXY protocol needs at least one trusted proxy")
        self.wrappedFactory = wrappedFactory
        self.trustedProxies = tuple(trustedProxies)
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = getattr(wrapped, "logPrefix", None)
        name = prefix() if callable(prefix) else wrapped.__class__.__name__
        return f"{name} (PROXY)"

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocolWrapper | None:
        """
        A wrapper for a connection from C{addr}, or C{None} (the listening
        port then closes the connection at once) unless C{addr} is in
        L{trustedProxies}.
        """
        host = getattr(addr, "host", None)
        if not isinstance(host, str) or not inNetworks(host, self.trustedProxies):
            log.warn(
                "refused connection from {peer}: not a trusted proxy",
                peer=_hostOf(addr),
            )
            return None
        return ProxyProtocolWrapper(self)
