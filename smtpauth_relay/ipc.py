"""
The channel between the main process and its workers (C{[server] workers}):
AMP over a UNIX socket pair.

A worker runs SMTP sessions only.  Everything that must be one for the whole
relay stays in the main process and is reached through this channel:

  - the queue: a worker writes each message to the shared spool itself
    (fsynced before its 250, as always) and then tells the main process,
    whose queue runner alone delivers (L{Queued});
  - the brute-force lockout and the rate limits (L{LockoutCheck},
    L{LockoutFailed}, L{LockoutSucceeded}, L{MessageAllowed},
    L{RecipientAllowed}, L{MessageQueued});
  - the connection counts of C{max_connections} and
    C{max_connections_per_ip}, with the per-minute connection rate
    (L{Connect}, L{Disconnect});
  - in-flow control: the main process says when deliveries lag behind
    (L{FlowChanged}), and a worker's C{MAIL FROM} then waits for its word
    (L{Admit});
  - the session metrics, sent in batches (L{SessionCounts}) and served by
    the main process's C{/metrics}.

The main side is L{MainChannel}; the worker side is L{WorkerChannel} and the
C{Remote*} objects that stand in a worker for the main process's lockout,
limits and flow.  Their methods return L{Deferred}s where the local ones
return values; L{smtpauth_relay.server} takes either.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpauth_relay import replies
from smtpauth_relay.config import LimitsConfig, LockoutConfig
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.flow import InFlow
from smtpauth_relay.interfaces import (
    IAdmission,
    IFlowControl,
    ILoginGuard,
    ISessionLimits,
    ISessionMetrics,
)
from smtpauth_relay.limits import RateLimits
from smtpauth_relay.lockout import Lock, Lockout
from smtpauth_relay.replies import Reply
from smtpauth_relay.server import ConnectionLimiter

log = Logger()

#: An envelope larger than this is not sent along with L{Queued} (an AMP
#: value holds at most 65,535 bytes): the main process reads it from disk.
MAX_ENVELOPE = 60_000

#: The refusals L{Connect} may answer, by name.
REFUSALS: dict[str, Reply] = {
    "connections": replies.TOO_MANY_CONNECTIONS,
    "address": replies.TOO_MANY_FROM_ADDRESS,
    "rate": replies.TOO_MANY_CONNECTIONS_RATE,
    "shutdown": replies.SHUTTING_DOWN,
}
_REFUSAL_NAMES = {reply: name for name, reply in REFUSALS.items()}


class Queued(amp.Command):
    """
    A worker committed a message to the spool: queue it for delivery.
    C{envelope} is its JSON, or empty if too large to send.
    """

    arguments = [(b"queueId", amp.Unicode()), (b"envelope", amp.String())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


class Connect(amp.Command):
    """
    A client connected to a worker: count it; C{refusal} names the 421 to
    give it (a key of L{REFUSALS}), or is empty.  It counts until
    L{Disconnect}, refused or not.
    """

    arguments = [(b"host", amp.Unicode())]
    response = [(b"refusal", amp.Unicode())]


class Disconnect(amp.Command):
    """
    A client counted by L{Connect} is gone.
    """

    arguments = [(b"host", amp.Unicode())]
    requiresAnswer = False


class LockoutCheck(amp.Command):
    """
    L{Lockout.check}: the lock refusing this login, if any.
    """

    arguments = [(b"host", amp.Unicode()), (b"user", amp.Unicode())]
    response = [
        (b"key", amp.Unicode(optional=True)),
        (b"until", amp.Float(optional=True)),
    ]


class LockoutFailed(amp.Command):
    """
    L{Lockout.failed}: count a failed login; the tarpit delay.
    """

    arguments = [(b"host", amp.Unicode()), (b"user", amp.Unicode())]
    response = [(b"delay", amp.Float())]


class LockoutSucceeded(amp.Command):
    """
    L{Lockout.succeeded}.
    """

    arguments = [(b"host", amp.Unicode()), (b"user", amp.Unicode())]
    requiresAnswer = False


class MessageAllowed(amp.Command):
    """
    L{RateLimits.messageAllowed}.
    """

    arguments = [(b"user", amp.Unicode())]
    response = [(b"allowed", amp.Boolean())]


class RecipientAllowed(amp.Command):
    """
    L{RateLimits.recipientAllowed}.
    """

    arguments = [(b"user", amp.Unicode()), (b"pending", amp.Integer())]
    response = [(b"allowed", amp.Boolean())]


class MessageQueued(amp.Command):
    """
    L{RateLimits.messageQueued}.
    """

    arguments = [(b"user", amp.Unicode()), (b"recipients", amp.Integer())]
    requiresAnswer = False


class Admit(amp.Command):
    """
    L{InFlow.admit}: answered when a new message may be taken.
    """

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


class FlowChanged(amp.Command):
    """
    From the main process: whether new messages must ask L{Admit} first.
    """

    arguments = [(b"congested", amp.Boolean())]
    requiresAnswer = False


class Ready(amp.Command):
    """
    A worker has started: it takes sessions, and a reload (SIGHUP) now
    reaches its Reloader.
    """

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    requiresAnswer = False


class SessionCounts(amp.Command):
    """
    A worker's session metrics since its last report: a JSON list of
    C{[method, arguments]} of L{ISessionMetrics}.
    """

    arguments = [(b"events", amp.String())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


#: The L{ISessionMetrics} methods a worker reports.
METRIC_EVENTS = frozenset(ISessionMetrics.names())


class MainChannel(amp.AMP):
    """
    The main process's end of one worker's channel.

    @param committed: called with a worker's queue id and its envelope (or
        C{None}) once the message is durably in the spool.
    """

    def __init__(
        self,
        committed: Callable[[str, Envelope | None], object],
        limiter: ConnectionLimiter,
        lockout: Lockout | None,
        limits: RateLimits | None,
        flow: InFlow | None,
        metrics: ISessionMetrics | None = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.ready = False
        """Whether the worker said L{Ready}."""
        self.onReady: Callable[[MainChannel], object] = lambda channel: None
        # The worker's open connections by listener, closed in the metrics
        # if it dies without saying so.
        self.openConnections: Counter[str] = Counter()
        self.committed = committed
        self.limiter = limiter
        self.lockout = lockout
        self.limits = limits
        self.flow = flow
        # The worker's connections counted in the limiter, released if the
        # worker dies without saying so.
        self.counted: Counter[str] = Counter()

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.flow is not None:
            self.flow.observers.append(self.flowChanged)
            if self.flow.congested():
                self.flowChanged(True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.flow is not None and self.flowChanged in self.flow.observers:
            self.flow.observers.remove(self.flowChanged)
        counted, self.counted = self.counted, Counter()
        for host, count in counted.items():
            for _ in range(count):
                self.limiter.countClose(host)
        stillOpen, self.openConnections = self.openConnections, Counter()
        if self.metrics is not None:
            for listener, count in stillOpen.items():
                for _ in range(count):
                    self.metrics.connectionClosed(listener)

    def flowChanged(self, congested: bool) -> None:
        tell(self, FlowChanged, congested=congested)

    @Queued.responder
    def queued(self, queueId: str, envelope: bytes) -> dict[str, Any]:
        self.committed(queueId, Envelope.fromJSON(envelope) if envelope else None)
        return {}

    @Ready.responder
    def workerReady(self) -> dict[str, Any]:
        self.ready = True
        self.onReady(self)
        return {}

    @SessionCounts.responder
    def sessionCounts(self, events: bytes) -> dict[str, Any]:
        if self.metrics is None:
            return {}
        try:
            decoded = json.loads(events)
        except ValueError:
            log.warn("unreadable metrics from a worker")
            return {}
        for name, arguments in decoded:
            if name not in METRIC_EVENTS or not isinstance(arguments, list):
                continue
            if name == "connectionOpened":
                self.openConnections[str(arguments[0])] += 1
            elif name == "connectionClosed":
                self.openConnections[str(arguments[0])] -= 1
            try:
                getattr(self.metrics, name)(*arguments)
            except (TypeError, ValueError):
                log.warn("bad metrics event {name} from a worker", name=name)
        return {}

    @Connect.responder
    def connect(self, host: str) -> dict[str, Any]:
        self.counted[host] += 1
        refusal = self.limiter.countOpen(host)
        if refusal is None and self.limits is not None:
            if not self.limits.connectionAllowed(host):
                refusal = replies.TOO_MANY_CONNECTIONS_RATE
        return {
            "refusal": _REFUSAL_NAMES.get(refusal, "") if refusal is not None else ""
        }

    @Disconnect.responder
    def disconnect(self, host: str) -> dict[str, Any]:
        if self.counted[host] > 0:
            self.counted[host] -= 1
            if not self.counted[host]:
                del self.counted[host]
            self.limiter.countClose(host)
        return {}

    @LockoutCheck.responder
    def lockoutCheck(self, host: str, user: str) -> dict[str, Any]:
        lock = self.lockout.check(host, user or None) if self.lockout else None
        if lock is None:
            return {}
        return {"key": lock.key, "until": float(lock.until)}

    @LockoutFailed.responder
    def lockoutFailed(self, host: str, user: str) -> dict[str, Any]:
        delay = self.lockout.failed(host, user or None) if self.lockout else 0.0
        return {"delay": float(delay)}

    @LockoutSucceeded.responder
    def lockoutSucceeded(self, host: str, user: str) -> dict[str, Any]:
        if self.lockout is not None:
            self.lockout.succeeded(host, user)
        return {}

    @MessageAllowed.responder
    def messageAllowed(self, user: str) -> dict[str, Any]:
        allowed = self.limits.messageAllowed(user) if self.limits else True
        return {"allowed": allowed}

    @RecipientAllowed.responder
    def recipientAllowed(self, user: str, pending: int) -> dict[str, Any]:
        allowed = self.limits.recipientAllowed(user, pending) if self.limits else True
        return {"allowed": allowed}

    @MessageQueued.responder
    def messageQueued(self, user: str, recipients: int) -> dict[str, Any]:
        if self.limits is not None:
            self.limits.messageQueued(user, recipients)
        return {}

    @Admit.responder
    def admit(self) -> Deferred[dict[str, Any]]:
        if self.flow is None:
            return succeed({})
        return self.flow.admit().addCallback(lambda _: {})


class WorkerChannel(amp.AMP):
    """
    A worker's end of the channel.

    @ivar congested: what the main process last said of in-flow control.
    """

    def __init__(self, lost: Callable[[Failure], object] = lambda r: None) -> None:
        super().__init__()
        self.congested = False
        self.lost = lost

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.lost(reason)

    @FlowChanged.responder
    def flowChanged(self, congested: bool) -> dict[str, Any]:
        self.congested = congested
        return {}

    def queued(self, queueId: str, envelope: Envelope | None) -> None:
        """
        Tell the main process of a committed message.  If that fails (the
        main process is gone) the message is safe in the spool and is
        delivered after the next start.
        """
        raw = envelope.toJSON() if envelope is not None else b""
        if len(raw) > MAX_ENVELOPE:
            raw = b""
        self.callRemote(Queued, queueId=queueId, envelope=raw).addErrback(
            lambda f: log.warn(
                "could not hand {queueId} to the main process ({error}); it is"
                " in the spool and goes out after the next start",
                queueId=queueId,
                error=f.getErrorMessage(),
            )
        )


def tell(channel: amp.AMP, command: type[amp.Command], **arguments: Any) -> None:
    """
    Send a command that has no answer; if the channel is gone, the main
    process is too and there is no one left to tell.
    """
    if channel.transport is None or getattr(channel.transport, "disconnecting", False):
        return
    channel.callRemote(command, **arguments)


@implementer(ILoginGuard)
class RemoteLockout:
    """
    A worker's stand-in for the main process's L{Lockout}.
    """

    def __init__(self, channel: WorkerChannel, settings: LockoutConfig) -> None:
        self.channel = channel
        self.settings = settings

    def check(self, host: str, user: str | None) -> Deferred[Lock | None]:
        def answer(response: dict[str, Any]) -> Lock | None:
            key = response.get("key")
            return None if key is None else Lock(key, response["until"])

        return self.channel.callRemote(
            LockoutCheck, host=host, user=user or ""
        ).addCallback(answer)

    def failed(self, host: str, user: str | None) -> Deferred[float]:
        return self.channel.callRemote(
            LockoutFailed, host=host, user=user or ""
        ).addCallback(lambda response: response["delay"])

    def succeeded(self, host: str, user: str) -> None:
        tell(self.channel, LockoutSucceeded, host=host, user=user)


@implementer(ISessionLimits)
class RemoteRateLimits:
    """
    A worker's stand-in for the main process's L{RateLimits}; the
    connection rate is part of L{RemoteAdmission}.
    """

    def __init__(self, channel: WorkerChannel, settings: LimitsConfig) -> None:
        self.channel = channel
        self.settings = settings

    def connectionAllowed(self, host: str) -> bool:
        """
        Always: a worker's connections are counted by L{RemoteAdmission}.
        """
        return True

    def messageAllowed(self, user: str) -> bool | Deferred[bool]:
        if not self.settings.messages_per_hour:
            return True
        return self.channel.callRemote(MessageAllowed, user=user).addCallback(
            lambda response: response["allowed"]
        )

    def recipientAllowed(self, user: str, pending: int) -> bool | Deferred[bool]:
        if not self.settings.recipients_per_hour:
            return True
        return self.channel.callRemote(
            RecipientAllowed, user=user, pending=pending
        ).addCallback(lambda response: response["allowed"])

    def messageQueued(self, user: str, recipients: int) -> None:
        if not (self.settings.messages_per_hour or self.settings.recipients_per_hour):
            return
        tell(self.channel, MessageQueued, user=user, recipients=recipients)


@implementer(IAdmission)
class RemoteAdmission:
    """
    A worker's connection counting: asks the main process, whose limiter
    counts every process's clients.
    """

    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel

    def connect(self, host: str) -> Deferred[Reply | None]:
        return self.channel.callRemote(Connect, host=host).addCallback(
            lambda response: REFUSALS.get(response["refusal"])
        )

    def disconnect(self, host: str) -> None:
        tell(self.channel, Disconnect, host=host)


@implementer(IFlowControl)
class RemoteFlow:
    """
    A worker's in-flow control: new messages go at once unless the main
    process said deliveries lag behind; then they wait for its L{Admit}.
    """

    def __init__(self, channel: WorkerChannel, delay: float) -> None:
        self.channel = channel
        self.delay = delay

    def admit(self) -> Deferred[None] | None:
        """
        @return: C{None} if the message may go at once, else a L{Deferred}
            firing when it may.
        """
        if self.delay <= 0 or not self.channel.congested:
            return None
        # Whatever happens to the question, the session goes on.
        return self.channel.callRemote(Admit).addBoth(lambda result: None)


def _metricsLost(failure: Failure) -> None:
    log.debug("session counts not delivered: {f}", f=failure)


@implementer(ISessionMetrics)
class MetricsForwarder:
    """
    A worker's session metrics: gathered, and sent to the main process
    (whose C{/metrics} serves every process's) at most every
    L{interval} seconds, or once L{batch} events are waiting.
    """

    interval = 1.0
    batch = 256

    def __init__(self, channel: WorkerChannel, clock: Any) -> None:
        self.channel = channel
        self.clock = clock
        self._events: list[tuple[str, tuple[Any, ...]]] = []
        self._call: Any = None

    def _add(self, name: str, *arguments: Any) -> None:
        self._events.append((name, arguments))
        if len(self._events) >= self.batch:
            self.flush()
        elif self._call is None:
            self._call = self.clock.callLater(self.interval, self.flush)

    def flush(self) -> Deferred[None]:
        """
        Send what is waiting now.

        @return: a L{Deferred} firing once the main process has counted it
            (or the channel is gone).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        events, self._events = self._events, []
        transport = self.channel.transport
        if (
            not events
            or transport is None
            or getattr(transport, "disconnecting", False)
        ):
            return succeed(None)
        d = self.channel.callRemote(SessionCounts, events=json.dumps(events).encode())
        return d.addCallbacks(lambda _: None, _metricsLost)

    def connectionOpened(self, listener: str, tls: str) -> None:
        self._add("connectionOpened", listener, tls)

    def connectionClosed(self, listener: str) -> None:
        self._add("connectionClosed", listener)

    def connectionRefused(self, reason: str) -> None:
        self._add("connectionRefused", reason)

    def authAttempt(self, mechanism: str, result: str) -> None:
        self._add("authAttempt", mechanism, result)

    def messageAccepted(self, size: int) -> None:
        self._add("messageAccepted", size)

    def messageRejected(self, reason: str) -> None:
        self._add("messageRejected", reason)
