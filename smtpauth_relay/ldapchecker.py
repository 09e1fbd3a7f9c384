# -*- test-case-name: tests.test_ldap -*-
"""
A credential checker that asks an LDAP server (OpenLDAP, Active Directory)
by binding as the user.

Two ways to find the user's entry:

  - B{DN template} (C{dn=uid=%s,ou=people,dc=example,dc=org}): the user
    name, escaped as an RFC 4514 attribute value, is put into the template
    and the checker binds as that DN with the password.  The server answers
    I{invalidCredentials} (49) both for a wrong password and for a DN that
    does not exist, so in this mode every 49 is a wrong password (final).
  - B{Search, then bind} (C{base=...&filter=(sAMAccountName=%s)}): bind as a
    service account (or anonymously), search under C{base} with the filter,
    and bind as the one entry found.  No entry is L{UnknownUser} (the next
    checker may know the user); more than one is L{CheckerUnavailable} (the
    directory cannot say who the user is) and logged.

The user name never passes through a filter parser: the filter template is
parsed once, with a marker where the placeholder stands, and the marker is
replaced by the user name inside the parsed equality assertion, which goes on
the wire as an opaque octet string.  C{*)(uid=*} is therefore just a strange
name, never a wildcard or a second clause.  L{escapeFilterValue} (RFC 4515)
renders the filter for log lines.

Passwords are sent only over TLS: C{ldaps://} (implicit TLS) or C{ldap://}
with C{starttls=yes}, the certificate verified against the system's CAs or
C{ca_file=}, and the password written only after the handshake (and its
verification) completed.  A plain C{ldap://} connection is allowed with
C{insecure=yes}, and only to a loopback address.  An empty password is
refused without asking the server: LDAP treats a simple bind with a name and
an empty password as an I{unauthenticated bind}, which many servers accept.

Each login opens its own connection (TCP, TLS, bind(s), unbind): a bind
changes the identity of the connection, so a pooled one would need a
service-account bind before every login anyway, and idle pooled
connections are cut by servers and firewalls (Active Directory after 15
minutes), which a pool would have to detect and heal.  Logins are few;
the cost of a handshake is small next to that complexity.  At most
L{LDAPChecker.maxPending} logins are under way at once; beyond that the
client gets 454 at once.

This module imports no reactor; ldaptor's BER codec (C{pureldap}) is used
with a small client protocol of our own (ldaptor's C{LDAPClient} imports
the global reactor and cannot wait for the TLS handshake).
"""

from __future__ import annotations

import ipaddress
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from ldaptor.protocols import pureber, pureldap
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
)
from twisted.internet.interfaces import IHandshakeListener, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.trace import logSafe

__all__ = [
    "LDAPChecker",
    "LDAPSettings",
    "escapeDNValue",
    "escapeFilterValue",
    "parseArgument",
]

DEFAULT_TIMEOUT = 10.0
INVALID_CREDENTIALS = 49
SUCCESS = 0
SIZE_LIMIT_EXCEEDED = 4

PLACEHOLDER = re.compile(r"%s|\{user\}")
"""
Where the user name goes in C{dn=} and C{filter=}: C{%s} or C{{user}}.
"""

_MARKER = "smtpauthrelayusernameplaceholder"
"""
Stands in for the placeholder while a filter template is parsed; letters
only, so the filter grammar keeps it as it is.
"""

_OPTIONS = (
    "dn",
    "base",
    "filter",
    "scope",
    "bind_dn",
    "bind_password_file",
    "starttls",
    "ca_file",
    "insecure",
    "timeout",
)

_SCOPES = {"sub": 2, "one": 1}
_YES = {"yes", "true", "on", "1"}
_NO = {"no", "false", "off", "0"}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_OPTION_SPLIT = re.compile(r"&(?=[A-Za-z_][A-Za-z0-9_]*=)")


# -- escaping -----------------------------------------------------------------


def escapeDNValue(value: str) -> str:
    """
    Escape C{value} as an attribute value in a distinguished name (RFC 4514
    section 2.4): C{"+,;<>\\=} get a backslash, a leading C{#} or space and a
    trailing space too, NUL and other control characters become C{\\XX}.
    Characters beyond ASCII are left as they are (UTF-8 on the wire).
    """
    out = []
    last = len(value) - 1
    for i, c in enumerate(value):
        if c in '"+,;<>\\=':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\{ord(c):02x}")
        elif c == " " and (i == 0 or i == last):
            out.append("\\ ")
        elif c == "#" and i == 0:
            out.append("\\#")
        else:
            out.append(c)
    return "".join(out)


def escapeFilterValue(value: str) -> str:
    """
    Escape C{value} as an assertion value in a string search filter (RFC
    4515 section 3): C{*}, C{(}, C{)}, C{\\}, NUL and other control
    characters become C{\\XX}.  Characters beyond ASCII are left as they are.
    """
    out = []
    for c in value:
        if c in "*()\\" or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def _fillDN(template: str, username: str) -> str:
    """
    C{template} with every placeholder replaced, in one pass, by the escaped
    user name (a second pass could find a placeholder in the name itself).
    """
    escaped = escapeDNValue(username)
    return PLACEHOLDER.sub(lambda m: escaped, template)


# -- filters ------------------------------------------------------------------


def _filterTemplate(text: str) -> Any:
    """
    Parse a filter template, with the marker where the placeholders are.

    @raise ValueError: (naming C{filter}) if it does not parse, has no
        placeholder, or has one anywhere but in the value of an equality
        assertion (C{(attr=...%s...)}).
    """
    if not PLACEHOLDER.search(text):
        raise ValueError(
            f"filter: {text!r} has no placeholder for the user name"
            " (%s or {user}), e.g. filter=(sAMAccountName=%s)"
        )
    if _MARKER in text:
        raise ValueError(f"filter: {text!r} must not contain {_MARKER!r}")
    marked = PLACEHOLDER.sub(_MARKER, text)
    try:
        parsed = _parseFilter(marked)
    except Exception as e:
        raise ValueError(
            f"filter: {text!r} is not an LDAP search filter: {e}"
        ) from None
    inValues = sum(
        v.count(_MARKER) for v in _equalityValues(parsed) if isinstance(v, str)
    )
    if inValues != marked.count(_MARKER):
        raise ValueError(
            f"filter: {text!r}: the user name placeholder may stand only in the"
            " value of an equality assertion, e.g. (uid=%s) or (mail=%s@example.org)"
        )
    return parsed


def _parseFilter(text: str) -> Any:
    """
    Parse a string filter with ldaptor's parser, which uses pyparsing's old
    camelCase names: their deprecation warnings (one per name) are not ours
    to show.  Called when a configuration is loaded, never while serving.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from ldaptor import ldapfilter

        return ldapfilter.parseFilter(text)


def _equalityValues(node: Any) -> Iterable[Any]:
    """
    The values of every equality assertion in a parsed filter.
    """
    if isinstance(node, pureldap.LDAPFilter_equalityMatch):
        yield node.assertionValue.value
    elif isinstance(node, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        for child in node.data:
            yield from _equalityValues(child)
    elif isinstance(node, pureldap.LDAPFilter_not):
        yield from _equalityValues(node.value)


def _fillFilter(node: Any, username: str) -> Any:
    """
    A copy of the parsed filter template C{node} with the marker replaced by
    C{username} in its equality assertions (which hold the value as octets,
    so no character of the name has a meaning there).
    """
    if isinstance(node, pureldap.LDAPFilter_equalityMatch):
        value = node.assertionValue.value
        if isinstance(value, str) and _MARKER in value:
            return pureldap.LDAPFilter_equalityMatch(
                attributeDesc=node.attributeDesc,
                assertionValue=pureldap.LDAPAssertionValue(
                    value=value.replace(_MARKER, username)
                ),
            )
        return node
    if isinstance(node, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        return type(node)([_fillFilter(child, username) for child in node.data])
    if isinstance(node, pureldap.LDAPFilter_not):
        return pureldap.LDAPFilter_not(_fillFilter(node.value, username))
    return node


def _filterText(template: str, username: str) -> str:
    """
    The filter sent for C{username}, as RFC 4515 text (for log lines).
    """
    escaped = escapeFilterValue(username)
    return PLACEHOLDER.sub(lambda m: escaped, template)


# -- settings -----------------------------------------------------------------


@dataclass(frozen=True)
class LDAPSettings:
    """
    A parsed, validated C{ldap:} argument string; see L{parseArgument}.

    @ivar url: The server URL as given, without options (for log lines).
    @ivar tls: C{"ldaps"} (implicit TLS), C{"starttls"} or C{"none"}.
    @ivar dnTemplate: The DN template (DN-template mode), or C{None}.
    @ivar base: The search base (search mode), or C{None}.
    @ivar filterTemplate: The filter template as given (search mode).
    @ivar scope: C{"sub"} or C{"one"}.
    @ivar bindDN: The service account's DN, or C{None} to search
        anonymously.
    @ivar bindPassword: The service account's password.
    @ivar caFile: PEM file of the CAs to trust instead of the system's.
    """

    url: str
    host: str
    port: int
    tls: str
    dnTemplate: str | None = None
    base: str | None = None
    filterTemplate: str | None = None
    scope: str = "sub"
    bindDN: str | None = None
    bindPassword: bytes | None = field(default=None, repr=False)
    caFile: str | None = None
    timeout: float = DEFAULT_TIMEOUT


def _yesNo(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _YES:
        return True
    if lowered in _NO:
        return False
    raise ValueError(f"{name}: expected yes or no, not {value!r}")


def _isLoopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _readSecret(name: str, path: str) -> bytes:
    """
    The first line of the file C{path}, without its line ending.

    @raise ValueError: naming C{name} if it cannot be read or is empty.
    """
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as e:
        raise ValueError(f"{name}: cannot read {path!r}: {e.strerror or e}") from None
    secret = line.rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"{name}: the first line of {path!r} is empty")
    return secret


def _checkCAFile(path: str) -> None:
    from smtpauth_relay.tls import loadCertificates

    try:
        loadCertificates(path)
    except OSError as e:
        raise ValueError(f"ca_file: cannot read {path!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"ca_file: {e}") from None


def parseArgument(argstring: str) -> LDAPSettings:
    """
    Parse and validate the argument of C{ldap:}: the server's URL with the
    options as query parameters, e.g.
    C{ldaps://ldap.example.org/?dn=uid=%s,ou=people,dc=example,dc=org}.

    Options are separated by C{&} where it is followed by a name and C{=}
    (so a filter's C{(&(...)(...))} needs no quoting), and their values are
    percent-decoded (C{%s} is not a percent escape and stays as it is; write
    C{%25} for a literal C{%} followed by two hex digits, C{%26} for an
    C{&} followed by a name and C{=}).

    @raise ValueError: naming the option at fault, if anything is wrong.
    """
    url, _, query = argstring.partition("?")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"url: {url!r} is not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise ValueError(
            f"url: {url!r} must start with ldap:// or ldaps://,"
            " e.g. ldap:ldaps://ldap.example.org/?dn=uid=%s,ou=people,dc=example,dc=org"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "url: no user or password in the URL; use bind_dn= and bind_password_file="
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"url: {url!r} names no host")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(
            f"url: {url!r}: nothing may follow the host but options"
            " (give the search base as base=)"
        )
    if port is None:
        port = 636 if scheme == "ldaps" else 389
    if port == 0:
        raise ValueError(f"url: {url!r}: port 0")

    options: dict[str, str] = {}
    if query:
        for part in _OPTION_SPLIT.split(query):
            name, equals, value = part.partition("=")
            if not equals:
                raise ValueError(f"{part!r} is not an option (name=value)")
            if name not in _OPTIONS:
                raise ValueError(
                    f"{name}: unknown option; known are {', '.join(_OPTIONS)}"
                )
            if name in options:
                raise ValueError(f"{name}: given twice")
            options[name] = unquote(value, errors="strict")

    for name, value in options.items():
        if not value:
            raise ValueError(f"{name}: empty value")

    timeout = DEFAULT_TIMEOUT
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            timeout = math.nan
        if not (0 < timeout <= 3600):
            raise ValueError(
                f"timeout: expected seconds (more than 0, at most 3600),"
                f" not {options['timeout']!r}"
            )

    starttls = _yesNo("starttls", options.get("starttls", "no"))
    insecure = _yesNo("insecure", options.get("insecure", "no"))
    if scheme == "ldaps":
        if starttls:
            raise ValueError(
                "starttls: ldaps:// is TLS already; starttls=yes is for ldap://"
            )
        tls = "ldaps"
    elif starttls:
        tls = "starttls"
    else:
        tls = "none"
    if tls == "none":
        if not insecure:
            raise ValueError(
                f"starttls: {url!r} would send passwords unencrypted; use"
                " ldaps://, or starttls=yes (or insecure=yes for a server on"
                " this host's loopback)"
            )
        if not _isLoopback(host):
            raise ValueError(
                f"insecure: passwords are sent unencrypted only to a loopback"
                f" address, not to {host!r}; use ldaps:// or starttls=yes"
            )
    elif insecure:
        raise ValueError(
            "insecure: only for ldap:// without starttls (TLS is always verified)"
        )
    caFile = options.get("ca_file")
    if caFile is not None:
        if tls == "none":
            raise ValueError("ca_file: needs ldaps:// or starttls=yes")
        _checkCAFile(caFile)

    dnTemplate = options.get("dn")
    search = [
        n
        for n in ("base", "filter", "scope", "bind_dn", "bind_password_file")
        if n in options
    ]
    settings: dict[str, Any] = {}
    if dnTemplate is not None:
        if search:
            raise ValueError(
                f"{search[0]}: not with dn= (dn= binds as the user directly;"
                " base= and filter= search for the user first)"
            )
        if not PLACEHOLDER.search(dnTemplate):
            raise ValueError(
                f"dn: {dnTemplate!r} has no placeholder for the user name"
                " (%s or {user}), e.g. dn=uid=%s,ou=people,dc=example,dc=org"
            )
        settings["dnTemplate"] = dnTemplate
    else:
        if "base" not in options:
            raise ValueError(
                "base: required (with filter=), unless dn= is given;"
                " e.g. base=dc=example,dc=org&filter=(uid=%s)"
            )
        if "filter" not in options:
            raise ValueError("filter: required with base=, e.g. filter=(uid=%s)")
        _filterTemplate(options["filter"])
        scope = options.get("scope", "sub")
        if scope not in _SCOPES:
            raise ValueError(f"scope: expected sub or one, not {scope!r}")
        bindDN = options.get("bind_dn")
        passwordFile = options.get("bind_password_file")
        if (bindDN is None) != (passwordFile is None):
            missing = "bind_password_file" if bindDN is not None else "bind_dn"
            raise ValueError(
                f"{missing}: bind_dn and bind_password_file go together"
                " (leave both out to search anonymously)"
            )
        settings.update(
            base=options["base"],
            filterTemplate=options["filter"],
            scope=scope,
            bindDN=bindDN,
        )
        if passwordFile is not None:
            settings["bindPassword"] = _readSecret("bind_password_file", passwordFile)

    return LDAPSettings(
        url=url,
        host=host,
        port=port,
        tls=tls,
        caFile=caFile,
        timeout=timeout,
        **settings,
    )


# -- protocol -----------------------------------------------------------------


class LDAPError(Exception):
    """
    The server answered an operation with a result other than success.

    @ivar resultCode: The LDAP result code.
    """

    def __init__(self, operation: str, resultCode: int, message: str) -> None:
        super().__init__(f"{operation} failed: result {resultCode} {message}".strip())
        self.resultCode = resultCode


@dataclass
class _Pending:
    deferred: Deferred[tuple[Any, list[bytes]]]
    entries: list[bytes] = field(default_factory=list)


_decoder = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
    )
)


@implementer(IHandshakeListener)
class LDAPConnection(Protocol):
    """
    The client end of one LDAP connection: send a request, get a L{Deferred}
    of its final result (and, for a search, the DNs of the entries found).

    Messages are encoded and decoded by ldaptor's C{pureldap}.  Every
    L{Deferred} it returns fails when the connection is lost, and cancelling
    one aborts the connection.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._nextId = 1
        self._pending: dict[int, _Pending] = {}
        self._handshake: Deferred[None] | None = None
        self._handshakeDone = False
        self._lostReason: Failure | None = None
        self._closed: Deferred[None] = Deferred()

    def _abort(self, ignored: object = None) -> None:
        if self.transport is not None and self._lostReason is None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer:
            try:
                message, used = pureber.berDecodeObject(_decoder, self._buffer)
            except pureber.BERExceptionInsufficientData:
                return
            except Exception:
                self._failAll(Failure(LDAPError("decoding", -1, "bad LDAP message")))
                self._abort()
                return
            self._buffer = self._buffer[used:]
            if message is None:
                return
            self._handle(message)

    def _handle(self, message: Any) -> None:
        pending = self._pending.get(message.id)
        if pending is None:
            # Notice of Disconnection (id 0) or a stray answer: this
            # connection cannot be trusted to answer anything else.
            self._failAll(
                Failure(LDAPError("server notice", -1, "unsolicited message"))
            )
            self._abort()
            return
        value = message.value
        if isinstance(value, pureldap.LDAPSearchResultEntry):
            name = value.objectName
            pending.entries.append(name if isinstance(name, bytes) else name.encode())
        elif isinstance(value, pureldap.LDAPSearchResultReference):
            pass  # continuation references (Active Directory's) are not users
        else:
            del self._pending[message.id]
            pending.deferred.callback((value, pending.entries))

    def request(self, operation: Any) -> Deferred[tuple[Any, list[bytes]]]:
        """
        Send C{operation}.

        @return: A L{Deferred} of its final result message and the DNs of
            the search entries that came before it.
        """
        if self._lostReason is not None:
            return fail(self._lostReason)
        messageId = self._nextId
        self._nextId += 1
        d: Deferred[tuple[Any, list[bytes]]] = Deferred(self._abort)
        self._pending[messageId] = _Pending(d)
        assert self.transport is not None
        self.transport.write(pureldap.LDAPMessage(operation, id=messageId).toWire())
        return d

    def startTLS(self, options: Any) -> Deferred[None]:
        """
        Start TLS on this connection (after a StartTLS extended operation
        succeeded).

        @return: A L{Deferred} that fires when the handshake is done.
        """
        assert self.transport is not None
        self.transport.startTLS(options)  # type: ignore[attr-defined]
        return self.whenHandshaken()

    def whenHandshaken(self) -> Deferred[None]:
        """
        A L{Deferred} that fires when the TLS handshake has completed (the
        certificate verified), or fails if the connection is lost first.
        """
        if self._handshakeDone:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        if self._lostReason is not None:
            return fail(self._lostReason)
        self._handshake = Deferred(self._abort)
        return self._handshake

    def handshakeCompleted(self) -> None:
        self._handshakeDone = True
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            handshake.callback(None)

    def _failAll(self, reason: Failure) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.deferred.errback(reason)
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            handshake.errback(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lostReason = reason
        self._failAll(reason)
        self._closed.callback(None)

    def whenClosed(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once the connection is closed; cancelling
        it aborts the connection.
        """
        closed: Deferred[None] = Deferred(self._abort)
        if self._lostReason is not None:
            closed.callback(None)
        else:
            self._closed.chainDeferred(closed)
        return closed

    def close(self, clock: IReactorTime, grace: float = 2.0) -> Deferred[None]:
        """
        Unbind and close the connection.

        @return: A L{Deferred} that fires once it is closed (aborted if that
            takes more than C{grace} seconds).
        """
        closed = self.whenClosed()
        if self._lostReason is not None:
            return closed
        assert self.transport is not None
        try:
            self.transport.write(
                pureldap.LDAPMessage(
                    pureldap.LDAPUnbindRequest(), id=self._nextId
                ).toWire()
            )
        finally:
            self.transport.loseConnection()
        timer = clock.callLater(grace, self._abort)

        def stop(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return closed.addBoth(stop)


class _OneConnection(ClientFactory):
    """
    Builds the one L{LDAPConnection} given, quietly (a factory logs its
    start and stop at every login otherwise).
    """

    noisy = False

    def __init__(self, connection: LDAPConnection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: object) -> LDAPConnection:
        return self.connection


# -- the checker --------------------------------------------------------------


def _toBytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _describe(reason: Failure) -> str:
    """
    A one-line description of why the server could not answer (never
    holding the password: neither the requests nor their arguments are in
    it).
    """
    error = reason.value
    text = str(error) or type(error).__name__
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        # OpenSSL errors: a list of (library, function, reason) tuples.
        text = "TLS: " + "; ".join(str(e[-1]) for e in args[0] if isinstance(e, tuple))
    return f"{type(error).__name__}: {text}"


@implementer(ICredentialsChecker)
class LDAPChecker:
    """
    Check user names and passwords by binding to an LDAP server as the
    user; see the module docstring for the modes and the security rules.

    @ivar settings: What it was made with.
    @ivar timeout: Seconds a login may take (connect, TLS and every
        operation together); L{smtpauth_relay.auth.ChainChecker} uses it too.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()
    maxPending = 32
    """
    Logins allowed under way at once; beyond that a login gets 454 4.7.0
    at once instead of opening yet another connection to the server.
    """

    def __init__(self, settings: LDAPSettings, reactor: Any = None) -> None:
        """
        @param settings: From L{parseArgument}.
        @param reactor: Provider of L{IReactorTCP} and L{IReactorTime} used
            to connect and to time out; the global reactor if C{None}
            (imported at the first login, not here).
        """
        self.settings = settings
        self.timeout = settings.timeout
        self._reactor = reactor
        self._tlsOptions: Any = None
        self._filter = (
            _filterTemplate(settings.filterTemplate)
            if settings.filterTemplate is not None
            else None
        )
        self._connections: set[LDAPConnection] = set()
        self._pending = 0

    def __repr__(self) -> str:
        return f"<LDAPChecker {self.settings.url}>"

    def _getReactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _clientTLSOptions(self) -> Any:
        """
        TLS client options verifying the server's certificate for the
        URL's host, against C{ca_file} or the system's CAs.
        """
        if self._tlsOptions is None:
            from twisted.internet import ssl

            if self.settings.caFile is not None:
                from cryptography.hazmat.primitives.serialization import Encoding

                from smtpauth_relay.tls import loadCertificates

                trustRoot: Any = ssl.trustRootFromCertificates(
                    [
                        ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM))
                        for c in loadCertificates(self.settings.caFile)
                    ]
                )
            else:
                trustRoot = ssl.platformTrust()
            self._tlsOptions = ssl.optionsForClientTLS(
                self.settings.host, trustRoot=trustRoot
            )
        return self._tlsOptions

    # Twisted declares avatar IDs as bytes; ours are the user name as text.
    def requestAvatarId(  # type: ignore[override]
        self, credentials: IUsernamePassword
    ) -> Deferred[str]:
        """
        Check a user name and password by binding as the user.

        @return: A L{Deferred} that fires with the user name as given
            (L{str}), or fails with L{UnauthorizedLogin} (wrong password,
            empty password, name not UTF-8), L{UnknownUser} (search mode: no
            entry matches) or L{CheckerUnavailable} (server unreachable, TLS
            failure, timeout, LDAP error, several entries match).
        """
        password = _toBytes(credentials.password)
        try:
            username = _toBytes(credentials.username).decode("utf-8")
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin("user name is not UTF-8"))
        if not username or username.strip() != username or _CONTROL.search(username):
            # No entry can be found by such a name, and the directory's
            # matching rules would ignore the spaces: "alice " would log in
            # as alice under another name.
            return fail(UnknownUser("not a user name"))
        if not password:
            # Never sent: a simple bind with an empty password is an
            # "unauthenticated bind" (RFC 4513 5.1.2), which succeeds.
            self.log.info(
                "LDAP login for {user} refused: empty password",
                user=logSafe(username),
            )
            return fail(UnauthorizedLogin("empty password"))
        if self._pending >= self.maxPending:
            self.log.warn(
                "{count} LDAP logins already under way to {url};"
                " answering 454 until they are done",
                count=self._pending,
                url=self.settings.url,
            )
            return fail(CheckerUnavailable("too many LDAP logins under way"))

        self._pending += 1
        reactor = self._getReactor()
        d = Deferred.fromCoroutine(self._login(reactor, username, password))
        timedOut = []

        def timeUp() -> None:
            timedOut.append(True)
            d.cancel()

        timer = reactor.callLater(self.timeout, timeUp)

        def done(result: object) -> object:
            self._pending -= 1
            if timer.active():
                timer.cancel()
            return result

        def failed(reason: Failure) -> Failure:
            if timedOut:
                problem = f"no answer within {self.timeout}s"
            elif reason.check(UnauthorizedLogin, CheckerUnavailable, CancelledError):
                return reason
            else:
                problem = _describe(reason)
            self.log.error(
                "LDAP server {url} could not check {user}: {problem}",
                url=self.settings.url,
                user=logSafe(username),
                problem=problem,
            )
            return Failure(CheckerUnavailable(f"{self.settings.url}: {problem}"))

        return d.addErrback(failed).addBoth(done)

    async def _connect(self, reactor: Any) -> LDAPConnection:
        """
        Connect, and for C{ldaps://} or C{starttls=yes} finish the TLS
        handshake (with its verification) before returning.
        """
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        s = self.settings
        endpoint: Any = HostnameEndpoint(
            cast(IReactorTCP, reactor), s.host, s.port, timeout=self.timeout
        )
        if s.tls == "ldaps":
            endpoint = wrapClientTLS(self._clientTLSOptions(), endpoint)
        connection = LDAPConnection()
        await endpoint.connect(_OneConnection(connection))
        self._connections.add(connection)
        try:
            if s.tls == "ldaps":
                await connection.whenHandshaken()
            elif s.tls == "starttls":
                result, _ = await connection.request(pureldap.LDAPStartTLSRequest())
                if result.resultCode != SUCCESS:
                    raise LDAPError(
                        "StartTLS", result.resultCode, _text(result.errorMessage)
                    )
                await connection.startTLS(self._clientTLSOptions())
        except BaseException:
            await self._disconnect(reactor, connection)
            raise
        return connection

    async def _disconnect(self, reactor: Any, connection: LDAPConnection) -> None:
        try:
            await connection.close(reactor)
        finally:
            self._connections.discard(connection)

    async def _bind(
        self, connection: LDAPConnection, dn: bytes, password: bytes
    ) -> tuple[int, str]:
        """
        A simple bind; the password must not be empty.

        @return: The result code and the server's message.
        """
        assert password, "an empty password is an unauthenticated bind"
        result, _ = await connection.request(
            pureldap.LDAPBindRequest(dn=dn, auth=password)
        )
        return result.resultCode, _text(result.errorMessage)

    async def _login(self, reactor: Any, username: str, password: bytes) -> str:
        connection = await self._connect(reactor)
        try:
            if self.settings.dnTemplate is not None:
                dn = _fillDN(self.settings.dnTemplate, username).encode("utf-8")
            else:
                dn = await self._findUser(connection, username)
            code, message = await self._bind(connection, dn, password)
        finally:
            await self._disconnect(reactor, connection)
        if code == INVALID_CREDENTIALS:
            self.log.info(
                "LDAP server {url} refused the password of {user}",
                url=self.settings.url,
                user=logSafe(username),
            )
            raise UnauthorizedLogin("invalid credentials")
        if code != SUCCESS:
            raise LDAPError("bind", code, message)
        return username

    async def _findUser(self, connection: LDAPConnection, username: str) -> bytes:
        """
        Bind as the service account (if there is one) and search for the
        user's entry.

        @return: The DN of the one entry that matches.
        @raise UnknownUser: If none does (after the work a wrong password
            costs: the service account binds again).
        @raise CheckerUnavailable: If several do.
        """
        s = self.settings
        assert s.base is not None and s.filterTemplate is not None
        if s.bindDN is not None:
            await self._serviceBind(connection)
        request = pureldap.LDAPSearchRequest(
            baseObject=s.base,
            scope=_SCOPES[s.scope],
            derefAliases=0,
            sizeLimit=2,
            timeLimit=max(1, math.ceil(self.timeout)),
            typesOnly=1,
            filter=_fillFilter(self._filter, username),
            attributes=["1.1"],
        )
        result, entries = await connection.request(request)
        if result.resultCode not in (SUCCESS, SIZE_LIMIT_EXCEEDED) or (
            result.resultCode == SIZE_LIMIT_EXCEEDED and len(entries) < 2
        ):
            raise LDAPError("search", result.resultCode, _text(result.errorMessage))
        if len(entries) > 1:
            shown = _filterText(s.filterTemplate, username)
            self.log.error(
                "LDAP search {filter} under {base} on {url} matches more than"
                " one entry ({first}, {second}); refusing the login of {user}",
                filter=logSafe(shown),
                base=s.base,
                url=s.url,
                first=logSafe(entries[0].decode("utf-8", "replace")),
                second=logSafe(entries[1].decode("utf-8", "replace")),
                user=logSafe(username),
            )
            raise CheckerUnavailable("the search matches more than one entry")
        if not entries:
            if s.bindDN is not None:
                await self._serviceBind(connection)
            raise UnknownUser()
        return entries[0]

    async def _serviceBind(self, connection: LDAPConnection) -> None:
        s = self.settings
        assert s.bindDN is not None and s.bindPassword
        code, message = await self._bind(
            connection, s.bindDN.encode("utf-8"), s.bindPassword
        )
        if code != SUCCESS:
            raise LDAPError(f"bind as {s.bindDN}", code, message)

    def close(self) -> Deferred[None]:
        """
        Abort the connections of logins under way (they fail with
        L{CheckerUnavailable}).
        """
        closing = []
        for connection in list(self._connections):
            closing.append(connection.whenClosed())
            connection._abort()
        return DeferredList(closing).addCallback(lambda ignored: None)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
