"""
The configuration file: what the relay listens on, whom it trusts and where
it delivers.

The file is TOML, read with the standard library's L{tomllib} into frozen
dataclasses (L{Config} and one class per section).  L{loadConfig} reads a
file and L{parseConfig} a string; both return a L{Config} or raise
L{ConfigError} listing I{every} problem found, one line each, in the form::

    PATH:LINE: [SECTION] KEY: MESSAGE

C{:LINE} is left out only where no line can be named (a required key that is
missing, an unreadable file).  Array-of-table entries are named
C{[listener #2]} (counting from 1) and array elements C{checkers[0]}
(counting from 0, like the TOML array itself).

L{checkConfigCommand} is the C{smtpauth-relay check-config PATH} command.
"""

import bisect
import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from smtpauth_relay.errors import ConfigError
from smtpauth_relay.oauth2 import (
    OAuth2Settings,
    checkTokenEndpoint,
    defaultScope,
    loadAssertionKey,
)
from smtpauth_relay.senders import SenderLoginMap, canonicalAddress
from smtpauth_relay.tls import keyMatches, loadCertificates, loadPrivateKey
from smtpauth_relay.usernetworks import UserNetworks

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "ListenerConfig",
    "OAuth2Config",
    "QueueConfig",
    "RelayConfig",
    "ServerConfig",
    "TLSConfig",
    "checkConfigCommand",
    "loadConfig",
    "parseConfig",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Values allowed for C{[[listener]] tls}.
LISTENER_TLS_MODES = ("starttls", "implicit", "none")
#: Values allowed for C{[tls] minimum_version}.
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
#: Values allowed for C{[[listener]] minimum_tls_version}: old devices may
#: need TLS 1.0 or 1.1 (see L{ListenerConfig.minimum_tls_version}).
LISTENER_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: Values allowed in C{[auth] mechanisms}.
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5")
#: The default of C{[auth] mechanisms}: CRAM-MD5 (obsolete, and its stored
#: form is as good as the password) only when the admin asks for it.  Each
#: is offered only when the checkers can serve it (see the README).
DEFAULT_AUTH_MECHANISMS = ("PLAIN", "LOGIN", "SCRAM-SHA-256")
#: Values allowed for C{[delivery] mode}.
DELIVERY_MODES = ("smarthost", "mx", "maildir")
#: Values allowed for C{[delivery] tls}.
DELIVERY_TLS_MODES = ("starttls", "implicit", "none")
#: The default upstream port for each C{[delivery] tls} in smarthost mode.
SMARTHOST_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
#: Values allowed for C{[delivery] auth}: the smarthost login.
DELIVERY_AUTH = ("password", "xoauth2", "oauthbearer")


@dataclass(frozen=True)
class ServerConfig:
    """
    C{[server]}: how the relay presents itself and the limits it enforces.

    @ivar hostname: The name in the greeting, in Received headers, in
        Message-IDs and in bounces.
    @ivar max_message_size: The largest message accepted, in octets
        (advertised as SIZE).
    @ivar max_recipients: The most RCPT TO commands accepted per message.
    @ivar max_connections: The most simultaneous client connections.
    @ivar max_connections_per_ip: The most simultaneous connections from one
        client address.
    @ivar idle_timeout: Seconds a client may stay silent between commands
        before it is disconnected.
    @ivar data_timeout: Seconds a client may stay silent inside DATA.
    @ivar max_session_time: Seconds a session may last in all.
    @ivar max_line_length: The longest command or text line accepted, in
        octets including CRLF (RFC 5321 section 4.5.3.1.6 sets 1000).
    @ivar reverse_dns: Whether to look up the client's host name for the
        Received header.
    @ivar workers: How many processes take SMTP sessions (sharing the
        listening sockets); C{0} for one per CPU core (C{"auto"} in TOML).
        The main process is one of them and alone delivers.
    """

    hostname: str = field(default_factory=socket.getfqdn)
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    idle_timeout: float = 300.0
    data_timeout: float = 300.0
    max_session_time: float = 3600.0
    max_line_length: int = 1000
    reverse_dns: bool = False
    workers: int = 0


#: The most C{[server] workers}.
MAX_WORKERS = 64


@dataclass(frozen=True)
class TLSConfig:
    """
    C{[tls]}: the certificate the listeners present.

    @ivar certificate: Absolute path of the PEM certificate (chain), or
        C{None} when TLS is not configured.
    @ivar private_key: Absolute path of the PEM private key, or C{None}.
    @ivar minimum_version: The oldest protocol version accepted, one of
        L{TLS_VERSIONS}.
    """

    certificate: str | None = None
    private_key: str | None = None
    minimum_version: str = "TLSv1.2"


@dataclass(frozen=True)
class ListenerConfig:
    """
    One C{[[listener]]}.

    @ivar endpoint: A Twisted server endpoint string (C{tcp:port=587},
        C{systemd:domain=INET:index=0}, C{haproxy:tcp:port=587}, ...).
    @ivar tls: One of L{LISTENER_TLS_MODES}.
    @ivar proxy_protocol: Whether connections start with a PROXY protocol
        header (v1 or v2) naming the real client.
    @ivar trusted_proxies: The networks proxies may connect from; needed
        with C{proxy_protocol}, and anyone else is refused.
    @ivar minimum_tls_version: The oldest TLS this listener's handshake
        accepts, from L{LISTENER_TLS_VERSIONS}, or C{None} for C{[tls]
        minimum_version}.  Below C{[tls] minimum_version} only clients in
        C{[relay] trusted_networks} may stay; others are disconnected after
        the handshake.
    @ivar allow_plaintext_auth_from: Networks (within C{[relay]
        trusted_networks}) whose clients may AUTH without TLS on this
        listener, which must be bound to a LAN address.
    @ivar allow_bare_lf_from: Networks (within C{[relay] trusted_networks})
        whose clients may end lines of their messages with a bare LF,
        normalised to CRLF; everyone else's bare LF is refused.
    """

    endpoint: str
    tls: str = "starttls"
    proxy_protocol: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    minimum_tls_version: str | None = None
    allow_plaintext_auth_from: tuple[IPNetwork, ...] = ()
    allow_bare_lf_from: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class LockoutConfig:
    """
    C{[auth.lockout]}: brute-force protection.

    @ivar max_failures: failed AUTHs allowed per client address, and per
        user from one subnet (/24, /64), within C{window}.
    @ivar subnet_max_failures: failed AUTHs allowed from one subnet within
        C{window}; by default (or 0) ten times C{max_failures}.
    @ivar window: seconds over which failures are counted (sliding).
    @ivar duration: seconds of the first lockout; each repeat doubles it.
    @ivar max_duration: the longest lockout.
    @ivar trusted_after_success: days an address a user logged in from stays
        exempt from that user's (and its subnet's) lockout; 0 is off.
    @ivar tarpit: longest delay, in seconds, before a failed AUTH is
        answered (it grows with the address's failures).
    @ivar session_max_failures: failed AUTHs in one session before it is
        closed with 421 4.7.0.
    """

    max_failures: int = 5
    subnet_max_failures: int = 50
    window: float = 600.0
    duration: float = 900.0
    max_duration: float = 86400.0
    trusted_after_success: float = 30.0
    tarpit: float = 5.0
    session_max_failures: int = 3


@dataclass(frozen=True)
class AuthConfig:
    """
    C{[auth]}: how submitters authenticate.

    @ivar checkers: strcred descriptions, in the order they are asked.
    @ivar mechanisms: SASL mechanisms allowed, upper-case, from
        L{AUTH_MECHANISMS}, in the order EHLO lists them; each is offered
        only when the checkers can serve it.
    @ivar require_tls: Whether AUTH is refused (and not advertised) before
        TLS.
    """

    checkers: tuple[str, ...] = ()
    mechanisms: tuple[str, ...] = DEFAULT_AUTH_MECHANISMS
    require_tls: bool = True
    lockout: LockoutConfig = field(default_factory=LockoutConfig)
    allowed_networks: str | None = None


@dataclass(frozen=True)
class RelayConfig:
    """
    C{[relay]}: who may relay without authenticating.

    @ivar trusted_networks: Client networks that may relay without AUTH.
    @ivar trusted_relays: Client networks whose C{AUTH=} parameter on MAIL
        FROM is believed (RFC 4954 section 5).
    @ivar sender_login_map: Absolute path of the file listing the MAIL FROM
        addresses each user may use, or C{None} for no check.
    @ivar sender_plus_tags: Whether C{alice+tag@...} counts as an address
        listed as C{alice@...}.
    @ivar check_header_from: Whether the message's From: header must be an
        allowed address too.
    """

    trusted_networks: tuple[IPNetwork, ...] = ()
    trusted_relays: tuple[IPNetwork, ...] = ()
    sender_login_map: str | None = None
    sender_plus_tags: bool = True
    check_header_from: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    """
    C{[limits]}: what one login or one address may do (0: no limit).

    @ivar messages_per_hour: messages per user per sliding hour.
    @ivar recipients_per_hour: recipients per user per sliding hour.
    @ivar connections_per_minute: new connections per client address per
        sliding minute.
    @ivar messages_per_session: messages in one session.
    """

    messages_per_hour: int = 200
    recipients_per_hour: int = 1000
    connections_per_minute: int = 60
    messages_per_session: int = 100


@dataclass(frozen=True)
class MetricsConfig:
    """
    C{[metrics]}: the Prometheus endpoint.

    @ivar endpoint: a Twisted server endpoint for C{/metrics}, or C{""} for
        none.
    """

    endpoint: str = ""


#: Values allowed in C{[logging] format}.
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LoggingConfig:
    """
    C{[logging]}: how log events are written.

    @ivar format: C{"text"} (Twisted's human-readable lines) or C{"json"}
        (one JSON object per event, for journald, Loki and the like).
    """

    format: str = "text"


MAX_FLOW_DELAY = 10.0
"""The longest C{[queue] flow_delay} (Postfix caps its in_flow_delay there)."""


@dataclass(frozen=True)
class QueueConfig:
    """
    C{[queue]}: the spool and its retries.

    @ivar directory: Absolute path of the spool directory.
    @ivar retry_schedule: Seconds to wait after each failed attempt; the
        last value repeats.
    @ivar max_lifetime: Seconds after which a message still not delivered is
        bounced.
    @ivar max_concurrent_deliveries: Delivery attempts under way at once.
    @ivar delay_warning: Seconds after which the sender is told once that
        the message is still being retried; 0 is off.
    @ivar flow_delay: Seconds a new transaction may wait (at C{MAIL FROM})
        while deliveries lag behind arrivals; 0 is off.
    """

    directory: str = "/var/spool/smtpauth-relay"
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
    max_lifetime: float = 432000.0
    max_concurrent_deliveries: int = 20
    delay_warning: float = 0.0
    flow_delay: float = 1.0


@dataclass(frozen=True)
class OAuth2Config:
    """
    C{[delivery.oauth2]}: how the relay gets OAuth2 access tokens for the
    smarthost (C{[delivery] auth = "xoauth2"} or C{"oauthbearer"}).

    @ivar token_endpoint: The token endpoint's https URL.
    @ivar client_id: The application (client) id.
    @ivar client_secret_file: Absolute path of the file holding the client
        secret, or C{None}.
    @ivar certificate: Absolute path of the PEM certificate registered with
        the application (client assertion), or C{None}.
    @ivar private_key: Absolute path of its RSA private key, or C{None}.
    @ivar refresh_token_file: Absolute path of the file holding the refresh
        token (delegated flow; written by C{oauth2 authorize}), or C{None}
        for the client-credentials grant.
    @ivar scope: The scopes asked for (default by token endpoint).
    @ivar username: The mailbox the relay logs in as.
    @ivar device_authorization_endpoint: For C{oauth2 authorize}, when it
        cannot be derived from C{token_endpoint}, or C{None}.
    """

    token_endpoint: str
    client_id: str
    username: str
    client_secret_file: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    refresh_token_file: str | None = None
    scope: str = ""
    device_authorization_endpoint: str | None = None

    def settings(self) -> OAuth2Settings:
        """
        The settings of L{smtpauth_relay.oauth2.TokenClient}.
        """
        return OAuth2Settings(
            tokenEndpoint=self.token_endpoint,
            clientId=self.client_id,
            username=self.username,
            scope=self.scope,
            clientSecretFile=self.client_secret_file,
            certificate=self.certificate,
            privateKey=self.private_key,
            refreshTokenFile=self.refresh_token_file,
            deviceAuthorizationEndpoint=self.device_authorization_endpoint,
        )


@dataclass(frozen=True)
class DeliveryConfig:
    """
    C{[delivery]}: where accepted messages go.

    @ivar mode: One of L{DELIVERY_MODES}.
    @ivar directory: Absolute path of the Maildir that messages are dropped
        into (maildir mode).
    @ivar host: The smarthost (smarthost mode).
    @ivar port: The smarthost's port (default by C{tls}: 587, 465 or 25), or
        the port of MX hosts in mx mode (25).
    @ivar tls: C{"starttls"}, C{"implicit"} or C{"none"} towards the
        smarthost; in mx mode STARTTLS is always opportunistic.
    @ivar verify: Whether the smarthost's certificate must be valid for
        C{host}.
    @ivar ca_file: PEM file of the CAs to trust for that, instead of the
        system's, or C{None}.
    @ivar username: The login at the smarthost, or C{""} for none.
    @ivar password_file: Absolute path of the file holding its password.
    @ivar forward_auth_identity: Whether MAIL FROM upstream names the
        submitter with C{AUTH=}, rather than C{AUTH=<>}.
    @ivar max_per_destination: Connections at once to one destination.
    @ivar connect_timeout: Seconds to wait for a connection.
    @ivar timeout: Seconds one delivery attempt may take, at most.
    @ivar nameservers: C{host} or C{host:port} of DNS servers for mx mode;
        empty means those of C{/etc/resolv.conf}.
    @ivar auth: How the relay logs in at the smarthost: one of
        L{DELIVERY_AUTH}.
    @ivar oauth2: C{[delivery.oauth2]}, with C{auth} = C{"xoauth2"} or
        C{"oauthbearer"}; else C{None}.
    @ivar rewrite_sender: The address every (non-bounce) message is sent to
        the smarthost from, or C{""} to keep the sender.
    @ivar rewrite_from: Whether C{From:} is rewritten as well (the original
        kept in C{Reply-To:} and C{X-Original-From:}).
    """

    mode: str = "maildir"
    directory: str = ""
    host: str = ""
    port: int = 0
    tls: str = "starttls"
    verify: bool = True
    ca_file: str | None = None
    username: str = ""
    password_file: str | None = None
    forward_auth_identity: bool = False
    max_per_destination: int = 2
    connect_timeout: float = 30.0
    timeout: float = 600.0
    nameservers: tuple[str, ...] = ()
    auth: str = "password"
    oauth2: OAuth2Config | None = None
    rewrite_sender: str = ""
    rewrite_from: bool = False


@dataclass(frozen=True)
class Config:
    """
    A whole, valid configuration.

    @ivar path: The file it was read from.
    """

    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    auth: AuthConfig
    relay: RelayConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    path: str
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    text: str = field(default="", compare=False, repr=False)
    """The TOML it was read from (what the main process gives a worker)."""


_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "server": (
        "hostname",
        "max_message_size",
        "max_recipients",
        "max_connections",
        "max_connections_per_ip",
        "idle_timeout",
        "data_timeout",
        "max_session_time",
        "max_line_length",
        "reverse_dns",
        "workers",
    ),
    "tls": ("certificate", "private_key", "minimum_version"),
    "listener": (
        "endpoint",
        "tls",
        "proxy_protocol",
        "trusted_proxies",
        "minimum_tls_version",
        "allow_plaintext_auth_from",
        "allow_bare_lf_from",
    ),
    "auth": ("checkers", "mechanisms", "require_tls", "lockout", "allowed_networks"),
    "auth.lockout": (
        "max_failures",
        "subnet_max_failures",
        "window",
        "duration",
        "max_duration",
        "trusted_after_success",
        "tarpit",
        "session_max_failures",
    ),
    "relay": (
        "trusted_networks",
        "trusted_relays",
        "sender_login_map",
        "sender_plus_tags",
        "check_header_from",
    ),
    "metrics": ("endpoint",),
    "logging": ("format",),
    "limits": (
        "messages_per_hour",
        "recipients_per_hour",
        "connections_per_minute",
        "messages_per_session",
    ),
    "queue": (
        "directory",
        "retry_schedule",
        "max_lifetime",
        "max_concurrent_deliveries",
        "delay_warning",
        "flow_delay",
    ),
    "delivery": (
        "mode",
        "directory",
        "host",
        "port",
        "tls",
        "verify",
        "ca_file",
        "username",
        "password_file",
        "forward_auth_identity",
        "max_per_destination",
        "connect_timeout",
        "timeout",
        "nameservers",
        "auth",
        "oauth2",
        "rewrite_sender",
        "rewrite_from",
    ),
    "delivery.oauth2": (
        "token_endpoint",
        "client_id",
        "client_secret_file",
        "certificate",
        "private_key",
        "refresh_token_file",
        "scope",
        "username",
        "device_authorization_endpoint",
    ),
}

_USAGE = "usage: smtpauth-relay check-config PATH\n"


def loadConfigOrReport(path: str, stderr: TextIO) -> Config | None:
    """
    For the commands that take C{--config}: the configuration, or C{None}
    after writing each of its problems to C{stderr}.
    """
    try:
        return loadConfig(path)
    except ConfigError as e:
        for problem in e.problems:
            stderr.write(problem + "\n")
        return None


def loadConfig(path: str) -> Config:
    """
    Read and validate a configuration file.

    @param path: The file to read; relative paths inside it are resolved
        against its directory.
    @return: The configuration.
    @raise ConfigError: If the file cannot be read or is invalid; every
        problem found is listed.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError([f"{path}: cannot read configuration file: {reason}"]) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{path}:{line}: not valid UTF-8 text"]) from e
    return parseConfig(text, path)


def parseConfig(text: str, path: str) -> Config:
    """
    Validate the text of a configuration file.

    @param text: The TOML document.
    @param path: The file it came from: named in problems, and the base of
        relative paths.
    @return: The configuration.
    @raise ConfigError: If it is invalid; every problem found is listed.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        match = re.search(r"\(at line (\d+), column \d+\)", message)
        where = f"{path}:{match.group(1)}" if match else path
        raise ConfigError([f"{where}: TOML syntax error: {message}"]) from e
    return _Validator(path, text).validate(data)


def checkConfigCommand(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    """
    The C{smtpauth-relay check-config PATH} command.

    @param argv: The arguments after C{check-config}.
    @param stdout: Where C{PATH: OK} (or the usage, when asked for) goes.
    @param stderr: Where problems and usage errors go, one per line.
    @return: The exit status: 0 when the file is valid, 1 when it is not,
        2 on a usage error.
    """
    args = list(argv)
    if args and args[0] in ("-h", "--help"):
        stdout.write(_USAGE)
        return 0
    if args and args[0] == "--":
        args = args[1:]
    elif args and args[0].startswith("-") and args[0] != "-":
        stderr.write(f"check-config: unknown option {args[0]}\n{_USAGE}")
        return 2
    if len(args) != 1:
        stderr.write(_USAGE)
        return 2
    path = args[0]
    if loadConfigOrReport(path, stderr) is None:
        return 1
    stdout.write(f"{path}: OK\n")
    return 0


# Where things are: a scanner for line numbers, since tomllib gives none.

_Path = tuple[str | int, ...]
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class _LineIndex:
    """
    The line on which each table, key and array element of a (valid) TOML
    document starts.

    Paths are tuples as in the parsed document: C{("server", "hostname")},
    C{("listener", 1, "endpoint")} for the second C{[[listener]]},
    C{("auth", "checkers", 0)} for an array element.
    """

    def __init__(self, text: str) -> None:
        """
        @param text: A document that L{tomllib} has accepted.
        """
        self._text = text
        self._newlines = [m.start() for m in re.finditer("\n", text)]
        self._pos = 0
        self._lines: dict[_Path, int] = {}
        self._arrayTables: dict[_Path, int] = {}
        try:
            self._scanDocument()
        except RecursionError:
            pass

    def nearestLine(self, path: _Path) -> int | None:
        """
        @return: The line of C{path}, or else of the closest enclosing thing
            that has one (a dotted key or an inline table may only be known
            by its parent's line); C{None} if none is known.
        """
        while path:
            line = self._lines.get(path)
            if line is not None:
                return line
            path = path[:-1]
        return None

    def _lineAt(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def _record(self, path: _Path, line: int) -> None:
        for end in range(1, len(path) + 1):
            self._lines.setdefault(path[:end], line)

    def _peek(self, ahead: int = 0) -> str:
        pos = self._pos + ahead
        return self._text[pos] if pos < len(self._text) else ""

    def _skipBlank(self, newlines: bool) -> None:
        while True:
            c = self._peek()
            if c in (" ", "\t") or (newlines and c in ("\r", "\n")):
                self._pos += 1
            elif c == "#":
                while self._peek() not in ("", "\n"):
                    self._pos += 1
            else:
                return

    def _scanDocument(self) -> None:
        table: _Path = ()
        while True:
            self._skipBlank(newlines=True)
            start = self._pos
            if self._peek() == "":
                return
            line = self._lineAt(start)
            if self._peek() == "[":
                isArray = self._peek(1) == "["
                self._pos += 2 if isArray else 1
                names = self._readKey()
                self._skipBlank(newlines=False)
                self._pos += 2 if isArray else 1
                table = self._resolveHeader(names, isArray)
                self._record(table, line)
            else:
                self._keyValue(table, line)
            if self._pos == start:
                self._pos += 1

    def _keyValue(self, prefix: _Path, line: int) -> None:
        """
        Read C{key = value} at the current position, recording the key's
        line under C{prefix}.
        """
        names = self._readKey()
        self._skipBlank(newlines=False)
        if self._peek() == "=":
            self._pos += 1
        self._skipBlank(newlines=False)
        self._record(prefix + names, line)
        self._scanValue(prefix + names)

    def _resolveHeader(self, names: tuple[str, ...], isArray: bool) -> _Path:
        resolved: _Path = ()
        for position, name in enumerate(names):
            resolved += (name,)
            if isArray and position == len(names) - 1:
                index = self._arrayTables.get(resolved, 0)
                self._arrayTables[resolved] = index + 1
                resolved += (index,)
            elif resolved in self._arrayTables:
                resolved += (self._arrayTables[resolved] - 1,)
        return resolved

    def _readKey(self) -> tuple[str, ...]:
        names: list[str] = []
        while True:
            self._skipBlank(newlines=False)
            if self._peek() in ('"', "'"):
                start = self._pos
                self._skipString()
                names.append(_decodeQuotedKey(self._text[start : self._pos]))
            else:
                match = _BARE_KEY.match(self._text, self._pos)
                if match is None:
                    break
                names.append(match.group())
                self._pos = match.end()
            self._skipBlank(newlines=False)
            if self._peek() != ".":
                break
            self._pos += 1
        return tuple(names)

    def _skipString(self) -> None:
        quote = self._peek()
        escapes = quote == '"'
        if self._text.startswith(quote * 3, self._pos):
            self._pos += 3
            while self._peek() != "":
                if escapes and self._peek() == "\\":
                    self._pos += 2
                elif self._text.startswith(quote * 3, self._pos):
                    self._pos += 3
                    # Up to two more quotes belong to the content.
                    for _ in range(2):
                        if self._peek() == quote:
                            self._pos += 1
                    return
                else:
                    self._pos += 1
            return
        self._pos += 1
        while self._peek() not in ("", "\n"):
            c = self._peek()
            self._pos += 2 if escapes and c == "\\" else 1
            if c == quote:
                return

    def _scanValue(self, path: _Path) -> None:
        c = self._peek()
        if c in ('"', "'"):
            self._skipString()
        elif c in ("[", "{"):
            isArray = c == "["
            self._pos += 1
            index = 0
            while True:
                self._skipBlank(newlines=True)
                start = self._pos
                c = self._peek()
                if c in ("", "]", "}"):
                    self._pos += 1
                    return
                if c == ",":
                    self._pos += 1
                    continue
                line = self._lineAt(start)
                if isArray:
                    self._record(path + (index,), line)
                    self._scanValue(path + (index,))
                    index += 1
                else:
                    self._keyValue(path, line)
                if self._pos == start:
                    self._pos += 1
        else:
            while self._peek() not in ("", ",", "]", "}", "\n", "#"):
                self._pos += 1


def _decodeQuotedKey(raw: str) -> str:
    """
    @param raw: A quoted TOML key, quotes included.
    @return: The key it spells.
    """
    try:
        value = tomllib.loads(f"k = {raw}")["k"]
    except tomllib.TOMLDecodeError:
        return raw
    return str(value)


# Checking values.


class _Missing:
    """
    The type of L{_MISSING}.
    """


_MISSING = _Missing()


def _describe(value: object) -> str:
    """
    @return: The TOML type of C{value} with an article, and the value itself
        when it is short: C{'a boolean (true)'}, C{'an array'}.
    """
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f'a string ("{value}")' if len(value) <= 40 else "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _suggest(word: str, choices: Sequence[str], fuzzy: bool = True) -> str | None:
    """
    @param fuzzy: Whether to suggest near misses, or only a choice that
        differs in case.
    @return: The choice closest to C{word}, if any is close.
    """
    folded = {choice.lower(): choice for choice in choices}
    if word.lower() in folded:
        return folded[word.lower()]
    if not fuzzy:
        return None
    matches = difflib.get_close_matches(word, choices, n=1)
    return matches[0] if matches else None


def _notOneOf(value: str, choices: Sequence[str], fuzzy: bool = True) -> str:
    """
    @param fuzzy: See L{_suggest}.
    @return: A message saying C{value} is not among C{choices}.
    """
    allowed = ", ".join(f'"{choice}"' for choice in choices)
    message = f'"{value}" is not one of {allowed}'
    suggestion = _suggest(value, choices, fuzzy)
    if suggestion is not None:
        message += f'; did you mean "{suggestion}"?'
    return message


def _cleanException(e: BaseException) -> str:
    """
    @return: The message of C{e} without the function name that
        C{TypeError}s start with.
    """
    message = re.sub(r"^[\w.]+\(\) ", "", str(e))
    return message or type(e).__name__


_HOSTNAME = re.compile(
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?"
    r"|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]"
)


def _checkHostname(value: str) -> str | None:
    """
    @return: Why C{value} cannot be the relay's host name, or C{None}.
    """
    if _HOSTNAME.fullmatch(value) is None:
        return (
            f'"{value}" is not a valid host name (letters, digits, "-" and '
            '"." only; write internationalised names in their xn-- form)'
        )
    return None


def _splitEndpoint(description: str) -> list[tuple[str, str | None]]:
    """
    Split an endpoint description the way Twisted does: fields separated by
    C{:}, C{name=value} fields, backslash escapes.

    @return: C{(text, None)} for each positional field and C{(name, value)}
        for each named one.
    """
    fields: list[list[str]] = [[""]]
    characters = iter(description)
    for c in characters:
        if c == "\\":
            fields[-1][-1] += next(characters, "")
        elif c == ":":
            fields.append([""])
        elif c == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += c
    return [(f[0], f[1] if len(f) > 1 else None) for f in fields]


def _systemdArguments(
    domain: str, index: str | None = None, name: str | None = None
) -> None:
    """
    Check the arguments of a C{systemd:} endpoint as Twisted binds them,
    without looking up the inherited descriptors (there are none outside
    systemd).

    @raise TypeError: For missing or unknown arguments.
    @raise ValueError: For bad values.
    """
    if (index is None) == (name is None):
        raise ValueError("give exactly one of index= or name=")
    if index is not None and not re.fullmatch("[0-9]+", index):
        raise ValueError(f'index must be a number, got "{index}"')
    if name == "":
        raise ValueError("name must not be empty")
    if domain not in ("INET", "INET6", "UNIX"):
        raise ValueError(f'unknown domain "{domain}" (use INET, INET6 or UNIX)')


def _checkEndpoint(description: str) -> str | None:
    """
    @return: Why C{description} is not a usable server endpoint string, or
        C{None}.
    """
    if description.lower().startswith("haproxy:"):
        # Twisted's wrapper believes a PROXY header from anyone and tells the
        # session its address only after the session has started: the relay
        # would take every client for the proxy (trusted_networks, limits).
        return (
            f'invalid endpoint "{description}": use a tcp: endpoint with '
            "proxy_protocol = true and trusted_proxies in its [[listener]]"
        )
    inner = description
    try:
        fields = _splitEndpoint(inner)
        if fields[0][0].lower() == "systemd" and fields[0][1] is None:
            positional = [text for text, value in fields[1:] if value is None]
            named = {text: value for text, value in fields[1:] if value is not None}
            _systemdArguments(*positional, **named)
        else:
            serverFromString(MemoryReactor(), description)
    except Exception as e:
        return f'invalid endpoint "{description}": {_cleanException(e)}'
    return None


def _checkUpstreamHost(value: str) -> str | None:
    """
    @return: Why C{value} is not a host name or IP address, or C{None}.
    """
    if not value:
        return None
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        return _checkHostname(value)


def _checkNameserver(value: str) -> str | None:
    """
    @return: Why C{value} is not C{address} or C{address:port}, or C{None}.
    """
    host, port = value, "53"
    if value.count(":") == 1:
        host, port = value.split(":")
    elif value.startswith("[") and "]:" in value:
        host, port = value[1:].split("]:")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f'"{value}" is not an IP address (with an optional :port)'
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f'"{value}" has a bad port'
    return None


def _checkPasswordFile(path: str) -> str | None:
    """
    @return: Why the upstream password cannot be read from C{path}, or
        C{None}.
    """
    try:
        with open(path, "rb") as f:
            if not f.read().strip():
                return f'"{path}" is empty'
    except OSError as e:
        return f'cannot read "{path}": {e.strerror or e}'
    return None


def readPasswordFile(path: str) -> bytes:
    """
    The password in C{path}: its first line, without the line ending.
    """
    with open(path, "rb") as f:
        return f.read().splitlines()[0]


def _checkChecker(description: str) -> str | None:
    """
    @return: Why C{description} does not make a username/password checker,
        or C{None}.
    """
    authType, _, argument = description.partition(":")
    # Twisted's file checker only prints a warning for a missing file.
    if authType == "file" and argument.strip() and not os.path.isfile(argument):
        return f'"{description}": no such file "{argument}"'
    try:
        checker = strcred.makeChecker(description)
    except strcred.InvalidAuthType:
        known = sorted(f.authType for f in strcred.findCheckerFactories())
        message = f'"{description}": unknown checker type "{authType}"'
        suggestion = _suggest(authType, known)
        if suggestion is not None:
            message += f'; did you mean "{suggestion}"?'
        return message
    except Exception as e:
        return f'"{description}": {_cleanException(e)}'
    if IUsernamePassword not in getattr(checker, "credentialInterfaces", ()):
        return f'"{description}" does not check usernames and passwords'
    return None


def _parseNetwork(value: str) -> IPNetwork | str:
    """
    @return: The network C{value} names, or why it names none.
    """
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return (
            f'"{value}" is not an IP address or a network in CIDR notation '
            '(such as "192.0.2.0/24" or "2001:db8::/32")'
        )
    return f'"{value}" has host bits set; did you mean "{loose}"?'


class _Table:
    """
    One table of the document, and the values read from it so far.

    @ivar values: Each key read and found valid, with its (converted) value.
    @ivar invalid: Keys present but invalid.
    """

    def __init__(
        self,
        validator: "_Validator",
        label: str,
        where: _Path,
        data: Mapping[str, object],
        section: str,
    ) -> None:
        self.validator = validator
        self.label = label
        self.where = where
        self.data = data
        self.values: dict[str, Any] = {}
        self.invalid: set[str] = set()
        known = _SECTION_KEYS[section]
        for key in data:
            if key not in known:
                self.report(key, validator.unknownKeyMessage(key, section))

    def report(self, key: str | None, message: str, index: int | None = None) -> None:
        """
        Add a problem about C{key} (or the table itself).

        @param index: The array element at fault, if any.
        """
        name = self.label
        where = self.where
        present = True
        if key is not None:
            name = f"{name} {key}"
            where += (key,)
            present = key in self.data
            self.invalid.add(key)
            if index is not None:
                name += f"[{index}]"
                where += (index,)
        self.validator.report(where if present else None, name, message)

    def _get(self, key: str, expected: str, accept: Callable[[object], bool]) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
        if not accept(value):
            self.report(key, f"expected {expected}, got {_describe(value)}")
            return _MISSING
        return value

    def string(
        self, key: str, check: Callable[[str], str | None] | None = None
    ) -> str | None:
        """
        Read a string.

        @param check: Returns why a string is not acceptable, or C{None}.
        @return: The string, or C{None} if absent or invalid.
        """
        value = self._get(key, "a string", lambda v: isinstance(v, str))
        if value is _MISSING:
            return None
        if check is not None:
            problem = check(value)
            if problem is not None:
                self.report(key, problem)
                return None
        self.values[key] = value
        return str(value)

    def choice(
        self, key: str, choices: Sequence[str], fuzzy: bool = True
    ) -> str | None:
        """
        Read a string that must be one of C{choices}.

        @param fuzzy: See L{_suggest}.
        """

        def check(value: str) -> str | None:
            return None if value in choices else _notOneOf(value, choices, fuzzy)

        return self.string(key, check)

    def path(self, key: str, emptyIsUnset: bool = False) -> None:
        """
        Read a file or directory name, resolved against the configuration
        file's directory.

        @param emptyIsUnset: Whether C{""} means "not set" (stored as C{None})
            rather than being an error.
        """

        def check(value: str) -> str | None:
            if value or emptyIsUnset:
                return None
            return "must not be empty"

        value = self.string(key, check)
        if value is not None:
            self.values[key] = self.validator.resolve(value) if value else None

    def integer(self, key: str, minimum: int = 1) -> None:
        """
        Read an integer of at least C{minimum}; booleans are not integers.
        """
        value = self._get(
            key,
            "an integer",
            lambda v: isinstance(v, int) and not isinstance(v, bool),
        )
        if value is _MISSING:
            return
        if value < minimum:
            if minimum == 1:
                self.report(key, f"must be a positive integer, got {value}")
            else:
                self.report(key, f"must be at least {minimum}, got {value}")
            return
        self.values[key] = value

    def duration(self, key: str, allowZero: bool = False) -> None:
        """
        Read a positive, finite number of seconds; integers are accepted.

        @param allowZero: whether C{0} (meaning "off") is accepted too.
        """
        value = self._get(
            key,
            "a number",
            lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        )
        if value is _MISSING:
            return
        if not (math.isfinite(value) and (value > 0 or (allowZero and value == 0))):
            lowest = "0 or more" if allowZero else "a positive number of"
            self.report(key, f"must be {lowest} seconds, got {value}")
            return
        self.values[key] = float(value)

    def workers(self, key: str) -> None:
        """
        Read a process count: C{"auto"} (stored as 0) or 1 to
        L{MAX_WORKERS}.
        """
        value = self._get(
            key,
            'an integer or "auto"',
            lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool)),
        )
        if value is _MISSING:
            return
        if value == "auto":
            self.values[key] = 0
        elif not 1 <= value <= MAX_WORKERS:
            self.report(key, f'must be from 1 to {MAX_WORKERS} or "auto", got {value}')
        else:
            self.values[key] = value

    def boolean(self, key: str) -> None:
        """
        Read C{true} or C{false}.
        """
        value = self._get(
            key, "a boolean (true or false)", lambda v: isinstance(v, bool)
        )
        if value is not _MISSING:
            self.values[key] = value

    def strings(self, key: str) -> Iterator[tuple[int, str]]:
        """
        Read an array of strings.

        @return: The index and value of each string element; elements of
            other types are reported and skipped.
        """
        value = self._get(key, "an array of strings", lambda v: isinstance(v, list))
        if value is _MISSING:
            return
        for index, item in enumerate(value):
            if isinstance(item, str):
                yield index, item
            else:
                self.report(key, f"expected a string, got {_describe(item)}", index)

    def networks(self, key: str) -> None:
        """
        Read an array of CIDR networks.
        """
        networks = []
        for index, item in self.strings(key):
            network = _parseNetwork(item)
            if isinstance(network, str):
                self.report(key, network, index)
            else:
                networks.append(network)
        if key in self.data and key not in self.invalid:
            self.values[key] = tuple(networks)


def _lanOnly(endpoint: str) -> str | None:
    """
    Why C{endpoint} is not a listener bound to a LAN address only, or
    C{None} if it is (TCP with an C{interface=} that is private, loopback or
    link-local).
    """
    parts = re.split(r"(?<!\\):", endpoint)
    kind = parts[0] if parts else ""
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    interface = options.get("interface", "").replace("\\:", ":")
    if kind not in ("tcp", "tcp6") or not interface:
        return (
            "needs a listener bound to a LAN address"
            ' (endpoint = "tcp:port=2525:interface=192.168.1.5"), so that'
            " passwords in clear never reach it from outside"
        )
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return f"interface {interface!r} is not an IP address"
    if address.is_unspecified or address.is_global:
        return (
            f"the listener's interface {interface} is not a LAN address;"
            " bind it to a private, loopback or link-local address"
        )
    return None


class _Validator:
    """
    Checks a parsed document, collecting every problem.
    """

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.lines = _LineIndex(text)
        self.baseDirectory = os.path.dirname(os.path.abspath(path))
        self.problems: list[tuple[int | None, str]] = []

    def report(self, where: _Path | None, name: str, message: str) -> None:
        """
        Add a problem.

        @param where: Where the value at fault is in the document, or
            C{None} if it is not in it.
        @param name: The section and key, as in C{"[server] hostname"}.
        """
        line = None if where is None else self.lines.nearestLine(where)
        location = self.path if line is None else f"{self.path}:{line}"
        self.problems.append((line, f"{location}: {name}: {message}"))

    def resolve(self, value: str) -> str:
        """
        @return: C{value} as an absolute path, relative ones being taken from
            the configuration file's directory.
        """
        return os.path.normpath(os.path.join(self.baseDirectory, value))

    def unknownKeyMessage(self, key: str, section: str) -> str:
        """
        @return: What to say about C{key}, unknown in C{section}.
        """
        suggestion = _suggest(key, _SECTION_KEYS[section])
        if suggestion is not None:
            return f'unknown key; did you mean "{suggestion}"?'
        for other, keys in _SECTION_KEYS.items():
            if key in keys:
                return f'unknown key; "{key}" belongs in [{other}]'
        return "unknown key"

    def validate(self, data: Mapping[str, object]) -> Config:
        """
        @return: The configuration C{data} describes.
        @raise ConfigError: If it has problems.
        """
        for name, value in data.items():
            if name not in _SECTION_KEYS:
                self.unknownTopLevel(name, value)

        serverTable = self.table(data, "server")
        serverTable.string("hostname", _checkHostname)
        for key in (
            "max_message_size",
            "max_recipients",
            "max_connections",
            "max_connections_per_ip",
        ):
            serverTable.integer(key)
        serverTable.duration("idle_timeout")
        serverTable.duration("data_timeout")
        serverTable.duration("max_session_time")
        serverTable.integer("max_line_length", minimum=80)
        serverTable.boolean("reverse_dns")
        serverTable.workers("workers")
        server = ServerConfig(**serverTable.values)

        tlsTable = self.table(data, "tls")
        tlsTable.path("certificate", emptyIsUnset=True)
        tlsTable.path("private_key", emptyIsUnset=True)
        # Versions differ by one digit: suggest only a different case.
        tlsTable.choice("minimum_version", TLS_VERSIONS, fuzzy=False)
        tls = TLSConfig(**tlsTable.values)
        self.checkCertificate(tlsTable, tls)

        listenerTables = self.listeners(data)
        listeners = tuple(
            ListenerConfig(**t.values) for t in listenerTables if "endpoint" in t.values
        )
        self.checkListenerTLS(listenerTables, tlsTable)

        authTable = self.table(data, "auth")
        self.checkers(authTable)
        self.mechanisms(authTable)
        authTable.boolean("require_tls")
        authTable.values["lockout"] = self.lockout(authTable)
        authTable.path("allowed_networks", emptyIsUnset=True)
        if authTable.values.get("allowed_networks"):
            try:
                UserNetworks(authTable.values["allowed_networks"])
            except OSError as e:
                authTable.report("allowed_networks", f"{e.strerror}: {e.filename}")
        else:
            authTable.values.pop("allowed_networks", None)
        auth = AuthConfig(**authTable.values)

        relayTable = self.table(data, "relay")
        relayTable.networks("trusted_networks")
        relayTable.networks("trusted_relays")
        relayTable.path("sender_login_map", emptyIsUnset=True)
        if relayTable.values.get("sender_login_map"):
            try:
                SenderLoginMap(relayTable.values["sender_login_map"])
            except OSError as e:
                relayTable.report("sender_login_map", f"{e.strerror}: {e.filename}")
        else:
            relayTable.values.pop("sender_login_map", None)
        relayTable.boolean("sender_plus_tags")
        relayTable.boolean("check_header_from")
        if relayTable.values.get("check_header_from") and not relayTable.values.get(
            "sender_login_map"
        ):
            relayTable.report("check_header_from", "needs sender_login_map")
        relay = RelayConfig(**relayTable.values)

        limitsTable = self.table(data, "limits")
        for key in _SECTION_KEYS["limits"]:
            limitsTable.integer(key, minimum=0)
        limits = LimitsConfig(**limitsTable.values)

        metricsTable = self.table(data, "metrics")
        metricsTable.string(
            "endpoint", lambda value: _checkEndpoint(value) if value else None
        )
        metrics = MetricsConfig(**metricsTable.values)

        loggingTable = self.table(data, "logging")
        loggingTable.choice("format", LOG_FORMATS)
        logging = LoggingConfig(**loggingTable.values)

        queueTable = self.table(data, "queue")
        self.queue(queueTable)
        queue = QueueConfig(**queueTable.values)

        deliveryTable = self.table(data, "delivery")
        self.delivery(deliveryTable)
        delivery = DeliveryConfig(**deliveryTable.values)

        self.checkAuthReachable(listenerTables, authTable, relayTable, auth, relay)
        if "trusted_networks" not in relayTable.invalid:
            self.checkLegacyLane(listenerTables, relay)

        if self.problems:
            self.problems.sort(key=lambda p: (p[0] is None, p[0] or 0))
            raise ConfigError(list(dict.fromkeys(p for _, p in self.problems)))
        return Config(
            server=server,
            tls=tls,
            listeners=listeners,
            auth=auth,
            relay=relay,
            queue=queue,
            delivery=delivery,
            path=self.path,
            limits=limits,
            metrics=metrics,
            logging=logging,
            text=self.text,
        )

    def unknownTopLevel(self, name: str, value: object) -> None:
        """
        Report a top-level name that is not a known section.
        """
        if isinstance(value, dict) or (
            isinstance(value, list)
            and value
            and all(isinstance(v, dict) for v in value)
        ):
            suggestion = _suggest(name, list(_SECTION_KEYS))
            message = "unknown section"
            if suggestion is not None:
                message += f'; did you mean "{suggestion}"?'
            self.report((name,), f"[{name}]", message)
            return
        message = "keys must be inside a section"
        for section, keys in _SECTION_KEYS.items():
            if name in keys:
                message += f'; "{name}" belongs in [{section}]'
                break
        self.report((name,), name, message)

    def table(self, data: Mapping[str, object], section: str) -> _Table:
        """
        @return: The table for C{section}, empty if it is absent or not a
            table (which is reported).
        """
        value = data.get(section, {})
        label = f"[{section}]"
        if isinstance(value, dict):
            return _Table(self, label, (section,), value, section)
        if isinstance(value, list):
            message = f"must be a single table: write [{section}], not [[{section}]]"
        else:
            message = f"must be a table, got {_describe(value)}"
        self.report((section,), label, message)
        return _Table(self, label, (section,), {}, section)

    def listeners(self, data: Mapping[str, object]) -> list[_Table]:
        """
        Read every C{[[listener]]}.
        """
        value = data.get("listener", _MISSING)
        if value is _MISSING:
            self.report(
                None,
                "[listener]",
                'at least one [[listener]] is required, e.g. endpoint = "tcp:port=587"',
            )
            return []
        if not isinstance(value, list):
            message = (
                "must be an array of tables: write [[listener]], once per listener"
            )
            self.report(("listener",), "[listener]", message)
            return []
        if not value:
            self.report(
                ("listener",), "[listener]", "at least one listener is required"
            )
        tables = []
        for index, item in enumerate(value):
            label = f"[listener #{index + 1}]"
            if not isinstance(item, dict):
                self.report(
                    ("listener", index),
                    label,
                    f"expected a table, got {_describe(item)}",
                )
                continue
            table = _Table(self, label, ("listener", index), item, "listener")
            if "endpoint" not in item:
                table.report("endpoint", "required key is missing")
            else:
                table.string("endpoint", _checkEndpoint)
            table.choice("tls", LISTENER_TLS_MODES)
            table.boolean("proxy_protocol")
            table.networks("trusted_proxies")
            table.choice("minimum_tls_version", LISTENER_TLS_VERSIONS, fuzzy=False)
            if table.values.get("minimum_tls_version") and (
                table.values.get("tls", ListenerConfig.tls) == "none"
            ):
                table.report("minimum_tls_version", 'has no effect with tls = "none"')
            table.networks("allow_plaintext_auth_from")
            table.networks("allow_bare_lf_from")
            if "trusted_proxies" not in table.invalid:
                if table.values.get("proxy_protocol") and not table.values.get(
                    "trusted_proxies"
                ):
                    table.report(
                        "proxy_protocol",
                        "needs trusted_proxies, the networks the proxies connect "
                        'from (e.g. ["10.0.0.5/32"])',
                    )
                elif table.values.get("trusted_proxies") and not table.values.get(
                    "proxy_protocol"
                ):
                    table.report(
                        "trusted_proxies",
                        "has no effect without proxy_protocol = true",
                    )
            tables.append(table)
        return tables

    def checkCertificate(self, table: _Table, tls: TLSConfig) -> None:
        """
        Check that the certificate and key can be loaded and belong
        together.
        """
        certificate = key = None
        if tls.certificate is not None:
            try:
                certificate = loadCertificates(tls.certificate)[0]
            except OSError as e:
                table.report(
                    "certificate", f'cannot read "{tls.certificate}": {e.strerror or e}'
                )
            except ValueError as e:
                table.report("certificate", str(e))
        if tls.private_key is not None:
            try:
                key = loadPrivateKey(tls.private_key)
            except OSError as e:
                table.report(
                    "private_key", f'cannot read "{tls.private_key}": {e.strerror or e}'
                )
            except ValueError as e:
                table.report("private_key", str(e))
        if certificate is not None and key is not None:
            if not keyMatches(key, certificate):
                table.report(
                    "private_key",
                    f'"{tls.private_key}" does not match the certificate '
                    f'in "{tls.certificate}"',
                )

        def isUnset(key: str) -> bool:
            return table.data.get(key, "") == ""

        for missing, other in (
            ("certificate", "private_key"),
            ("private_key", "certificate"),
        ):
            if isUnset(missing) and not isUnset(other):
                table.report(missing, f"required when {other} is set")

    def checkListenerTLS(self, listeners: list[_Table], tlsTable: _Table) -> None:
        """
        Report listeners that need TLS when no certificate is configured.
        """
        if tlsTable.data.get("certificate", "") or tlsTable.data.get("private_key", ""):
            return
        for table in listeners:
            if "tls" in table.invalid:
                continue
            mode = table.values.get("tls", ListenerConfig.tls)
            if mode != "none":
                default = "" if "tls" in table.data else " (the default)"
                table.report(
                    "tls",
                    f'"{mode}"{default} needs [tls] certificate and private_key; '
                    'set them, or use tls = "none"',
                )

    def checkers(self, table: _Table) -> None:
        """
        Read C{[auth] checkers}, making each checker to see that it works.
        """
        checkers = []
        for index, description in table.strings("checkers"):
            problem = _checkChecker(description)
            if problem is not None:
                table.report("checkers", problem, index)
            checkers.append(description)
        if "checkers" in table.data and "checkers" not in table.invalid:
            table.values["checkers"] = tuple(checkers)

    def mechanisms(self, table: _Table) -> None:
        """
        Read C{[auth] mechanisms}, upper-casing them and dropping repeats.
        """
        mechanisms: list[str] = []
        for index, name in table.strings("mechanisms"):
            if name.upper() not in AUTH_MECHANISMS:
                table.report("mechanisms", _notOneOf(name, AUTH_MECHANISMS), index)
            elif name.upper() not in mechanisms:
                mechanisms.append(name.upper())
        if "mechanisms" in table.data and "mechanisms" not in table.invalid:
            if not mechanisms:
                table.report("mechanisms", "at least one mechanism is required")
            else:
                table.values["mechanisms"] = tuple(mechanisms)

    def lockout(self, authTable: _Table) -> LockoutConfig:
        """
        Read C{[auth.lockout]}.
        """
        value = authTable.data.get("lockout", {})
        if not isinstance(value, dict):
            authTable.report("lockout", "must be a table: write [auth.lockout]")
            value = {}
        table = _Table(
            self, "[auth.lockout]", ("auth", "lockout"), value, "auth.lockout"
        )
        table.integer("max_failures")
        table.integer("subnet_max_failures", minimum=0)
        table.integer("session_max_failures")
        for key in ("window", "duration", "max_duration"):
            table.duration(key)
        table.duration("trusted_after_success", allowZero=True)
        table.duration("tarpit", allowZero=True)
        values = dict(table.values)
        if not values.get("subnet_max_failures"):
            values["subnet_max_failures"] = 10 * values.get(
                "max_failures", LockoutConfig.max_failures
            )
        duration = values.get("duration", LockoutConfig.duration)
        if values.get("max_duration", LockoutConfig.max_duration) < duration:
            table.report("max_duration", "must not be less than duration")
            values.pop("max_duration", None)
        return LockoutConfig(**values)

    def queue(self, table: _Table) -> None:
        """
        Read C{[queue]}.
        """
        table.path("directory")
        value = table._get(
            "retry_schedule", "an array of numbers", lambda v: isinstance(v, list)
        )
        if value is not _MISSING:
            schedule = []
            for index, item in enumerate(value):
                if (
                    isinstance(item, int | float)
                    and not isinstance(item, bool)
                    and math.isfinite(item)
                    and item > 0
                ):
                    schedule.append(float(item))
                else:
                    table.report(
                        "retry_schedule",
                        f"expected a positive number of seconds, got {_describe(item)}",
                        index,
                    )
            if not value:
                table.report("retry_schedule", "must not be empty")
            elif len(schedule) == len(value):
                table.values["retry_schedule"] = tuple(schedule)
        table.duration("max_lifetime")
        table.integer("max_concurrent_deliveries")
        table.duration("delay_warning", allowZero=True)
        table.duration("flow_delay", allowZero=True)
        if table.values.get("flow_delay", 0) > MAX_FLOW_DELAY:
            table.report(
                "flow_delay",
                f"must be at most {MAX_FLOW_DELAY:g} seconds (clients wait that"
                f" long for the reply to MAIL FROM), got {table.values.pop('flow_delay'):g}",
            )

    def delivery(self, table: _Table) -> None:
        """
        Read C{[delivery]}.
        """
        table.choice("mode", DELIVERY_MODES)
        table.path("directory", emptyIsUnset=True)
        table.string("host", _checkUpstreamHost)
        table.integer("port")
        if table.values.get("port", 1) > 65535:
            table.report("port", f"must be at most 65535, got {table.values['port']}")
            table.values.pop("port")
        table.choice("tls", DELIVERY_TLS_MODES)
        table.boolean("verify")
        table.path("ca_file", emptyIsUnset=True)
        if table.values.get("ca_file"):
            try:
                loadCertificates(table.values["ca_file"])
            except (OSError, ValueError) as e:
                table.report("ca_file", getattr(e, "strerror", None) or str(e))
        elif "ca_file" in table.values:
            table.values.pop("ca_file")
        table.string("username")
        table.path("password_file", emptyIsUnset=True)
        table.boolean("forward_auth_identity")
        table.integer("max_per_destination")
        table.duration("connect_timeout")
        table.duration("timeout")
        nameservers = []
        for index, item in table.strings("nameservers"):
            problem = _checkNameserver(item)
            if problem:
                table.report("nameservers", problem, index)
            else:
                nameservers.append(item)
        if "nameservers" in table.data and "nameservers" not in table.invalid:
            table.values["nameservers"] = tuple(nameservers)
        if table.values.get("directory") is None:
            table.values.pop("directory", None)
        if table.values.get("password_file") is None:
            table.values.pop("password_file", None)
        if "mode" in table.invalid:
            return
        mode = table.values.get("mode", DeliveryConfig.mode)
        if mode == "maildir" and not table.values.get("directory"):
            if "directory" not in table.invalid:
                table.report("directory", 'required when mode = "maildir"')
        if mode == "smarthost" and not table.values.get("host"):
            if "host" not in table.invalid:
                table.report("host", 'required when mode = "smarthost"')
        if mode == "smarthost" and "port" not in table.data:
            tls = table.values.get("tls", DeliveryConfig.tls)
            table.values["port"] = SMARTHOST_PORTS[tls]
        if mode == "mx" and "port" not in table.data:
            table.values["port"] = 25
        username = table.values.get("username", "")
        passwordFile = table.values.get("password_file")
        if (
            username
            and not passwordFile
            and "password_file" not in table.invalid
            and table.data.get("auth", "password") == "password"
        ):
            table.report("password_file", "required when username is set")
        if passwordFile and not username:
            table.report("username", "required when password_file is set")
        if passwordFile:
            problem = _checkPasswordFile(passwordFile)
            if problem:
                table.report("password_file", problem)
        if username and mode == "mx":
            table.report("username", 'only used with mode = "smarthost"')
        if (
            username
            and table.values.get("tls", DeliveryConfig.tls) == "none"
            and table.data.get("auth", "password") == "password"
        ):
            table.report(
                "tls",
                '"none" would send the smarthost password unencrypted; '
                'use "starttls" or "implicit"',
            )
        self.deliveryAuth(table, mode)
        self.rewrite(table, mode)

    def deliveryAuth(self, table: _Table, mode: str) -> None:
        """
        Read C{[delivery] auth} and C{[delivery.oauth2]}.
        """
        auth = table.choice("auth", DELIVERY_AUTH)
        value = table.data.get("oauth2", _MISSING)
        if value is not _MISSING and not isinstance(value, dict):
            table.report("oauth2", "must be a table: write [delivery.oauth2]")
            return
        if auth in (None, "password"):
            if value is not _MISSING:
                table.report(
                    "oauth2",
                    '[delivery.oauth2] is only used with auth = "xoauth2" or '
                    '"oauthbearer"',
                )
            return
        if mode != "smarthost":
            table.report("auth", f'"{auth}" is only used with mode = "smarthost"')
        for key in ("username", "password_file"):
            if table.data.get(key):
                table.report(
                    key,
                    f'not used with auth = "{auth}" (the mailbox is '
                    "[delivery.oauth2] username)",
                )
        if table.values.get("tls", DeliveryConfig.tls) == "none":
            table.report(
                "tls",
                '"none" would send the OAuth2 token unencrypted; '
                'use "starttls" or "implicit"',
            )
        if value is _MISSING:
            table.report("oauth2", f'auth = "{auth}" needs a [delivery.oauth2] table')
            return
        assert isinstance(value, dict)
        oauth = _Table(
            self, "[delivery.oauth2]", ("delivery", "oauth2"), value, "delivery.oauth2"
        )
        for key in ("token_endpoint", "client_id", "username"):
            if key not in value:
                oauth.report(key, "required key is missing")
        oauth.string("token_endpoint", checkTokenEndpoint)
        oauth.string("client_id", lambda v: None if v.strip() else "must not be empty")
        oauth.string("username", lambda v: None if v.strip() else "must not be empty")
        oauth.string("scope")
        oauth.string(
            "device_authorization_endpoint",
            lambda v: checkTokenEndpoint(v) if v else None,
        )
        for key in (
            "client_secret_file",
            "certificate",
            "private_key",
            "refresh_token_file",
        ):
            oauth.path(key, emptyIsUnset=True)
        values = {k: v for k, v in oauth.values.items() if v not in (None, "")}
        secretFile = values.get("client_secret_file")
        if secretFile:
            problem = _checkPasswordFile(secretFile)
            if problem:
                oauth.report("client_secret_file", problem)
        certificate, keyPath = values.get("certificate"), values.get("private_key")
        if secretFile and (certificate or keyPath):
            oauth.report(
                "client_secret_file",
                "give either client_secret_file or certificate and private_key, "
                "not both",
            )
        elif certificate and keyPath:
            try:
                loadAssertionKey(certificate, keyPath)
            except OSError as e:
                oauth.report(
                    "certificate" if e.filename == certificate else "private_key",
                    f'cannot read "{e.filename}": {e.strerror or e}',
                )
            except ValueError as e:
                oauth.report("private_key", str(e))
        elif certificate or keyPath:
            missing = "private_key" if certificate else "certificate"
            other = "certificate" if certificate else "private_key"
            oauth.report(missing, f"required when {other} is set")
        refresh = values.get("refresh_token_file")
        if refresh:
            # The file may not exist yet (oauth2 authorize writes it); its
            # directory must.
            if not os.path.isdir(os.path.dirname(refresh)):
                oauth.report(
                    "refresh_token_file",
                    f'the directory of "{refresh}" does not exist',
                )
        elif not secretFile and not (certificate and keyPath):
            if "client_secret_file" not in oauth.invalid:
                oauth.report(
                    "client_secret_file",
                    "the client-credentials grant (no refresh_token_file) needs "
                    "client_secret_file, or certificate and private_key",
                )
        if oauth.invalid or not all(
            k in values for k in ("token_endpoint", "client_id", "username")
        ):
            table.invalid.add("oauth2")
            return
        if "scope" not in value:
            values["scope"] = defaultScope(values["token_endpoint"], bool(refresh))
        table.values["oauth2"] = OAuth2Config(**values)

    def rewrite(self, table: _Table, mode: str) -> None:
        """
        Read C{[delivery] rewrite_sender} and C{rewrite_from}.
        """

        def check(value: str) -> str | None:
            if not value:
                return None
            try:
                canonicalAddress(value)
            except ValueError as e:
                return f'"{value}" is not an address (local@domain): {e}'
            return None

        table.string("rewrite_sender", check)
        table.boolean("rewrite_from")
        if table.values.get("rewrite_sender") and mode != "smarthost":
            table.report("rewrite_sender", 'only used with mode = "smarthost"')

    def checkLegacyLane(self, listeners: list[_Table], relay: RelayConfig) -> None:
        """
        The legacy lane is for devices in C{[relay] trusted_networks} only,
        and plaintext AUTH only on a listener bound to a LAN address.
        """
        for table in listeners:
            for key in ("allow_plaintext_auth_from", "allow_bare_lf_from"):
                for network in table.values.get(key, ()):
                    if not any(
                        network.version == trusted.version
                        and network.subnet_of(trusted)
                        for trusted in relay.trusted_networks
                    ):
                        table.report(
                            key,
                            f"{network} is not within [relay] trusted_networks:"
                            " the legacy lane is only for your own devices",
                        )
            if table.values.get("allow_plaintext_auth_from"):
                problem = _lanOnly(table.values.get("endpoint", ""))
                if problem is not None:
                    table.report("allow_plaintext_auth_from", problem)

    def checkAuthReachable(
        self,
        listeners: list[_Table],
        authTable: _Table,
        relayTable: _Table,
        auth: AuthConfig,
        relay: RelayConfig,
    ) -> None:
        """
        Report C{require_tls} when no listener can ever offer TLS and nobody
        may relay without AUTH: nothing could be relayed at all.
        """
        if not listeners or "require_tls" in authTable.invalid:
            return
        if "trusted_networks" in relayTable.invalid or relay.trusted_networks:
            return
        if not auth.require_tls:
            return
        if any(t.values.get("allow_plaintext_auth_from") for t in listeners):
            return
        modes = [t.values.get("tls", ListenerConfig.tls) for t in listeners]
        if any("tls" in t.invalid for t in listeners) or any(
            m != "none" for m in modes
        ):
            return
        authTable.report(
            "require_tls",
            'is true but every listener has tls = "none", so AUTH could never '
            "be offered; add a TLS listener, set require_tls = false, or list "
            "[relay] trusted_networks",
        )
