"""
Tests for L{smtpauth_relay.retry.QueueRunner}, with a memory spool, a
recording delivery agent and a clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.envelope import DeliveryReport, Envelope
from smtpauth_relay.interfaces import IDeliveryAgent
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.testing import MemorySpool, RecordingDeliveryAgent


def queue(spool: MemorySpool, *recipients: str) -> str:
    writer = spool.newMessage()
    writer.write(b"Subject: x\n\nhi\n")
    envelope = Envelope(
        queueId=writer.queueId,
        sender="alice@example.org",
        recipients=recipients or ("bob@example.net",),
    )
    d = writer.commit(envelope)
    return writer.queueId if d.called else ""


class QueueRunnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = MemorySpool()
        self.agent = RecordingDeliveryAgent()
        self.runner = QueueRunner(
            self.spool, self.agent, self.clock, retrySchedule=(60, 300), maxConcurrent=2
        )

    def test_agentInterface(self) -> None:
        """
        The recording agent is an L{IDeliveryAgent}, like the real ones.
        """
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent))

    def test_startupScan(self) -> None:
        """
        Messages already in the spool at start (left by a crash) are
        delivered at once.
        """
        queueId = queue(self.spool)
        self.runner.startService()
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.agent.calls], [queueId])
        self.assertEqual(self.agent.calls[0][1], "memory:" + queueId)

    def test_newMessage(self) -> None:
        """
        A message committed while running is delivered at once.
        """
        self.runner.startService()
        queueId = queue(self.spool)
        self.clock.advance(0)
        self.assertEqual([c[0].queueId for c in self.agent.calls], [queueId])

    def test_deliveredRemoved(self) -> None:
        """
        Once every recipient is delivered the message leaves the spool, and
        not before.
        """
        self.runner.startService()
        queueId = queue(self.spool, "a@example.net", "b@example.net")
        self.clock.advance(0)
        self.assertIn(queueId, self.spool.messages)
        self.agent.calls[0][2].callback(
            DeliveryReport(delivered=("a@example.net", "b@example.net"), host="h")
        )
        self.assertEqual(self.spool.messages, {})

    def test_failureRetried(self) -> None:
        """
        A failed attempt is recorded in the envelope and retried after the
        schedule's intervals, the last one repeating.
        """
        self.runner.startService()
        queueId = queue(self.spool)
        self.clock.advance(0)
        self.agent.calls[0][2].errback(ConnectionRefusedError("refused"))
        envelope = self.spool.load(queueId)
        self.assertEqual(len(envelope.attempts), 1)
        self.assertIn("refused", envelope.attempts[0].reply)
        self.clock.advance(59)
        self.assertEqual(len(self.agent.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.agent.calls), 2)
        self.agent.calls[1][2].errback(ConnectionRefusedError("refused"))
        self.clock.advance(299)
        self.assertEqual(len(self.agent.calls), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.agent.calls), 3)
        self.agent.calls[2][2].errback(ConnectionRefusedError("refused"))
        self.clock.advance(300)
        self.assertEqual(len(self.agent.calls), 4)
        self.assertIn(queueId, self.spool.messages)

    def test_partialDelivery(self) -> None:
        """
        Only the recipients that were not delivered are tried again.
        """
        self.runner.startService()
        queueId = queue(self.spool, "a@example.net", "b@example.net")
        self.clock.advance(0)
        self.agent.calls[0][2].callback(
            DeliveryReport(
                delivered=("a@example.net",),
                deferred={"b@example.net": "451 4.2.0 greylisted"},
                host="mx.example.net",
            )
        )
        envelope = self.spool.load(queueId)
        self.assertEqual(envelope.recipients, ("b@example.net",))
        self.assertEqual(envelope.attempts[0].host, "mx.example.net")
        self.assertEqual(envelope.attempts[0].reply, "451 4.2.0 greylisted")
        self.clock.advance(60)
        self.assertEqual(self.agent.calls[1][0].recipients, ("b@example.net",))

    def test_unreportedRecipientKept(self) -> None:
        """
        A recipient the agent's report does not mention (say, with its case
        changed) is not taken as delivered: it stays and is retried.
        """
        self.runner.startService()
        queueId = queue(self.spool, "Bob@Example.COM", "carol@example.net")
        self.clock.advance(0)
        self.agent.calls[0][2].callback(
            DeliveryReport(delivered=("bob@example.com", "carol@example.net"))
        )
        self.assertEqual(self.spool.load(queueId).recipients, ("Bob@Example.COM",))

    def test_permanentFailureKept(self) -> None:
        """
        A recipient reported as permanently failed is not dropped: it stays
        in the spool and an error is logged.
        """
        self.runner.startService()
        queueId = queue(self.spool)
        self.clock.advance(0)
        self.agent.calls[0][2].callback(
            DeliveryReport(failed={"bob@example.net": "550 5.1.1 no such user"})
        )
        self.assertEqual(self.spool.load(queueId).recipients, ("bob@example.net",))

    def test_noDuplicateAttempts(self) -> None:
        """
        A message under delivery is not handed to the agent a second time.
        """
        queueId = queue(self.spool)
        self.runner.startService()
        self.runner.schedule(queueId, 0)
        self.clock.advance(0)
        self.runner.schedule(queueId, 0)
        self.clock.advance(0)
        self.assertEqual(len(self.agent.calls), 1)

    def test_concurrencyLimit(self) -> None:
        """
        No more than C{maxConcurrent} deliveries run at once; the next starts
        when one ends.
        """
        for _ in range(3):
            queue(self.spool)
        self.runner.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.agent.calls), 2)
        self.agent.calls[0][2].callback(DeliveryReport(delivered=("bob@example.net",)))
        self.assertEqual(len(self.agent.calls), 3)

    def test_stopWaitsForActive(self) -> None:
        """
        Stopping cancels scheduled retries and waits for deliveries under
        way.
        """
        queueId = queue(self.spool)
        self.runner.startService()
        self.clock.advance(0)
        stopped = self.runner.stopService()
        self.assertNoResult(stopped)
        self.agent.calls[0][2].callback(DeliveryReport(delivered=("bob@example.net",)))
        self.successResultOf(stopped)
        self.assertNotIn(queueId, self.spool.messages)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_vanishedMessage(self) -> None:
        """
        A message removed from the spool meanwhile (by an admin) is skipped.
        """
        queueId = queue(self.spool)
        self.runner.startService()
        del self.spool.messages[queueId]
        self.clock.advance(0)
        self.assertEqual(self.agent.calls, [])
