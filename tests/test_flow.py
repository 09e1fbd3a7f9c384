"""
Tests for L{smtpauth_relay.flow}: in-flow control, in the runner and at
MAIL FROM.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.envelope import DeliveryReport
from smtpauth_relay.flow import InFlow
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.testing import MemorySpool, RecordingDeliveryAgent
from tests.support import Harness, Session
from tests.test_retry import queue


class InFlowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.flow = InFlow(self.clock, delay=1.0, limit=2)

    def test_belowLimit(self) -> None:
        """
        Below the limit a message is taken at once.
        """
        self.flow.committed()
        self.successResultOf(self.flow.admit())
        self.assertEqual(self.flow.waited, 0)

    def test_waitsForAnAttempt(self) -> None:
        """
        At the limit a session waits; each finished first attempt lets one
        waiting session go, in order.
        """
        self.flow.committed()
        self.flow.committed()
        first, second = self.flow.admit(), self.flow.admit()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.flow.attempted()
        self.successResultOf(first)
        self.assertNoResult(second)
        self.flow.attempted()
        self.successResultOf(second)
        self.assertEqual(self.flow.waited, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waitsAtMostTheDelay(self) -> None:
        """
        A session never waits longer than the delay (a brake, not a
        refusal), and the waits that ran out are not counted later.
        """
        self.flow.committed()
        self.flow.committed()
        waiting = self.flow.admit()
        self.clock.advance(0.999)
        self.assertNoResult(waiting)
        self.clock.advance(0.001)
        self.successResultOf(waiting)
        later = self.flow.admit()
        self.flow.attempted()
        self.successResultOf(later)

    def test_off(self) -> None:
        """
        A delay of 0 turns the control off.
        """
        self.flow.delay = 0
        for _ in range(5):
            self.flow.committed()
        self.successResultOf(self.flow.admit())

    def test_delayChangeTold(self) -> None:
        """
        A new delay (a reload) that turns the control on or off while the
        backlog is at the limit is told to the observers (the workers); a
        delay of 0 lets the waiting sessions go.
        """
        told: list[bool] = []
        self.flow.observers.append(told.append)
        self.flow.delay = 0
        self.flow.committed()
        self.flow.committed()
        self.assertEqual(told, [])
        self.flow.delay = 2.0
        self.assertEqual(told, [True])
        waiting = self.flow.admit()
        self.flow.delay = 1.0
        self.assertEqual(told, [True])
        self.assertNoResult(waiting)
        self.flow.delay = 0
        self.assertEqual(told, [True, False])
        self.successResultOf(waiting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopReleasesEveryone(self) -> None:
        """
        At shutdown every waiting session goes on.
        """
        self.flow.committed()
        self.flow.committed()
        waiting = [self.flow.admit() for _ in range(3)]
        self.flow.stop()
        for d in waiting:
            self.successResultOf(d)


class RunnerFlowTests(SynchronousTestCase):
    def test_backlogOfFirstAttempts(self) -> None:
        """
        The runner counts each new message until its first attempt ends,
        delivered or not; retries do not count.
        """
        clock = Clock()
        spool = MemorySpool()
        agent = RecordingDeliveryAgent()
        flow = InFlow(clock, delay=1.0, limit=10)
        runner = QueueRunner(spool, agent, clock, retrySchedule=(60,), flow=flow)
        runner.startService()
        queue(spool)
        queue(spool)
        self.assertEqual(flow.backlog, 2)
        clock.advance(0)
        agent.calls[0][2].callback(DeliveryReport(delivered=("bob@example.net",)))
        self.assertEqual(flow.backlog, 1)
        agent.calls[1][2].callback(
            DeliveryReport(deferred={"bob@example.net": "451 4.3.0 later"})
        )
        self.assertEqual(flow.backlog, 0)
        clock.advance(60)
        agent.calls[2][2].callback(DeliveryReport(delivered=("bob@example.net",)))
        self.assertEqual(flow.backlog, 0)


class MailFromFlowTests(SynchronousTestCase):
    def congested(self) -> tuple[Harness, InFlow, Session]:
        """
        A logged-in session on a relay whose backlog is at the limit.
        """
        harness = Harness(tlsMode="implicit")
        flow = InFlow(harness.clock, delay=1.0, limit=1)
        harness.factory.flow = flow
        flow.committed()
        session = harness.connect()
        session.login()
        return harness, flow, session

    def test_mailWaitsWhileDeliveriesLag(self) -> None:
        """
        While the backlog is at the limit, the reply to MAIL FROM (and the
        commands pipelined after it) wait until a first attempt finishes.
        """
        _, flow, session = self.congested()
        replies = session.send(
            b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
        )
        self.assertEqual(replies, [])
        flow.attempted()
        self.assertEqual([r[:3] for r in session.read()], [b"250", b"250"])
        self.assertEqual(flow.waited, 1)

    def test_mailAtMostTheDelay(self) -> None:
        """
        If no attempt finishes, MAIL FROM is answered after the delay.
        """
        harness, _, session = self.congested()
        self.assertEqual(session.command(b"MAIL FROM:<alice@example.org>"), [])
        harness.clock.advance(1.0)
        self.assertEqual([r[:3] for r in session.read()], [b"250"])
