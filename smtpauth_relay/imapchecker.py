# -*- test-case-name: tests.test_imap -*-
"""
The C{imap:} credential checker: a user is who the office's IMAP server
says it is.

Every login that is not in the (optional) cache opens a connection to the
IMAP server, secures it (implicit TLS for C{imaps://}, C{STARTTLS} for
C{imap://...?starttls=yes}), verifies the server's certificate against its
host name, authenticates with C{AUTHENTICATE PLAIN} (or C{LOGIN} when the
server does not offer PLAIN), and logs out.  A password is never sent before
the connection is encrypted, except to a loopback address with the explicit
C{allow_plaintext=yes}.

Outcomes:

  - C{OK}: the user name (as given) is the avatar ID.
  - C{NO} (C{[AUTHENTICATIONFAILED]}, or no response code): the password is
    wrong, a final L{UnauthorizedLogin}.  IMAP servers answer an unknown
    user exactly like a wrong password, so this checker never raises
    L{UnknownUser}: list it last in a chain.
  - C{NO [UNAVAILABLE]} and the other temporary codes of RFC 5530, C{BAD},
    a C{BYE} or C{PREAUTH} greeting, any other unexpected answer, a refused
    connection, a failed TLS handshake or certificate check, or no answer
    within C{timeout} seconds: L{CheckerUnavailable} (454 4.7.0), logged
    without the password.
"""

from __future__ import annotations

import base64
import ipaddress
import math
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITLSTransport,
)
from twisted.logger import Logger
from twisted.mail.imap4 import Command, IMAP4Client, IMAP4Exception
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpauth_relay.errors import CheckerUnavailable
from smtpauth_relay.logincache import LoginCache
from smtpauth_relay.trace import logSafe

__all__ = [
    "IMAPChecker",
    "IMAPCheckerOptions",
    "IMAPLoginClient",
    "IMAPProtocolError",
    "LoginCache",
    "checkerFromArgument",
    "loginLines",
    "parseArgument",
    "runLogin",
]

DEFAULT_TIMEOUT = 10.0
DEFAULT_CACHE = 0.0
MAX_CACHE = 86400.0
IMAPS_PORT = 993
IMAP_PORT = 143

IMPLICIT = "implicit"
STARTTLS = "starttls"
PLAINTEXT = "none"

TEMPORARY_CODES = frozenset(
    {
        b"UNAVAILABLE",
        b"SERVERBUG",
        b"LIMIT",
        b"INUSE",
        b"PRIVACYREQUIRED",
        b"REFERRAL",
    }
)
"""
Response codes on a C{NO} that say nothing about the password (RFC 5530's
temporary and configuration failures, and RFC 2221's C{REFERRAL} to another
server): the login is answered 454 (try later), not 535, and logged.
"""

_TRUE = frozenset({"yes", "true", "on", "1"})
_FALSE = frozenset({"no", "false", "off", "0"})
_OPTIONS = ("starttls", "allow_plaintext", "ca_file", "timeout", "cache")


# -- the argument string --------------------------------------------------------


@dataclass(frozen=True)
class IMAPCheckerOptions:
    """
    A validated C{imap:} argument.

    @ivar host: The server's host name or IP address (without brackets); the
        certificate must be issued for it.
    @ivar port: The server's port.
    @ivar tls: L{IMPLICIT}, L{STARTTLS} or L{PLAINTEXT}.
    @ivar caFile: A PEM file of the CA certificates to trust instead of the
        system's, or C{None}.
    @ivar timeout: Seconds a whole login may take.
    @ivar cache: Seconds a successful login is remembered; 0 for never.
    """

    host: str
    port: int
    tls: str
    caFile: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    cache: float = DEFAULT_CACHE

    @property
    def url(self) -> str:
        """
        The server as a URL, for log lines and error messages.
        """
        scheme = "imaps" if self.tls == IMPLICIT else "imap"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def _isLoopback(host: str) -> bool:
    """
    Whether C{host} is C{localhost} or a loopback address literal.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _boolean(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"imap: option {name}= must be yes or no, not {value!r}")


def _seconds(name: str, value: str, maximum: float, allowZero: bool) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(
            f"imap: option {name}= must be a number of seconds, not {value!r}"
        ) from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allowZero):
        what = "zero or more" if allowZero else "more than zero"
        raise ValueError(f"imap: option {name}= must be {what} seconds, not {value!r}")
    if seconds > maximum:
        raise ValueError(
            f"imap: option {name}= must be at most {maximum:g} seconds, not {value!r}"
        )
    return seconds


def parseArgument(argstring: str) -> IMAPCheckerOptions:
    """
    Validate the argument of C{imap:}: a URL of the server with options as
    query parameters, such as C{imaps://mail.example.org} or
    C{imap://mail.example.org?starttls=yes&ca_file=/etc/ssl/office-ca.pem}.

    @raise ValueError: Naming the option (or the part of the URL) at fault.
    """
    text = argstring.strip()
    if not text:
        raise ValueError(
            "imap: requires the URL of the IMAP server,"
            " e.g. imap:imaps://mail.example.org"
        )
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("imaps", "imap"):
        raise ValueError(
            f"imap: the server URL must start with imaps:// or imap://, not {text!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "imap: the server URL must not hold a user name or password"
            " (the users' own credentials are what is checked)"
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"imap: the server URL {text!r} has no host name")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"imap: the port in {text!r} is not valid") from None
    if port is None:
        port = IMAPS_PORT if scheme == "imaps" else IMAP_PORT
    if port == 0:
        raise ValueError(f"imap: the port in {text!r} is not valid")
    if parts.path not in ("", "/"):
        raise ValueError(
            f"imap: the server URL must have no path, not {parts.path!r}"
            " (options go after ?, e.g. ?starttls=yes)"
        )
    if parts.fragment:
        raise ValueError(f"imap: the server URL must have no #fragment: {text!r}")

    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        if parts.query:
            raise ValueError(
                f"imap: cannot read the options {parts.query!r}:"
                " write them as name=value, separated by &"
            ) from None
        pairs = []
    given: dict[str, str] = {}
    for name, value in pairs:
        if name not in _OPTIONS:
            raise ValueError(
                f"imap: unknown option {name}= (known: {', '.join(_OPTIONS)})"
            )
        if name in given:
            raise ValueError(f"imap: option {name}= is given twice")
        given[name] = value

    starttls = _boolean("starttls", given["starttls"]) if "starttls" in given else None
    plaintext = (
        _boolean("allow_plaintext", given["allow_plaintext"])
        if "allow_plaintext" in given
        else False
    )
    if scheme == "imaps":
        if starttls is not None:
            raise ValueError(
                "imap: option starttls= is only for imap:// URLs"
                " (imaps:// is TLS from the start)"
            )
        if plaintext:
            raise ValueError(
                "imap: option allow_plaintext= is only for imap:// URLs"
                " (imaps:// is always encrypted)"
            )
        tls = IMPLICIT
    elif starttls:
        if plaintext:
            raise ValueError(
                "imap: option allow_plaintext=yes contradicts starttls=yes;"
                " drop allow_plaintext"
            )
        tls = STARTTLS
    elif plaintext:
        if not _isLoopback(host):
            raise ValueError(
                "imap: option allow_plaintext=yes is only allowed for a loopback"
                f" server (localhost, 127.0.0.1, ::1), not {host!r}: passwords"
                " would cross the network in the clear"
            )
        tls = PLAINTEXT
    else:
        raise ValueError(
            "imap: imap:// would send passwords in the clear: use imaps://"
            " (port 993), or imap://...?starttls=yes"
        )

    caFile = given.get("ca_file")
    if caFile is not None:
        if tls == PLAINTEXT:
            raise ValueError(
                "imap: option ca_file= makes no sense with allow_plaintext=yes"
            )
        if not caFile:
            raise ValueError("imap: option ca_file= needs the path of a PEM file")
        from smtpauth_relay.tls import loadCertificates

        try:
            loadCertificates(caFile)
        except OSError as e:
            raise ValueError(
                f"imap: option ca_file=: cannot read {caFile!r}: {e.strerror or e}"
            ) from None
        except ValueError as e:
            raise ValueError(f"imap: option ca_file=: {e}") from None

    timeout = (
        _seconds("timeout", given["timeout"], 3600.0, allowZero=False)
        if "timeout" in given
        else DEFAULT_TIMEOUT
    )
    cache = (
        _seconds("cache", given["cache"], MAX_CACHE, allowZero=True)
        if "cache" in given
        else DEFAULT_CACHE
    )
    return IMAPCheckerOptions(host, port, tls, caFile, timeout, cache)


# -- the positive cache ----------------------------------------------------------


# -- the IMAP conversation ---------------------------------------------------------


class IMAPProtocolError(Exception):
    """
    The server answered something this checker cannot take as a yes or a no.
    """


def _quotable(value: bytes) -> bool:
    """
    Whether C{value} can be sent as an IMAP quoted string (RFC 3501: 7-bit
    characters other than NUL, CR and LF).
    """
    return len(value) <= 1000 and all(0 < c < 0x80 and c not in (10, 13) for c in value)


def _quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def loginLines(username: bytes, password: bytes) -> list[bytes]:
    """
    The arguments of C{LOGIN}, split into the lines sent: the first after
    C{TAG LOGIN }, each further one after a continuation request from the
    server.  Each value goes as a quoted string if it can, else (8-bit
    characters, CR, LF, very long) as a synchronizing literal C{{N}}.

    Twisted's C{IMAP4Client.login} quotes C{\\} and C{"} but sends 8-bit
    characters, CR and LF inside a quoted string, which RFC 3501 forbids
    (and CR LF would end the command): hence this.
    """
    lines: list[bytes] = []
    current = b""
    for index, value in enumerate((username, password)):
        separator = b" " if index else b""
        if _quotable(value):
            current += separator + _quoted(value)
        else:
            lines.append(current + separator + b"{%d}" % len(value))
            current = value
    lines.append(current)
    return lines


def _responseCode(text: bytes) -> bytes | None:
    """
    The response code of a status response's text (C{[AUTHENTICATIONFAILED]
    ...} gives C{b"AUTHENTICATIONFAILED"}), upper-cased, or C{None}.
    """
    text = text.lstrip()
    if not text.startswith(b"["):
        return None
    end = text.find(b"]")
    if end == -1:
        return None
    words = text[1:end].split()
    return words[0].upper() if words else None


class IMAPLoginClient(IMAP4Client):
    """
    An L{IMAP4Client} that tells how its greeting and connection ended and
    what status the last tagged response had, and that starts TLS without
    trusting anything sent before the handshake.

    @ivar greeting: Fires with the capabilities in the greeting (or C{None})
        once the server greets with C{OK} or C{PREAUTH}; fails with
        L{IMAPProtocolError} for any other greeting, or with the reason the
        connection was lost before it.
    @ivar closed: Fires (with C{None}) when the connection is lost.
    @ivar lastTagged: The last tagged response, after the tag (e.g.
        C{b"NO [AUTHENTICATIONFAILED] Authentication failed."}).
    """

    _greetingCapabilities = False

    def __init__(self) -> None:
        super().__init__()
        self.greeting: Deferred[dict[bytes, Any] | None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.lastTagged = b""

    def response_UNAUTH(self, tag: bytes, rest: bytes) -> None:
        if self.state is None:
            words = rest.split(None, 1)
            status = words[0].upper() if words else b""
            if tag != b"*" or status not in (b"OK", b"PREAUTH"):
                self.state = "closed"
                problem = IMAPProtocolError(
                    f"greeted with {tag.decode('ascii', 'replace')}"
                    f" {rest[:200].decode('ascii', 'replace')}"
                )
                if not self.greeting.called:
                    self.greeting.errback(problem)
                self.abort()
                return
            if len(words) == 1:
                self.state = "unauth" if status == b"OK" else "auth"
                self.serverGreeting(None)
                return
            self._greetingCapabilities = words[1].upper().startswith(b"[CAPABILITY ")
        super().response_UNAUTH(tag, rest)

    def abort(self) -> None:
        """
        Drop the connection at once (if it is still there).
        """
        transport = cast(ITCPTransport | None, self.transport)
        if transport is not None:
            transport.abortConnection()

    def response_CLOSED(self, tag: bytes, rest: bytes) -> None:
        """
        Ignore what a server we gave up on still says.
        """

    def serverGreeting(self, caps: dict[bytes, Any] | None) -> None:
        if not self.greeting.called:
            self.greeting.callback(caps if self._greetingCapabilities else None)

    def dispatchCommand(self, tag: bytes, rest: bytes) -> None:
        if self.state is not None and tag not in (b"*", b"+"):
            self.lastTagged = rest
        super().dispatchCommand(tag, rest)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if not self.greeting.called:
            self.greeting.errback(reason)
        if not self.closed.called:
            self.closed.callback(None)

    def secure(self, creator: IOpenSSLClientConnectionCreator) -> Deferred[None]:
        """
        Send C{STARTTLS} and, on its C{OK}, start TLS with C{creator}.

        Anything the server sent after that C{OK} and before the handshake
        is plaintext a man in the middle could have injected (the STARTTLS
        injection of CVE-2011-0411, seen from the client): it is never read
        as a response; the connection is dropped instead.
        """

        def begin(result: object) -> None:
            leftover = self.clearLineBuffer()
            if leftover:
                raise IMAPProtocolError(
                    f"sent {len(leftover)} bytes after STARTTLS's OK"
                    " and before the TLS handshake"
                )
            cast(ITLSTransport, self.transport).startTLS(creator)
            self.startedTLS = True

        d: Deferred[None] = self.sendCommand(Command(b"STARTTLS"))
        d.addCallback(begin)
        return d

    def authenticatePlain(self, username: bytes, password: bytes) -> Deferred[Any]:
        """
        C{AUTHENTICATE PLAIN}, the response sent after the server's
        continuation request (never as an initial response on the command
        line, which Twisted's C{Command} would show in its C{repr}).
        """
        response = base64.b64encode(b"\0" + username + b"\0" + password)
        sent: list[bool] = []

        def respond(challenge: bytes) -> None:
            if sent:
                # PLAIN has one step; a second challenge is not a server
                # we understand.  Cancel the exchange.
                self.sendLine(b"*")
                return
            sent.append(True)
            self.sendLine(response)

        return cast(
            Deferred[Any],
            self.sendCommand(Command(b"AUTHENTICATE", b"PLAIN", (), respond)),
        )

    def sendLogin(self, username: bytes, password: bytes) -> Deferred[Any]:
        """
        C{LOGIN} with each value quoted or sent as a literal as L{loginLines}
        decides.
        """
        lines = loginLines(username, password)
        rest = lines[1:]

        def more(challenge: bytes) -> None:
            if rest:
                self.sendLine(rest.pop(0))
            else:
                self.abort()

        return cast(
            Deferred[Any], self.sendCommand(Command(b"LOGIN", lines[0], (), more))
        )


async def runLogin(
    client: IMAPLoginClient,
    username: bytes,
    password: bytes,
    starttls: IOpenSSLClientConnectionCreator | None,
    usePlain: bool = True,
) -> bool:
    """
    Log in over a connected C{client}.

    @param starttls: If not C{None}, secure the connection with C{STARTTLS}
        and this before anything else (the server must offer it).
    @param usePlain: Use C{AUTHENTICATE PLAIN} when the server offers it;
        if C{False}, or when it is not offered, C{LOGIN}.

    @return: C{True} for an C{OK}, C{False} for a C{NO} that is about the
        credentials.

    @raise IMAPProtocolError: For anything else the server says.
    @raise Exception: The reason the connection was lost, if it was.
    """
    capabilities = await client.greeting
    if client.state != "unauth":
        raise IMAPProtocolError("greeted with PREAUTH: no password would be checked")
    if starttls is not None:
        if capabilities is None or b"STARTTLS" not in capabilities:
            capabilities = await client.getCapabilities(useCache=False)
        if b"STARTTLS" not in capabilities:
            raise IMAPProtocolError("does not offer STARTTLS")
        await client.secure(starttls)
        capabilities = await client.getCapabilities(useCache=False)
    elif capabilities is None:
        capabilities = await client.getCapabilities(useCache=False)
    assert capabilities is not None
    capabilities = {name.upper(): value for name, value in capabilities.items()}

    mechanisms = {m.upper() for m in capabilities.get(b"AUTH") or () if m}
    try:
        if usePlain and b"PLAIN" in mechanisms:
            await client.authenticatePlain(username, password)
        elif b"LOGINDISABLED" in capabilities:
            raise IMAPProtocolError("LOGINDISABLED and AUTH=PLAIN is not offered")
        else:
            await client.sendLogin(username, password)
    except IMAP4Exception:
        words = client.lastTagged.split(None, 1)
        status = words[0].upper() if words else b""
        text = words[1] if len(words) > 1 else b""
        code = _responseCode(text)
        if status == b"NO" and code not in TEMPORARY_CODES:
            return False
        raise IMAPProtocolError(
            f"answered the login with {client.lastTagged[:200].decode('ascii', 'replace')}"
        ) from None
    return True


# -- the checker -----------------------------------------------------------------


def _toBytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _describe(error: BaseException) -> str:
    """
    A short description of why a login could not be checked, for the log.
    Only the server's words and the connection's errors: never ours.
    """
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def _timedOut(result: object, timeout: float) -> Failure:
    """
    Whatever cancelling a login gave (L{CancelledError}, or an endpoint's
    own error while still connecting), it timed out.
    """
    return Failure(TimeoutError(f"no answer within {timeout:g} seconds"))


@implementer(ICredentialsChecker)
class IMAPChecker:
    """
    Check user names and passwords by logging in to an IMAP server.

    @ivar options: What the C{imap:} argument said.
    @ivar timeout: Seconds a login may take before it is answered with
        L{CheckerUnavailable} (also the chain's timeout for this checker).
    @ivar cache: The positive cache (disabled when C{options.cache} is 0).
    @ivar usePlain: Whether C{AUTHENTICATE PLAIN} is used when offered
        (else always C{LOGIN}).
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        options: IMAPCheckerOptions,
        reactor: Any = None,
        clock: IReactorTime | None = None,
        usePlain: bool = True,
    ) -> None:
        """
        @param options: The server and options (L{parseArgument}).
        @param reactor: Connects to the server (L{IReactorTCP} and
            L{IReactorTime}); the global reactor if C{None}, imported at the
            first login, not here.
        @param clock: Measures the timeout and the cache's lifetimes; the
            reactor if C{None}.
        @param usePlain: See L{usePlain}.
        """
        self.options = options
        self.timeout = options.timeout
        self.usePlain = usePlain
        self._reactor = reactor
        self._clock = clock
        self._creator = self._makeCreator() if options.tls != PLAINTEXT else None
        self.cache = LoginCache(options.cache, lambda: self._getClock().seconds())
        self._clients: set[IMAPLoginClient] = set()

    def __repr__(self) -> str:
        return f"<IMAPChecker {self.options.url}>"

    def _makeCreator(self) -> IOpenSSLClientConnectionCreator:
        from twisted.internet import ssl

        trustRoot: Any
        if self.options.caFile is None:
            trustRoot = ssl.platformTrust()
        else:
            from cryptography.hazmat.primitives.serialization import Encoding

            from smtpauth_relay.tls import loadCertificates

            trustRoot = ssl.trustRootFromCertificates(
                [
                    ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM))
                    for c in loadCertificates(self.options.caFile)
                ]
            )
        return ssl.optionsForClientTLS(self.options.host, trustRoot=trustRoot)

    def _getReactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _getClock(self) -> IReactorTime:
        if self._clock is None:
            self._clock = cast(IReactorTime, self._getReactor())
        return self._clock

    def _endpoint(self) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._getReactor(),
            self.options.host,
            self.options.port,
            timeout=max(1, math.ceil(self.timeout)),
        )
        if self.options.tls == IMPLICIT:
            assert self._creator is not None
            endpoint = wrapClientTLS(self._creator, endpoint)
        return endpoint

    # Twisted declares avatar IDs as bytes; ours are the user name as text.
    def requestAvatarId(  # type: ignore[override]
        self, credentials: IUsernamePassword
    ) -> Deferred[str]:
        """
        Check a user name and password with the IMAP server.

        @return: A L{Deferred} that fires with the user name (L{str}), or
            fails with L{UnauthorizedLogin} if the server refuses them (or
            they cannot be sent: a user name that is not UTF-8, an empty
            one or password, a NUL), or L{CheckerUnavailable}.
        """
        rawName = _toBytes(credentials.username)
        password = _toBytes(credentials.password)
        try:
            username = rawName.decode("utf-8")
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin())
        if not rawName or not password or b"\0" in rawName or b"\0" in password:
            return fail(UnauthorizedLogin())

        if self.cache.check(username, password):
            self.log.debug(
                "{user} accepted from the cache of {server}",
                user=logSafe(username),
                server=self.options.url,
            )
            return succeed(username)

        d = Deferred.fromCoroutine(self._attempt(rawName, password))
        d.addTimeout(self.timeout, self._getClock(), onTimeoutCancel=_timedOut)

        def answered(accepted: bool) -> str:
            if not accepted:
                self.cache.evict(username)
                raise UnauthorizedLogin()
            self.cache.store(username, password)
            return username

        def failed(reason: Failure) -> Failure:
            if reason.check(TimeoutError):
                problem = f"no answer within {self.timeout:g} seconds"
            elif reason.check(CheckerUnavailable):
                return reason
            else:
                assert reason.value is not None
                problem = _describe(reason.value)
            self.log.error(
                "IMAP server {server} cannot check {user}: {problem}",
                server=self.options.url,
                user=logSafe(username),
                problem=problem,
            )
            return Failure(CheckerUnavailable(f"{self.options.url}: {problem}"))

        return d.addCallbacks(answered, failed)

    async def _attempt(self, username: bytes, password: bytes) -> bool:
        """
        Connect, log in, and (after an C{OK}) log out in the background.
        """
        client = IMAPLoginClient()
        await connectProtocol(self._endpoint(), client)
        self._clients.add(client)
        client.closed.addBoth(lambda _: self._clients.discard(client))
        accepted = False
        try:
            accepted = await runLogin(
                client,
                username,
                password,
                self._creator if self.options.tls == STARTTLS else None,
                self.usePlain,
            )
        finally:
            if accepted:
                self._logout(client)
            else:
                client.abort()
        return accepted

    def _logout(self, client: IMAPLoginClient) -> None:
        """
        Say C{LOGOUT}; drop the connection if the server takes more than
        C{timeout} seconds to close it.
        """
        d: Deferred[Any] = client.logout()
        d.addTimeout(self.timeout, self._getClock())

        def done(result: object) -> None:
            # After the server's answer Twisted has closed the connection
            # itself; otherwise (no answer in time, an error) drop it.
            if not isinstance(result, Failure):
                return
            client.abort()
            if not result.check(CancelledError, TimeoutError):
                self.log.debug(
                    "LOGOUT from {server}: {problem}",
                    server=self.options.url,
                    problem=_describe(cast(BaseException, result.value)),
                )

        d.addBoth(done)

    def close(self) -> Deferred[None]:
        """
        Drop every connection still open (logging out) and wait until they
        are closed.
        """
        waiting = [client.closed for client in self._clients]
        for client in list(self._clients):
            client.abort()
        return gatherResults(waiting).addCallback(lambda _: None)


def checkerFromArgument(
    argstring: str, reactor: Any = None, clock: IReactorTime | None = None
) -> IMAPChecker:
    """
    The checker C{imap:ARGSTRING} describes.

    @raise ValueError: If the argument is invalid (see L{parseArgument}).
    """
    return IMAPChecker(parseArgument(argstring), reactor=reactor, clock=clock)
