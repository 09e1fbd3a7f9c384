"""
TLS for the listeners: the server context from PEM files, the minimum
protocol version, and a self-signed certificate for first runs.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1_0,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

#: OpenSSL's numbers for the versions a legacy listener may go down to.
_LEGACY_PROTOCOLS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302}


class LegacyCertificateOptions(ssl.CertificateOptions):
    """
    Options for a legacy listener (C{minimum_tls_version = "TLSv1"} or
    C{"TLSv1.1"}): OpenSSL 3 refuses those versions at its default security
    level (and Debian's system configuration raises the floor to TLS 1.2),
    so the floor and the security level are lowered on the context itself.
    """

    def __init__(self, protocol: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._legacyProtocol = protocol

    def _makeContext(self, *args: Any, **kwargs: Any) -> Any:
        context = super()._makeContext(*args, **kwargs)
        context.set_min_proto_version(self._legacyProtocol)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        return context


PrivateKey = PrivateKeyTypes

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def loadCertificates(certificatePath: str) -> list[x509.Certificate]:
    """
    Every certificate in a PEM file: the server's first, then its chain.

    @raise OSError: if the file cannot be read.
    @raise ValueError: if it holds no usable PEM certificate.
    """
    with open(certificatePath, "rb") as f:
        pem = f.read()
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise ValueError(
            f'"{certificatePath}" holds no usable PEM certificate: '
            "no BEGIN CERTIFICATE block"
        )
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise ValueError(
            f'"{certificatePath}" holds no usable PEM certificate: {e}'
        ) from None


def loadPrivateKey(privateKeyPath: str) -> PrivateKey:
    """
    The private key in a PEM file.

    @raise OSError: if the file cannot be read.
    @raise ValueError: if it holds no usable key, or an encrypted one (a
        service has nobody to type the passphrase).
    """
    with open(privateKeyPath, "rb") as f:
        pem = f.read()
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError(
            f'"{privateKeyPath}" is encrypted; the relay cannot ask for a '
            "passphrase, so store the key unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(
            f'"{privateKeyPath}" holds no usable PEM private key: {e}'
        ) from None


def keyMatches(key: PrivateKey, certificate: x509.Certificate) -> bool:
    """
    Whether C{key} is the private key of C{certificate}.
    """
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(
        der, spki
    ) == certificate.public_key().public_bytes(der, spki)


def serverContextFactory(
    certificatePath: str, privateKeyPath: str, minimumVersion: str = "TLSv1.2"
) -> ssl.CertificateOptions:
    """
    The context factory for the listeners: the certificate and its chain
    (C{fullchain.pem}), the private key, and no protocol below
    C{minimumVersion}.

    @raise OSError: for unreadable files.
    @raise ValueError: for unusable files, a key that does not match the
        certificate, or an unknown version.
    """
    if minimumVersion not in VERSIONS:
        raise ValueError(f"unknown TLS version {minimumVersion!r}")
    certs = loadCertificates(certificatePath)
    key = loadPrivateKey(privateKeyPath)
    if not keyMatches(key, certs[0]):
        raise ValueError(
            f"private key {privateKeyPath} does not match certificate {certificatePath}"
        )
    # pyOpenSSL takes cryptography's objects directly (its own X509/PKey
    # wrappers are deprecated); Twisted's annotations still name the old ones.
    # Session tickets (RFC 5077, TLS 1.3's resumption): a client that
    # reconnects skips the key exchange and the signature.  The ticket key
    # is OpenSSL's, random per context: made at start and on each reload.
    if minimumVersion in _LEGACY_PROTOCOLS:
        return LegacyCertificateOptions(
            _LEGACY_PROTOCOLS[minimumVersion],
            privateKey=key,
            certificate=certs[0],
            extraCertChain=certs[1:],
            insecurelyLowerMinimumTo=VERSIONS[minimumVersion],
            enableSessionTickets=True,
        )
    return ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=certs[0],  # type: ignore[arg-type]
        extraCertChain=certs[1:],  # type: ignore[arg-type]
        raiseMinimumTo=VERSIONS[minimumVersion],
        enableSessionTickets=True,
    )


@implementer(IOpenSSLContextFactory)
class ReloadableContext:
    """
    The listeners' TLS context factory, whose certificate can be replaced
    while the relay runs (a renewed certificate, on SIGHUP): every new
    connection and STARTTLS uses the current one.
    """

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> Any:
        return self.options.getContext()


def generateSelfSigned(
    certificatePath: str, privateKeyPath: str, hostname: str, days: int = 825
) -> None:
    """
    Write a new self-signed certificate for C{hostname} (and C{localhost},
    127.0.0.1, ::1) and its private key (mode 0600).
    """
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    altNames: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        altNames.append(x509.DNSName("localhost"))
    altNames += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(altNames), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyPem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(privateKeyPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when replacing an existing, laxer file
    with os.fdopen(fd, "wb") as f:
        f.write(keyPem)
    with open(certificatePath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
