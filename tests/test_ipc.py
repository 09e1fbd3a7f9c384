"""
Tests for L{smtpauth_relay.ipc}: the channel between the main process and
its workers, and SMTP sessions of a worker whose lockout, limits and
connection counts are the main process's.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

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
from smtpauth_relay.ipc import (
    MAX_ENVELOPE,
    MainChannel,
    MetricsForwarder,
    RemoteAdmission,
    RemoteFlow,
    RemoteLockout,
    RemoteRateLimits,
    SessionCounts,
    WorkerChannel,
)
from smtpauth_relay.limits import RateLimits
from smtpauth_relay.lockout import Lock, Lockout
from smtpauth_relay.metrics import RelayMetrics
from smtpauth_relay.server import ConnectionLimiter
from smtpauth_relay.testing import connectPair
from tests import test_server
from tests.support import Harness, Session, plain


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"smtpauth_relay_{name}", labels)
    return value or 0.0


def result(d: Any) -> Any:
    """
    The result of a L{Deferred} that has fired (or a plain value).
    """
    if not isinstance(d, Deferred):
        return d
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.limiter = ConnectionLimiter(3, 2)
        self.lockout = Lockout(LockoutConfig(max_failures=3, tarpit=2), self.clock)
        self.limits = RateLimits(
            LimitsConfig(
                messages_per_hour=2, recipients_per_hour=3, connections_per_minute=4
            ),
            self.clock,
            self.lockout.store,
        )
        self.flow = InFlow(self.clock, 1.0, limit=2)
        self.metrics = RelayMetrics()
        self.committed: list[tuple[str, Envelope | None]] = []
        self.main = MainChannel(
            lambda queueId, envelope: self.committed.append((queueId, envelope)),
            self.limiter,
            self.lockout,
            self.limits,
            self.flow,
            self.metrics,
        )
        self.workerLost: list[object] = []
        self.worker = WorkerChannel(lost=self.workerLost.append)
        self.pump = connectPair(self.main, self.worker)
        self.mainTransport = self.pump.a

    def result(self, d: Any) -> Any:
        """
        Deliver what is waiting on the channel; then the result of C{d}.
        """
        self.pump.flush()
        return result(d)

    def test_interfaces(self) -> None:
        """
        The stand-ins provide the same interfaces as the main process's
        objects.
        """
        for local, remote, interface in [
            (
                self.lockout,
                RemoteLockout(self.worker, self.lockout.settings),
                ILoginGuard,
            ),
            (
                self.limits,
                RemoteRateLimits(self.worker, self.limits.settings),
                ISessionLimits,
            ),
            (self.flow, RemoteFlow(self.worker, 1.0), IFlowControl),
            (self.metrics, MetricsForwarder(self.worker, self.clock), ISessionMetrics),
        ]:
            self.assertTrue(verifyObject(interface, local))
            self.assertTrue(verifyObject(interface, remote))
        self.assertTrue(verifyObject(IAdmission, RemoteAdmission(self.worker)))

    def test_queued(self) -> None:
        """
        A worker's committed message reaches the main process with its
        envelope; one too large for the channel goes without (the main
        process reads it from disk).
        """
        envelope = Envelope(
            queueId="Q1", sender="a@example.org", recipients=("b@example.net",)
        )
        self.worker.queued("Q1", envelope)
        self.pump.flush()
        self.assertEqual(self.committed, [("Q1", envelope)])
        big = Envelope(
            queueId="Q2",
            sender="a@example.org",
            recipients=tuple(f"r{i}@example.net" for i in range(MAX_ENVELOPE // 10)),
        )
        self.worker.queued("Q2", big)
        self.pump.flush()
        self.assertEqual(self.committed[1], ("Q2", None))

    def test_queuedChannelGone(self) -> None:
        """
        With the main process gone, a committed message is logged (it stays
        in the spool), not an error for the session.
        """
        self.mainTransport.loseConnection()
        self.worker.queued("Q1", None)
        self.assertEqual(self.committed, [])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_lockoutShared(self) -> None:
        """
        Failures counted through the channel lock the main process's
        lockout: the worker is refused, and so is the main process.
        """
        remote = RemoteLockout(self.worker, self.lockout.settings)
        self.assertIsNone(self.result(remote.check("192.0.2.7", "alice")))
        delays = [self.result(remote.failed("192.0.2.7", "alice")) for _ in range(3)]
        self.assertEqual(delays, [0.25, 0.5, 1.0])
        lock = self.result(remote.check("192.0.2.7", "alice"))
        self.assertIsInstance(lock, Lock)
        self.assertEqual(lock.key, "ip:192.0.2.7")
        self.assertEqual(self.lockout.check("192.0.2.7", None), lock)

    def test_succeededRemembered(self) -> None:
        """
        A worker's successful login is remembered by the main process.
        """
        RemoteLockout(self.worker, self.lockout.settings).succeeded(
            "192.0.2.7", "alice"
        )
        self.pump.flush()
        self.assertEqual(
            self.lockout.store.lastSuccess("alice", "192.0.2.7"), self.clock.seconds()
        )

    def test_rateLimitsShared(self) -> None:
        """
        Messages a worker queued count towards the main process's limits.
        """
        remote = RemoteRateLimits(self.worker, self.limits.settings)
        self.assertTrue(self.result(remote.messageAllowed("alice")))
        remote.messageQueued("alice", 2)
        self.limits.messageQueued("alice", 1)
        self.assertFalse(self.result(remote.messageAllowed("alice")))
        self.assertFalse(self.result(remote.recipientAllowed("alice", 0)))
        self.assertTrue(self.result(remote.messageAllowed("bob")))
        self.assertTrue(self.result(remote.recipientAllowed("bob", 2)))
        self.assertFalse(self.result(remote.recipientAllowed("bob", 3)))

    def test_rateLimitsOff(self) -> None:
        """
        With no limit configured, nothing is asked: the answer is at once.
        """
        self.mainTransport.loseConnection()
        remote = RemoteRateLimits(self.worker, LimitsConfig(0, 0, 0, 0))
        self.assertIs(remote.messageAllowed("alice"), True)
        self.assertIs(remote.recipientAllowed("alice", 5), True)
        remote.messageQueued("alice", 1)

    def test_admissionCounts(self) -> None:
        """
        The main process counts a worker's connections with its own:
        max_connections_per_ip and max_connections hold across processes,
        and a disconnection gives the slot back.
        """
        admission = RemoteAdmission(self.worker)
        self.assertIsNone(self.result(admission.connect("192.0.2.1")))
        self.assertIsNone(self.result(admission.connect("192.0.2.1")))
        self.assertEqual(
            self.result(admission.connect("192.0.2.1")), replies.TOO_MANY_FROM_ADDRESS
        )
        self.assertEqual(self.limiter.total, 3)
        self.assertEqual(
            self.result(admission.connect("192.0.2.2")), replies.TOO_MANY_CONNECTIONS
        )
        for _ in range(3):
            admission.disconnect("192.0.2.1")
        admission.disconnect("192.0.2.2")
        self.pump.flush()
        self.assertEqual((self.limiter.total, dict(self.limiter.perAddress)), (0, {}))

    def test_admissionRate(self) -> None:
        """
        connections_per_minute counts a worker's connections.
        """
        admission = RemoteAdmission(self.worker)
        answers = []
        for _ in range(5):
            answers.append(self.result(admission.connect("192.0.2.1")))
            admission.disconnect("192.0.2.1")
        self.assertEqual(answers[:4], [None] * 4)
        self.assertEqual(answers[4], replies.TOO_MANY_CONNECTIONS_RATE)

    def test_disconnectUnknown(self) -> None:
        """
        A disconnection the main process did not count changes nothing.
        """
        self.limiter.countOpen("192.0.2.9")
        RemoteAdmission(self.worker).disconnect("192.0.2.9")
        self.pump.flush()
        self.assertEqual(self.limiter.total, 1)

    def test_lostChannelReleases(self) -> None:
        """
        A worker that dies gives back its connections' slots and their
        place in the open-connections gauge.
        """
        admission = RemoteAdmission(self.worker)
        forwarder = MetricsForwarder(self.worker, self.clock)
        admission.connect("192.0.2.1")
        admission.connect("192.0.2.2")
        forwarder.connectionOpened("tcp:587", "starttls")
        forwarder.connectionOpened("tcp:587", "starttls")
        forwarder.flush()
        self.pump.flush()
        self.assertEqual(
            sample(self.metrics, "connections_open", listener="tcp:587"), 2
        )
        self.mainTransport.loseConnection()
        self.assertEqual(self.limiter.total, 0)
        self.assertEqual(
            sample(self.metrics, "connections_open", listener="tcp:587"), 0
        )
        self.assertNotIn(self.main.flowChanged, self.flow.observers)
        self.assertEqual(len(self.workerLost), 1)

    def test_flow(self) -> None:
        """
        Workers are told when deliveries lag behind; a new message then
        waits for the main process's word, which comes when an attempt
        finishes.
        """
        remote = RemoteFlow(self.worker, 1.0)
        self.assertIsNone(remote.admit())
        self.flow.committed()
        self.flow.committed()
        self.pump.flush()
        self.assertTrue(self.worker.congested)
        waiting = remote.admit()
        assert waiting is not None
        self.assertNoResult(waiting)
        self.flow.attempted()
        self.pump.flush()
        self.successResultOf(waiting)
        self.assertFalse(self.worker.congested)
        self.assertIsNone(remote.admit())

    def test_flowTimesOut(self) -> None:
        """
        A waiting message goes on after the main process's flow_delay.
        """
        remote = RemoteFlow(self.worker, 1.0)
        for _ in range(2):
            self.flow.committed()
        self.pump.flush()
        waiting = remote.admit()
        assert waiting is not None
        self.pump.flush()
        self.assertNoResult(waiting)
        self.clock.advance(1.0)
        self.pump.flush()
        self.successResultOf(waiting)

    def test_flowOff(self) -> None:
        """
        flow_delay = 0 in the worker: never waits.
        """
        for _ in range(2):
            self.flow.committed()
        self.pump.flush()
        self.assertIsNone(RemoteFlow(self.worker, 0).admit())

    def test_flowStateOnConnect(self) -> None:
        """
        A worker connecting while deliveries lag behind is told at once.
        """
        for _ in range(2):
            self.flow.committed()
        worker = WorkerChannel()
        connectPair(
            MainChannel(lambda q, e: None, self.limiter, None, None, self.flow), worker
        ).flush()
        self.assertTrue(worker.congested)

    def test_flowAnswerLost(self) -> None:
        """
        A waiting message goes on if the main process goes away.
        """
        for _ in range(2):
            self.flow.committed()
        self.pump.flush()
        waiting = RemoteFlow(self.worker, 1.0).admit()
        assert waiting is not None
        self.mainTransport.loseConnection()
        self.successResultOf(waiting)

    def test_metricsForwarded(self) -> None:
        """
        A worker's session counts reach the main process's metrics within
        a second, or at once in a full batch.
        """
        forwarder = MetricsForwarder(self.worker, self.clock)
        forwarder.connectionOpened("tcp:587", "starttls")
        forwarder.authAttempt("PLAIN", "success")
        forwarder.messageAccepted(2048)
        forwarder.messageRejected("rate_limited")
        forwarder.connectionRefused("too_many_connections")
        forwarder.connectionClosed("tcp:587")
        self.pump.flush()
        self.assertEqual(sample(self.metrics, "messages_accepted_total"), 0)
        self.clock.advance(1)
        self.pump.flush()
        self.assertEqual(sample(self.metrics, "messages_accepted_total"), 1)
        self.assertEqual(sample(self.metrics, "message_bytes_total"), 2048)
        self.assertEqual(
            sample(
                self.metrics, "auth_attempts_total", mechanism="PLAIN", result="success"
            ),
            1,
        )
        self.assertEqual(
            sample(
                self.metrics, "connections_total", listener="tcp:587", tls="starttls"
            ),
            1,
        )
        for _ in range(forwarder.batch):
            forwarder.messageAccepted(1)
        self.pump.flush()
        self.assertEqual(
            sample(self.metrics, "messages_accepted_total"), 1 + forwarder.batch
        )

    def test_metricsUnknownIgnored(self) -> None:
        """
        Events that are not session counts, or malformed ones, are ignored.
        """
        events = [
            ["deliveryAttempt", ["delivered", "x", 1]],
            ["messageAccepted", "not a list"],
            ["messageAccepted", [1, 2, 3]],
            ["messageAccepted", [10]],
        ]
        self.worker.callRemote(SessionCounts, events=json.dumps(events).encode())
        self.worker.callRemote(SessionCounts, events=b"{not json")
        self.pump.flush()
        self.assertEqual(sample(self.metrics, "messages_accepted_total"), 1)
        self.assertEqual(sample(self.metrics, "delivery_attempts_total"), 0)


class WorkerHarness(Harness):
    """
    A harness whose sessions run as in a worker process: their lockout,
    rate limits and connection counts are a main process's, reached over an
    in-memory channel.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        factory = self.factory
        self.mainLockout = factory.lockout
        self.mainLimits = factory.limits
        self.mainLimiter = self.limiter
        self.mainMetrics = RelayMetrics()
        self.main = MainChannel(
            lambda queueId, envelope: None,
            self.mainLimiter,
            self.mainLockout,  # type: ignore[arg-type]
            self.mainLimits,  # type: ignore[arg-type]
            None,
            metrics=self.mainMetrics,
        )
        self.channel = WorkerChannel()
        self.pump = connectPair(self.main, self.channel)
        if self.mainLockout is not None:
            factory.lockout = RemoteLockout(self.channel, self.mainLockout.settings)
        if self.mainLimits is not None:
            factory.limits = RemoteRateLimits(self.channel, self.mainLimits.settings)
        factory.admission = RemoteAdmission(self.channel)
        factory.limiter = self.limiter = ConnectionLimiter(sys.maxsize, sys.maxsize)

    def settle(self) -> None:
        self.pump.flush()


class WorkerConnectionTests(test_server.ConnectionTests):
    """
    L{test_server.ConnectionTests} in a worker process.
    """

    harnessClass = WorkerHarness


class WorkerLockoutTests(test_server.LockoutTests):
    """
    L{test_server.LockoutTests} in a worker process.
    """

    harnessClass = WorkerHarness


class WorkerRateLimitTests(test_server.RateLimitTests):
    """
    L{test_server.RateLimitTests} in a worker process.
    """

    harnessClass = WorkerHarness


class PendingAnswerTests(SynchronousTestCase):
    """
    A worker's session while the main process has not answered yet: it
    reads no further command, and goes on once the answer comes.
    """

    def setUp(self) -> None:
        self.harness = Harness(
            lockout=LockoutConfig(), limits=LimitsConfig(messages_per_session=0)
        )
        self.answers: list[tuple[str, Deferred[Any]]] = []
        harness = self
        factory = self.harness.factory

        class Asking:
            settings = LimitsConfig(messages_per_session=0)

            def __getattr__(self, name: str) -> Any:
                def ask(*args: Any) -> Deferred[Any]:
                    d: Deferred[Any] = Deferred()
                    harness.answers.append((name, d))
                    return d

                return ask

        factory.lockout = factory.limits = factory.admission = Asking()  # type: ignore[assignment]

    def answer(self, name: str, value: Any) -> None:
        asked, d = self.answers.pop(0)
        self.assertEqual(asked, name)
        d.callback(value)

    def test_greetingWaits(self) -> None:
        """
        The greeting waits for the main process's count; early commands
        are held and answered after it.
        """
        session = self.harness.connect()
        self.assertEqual(session.greeting, [])
        self.assertEqual(session.send(b"NOOP\r\n"), [])
        self.answer("connect", None)
        self.assertEqual(
            session.read(),
            [b"220 relay.example.org ESMTP smtpauth-relay", b"250 2.0.0 Ok"],
        )

    def test_refusedByMain(self) -> None:
        """
        A refusal from the main process is given and the session closed;
        its slot is given back.
        """
        session = self.harness.connect()
        self.answer("connect", replies.TOO_MANY_FROM_ADDRESS)
        self.assertEqual(
            session.read(), [b"421 4.7.0 Too many connections from your address"]
        )
        session.protocol.connectionLost()
        self.assertEqual(self.answers[0][0], "disconnect")

    def test_mainGone(self) -> None:
        """
        No answer from the main process (the channel failed): 421 4.3.2.
        """
        session = self.harness.connect()
        asked, d = self.answers.pop(0)
        d.errback(RuntimeError("channel lost"))
        self.assertEqual(session.read(), [b"421 4.3.2 Service shutting down"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_lostWhileAsking(self) -> None:
        """
        A client gone before the answer: nothing is sent.
        """
        session = self.harness.connect()
        session.protocol.connectionLost()
        self.answer("connect", None)
        self.assertEqual(session.read(), [])

    def test_authWaits(self) -> None:
        """
        AUTH waits for the lockout check, then for the failure count.
        """
        session = self.authenticating()
        self.answer("check", None)
        self.assertEqual(session.read(), [])
        self.answer("failed", 0.0)
        self.assertEqual(
            session.read(), [b"535 5.7.8 Authentication credentials invalid"]
        )
        session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        self.answer("check", Lock("ip:192.0.2.10", 0))
        self.assertEqual(
            session.read(),
            [b"454 4.7.0 Too many failed logins; try again later"],
        )

    def authenticating(self) -> Session:
        """
        A session past EHLO over TLS, its AUTH PLAIN for alice sent (with
        the wrong password) and waiting for the lockout check.
        """
        session = self.harness.connect()
        self.answer("connect", None)
        session.read()
        session.startTLS()
        session.command(b"EHLO client.example")
        self.assertEqual(session.command(b"AUTH PLAIN " + plain("alice", "x")), [])
        return session

    def failAnswer(self, session: Session, name: str, reply: bytes) -> None:
        """
        Fail the question C{name} as a lost channel would: C{session} gets
        C{reply}, the failure is logged once, and the session goes on.
        """
        asked, d = self.answers.pop(0)
        self.assertEqual(asked, name)
        d.errback(ConnectionLost("channel lost"))
        self.assertEqual(session.read(), [reply])
        self.assertEqual(len(self.flushLoggedErrors(ConnectionLost)), 1)
        self.assertEqual(session.last(b"NOOP"), b"250 2.0.0 Ok")

    def test_lockCheckFailed(self) -> None:
        """
        No answer to the lockout check (the channel failed): 454 4.7.0, the
        password not checked; the session goes on.
        """
        session = self.authenticating()
        asked = len(self.harness.checker.asked)
        self.failAnswer(session, "check", b"454 4.7.0 Temporary authentication failure")
        self.assertEqual(len(self.harness.checker.asked), asked)

    def test_failureCountFailed(self) -> None:
        """
        No answer to the failure count: the failed login is logged as not
        counted and answered 535 at once.
        """
        session = self.authenticating()
        self.answer("check", None)
        self.failAnswer(
            session, "failed", b"535 5.7.8 Authentication credentials invalid"
        )

    def test_mailAndRcptWait(self) -> None:
        """
        MAIL and RCPT wait for the rate limits; pipelined commands behind
        them are held in order.
        """
        session = self.harness.connect()
        self.answer("connect", None)
        session.read()
        session.startTLS()
        session.command(b"EHLO client.example")
        session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        self.answer("check", None)
        self.assertEqual(session.read()[0][:4], b"235 ")
        self.answer("succeeded", None)
        self.assertEqual(
            session.send(
                b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                b"RCPT TO:<c@example.net>\r\n"
            ),
            [],
        )
        self.answer("messageAllowed", True)
        self.assertEqual(session.read(), [b"250 2.1.0 Sender ok"])
        self.answer("recipientAllowed", True)
        self.assertEqual(session.read(), [b"250 2.1.5 Recipient ok"])
        self.answer("recipientAllowed", False)
        self.assertEqual(
            session.read(),
            [b"451 4.7.1 Hourly recipient limit reached; try again later"],
        )
