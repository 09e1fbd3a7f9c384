"""
The queue runner: hands every spooled message to the delivery agent,
retries what failed temporarily, bounces what failed for good, and removes a
message from the spool only once every recipient is dealt with.

  - At start it picks up whatever the spool holds (messages accepted before
    a crash or C{kill -9}), each at the time its envelope says; afterwards
    the spool tells it of each new commit.
  - Each attempt is recorded in the envelope (time, host, reply).  A
    recipient refused temporarily (4xx, or a connection problem) is retried
    after the next interval of C{retry_schedule} (the last one repeats).
  - A recipient refused permanently (5xx), and every recipient still not
    delivered after C{max_lifetime}, gets an RFC 3464 bounce to the
    envelope sender (never for a null sender), queued durably before the
    recipient leaves the envelope.
  - Optionally, after C{delay_warning} the sender is told once that the
    message is still being retried.
  - Recipients the agent does not mention at all are retried, not dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    fail,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpauth_relay.bounce import RecipientFailure, makeBounce, shouldBounce
from smtpauth_relay.envelope import NULL_AUTH, Attempt, DeliveryReport, Envelope
from smtpauth_relay.errors import QueueBusy
from smtpauth_relay.flow import InFlow
from smtpauth_relay.interfaces import IDeliveryAgent, IQueueControl, ISpool
from smtpauth_relay.metrics import RelayMetrics
from smtpauth_relay.threads import RunInThread, runNow

log = Logger()

DEFAULT_RETRY_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0)
DEFAULT_MAX_LIFETIME = 5 * 24 * 3600.0


async def queueBounce(
    spool: ISpool,
    envelope: Envelope,
    failures: Sequence[RecipientFailure],
    reportingHost: str,
    now: float,
    runInThread: RunInThread,
    expired: bool = False,
) -> str | None:
    """
    Queue a bounce of C{failures} to C{envelope}'s sender, durably.

    @return: the bounce's queue id, or C{None} when the sender is null (no
        bounce for a bounce).
    """
    if not shouldBounce(envelope) or not failures:
        return None
    data = await runInThread(
        partial(makeBounce, expired=expired),
        envelope,
        list(failures),
        spool.messagePath(envelope.queueId),
        reportingHost,
        now,
    )
    writer = spool.newMessage()
    writer.write(data)
    bounce = Envelope(
        queueId=writer.queueId,
        sender="",
        recipients=(envelope.sender,),
        auth=NULL_AUTH,
        helo=reportingHost,
        receivedAt=now,
        size=len(data),
    )
    queueId: str = await writer.commit(bounce)
    return queueId


@implementer(IQueueControl)
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
        maxLifetime: float = DEFAULT_MAX_LIFETIME,
        delayWarning: float = 0.0,
        hostname: str = "localhost",
        metrics: RelayMetrics | None = None,
        flow: InFlow | None = None,
    ) -> None:
        """
        @param runInThread: where to read the spool and build bounces (off
            the reactor thread in the service; at once in tests).
        @param hostname: our name, in bounces.
        @param flow: told of each new message and of the end of its first
            attempt (in-flow control, L{smtpauth_relay.flow}).
        """
        self.spool = spool
        self.agent = agent
        self.clock = clock
        self.retrySchedule = retrySchedule
        self.maxLifetime = maxLifetime
        self.delayWarning = delayWarning
        self.hostname = hostname
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self._runInThread = runInThread
        self._semaphore = DeferredSemaphore(maxConcurrent)
        self._scheduled: dict[str, Any] = {}
        # Attempts scheduled to run (waiting for a slot or running) ...
        self._active: dict[str, Deferred[float | None]] = {}
        # ... those actually running, and messages an admin command holds.
        self._busy: set[str] = set()
        self._adminBusy: set[str] = set()
        # Recipients delivered or bounced whose envelope is not saved yet:
        # never delivered twice, even if saving fails.
        self._done: dict[str, set[str]] = {}
        self._listening = False
        self.flow = flow
        # New messages whose first attempt has not finished (for flow).
        self._fresh: set[str] = set()

    def startService(self) -> None:
        super().startService()
        if not self._listening:
            self.spool.addListener(self._committed)
            self._listening = True
        now = self.clock.seconds()
        for queueId in self.spool.queued():
            try:
                due = self.spool.load(queueId).nextAttempt
            except (KeyError, ValueError):
                due = 0.0
            self.schedule(queueId, max(0.0, due - now))

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self.flow is not None:
            self.flow.stop()
        for call in self._scheduled.values():
            if call.active():
                call.cancel()
        self._scheduled.clear()
        return DeferredList(list(self._active.values()), consumeErrors=True)

    def _committed(self, queueId: str) -> None:
        if self.running:
            self.schedule(queueId, 0)
            if self.flow is not None and queueId in self._scheduled:
                self._fresh.add(queueId)
                self.flow.committed()

    def schedule(self, queueId: str, delay: float) -> None:
        """
        Attempt delivery of C{queueId} in C{delay} seconds, unless an attempt
        is already scheduled or under way.
        """
        if (
            queueId in self._scheduled
            or queueId in self._active
            or queueId in self._adminBusy
        ):
            return
        self._scheduled[queueId] = self.clock.callLater(delay, self._start, queueId)

    def _unschedule(self, queueId: str) -> None:
        call = self._scheduled.pop(queueId, None)
        if call is not None and call.active():
            call.cancel()

    def queuedIds(self) -> set[str]:
        """
        The messages the runner knows of (waiting, under delivery, held),
        from memory: for the queue gauges, without listing the spool.
        """
        return set(self._scheduled) | set(self._active) | self._adminBusy

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
            if queueId in self._fresh:
                self._fresh.discard(queueId)
                assert self.flow is not None
                self.flow.attempted()
            if isinstance(result, Failure):
                self.metrics.deliveryAttempt("failed", "", 1)
                log.failure(
                    "delivery of {queueId} failed unexpectedly", result, queueId=queueId
                )
                result = self.retrySchedule[-1]
            if result is not None and self.running:
                self.schedule(queueId, result)

        d.addBoth(finished)

    async def _attempt(self, queueId: str) -> float | None:
        """
        One delivery attempt, and what follows from it.

        @return: seconds until the next attempt, or C{None} when the message
            has left the queue (or the runner is stopping, or an admin
            command holds the message).
        """
        if not self.running or queueId in self._adminBusy:
            return None
        self._busy.add(queueId)
        try:
            return await self._deliver(queueId)
        finally:
            self._busy.discard(queueId)

    async def _deliver(self, queueId: str) -> float | None:
        try:
            envelope = self.spool.recent(queueId) or await self._runInThread(
                self.spool.load, queueId
            )
        except KeyError:
            return None
        except ValueError as e:
            log.error(
                "{queueId} has an unreadable envelope ({error}); moved to corrupt/",
                queueId=queueId,
                error=str(e),
            )
            await self.spool.quarantine(queueId)
            return None
        done = self._done.get(queueId, set())
        if done:
            envelope = replace(
                envelope,
                recipients=tuple(r for r in envelope.recipients if r not in done),
            )
            if not envelope.recipients:
                await self.spool.remove(queueId)
                self._done.pop(queueId, None)
                return None
        try:
            report = await self.agent.deliver(envelope, self.spool.messagePath(queueId))
        except Exception as e:
            report = DeliveryReport(
                deferred={r: _reason(e) for r in envelope.recipients},
                host=getattr(e, "host", ""),
            )
        now = self.clock.seconds()
        delivered = set(report.delivered) & set(envelope.recipients)
        self._done.setdefault(queueId, set()).update(delivered)
        if delivered:
            self.metrics.deliveryAttempt("delivered", report.host, len(delivered))
            for _ in delivered:
                self.metrics.deliveryLatency(now - envelope.receivedAt)
        for recipient in report.delivered:
            if recipient in envelope.recipients:
                log.info(
                    "{queueId} delivered to <{recipient}> via {host}",
                    queueId=queueId,
                    recipient=recipient,
                    host=report.host,
                    outcome="delivered",
                )
        # Only what the agent says it delivered is done: a recipient it does
        # not mention at all stays, and is retried.
        deferred = {
            r: report.deferred.get(r, "not reported by the delivery agent")
            for r in envelope.recipients
            if r not in report.delivered and r not in report.failed
        }
        failed = {
            r: report.failed[r] for r in envelope.recipients if r in report.failed
        }
        attempt = Attempt(
            time=now,
            host=report.host,
            reply="; ".join(sorted(set(deferred.values()) | set(failed.values())))
            or "250 delivered",
        )
        expired = bool(deferred) and now - envelope.receivedAt >= self.maxLifetime
        bounced = dict(failed)
        if expired:
            bounced.update(deferred)
        if bounced:
            await self._bounce(
                envelope,
                [
                    RecipientFailure(r, reply, report.host or None)
                    for r, reply in bounced.items()
                ],
                expired=expired,
                now=now,
            )
            self._done[queueId].update(bounced)
            if failed:
                self.metrics.deliveryAttempt("bounced", report.host, len(failed))
            if expired:
                self.metrics.deliveryAttempt("expired", report.host, len(deferred))
        remaining = tuple(
            r for r in envelope.recipients if r in deferred and r not in bounced
        )
        if not remaining:
            await self.spool.remove(queueId)
            self._done.pop(queueId, None)
            return None
        updated = envelope.withAttempt(attempt, remaining)
        if (
            self.delayWarning
            and not updated.delayWarned
            and now - envelope.receivedAt >= self.delayWarning
        ):
            await self._warnDelay(updated, deferred, report.host, now)
            updated = replace(updated, delayWarned=True)
        delay = self.retryDelay(len(updated.attempts))
        updated = replace(updated, nextAttempt=now + delay)
        await self.spool.saveEnvelope(updated)
        self._done.pop(queueId, None)
        self.metrics.deliveryAttempt("deferred", report.host, len(remaining))
        log.warn(
            "{queueId} deferred for {count} recipient(s) via {host}: {reply}; "
            "retry in {delay:.0f}s",
            queueId=queueId,
            count=len(remaining),
            host=report.host,
            reply=attempt.reply,
            delay=delay,
            outcome="deferred",
        )
        return delay

    async def _bounce(
        self,
        envelope: Envelope,
        failures: list[RecipientFailure],
        expired: bool,
        now: float,
    ) -> None:
        bounceId = await queueBounce(
            self.spool,
            envelope,
            failures,
            self.hostname,
            now,
            self._runInThread,
            expired=expired,
        )
        for failure in failures:
            log.warn(
                "{queueId} to <{recipient}> {outcome}: {reply}; bounce {bounceId}",
                queueId=envelope.queueId,
                recipient=failure.recipient,
                outcome="expired" if expired else "bounced",
                reply=failure.reply,
                bounceId=bounceId or "not sent (null sender)",
            )

    async def _warnDelay(
        self, envelope: Envelope, deferred: dict[str, str], host: str, now: float
    ) -> None:
        bounceId = await queueBounce(
            self.spool,
            envelope,
            [
                RecipientFailure(r, reply, host or None, action="delayed")
                for r, reply in deferred.items()
                if r in envelope.recipients
            ],
            self.hostname,
            now,
            self._runInThread,
        )
        log.info(
            "{queueId} delayed; warning {bounceId} sent to <{sender}>",
            queueId=envelope.queueId,
            bounceId=bounceId,
            sender=envelope.sender,
        )

    # -- IQueueControl --------------------------------------------------------

    def flush(self) -> int:
        """
        See L{IQueueControl.flush}.
        """
        if not self.running:
            return 0
        count = 0
        for queueId in self.spool.queued():
            if queueId in self._active or queueId in self._adminBusy:
                continue
            self._unschedule(queueId)
            self.schedule(queueId, 0)
            count += 1
        log.info("queue flushed: {count} message(s) scheduled", count=count)
        return count

    def _holding(self, queueId: str, action: Any) -> Deferred[None]:
        """
        Run an admin C{action(envelope)} on a message no attempt is
        delivering, holding it meanwhile: no attempt starts, no other admin
        command runs on it.  If the message is still queued afterwards (the
        action failed), it is scheduled again.
        """
        if queueId in self._busy or queueId in self._adminBusy:
            return fail(QueueBusy(queueId))
        self._adminBusy.add(queueId)
        self._unschedule(queueId)

        async def run() -> None:
            try:
                envelope = await self._runInThread(self.spool.load, queueId)
                await action(envelope)
            finally:
                self._adminBusy.discard(queueId)
                if self.running and queueId in self.spool.queued():
                    self.schedule(queueId, 0)

        return Deferred.fromCoroutine(run())

    def delete(self, queueId: str) -> Deferred[None]:
        """
        See L{IQueueControl.delete}.
        """

        async def delete(envelope: Envelope) -> None:
            await self.spool.remove(queueId)
            log.warn("{queueId} deleted by the administrator", queueId=queueId)

        return self._holding(queueId, delete)

    def bounce(self, queueId: str) -> Deferred[None]:
        """
        See L{IQueueControl.bounce}.
        """

        async def bounce(envelope: Envelope) -> None:
            last = envelope.attempts[-1] if envelope.attempts else None
            reason = "delivery abandoned by the administrator"
            if last is not None:
                reason += f"; last error: {last.reply}"
            await self._bounce(
                envelope,
                [RecipientFailure(r, reason, None) for r in envelope.recipients],
                expired=False,
                now=self.clock.seconds(),
            )
            await self.spool.remove(queueId)

        return self._holding(queueId, bounce)


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())
