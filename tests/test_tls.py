"""
Tests for L{smtpauth_relay.tls}, with TLS handshakes run in memory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from smtpauth_relay.tls import (
    VERSIONS,
    LegacyCertificateOptions,
    generateSelfSigned,
    loadCertificates,
    serverContextFactory,
)


@implementer(IHandshakeListener)
class HandshakeRecorder(Protocol):
    """
    Records whether the TLS handshake completed and how the connection
    ended, and what was received.
    """

    def __init__(self) -> None:
        self.handshook = False
        self.lost: Failure | None = None
        self.received = b""

    def handshakeCompleted(self) -> None:
        self.handshook = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


def handshake(
    serverOptions: Any, clientOptions: Any
) -> tuple[HandshakeRecorder, HandshakeRecorder, iosim.IOPump]:
    """
    Connect a TLS client and server in memory and run the handshake.

    @return: the server's and the client's application protocols, and the
        pump between them.
    """
    clock = Clock()
    server = HandshakeRecorder()
    client = HandshakeRecorder()
    serverFactory = TLSMemoryBIOFactory(
        serverOptions,
        False,
        Factory.forProtocol(lambda: server),
        clock,
    )
    clientFactory = TLSMemoryBIOFactory(
        clientOptions,
        True,
        Factory.forProtocol(lambda: client),
        clock,
    )
    _, _, pump = iosim.connectedServerAndClient(
        lambda: serverFactory.buildProtocol(None),
        lambda: clientFactory.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return server, client, pump


def newKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def makeCertificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuerKey: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    """
    A certificate for C{subject} signed by C{issuerKey}.
    """
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(issuerKey, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def keyPem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class GenerateSelfSignedTests(SynchronousTestCase):
    """
    Tests for L{generateSelfSigned}.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.cert = os.path.join(self.directory, "cert.pem")
        self.key = os.path.join(self.directory, "key.pem")

    def test_keyMode(self) -> None:
        """
        The private key is readable by its owner only.
        """
        generateSelfSigned(self.cert, self.key, "relay.example.org")
        self.assertEqual(stat.S_IMODE(os.stat(self.key).st_mode), 0o600)

    def test_existingKeyMode(self) -> None:
        """
        Overwriting an existing, world-readable key file still leaves the new
        key readable by its owner only.
        """
        with open(self.key, "w") as f:
            f.write("old")
        os.chmod(self.key, 0o644)
        generateSelfSigned(self.cert, self.key, "relay.example.org")
        self.assertEqual(stat.S_IMODE(os.stat(self.key).st_mode), 0o600)

    def test_subjectAltNames(self) -> None:
        """
        The certificate names the host, C{localhost}, 127.0.0.1 and ::1, and
        is not a CA.
        """
        generateSelfSigned(self.cert, self.key, "relay.example.org")
        [cert] = loadCertificates(self.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["relay.example.org", "localhost"]
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertFalse(
            cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        )
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            "relay.example.org",
        )

    def test_localhostOnce(self) -> None:
        """
        For C{localhost} itself the name is listed once.
        """
        generateSelfSigned(self.cert, self.key, "localhost")
        [cert] = loadCertificates(self.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])

    def test_validity(self) -> None:
        """
        The certificate is valid now and for the number of days asked.
        """
        generateSelfSigned(self.cert, self.key, "localhost", days=10)
        [cert] = loadCertificates(self.cert)
        now = datetime.datetime.now(datetime.UTC)
        self.assertLess(cert.not_valid_before_utc, now)
        remaining = cert.not_valid_after_utc - now
        self.assertGreater(remaining, datetime.timedelta(days=9, hours=23))
        self.assertLessEqual(remaining, datetime.timedelta(days=10))

    def test_loadsAsServerContext(self) -> None:
        """
        The files written make a server context factory.
        """
        generateSelfSigned(self.cert, self.key, "localhost")
        self.assertIsInstance(
            serverContextFactory(self.cert, self.key), ssl.CertificateOptions
        )


class ServerContextFactoryTests(SynchronousTestCase):
    """
    Tests for L{serverContextFactory} and L{loadCertificates}.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.cert = os.path.join(self.directory, "cert.pem")
        self.key = os.path.join(self.directory, "key.pem")
        generateSelfSigned(self.cert, self.key, "localhost")

    def clientOptions(self, maximum: ssl.TLSVersion | None = None) -> Any:
        """
        A client context that does not verify the server.
        """
        if maximum is None:
            return ssl.CertificateOptions(verify=False)
        return ssl.CertificateOptions(lowerMaximumSecurityTo=maximum, verify=False)

    def test_handshake(self) -> None:
        """
        A client completes a handshake and exchanges data with the server.
        """
        server, client, pump = handshake(
            serverContextFactory(self.cert, self.key), self.clientOptions()
        )
        self.assertTrue(server.handshook)
        self.assertTrue(client.handshook)
        assert client.transport is not None
        client.transport.write(b"EHLO client.example\r\n")
        pump.flush()
        self.assertEqual(server.received, b"EHLO client.example\r\n")

    def resumed(self, options: Any, maximum: Any = None) -> tuple[bool, bool]:
        """
        Two handshakes of a stdlib client with C{options} in memory, the
        second offering the session of the first.

        @return: whether each handshake resumed a session.
        """
        import ssl as stdlib

        from OpenSSL import SSL

        context = stdlib.SSLContext(stdlib.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = stdlib.CERT_NONE
        if maximum is not None:
            context.maximum_version = maximum
        serverContext = options.getContext()

        def connect(session: Any) -> Any:
            server = SSL.Connection(serverContext, None)
            server.set_accept_state()
            incoming, outgoing = stdlib.MemoryBIO(), stdlib.MemoryBIO()
            client = context.wrap_bio(incoming, outgoing, session=session)
            for _ in range(10):
                for step in (client.do_handshake, lambda: client.read(1)):
                    try:
                        step()
                    except (stdlib.SSLWantReadError, stdlib.SSLError):
                        pass
                data = outgoing.read()
                if data:
                    server.bio_write(data)
                for step in (server.do_handshake, lambda: server.recv(1)):
                    try:
                        step()
                    except (SSL.WantReadError, SSL.Error):
                        pass
                try:
                    incoming.write(server.bio_read(65536))
                except SSL.WantReadError:
                    pass
            return client

        first = connect(None)
        second = connect(first.session)
        return first.session_reused, second.session_reused

    def test_sessionResumption(self) -> None:
        """
        A client reconnecting (a mail client sending again, a scanner) can
        resume its TLS session with a ticket, TLS 1.3 and 1.2 alike,
        instead of a full handshake with a new key exchange and signature.
        """
        import ssl as stdlib

        options = serverContextFactory(self.cert, self.key)
        self.assertEqual(self.resumed(options), (False, True))
        self.assertEqual(
            self.resumed(options, stdlib.TLSVersion.TLSv1_2), (False, True)
        )

    def test_defaultMinimumAcceptsTLS12(self) -> None:
        """
        By default TLSv1.2 clients are accepted.
        """
        server, client, _ = handshake(
            serverContextFactory(self.cert, self.key),
            self.clientOptions(ssl.TLSVersion.TLSv1_2),
        )
        self.assertTrue(server.handshook)
        transport: Any = client.transport
        self.assertEqual(transport.getHandle().get_protocol_version_name(), "TLSv1.2")

    def test_minimumTLS13RefusesTLS12(self) -> None:
        """
        With a minimum of TLSv1.3 a client that speaks at most TLSv1.2 fails
        the handshake.
        """
        server, client, _ = handshake(
            serverContextFactory(self.cert, self.key, "TLSv1.3"),
            self.clientOptions(ssl.TLSVersion.TLSv1_2),
        )
        self.assertFalse(server.handshook)
        self.assertFalse(client.handshook)
        self.assertIsNotNone(server.lost)
        self.assertIsNotNone(client.lost)

    def test_minimumTLS13AcceptsTLS13(self) -> None:
        """
        With a minimum of TLSv1.3 a TLSv1.3 client is accepted.
        """
        server, client, _ = handshake(
            serverContextFactory(self.cert, self.key, "TLSv1.3"), self.clientOptions()
        )
        self.assertTrue(server.handshook)
        transport: Any = client.transport
        self.assertEqual(transport.getHandle().get_protocol_version_name(), "TLSv1.3")

    def test_neverBelowTLS12(self) -> None:
        """
        A TLSv1.1 client is refused even with the default minimum.
        """
        server, _, _ = handshake(
            serverContextFactory(self.cert, self.key),
            ssl.CertificateOptions(
                insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_1,
                lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_1,
                verify=False,
            ),
        )
        self.assertFalse(server.handshook)

    def test_unknownVersion(self) -> None:
        """
        An unknown minimum version is a L{ValueError} naming it.
        """
        for version in ("TLSv1.0", "tlsv1.2", "SSLv3", ""):
            with self.assertRaises(ValueError) as e:
                serverContextFactory(self.cert, self.key, version)
            self.assertIn(repr(version), str(e.exception))
        self.assertEqual(sorted(VERSIONS), ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"])

    def test_legacyMinimumAcceptsTLS10(self) -> None:
        """
        A legacy listener's minimum of TLSv1 lets a TLS 1.0-only client
        (an old scanner) complete the handshake, which the default refuses.
        """
        for version, expected in (("TLSv1", True), ("TLSv1.2", False)):
            oldClient = LegacyCertificateOptions(
                0x0301,
                insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0,
                lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_0,
                verify=False,
            )
            server, client, _ = handshake(
                serverContextFactory(self.cert, self.key, version), oldClient
            )
            self.assertEqual(server.handshook, expected, version)
            if expected:
                transport: Any = client.transport
                self.assertEqual(
                    transport.getHandle().get_protocol_version_name(), "TLSv1"
                )

    def test_keyMismatch(self) -> None:
        """
        A key that does not belong to the certificate is a L{ValueError}
        naming both files.
        """
        otherCert = os.path.join(self.directory, "other-cert.pem")
        otherKey = os.path.join(self.directory, "other-key.pem")
        generateSelfSigned(otherCert, otherKey, "localhost")
        with self.assertRaises(ValueError) as e:
            serverContextFactory(self.cert, otherKey)
        self.assertIn(self.cert, str(e.exception))
        self.assertIn(otherKey, str(e.exception))

    def test_noCertificate(self) -> None:
        """
        A file without a PEM certificate is a L{ValueError} naming it.
        """
        empty = os.path.join(self.directory, "empty.pem")
        with open(empty, "wb") as f:
            f.write(b"not a certificate\n")
        with self.assertRaises(ValueError) as e:
            loadCertificates(empty)
        self.assertIn(empty, str(e.exception))
        self.assertRaises(ValueError, serverContextFactory, self.key, self.key)

    def test_missingFile(self) -> None:
        """
        A missing certificate or key file is an L{OSError}.
        """
        missing = os.path.join(self.directory, "missing.pem")
        self.assertRaises(OSError, serverContextFactory, missing, self.key)
        self.assertRaises(OSError, serverContextFactory, self.cert, missing)


class ChainTests(SynchronousTestCase):
    """
    A C{fullchain.pem}: the server certificate followed by an intermediate.
    """

    def setUp(self) -> None:
        rootKey = newKey()
        self.root = makeCertificate("Test Root", rootKey, "Test Root", rootKey, True)
        intermediateKey = newKey()
        self.intermediate = makeCertificate(
            "Test Intermediate", intermediateKey, "Test Root", rootKey, True
        )
        leafKey = newKey()
        self.leaf = makeCertificate(
            "relay.example.org", leafKey, "Test Intermediate", intermediateKey, False
        )
        directory = self.mktemp()
        os.makedirs(directory)
        self.fullchain = os.path.join(directory, "fullchain.pem")
        self.key = os.path.join(directory, "privkey.pem")
        with open(self.fullchain, "wb") as f:
            f.write(pem(self.leaf) + b"\n" + pem(self.intermediate))
        with open(self.key, "wb") as f:
            f.write(keyPem(leafKey))

    def test_loadCertificates(self) -> None:
        """
        Every certificate in the file is loaded, server first.
        """
        self.assertEqual(
            loadCertificates(self.fullchain), [self.leaf, self.intermediate]
        )

    def test_chainSent(self) -> None:
        """
        The server sends the intermediate, so a client that trusts only the
        root verifies the server.
        """
        client = ssl.optionsForClientTLS(
            "relay.example.org",
            trustRoot=ssl.Certificate.loadPEM(pem(self.root)),
        )
        server, clientProtocol, _ = handshake(
            serverContextFactory(self.fullchain, self.key), client
        )
        self.assertTrue(server.handshook)
        self.assertTrue(clientProtocol.handshook)

    def test_leafOnlyNotVerified(self) -> None:
        """
        Without the intermediate, the same client refuses the server: the
        chain test above does depend on the chain being sent.
        """
        leafOnly = self.fullchain + ".leaf"
        with open(leafOnly, "wb") as f:
            f.write(pem(self.leaf))
        client = ssl.optionsForClientTLS(
            "relay.example.org",
            trustRoot=ssl.Certificate.loadPEM(pem(self.root)),
        )
        _, clientProtocol, _ = handshake(
            serverContextFactory(leafOnly, self.key), client
        )
        self.assertFalse(clientProtocol.handshook)

    def test_keyMatchesFirst(self) -> None:
        """
        The key must match the first certificate in the file.
        """
        reversed_ = self.fullchain + ".reversed"
        with open(reversed_, "wb") as f:
            f.write(pem(self.intermediate) + pem(self.leaf))
        self.assertRaises(ValueError, serverContextFactory, reversed_, self.key)
