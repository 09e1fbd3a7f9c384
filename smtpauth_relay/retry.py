"""
The queue runner: hands every spooled message to the delivery agent, retries
on failure, and removes a message from the spool only once every recipient
has been delivered.

At start it picks up whatever the spool holds (messages accepted before a
crash or C{kill -9}); afterwards the spool tells it of each new commit.
A failed attempt is recorded in the envelope and retried after the next
interval of C{retry_schedule} (the last interval repeats).  Recipients the
agent reports as permanently failed are kept and retried as well, with an
error in the log: no accepted recipient is dropped.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpauth_relay.envelope import Attempt, DeliveryReport
from smtpauth_relay.interfaces import IDeliveryAgent, ISpool
from smtpauth_relay.threads import RunInThread, runNow

log = Logger()

DEFAULT_RETRY_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0)


class QueueRunner(Service):
    """
    Delivers the spool's messages through one L{IDeliveryAgent}.
    """

    def __init__(
        self,
        spool: ISpool,
        agent: IDeliveryAgent,
        clock: Any,
        retrySchedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE,
        maxConcurrent: int = 20,
        runInThread: RunInThread = runNow,
    ) -> None:
        """
        @param runInThread: where to read envelopes from the spool (off the
            reactor thread in the service; at once in tests).
        """
        self.spool = spool
        self.agent = agent
        self.clock = clock
        self.retrySchedule = retrySchedule
        self._runInThread = runInThread
        self._semaphore = DeferredSemaphore(maxConcurrent)
        self._scheduled: dict[str, Any] = {}
        self._active: dict[str, Deferred[float | None]] = {}
        self._listening = False

    def startService(self) -> None:
        super().startService()
        if not self._listening:
            self.spool.addListener(self._committed)
            self._listening = True
        for queueId in self.spool.queued():
            self.schedule(queueId, 0)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in self._scheduled.values():
            if call.active():
                call.cancel()
        self._scheduled.clear()
        return DeferredList(list(self._active.values()), consumeErrors=True)

    def _committed(self, queueId: str) -> None:
        if self.running:
            self.schedule(queueId, 0)

    def schedule(self, queueId: str, delay: float) -> None:
        """
        Attempt delivery of C{queueId} in C{delay} seconds, unless an attempt
        is already scheduled or under way.
        """
        if queueId in self._scheduled or queueId in self._active:
            return
        self._scheduled[queueId] = self.clock.callLater(delay, self._start, queueId)

    def retryDelay(self, attempts: int) -> float:
        """
        Seconds to wait after the C{attempts}-th failed attempt.
        """
        index = min(max(attempts, 1), len(self.retrySchedule)) - 1
        return self.retrySchedule[index]

    def _start(self, queueId: str) -> None:
        del self._scheduled[queueId]
        d = self._semaphore.run(lambda: Deferred.fromCoroutine(self._attempt(queueId)))
        self._active[queueId] = d

        def finished(result: float | None | Failure) -> None:
            del self._active[queueId]
            if isinstance(result, Failure):
                log.failure(
                    "delivery of {queueId} failed unexpectedly", result, queueId=queueId
                )
                result = self.retrySchedule[-1]
            if result is not None and self.running:
                self.schedule(queueId, result)

        d.addBoth(finished)

    async def _attempt(self, queueId: str) -> float | None:
        """
        One delivery attempt.

        @return: seconds until the next attempt, or C{None} when there is
            nothing left to deliver.
        """
        try:
            envelope = await self._runInThread(self.spool.load, queueId)
        except KeyError:
            return None
        try:
            report = await self.agent.deliver(envelope, self.spool.messagePath(queueId))
        except Exception as e:
            report = DeliveryReport(
                deferred={r: f"{type(e).__name__}: {e}" for r in envelope.recipients}
            )
        # Only what the agent says it delivered is done: a recipient it does
        # not mention at all stays, and is retried.
        remaining = tuple(r for r in envelope.recipients if r not in report.delivered)
        unreported = [
            r for r in remaining if r not in report.deferred and r not in report.failed
        ]
        if unreported:
            log.error(
                "{queueId}: delivery report does not mention {recipients}; retrying",
                queueId=queueId,
                recipients=unreported,
            )
        for recipient in report.delivered:
            log.info(
                "{queueId} delivered to <{recipient}> via {host}",
                queueId=queueId,
                recipient=recipient,
                host=report.host,
            )
        if not remaining:
            await self.spool.remove(queueId)
            return None
        for recipient, reason in report.failed.items():
            log.error(
                "{queueId} to <{recipient}> failed permanently: {reason}; kept for retry",
                queueId=queueId,
                recipient=recipient,
                reason=reason,
            )
        reasons = {r: "not reported by the delivery agent" for r in unreported}
        reasons.update(report.deferred)
        reasons.update(report.failed)
        attempt = Attempt(
            time=self.clock.seconds(),
            host=report.host,
            reply="; ".join(sorted(set(reasons.values()))),
        )
        updated = envelope.withAttempt(attempt, remaining)
        await self.spool.saveEnvelope(updated)
        delay = self.retryDelay(len(updated.attempts))
        log.warn(
            "{queueId} deferred for {count} recipient(s): {reply}; retry in {delay}s",
            queueId=queueId,
            count=len(remaining),
            reply=attempt.reply,
            delay=delay,
        )
        return delay
