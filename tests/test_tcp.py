"""
Tests for L{smtpauth_relay.tcp}.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpauth_relay.tcp import noDelay
from tests.support import Harness


class RecordingTCP(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.noDelay: list[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay.append(enabled)


class Layer:
    """
    A TLS or PROXY layer: no TCP options of its own, the real transport
    below.
    """

    def __init__(self, transport: object) -> None:
        self.transport = transport


class NoDelayTests(SynchronousTestCase):
    """
    Tests for L{noDelay}.
    """

    def test_underLayers(self) -> None:
        """
        The option is set on the TCP transport under any wrapping layers,
        once.
        """
        tcp = RecordingTCP()
        noDelay(Layer(Layer(tcp)))
        self.assertEqual(tcp.noDelay, [True])

    def test_noTCP(self) -> None:
        """
        A transport without TCP (a UNIX socket) is left alone.
        """
        noDelay(Layer(StringTransport()))
        noDelay(None)

    def test_sessionSetsIt(self) -> None:
        """
        Every SMTP session turns Nagle off on its connection.
        """
        harness = Harness()
        tcp = RecordingTCP()
        protocol = harness.factory.buildProtocol(None)
        protocol.makeConnection(tcp)
        self.assertEqual(tcp.noDelay, [True])


class RealSocketTests(TestCase):
    """
    On a real TCP connection the socket option ends up set.
    """

    async def test_realSocket(self) -> None:
        """
        After L{noDelay}, C{TCP_NODELAY} reads back as set on the socket.
        """
        factory = Factory.forProtocol(Protocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, Protocol())
        self.addCleanup(client.transport.loseConnection)
        handle = client.transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        noDelay(client.transport)
        self.assertNotEqual(
            handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0
        )
