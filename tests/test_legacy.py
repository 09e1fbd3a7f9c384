"""
The legacy lane: old scanners and printers in C{[relay] trusted_networks}
that cannot do better may use TLS 1.0, log in without TLS and end lines
with a bare LF; everyone else may not, and such mail is tagged in Received.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import ssl
import uuid

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpauth_relay.config import ConfigError, parseConfig
from tests.e2e_support import (
    CLIENT_NAME,
    IO_TIMEOUT,
    PASSWORD,
    USER,
    RawSMTP,
    RelayProcess,
    poll,
)
from tests.support import Harness, Session, plain
from tests.test_config import complete, writeCertificate

LAN = ipaddress.ip_network("192.0.2.0/24")
DEVICE = "192.0.2.50"
OUTSIDER = "198.51.100.7"


def legacyHarness(**settings: object) -> Harness:
    return Harness(trustedNetworks=(str(LAN),), **settings)


def sendMessage(session: Session, body: bytes) -> list[bytes]:
    session.command(b"MAIL FROM:<scanner@example.org>")
    session.command(b"RCPT TO:<office@example.net>")
    assert session.command(b"DATA")[-1].startswith(b"354")
    return session.send(body)


class PlaintextAuthTests(SynchronousTestCase):
    """
    C{allow_plaintext_auth_from}: AUTH before TLS for those networks only.
    """

    def setUp(self) -> None:
        self.harness = legacyHarness(tlsMode="none", plaintextAuthFrom=(LAN,))

    def test_deviceLogsInWithoutTLS(self) -> None:
        """
        A device in the network sees AUTH in EHLO without TLS and logs in;
        its mail's Received says so, with ESMTPA (authenticated, not TLS).
        """
        session = self.harness.connect(DEVICE)
        ehlo = session.command(b"EHLO scanner.lan")
        self.assertIn(b"250 AUTH PLAIN LOGIN", ehlo)
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"235 2.7.0 Authentication successful",
        )
        self.assertTrue(
            sendMessage(session, b"Subject: scan\r\n\r\npage\r\n.\r\n")[-1].startswith(
                b"250"
            )
        )
        (message,) = (m for _, m in self.harness.spool.messages.values())
        received = message.split(b"\n\t(legacy", 1)
        self.assertEqual(len(received), 2, message)
        self.assertIn(b"(legacy device: AUTH without TLS)", message)
        self.assertIn(b"with ESMTPA", message)

    def test_othersStillNeedTLS(self) -> None:
        """
        From any other address AUTH is neither offered nor accepted before
        TLS (538 5.7.11).
        """
        session = self.harness.connect(OUTSIDER)
        ehlo = session.command(b"EHLO somewhere")
        self.assertFalse([line for line in ehlo if b"AUTH" in line])
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"538 5.7.11 Encryption required for requested authentication mechanism",
        )


class BareLFTests(SynchronousTestCase):
    """
    C{allow_bare_lf_from}: bare LF is a line end for those networks only.
    """

    def setUp(self) -> None:
        self.harness = legacyHarness(tlsMode="implicit", bareLFFrom=(LAN,))

    def test_deviceBareLFNormalised(self) -> None:
        """
        A device's LF-only message, ended by LF . LF, is accepted; its lines
        are stored as lines (sent on as CRLF), a dot-stuffed line is
        unstuffed, and Received notes the bare LF.
        """
        session = self.harness.connect(DEVICE)
        session.login()
        reply = sendMessage(
            session, b"Subject: scan\n\nline one\r\n..dotted\nlast\n.\n"
        )
        self.assertTrue(reply[-1].startswith(b"250 2.0.0"), reply)
        (message,) = (m for _, m in self.harness.spool.messages.values())
        self.assertTrue(
            message.endswith(b"Subject: scan\n\nline one\n.dotted\nlast\n"), message
        )
        self.assertIn(b"(legacy device: bare LF accepted)", message)

    def test_othersRefused(self) -> None:
        """
        The same message from any other address is refused (550 5.6.11),
        as SMTP smuggling defences require.
        """
        session = self.harness.connect(OUTSIDER)
        session.login()
        reply = sendMessage(session, b"Subject: x\n\nline\r\n.\r\n")
        self.assertTrue(reply[-1].startswith(b"550 5.6.11"), reply)
        self.assertEqual(self.harness.spool.messages, {})


class OldTLSTests(SynchronousTestCase):
    """
    A listener whose C{minimum_tls_version} is below C{[tls]
    minimum_version}: the old version only for the trusted networks.
    """

    def connect(self, peer: str) -> tuple[Harness, Session]:
        harness = legacyHarness(
            tlsMode="starttls", tlsFloor="TLSv1.2", legacyTLSFrom=(LAN,)
        )
        session = harness.connect(peer)
        session.transport.tlsVersion = "TLSv1"
        return harness, session

    def test_deviceMayUseTLS10(self) -> None:
        """
        A device in the trusted networks completes a TLS 1.0 handshake and
        sends mail; Received names the old version as a legacy allowance.
        """
        harness, session = self.connect(DEVICE)
        session.startTLS()
        self.assertEqual(session.login(), b"235 2.7.0 Authentication successful")
        sendMessage(session, b"Subject: scan\r\n\r\npage\r\n.\r\n")
        (message,) = (m for _, m in harness.spool.messages.values())
        self.assertIn(b"(legacy device: TLSv1)", message)

    def test_othersDisconnected(self) -> None:
        """
        Anyone else who negotiates TLS 1.0 is told 421 4.7.0 and
        disconnected.
        """
        harness, session = self.connect(OUTSIDER)
        session.startTLS()
        harness.clock.advance(0)
        self.assertEqual(
            session.read(), [b"421 4.7.0 TLS version too old; use TLS 1.2 or later"]
        )
        self.assertTrue(session.closed())

    def test_currentTLSNotTagged(self) -> None:
        """
        A device using TLS 1.3 is not tagged.
        """
        harness, session = self.connect(DEVICE)
        session.transport.tlsVersion = "TLSv1.3"
        session.startTLS()
        session.login()
        sendMessage(session, b"Subject: scan\r\n\r\npage\r\n.\r\n")
        (message,) = (m for _, m in harness.spool.messages.values())
        self.assertNotIn(b"legacy", message)


class LegacyConfigTests(SynchronousTestCase):
    """
    The legacy lane's keys in C{[[listener]]}.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        certificate, key = writeCertificate(directory)
        self.tls = f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'

    def text(self, listener: str, trusted: str = '["192.0.2.0/24"]') -> str:
        return complete(
            self.tls
            + "[[listener]]\n"
            + listener
            + "\n[relay]\ntrusted_networks = "
            + trusted
            + "\n"
        )

    def problems(self, listener: str, trusted: str = '["192.0.2.0/24"]') -> list[str]:
        try:
            parseConfig(self.text(listener, trusted), "relay.toml")
        except ConfigError as e:
            return e.problems
        return []

    def test_valid(self) -> None:
        """
        A LAN listener with all three keys, inside the trusted networks, is
        accepted and read.
        """
        listener = (
            'endpoint = "tcp:port=2525:interface=192.0.2.1"\n'
            'tls = "starttls"\n'
            'minimum_tls_version = "TLSv1"\n'
            'allow_plaintext_auth_from = ["192.0.2.0/25"]\n'
            'allow_bare_lf_from = ["192.0.2.50/32"]\n'
        )
        self.assertEqual(self.problems(listener), [])
        config = parseConfig(self.text(listener), "relay.toml")
        (first,) = [
            x for x in config.listeners if x.endpoint.startswith("tcp:port=2525")
        ]
        self.assertEqual(first.minimum_tls_version, "TLSv1")
        self.assertEqual(
            first.allow_plaintext_auth_from, (ipaddress.ip_network("192.0.2.0/25"),)
        )

    def test_outsideTrustedNetworks(self) -> None:
        """
        Networks outside C{[relay] trusted_networks} are refused.
        """
        problems = self.problems(
            'endpoint = "tcp:port=2525:interface=192.0.2.1"\n'
            'allow_plaintext_auth_from = ["10.0.0.0/8"]\n'
            'allow_bare_lf_from = ["0.0.0.0/0"]\n'
        )
        self.assertEqual(len(problems), 2, problems)
        self.assertIn(
            "allow_plaintext_auth_from: 10.0.0.0/8 is not within [relay]"
            " trusted_networks",
            problems[0],
        )
        self.assertIn("allow_bare_lf_from: 0.0.0.0/0 is not within", problems[1])

    def test_plaintextNeedsLANListener(self) -> None:
        """
        Plaintext AUTH needs a TCP listener bound to a private, loopback or
        link-local address; all interfaces or a public one is refused.
        """
        for endpoint in (
            "tcp:port=2525",
            "tcp:port=2525:interface=0.0.0.0",
            "tcp:port=2525:interface=8.8.8.8",
            "systemd:domain=INET:index=0",
        ):
            problems = self.problems(
                f'endpoint = "{endpoint}"\n'
                'allow_plaintext_auth_from = ["192.0.2.0/24"]\n'
            )
            self.assertEqual(len(problems), 1, (endpoint, problems))
            self.assertIn("allow_plaintext_auth_from", problems[0])
        self.assertEqual(
            self.problems(
                'endpoint = "tcp6:port=2525:interface=fd00\\\\:\\\\:5"\n'
                'allow_plaintext_auth_from = ["fd00::/64"]\n',
                trusted='["fd00::/64"]',
            ),
            [],
        )

    def test_badVersion(self) -> None:
        """
        An unknown version, or one on a listener without TLS, is refused.
        """
        (problem,) = self.problems(
            'endpoint = "tcp:port=2525"\nminimum_tls_version = "SSLv3"\n'
        )
        self.assertIn('minimum_tls_version: "SSLv3" is not one of "TLSv1"', problem)
        (problem,) = self.problems(
            'endpoint = "tcp:port=2525"\ntls = "none"\nminimum_tls_version = "TLSv1"\n'
        )
        self.assertIn('has no effect with tls = "none"', problem)


# -- end to end ---------------------------------------------------------------

LEGACY_SOURCE = "127.77.200.1"
"""A loopback address in the relay's trusted networks (the old scanner)."""
OTHER_SOURCE = "127.0.0.1"


def tls10Context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


class LegacyLaneEndToEndTests(SynchronousTestCase):
    """
    A real relay with a legacy LAN listener, driven by a TLS 1.0 client and
    a plaintext client from a trusted address and from another.
    """

    def setUp(self) -> None:
        try:
            tls10Context().wrap_socket(socket.socket(), do_handshake_on_connect=False)
        except ssl.SSLError as e:  # pragma: no cover - depends on the OpenSSL build
            raise SkipTest(f"this OpenSSL cannot speak TLS 1.0: {e}") from None
        lan = ["127.77.200.0/24"]
        relay = RelayProcess(
            perListener={
                "implicit": {"minimum_tls_version": "TLSv1", "allow_bare_lf_from": lan},
                "none": {"allow_plaintext_auth_from": lan},
            },
            relay={"trusted_networks": lan},
        )
        self.addCleanup(relay.remove)
        relay.start()
        self.relay = relay

    def client(self, source: str, implicit: bool = False) -> RawSMTP:
        port = self.relay.implicitPort if implicit else self.relay.plainPort
        client = RawSMTP(
            port, implicitTLS=implicit, context=tls10Context(), sourceAddress=source
        )
        self.addCleanup(client.close)
        return client

    def auth(self) -> str:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        return f"AUTH PLAIN {token}"

    def test_tls10FromTrustedAddress(self) -> None:
        """
        Over implicit TLS 1.0 from the trusted address: login, and a message
        with bare LFs accepted and delivered line by line, its Received
        tagged; from another address, TLS 1.0 is cut off with 421.
        """
        client = self.client(LEGACY_SOURCE, implicit=True)
        self.assertEqual(client.reply().code, 220)
        self.assertEqual(client.command(f"EHLO {CLIENT_NAME}").code, 250)
        self.assertEqual(client.command(self.auth()).code, 235)
        marker = uuid.uuid4().hex
        self.assertEqual(client.command("MAIL FROM:<scanner@example.org>").code, 250)
        self.assertEqual(client.command("RCPT TO:<office@example.net>").code, 250)
        self.assertEqual(client.command("DATA").code, 354)
        client.send(f"Subject: {marker}\n\nfirst\nsecond\n.\n".encode())
        self.assertEqual(client.reply().code, 250)
        delivered = self.relay.waitForDelivery(marker.encode())
        self.assertIn(b"(legacy device: TLSv1, bare LF accepted)", delivered)
        self.assertIn(b"first\nsecond\n", delivered.replace(b"\r\n", b"\n"))

        other = self.client(OTHER_SOURCE, implicit=True)
        other.sock.settimeout(IO_TIMEOUT)
        self.assertEqual(
            [str(r) for r in other.readUntilClosed()],
            [
                "220 relay-e2e.test ESMTP smtpauth-relay",
                "421 4.7.0 TLS version too old; use TLS 1.2 or later",
            ],
        )
        poll(
            lambda: "refused TLSv1 from 127.0.0.1" in self.relay.log(),
            10.0,
            lambda: self.relay.log(),
        )

    def test_plaintextAuth(self) -> None:
        """
        On the listener without TLS, the trusted address logs in in clear;
        another address gets 538 5.7.11.
        """
        client = self.client(LEGACY_SOURCE)
        self.assertEqual(client.reply().code, 220)
        self.assertEqual(client.command(f"EHLO {CLIENT_NAME}").code, 250)
        self.assertEqual(client.command(self.auth()).code, 235)
        other = self.client(OTHER_SOURCE)
        self.assertEqual(other.reply().code, 220)
        self.assertEqual(other.command(f"EHLO {CLIENT_NAME}").code, 250)
        reply = other.command(self.auth())
        self.assertEqual((reply.code, reply.enhanced), (538, "5.7.11"))
        self.assertIn("AUTH without TLS allowed from 127.77.200.0/24", self.relay.log())
