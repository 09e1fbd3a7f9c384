"""
Public fakes for the relay's seams, for our tests and for operators testing
their own plugins.  Each fake implements the same interface as the real
thing; the contract tests in C{tests/} run against both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides, implementer

from smtpauth_relay.envelope import DeliveryReport, Envelope
from smtpauth_relay.errors import CheckerUnavailable, SpoolError, UnknownUser
from smtpauth_relay.interfaces import IDeliveryAgent, ISpool, ISpoolWriter
from smtpauth_relay.threads import runNow

__all__ = [
    "FakeTLSConnection",
    "MemoryChecker",
    "MemorySpool",
    "MemorySpoolWriter",
    "RecordingDeliveryAgent",
    "RecordingRunner",
    "TLSStringTransport",
    "runNow",
    "spoolFull",
]


class RecordingRunner:
    """
    A C{runInThread} that records each call and runs it at once.

    @ivar calls: the functions run, in order.
    """

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append(f)
        return runNow(f, *args)


@implementer(ISpoolWriter)
class MemorySpoolWriter:
    """
    A message being written into a L{MemorySpool}.
    """

    def __init__(self, spool: MemorySpool, queueId: str) -> None:
        self.queueId = queueId
        self._spool = spool
        self._chunks: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        if self._spool.failNextCommit is not None:
            error, self._spool.failNextCommit = self._spool.failNextCommit, None
            return fail(error)
        if self._spool.holdCommits:
            d: Deferred[str] = Deferred()
            self._spool.heldCommits.append((self, envelope, d))
            return d
        return succeed(self.finishCommit(envelope))

    def finishCommit(self, envelope: Envelope) -> str:
        """
        Store the message (used directly for held commits).
        """
        self._spool.messages[self.queueId] = (envelope, b"".join(self._chunks))
        for listener in self._spool.listeners:
            listener(self.queueId)
        return self.queueId

    def abort(self) -> Deferred[None]:
        self.aborted = True
        self._spool.aborted.append(self.queueId)
        return succeed(None)


@implementer(ISpool)
class MemorySpool:
    """
    An in-memory L{ISpool}.

    @ivar messages: queue id to (envelope, message bytes).
    @ivar failNextCommit: an exception the next commit fails with.
    @ivar holdCommits: if set, commits wait in C{heldCommits} as
        C{(writer, envelope, deferred)} until the test finishes them.
    """

    def __init__(self) -> None:
        self.messages: dict[str, tuple[Envelope, bytes]] = {}
        self.listeners: list[Callable[[str], object]] = []
        self.aborted: list[str] = []
        self.quarantined: dict[str, tuple[Envelope, bytes]] = {}
        self.failNextCommit: BaseException | None = None
        self.holdCommits = False
        self.heldCommits: list[tuple[MemorySpoolWriter, Envelope, Deferred[str]]] = []
        self._counter = 0

    def newMessage(self) -> MemorySpoolWriter:
        self._counter += 1
        return MemorySpoolWriter(self, f"Q{self._counter:04d}")

    def queued(self) -> list[str]:
        return sorted(self.messages)

    def load(self, queueId: str) -> Envelope:
        return self.messages[queueId][0]

    def messagePath(self, queueId: str) -> str:
        return f"memory:{queueId}"

    def messageBytes(self, queueId: str) -> bytes:
        return self.messages[queueId][1]

    def saveEnvelope(self, envelope: Envelope) -> Deferred[None]:
        if envelope.queueId not in self.messages:
            return fail(KeyError(envelope.queueId))
        self.messages[envelope.queueId] = (envelope, self.messages[envelope.queueId][1])
        return succeed(None)

    def remove(self, queueId: str) -> Deferred[None]:
        self.messages.pop(queueId, None)
        return succeed(None)

    def quarantine(self, queueId: str) -> Deferred[None]:
        self.quarantined[queueId] = self.messages.pop(queueId)
        return succeed(None)

    def addListener(self, listener: Callable[[str], object]) -> None:
        self.listeners.append(listener)


def spoolFull() -> SpoolError:
    """
    The error a spool gives when the disk is full.
    """
    return SpoolError("No space left on device", insufficientStorage=True)


@implementer(IDeliveryAgent)
class RecordingDeliveryAgent:
    """
    An L{IDeliveryAgent} whose results the test decides: each call is
    recorded with a L{Deferred} the test fires.

    @ivar calls: C{(envelope, messagePath, deferred)} per delivery.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Envelope, str, Deferred[DeliveryReport]]] = []

    def deliver(self, envelope: Envelope, messagePath: str) -> Deferred[DeliveryReport]:
        d: Deferred[DeliveryReport] = Deferred()
        self.calls.append((envelope, messagePath, d))
        return d


@implementer(ICredentialsChecker)
class MemoryChecker:
    """
    A credentials checker over a dict, with the chain's three outcomes:
    unknown user (L{UnknownUser}), wrong password (L{UnauthorizedLogin}),
    and backend down (L{CheckerUnavailable}, when C{unavailable} is set).

    @ivar pending: when set, answers wait in this list as Deferreds the test
        fires.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, **users: str) -> None:
        self.users = {k.encode(): v.encode() for k, v in users.items()}
        self.unavailable = False
        self.pending: list[Deferred[Any]] | None = None
        self.asked: list[bytes] = []

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[Any]:
        assert IUsernamePassword.providedBy(credentials)
        username = credentials.username
        self.asked.append(username)
        if self.pending is not None:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        if self.unavailable:
            return fail(CheckerUnavailable("memory checker is down"))
        if username not in self.users:
            return fail(UnknownUser())
        if credentials.password != self.users[username]:
            return fail(UnauthorizedLogin())
        return succeed(username)


class FakeTLSConnection:
    """
    Stands in for C{OpenSSL.SSL.Connection} in L{TLSStringTransport}.
    """

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"

    def get_cipher_bits(self) -> int:
        return 256


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that can C{startTLS}: it records the context
    factory and from then on provides L{ISSLTransport}, with what was
    written before the switch kept in C{beforeTLS}.
    """

    tlsStarted: Any = None
    beforeTLS = b""

    def startTLS(self, contextFactory: Any) -> None:
        self.tlsStarted = contextFactory
        self.beforeTLS = self.value()
        self.clear()
        directlyProvides(self, ISSLTransport)

    def getHandle(self) -> FakeTLSConnection:
        return FakeTLSConnection()
