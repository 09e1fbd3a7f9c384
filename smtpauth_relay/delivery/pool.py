"""
A pool of connections to one destination, fed from one queue of messages.

At most C{maxConnections} connections are open at once; each sends
messages one after the other (RSET between) until the queue is empty, then
waits C{linger} seconds for another before it QUITs.  A message that waits
while no connection can be made fails (temporarily) with the reason, and is
retried by the relay's queue runner.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpauth_relay.delivery.client import (
    Connect,
    Outbound,
    OutboundQueue,
    RelayClient,
    RelayClientFactory,
    UpstreamError,
)
from smtpauth_relay.envelope import DeliveryReport
from smtpauth_relay.oauth2 import TokenClient, TokenError

log = Logger()


class ConnectionPool(OutboundQueue):
    """
    Connections to one destination; see the module docstring.

    @ivar connectionsMade: connections opened so far (for logs and tests).
    @ivar authHold: seconds deliveries wait after the upstream refused our
        credentials.
    @ivar tokens: where OAuth2 tokens come from, or C{None} (a password, or
        no login): each connection gets a token before it is opened; a
        refused token is dropped and the login tried once more, with a new
        token on a new connection, before deliveries are held.
    """

    authHold = 900.0

    def __init__(
        self,
        factory: RelayClientFactory,
        connect: Connect,
        clock: Any,
        maxConnections: int = 2,
        linger: float = 2.0,
        deadline: float = 600.0,
        tokens: TokenClient | None = None,
    ) -> None:
        """
        @param factory: its C{queue} is set to this pool.
        @param connect: opens one connection with C{factory}.
        @param deadline: seconds a message may take, queued or being sent,
            before it fails and its connection is aborted.
        """
        self.factory = factory
        factory.queue = self
        factory.clock = clock
        self._connect = connect
        self.clock = clock
        self.maxConnections = maxConnections
        self.linger = linger
        self.deadline = deadline
        self.waiting: deque[Outbound] = deque()
        self.clients: set[RelayClient] = set()
        self.connecting = 0
        self.connectionsMade = 0
        self._idle: dict[RelayClient, Any] = {}
        self._closed: list[Deferred[None]] = []
        self._waitTimers: dict[int, Any] = {}
        self._heldUntil = 0.0
        self._heldReason = ""
        self.tokens = tokens
        self._refusedToken: str | None = None
        self._retrying: set[RelayClient] = set()

    def send(self, outbound: Outbound) -> Deferred[DeliveryReport]:
        """
        Queue C{outbound}; its C{result} fires with its report.

        It may wait C{deadline} seconds for a connection; once a connection
        takes it, the transfer has C{deadline} seconds more (after the final
        dot the upstream's reply is awaited regardless: it may already have
        the message).
        """
        now = self.clock.seconds()
        if now < self._heldUntil:
            return fail(
                UpstreamError(
                    f"holding deliveries until {self._heldUntil - now:.0f}s from now: "
                    f"{self._heldReason}",
                    self.factory.settings.host,
                )
            )
        outbound.deadline = self.deadline
        self._waitTimers[id(outbound)] = self.clock.callLater(
            self.deadline, self._waitedTooLong, outbound
        )
        self.waiting.append(outbound)
        self._dispatch()
        return outbound.result

    def _waitedTooLong(self, outbound: Outbound) -> None:
        """
        No connection took C{outbound} in time: the connections that have
        not got anywhere (an upstream that accepts but never greets) are
        stuck; drop them, so the next attempt opens fresh ones.
        """
        self._waitTimers.pop(id(outbound), None)
        try:
            self.waiting.remove(outbound)
        except ValueError:
            return
        for client in list(self.clients):
            if client.current is None and client.sent == 0 and client not in self._idle:
                client.transport.abortConnection()
        if not outbound.done:
            outbound.result.errback(
                Failure(
                    UpstreamError(
                        f"no connection took the message within {self.deadline:.0f}s",
                        self.factory.settings.host,
                    )
                )
            )

    def credentialsRefused(self, client: RelayClient, reply: str) -> None:
        """
        The upstream refused our login: hold deliveries to it for a while
        instead of failing another login with every queued message (which
        gets provider accounts locked).

        A refused OAuth2 token (revoked, or expired early) is first dropped,
        and the login tried once more with a new one on a new connection.
        """
        host = self.factory.settings.host
        if self.tokens is not None:
            token = client.settings.token
            self.tokens.invalidate(token)
            if self._refusedToken in (None, token):
                # The first refusal of this token (on any connection): a new
                # token gets one more try before deliveries are held.
                self._refusedToken = token
                self._retrying.add(client)
                log.warn(
                    "{host} refused our OAuth2 token ({reply}); getting a new one",
                    host=host,
                    reply=reply,
                )
                return
        self._heldUntil = self.clock.seconds() + self.authHold
        self._heldReason = f"the upstream refused our credentials: {reply}"
        check = (
            "[delivery.oauth2] (username, the application's SMTP permission)"
            if self.tokens is not None
            else "[delivery] username and password_file"
        )
        log.error(
            "{host} refused our credentials ({reply}); holding deliveries to it "
            "for {hold:.0f}s: check {check}",
            host=host,
            reply=reply,
            hold=self.authHold,
            check=check,
        )
        self._failWaiting(
            Failure(UpstreamError(self._heldReason, self.factory.settings.host))
        )

    def authenticated(self, client: RelayClient) -> None:
        """
        The upstream took our login: a later refused token may be retried
        again.
        """
        self._refusedToken = None

    def _dispatch(self) -> None:
        while self.waiting and self._idle:
            client, call = self._idle.popitem()
            if call.active():
                call.cancel()
            outbound = self._next()
            if outbound is None:
                self._idle[client] = call
                return
            client.offer(outbound)
        needed = len(self.waiting) - self.connecting
        while needed > 0 and len(self.clients) + self.connecting < self.maxConnections:
            needed -= 1
            self._open()

    def _open(self) -> None:
        self.connecting += 1
        d: Deferred[Any]
        if self.tokens is not None:
            d = self.tokens.getToken()
            d.addCallback(
                lambda token: maybeDeferred(
                    self._connect, self.factory.withToken(token)
                )
            )
        else:
            d = self._connect(self.factory)

        def connected(client: RelayClient) -> None:
            self.connecting -= 1
            self.connectionsMade += 1
            self.clients.add(client)

        def failed(reason: Failure) -> None:
            self.connecting -= 1
            if reason.check(TokenError):
                # TokenClient has logged why.
                reason = Failure(
                    UpstreamError(
                        f"no OAuth2 token: {reason.getErrorMessage()}",
                        self.factory.settings.host,
                    )
                )
            else:
                log.warn(
                    "cannot connect to {host}: {reason}",
                    host=self.factory.settings.host,
                    reason=reason.getErrorMessage(),
                )
            if not self.clients and not self.connecting:
                self._failWaiting(reason)

        d.addCallbacks(connected, failed)

    def _failWaiting(self, reason: Failure) -> None:
        error = (
            reason.value
            if isinstance(reason.value, UpstreamError)
            else UpstreamError(reason.getErrorMessage(), self.factory.settings.host)
        )
        waiting, self.waiting = self.waiting, deque()
        for outbound in waiting:
            timer = self._waitTimers.pop(id(outbound), None)
            if timer is not None and timer.active():
                timer.cancel()
            if not outbound.done:
                outbound.result.errback(Failure(error))

    def _next(self) -> Outbound | None:
        while self.waiting:
            outbound = self.waiting.popleft()
            timer = self._waitTimers.pop(id(outbound), None)
            if timer is not None and timer.active():
                timer.cancel()
            if not outbound.done:
                return outbound
        return None

    # -- OutboundQueue -----------------------------------------------------

    def take(self, client: RelayClient) -> Outbound | None:
        return self._next()

    def idle(self, client: RelayClient) -> bool:
        if self.linger <= 0:
            return False
        self._idle[client] = self.clock.callLater(self.linger, self._quit, client)
        return True

    def _quit(self, client: RelayClient) -> None:
        self._idle.pop(client, None)
        client.quitIfIdle()

    def close(self) -> Deferred[None]:
        """
        At shutdown: idle connections QUIT now, busy ones after their
        message; fires when none is left.
        """
        self.linger = 0
        for client, call in list(self._idle.items()):
            if call.active():
                call.cancel()
            self._quit(client)
        d: Deferred[None] = Deferred()
        if not self.clients:
            d.callback(None)
        else:
            self._closed.append(d)
        return d

    def clientGone(self, client: RelayClient, reason: Failure) -> None:
        self.clients.discard(client)
        call = self._idle.pop(client, None)
        if call is not None and call.active():
            call.cancel()
        if not self.clients and self._closed:
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(None)
        retry = client in self._retrying
        self._retrying.discard(client)
        if not self.waiting:
            return
        if client.sent > 0 or retry:
            self._dispatch()
        elif not self.clients and not self.connecting:
            # The destination took a connection but no message (TLS or AUTH
            # failed, it hung up): connecting again now would fail the same
            # way, so the waiting messages fail and are retried later.
            self._failWaiting(client.lastError or reason)
        # Otherwise the other connections take the waiting messages.
