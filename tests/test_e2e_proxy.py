"""
End-to-end tests of the PROXY protocol: Debian's HAProxy in front of the real
relay (C{twistd -n smtpauth-relay}) on loopback.

Every listener of the relay has C{proxy_protocol = true} and trusts only
127.0.0.1, where HAProxy connects from.  Clients connect to HAProxy from
other loopback addresses (127.0.0.77, ...), and the relay must see those:
in its EHLO reply, its log and the Received header of the delivered
message.  Connections that come to the relay directly from anywhere else are
closed without a word, whatever they send.
"""

from __future__ import annotations

import os
import smtplib
import uuid

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e_support import (
    CLIENT_NAME,
    HAPROXY,
    HOST,
    HOSTNAME,
    IO_TIMEOUT,
    PASSWORD,
    USER,
    HAProxyProcess,
    ProxyRoute,
    RawSMTP,
    RelayProcess,
    clientContext,
    closeQuietly,
    loopbackAddresses,
    poll,
)

skipReason: str | None = None
if not os.access(HAPROXY, os.X_OK):
    skipReason = (
        f"HAProxy is not installed ({HAPROXY}; apt-get install haproxy): the "
        "PROXY protocol is tested through a real one"
    )

LOG_TIMEOUT = 10.0

nextSourceAddress = loopbackAddresses(0, start=76)
"""Loopback addresses from 127.0.0.77 on: never 127.0.0.1, the trusted
proxy's."""


class ThroughHAProxy(SynchronousTestCase):
    """
    One relay and one HAProxy in front of it, shared by the tests of the
    class: started by the first test, stopped after the last (and at exit
    whatever happens).
    """

    if skipReason is not None:
        skip = skipReason

    _shared: tuple[RelayProcess, HAProxyProcess] | None = None
    _startError: BaseException | None = None
    _remaining: set[str] = set()

    relay: RelayProcess
    proxy: HAProxyProcess

    def setUp(self) -> None:
        cls = type(self)
        if cls._startError is not None:
            raise AssertionError(
                f"the relay or HAProxy did not start: {cls._startError}"
            )
        if cls._shared is None:
            relay = RelayProcess(
                listener={"proxy_protocol": True, "trusted_proxies": [f"{HOST}/32"]}
            )
            proxy: HAProxyProcess | None = None
            try:
                relay.start()
                proxy = HAProxyProcess(
                    {
                        "v1": ProxyRoute(relay.starttlsPort, 1),
                        "v2": ProxyRoute(relay.starttlsPort, 2),
                        "v1tls": ProxyRoute(relay.implicitPort, 1),
                        "v2tls": ProxyRoute(relay.implicitPort, 2),
                    }
                )
                proxy.start()
            except BaseException as e:
                cls._startError = e
                if proxy is not None:
                    proxy.remove()
                relay.remove()
                raise
            cls._shared = (relay, proxy)
            cls._remaining = {n for n in dir(cls) if n.startswith("test_")}
        self.relay, self.proxy = cls._shared
        self.addCleanup(self._finished)

    def _finished(self) -> None:
        cls = type(self)
        cls._remaining.discard(self._testMethodName)
        shared = cls._shared
        if shared is None:
            return
        relay, proxy = shared
        for name, process, log in (
            ("relay", relay.process, relay.log),
            ("HAProxy", proxy.process, proxy.log),
        ):
            if process is not None and process.poll() is not None:
                cls._shared = None
                proxy.remove()
                relay.remove()
                raise AssertionError(
                    f"{name} died with status {process.returncode}:\n{log()}"
                )
        if not cls._remaining:
            cls._shared = None
            proxy.remove()
            relay.remove()

    # -- helpers --------------------------------------------------------------

    def client(self, route: str, source: str) -> smtplib.SMTP:
        """
        An smtplib session through HAProxy's frontend C{route}, from
        C{source}, greeting read (implicit TLS for the C{tls} routes).
        """
        port = self.proxy.ports[route]
        client: smtplib.SMTP
        if route.endswith("tls"):
            client = smtplib.SMTP_SSL(
                HOST,
                port,
                local_hostname=CLIENT_NAME,
                timeout=IO_TIMEOUT,
                source_address=(source, 0),
                context=clientContext(),
            )
        else:
            client = smtplib.SMTP(
                HOST,
                port,
                local_hostname=CLIENT_NAME,
                timeout=IO_TIMEOUT,
                source_address=(source, 0),
            )
        self.addCleanup(closeQuietly, client)
        return client

    def waitForLog(self, text: str) -> None:
        poll(
            lambda: text in self.relay.log(),
            LOG_TIMEOUT,
            lambda: f"{text!r} in the relay's log:\n{self.relay.log()}",
        )

    def assertSubmittedThrough(self, route: str) -> None:
        """
        Through C{route}, from a fresh source address: the EHLO reply names
        that address, STARTTLS (unless already TLS) and AUTH work, and the
        delivered message's Received header and the relay's log name it.
        """
        source = nextSourceAddress()
        client = self.client(route, source)
        code, text = client.ehlo()
        self.assertEqual(code, 250)
        self.assertEqual(
            text.split(b"\n")[0],
            f"{HOSTNAME} Hello {CLIENT_NAME} [{source}]".encode(),
        )
        if not route.endswith("tls"):
            client.starttls(context=clientContext())
            client.ehlo()
        client.login(USER, PASSWORD)
        marker = f"e2e-proxy-{route}-{uuid.uuid4().hex}"
        client.sendmail(
            "alice@sender.example",
            ["bob@rcpt.example"],
            f"Subject: {marker}\r\n\r\nthrough HAProxy\r\n".encode(),
        )
        client.quit()
        content = self.relay.waitForDelivery(marker.encode())
        # The Maildir adds Return-Path and X-Envelope-To above it.
        self.assertIn(
            f"\nReceived: from {CLIENT_NAME} ([{source}])\n\t(using TLSv1.".encode(),
            content,
        )
        self.waitForLog(f"AUTH PLAIN ok for {USER} from {source}")

    # -- through HAProxy ----------------------------------------------------------

    def test_v1STARTTLS(self) -> None:
        """
        Through C{send-proxy} (version 1) to the STARTTLS listener the relay
        sees the client's address.
        """
        self.assertSubmittedThrough("v1")

    def test_v2STARTTLS(self) -> None:
        """
        Through C{send-proxy-v2} (version 2) to the STARTTLS listener the
        relay sees the client's address.
        """
        self.assertSubmittedThrough("v2")

    def test_v1Implicit(self) -> None:
        """
        Through C{send-proxy} to the implicit-TLS listener (the header
        before the TLS handshake) the relay sees the client's address.
        """
        self.assertSubmittedThrough("v1tls")

    def test_v2Implicit(self) -> None:
        """
        Through C{send-proxy-v2} to the implicit-TLS listener the relay
        sees the client's address.
        """
        self.assertSubmittedThrough("v2tls")

    # -- around HAProxy ------------------------------------------------------------

    def assertClosedSilently(self, port: int, source: str, data: bytes) -> None:
        """
        A direct connection to the relay's C{port} from C{source} that
        sends C{data} gets no reply and is closed.
        """
        with RawSMTP(port, sourceAddress=source) as raw:
            try:
                raw.send(data)
            except OSError:
                pass  # closed already: what we want
            raw.sock.settimeout(IO_TIMEOUT)
            try:
                self.assertTrue(raw.closedWithoutReply())
            except TimeoutError:
                self.fail(f"{source} -> {port}: the relay kept the connection open")

    def test_directUntrusted(self) -> None:
        """
        A client that connects to the relay itself, not through HAProxy, is
        closed without a greeting, even if it sends a PROXY header of its
        own; the relay logs the refusal and no session of the address it
        claimed.
        """
        for port in (self.relay.starttlsPort, self.relay.implicitPort):
            source = nextSourceAddress()
            forged = f"PROXY TCP4 192.0.2.66 {HOST} 1234 {port}\r\nEHLO x\r\n"
            self.assertClosedSilently(port, source, forged.encode())
            self.waitForLog(f"refused connection from {source}: not a trusted proxy")
        self.assertNotIn("192.0.2.66", self.relay.log())

    def test_directTrustedWithoutHeader(self) -> None:
        """
        A connection from the trusted address that starts with SMTP rather
        than a PROXY header is closed without a reply, logged.
        """
        self.assertClosedSilently(
            self.relay.starttlsPort, HOST, b"EHLO client.e2e.test\r\n"
        )
        self.waitForLog(f"bad PROXY header from {HOST}: not a PROXY header")
