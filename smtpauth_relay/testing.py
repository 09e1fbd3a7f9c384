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
    "CheckerContractMixin",
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

    def recent(self, queueId: str) -> Envelope | None:
        """
        Nothing is remembered apart: L{load} reads memory anyway.
        """
        return None

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

    def __init__(self, version: str = "TLSv1.3") -> None:
        self.version = version

    def get_protocol_version_name(self) -> str:
        return self.version

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
    tlsVersion = "TLSv1.3"
    """The version the fake handshake negotiates."""

    def startTLS(self, contextFactory: Any) -> None:
        self.tlsStarted = contextFactory
        self.beforeTLS = self.value()
        self.clear()
        directlyProvides(self, ISSLTransport)

    def getHandle(self) -> FakeTLSConnection:
        return FakeTLSConnection(self.tlsVersion)


class CheckerContractMixin:
    """
    The operator kit: tests that any credential checker plugin must pass.

    Mix it into a L{twisted.trial.unittest.TestCase} (not a synchronous
    one: the checker talks to a real backend on the real reactor) and say
    how to reach a backend that knows one user::

        class MyCheckerTests(CheckerContractMixin, TestCase):
            authType = "mystore"
            validUser = ("alice", "wonderland")

            def checkerArgument(self) -> str:
                return "https://store.example.test/?timeout=5"

            def unavailableArgument(self) -> str:
                return "https://127.0.0.1:9/"   # nothing listens there

    The tests check that the plugin is found by its strcred name and
    provides the interfaces it declares; that the right password logs the
    user in, a wrong one is refused for good (not passed to the next
    checker), and an unknown user is refused (with L{UnknownUser}, so that
    the next checker is asked, unless C{distinguishesUnknownUsers} is
    false); that a dead backend gives L{CheckerUnavailable} through the
    chain; that C{requestAvatarId} returns at once and leaves the waiting to
    the reactor; and that a real SMTP session of the relay (in memory) gets
    C{235}, C{535} and C{454} from them.  A checker with a C{close} method
    has it called (and waited for) when each test ends.

    @cvar authType: the plugin's strcred name (C{"ldap"} in C{ldap:...}).
    @cvar validUser: C{(username, password)} of a user the backend knows.
    @cvar wrongPassword: a password that is not the user's.
    @cvar unknownUser: a name the backend does not know.
    @cvar distinguishesUnknownUsers: whether the backend can tell an
        unknown user from a wrong password (an LDAP bind by DN template or
        an IMAP login cannot: both are plain refusals).
    @cvar blockingLimit: seconds C{requestAvatarId} may take before it
        returns (the best of three tries); the real work must happen off
        the reactor thread or asynchronously.
    @cvar answerTimeout: seconds to wait for a backend's answer.
    """

    authType: str
    validUser: tuple[str, str]
    wrongPassword = "not-the-password-Zq7"
    unknownUser = "no-such-user-7f3a"
    distinguishesUnknownUsers = True
    blockingLimit = 0.05
    answerTimeout = 30.0

    def checkerArgument(self) -> str:
        """
        The strcred argument for a live backend that knows L{validUser}.
        """
        raise NotImplementedError

    def unavailableArgument(self) -> str:
        """
        The strcred argument for a backend that is down (say, a port that
        refuses connections).
        """
        raise NotImplementedError

    def unavailableChecker(self) -> ICredentialsChecker:
        """
        A checker whose backend is down: by default, made from
        L{unavailableArgument}; override this instead when the backend can
        only fail after the checker is made.
        """
        return self.contractChecker(self.unavailableArgument())

    # -- helpers --------------------------------------------------------

    def contractFactory(self) -> Any:
        from twisted.cred.strcred import findCheckerFactory

        return findCheckerFactory(self.authType)

    def contractChecker(self, argument: str | None = None) -> ICredentialsChecker:
        """
        A checker made by the plugin, closed when the test ends.
        """
        factory = self.contractFactory()
        checker = factory.generateChecker(
            self.checkerArgument() if argument is None else argument
        )
        close = getattr(checker, "close", None)
        if callable(close):
            self.addCleanup(close)  # type: ignore[attr-defined]
        return checker

    def contractCredentials(self, username: str, password: str) -> ICredentials:
        from twisted.cred.credentials import UsernamePassword

        return UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))

    async def contractOutcome(
        self, checker: ICredentialsChecker, username: str, password: str
    ) -> Any:
        """
        The avatar id, or the exception, for one login; fails the test if
        the checker does not answer within L{answerTimeout}.
        """
        from twisted.internet import reactor
        from twisted.internet.defer import maybeDeferred

        d = maybeDeferred(
            checker.requestAvatarId, self.contractCredentials(username, password)
        )
        d.addTimeout(self.answerTimeout, reactor)
        try:
            return await d
        except Exception as e:
            return e

    # -- the contract -----------------------------------------------------

    def test_contractDiscoverable(self) -> None:
        """
        The plugin is found by its strcred name among the installed
        ICheckerFactory plugins, and provides the interfaces it declares.
        """
        from twisted.cred.strcred import ICheckerFactory
        from twisted.plugin import IPlugin, getPlugins
        from zope.interface.verify import verifyObject

        factory = self.contractFactory()
        self.assertEqual(factory.authType, self.authType)  # type: ignore[attr-defined]
        verifyObject(ICheckerFactory, factory)
        verifyObject(IPlugin, factory)
        self.assertIn(  # type: ignore[attr-defined]
            self.authType, [p.authType for p in getPlugins(ICheckerFactory)]
        )
        self.assertTrue(factory.authHelp.strip())  # type: ignore[attr-defined]

    def test_contractInterfaces(self) -> None:
        """
        The checker provides ICredentialsChecker, accepts user names and
        passwords, and declares no credentials interface its factory does
        not.
        """
        from zope.interface.verify import verifyObject

        checker = self.contractChecker()
        verifyObject(ICredentialsChecker, checker)
        self.assertIn(IUsernamePassword, checker.credentialInterfaces)  # type: ignore[attr-defined]
        self.assertLessEqual(  # type: ignore[attr-defined]
            set(checker.credentialInterfaces),
            set(self.contractFactory().credentialInterfaces),
        )

    async def test_contractGoodPassword(self) -> None:
        """
        The right password gives the user's name as the avatar id.
        """
        username, password = self.validUser
        result = await self.contractOutcome(self.contractChecker(), username, password)
        if isinstance(result, bytes):
            result = result.decode("utf-8")
        self.assertEqual(result, username)  # type: ignore[attr-defined]

    async def test_contractWrongPassword(self) -> None:
        """
        A wrong password for a known user is refused for good: an
        L{UnauthorizedLogin} that is not L{UnknownUser} (which would let
        the next checker speak for this user).
        """
        username, _ = self.validUser
        result = await self.contractOutcome(
            self.contractChecker(), username, self.wrongPassword
        )
        self.assertIsInstance(result, UnauthorizedLogin)  # type: ignore[attr-defined]
        self.assertNotIsInstance(result, UnknownUser)  # type: ignore[attr-defined]

    async def test_contractEmptyPassword(self) -> None:
        """
        An empty password never logs a known user in (an LDAP server takes
        an empty simple bind as an anonymous one).
        """
        username, _ = self.validUser
        result = await self.contractOutcome(self.contractChecker(), username, "")
        self.assertIsInstance(result, UnauthorizedLogin)  # type: ignore[attr-defined]
        self.assertNotIsInstance(result, UnknownUser)  # type: ignore[attr-defined]

    async def test_contractUnknownUser(self) -> None:
        """
        An unknown user is refused: with L{UnknownUser} where the backend
        can tell, so the next checker in the chain is asked.
        """
        result = await self.contractOutcome(
            self.contractChecker(), self.unknownUser, self.validUser[1]
        )
        expected = UnknownUser if self.distinguishesUnknownUsers else UnauthorizedLogin
        self.assertIsInstance(result, expected)  # type: ignore[attr-defined]

    async def test_contractUnavailable(self) -> None:
        """
        Through the chain, a dead backend gives L{CheckerUnavailable} (the
        client's 454 4.7.0), never a refusal that would count towards a
        lockout.
        """
        from twisted.internet import reactor

        from smtpauth_relay.auth import ChainChecker

        chain = ChainChecker(
            [self.unavailableChecker()],
            reactor,
            timeout=self.answerTimeout,
        )
        username, password = self.validUser
        result = await self.contractOutcome(chain, username, password)
        self.assertIsInstance(result, CheckerUnavailable)  # type: ignore[attr-defined]
        self.flushLoggedErrors()  # type: ignore[attr-defined]

    async def test_contractDoesNotBlock(self) -> None:
        """
        C{requestAvatarId} returns its Deferred at once (best of three),
        for the right and a wrong password: hashing and network waits happen
        off the reactor thread.
        """
        import time

        checker = self.contractChecker()
        username, password = self.validUser
        for attempt in (password, self.wrongPassword):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                d = checker.requestAvatarId(self.contractCredentials(username, attempt))
                times.append(time.perf_counter() - start)
                try:
                    await d
                except UnauthorizedLogin:
                    pass
            self.assertLess(min(times), self.blockingLimit)  # type: ignore[attr-defined]

    async def test_contractSession(self) -> None:
        """
        In a real SMTP session of the relay, the checker's answers become
        C{235 2.7.0} (right password), C{535 5.7.8} (wrong password) and
        C{454 4.7.0} (backend down).
        """
        username, password = self.validUser
        live = self.contractChecker()
        dead = self.unavailableChecker()
        self.assertEqual(  # type: ignore[attr-defined]
            await _contractSessionLogin(live, username, password, self.answerTimeout),
            b"235",
        )
        self.assertEqual(  # type: ignore[attr-defined]
            await _contractSessionLogin(
                live, username, self.wrongPassword, self.answerTimeout
            ),
            b"535",
        )
        self.assertEqual(  # type: ignore[attr-defined]
            await _contractSessionLogin(dead, username, password, self.answerTimeout),
            b"454",
        )
        self.flushLoggedErrors()  # type: ignore[attr-defined]


async def _contractSessionLogin(
    checker: ICredentialsChecker, username: str, password: str, timeout: float
) -> bytes:
    """
    Log in with AUTH PLAIN through a relay session over implicit TLS (in
    memory) whose only checker is C{checker}; return the reply code.
    """
    import base64

    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock, deferLater
    from twisted.python.failure import Failure

    from smtpauth_relay.auth import makePortal
    from smtpauth_relay.policy import RelayPolicy
    from smtpauth_relay.server import (
        ConnectionLimiter,
        RelayServerFactory,
        SessionSettings,
    )

    clock = Clock()
    factory = RelayServerFactory(
        SessionSettings(hostname="relay.example.test", tlsMode="implicit"),
        makePortal([checker], reactor),
        MemorySpool(),
        RelayPolicy(trustedNetworks=(), trustedRelays=()),
        ConnectionLimiter(10, 10),
        clock,
    )
    address = IPv4Address("TCP", "192.0.2.10", 40000)
    transport = TLSStringTransport(peerAddress=address)
    directlyProvides(transport, ISSLTransport)
    protocol = factory.buildProtocol(address)
    protocol.makeConnection(transport)
    protocol.handshakeCompleted()
    response = base64.b64encode(f"\0{username}\0{password}".encode())
    protocol.dataReceived(b"EHLO client.example.test\r\n")
    transport.clear()
    protocol.dataReceived(b"AUTH PLAIN " + response + b"\r\n")
    waited = 0.0
    try:
        while not transport.value().endswith(b"\r\n"):
            if waited > timeout:
                raise AssertionError(f"no answer to AUTH in {timeout}s")
            await deferLater(reactor, 0.01, lambda: None)
            waited += 0.01
        return transport.value()[:3]
    finally:
        protocol.connectionLost(Failure(ConnectionDone()))


class PipeTransport(StringTransport):
    """
    One end of an in-memory connection (L{connectPair}): what is written
    waits in the other end's inbox until L{Pump.flush}.  (Not delivered at
    once: AMP registers a question only after sending it.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.peer: PipeTransport | None = None
        self.protocol: Any = None
        self.inbox: list[bytes] = []
        self.lost = False

    def write(self, data: bytes) -> None:
        if self.lost:
            return
        assert self.peer is not None
        self.peer.inbox.append(data)

    def loseConnection(self) -> None:
        """
        Close both ends: each protocol's C{connectionLost} is called.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        for end in (self, self.peer):
            if end is not None and not end.lost:
                end.lost = True
                end.disconnecting = True
                end.inbox.clear()
                end.protocol.connectionLost(Failure(ConnectionDone()))

    abortConnection = loseConnection


class Pump:
    """
    Delivers what the two ends of a L{connectPair} wrote to each other.
    """

    def __init__(self, a: PipeTransport, b: PipeTransport) -> None:
        self.a = a
        self.b = b

    def flush(self) -> None:
        """
        Deliver until neither end has anything waiting.
        """
        while self.a.inbox or self.b.inbox:
            for end in (self.a, self.b):
                while end.inbox and not end.lost:
                    end.protocol.dataReceived(end.inbox.pop(0))


def connectPair(a: Any, b: Any) -> Pump:
    """
    Connect protocols C{a} and C{b} through in-memory transports.

    @return: the L{Pump} that delivers between them; its C{a} and C{b}
        are their transports.
    """
    ta, tb = PipeTransport(), PipeTransport()
    ta.peer, tb.peer = tb, ta
    ta.protocol, tb.protocol = a, b
    a.makeConnection(ta)
    b.makeConnection(tb)
    return Pump(ta, tb)
