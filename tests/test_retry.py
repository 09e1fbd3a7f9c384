"""
Tests for L{smtpauth_relay.retry.QueueRunner}, with a memory spool, a
recording delivery agent and a clock.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay import retry as retryModule
from smtpauth_relay.envelope import DeliveryReport, Envelope
from smtpauth_relay.errors import QueueBusy, SpoolError
from smtpauth_relay.interfaces import IDeliveryAgent, IQueueControl
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.spool import Spool
from smtpauth_relay.testing import MemorySpool, RecordingDeliveryAgent, runNow


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


class DiskQueueTestCase(SynchronousTestCase):
    """
    The runner over a real spool (bounces read the original message).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.spool = Spool(self.mktemp(), runNow, self.clock)
        self.spool.prepare()
        self.agent = RecordingDeliveryAgent()
        self.runner = QueueRunner(
            self.spool,
            self.agent,
            self.clock,
            retrySchedule=(60, 300),
            maxLifetime=3600,
            hostname="relay.example.org",
        )
        self.runner.startService()

    def queue(self, *recipients: str, sender: str = "alice@example.org") -> str:
        writer = self.spool.newMessage()
        writer.write(b"Subject: quarterly report\n\nhello\n")
        envelope = Envelope(
            queueId=writer.queueId,
            sender=sender,
            recipients=recipients or ("bob@example.net",),
            receivedAt=self.clock.seconds(),
        )
        return self.successResultOf(writer.commit(envelope))

    def bounces(self) -> list[tuple[Envelope, email.message.EmailMessage]]:
        result = []
        for queueId in self.spool.queued():
            envelope = self.spool.load(queueId)
            if envelope.sender == "":
                with open(self.spool.messagePath(queueId), "rb") as f:
                    message = email.message_from_bytes(
                        f.read(), policy=email.policy.default
                    )
                result.append((envelope, message))
        return result  # type: ignore[return-value]

    def answer(self, index: int, report: DeliveryReport) -> None:
        self.clock.advance(0)
        self.agent.calls[index][2].callback(report)


class EnvelopeReadingTests(DiskQueueTestCase):
    def test_firstAttemptFromMemory(self) -> None:
        """
        The first attempt takes the envelope just committed from memory; a
        retry reads it from the spool, with its attempts.
        """
        loads: list[str] = []
        realLoad = self.spool.load

        def spyLoad(queueId: str) -> Envelope:
            loads.append(queueId)
            return realLoad(queueId)

        self.patch(self.spool, "load", spyLoad)
        queueId = self.queue()
        self.answer(0, DeliveryReport(deferred={"bob@example.net": "451 later"}))
        self.assertEqual(loads, [])
        self.clock.advance(60)
        self.assertEqual(loads, [queueId])
        self.assertEqual(len(self.agent.calls[1][0].attempts), 1)


class BounceTests(DiskQueueTestCase):
    def test_permanentFailureBounced(self) -> None:
        """
        A recipient refused permanently gets a DSN to the sender, sent with
        a null sender; the delivered recipient does not, and the message
        leaves the queue.
        """
        queueId = self.queue("ok@example.net", "gone@example.net")
        self.answer(
            0,
            DeliveryReport(
                delivered=("ok@example.net",),
                failed={"gone@example.net": "550 5.1.1 No such user"},
                host="mx.example.net",
            ),
        )
        self.assertNotIn(queueId, self.spool.queued())
        ((envelope, message),) = self.bounces()
        self.assertEqual(envelope.recipients, ("alice@example.org",))
        self.assertEqual(envelope.auth, "<>")
        self.assertEqual(message.get_content_type(), "multipart/report")
        status = message.get_payload()[1].as_string()
        self.assertIn("Final-Recipient: rfc822; gone@example.net", status)
        self.assertIn("Status: 5.1.1", status)
        self.assertIn("Remote-MTA: dns; mx.example.net", status)
        self.assertNotIn("ok@example.net", status)
        self.assertIn("Subject: quarterly report", message.get_payload()[2].as_string())

    def test_bounceDelivered(self) -> None:
        """
        The bounce is queued like any message and handed to the agent.
        """
        self.queue("gone@example.net")
        self.answer(0, DeliveryReport(failed={"gone@example.net": "550 5.1.1 No"}))
        self.clock.advance(0)
        self.assertEqual(self.agent.calls[1][0].sender, "")
        self.assertEqual(self.agent.calls[1][0].recipients, ("alice@example.org",))

    def test_noBounceForNullSender(self) -> None:
        """
        A failed bounce is dropped, never bounced (no loops).
        """
        queueId = self.queue("alice@example.org", sender="")
        self.answer(0, DeliveryReport(failed={"alice@example.org": "550 5.1.1 No"}))
        self.assertEqual(self.spool.queued(), [])
        self.assertNotIn(queueId, self.spool.queued())

    def test_expiry(self) -> None:
        """
        A message still deferred after max_lifetime is bounced as expired
        (Status 4.4.7 unless the last reply says better) and leaves the
        queue.
        """
        queueId = self.queue("slow@example.net")
        self.answer(
            0, DeliveryReport(deferred={"slow@example.net": "connection refused"})
        )
        self.assertIn(queueId, self.spool.queued())
        self.clock.advance(3600)
        self.agent.calls[1][2].callback(
            DeliveryReport(deferred={"slow@example.net": "connection refused"})
        )
        self.assertNotIn(queueId, self.spool.queued())
        ((_, message),) = self.bounces()
        status = message.get_payload()[1].as_string()
        self.assertIn("Action: failed", status)
        self.assertIn("Status: 4.4.7", status)

    def test_delayWarning(self) -> None:
        """
        With delay_warning set, the sender is told once that the message is
        still being retried; the message stays queued.
        """
        self.runner.delayWarning = 60
        queueId = self.queue("slow@example.net")
        self.answer(0, DeliveryReport(deferred={"slow@example.net": "451 4.4.1 later"}))
        self.assertEqual(self.bounces(), [])
        self.clock.advance(60)
        self.agent.calls[1][2].callback(
            DeliveryReport(deferred={"slow@example.net": "451 4.4.1 later"})
        )
        ((_, warning),) = self.bounces()
        self.assertIn("Action: delayed", warning.get_payload()[1].as_string())
        self.assertTrue(self.spool.load(queueId).delayWarned)
        self.clock.advance(300)
        calls = len(self.agent.calls)
        self.agent.calls[calls - 1][2].callback(
            DeliveryReport(deferred={"slow@example.net": "451 4.4.1 later"})
        )
        self.assertEqual(len(self.bounces()), 1)


class ScheduleTests(DiskQueueTestCase):
    def test_nextAttemptPersisted(self) -> None:
        """
        The time of the next attempt is saved in the envelope, and a
        restarted runner waits for it instead of retrying at once.
        """
        queueId = self.queue()
        self.answer(0, DeliveryReport(deferred={"bob@example.net": "451 later"}))
        self.assertEqual(
            self.spool.load(queueId).nextAttempt, self.clock.seconds() + 60
        )
        self.successResultOf(self.runner.stopService())
        runner = QueueRunner(self.spool, self.agent, self.clock, retrySchedule=(60,))
        self.clock.advance(30)
        runner.startService()
        self.clock.advance(29)
        self.assertEqual(len(self.agent.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.agent.calls), 2)


class ControlTests(DiskQueueTestCase):
    def test_interface(self) -> None:
        """
        The runner is the relay's L{IQueueControl}.
        """
        self.assertTrue(verifyObject(IQueueControl, self.runner))

    def test_flush(self) -> None:
        """
        Flush attempts every waiting message now.
        """
        self.queue()
        self.answer(0, DeliveryReport(deferred={"bob@example.net": "451 later"}))
        self.assertEqual(self.runner.flush(), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.agent.calls), 2)

    def test_delete(self) -> None:
        """
        Delete removes a waiting message without a bounce; an unknown id
        fails with L{KeyError}; a message under delivery with
        L{QueueBusy}.
        """
        first = self.queue()
        self.answer(0, DeliveryReport(deferred={"bob@example.net": "451 later"}))
        busy = self.queue()
        self.clock.advance(0)
        self.failureResultOf(self.runner.delete(busy), QueueBusy)
        self.successResultOf(self.runner.delete(first))
        self.assertEqual(self.spool.queued(), [busy])
        self.failureResultOf(self.runner.delete(first), KeyError)
        self.assertEqual(self.bounces(), [])

    def test_bounce(self) -> None:
        """
        Bounce gives up on a message: its sender gets a DSN naming the last
        error, and it leaves the queue.
        """
        queueId = self.queue()
        self.answer(
            0, DeliveryReport(deferred={"bob@example.net": "451 4.7.1 greylisted"})
        )
        self.successResultOf(self.runner.bounce(queueId))
        self.assertNotIn(queueId, self.spool.queued())
        ((_, message),) = self.bounces()
        status = message.get_payload()[1].as_string()
        self.assertIn("Final-Recipient: rfc822; bob@example.net", status)
        self.assertIn("greylisted", message.get_payload()[0].get_content())


class RobustnessTests(DiskQueueTestCase):
    def test_noRedeliveryWhenBounceFails(self) -> None:
        """
        If queueing a bounce fails after some recipients were delivered, the
        next attempt does not deliver to them again.
        """

        async def brokenBounce(*args: object, **kwargs: object) -> None:
            raise SpoolError("No space left on device", insufficientStorage=True)

        queueId = self.queue("ok@example.net", "gone@example.net", "later@example.net")
        self.patch(retryModule, "queueBounce", brokenBounce)
        self.answer(
            0,
            DeliveryReport(
                delivered=("ok@example.net",),
                failed={"gone@example.net": "550 5.1.1 No such user"},
                deferred={"later@example.net": "451 4.2.0 later"},
            ),
        )
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 1)
        self.assertIn(queueId, self.spool.queued())
        self.clock.advance(3600)
        self.assertEqual(
            self.agent.calls[1][0].recipients, ("gone@example.net", "later@example.net")
        )

    def test_corruptEnvelopeQuarantined(self) -> None:
        """
        An envelope that cannot be read is moved to corrupt/ instead of
        being retried for ever.
        """
        queueId = self.queue()
        self.successResultOf(self.runner.stopService())
        # As after a restart: the envelope just committed is not in memory.
        self.spool.recent(queueId)
        with open(self.spool._envelopePath(queueId), "w") as f:
            f.write("{ not json")
        runner = QueueRunner(self.spool, self.agent, self.clock)
        runner.startService()
        self.clock.advance(0)
        self.assertEqual(self.spool.queued(), [])
        self.assertIn(
            queueId + ".env", os.listdir(os.path.join(self.spool.directory, "corrupt"))
        )
        self.assertEqual(len(self.agent.calls), 0)

    def test_noNewDeliveriesWhenStopping(self) -> None:
        """
        Stopping lets the deliveries under way finish but starts none of
        those still waiting for a slot (they stay queued for the next
        start).
        """
        self.successResultOf(self.runner.stopService())
        runner = QueueRunner(self.spool, self.agent, self.clock, maxConcurrent=1)
        for _ in range(3):
            self.queue()
        runner.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.agent.calls), 1)
        stopped = runner.stopService()
        self.agent.calls[0][2].callback(DeliveryReport(delivered=("bob@example.net",)))
        self.successResultOf(stopped)
        self.assertEqual(len(self.agent.calls), 1)
        self.assertEqual(len(self.spool.queued()), 2)
        self.assertEqual(runner.flush(), 0)

    def test_adminHoldsMessage(self) -> None:
        """
        While an admin command works on a message, no attempt starts on it,
        and a second command gets L{QueueBusy}.
        """
        queueId = self.queue()
        self.answer(0, DeliveryReport(deferred={"bob@example.net": "451 later"}))
        gate: Deferred[None] = Deferred()
        self.patch(self.spool, "remove", lambda queueId: gate)
        deleting = self.runner.delete(queueId)
        self.failureResultOf(self.runner.bounce(queueId), QueueBusy)
        self.assertEqual(self.runner.flush(), 0)
        self.clock.advance(3600)
        self.assertEqual(len(self.agent.calls), 1)
        gate.callback(None)
        self.successResultOf(deleting)
