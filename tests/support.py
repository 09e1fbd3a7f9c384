"""
Helpers for driving L{smtpauth_relay.server.RelayESMTP} in memory.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from zope.interface import directlyProvides

from smtpauth_relay.auth import makePortal
from smtpauth_relay.config import LimitsConfig, LockoutConfig
from smtpauth_relay.limits import RateLimits
from smtpauth_relay.lockout import Lockout
from smtpauth_relay.policy import RelayPolicy
from smtpauth_relay.server import (
    ConnectionLimiter,
    RelayESMTP,
    RelayServerFactory,
    SessionSettings,
)
from smtpauth_relay.testing import MemoryChecker, MemorySpool, TLSStringTransport

CONTEXT = object()
"""Stands in for the TLS context factory; the fake transport only records it."""


def plain(user: str, password: str, authzid: str = "") -> bytes:
    """
    The base64 AUTH PLAIN response.
    """
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


class Harness:
    """
    One factory (with a memory spool, a memory checker and a clock) and the
    sessions connected to it.
    """

    def __init__(
        self,
        trustedNetworks: tuple[str, ...] = (),
        trustedRelays: tuple[str, ...] = (),
        maxConnections: int = 100,
        maxPerAddress: int = 20,
        lockout: LockoutConfig | None = None,
        limits: LimitsConfig | None = None,
        **settings: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.spool = MemorySpool()
        self.checker = MemoryChecker(alice="wonderland", bob="builder")
        self.portal = makePortal([self.checker], self.clock)
        self.policy = RelayPolicy(
            trustedNetworks=tuple(ipaddress.ip_network(n) for n in trustedNetworks),
            trustedRelays=tuple(ipaddress.ip_network(n) for n in trustedRelays),
        )
        self.limiter = ConnectionLimiter(maxConnections, maxPerAddress)
        self.settings = replace(
            SessionSettings(hostname="relay.example.org"), **settings
        )
        self.factory = RelayServerFactory(
            self.settings,
            self.portal,
            self.spool,
            self.policy,
            self.limiter,
            self.clock,
            CONTEXT,
            lockout=Lockout(lockout, self.clock) if lockout is not None else None,
            limits=RateLimits(limits, self.clock) if limits is not None else None,
        )

    def connect(self, peer: str = "192.0.2.10") -> Session:
        if ":" in peer:
            address: Any = IPv6Address("TCP", peer, 40000)
        else:
            address = IPv4Address("TCP", peer, 40000)
        transport = TLSStringTransport(peerAddress=address)
        if self.settings.tlsMode == "implicit":
            directlyProvides(transport, ISSLTransport)
        protocol = self.factory.buildProtocol(address)
        protocol.makeConnection(transport)
        self.settle()
        if self.settings.tlsMode == "implicit":
            protocol.handshakeCompleted()
        return Session(protocol, transport, self.settle)

    def settle(self) -> None:
        """
        Let what the sessions started finish (nothing here; a worker's
        harness delivers its channel's messages).
        """


class Session:
    """
    One connected session: send bytes, read the reply lines.
    """

    def __init__(
        self,
        protocol: RelayESMTP,
        transport: TLSStringTransport,
        settle: Callable[[], None] = lambda: None,
    ) -> None:
        self.protocol = protocol
        self.transport = transport
        self.settle = settle
        self.greeting = self.read()

    def read(self) -> list[bytes]:
        """
        The reply lines written since the last read.
        """
        self.settle()
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1]

    def send(self, data: bytes) -> list[bytes]:
        self.protocol.dataReceived(data)
        return self.read()

    def command(self, line: bytes) -> list[bytes]:
        return self.send(line + b"\r\n")

    def last(self, line: bytes) -> bytes:
        """
        The last reply line to a command.
        """
        replies = self.command(line)
        return replies[-1] if replies else b""

    def startTLS(self) -> None:
        """
        EHLO, STARTTLS, and check the 220 went out before the switch.
        """
        self.command(b"EHLO client.example")
        self.command(b"STARTTLS")
        assert self.transport.beforeTLS == b"220 2.0.0 Ready to start TLS\r\n"
        self.protocol.handshakeCompleted()

    def login(self, user: str = "alice", password: str = "wonderland") -> bytes:
        self.last(b"EHLO client.example")
        return self.last(b"AUTH PLAIN " + plain(user, password))

    def closed(self) -> bool:
        return bool(self.transport.disconnecting)
