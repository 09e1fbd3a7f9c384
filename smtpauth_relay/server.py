"""
The ESMTP server protocol of the relay: submission with AUTH over TLS.

L{RelayESMTP} subclasses L{twisted.mail.smtp.ESMTP} for its command dispatch
(C{do_*}/C{ext_*}), C{host} and timeout machinery, and replaces the parts
where twisted.mail is unsafe for a submission gateway (the "known traps" in
STYLE.md):

 1. AUTH is neither advertised nor accepted before TLS when C{require_tls}
    (538 5.7.11).
 2. Lines pipelined after STARTTLS in the same packet are dropped, and the
    EHLO state is forgotten (RFC 3207; CVE-2011-0411 class).
 3. Spool failures answer 451 4.3.0 / 452 4.3.1, never a permanent 550.
 4. One spool writer per transaction, whatever the number of recipients; the
    Received header is built here, where TLS and AUTH state are known.
 5. Bare CR or LF in DATA fails the message (550 5.6.11); see
    L{smtpauth_relay.submission}.

Commands are processed one at a time: while one waits on a L{Deferred} (a
password check, the spool's fsync) the transport is paused and pipelined
commands wait in the buffer, so replies always come in order and nothing
after QUIT overtakes a pending 250.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpauth_relay import replies
from smtpauth_relay.addresses import (
    MailFrom,
    ParameterError,
    PathSyntaxError,
    parseMailFrom,
    parseRcptTo,
)
from smtpauth_relay.auth import LoginContext, Submitter, chainOf, login
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.errors import CheckerUnavailable, SpoolError
from smtpauth_relay.interfaces import (
    IAdmission,
    IFlowControl,
    ILoginGuard,
    ISessionLimits,
    ISessionMetrics,
    ISpool,
)
from smtpauth_relay.lockout import Lock
from smtpauth_relay.metrics import RelayMetrics, refusalReason, rejectionReason
from smtpauth_relay.policy import IPNetwork, RelayPolicy, inNetworks
from smtpauth_relay.rdns import confirmedName
from smtpauth_relay.replies import Reply
from smtpauth_relay.sasl import (
    CLIENT_FIRST,
    MECHANISMS,
    AuthorizationRefused,
    ChannelBindingNotSupported,
    Mechanism,
    MechanismError,
    Step,
    makeMechanism,
)
from smtpauth_relay.senders import SenderLoginMap, headerFromAddresses
from smtpauth_relay.submission import MessageIntake
from smtpauth_relay.tcp import noDelay
from smtpauth_relay.trace import TLSInfo, logSafe, receivedHeader, sanitiseHelo
from smtpauth_relay.usernetworks import UserNetworks

log = Logger()

COMMAND_LINE_LIMIT = 512
"""Octets in a command line, CRLF included (RFC 5321 section 4.5.3.1.4)."""
MAIL_LINE_LIMIT = COMMAND_LINE_LIMIT + 26 + 500 + 14
"""MAIL with SIZE= (RFC 1870: 26 more), AUTH= (RFC 4954: 500 more), BODY=."""
AUTH_LINE_LIMIT = 12288
"""AUTH command lines and responses (RFC 4954 section 4)."""
MAX_ERRORS = 20
"""Protocol errors before the session is closed, as Postfix's hard limit."""
INPUT_HIGH_WATER = 64 * 1024
"""
Unprocessed input held while our replies are backed up before we stop
reading from the client.
"""
CLOSE_GRACE = 10.0
"""
Seconds a closing session has to flush its last reply before it is aborted:
C{loseConnection} waits for buffered data, and a client that never reads, or
never finishes a TLS handshake, would otherwise hold its slot for ever.
"""

_COMMANDS = {
    b"HELO": "do_HELO",
    b"EHLO": "do_EHLO",
    b"MAIL": "do_MAIL",
    b"RCPT": "do_RCPT",
    b"DATA": "do_DATA",
    b"RSET": "do_RSET",
    b"NOOP": "do_NOOP",
    b"QUIT": "do_QUIT",
    b"HELP": "do_HELP",
    b"VRFY": "do_VRFY",
    b"EXPN": "do_EXPN",
    b"STARTTLS": "ext_STARTTLS",
    b"AUTH": "ext_AUTH",
}
_HTTP_VERBS = {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE"}

TLS_MODES = ("starttls", "implicit", "none")

_CHANNEL_BINDING_REFUSED = Reply(501, "5.5.2", "Channel binding is not supported")
"""A SCRAM client asked for channel binding (C{p=}); no -PLUS is offered."""


@dataclass(frozen=True)
class SessionSettings:
    """
    What every session of one listener needs to know.
    """

    hostname: str
    maxMessageSize: int = 26214400
    maxRecipients: int = 100
    idleTimeout: float = 300.0
    maxLineLength: int = 1000
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    requireTLS: bool = True
    tlsMode: str = "starttls"
    sessionMaxAuthFailures: int = 3
    dataTimeout: float = 300.0
    maxSessionTime: float = 3600.0
    tlsFloor: str = "TLSv1.2"
    """The oldest TLS version allowed to everyone ([tls] minimum_version)."""
    legacyTLSFrom: tuple[IPNetwork, ...] = ()
    """Clients allowed a TLS version below L{tlsFloor} (the legacy lane)."""
    plaintextAuthFrom: tuple[IPNetwork, ...] = ()
    """Clients allowed to AUTH without TLS (the legacy lane)."""
    bareLFFrom: tuple[IPNetwork, ...] = ()
    """Clients whose bare LF in DATA is taken as a line end (the legacy lane)."""


class ConnectionLimiter:
    """
    Counts open sessions across every listener, overall and per client
    address, and closes them all cleanly at shutdown.

    @ivar sessions: the open sessions.
    """

    def __init__(self, maxConnections: int, maxPerAddress: int) -> None:
        self.maxConnections = maxConnections
        self.maxPerAddress = maxPerAddress
        self.total = 0
        self.perAddress: Counter[str] = Counter()
        self.sessions: set[RelayESMTP] = set()
        self._drained: Deferred[None] | None = None

    def open(self, address: str, session: RelayESMTP) -> Reply | None:
        """
        Count a new session; return the 421 to give it if over a limit or
        shutting down (it still counts until L{close}).
        """
        self.sessions.add(session)
        return self.countOpen(address)

    def countOpen(self, address: str) -> Reply | None:
        """
        Count a new session of a worker process (C{[server] workers}); like
        L{open}, without a session here to close at shutdown.
        """
        self.total += 1
        self.perAddress[address] += 1
        if self._drained is not None:
            return replies.SHUTTING_DOWN
        if self.total > self.maxConnections:
            return replies.TOO_MANY_CONNECTIONS
        if self.perAddress[address] > self.maxPerAddress:
            return replies.TOO_MANY_FROM_ADDRESS
        return None

    def countClose(self, address: str) -> None:
        """
        A worker's session counted by L{countOpen} is over.
        """
        self.total -= 1
        self.perAddress[address] -= 1
        if self.perAddress[address] <= 0:
            del self.perAddress[address]

    def close(self, address: str, session: RelayESMTP) -> None:
        self.countClose(address)
        self.sessions.discard(session)
        if not self.sessions and self._drained is not None:
            drained, self._drained = self._drained, None
            if not drained.called:
                drained.callback(None)

    def drain(self, clock: Any, grace: float) -> Deferred[None]:
        """
        Shut every session down: idle ones at once with 421 4.3.2, busy ones
        once their current command (a message being received or spooled) is
        done; abort whatever is left after C{grace} seconds.

        @return: a L{Deferred} firing when no session is left.
        """
        if not self.sessions:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained = drained
        for session in list(self.sessions):
            session.shutdown()

        def abortRest() -> None:
            for session in list(self.sessions):
                session.transport.abortConnection()

        call = clock.callLater(grace, abortRest)

        def stopTimer(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        return drained.addBoth(stopTimer)


def peerHost(transport: Any) -> str:
    """
    The client's address as text (a UNIX socket peer gives its repr).
    """
    peer = transport.getPeer()
    return str(getattr(peer, "host", peer))


#: TLS versions by age, as OpenSSL names them.
TLS_ORDER = {"TLSv1": 0, "TLSv1.1": 1, "TLSv1.2": 2, "TLSv1.3": 3}


def tlsInfo(transport: Any) -> TLSInfo | None:
    """
    The negotiated TLS version and cipher of C{transport}, if it is TLS.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    try:
        connection = cast(Any, transport).getHandle()  # OpenSSL.SSL.Connection
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
        bits = connection.get_cipher_bits()
    except Exception:
        return TLSInfo("TLS", "unknown")
    return TLSInfo(version or "TLS", cipher or "unknown", bits)


@implementer(IHandshakeListener)
class RelayESMTP(smtp.ESMTP):
    """
    One SMTP session; see the module docstring.
    """

    transport: Any

    def __init__(self, factory: RelayServerFactory) -> None:
        smtp.ESMTP.__init__(self, contextFactory=factory.contextFactory)
        self.factory = factory
        self.settings: SessionSettings = factory.settings
        self.host = self.settings.hostname.encode("idna")
        self.clock = factory.clock
        self._buffer = b""
        self._pos = 0
        self._outputBlocked = False
        self._readingPaused = False
        self._producing = False
        self._mode = "command"
        self._busy = False
        self._admissionCounted = False
        """Counted by the main process (a worker's session, L{ipc})."""
        self._processing = False
        self._discardingLine = False
        self._inLongDataLine = False
        self._slowUntil = 0
        """Buffer offset up to which DATA lines take the careful path."""
        self._heloName: str | None = None
        self._esmtp = False
        self._secure = self.settings.tlsMode == "implicit"
        self._tlsInfoCache: TLSInfo | None = None
        self._submitter: Submitter | None = None
        self._mail: MailFrom | None = None
        self._recipients: list[str] = []
        self._intake: MessageIntake | None = None
        self._mechanism: Mechanism | None = None
        self._authenticated: Submitter | None = None
        """Logged in, waiting for the empty answer to a final challenge."""
        self._lost = False
        self._errors = 0
        self._counted = False
        self._peer = ""
        self._started = 0.0
        self._accepted = 0
        self._reverseName: str | None = None
        self._authFailures = 0
        self._sessionCall: Any = None
        self._abortCall: Any = None
        self._handshakePending = self._secure
        self._shuttingDown = False
        self._plaintextAuth = False
        self._bareLF = False
        self._legacy: list[str] = []
        """What the legacy lane allowed this session (for Received)."""

    # -- connection -----------------------------------------------------

    def callLater(self, period: float, func: Any) -> Any:
        """
        L{policies.TimeoutMixin} schedules on the injected clock.
        """
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self._peer = peerHost(self.transport)
        self._plaintextAuth = inNetworks(self._peer, self.settings.plaintextAuthFrom)
        self._bareLF = inNetworks(self._peer, self.settings.bareLFFrom)
        self._started = self.clock.seconds()
        refusal = self.factory.limiter.open(self._peer, self)
        self._counted = True
        self.factory.metrics.connectionOpened(
            self.factory.listener, self.settings.tlsMode
        )
        admission = self.factory.admission
        if refusal is None and admission is not None:
            # A worker process: the main process counts every process's
            # clients (and their rate); nothing is read until it answers.
            self._admissionCounted = True
            self._busy = True
            admission.connect(self._peer).addErrback(self._admissionFailed).addCallback(
                self._admit
            )
            return
        limits = self.factory.limits
        if refusal is None and limits is not None:
            if not limits.connectionAllowed(self._peer):
                refusal = replies.TOO_MANY_CONNECTIONS_RATE
        self._admit(refusal)

    def _admissionFailed(self, failure: Failure) -> Reply:
        log.error(
            "no answer from the main process for {peer}: {error}",
            peer=self._peer,
            error=failure.getErrorMessage(),
        )
        return replies.SHUTTING_DOWN

    def _admit(self, refusal: Reply | None) -> None:
        """
        Greet the client, or give it C{refusal} and close.
        """
        self._busy = False
        if self._lost:
            return
        if refusal is not None:
            self.factory.metrics.connectionRefused(refusalReason(refusal))
            log.info(
                "refused connection from {peer}: {reason}",
                peer=self._peer,
                reason=refusal.text,
            )
            self.reply(refusal)
            self._close(waitForHandshake=True)
            return
        self.canStartTLS = self.settings.tlsMode == "starttls" and self.ctx is not None
        if self.factory.resolver is not None:
            # Looked up in the background; the Received header uses the
            # answer if it has come by DATA ("unknown" otherwise).
            self._reverseName = "unknown"
            confirmedName(self.factory.resolver, self._peer).addCallback(
                self._gotReverseName
            )
        self.transport.registerProducer(self, True)
        self._producing = True
        self.reply(Reply(220, None, f"{self.settings.hostname} ESMTP smtpauth-relay"))
        self.setTimeout(self.settings.idleTimeout)
        self._sessionCall = self.clock.callLater(
            self.settings.maxSessionTime, self._sessionTooLong
        )
        if self._buffer:
            # An early talker's commands, held while the main process was
            # asked.
            self._updateReading()
            self._processBuffer()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (L{IHandshakeListener}).  A version below
        the floor is allowed only to the legacy lane; anyone else is told
        and disconnected.
        """
        self._handshakePending = False
        info = tlsInfo(self.transport)
        if info is None or info.version not in TLS_ORDER:
            return
        if TLS_ORDER[info.version] >= TLS_ORDER.get(self.settings.tlsFloor, 0):
            return
        if inNetworks(self._peer, self.settings.legacyTLSFrom):
            self._legacy.append(info.version)
            return
        log.info(
            "refused {version} from {peer}: below [tls] minimum_version",
            version=info.version,
            peer=self._peer,
        )
        # On the next turn: with implicit TLS the greeting, written before
        # the handshake, is still waiting in the TLS layer and must go first.
        self._busy = True
        self.clock.callLater(0, self._refuseOldTLS)

    def _refuseOldTLS(self) -> None:
        if self.transport.disconnecting:
            return
        self.reply(replies.TLS_TOO_OLD)
        self._close()

    def _close(self, waitForHandshake: bool = False) -> None:
        """
        Close after flushing what was written, and abort if that does not
        happen within L{CLOSE_GRACE} seconds.

        @param waitForHandshake: during a TLS handshake nothing can be
            flushed (the client has no keys yet), so the session is aborted
            at once, unless this is set: then a client that completes the
            handshake within the grace period still reads our last reply
            (the 421 of a refused connection on an implicit-TLS port).
        """
        if self._handshakePending and not waitForHandshake:
            self.transport.abortConnection()
            return
        if self._abortCall is None:
            self._abortCall = self.clock.callLater(
                CLOSE_GRACE, self.transport.abortConnection
            )
        # A TLS transport postpones its shutdown while a producer is
        # registered: we have nothing more to produce.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._endAuth()
        if self._sessionCall is not None and self._sessionCall.active():
            self._sessionCall.cancel()
        self._sessionCall = None
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        if self._intake is not None:
            self._intake.abort()
            self._intake = None
        if self._admissionCounted:
            self._admissionCounted = False
            assert self.factory.admission is not None
            self.factory.admission.disconnect(self._peer)
        if self._counted:
            self._counted = False
            self.factory.limiter.close(self._peer, self)
            self.factory.metrics.connectionClosed(self.factory.listener)
        self.setTimeout(None)
        log.info(
            "connection from {peer} closed after {duration:.1f}s: tls={tls} "
            "user={user} accepted={accepted} errors={errors}",
            peer=self._peer,
            duration=self.clock.seconds() - self._started,
            tls=self._secure,
            user=logSafe(self._submitter.username) if self._submitter else None,
            accepted=self._accepted,
            errors=self._errors,
        )

    def _gotReverseName(self, name: str | None) -> None:
        if name is not None:
            self._reverseName = name

    def _timeoutNow(self) -> float:
        """
        The inactivity limit for the session's state: between commands, or
        inside DATA.
        """
        if self._mode == "data":
            return self.settings.dataTimeout
        return self.settings.idleTimeout

    def _sessionTooLong(self) -> None:
        self._sessionCall = None
        log.info("session from {peer} reached max_session_time", peer=self._peer)
        self.reply(replies.SESSION_TOO_LONG)
        self._close()

    def timeoutConnection(self) -> None:
        log.info("idle timeout for {peer}", peer=self._peer)
        self.reply(replies.IDLE_TIMEOUT)
        self._close()

    def reply(self, reply: Reply, **fields: str) -> None:
        """
        Send C{reply}, filling C{{name}} fields of its text from C{fields}.
        """
        if fields:
            reply = reply.withText(reply.text.format(**fields))
        self.transport.writeSequence(
            [part for line in reply.lines() for part in (line, b"\r\n")]
        )

    def _reject(self, reply: Reply, countError: bool = True) -> None:
        """
        Refuse a message (or its sender or a recipient) with C{reply},
        counted in the metrics by reason.
        """
        self.factory.metrics.messageRejected(
            rejectionReason(reply.code, reply.enhanced)
        )
        if countError:
            self._error(reply)
        else:
            self.reply(reply)

    def _error(self, reply: Reply) -> None:
        """
        Send an error reply, and close the session after too many.
        """
        self._errors += 1
        self.reply(reply)
        if self._errors >= MAX_ERRORS:
            log.info("too many errors from {peer}", peer=self._peer)
            self.reply(replies.TOO_MANY_ERRORS)
            self._close()

    # -- input ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting:
            return
        if not self._secure and not self._buffer and data[:2] == b"\x16\x03":
            log.info("TLS handshake on a plain port from {peer}", peer=self._peer)
            self._close()
            return
        self._buffer += data
        self._processBuffer()
        self._updateReading()

    # The transport calls these (we are its producer) when its send buffer
    # fills up or drains: a client that does not read our replies stops
    # getting its commands processed, instead of filling our memory.  Reading
    # stops only once unprocessed input piles up: a TLS layer pauses us
    # while its handshake is under way, and must still read to finish it.

    def pauseProducing(self) -> None:
        self._outputBlocked = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._outputBlocked = False
        self._updateReading()
        self._processBuffer()

    def stopProducing(self) -> None:
        self._outputBlocked = True

    def _updateReading(self) -> None:
        """
        Read from the transport only while neither a command is pending nor
        our replies are backed up.
        """
        backlog = len(self._buffer) - self._pos > INPUT_HIGH_WATER
        pause = (self._busy or (self._outputBlocked and backlog)) and (
            not self.transport.disconnecting
        )
        if pause and not self._readingPaused:
            self._readingPaused = True
            self.transport.pauseProducing()
        elif not pause and self._readingPaused:
            self._readingPaused = False
            self.transport.resumeProducing()

    def _processBuffer(self) -> None:
        """
        Run the complete lines in the buffer, one at a time, until one has
        to wait.  Lines are found by offset and the buffer is trimmed once at
        the end, so many short lines cost linear, not quadratic, time.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while (
                not self._busy
                and not self._outputBlocked
                and not self.transport.disconnecting
            ):
                if self._shuttingDown and self._mode != "data":
                    self.reply(replies.SHUTTING_DOWN)
                    self._close()
                    break
                if self._mode == "data":
                    if not self._dataStep():
                        break
                elif not self._commandStep():
                    break
        finally:
            self._processing = False
            if self._pos:
                self._buffer = self._buffer[self._pos :]
                self._slowUntil = max(0, self._slowUntil - self._pos)
                self._pos = 0

    def shutdown(self) -> None:
        """
        The relay is stopping: close with 421 4.3.2 once the session is
        between commands (a message under way is finished first).
        """
        self._shuttingDown = True
        if self._counted:
            self._processBuffer()

    def _commandStep(self) -> bool:
        """
        Take one command line (or AUTH response) from the buffer.

        @return: whether a line was consumed.
        """
        end = self._buffer.find(b"\n", self._pos)
        if end == -1:
            if len(self._buffer) - self._pos > AUTH_LINE_LIMIT:
                self._buffer = b""
                self._pos = 0
                if not self._discardingLine:
                    self._discardingLine = True
                    self._lineTooLong()
            return False
        line = self._buffer[self._pos : end]
        self._pos = end + 1
        self.resetTimeout()
        if self._discardingLine:
            self._discardingLine = False
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) + 2 > self._lineLimit(line):
            self._lineTooLong()
            return True
        if self._mode == "auth":
            self._authResponse(line)
        else:
            self._command(line)
        return True

    def _lineLimit(self, line: bytes) -> int:
        if self._mode == "auth":
            return AUTH_LINE_LIMIT
        verb = line[:5].upper()
        if verb.startswith(b"AUTH"):
            return AUTH_LINE_LIMIT
        if verb.startswith(b"MAIL"):
            return MAIL_LINE_LIMIT
        return COMMAND_LINE_LIMIT

    def _lineTooLong(self) -> None:
        if self._mode == "auth":
            self._endAuth()
        self._error(replies.LINE_TOO_LONG)

    def _command(self, line: bytes) -> None:
        parts = line.strip().split(None, 1)
        if not parts:
            self._error(replies.SYNTAX)
            return
        verb = parts[0].upper()
        rest = parts[1] if len(parts) == 2 else b""
        if verb in _HTTP_VERBS and self._heloName is None:
            log.info("HTTP request on SMTP port from {peer}", peer=self._peer)
            self._close()
            return
        method = self.lookupMethod(verb)
        if method is None:
            self._error(replies.UNKNOWN_COMMAND)
            return
        result = method(rest)
        if isinstance(result, Deferred):
            self._wait(result)

    def lookupMethod(self, command: bytes | str) -> Any:
        """
        The handler of C{command}, from a fixed table: never some other
        C{do_*} method Twisted's classes happen to define.
        """
        if isinstance(command, str):
            command = command.encode("ascii", "replace")
        name = _COMMANDS.get(command.upper())
        return getattr(self, name) if name else None

    def _wait(self, d: Deferred[Any]) -> None:
        """
        Hold further input until C{d} has fired (its callbacks reply).
        """
        self._busy = True
        self.setTimeout(None)
        self._updateReading()

        def done(result: object) -> None:
            self._busy = False
            if self.transport.disconnecting:
                return
            self.setTimeout(self._timeoutNow())
            self._updateReading()
            self._processBuffer()

        d.addErrback(self._unexpected)
        d.addBoth(done)

    def _unexpected(self, failure: Failure) -> None:
        log.failure("unexpected error for {peer}", failure, peer=self._peer)
        self.reply(replies.SPOOL_FAILED)

    # -- session commands ---------------------------------------------------

    def do_HELO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=False)

    def do_EHLO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=True)

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        if not rest.strip():
            self._error(replies.SYNTAX)
            return
        self._heloName = sanitiseHelo(rest)
        self._esmtp = esmtp
        self._resetTransaction()
        text = f"{self.settings.hostname} Hello {self._heloName} [{self._peer}]"
        if esmtp:
            text += "\n" + "\n".join(self._extensionLines())
        self.reply(Reply(250, None, text))

    def _authAvailable(self) -> bool:
        return bool(self.settings.mechanisms) and bool(self.factory.portal.checkers)

    def _offeredMechanisms(self) -> list[str]:
        """
        The configured mechanisms the relay implements and the checkers can
        serve now (see L{smtpauth_relay.auth.ChainChecker.mechanisms}).
        """
        implemented = [m for m in self.settings.mechanisms if m in MECHANISMS]
        chain = chainOf(self.factory.portal)
        if chain is None:
            # A portal not made by makePortal: assume its checkers take
            # passwords.
            return [m for m in implemented if m in ("PLAIN", "LOGIN")]
        return chain.mechanisms(implemented)

    def _extensionLines(self) -> list[str]:
        lines = [
            "PIPELINING",
            f"SIZE {self.settings.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.canStartTLS and not self._secure:
            lines.append("STARTTLS")
        if self._authAvailable() and (self._secure or not self._tlsNeededForAuth()):
            offered = self._offeredMechanisms()
            if offered:
                lines.append("AUTH " + " ".join(offered))
        return lines

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """
        What EHLO advertises, in Twisted's format (kept for API users).
        """
        result: dict[bytes, list[bytes] | None] = {}
        for line in self._extensionLines():
            name, _, arg = line.partition(" ")
            result[name.encode()] = arg.encode().split() if arg else None
        return result

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(replies.OK)

    def do_HELP(self, rest: bytes) -> None:
        self.reply(replies.HELP)

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(replies.VRFY)

    def do_EXPN(self, rest: bytes) -> None:
        self.reply(replies.EXPN)

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(replies.BYE)
        self._close()

    def do_RSET(self, rest: bytes) -> None:
        self._resetTransaction()
        self.reply(replies.OK)

    def _resetTransaction(self) -> None:
        self._mail = None
        self._recipients = []

    # -- STARTTLS -----------------------------------------------------------

    def ext_STARTTLS(self, rest: bytes) -> None:
        if rest.strip():
            self._error(replies.SYNTAX)
        elif self._secure:
            self._error(replies.TLS_ALREADY)
        elif not self.canStartTLS:
            self._error(replies.NOT_IMPLEMENTED)
        elif not self._esmtp:
            self._error(replies.EHLO_FIRST)
        else:
            self.reply(replies.START_TLS)
            # RFC 3207: anything the client sent after STARTTLS in the same
            # packet was sent in the clear, before the handshake: drop it,
            # and forget all the client told us.
            self._buffer = b""
            self._pos = 0
            self._heloName = None
            self._esmtp = False
            self._submitter = None
            self._resetTransaction()
            self.transport.startTLS(self.ctx)
            self._secure = True
            self._handshakePending = True
            self.startedTLS = True

    # -- AUTH -----------------------------------------------------------------

    def _tlsNeededForAuth(self) -> bool:
        """
        Whether AUTH waits for TLS: C{require_tls}, unless this client is in
        the listener's C{allow_plaintext_auth_from}.
        """
        return self.settings.requireTLS and not self._plaintextAuth

    def ext_AUTH(self, rest: bytes) -> Deferred[Submitter] | None:
        if not self._authAvailable():
            self._error(replies.AUTH_NOT_AVAILABLE)
            return None
        if self._tlsNeededForAuth() and not self._secure:
            self._error(replies.AUTH_NEEDS_TLS)
            return None
        if not self._esmtp:
            self._error(replies.EHLO_FIRST)
            return None
        if self._submitter is not None:
            self._error(replies.AUTH_ALREADY)
            return None
        if self._mail is not None:
            self._error(replies.AUTH_IN_TRANSACTION)
            return None
        parts = rest.split()
        if not parts or len(parts) > 2:
            self._error(replies.SYNTAX)
            return None
        name = parts[0].upper().decode("ascii", "replace")
        if name not in self._offeredMechanisms():
            self._error(replies.AUTH_UNKNOWN_MECHANISM)
            return None
        chain = chainOf(self.factory.portal)
        assert chain is not None  # only PLAIN and LOGIN are offered without
        mechanism = makeMechanism(
            name, chain, self.settings.hostname, self.clock.seconds()
        )
        self._mechanism = mechanism
        if len(parts) == 2:
            if name not in CLIENT_FIRST:
                self._endAuth()
                self._error(replies.AUTH_BAD_BASE64)
                return None
            initial = b"" if parts[1] == b"=" else parts[1]
            return self._authStep(initial, encoded=parts[1] != b"=")
        self._mode = "auth"
        self.reply(Reply(334, None, base64.b64encode(mechanism.challenge()).decode()))
        return None

    def _authResponse(self, line: bytes) -> None:
        if line.strip() == b"*":
            self._endAuth()
            self._error(replies.AUTH_ABORTED)
            return
        submitter = self._authenticated
        if submitter is not None:
            # The answer to the final challenge (SCRAM's v=): must be empty.
            self._endAuth()
            if line.strip():
                self._error(replies.AUTH_BAD_BASE64)
            else:
                self._authComplete(submitter)
            return
        result = self._authStep(line.strip(), encoded=True)
        if result is not None:
            self._wait(result)

    def _endAuth(self) -> None:
        self._mode = "command"
        self._mechanism = None
        self._authenticated = None

    def _authStep(self, data: bytes, encoded: bool) -> Deferred[Any] | None:
        """
        Feed a response to the mechanism under way.

        @return: a L{Deferred} while the answer (a SCRAM lookup, the
            checkers) is awaited; input waits meanwhile.
        """
        assert self._mechanism is not None
        mechanism = self._mechanism
        if encoded:
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                self._endAuth()
                self._error(replies.AUTH_BAD_BASE64)
                return None
        try:
            step = mechanism.respond(data)
        except (MechanismError, AuthorizationRefused) as e:
            return self._mechanismRefused(mechanism, e)
        if isinstance(step, Deferred):
            # Between the client's messages something must be looked up:
            # wait for it without holding the reactor.  Meanwhile the
            # session may end, or time out as a whole.
            self._mode = "auth"
            return step.addCallbacks(
                self._authStepped,
                self._authStepFailed,
                callbackArgs=(mechanism,),
                errbackArgs=(mechanism,),
            )
        return self._authStepped(step, mechanism)

    def _mechanismRefused(
        self, mechanism: Mechanism, error: Exception
    ) -> Deferred[None] | None:
        """
        The client's response is malformed (501), or asks to act as someone
        else (a failed login).
        """
        self._endAuth()
        if isinstance(error, AuthorizationRefused):
            return self._authFailed(
                mechanism.name, "authorization identity refused", error.username
            )
        if isinstance(error, ChannelBindingNotSupported):
            self._error(_CHANNEL_BINDING_REFUSED)
        else:
            self._error(replies.AUTH_BAD_BASE64)
        return None

    def _authStepFailed(
        self, failure: Failure, mechanism: Mechanism
    ) -> Deferred[None] | None:
        """
        A step that had to look something up failed: the checkers could
        not answer (454), or the response was refused after all.
        """
        if self._lost or self._mechanism is not mechanism:
            return None
        error = failure.check(MechanismError, AuthorizationRefused)
        if error is not None:
            return self._mechanismRefused(mechanism, cast(Exception, failure.value))
        self._endAuth()
        return self._authError(
            failure, mechanism.name, getattr(mechanism, "username", "")
        )

    def _authStepped(self, step: Step, mechanism: Mechanism) -> Deferred[Any] | None:
        """
        The mechanism answered: send its challenge, or check the
        credentials it produced.
        """
        if self._lost or self._mechanism is not mechanism:
            # The session ended (or the exchange was abandoned) meanwhile.
            return None
        if isinstance(step, bytes):
            self._mode = "auth"
            self.reply(Reply(334, None, base64.b64encode(step).decode()))
            return None
        self._endAuth()
        username = cast(bytes, getattr(step, "username", b"")).decode(
            "utf-8", "replace"
        )
        lockout = self.factory.lockout
        lock = lockout.check(self._peer, username) if lockout is not None else None
        if isinstance(lock, Deferred):
            # A worker process asks the main process's lockout.
            return lock.addCallbacks(
                self._lockChecked,
                self._lockUnknown,
                callbackArgs=(step, mechanism, username),
                errbackArgs=(mechanism, username),
            )
        return self._lockChecked(lock, step, mechanism, username)

    def _lockUnknown(
        self, failure: Failure, mechanism: Mechanism, username: str
    ) -> Deferred[None] | None:
        """
        The main process did not say whether the login is locked (its
        channel failed): a temporary failure, the password unchecked.
        """
        if self._lost:
            return None
        return self._authError(failure, mechanism.name, username)

    def _lockChecked(
        self, lock: Lock | None, step: Any, mechanism: Mechanism, username: str
    ) -> Deferred[Any] | None:
        """
        Refuse a locked login, else check the credentials C{step} produced.
        """
        if self._lost:
            return None
        if lock is not None:
            # Refused without looking at the password: a guess that happens
            # to be right must not tell the attacker so.
            log.info(
                "AUTH {mechanism} for {user} from {peer} refused: {key} locked",
                mechanism=mechanism.name,
                user=logSafe(username),
                peer=self._peer,
                key=lock.key,
                result="locked",
            )
            self.factory.metrics.authAttempt(mechanism.name, "locked")
            self._error(replies.AUTH_LOCKED)
            return None
        context = LoginContext(mechanism.name, self._secure)
        d = login(self.factory.portal, step, context)
        d.addCallbacks(
            self._authSucceeded,
            self._authError,
            callbackArgs=(mechanism,),
            errbackArgs=(mechanism.name, username),
        )
        return d

    def _authSucceeded(
        self, submitter: Submitter, mechanism: Mechanism | None = None
    ) -> Deferred[None] | None:
        networks = self.factory.userNetworks
        if networks is not None and not networks.mayLogIn(
            submitter.username, self._peer
        ):
            return self._authFailed(
                submitter.mechanism, "not allowed from this network", submitter.username
            )
        final = mechanism.finalChallenge() if mechanism is not None else None
        if final is not None:
            if self._lost:
                return None
            # SCRAM: the server proves itself (v=) before 235; the client
            # answers with an empty line.
            self._mechanism = mechanism
            self._authenticated = submitter
            self._mode = "auth"
            self.reply(Reply(334, None, base64.b64encode(final).decode()))
            return None
        self._authComplete(submitter)
        return None

    def _authComplete(self, submitter: Submitter) -> None:
        """
        The session is logged in as C{submitter}: 235.
        """
        self._submitter = submitter
        if not self._secure:
            self._legacy.append("AUTH without TLS")
        self.factory.metrics.authAttempt(submitter.mechanism, "success")
        if self.factory.lockout is not None:
            self.factory.lockout.succeeded(self._peer, submitter.username)
        log.info(
            "AUTH {mechanism} ok for {user} from {peer}",
            mechanism=submitter.mechanism,
            user=logSafe(submitter.username),
            peer=self._peer,
            result="success",
        )
        self.reply(replies.AUTH_OK)

    def _authError(
        self, failure: Failure, mechanism: str, username: str
    ) -> Deferred[None] | None:
        if failure.check(CheckerUnavailable, UnhandledCredentials):
            log.warn(
                "AUTH {mechanism} for {user} from {peer}: checker unavailable",
                mechanism=mechanism,
                user=logSafe(username),
                peer=self._peer,
                result="unavailable",
            )
            self.factory.metrics.authAttempt(mechanism, "unavailable")
            self.reply(replies.AUTH_UNAVAILABLE)
        elif failure.check(UnauthorizedLogin):
            return self._authFailed(mechanism, "bad credentials", username)
        else:
            log.failure("AUTH failed unexpectedly", failure)
            self.factory.metrics.authAttempt(mechanism, "unavailable")
            self.reply(replies.AUTH_UNAVAILABLE)
        return None

    def _authFailed(
        self, mechanism: str, why: str, username: str | None
    ) -> Deferred[None] | None:
        """
        Count a failed login and answer 535, after the lockout's tarpit
        delay (the session waits; others go on); too many in one session
        close it.

        @return: a L{Deferred} when the answer is delayed.
        """
        log.info(
            "AUTH {mechanism} failed for {user} from {peer}: {why}",
            mechanism=mechanism,
            user=logSafe(username or ""),
            peer=self._peer,
            why=why,
            result="failure",
        )
        self._authFailures += 1
        self.factory.metrics.authAttempt(mechanism, "failure")
        lockout = self.factory.lockout
        delay = lockout.failed(self._peer, username) if lockout is not None else 0.0

        def answer(ignored: object = None) -> None:
            if self._lost:
                return
            if self.transport.disconnecting:
                return
            self._error(replies.AUTH_FAILED)
            limit = self.settings.sessionMaxAuthFailures
            if self._authFailures >= limit and not self.transport.disconnecting:
                log.info("too many failed logins from {peer}", peer=self._peer)
                self.reply(replies.TOO_MANY_AUTH_FAILURES)
                self._close()

        def tarpit(delay: float) -> Deferred[None] | None:
            if delay <= 0:
                answer()
                return None
            d: Deferred[None] = Deferred()
            self.clock.callLater(delay, d.callback, None)
            return d.addCallback(answer)

        def uncounted(failure: Failure) -> Deferred[None] | None:
            log.failure(
                "a failed login from {peer} was not counted", failure, peer=self._peer
            )
            return tarpit(0.0)

        if isinstance(delay, Deferred):
            # A worker process: the main process counts the failure.
            return delay.addCallbacks(tarpit, uncounted)
        return tarpit(delay)

    # -- mail transaction -------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        if self._heloName is None:
            self._error(replies.HELO_FIRST)
            return
        if self._mail is not None:
            self._error(replies.NESTED_MAIL)
            return
        try:
            mail = parseMailFrom(rest)
        except PathSyntaxError as e:
            self._error(
                replies.BAD_SENDER_SYNTAX.withText(f"Bad sender address syntax: {e}")
            )
            return
        except ParameterError as e:
            self._error(self._parameterReply(e))
            return
        if mail.size is not None and mail.size > self.settings.maxMessageSize:
            self._reject(replies.TOO_BIG, countError=False)
            return
        user = self._submitter.username if self._submitter else None
        if not self.factory.policy.mayRelay(self._peer, user):
            self._reject(replies.AUTH_REQUIRED)
            return
        limits = self.factory.limits
        allowed: bool | Deferred[bool] = True
        if user is not None and limits is not None:
            perSession = limits.settings.messages_per_session
            if perSession and self._accepted >= perSession:
                self._reject(replies.TOO_MANY_MESSAGES_IN_SESSION, countError=False)
                self._close()
                return
            allowed = limits.messageAllowed(user)
        if isinstance(allowed, Deferred):
            # A worker process asks the main process's rate limits.
            self._wait(allowed.addCallback(self._mailChecked, mail, user))
            return
        waiting = self._mailChecked(allowed, mail, user)
        if waiting is not None:
            self._wait(waiting)

    def _mailChecked(
        self, allowed: bool, mail: Any, user: str | None
    ) -> Deferred[None] | None:
        """
        The rest of C{MAIL FROM} once the rate limit answered C{allowed}.

        @return: a L{Deferred} if the reply waits for in-flow control.
        """
        if self._lost:
            return None
        if not allowed:
            self._reject(replies.MESSAGE_RATE)
            return None
        senders = self.factory.senders
        if senders is not None and user is not None:
            refusal = senders.mayUse(user, mail.sender)
            if refusal is not None:
                log.info(
                    "{user} from {peer} may not send as <{sender}>: {reason}",
                    user=logSafe(user),
                    peer=self._peer,
                    sender=mail.sender,
                    reason=str(refusal),
                )
                if refusal.temporary:
                    self._reject(replies.SPOOL_FAILED)
                else:
                    self._reject(replies.SENDER_NOT_ALLOWED.withText(str(refusal)))
                return None
        self._mail = mail
        self._recipients = []
        flow = self.factory.flow
        admitted = flow.admit() if flow is not None else None
        if admitted is None or admitted.called:
            self.reply(replies.SENDER_OK)
            return None
        # Deliveries lag behind: hold this transaction (and anything the
        # client pipelined after it) for a moment.
        return admitted.addCallback(lambda _: self.reply(replies.SENDER_OK))

    def _parameterReply(self, e: ParameterError) -> Reply:
        base = replies.UNKNOWN_PARAMETER if e.unknown else replies.SYNTAX
        return base.withText(str(e))

    def do_RCPT(self, rest: bytes) -> None:
        if self._mail is None:
            self._error(replies.NEED_MAIL)
            return
        try:
            recipient = parseRcptTo(rest)
        except PathSyntaxError as e:
            self._error(
                replies.BAD_RECIPIENT_SYNTAX.withText(
                    f"Bad recipient address syntax: {e}"
                )
            )
            return
        except ParameterError as e:
            self._error(self._parameterReply(e))
            return
        user = self._submitter.username if self._submitter else None
        if not self.factory.policy.mayRelay(self._peer, user):
            self._reject(Reply(554, "5.7.1", "Relay access denied"))
            return
        if len(self._recipients) >= self.settings.maxRecipients:
            self._reject(replies.TOO_MANY_RECIPIENTS, countError=False)
            return
        limits = self.factory.limits
        allowed: bool | Deferred[bool] = True
        if user is not None and limits is not None:
            allowed = limits.recipientAllowed(user, len(self._recipients))
        if isinstance(allowed, Deferred):
            # A worker process asks the main process's rate limits.
            self._wait(allowed.addCallback(self._recipientChecked, recipient))
            return
        self._recipientChecked(allowed, recipient)

    def _recipientChecked(self, allowed: bool, recipient: Any) -> None:
        if self._lost:
            return
        if not allowed:
            self._reject(replies.RECIPIENT_RATE, countError=False)
            return
        self._recipients.append(recipient)
        self.reply(replies.RECIPIENT_OK)

    def do_DATA(self, rest: bytes) -> None:
        if rest.strip():
            self._error(replies.SYNTAX)
            return
        if self._mail is None:
            self._error(replies.BAD_SEQUENCE.withText("Need MAIL command"))
            return
        if not self._recipients:
            self._error(replies.NO_VALID_RECIPIENTS)
            return
        writer = self.factory.spool.newMessage()
        header = receivedHeader(
            helo=self._heloName or "unknown",
            peerHost=self._peer,
            reverseName=self._reverseName,
            byHost=self.settings.hostname,
            esmtp=self._esmtp,
            tls=self._tlsInfo(),
            authenticated=self._submitter is not None,
            queueId=writer.queueId,
            recipients=tuple(self._recipients),
            when=self.clock.seconds(),
            legacy=tuple(self._legacy + (["bare LF accepted"] if self._bareLF else [])),
        )
        self._intake = MessageIntake(
            writer,
            header,
            maxSize=self.settings.maxMessageSize,
            maxLineLength=self.settings.maxLineLength,
        )
        self._mode = "data"
        self.setTimeout(self.settings.dataTimeout)
        self.reply(replies.START_DATA)

    def _tlsInfo(self) -> TLSInfo | None:
        """
        The session's TLS version and cipher, read once: they do not change
        after the handshake.
        """
        if not self._secure:
            return None
        if self._tlsInfoCache is None:
            self._tlsInfoCache = tlsInfo(self.transport) or TLSInfo("TLS", "unknown")
        return self._tlsInfoCache

    def _dataStep(self) -> bool:
        """
        Take one line of DATA from the buffer; only CRLF ends a line.

        @return: whether a line was consumed.
        """
        intake = self._intake
        assert intake is not None
        if not self._bareLF and not self._inLongDataLine and self._dataChunk(intake):
            return True
        # Only CRLF ends a line (a bare LF is refused by the intake: SMTP
        # smuggling), except for the legacy lane's devices, whose bare LF
        # is a line end like CRLF.
        end = self._buffer.find(b"\n" if self._bareLF else b"\r\n", self._pos)
        if end == -1:
            if len(self._buffer) - self._pos > self.settings.maxLineLength:
                # Keep the last octet: it may be the CR of the CRLF that
                # ends this overlong line.
                self._buffer = self._buffer[-1:]
                self._pos = 0
                self._inLongDataLine = True
                intake.overlongLine()
            return False
        if self._bareLF:
            line = self._buffer[self._pos : end]
            self._pos = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
        else:
            line = self._buffer[self._pos : end]
            self._pos = end + 2
        self.resetTimeout()
        if self._inLongDataLine:
            self._inLongDataLine = False
            return True
        if line == b".":
            self._endData(intake)
        else:
            intake.lineReceived(line)
        return True

    def _dataChunk(self, intake: MessageIntake) -> bool:
        """
        The body's fast path: hand every complete line in the buffer before
        the end-of-data line to the intake at once.

        @return: whether lines were consumed; if not, the caller takes one
            line the careful way.
        """
        buffer, pos = self._buffer, self._pos
        if (
            not intake.acceptsChunks
            or pos < self._slowUntil
            or buffer.startswith(b".\r\n", pos)
        ):
            return False
        marker = buffer.find(b"\r\n.\r\n", pos)
        if marker != -1:
            cut = marker + 2
        else:
            last = buffer.rfind(b"\r\n", pos)
            if last == -1:
                return False
            cut = last + 2
        if not intake.bodyChunk(buffer[pos:cut]):
            # Something in there needs the careful path: take these lines one
            # by one (the buffer is kept from pos, so offsets stay valid).
            self._slowUntil = cut
            return False
        self._pos = cut
        self.resetTimeout()
        return True

    def _endData(self, intake: MessageIntake) -> None:
        self._mode = "command"
        self.setTimeout(self.settings.idleTimeout)
        self._intake = None
        mail = self._mail
        assert mail is not None
        recipients = tuple(self._recipients)
        self._resetTransaction()
        user = self._submitter.username if self._submitter else None
        envelope = Envelope(
            queueId=intake.queueId,
            sender=mail.sender,
            recipients=recipients,
            auth=self.factory.policy.envelopeAuth(self._peer, user, mail.auth),
            authUser=user,
            clientAddress=self._peer,
            helo=self._heloName or "",
            receivedAt=self.clock.seconds(),
            size=intake.size,
            body="8BITMIME" if intake.eightBit or mail.body == "8BITMIME" else "7BIT",
        )
        if self.factory.checkHeaderFrom and self.factory.senders is not None and user:
            self._checkHeaderFrom(intake, user)
        result = intake.finish(envelope)
        if isinstance(result, Reply):
            log.info(
                "message from {peer} refused: {code} {enhanced} {text}",
                peer=self._peer,
                code=result.code,
                enhanced=result.enhanced,
                text=result.text,
            )
            self._reject(result)
            return
        result.addCallbacks(self._queued, self._spoolFailed, callbackArgs=(envelope,))
        self._wait(result)

    def _checkHeaderFrom(self, intake: MessageIntake, user: str) -> None:
        """
        The message's From: must be one address the user may send as.
        """
        assert self.factory.senders is not None
        fields = intake.fromFields
        if len(fields) != 1:
            intake.refuse(
                replies.HEADER_FROM_NOT_ALLOWED.withText(
                    f"The message must have exactly one From: header, not {len(fields)}"
                )
            )
            return
        try:
            addresses = headerFromAddresses(fields[0])
        except ValueError as e:
            intake.refuse(replies.HEADER_FROM_NOT_ALLOWED.withText(str(e)))
            return
        for address in addresses:
            refusal = self.factory.senders.mayUse(user, address)
            if refusal is not None:
                reply = (
                    replies.SPOOL_FAILED
                    if refusal.temporary
                    else replies.HEADER_FROM_NOT_ALLOWED.withText(f"From: {refusal}")
                )
                intake.refuse(reply)
                return

    def _queued(self, queueId: str, envelope: Envelope) -> None:
        self._accepted += 1
        self.factory.metrics.messageAccepted(envelope.size)
        if self.factory.limits is not None and envelope.authUser is not None:
            self.factory.limits.messageQueued(
                envelope.authUser, len(envelope.recipients)
            )
        log.info(
            "accepted {queueId} from {peer}: size={size} sender=<{sender}> "
            "recipients={recipientCount} user={user}",
            queueId=queueId,
            peer=self._peer,
            size=envelope.size,
            sender=envelope.sender,
            recipientCount=len(envelope.recipients),
            user=envelope.authUser,
        )
        self.reply(replies.QUEUED, queueId=queueId)

    def _spoolFailed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, SpoolError) and error.insufficientStorage:
            log.error("spool full: {error}", error=failure.getErrorMessage())
            self._reject(replies.SPOOL_FULL, countError=False)
        else:
            log.failure("could not spool message from {peer}", failure, peer=self._peer)
            self._reject(replies.SPOOL_FAILED, countError=False)


class RelayServerFactory(protocol.ServerFactory):
    """
    Builds L{RelayESMTP} sessions for one listener.
    """

    protocol = RelayESMTP

    def __init__(
        self,
        settings: SessionSettings,
        portal: Portal,
        spool: ISpool,
        policy: RelayPolicy,
        limiter: ConnectionLimiter,
        clock: Any,
        contextFactory: Any = None,
        resolver: Any = None,
        lockout: ILoginGuard | None = None,
        senders: SenderLoginMap | None = None,
        checkHeaderFrom: bool = False,
        limits: ISessionLimits | None = None,
        userNetworks: UserNetworks | None = None,
        metrics: ISessionMetrics | None = None,
        listener: str = "",
        flow: IFlowControl | None = None,
        admission: IAdmission | None = None,
    ) -> None:
        """
        @param resolver: an L{twisted.internet.interfaces.IResolver} for
            forward-confirmed reverse DNS of clients, or C{None} for none.
        @param flow: in-flow control: C{MAIL FROM} waits while deliveries
            lag behind (L{smtpauth_relay.flow}), or C{None}.
        @param admission: in a worker process, the main process's count of
            connections (C{max_connections}, C{max_connections_per_ip} and
            the connection rate are then its business, and C{limiter} only
            tracks this process's sessions for shutdown).
        """
        if settings.tlsMode not in TLS_MODES:
            raise ValueError(f"bad TLS mode {settings.tlsMode!r}")
        self.settings = settings
        self.portal = portal
        self.spool = spool
        self.policy = policy
        self.limiter = limiter
        self.clock = clock
        self.contextFactory = contextFactory
        self.resolver = resolver
        self.lockout = lockout
        self.senders = senders
        self.checkHeaderFrom = checkHeaderFrom
        self.limits = limits
        self.userNetworks = userNetworks
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.listener = listener
        self.flow = flow
        self.admission = admission

    def buildProtocol(self, addr: Any) -> RelayESMTP:
        p = RelayESMTP(self)
        return p
