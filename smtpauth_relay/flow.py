"""
In-flow control (C{[queue] flow_delay}): when messages arrive faster than
they are delivered, new ones wait a moment before they are accepted.

Without it, a relay whose one reactor serves both the submitting clients and
the delivery connections lets its clients win: under sustained load the
queue of messages waiting for their first attempt grows without bound (the
benchmark's C{sustained} scenario: 11 % of the accepted messages a second).
Postfix has the same mechanism (C{in_flow_delay}, one second by default):
C{cleanup} takes a token from the queue manager before each new message and
waits for one, at most that long, when there is none.

Here the backlog is the number of messages committed whose first delivery
attempt has not finished.  While it is at or above L{InFlow.limit}, a
session's C{MAIL FROM} waits until an attempt finishes (each one lets one
waiting session go) or until L{InFlow.delay} has passed, whichever comes
first: a soft brake, never a refusal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from smtpauth_relay.interfaces import IFlowControl

#: The backlog at which sessions start waiting, per delivery that may be
#: under way (C{[queue] max_concurrent_deliveries}).  Twice was enough while
#: one process both took and delivered the mail; with worker processes
#: taking it, so small a backlog starved the deliveries: the benchmark's
#: C{sustained} run accepted and delivered about 300 messages a second with
#: 2, 380-440 with 8 or 16, and the queue still did not grow (delivered /
#: accepted 0.99).
BACKLOG_PER_DELIVERY = 16


@implementer(IFlowControl)
class InFlow:
    """
    The backlog of messages waiting for their first delivery attempt, and
    the sessions waiting because of it.

    @ivar delay: the longest a session waits, in seconds; 0 turns the
        control off.
    @ivar limit: the backlog at which sessions start waiting.
    """

    def __init__(self, clock: Any, delay: float, limit: int) -> None:
        self.clock = clock
        self._delay = delay
        self.limit = limit
        self.backlog = 0
        self.waited = 0
        """How many sessions had to wait (for tests and benchmarks)."""
        self._waiting: deque[tuple[Deferred[None], Any]] = deque()
        self.observers: list[Callable[[bool], object]] = []
        """Told whether L{congested} whenever that changes (workers)."""

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, delay: float) -> None:
        # A reload may turn the control on or off: the observers (the
        # workers) must hear of it, and 0 lets the waiting sessions go.
        before = self.congested()
        self._delay = delay
        self._tell(before)
        if delay <= 0:
            self.stop()

    def congested(self) -> bool:
        """
        Whether new messages wait now (see L{admit}).
        """
        return self._delay > 0 and self.backlog >= self.limit

    def _tell(self, before: bool) -> None:
        now = self.congested()
        if now != before:
            for observer in list(self.observers):
                observer(now)

    def committed(self) -> None:
        """
        A message was committed; its first attempt is to come.
        """
        before = self.congested()
        self.backlog += 1
        self._tell(before)

    def attempted(self) -> None:
        """
        A message's first delivery attempt finished (whatever its outcome):
        one waiting session may go on.
        """
        before = self.congested()
        self.backlog = max(0, self.backlog - 1)
        self._tell(before)
        while self._waiting:
            d, call = self._waiting.popleft()
            if call.active():
                call.cancel()
                d.callback(None)
                return

    def admit(self) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires when a new message may be taken:
            at once unless the backlog is at the limit, else when an attempt
            finishes or after L{delay}.
        """
        if not self.congested():
            return succeed(None)
        # Waits that timed out leave from the front (they all last as long).
        while self._waiting and not self._waiting[0][1].active():
            self._waiting.popleft()
        self.waited += 1
        d: Deferred[None] = Deferred()

        def timedOut() -> None:
            d.callback(None)

        self._waiting.append((d, self.clock.callLater(self.delay, timedOut)))
        return d

    def stop(self) -> None:
        """
        Let every waiting session go (at shutdown).
        """
        waiting, self._waiting = self._waiting, deque()
        for d, call in waiting:
            if call.active():
                call.cancel()
                d.callback(None)
