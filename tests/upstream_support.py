"""
A real upstream SMTP server for L{tests.test_e2e_delivery}: aiosmtpd on
127.0.0.1, in its own thread with its own asyncio loop, standing in for the
provider's submission server that the relay uses as its smarthost.

  - TLS as the smarthost offers it: STARTTLS (required before MAIL),
    implicit TLS, or none; its certificate is issued by a test CA
    (L{CertificateAuthority}) that the relay trusts with C{[delivery]
    ca_file}.
  - AUTH PLAIN and LOGIN with one user and password, required before MAIL
    and offered only over TLS.
  - Every transaction that reaches the end of its data is recorded
    (L{Transaction}), with the connection it came on, the login, the
    C{MAIL FROM} parameters exactly as sent, the accepted recipients and the
    content as received; every C{MAIL}, C{RCPT} and C{AUTH} too, with the
    reply given.
  - Recipients script their own replies by their local part: C{tempfail...}
    gets C{451 4.2.0} while L{Upstream.tempfailing} is set, C{reject...}
    gets C{550 5.1.1}; L{Upstream.tempfailAll} answers every C{MAIL} with
    C{451 4.3.0}; L{Upstream.dataReply} refuses the data;
    L{Upstream.dataDelay} makes it slow to answer the data;
    L{Upstream.hanging} makes it take connections and never greet.
  - L{Upstream.stop} takes it down (connections are cut, new ones refused)
    and L{Upstream.start} brings it back on the same port.
  - With C{oauth} (a L{tests.tokenendpoint.TokenIssuer}) it takes only
    XOAUTH2 and OAUTHBEARER (like Microsoft 365 and Gmail without basic
    auth), and only a token the issuer vouches for now, for C{username}.

The tests talk to this object from the test thread; everything it records
is appended in the loop thread under a lock, and read as snapshots.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email
import email.message
import email.policy
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e_support import HOST, freePorts, poll

UPSTREAM_NAME = "upstream.e2e.test"
"""What the upstream says in its greeting and EHLO reply."""

TLS_MODES = ("starttls", "implicit", "none")

TEMPFAIL_REPLY = "451 4.2.0 try later"
REJECT_REPLY = "550 5.1.1 no such user"
TEMPFAIL_ALL_REPLY = "451 4.3.0 upstream busy, try again later"

# aiosmtpd logs every connection, a deprecation warning at every successful
# AUTH and a traceback for every TLS handshake the relay abandons (which the
# certificate tests cause on purpose): what matters is in the records.
logging.getLogger("mail.log").setLevel(logging.CRITICAL)


# -- certificates -------------------------------------------------------------


def _writePEM(path: str, data: bytes, private: bool = False) -> None:
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644
    )
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass
class CertificateAuthority:
    """
    A private CA for the tests: its certificate is what the relay's
    C{[delivery] ca_file} names, and it issues the upstream's certificates.

    @ivar certificatePath: the CA certificate, PEM.
    """

    directory: str
    name: str = "smtpauth-relay e2e test CA"
    certificatePath: str = ""

    def __post_init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        slug = "".join(c if c.isalnum() else "-" for c in self.name)
        self.certificatePath = os.path.join(self.directory, f"{slug}.pem")
        _writePEM(
            self.certificatePath,
            self.certificate.public_bytes(serialization.Encoding.PEM),
        )

    def issue(self, names: Sequence[str], basename: str) -> tuple[str, str]:
        """
        A server certificate for C{names} (host names or IP addresses).

        @return: the paths of the certificate (with the CA's after it) and
            of its private key, both PEM.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
            )
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        certificatePath = os.path.join(self.directory, basename + ".pem")
        keyPath = os.path.join(self.directory, basename + ".key")
        _writePEM(
            certificatePath,
            certificate.public_bytes(serialization.Encoding.PEM)
            + self.certificate.public_bytes(serialization.Encoding.PEM),
        )
        _writePEM(
            keyPath,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            private=True,
        )
        return certificatePath, keyPath


# -- what the upstream saw ----------------------------------------------------


def parseMailArgument(argument: str) -> tuple[str, list[str]]:
    """
    Split the argument of C{MAIL} (C{FROM:<path> params}) into the path
    without angle brackets (C{""} for the null sender) and its parameters
    exactly as sent.
    """
    rest = argument.strip()
    if rest[:5].upper() == "FROM:":
        rest = rest[5:].lstrip()
    if rest.startswith("<"):
        end = rest.find(">")
        path, params = (rest[1:end], rest[end + 1 :]) if end >= 0 else (rest, "")
    else:
        path, _, params = rest.partition(" ")
    return path, params.split()


@dataclass(frozen=True)
class Transaction:
    """
    One message the upstream took (recorded when its data had arrived, before
    the reply to it).

    @ivar connection: the number of the connection it came on (1, 2, ...).
    @ivar peer: the relay's address and port.
    @ivar tls: the TLS version of the connection, or C{None}.
    @ivar login: the AUTH login of the connection, or C{None}.
    @ivar mechanism: the AUTH mechanism used, or C{None}.
    @ivar sender: the reverse-path, C{""} for the null sender.
    @ivar mailParameters: the C{MAIL FROM} parameters as sent.
    @ivar recipients: the recipients the upstream accepted.
    @ivar content: the message as received (CRLF, dot-stuffing removed).
    """

    connection: int
    peer: Any
    tls: str | None
    login: str | None
    mechanism: str | None
    sender: str
    mailParameters: tuple[str, ...]
    recipients: tuple[str, ...]
    content: bytes

    @property
    def parameters(self) -> dict[str, str]:
        """
        The C{MAIL FROM} parameters by upper-cased keyword, values as sent.
        """
        result = {}
        for p in self.mailParameters:
            keyword, _, value = p.partition("=")
            result[keyword.upper()] = value
        return result

    def message(self) -> email.message.EmailMessage:
        """
        The content parsed with the C{email} package.
        """
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed

    @property
    def messageId(self) -> str | None:
        """
        The C{Message-ID} header field, or C{None}.
        """
        value = self.message()["Message-ID"]
        return None if value is None else str(value).strip()


@dataclass(frozen=True)
class Command:
    """
    One C{MAIL}, C{RCPT}, C{AUTH} or refused C{DATA} and the reply it got.

    @ivar argument: the path for C{MAIL} and C{RCPT}, the sender for
        C{DATA}, the login for C{AUTH}.
    """

    connection: int
    verb: str
    argument: str
    reply: str


# -- the server ---------------------------------------------------------------


class UpstreamSMTP(SMTP):
    """
    aiosmtpd's SMTP with what a submission server has and aiosmtpd lacks.

      - C{AUTH=} on C{MAIL FROM} (RFC 4954 section 5): aiosmtpd answers any
        parameter besides SIZE, BODY and SMTPUTF8 with 555, so the relay's
        C{AUTH=<>} would be refused; it is taken off before aiosmtpd parses
        the command, and the whole argument is kept as sent (aiosmtpd would
        upper-case the parameters).
      - It keeps its transport, so that L{Upstream.stop} can cut the
        connection.
    """

    upstream: Upstream
    connectionNumber = 0
    rawMailArgument = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:
            self.upstream._protocols.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.upstream._protocols.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.upstream.hanging:
            # A hung server: takes the connection, never greets, never
            # closes it (until L{Upstream.stop}, or aiosmtpd's idle timeout).
            await asyncio.Event().wait()
        await super()._handle_client()

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.rawMailArgument = arg or ""
        if arg:
            words = arg.split(" ")
            arg = " ".join(w for w in words if not w.upper().startswith("AUTH="))
        await super().smtp_MAIL(arg)

    def tlsVersion(self) -> str | None:
        transport = self.transport
        sslObject = transport.get_extra_info("ssl_object") if transport else None
        return None if sslObject is None else sslObject.version()


class UpstreamHandler:
    """
    The aiosmtpd handler: scripted replies, and the records.
    """

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def auth_XOAUTH2(self, server: UpstreamSMTP, args: list[str]) -> AuthResult:
        return await self._oauth(server, "XOAUTH2", args)

    async def auth_OAUTHBEARER(
        self, server: UpstreamSMTP, args: list[str]
    ) -> AuthResult:
        return await self._oauth(server, "OAUTHBEARER", args)

    async def _oauth(
        self, server: UpstreamSMTP, mechanism: str, args: list[str]
    ) -> AuthResult:
        if len(args) > 1:
            response: Any = base64.b64decode(args[1])
        else:
            response = await server.challenge_auth("")
            if not isinstance(response, bytes):
                return AuthResult(success=False, handled=False)
        text = response.decode("utf-8", "replace")
        if mechanism == "XOAUTH2":
            pairs = text.split("\x01")
            user = next((p[5:] for p in pairs if p.startswith("user=")), "")
        else:
            gs2, _, rest = text.partition("\x01")
            pairs = rest.split("\x01")
            user = gs2.split(",")[1][2:] if gs2.count(",") >= 2 else ""
        auth = next((p[5:] for p in pairs if p.startswith("auth=")), "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        upstream = self.upstream
        with upstream._lock:
            upstream.seenTokens.append(token)
        ok = (
            upstream.oauth is not None
            and user == upstream.username
            and upstream.oauth.check(token, user)
        )
        upstream._record(
            Command(
                server.connectionNumber,
                "AUTH",
                user,
                f"{mechanism} {'235' if ok else '535'}",
            )
        )
        if not ok:
            return AuthResult(
                success=False,
                handled=False,
                message="535 5.7.3 Authentication unsuccessful",
            )
        assert server.session is not None
        server.session.upstreamMechanism = mechanism  # type: ignore[attr-defined]
        return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))

    async def handle_EHLO(
        self,
        server: UpstreamSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # A connection is counted at its first EHLO: aiosmtpd's own probe
        # at start connects but never says EHLO.
        if not server.connectionNumber:
            server.connectionNumber = self.upstream._newConnection()
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self,
        server: UpstreamSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        sender, _ = parseMailArgument(server.rawMailArgument)
        upstream = self.upstream
        reply = TEMPFAIL_ALL_REPLY if upstream.tempfailAll else "250 2.1.0 OK"
        upstream._record(Command(server.connectionNumber, "MAIL", sender, reply))
        if reply.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(
        self,
        server: UpstreamSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        local = address.rpartition("@")[0].lower()
        if local.startswith("reject"):
            reply = REJECT_REPLY
        elif local.startswith("tempfail") and self.upstream.tempfailing:
            reply = TEMPFAIL_REPLY
        else:
            reply = "250 2.1.5 OK"
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        self.upstream._record(Command(server.connectionNumber, "RCPT", address, reply))
        return reply

    async def handle_DATA(
        self, server: UpstreamSMTP, session: Session, envelope: Envelope
    ) -> str:
        sender, parameters = parseMailArgument(server.rawMailArgument)
        auth = session.auth_data if session.authenticated else None
        content = envelope.original_content or b""
        transaction = Transaction(
            connection=server.connectionNumber,
            peer=session.peer,
            tls=server.tlsVersion(),
            login=auth.login.decode("utf-8", "replace") if auth else None,
            mechanism=getattr(session, "upstreamMechanism", None),
            sender=sender,
            mailParameters=tuple(parameters),
            recipients=tuple(envelope.rcpt_tos),
            content=content,
        )
        refusal = self.upstream.dataReply
        if refusal is not None and sender:
            self.upstream._record(
                Command(server.connectionNumber, "DATA", sender, refusal)
            )
            return refusal
        # Taken (as a real MTA that has queued the message), then slow to
        # say so: a relay killed now never hears the 250.
        self.upstream._record(transaction)
        if self.upstream.dataDelay:
            await asyncio.sleep(self.upstream.dataDelay)
        return "250 2.0.0 OK: queued"


class UpstreamController(Controller):
    """
    aiosmtpd's threaded controller, building L{UpstreamSMTP}s.
    """

    def __init__(self, upstream: Upstream, **kwargs: Any) -> None:
        self.upstream = upstream
        super().__init__(UpstreamHandler(upstream), **kwargs)

    def factory(self) -> UpstreamSMTP:
        server = UpstreamSMTP(self.handler, **self.SMTP_kwargs)
        server.upstream = self.upstream
        if self.upstream.tls == "implicit":
            # Every connection is encrypted from its first byte, but
            # aiosmtpd only counts STARTTLS as encryption, and would neither
            # offer nor accept AUTH.
            server._auth_require_tls = False
        return server


class Upstream:
    """
    The smarthost: see the module docstring.

    @ivar tempfailing: while set, C{tempfail...} recipients get 451.
    @ivar tempfailAll: while set, every C{MAIL} gets 451.
    @ivar dataDelay: seconds to wait before answering the data.
    @ivar hanging: while set, new connections are accepted but never
        greeted, and stay so after it is cleared.
    @ivar dataReply: while set, the reply to the data of every message with
        a sender (which is then not taken, and recorded as a C{DATA}
        command, not a transaction); bounces still get through.
    """

    def __init__(
        self,
        tls: str = "starttls",
        username: str | None = None,
        password: str | None = None,
        certificateNames: Sequence[str] = ("localhost", HOST),
        authority: CertificateAuthority | None = None,
        oauth: Any = None,
    ) -> None:
        """
        @param tls: one of L{TLS_MODES}.
        @param username: the one login AUTH accepts; with it, AUTH is
            required before C{MAIL}.
        @param certificateNames: the names in the server certificate.
        @param authority: the CA that issues the certificate (a new one by
            default, in L{directory}).
        """
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}")
        self.directory = tempfile.mkdtemp(prefix="smtpauth-upstream-")
        self.tls = tls
        self.username = username
        self.password = password
        self.oauth = oauth
        self.seenTokens: list[str] = []
        self.authority = authority or CertificateAuthority(self.directory)
        self.certificate, self.privateKey = self.authority.issue(
            certificateNames, "upstream"
        )
        self.port = freePorts(1)[0]
        self.tempfailing = True
        self.tempfailAll = False
        self.dataDelay = 0.0
        self.hanging = False
        self.dataReply: str | None = None
        self._lock = threading.Lock()
        self._records: list[Transaction | Command] = []
        self._connections = 0
        self._protocols: set[UpstreamSMTP] = set()
        self._controller: UpstreamController | None = None

    # -- running ------------------------------------------------------------

    def _serverContext(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, self.privateKey)
        return context

    def _authenticate(
        self,
        server: UpstreamSMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        data: Any,
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.username is not None
            and self.password is not None
            and data.login == self.username.encode()
            and data.password == self.password.encode()
        )
        login = data.login.decode("utf-8", "replace") if data else ""
        self._record(
            Command(
                server.connectionNumber,
                "AUTH",
                login,
                f"{mechanism} {'235' if ok else '535'}",
            )
        )
        if ok:
            session.upstreamMechanism = mechanism  # type: ignore[attr-defined]
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        """
        Listen on 127.0.0.1:L{port} (the same port each time).
        """
        assert self._controller is None, "already running"
        kwargs: dict[str, Any] = {
            "hostname": HOST,
            "port": self.port,
            "server_hostname": UPSTREAM_NAME,
            "ready_timeout": 10.0,
        }
        if self.tls == "starttls":
            kwargs["tls_context"] = self._serverContext()
            kwargs["require_starttls"] = True
        elif self.tls == "implicit":
            kwargs["ssl_context"] = self._serverContext()
        if self.oauth is not None:
            kwargs["auth_required"] = True
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        elif self.username is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
        if self.oauth is None:
            kwargs["auth_exclude_mechanism"] = ["XOAUTH2", "OAUTHBEARER"]
        controller = UpstreamController(self, **kwargs)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """
        Go down: cut every connection, and refuse new ones.
        """
        controller, self._controller = self._controller, None
        if controller is None:
            return
        cut = threading.Event()

        def abortAll() -> None:
            for protocol in list(self._protocols):
                transport: Any = protocol._original_transport or protocol.transport
                if transport is not None:
                    transport.abort()
            cut.set()

        controller.loop.call_soon_threadsafe(abortAll)
        cut.wait(5)
        controller.stop()
        self._protocols.clear()

    def remove(self) -> None:
        """
        Stop, and delete the certificates and keys.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- what it saw --------------------------------------------------------

    def _newConnection(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def _record(self, record: Transaction | Command) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def connections(self) -> int:
        """
        Connections that said EHLO, since the upstream was made.
        """
        with self._lock:
            return self._connections

    def transactions(self) -> list[Transaction]:
        """
        Every message taken so far, in order.
        """
        with self._lock:
            return [r for r in self._records if isinstance(r, Transaction)]

    def commands(self, verb: str | None = None) -> list[Command]:
        """
        Every C{MAIL}, C{RCPT} and C{AUTH} so far (or those of C{verb}).
        """
        with self._lock:
            return [
                r
                for r in self._records
                if isinstance(r, Command) and verb in (None, r.verb)
            ]

    def waitForTransactions(
        self,
        check: Callable[[list[Transaction]], bool],
        timeout: float,
        describe: Callable[[], str] = lambda: "",
    ) -> list[Transaction]:
        """
        Wait until C{check(transactions)} is true; return the transactions.
        """

        def ready() -> list[Transaction] | None:
            transactions = self.transactions()
            return transactions if check(transactions) else None

        return poll(
            ready,
            timeout,
            lambda: f"the upstream's transactions, now {self.summary()}; {describe()}",
        )

    def summary(self) -> str:
        """
        The records in short, for failure messages.
        """
        lines = []
        for r in self.transactions():
            lines.append(
                f"#{r.connection} MAIL FROM:<{r.sender}> "
                f"{' '.join(r.mailParameters)} -> {list(r.recipients)} "
                f"({len(r.content)} octets, {r.messageId})"
            )
        commands = self.commands()
        return (
            f"{len(lines)} transaction(s), {self.connections} connection(s):\n  "
            + "\n  ".join(lines)
            + f"\n  last commands: {commands[-10:]}"
        )

    # -- the relay's side -----------------------------------------------------

    def deliveryConfig(
        self,
        host: str = "localhost",
        password: str | None = None,
        **extra: Any,
    ) -> dict[str, object]:
        """
        The relay's C{[delivery]} keys for smarthost delivery to this
        upstream: C{host} (a name the certificate is checked against, or an
        address), the port, the TLS mode, the test CA as C{ca_file}, and the
        login with its password in a C{0600} file (C{password} overrides the
        right one).
        """
        config: dict[str, object] = {
            "mode": "smarthost",
            "host": host,
            "port": self.port,
            "tls": self.tls,
        }
        if self.tls != "none":
            config["ca_file"] = self.authority.certificatePath
        if self.username is not None and self.oauth is None:
            secret = self.password if password is None else password
            assert secret is not None
            passwordFile = os.path.join(self.directory, "smarthost-password")
            fd = os.open(passwordFile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
            config["username"] = self.username
            config["password_file"] = passwordFile
        config.update(extra)
        return config
