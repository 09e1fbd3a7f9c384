"""
The outbound ESMTP client: Twisted's L{smtp.ESMTPClient}, taught to carry
several queued messages over one connection and to report per recipient.

What it adds to (or mends in) twisted.mail's client:

  - messages come from an L{OutboundQueue} shared by the connections to one
    destination; after each message the client takes the next (with RSET
    first when the transaction did not end with the reply to the data), and
    only QUITs when the queue stays empty (a burst does not open a
    connection per message);
  - with a server that offers PIPELINING (RFC 2920), MAIL, the RCPTs and
    DATA go out in one write and their replies are read in order; a small
    message goes out with its final dot in one write: two round trips per
    message instead of five or more;
  - each message's outcome is a L{DeliveryReport}: 2xx, 4xx and 5xx per
    recipient (RCPT replies, then the reply to the data), so only the 4xx
    ones are retried;
  - C{MAIL FROM} carries C{SIZE=}, C{BODY=8BITMIME} and C{AUTH=} (RFC 4954
    section 5: the submitter, or C{<>}) when the server offers them;
  - dot-stuffing survives chunk boundaries: Twisted's C{transformChunk}
    stuffs only dots that follow a line ending inside the same chunk, so a
    line starting with "." right at a chunk boundary went out unstuffed (and
    a lone "." line there would end the message early);
  - connection-level failures (refused, TLS, AUTH, timeouts, a dropped
    connection) fail only the message being sent; the queue decides what
    happens to the others;
  - the login may be a password (AUTH PLAIN or LOGIN) or an OAuth2 access
    token (XOAUTH2 or OAUTHBEARER, see L{smtpauth_relay.oauth2}), either
    only over TLS; Twisted's line log, which would keep the AUTH line and
    which its exceptions print, is off;
  - the sender may be rewritten for an upstream that takes only its own
    mailbox (L{smtpauth_relay.rewrite}): C{MAIL FROM}, and C{From:} in the
    header as it is sent (the spooled file is not changed).

Twisted's own sender factories retry on their own and can leave their
Deferred unfired over endpoints; this client never retries: the relay's
queue runner does.
"""

from __future__ import annotations

import base64
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail._cred import LOGINAuthenticator
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from smtpauth_relay.addresses import xtextEncode
from smtpauth_relay.envelope import NULL_AUTH, DeliveryReport, Envelope
from smtpauth_relay.oauth2 import (
    describeSASLError,
    oauthbearerResponse,
    xoauth2Response,
)
from smtpauth_relay.rewrite import SenderRewrite, openRewritten
from smtpauth_relay.tcp import noDelay

log = Logger()

RESPONSE_TIMEOUT = 300
"""Seconds to wait for any one reply (RFC 5321 4.5.3.2: 5 minutes)."""
DATA_TERMINATION_TIMEOUT = 600
"""Seconds to wait for the reply to the final dot (RFC 5321 4.5.3.2.6)."""
SMALL_MESSAGE = 256 * 1024
"""Messages up to this size are read and written in one piece."""


class _ChunkSender(FileSender):
    """
    Twisted's file sender with larger chunks: a 5 MB message in 20 reads
    and writes, not 320 (each one a turn of the reactor).
    """

    CHUNK_SIZE = 256 * 1024


class UpstreamError(Exception):
    """
    The upstream could not take the message, for a reason that is not a
    reply to one of its recipients (refused connection, TLS or AUTH failure,
    dropped connection, timeout).  Always temporary: retried later.

    @ivar host: the upstream it happened with (for the attempt record).
    """

    def __init__(self, reason: str, host: str = "") -> None:
        super().__init__(reason)
        self.host = host


@dataclass
class Outbound:
    """
    One message waiting to be sent, and the L{Deferred} its outcome fires.

    @ivar forwardIdentity: whether C{AUTH=} names the submitter.
    @ivar deadline: seconds the transfer may take once a connection takes
        it (0: no limit but the reply timeouts).
    @ivar rewrite: how the sender is rewritten on the way out, or C{None}.
    """

    envelope: Envelope
    messagePath: str
    forwardIdentity: bool = False
    deadline: float = 0.0
    rewrite: SenderRewrite | None = None
    result: Deferred[DeliveryReport] = field(default_factory=Deferred)

    @property
    def done(self) -> bool:
        return self.result.called


@dataclass(frozen=True)
class ClientSettings:
    """
    How to talk to one destination.

    @ivar heloName: our name in EHLO.
    @ivar host: the upstream's name, for reports and logs.
    @ivar username: login at the upstream, or C{""}.
    @ivar password: its password.
    @ivar startTLS: context factory for STARTTLS, or C{None} for none.
    @ivar requireTLS: refuse to go on without TLS (STARTTLS required).
    @ivar mechanism: C{"XOAUTH2"} or C{"OAUTHBEARER"} to log in with an
        OAuth2 access token instead of a password, or C{""}.
    @ivar token: the access token (set per connection, see
        L{RelayClientFactory.withToken}).
    @ivar port: the upstream's port, named in OAUTHBEARER.
    """

    heloName: str
    host: str
    username: str = ""
    password: bytes = field(default=b"", repr=False)
    startTLS: Any = None
    requireTLS: bool = False
    mechanism: str = ""
    token: str = field(default="", repr=False)
    port: int = 0


def mailFromParameters(
    outbound: Outbound, extensions: dict[bytes, bytes | None], size: int
) -> bytes:
    """
    The ESMTP parameters for C{MAIL FROM}, as far as the server offers them.
    """
    params = []
    if b"SIZE" in extensions:
        params.append(b"SIZE=%d" % size)
    if outbound.envelope.body == "8BITMIME" and b"8BITMIME" in extensions:
        params.append(b"BODY=8BITMIME")
    if b"AUTH" in extensions:
        identity = outbound.envelope.auth
        if outbound.forwardIdentity and identity and identity != NULL_AUTH:
            params.append(b"AUTH=" + xtextEncode(identity).encode("ascii"))
        else:
            params.append(b"AUTH=<>")
    return b"".join(b" " + p for p in params)


def _replyText(code: int, resp: bytes | str) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    text = " ".join(resp.split())
    return f"{code} {text}" if code >= 0 else text


def reportFor(
    envelope: Envelope,
    host: str,
    code: int,
    resp: bytes | str,
    rcptResults: list[tuple[Any, int, bytes]],
) -> DeliveryReport:
    """
    Turn the outcome of one transaction into per-recipient results.

    @param code: the reply to the data (if any recipient was accepted),
        else the reply that ended the transaction (C{MAIL FROM}'s, or the
        last RCPT's).
    @param rcptResults: C{(address, code, reply)} per RCPT sent.
    """
    delivered: list[str] = []
    deferred: dict[str, str] = {}
    failed: dict[str, str] = {}

    def record(recipient: str, rcode: int, text: str) -> None:
        if 200 <= rcode < 300:
            delivered.append(recipient)
        elif 500 <= rcode < 600:
            failed[recipient] = text
        else:
            deferred[recipient] = text

    answered = {str(address): (c, r) for address, c, r in rcptResults}
    for recipient in envelope.recipients:
        if recipient not in answered:
            # MAIL FROM failed: its reply is every recipient's.
            record(recipient, code, _replyText(code, resp))
            continue
        rcode, rresp = answered[recipient]
        if 200 <= rcode < 300:
            # Accepted at RCPT; the reply to the data decides.
            record(recipient, code, _replyText(code, resp))
        else:
            record(recipient, rcode, _replyText(rcode, rresp))
    return DeliveryReport(
        delivered=tuple(delivered), deferred=deferred, failed=failed, host=host
    )


class OutboundQueue(ABC):
    """
    Messages waiting for a connection to one destination (the connection
    pool is the one implementation).
    """

    @abstractmethod
    def take(self, client: RelayClient) -> Outbound | None:
        """
        The next message for C{client}, or C{None} if there is none now.
        """

    @abstractmethod
    def idle(self, client: RelayClient) -> bool:
        """
        C{client} has nothing to send; return C{True} if it should wait for
        a message (the queue then hands one to L{RelayClient.offer}), or
        C{False} to let it QUIT.
        """

    @abstractmethod
    def clientGone(self, client: RelayClient, reason: Failure) -> None:
        """
        C{client}'s connection has ended.
        """

    @abstractmethod
    def credentialsRefused(self, client: RelayClient, reply: str) -> None:
        """
        The destination refused our credentials.
        """

    @abstractmethod
    def authenticated(self, client: RelayClient) -> None:
        """
        The destination accepted our credentials.
        """


class RelayClient(smtp.ESMTPClient):
    """
    An ESMTP client sending messages from an L{OutboundQueue}; see the
    module docstring.
    """

    transport: Any
    heloFallback = True
    # Twisted's line log would keep the AUTH line (password or token), and
    # str() of its exceptions prints that log.
    debug = False
    # ESMTPClient.__setattr__ is there only to map the long-deprecated
    # tlsMode (nothing here sets it) to _tlsMode; it made every attribute
    # set a Python call, 0.7 % of the main process's time under load.
    __setattr__ = object.__setattr__

    def __init__(
        self, settings: ClientSettings, queue: OutboundQueue, clock: Any = None
    ) -> None:
        smtp.ESMTPClient.__init__(
            self,
            secret=settings.password or None,
            contextFactory=settings.startTLS,
            identity=settings.heloName.encode("idna"),
        )
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.timeout = RESPONSE_TIMEOUT  # type: ignore[assignment]
        self.requireAuthentication = bool(settings.username or settings.mechanism)
        self.requireTransportSecurity = (
            settings.requireTLS or self.requireAuthentication
        )
        if settings.username and not settings.mechanism:
            user = settings.username.encode("utf-8")
            self.registerAuthenticator(smtp.PLAINAuthenticator(user))
            self.registerAuthenticator(LOGINAuthenticator(user))
        self.current: Outbound | None = None
        self.lastError: Failure | None = None
        self.extensions: dict[bytes, bytes | None] = {}
        self.sent = 0
        self._file: IO[bytes] | None = None
        self._header: Any = None
        self._atLineStart = True
        self._waiting = False
        self._dataSent = False
        self._deadlineCall: Any = None
        self._size = 0
        # Replies still due for a pipelined MAIL, RCPTs and DATA: "MAIL",
        # then one recipient per RCPT, then "DATA".
        self._pipeline: list[str] = []
        self._mailRefused: tuple[int, bytes] | None = None
        # Twisted's client reads these before it first sets them when the
        # first MAIL FROM is refused.
        self.successAddresses: list[str] = []
        self.toAddressesResult: list[tuple[Any, int, bytes]] = []

    # -- capabilities -------------------------------------------------------

    def connectionMade(self) -> None:
        noDelay(self.transport)
        super().connectionMade()

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        self.extensions = {}
        for line in resp.splitlines()[1:]:
            parts = line.split(None, 1)
            if parts:
                self.extensions[parts[0].upper()] = parts[1] if len(parts) > 1 else None
        smtp.ESMTPClient.esmtpState_serverConfig(self, code, resp)

    # -- taking messages ----------------------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """
        Start the next transaction, wait for one, or QUIT.
        """
        self._failresponse = self.smtpTransferFailed
        outbound = self.queue.take(self)
        while outbound is not None and outbound.done:
            outbound = self.queue.take(self)
        if outbound is None:
            if self.queue.idle(self):
                self._waiting = True
                return
            self._from = None
            self._disconnectFromServer()
            return
        self._start(outbound)

    def offer(self, outbound: Outbound) -> None:
        """
        The queue hands a message to this client while it waits.
        """
        assert self._waiting
        self._waiting = False
        self._start(outbound)

    def quitIfIdle(self) -> None:
        """
        The queue has nothing more for this waiting client.
        """
        if self._waiting:
            self._waiting = False
            self._from = None
            self._disconnectFromServer()

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        """
        EHLO was refused: try HELO once.  (Twisted's client would answer a
        refused HELO with HELO again, for ever.)
        """
        smtp.ESMTPClient.smtpState_helo(self, code, resp)
        self._failresponse = self.smtpConnectionFailed

    def authenticate(
        self, code: int, resp: bytes, items: dict[bytes, bytes | None]
    ) -> None:
        """
        Log in with the OAuth2 token (XOAUTH2 or OAUTHBEARER, with an
        initial response), or as Twisted does with a password.
        """
        mechanism = self.settings.mechanism.encode("ascii")
        if not mechanism:
            smtp.ESMTPClient.authenticate(self, code, resp, items)
            return
        if not self._tlsMode:
            # Twisted's tryTLS already insists; a token never goes in clear.
            self.esmtpTLSRequired()
            return
        offered = (items.get(b"AUTH") or b"").upper().split()
        if mechanism not in offered:
            self.esmtpAUTHRequired()
            return
        settings = self.settings
        if mechanism == b"XOAUTH2":
            response = xoauth2Response(settings.username, settings.token)
        else:
            response = oauthbearerResponse(
                settings.username, settings.token, settings.host, settings.port
            )
        self._expected = [235]
        self._okresponse = self._tokenAccepted
        self._failresponse = self._tokenRefused
        self.sendLine(b"AUTH " + mechanism + b" " + base64.b64encode(response))

    def _tokenAccepted(self, code: int, resp: bytes) -> None:
        self.queue.authenticated(self)
        self.smtpState_from(code, resp)

    def _tokenRefused(self, code: int, resp: bytes) -> None:
        """
        The token was refused.  An error challenge (334 with base64 JSON)
        is answered as the mechanism asks (RFC 7628 section 3.2.3: a lone
        C{%x01} for OAUTHBEARER; an empty line for XOAUTH2), and the failure
        reply that follows ends the login.
        """
        if code == 334:
            log.warn(
                "{host} refused our OAuth2 token with {error}",
                host=self.settings.host,
                error=describeSASLError(resp),
            )
            finish = b"\x01" if self.settings.mechanism == "OAUTHBEARER" else b""
            self._expected = [235]
            self._okresponse = self._tokenAccepted
            self._failresponse = self.esmtpAUTHDeclined
            self.sendLine(base64.b64encode(finish))
            return
        self.esmtpAUTHDeclined(code, resp)

    def _esmtpState_plainAuth(self, code: int, resp: bytes) -> None:
        """
        AUTH PLAIN was refused.  Twisted's client then tries a second form
        of the same credentials; a refusal is final here: two failed logins
        per connection bring a provider's account lockout twice as fast.
        """
        self.esmtpAUTHDeclined(code, resp)

    def esmtpAUTHDeclined(self, code: int = -1, resp: bytes | None = None) -> None:
        self.queue.credentialsRefused(self, _replyText(code, resp or b""))
        smtp.ESMTPClient.esmtpAUTHDeclined(self, code, resp)

    def smtpState_maybeAuthenticated(self, code: int, resp: bytes) -> None:
        if code == 235:
            self.queue.authenticated(self)
        smtp.ESMTPClient.smtpState_maybeAuthenticated(self, code, resp)

    def _start(self, outbound: Outbound) -> None:
        self.current = outbound
        self._dataSent = False
        self._header = None
        envelope = outbound.envelope
        rewrite = outbound.rewrite if envelope.sender else None
        self._from = rewrite.address if rewrite is not None else envelope.sender
        if outbound.deadline:
            self._deadlineCall = self.clock_().callLater(
                outbound.deadline, self._deadlineExpired
            )
        if envelope.body == "8BITMIME" and b"8BITMIME" not in self.extensions:
            # RFC 6152: 8-bit data may only go to a server that says it
            # takes it.
            reply = "554 5.6.3 The next hop does not accept 8-bit data (8BITMIME)"
            self._finish(
                DeliveryReport(
                    failed={r: reply for r in envelope.recipients},
                    host=self.settings.host,
                )
            )
            self.smtpState_from(-1, b"")
            return
        try:
            size = os.stat(outbound.messagePath).st_size
            if rewrite is not None and rewrite.rewriteFrom:
                self._header = openRewritten(outbound.messagePath, rewrite)
                size += self._header.growth
        except OSError as e:
            self._finish(
                Failure(
                    UpstreamError(
                        f"cannot read spooled message: {e}", self.settings.host
                    )
                )
            )
            self.smtpState_from(-1, b"")
            return
        self._size = size
        mail = b"MAIL FROM:" + smtp.quoteaddr(self._from)
        mail += mailFromParameters(outbound, self.extensions, size)
        if b"PIPELINING" not in self.extensions:
            self.sendLine(mail)
            self._expected = [250]
            self._okresponse = self.smtpState_to
            return
        recipients = self.getMailTo()
        commands = [mail]
        commands += [b"RCPT TO:" + smtp.quoteaddr(r) for r in recipients]
        commands.append(b"DATA")
        self.transport.write(b"".join(c + b"\r\n" for c in commands))
        self._pipeline = ["MAIL", *recipients, "DATA"]
        self._mailRefused = None
        self.toAddressesResult = []
        self.successAddresses = []
        self._expected = range(0, 1000)  # type: ignore[assignment]
        self._okresponse = self._failresponse = self._pipelinedReply

    def _pipelinedReply(self, code: int, resp: bytes) -> None:
        """
        The next reply to a pipelined MAIL, RCPT or DATA (RFC 2920: in the
        order of the commands).  A refused MAIL is every recipient's answer
        (the RCPT and DATA replies after it are only read); the message is
        sent after a 354 if MAIL and at least one RCPT were accepted.
        """
        step = self._pipeline.pop(0)
        if step == "MAIL":
            if code != 250:
                self._mailRefused = (code, resp)
            return
        if step != "DATA":
            if self._mailRefused is None:
                self.toAddressesResult.append((step, code, resp))
                if 200 <= code < 300:
                    self.successAddresses.append(step)
            return
        # The outcome if there is nothing to send: the refused MAIL, or
        # (as Twisted's client reports it) the last refused RCPT.
        refusal: tuple[int, bytes] | None = self._mailRefused
        if refusal is not None:
            self.toAddressesResult = []
            self.successAddresses = []
        elif not self.successAddresses:
            refusal = self.toAddressesResult[-1][1:]
        if refusal is None:
            if code == 354:
                self.smtpState_data(code, resp)
            else:
                self.smtpTransferFailed(code, resp)
        elif code == 354:
            # A server that opened the data phase for nobody: close it with
            # an empty message, then report the refusal.
            self.sendLine(b".")
            self._okresponse = self._failresponse = lambda c, r: (
                self.smtpTransferFailed(*refusal)
            )
        else:
            self.smtpTransferFailed(*refusal)

    def smtpState_data(self, code: int, resp: bytes) -> None:
        """
        Send the message: a small one in one write with its final dot,
        a larger one in chunks (Twisted's file transfer).
        """
        self._failresponse = self.smtpTransferFailed
        self._expected = list(range(200, 300))
        self._okresponse = self.smtpState_msgSent
        if self._size > SMALL_MESSAGE:
            sent = _ChunkSender().beginFileTransfer(
                self.getMailData(), self.transport, self.transformChunk
            )
            sent.addCallbacks(
                self.finishedFileTransfer, lambda f: self.sendError(f.value)
            )
            return
        try:
            data = self.getMailData().read()
        except OSError as e:
            self.sendError(e)
            return
        data = self.transformChunk(data)
        end = b".\r\n" if not data or data.endswith(b"\n") else b"\r\n.\r\n"
        self.transport.write(data + end)
        self._dataSent = True
        self.setTimeout(DATA_TERMINATION_TIMEOUT)

    def getMailTo(self) -> list[str]:
        assert self.current is not None
        return list(self.current.envelope.recipients)

    def clock_(self) -> Any:
        if self.clock is not None:
            return self.clock
        from twisted.internet import reactor

        return reactor

    def _deadlineExpired(self) -> None:
        """
        The message has taken too long.  Before the final dot, give up on
        the connection; after it, the upstream may already have the message,
        so wait for its reply (the reply timeout still applies).
        """
        self._deadlineCall = None
        if self.current is not None and not self._dataSent:
            self.sendError(
                UpstreamError("the message was not sent in time", self.settings.host)
            )

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        smtp.ESMTPClient.finishedFileTransfer(self, lastsent)
        self._dataSent = True
        self.setTimeout(DATA_TERMINATION_TIMEOUT)

    def getMailData(self) -> IO[bytes]:
        assert self.current is not None
        if self._header is not None:
            self._file, self._header = self._header, None
        else:
            self._file = open(self.current.messagePath, "rb")
        self._atLineStart = True
        return self._file

    def transformChunk(self, chunk: bytes) -> bytes:
        """
        LF to CRLF and dot-stuffing, also across chunk boundaries.
        """
        self.resetTimeout()
        data = chunk.replace(b"\n", b"\r\n")
        if self._atLineStart and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self._atLineStart = data.endswith(b"\n")
        return data

    def smtpState_msgSent(self, code: int, resp: bytes) -> None:
        """
        The transaction is over: report it, then take the next one.  The
        reply to the data ends a transaction (RFC 5321 4.1.1.4); any other
        end (a refused MAIL, no recipient, a refused DATA) is followed by
        RSET.  A refused RSET ends the connection (Twisted's client would
        answer it with another RSET, for ever).
        """
        finished = self._dataSent
        if self._from is not None:
            self.sentMail(
                code, resp, len(self.successAddresses), self.toAddressesResult, self.log
            )
        self.toAddressesResult = []
        self.successAddresses = []
        self._from = None
        if finished:
            self.smtpState_from(code, resp)
            return
        self.sendLine(b"RSET")
        self._expected = list(range(200, 300))
        self._okresponse = self.smtpState_from
        self._failresponse = self._rsetRefused

    def _rsetRefused(self, code: int, resp: bytes) -> None:
        self.sendError(smtp.SMTPProtocolError(code, resp, isFatal=True))

    def sentMail(
        self,
        code: int,
        resp: bytes,
        numOk: int,
        addresses: list[tuple[Any, int, bytes]],
        log: object,
    ) -> None:
        outbound = self.current
        if outbound is None:
            return
        self.setTimeout(RESPONSE_TIMEOUT)
        if self._dataSent:
            self.sent += 1
        elif 200 <= code < 300:
            # A success reply where a 250 to MAIL or a 354 to DATA belonged
            # (an out-of-step or broken server): nothing was delivered.
            code, resp = 451, b"4.5.0 Unexpected reply: " + resp
        report = reportFor(outbound.envelope, self.settings.host, code, resp, addresses)
        self._finish(report)

    def _finish(self, outcome: DeliveryReport | Failure) -> None:
        if self._deadlineCall is not None:
            if self._deadlineCall.active():
                self._deadlineCall.cancel()
            self._deadlineCall = None
        for opened in (self._file, self._header):
            if opened is not None:
                opened.close()
        self._file = self._header = None
        outbound, self.current = self.current, None
        if outbound is None or outbound.done:
            return
        if isinstance(outcome, Failure):
            outbound.result.errback(outcome)
        else:
            outbound.result.callback(outcome)

    # -- failures -----------------------------------------------------------

    def sendError(self, exc: BaseException) -> None:
        """
        A connection-level failure: fail the message under way, then close.
        """
        text = (
            exc.resp.decode("utf-8", "replace")
            if isinstance(exc, smtp.SMTPClientError) and isinstance(exc.resp, bytes)
            else str(exc)
        )
        code = getattr(exc, "code", -1)
        reason = _replyText(code, text) if code and code > 0 else text
        self.lastError = Failure(
            UpstreamError(f"{type(exc).__name__}: {reason}", self.settings.host)
        )
        self._finish(self.lastError)
        if isinstance(exc, smtp.SMTPClientError) and not exc.isFatal:
            self._disconnectFromServer()
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        smtp.ESMTPClient.connectionLost(self, reason)
        if self.current is not None:
            self._finish(
                Failure(
                    UpstreamError(
                        f"connection lost: {reason.getErrorMessage()}",
                        self.settings.host,
                    )
                )
            )
        self.queue.clientGone(self, reason)

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """
        Reply timeouts run on the injected clock.
        """
        if self.clock is None:
            return smtp.ESMTPClient.callLater(self, period, func)
        return self.clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.sendError(
            UpstreamError(f"no reply within {self.timeout}s", self.settings.host)
        )


class RelayClientFactory(protocol.ClientFactory):
    """
    Builds L{RelayClient}s for one destination.
    """

    def __init__(
        self,
        settings: ClientSettings,
        queue: OutboundQueue | None = None,
        clock: Any = None,
    ) -> None:
        """
        @param queue: where clients take messages from; a L{ConnectionPool}
            sets itself here when it adopts the factory.
        """
        self.settings = settings
        self.queue = queue
        self.clock = clock

    def buildProtocol(self, addr: Any) -> RelayClient:
        assert self.queue is not None, "no queue: give the factory to a pool"
        client = RelayClient(self.settings, self.queue, self.clock)
        client.factory = self
        return client

    def withToken(self, token: str) -> RelayClientFactory:
        """
        A factory for one connection that logs in with C{token}.
        """
        return RelayClientFactory(
            replace(self.settings, token=token), self.queue, self.clock
        )


def plainAuthResponse(username: str, password: bytes) -> bytes:
    """
    The base64 AUTH PLAIN initial response (for tests and fakes).
    """
    return base64.b64encode(b"\0" + username.encode() + b"\0" + password)


Connect = Callable[[RelayClientFactory], "Deferred[RelayClient]"]
"""Connects a factory to a destination (an endpoint's C{connect})."""
