"""
Smarthost delivery: every message goes to one upstream server (the
provider's submission server), over STARTTLS or implicit TLS, with AUTH
(a password, or an OAuth2 token: see L{smtpauth_relay.oauth2}), through a
small pool of reused connections, its sender rewritten if the upstream
takes only its own mailbox (L{smtpauth_relay.rewrite}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay.delivery.client import (
    ClientSettings,
    Outbound,
    RelayClientFactory,
    UpstreamError,
)
from smtpauth_relay.delivery.pool import ConnectionPool
from smtpauth_relay.envelope import DeliveryReport, Envelope
from smtpauth_relay.interfaces import IDeliveryAgent
from smtpauth_relay.oauth2 import TokenClient
from smtpauth_relay.rewrite import RewriteUnavailable, SenderRewriter

log = Logger()


def clientTLSOptions(host: str, verify: bool, caFile: str | None = None) -> Any:
    """
    TLS options towards C{host}: its certificate verified for its name
    (service-identity) against the system's CAs or C{caFile}, unless
    C{verify} is off.
    """
    if not verify:
        return ssl.CertificateOptions(verify=False)
    trustRoot: Any = None
    if caFile:
        with open(caFile, "rb") as f:
            trustRoot = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(block) for block in _pemBlocks(f.read())]
            )
    return ssl.optionsForClientTLS(host, trustRoot=trustRoot)


def _pemBlocks(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [
        block.strip() + b"\n" + end + b"\n"
        for block in pem.split(end)
        if b"-----BEGIN CERTIFICATE-----" in block
    ]


@implementer(IDeliveryAgent)
class SmarthostDelivery:
    """
    Sends every message to one smarthost.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        tls: str,
        heloName: str,
        verify: bool = True,
        caFile: str | None = None,
        username: str = "",
        password: bytes = b"",
        forwardAuthIdentity: bool = False,
        maxConnections: int = 2,
        connectTimeout: float = 30.0,
        timeout: float = 600.0,
        tokens: TokenClient | None = None,
        mechanism: str = "",
        rewriter: SenderRewriter | None = None,
    ) -> None:
        """
        @param tokens: where OAuth2 tokens come from, with C{mechanism}
            (C{"XOAUTH2"} or C{"OAUTHBEARER"}); C{username} is then the
            mailbox and C{password} unused.
        @param rewriter: decides each message's sender rewriting, or
            C{None} for none.
        """
        if (username or tokens is not None) and tls == "none":
            raise ValueError("refusing to send credentials without TLS")
        if (tokens is None) != (not mechanism):
            raise ValueError("give tokens and mechanism together")
        self.rewriter = rewriter
        self.host = host
        self.forwardAuthIdentity = forwardAuthIdentity
        options = clientTLSOptions(host, verify, caFile) if tls != "none" else None
        endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=connectTimeout)
        if tls == "implicit":
            assert options is not None
            endpoint = wrapClientTLS(options, endpoint)
        settings = ClientSettings(
            heloName=heloName,
            host=host,
            username=username,
            password=password,
            startTLS=options if tls == "starttls" else None,
            requireTLS=tls == "starttls",
            mechanism=mechanism,
            port=port,
        )
        self.pool = ConnectionPool(
            RelayClientFactory(settings),
            endpoint.connect,
            reactor,
            maxConnections=maxConnections,
            deadline=timeout,
            tokens=tokens,
        )

    def close(self) -> Deferred[None]:
        """
        Close the connections to the smarthost (at shutdown).
        """
        return self.pool.close()

    def deliver(self, envelope: Envelope, messagePath: str) -> Deferred[DeliveryReport]:
        try:
            rewrite = (
                self.rewriter.forEnvelope(envelope)
                if self.rewriter is not None
                else None
            )
        except RewriteUnavailable as e:
            return fail(UpstreamError(str(e), self.host))
        return self.pool.send(
            Outbound(
                envelope,
                messagePath,
                forwardIdentity=self.forwardAuthIdentity,
                rewrite=rewrite,
            )
        )
