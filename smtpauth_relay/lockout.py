"""
Brute-force protection for AUTH (C{[auth.lockout]}).

Failed logins are counted in a sliding window under three keys:

  - C{ip:ADDRESS}: the client address (limit C{max_failures});
  - C{user:NAME@SUBNET}: a user name tried from one subnet (/24 for IPv4,
    /64 for IPv6; limit C{max_failures}), so an attacker elsewhere cannot
    lock a real user out of the office network;
  - C{net:SUBNET}: a whole subnet (limit C{subnet_max_failures}), against
    attackers spread over many addresses.

Past a limit the key is locked: every AUTH it covers gets 454 4.7.0, even
with the right password, until the lock ends.  Each new lock of a key
doubles its duration, up to C{max_duration}.  An address a user logged in
from successfully within C{trusted_after_success} days is exempt from that
user's and that subnet's locks (not from its own address's).

Each lock's start and end is one log line in a fixed format that
C{etc/fail2ban/filter.d/smtpauth-relay.conf} parses::

    lockout start kind=ip key=ip:192.0.2.7 client=192.0.2.7 user=alice failures=5 duration=900s
    lockout end kind=ip key=ip:192.0.2.7

The state lives behind L{ILockoutStore}; L{MemoryLockoutStore} keeps it in
memory.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.logger import Logger
from zope.interface import Interface, implementer

from smtpauth_relay.config import LockoutConfig
from smtpauth_relay.interfaces import ILoginGuard
from smtpauth_relay.policy import clientAddress

log = Logger()

DAY = 86400.0
_UNSAFE = re.compile(r"[^\x21-\x7e]")


class ILockoutStore(Interface):
    """
    Where failure counts, locks and trusted addresses are kept.
    """

    def recordFailure(key: str, now: float, window: float) -> int:
        """
        Count a failure for C{key}; return the failures within C{window}.
        """

    def resetFailures(key: str) -> None:
        """
        Forget C{key}'s failures.
        """

    def lock(key: str, until: float, now: float) -> None:
        """
        Lock C{key} until C{until} (and remember that it was locked at
        C{now}, for the doubling of repeat locks).
        """

    def lockedUntil(key: str, now: float) -> float | None:
        """
        When C{key}'s lock ends, or C{None} if it is not locked.
        """

    def previousLocks(key: str, now: float, memory: float) -> int:
        """
        How many times C{key} was locked within the last C{memory} seconds.
        """

    def unlock(key: str) -> bool:
        """
        End C{key}'s lock and forget its failures; C{True} if it was locked.
        """

    def locks(now: float) -> list[tuple[str, float]]:
        """
        Every current lock: C{(key, until)}.
        """

    def expire(now: float, window: float) -> list[str]:
        """
        Drop what is over; return the keys whose lock just ended.
        """

    def hit(key: str, now: float, window: float, amount: int = 1) -> int:
        """
        Add C{amount} to the sliding-window counter C{key}; return its total
        within C{window} (rate limits).
        """

    def total(key: str, now: float, window: float) -> int:
        """
        The total of counter C{key} within C{window}, without adding.
        """

    def recordSuccess(user: str, address: str, now: float) -> None:
        """
        C{user} logged in from C{address}.
        """

    def lastSuccess(user: str, address: str) -> float | None:
        """
        When C{user} last logged in from C{address}.
        """


@implementer(ILockoutStore)
class MemoryLockoutStore:
    """
    L{ILockoutStore} in this process's memory (lost at restart).
    """

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}
        self._history: dict[str, list[float]] = {}
        self._successes: dict[tuple[str, str], float] = {}
        self._counters: dict[str, deque[tuple[float, int]]] = {}
        self._sums: dict[str, int] = {}

    def recordFailure(self, key: str, now: float, window: float) -> int:
        times = self._failures.setdefault(key, deque())
        times.append(now)
        while times and times[0] <= now - window:
            times.popleft()
        return len(times)

    def resetFailures(self, key: str) -> None:
        self._failures.pop(key, None)

    def lock(self, key: str, until: float, now: float) -> None:
        self._locked[key] = until
        self._history.setdefault(key, []).append(now)
        self._failures.pop(key, None)

    def lockedUntil(self, key: str, now: float) -> float | None:
        until = self._locked.get(key)
        return until if until is not None and until > now else None

    def previousLocks(self, key: str, now: float, memory: float) -> int:
        return sum(1 for t in self._history.get(key, ()) if t > now - memory)

    def unlock(self, key: str) -> bool:
        self._failures.pop(key, None)
        self._history.pop(key, None)
        return self._locked.pop(key, None) is not None

    def locks(self, now: float) -> list[tuple[str, float]]:
        return sorted((k, u) for k, u in self._locked.items() if u > now)

    def expire(self, now: float, window: float) -> list[str]:
        ended = [k for k, until in self._locked.items() if until <= now]
        for key in ended:
            del self._locked[key]
        for key in [
            k for k, t in self._failures.items() if not t or t[-1] <= now - window
        ]:
            del self._failures[key]
        for key in list(self._counters):
            # Rate counters span an hour at most.
            self.total(key, now, 3600.0)
        return ended

    def hit(self, key: str, now: float, window: float, amount: int = 1) -> int:
        self._counters.setdefault(key, deque()).append((now, amount))
        self._sums[key] = self._sums.get(key, 0) + amount
        return self.total(key, now, window)

    def total(self, key: str, now: float, window: float) -> int:
        # A running sum, so that a busy user's counter costs the same at the
        # thousandth message of the hour as at the first.
        entries = self._counters.get(key)
        if not entries:
            return 0
        expired = 0
        while entries and entries[0][0] <= now - window:
            expired += entries.popleft()[1]
        if not entries:
            del self._counters[key]
            self._sums.pop(key, None)
            return 0
        self._sums[key] -= expired
        return self._sums[key]

    def recordSuccess(self, user: str, address: str, now: float) -> None:
        self._successes[(user, address)] = now

    def lastSuccess(self, user: str, address: str) -> float | None:
        return self._successes.get((user, address))


def subnetOf(host: str) -> str:
    """
    The /24 (IPv4) or /64 (IPv6) that C{host} is in, as text; the host
    itself when it is not an IP address.
    """
    address = clientAddress(host)
    if address is None:
        return host
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _safe(text: str) -> str:
    """
    Make C{text} one token for the fixed-format log line.
    """
    return _UNSAFE.sub("?", text)[:128] or "-"


@dataclass(frozen=True)
class Lock:
    """
    A lock in force: which key, until when.
    """

    key: str
    until: float


@implementer(ILoginGuard)
class Lockout:
    """
    The lockout policy; see the module docstring.
    """

    def __init__(
        self,
        settings: LockoutConfig,
        clock: Any,
        store: ILockoutStore | None = None,
        metrics: Any = None,
    ) -> None:
        """
        @param metrics: a L{smtpauth_relay.metrics.RelayMetrics} counting
            lock starts, or C{None}.
        """
        self.settings = settings
        self.clock = clock
        self.store: ILockoutStore = store if store is not None else MemoryLockoutStore()
        self.metrics = metrics

    def _keys(self, host: str, user: str | None) -> list[tuple[str, str, int]]:
        """
        C{(kind, key, limit)} for a login attempt.
        """
        address = clientAddress(host)
        ip = str(address) if address is not None else host
        subnet = subnetOf(host)
        keys = [("ip", f"ip:{ip}", self.settings.max_failures)]
        if user:
            keys.append(
                ("user", f"user:{userKey(user)}@{subnet}", self.settings.max_failures)
            )
        keys.append(("net", f"net:{subnet}", self.settings.subnet_max_failures))
        return keys

    def _trusted(self, host: str, user: str | None) -> bool:
        days = self.settings.trusted_after_success
        if not user or not days:
            return False
        last = self.store.lastSuccess(userKey(user), host)
        return last is not None and last >= self.clock.seconds() - days * DAY

    def check(self, host: str, user: str | None) -> Lock | None:
        """
        The lock that refuses this attempt, if any; ask before checking the
        password (a locked login is refused even if it is right).
        """
        now = self.clock.seconds()
        trusted = self._trusted(host, user)
        for kind, key, _ in self._keys(host, user):
            if trusted and kind != "ip":
                continue
            until = self.store.lockedUntil(key, now)
            if until is not None:
                return Lock(key, until)
        return None

    def failed(self, host: str, user: str | None) -> float:
        """
        Count a failed login; lock what went over its limit.

        @return: seconds to wait before answering (the tarpit), growing with
            the address's recent failures.
        """
        now = self.clock.seconds()
        settings = self.settings
        delay = 0.0
        for kind, key, limit in self._keys(host, user):
            count = self.store.recordFailure(key, now, settings.window)
            if kind == "ip":
                delay = min(settings.tarpit, 0.25 * 2 ** (count - 1))
            if count >= limit and self.store.lockedUntil(key, now) is None:
                repeats = self.store.previousLocks(
                    key, now, settings.max_duration + settings.window
                )
                duration = min(settings.duration * 2**repeats, settings.max_duration)
                self.store.lock(key, now + duration, now)
                if self.metrics is not None:
                    self.metrics.lockoutStarted(kind)
                log.warn(
                    "lockout start kind={kind} key={key} client={client} "
                    "user={user} failures={failures} duration={duration:.0f}s",
                    kind=kind,
                    key=_safe(key),
                    client=_safe(host),
                    user=_safe(user or ""),
                    failures=count,
                    duration=duration,
                )
        return delay

    def succeeded(self, host: str, user: str) -> None:
        """
        A login succeeded: remember the address, forget the user's failures
        from its subnet.
        """
        self.store.recordSuccess(userKey(user), host, self.clock.seconds())
        self.store.resetFailures(f"user:{userKey(user)}@{subnetOf(host)}")

    def expire(self) -> None:
        """
        Log the end of locks that are over and drop stale counters (run
        every minute).
        """
        for key in self.store.expire(self.clock.seconds(), self.settings.window):
            log.info(
                "lockout end kind={kind} key={key}",
                kind=key.split(":", 1)[0],
                key=_safe(key),
            )

    def locks(self) -> list[Lock]:
        """
        The locks in force.
        """
        return [Lock(k, u) for k, u in self.store.locks(self.clock.seconds())]

    def clear(self, target: str) -> int:
        """
        End the locks of an address, a subnet or a user name (C{smtpauth-relay
        lockout clear}).

        @return: how many locks were ended.
        """
        cleared = 0
        for lock in self.locks():
            kind, _, rest = lock.key.partition(":")
            name = rest.rsplit("@", 1)[0] if kind == "user" else rest
            if target in (name, rest, lock.key) or (
                kind == "user" and userKey(target) == name
            ):
                if self.store.unlock(lock.key):
                    cleared += 1
                    log.info(
                        "lockout end kind={kind} key={key} (cleared by the administrator)",
                        kind=kind,
                        key=_safe(lock.key),
                    )
        return cleared


def userKey(user: str) -> str:
    """
    The user name as the lockout counts it: case-folded, since most
    backends (LDAP, IMAP, SQL with a case-insensitive collation) accept any
    case, and C{Alice}, C{ALICE} and C{alice} must not each get their own
    ration of guesses.
    """
    return user.casefold()


def lockoutTimer(lockout: Lockout, interval: float = 60.0) -> TimerService:
    """
    A service running L{Lockout.expire} every C{interval} seconds.
    """
    service = TimerService(interval, lockout.expire)
    service.clock = lockout.clock
    return service
