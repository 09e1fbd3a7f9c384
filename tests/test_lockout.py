"""
Tests for L{smtpauth_relay.lockout}.
"""

from __future__ import annotations

import configparser
import os
import re

from twisted.internet.task import Clock
from twisted.logger import (
    LogLevel,
    capturedLogs,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.config import LockoutConfig
from smtpauth_relay.lockout import (
    ILockoutStore,
    Lockout,
    MemoryLockoutStore,
    lockoutTimer,
    subnetOf,
)
from tests.support import Harness, b64, plain


class LockoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.settings = LockoutConfig(
            max_failures=3,
            subnet_max_failures=10,
            window=600,
            duration=900,
            max_duration=3600,
            trusted_after_success=30,
            tarpit=5,
        )
        self.lockout = Lockout(self.settings, self.clock)

    def fail(self, host: str, user: str | None = "alice", times: int = 1) -> float:
        delay = 0.0
        for _ in range(times):
            delay = self.lockout.failed(host, user)
        return delay

    def test_store(self) -> None:
        """
        The memory store provides L{ILockoutStore}.
        """
        self.assertTrue(verifyObject(ILockoutStore, MemoryLockoutStore()))

    def test_addressLocked(self) -> None:
        """
        After max_failures failures from one address, that address is locked
        for every user, even for a right password, for C{duration}.
        """
        self.fail("192.0.2.7", "alice", 2)
        self.assertIsNone(self.lockout.check("192.0.2.7", "bob"))
        self.fail("192.0.2.7", "bob")
        lock = self.lockout.check("192.0.2.7", "carol")
        self.assertIsNotNone(lock)
        assert lock is not None
        self.assertEqual(lock.key, "ip:192.0.2.7")
        self.assertEqual(lock.until, self.clock.seconds() + 900)
        self.clock.advance(900)
        self.assertIsNone(self.lockout.check("192.0.2.7", "carol"))

    def test_slidingWindow(self) -> None:
        """
        Failures older than the window do not count.
        """
        self.fail("192.0.2.7", times=2)
        self.clock.advance(601)
        self.fail("192.0.2.7", times=2)
        self.assertIsNone(self.lockout.check("192.0.2.7", "alice"))

    def test_userLockedPerSubnet(self) -> None:
        """
        A user's failures from one /24 lock that user there only: the same
        user from another network is not locked out.
        """
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.fail(host, "alice")
        self.assertEqual(
            self.lockout.check("192.0.2.99", "alice").key, "user:alice@192.0.2.0/24"
        )  # type: ignore[union-attr]
        self.assertIsNone(self.lockout.check("192.0.2.99", "bob"))
        self.assertIsNone(self.lockout.check("198.51.100.5", "alice"))

    def test_userCaseFolded(self) -> None:
        """
        A user's failures count together whatever the case of the name
        (backends such as LDAP accept any case), and the lock holds for every
        spelling; C{clear} takes any spelling too.
        """
        for host, name in (("192.0.2.1", "Alice"), ("192.0.2.2", "ALICE")):
            self.fail(host, name)
        self.fail("192.0.2.3", "alice")
        lock = self.lockout.check("192.0.2.99", "aLiCe")
        assert lock is not None
        self.assertEqual(lock.key, "user:alice@192.0.2.0/24")
        self.assertEqual(self.lockout.clear("ALICE"), 1)
        self.assertIsNone(self.lockout.check("192.0.2.99", "alice"))

    def test_ipv6Subnet(self) -> None:
        """
        For IPv6 the user's subnet is the /64.
        """
        self.assertEqual(subnetOf("2001:db8:1:2::7"), "2001:db8:1:2::/64")
        self.assertEqual(subnetOf("::ffff:192.0.2.7"), "192.0.2.0/24")
        for i in range(3):
            self.fail(f"2001:db8:1:2::{i + 1}", "alice")
        self.assertIsNotNone(self.lockout.check("2001:db8:1:2::99", "alice"))
        self.assertIsNone(self.lockout.check("2001:db8:1:3::1", "alice"))

    def test_subnetLimit(self) -> None:
        """
        Many addresses of one subnet, each under its own limit, lock the
        subnet at subnet_max_failures.
        """
        for i in range(10):
            self.fail(f"192.0.2.{i + 1}", f"user{i}")
        self.assertEqual(self.lockout.check("192.0.2.200", "x").key, "net:192.0.2.0/24")  # type: ignore[union-attr]

    def test_trustedAddressExempt(self) -> None:
        """
        An address the user logged in from recently is exempt from that
        user's and the subnet's locks, not from its own address's lock.
        """
        self.lockout.succeeded("192.0.2.50", "alice")
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.fail(host, "alice")
        self.assertIsNone(self.lockout.check("192.0.2.50", "alice"))
        self.fail("192.0.2.50", "alice", 3)
        self.assertEqual(self.lockout.check("192.0.2.50", "alice").key, "ip:192.0.2.50")  # type: ignore[union-attr]

    def test_trustExpires(self) -> None:
        """
        The exemption ends trusted_after_success days after the login.
        """
        self.lockout.succeeded("192.0.2.50", "alice")
        self.clock.advance(31 * 86400)
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.fail(host, "alice")
        self.assertIsNotNone(self.lockout.check("192.0.2.50", "alice"))

    def test_successResetsUserFailures(self) -> None:
        """
        A successful login forgets the user's failures from its subnet.
        """
        self.fail("192.0.2.1", "alice", 2)
        self.lockout.succeeded("192.0.2.1", "alice")
        self.fail("192.0.2.2", "alice")
        self.assertIsNone(self.lockout.check("192.0.2.3", "alice"))

    def test_repeatDoubles(self) -> None:
        """
        Each repeat lock doubles the duration, up to max_duration.
        """
        durations = []
        for _ in range(4):
            self.fail("192.0.2.7", None, 3)
            lock = self.lockout.check("192.0.2.7", None)
            assert lock is not None
            durations.append(lock.until - self.clock.seconds())
            self.clock.advance(lock.until - self.clock.seconds())
        self.assertEqual(durations, [900, 1800, 3600, 3600])

    def test_tarpit(self) -> None:
        """
        The delay before answering a failure grows with the address's
        failures, up to C{tarpit}.
        """
        delays = [self.fail("192.0.2.7", f"u{i}") for i in range(2)]
        self.clock.advance(601)
        more = [self.lockout.failed("192.0.2.8", None) for _ in range(2)]
        self.assertEqual(delays, [0.25, 0.5])
        self.assertEqual(more, [0.25, 0.5])
        self.settings = LockoutConfig(max_failures=100, tarpit=5)
        lockout = Lockout(self.settings, self.clock)
        self.assertEqual([lockout.failed("192.0.2.9", None) for _ in range(7)][-1], 5)

    def test_logLines(self) -> None:
        """
        Lock start and end are logged in the fixed fail2ban format; odd
        characters in a user name cannot break the line.
        """
        with capturedLogs() as events:
            self.fail("192.0.2.7", "al ice\r\nx", 3)
            self.clock.advance(900)
            self.lockout.expire()
        lines = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]
        self.assertIn(
            "lockout start kind=ip key=ip:192.0.2.7 client=192.0.2.7 "
            "user=al?ice??x failures=3 duration=900s",
            lines,
        )
        self.assertIn("lockout end kind=ip key=ip:192.0.2.7", lines)

    def test_clear(self) -> None:
        """
        An admin can clear the locks of an address or of a user name.
        """
        self.fail("192.0.2.7", "alice", 3)
        self.assertEqual(
            sorted(lock.key for lock in self.lockout.locks()),
            ["ip:192.0.2.7", "user:alice@192.0.2.0/24"],
        )
        self.assertEqual(self.lockout.clear("alice"), 1)
        self.assertEqual(self.lockout.clear("192.0.2.7"), 1)
        self.assertEqual(self.lockout.locks(), [])
        self.assertEqual(self.lockout.clear("nobody"), 0)

    def test_timer(self) -> None:
        """
        The expiry runs every minute on the lockout's clock.
        """
        self.fail("192.0.2.7", None, 3)
        timer = lockoutTimer(self.lockout)
        timer.startService()
        self.addCleanup(timer.stopService)
        self.clock.advance(900)
        self.assertEqual(self.lockout.store.locks(self.clock.seconds()), [])  # type: ignore[attr-defined]
        self.assertEqual(self.lockout.store._locked, {})  # type: ignore[attr-defined]


def fail2banPattern() -> re.Pattern[str]:
    """
    The shipped filter's failregex, with <HOST> as a named group.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(root, "etc/fail2ban/filter.d/smtpauth-relay.conf"))
    failregex = parser["Definition"]["failregex"].strip()
    return re.compile(failregex.replace("<HOST>", r"(?P<host>\S+)"))


def asFail2banSeesIt(event: dict[str, object]) -> list[str]:
    """
    The lines twistd's text log writes for C{event}, with the leading time
    stamp removed as fail2ban removes it before applying failregex.
    """
    text = formatEventAsClassicLogText(event) or ""
    return [re.sub(r"^\S+ ", "", line) for line in text.splitlines()]


class Fail2banFilterTests(SynchronousTestCase):
    def test_filterMatchesLogLine(self) -> None:
        """
        The shipped fail2ban filter's failregex matches the lockout line the
        relay logs (as twistd writes it), and captures the client address.
        """
        pattern = fail2banPattern()
        lockout = Lockout(LockoutConfig(max_failures=1), Clock())
        with capturedLogs() as events:
            lockout.failed("2001:db8::7", "mallory")
        lines = [line for e in events for line in asFail2banSeesIt(e)]
        hosts = {m.group("host") for line in lines if (m := pattern.search(line))}
        self.assertEqual(hosts, {"2001:db8::7"})

    def test_clientTextCannotMatch(self) -> None:
        """
        A user name or sender address made to look like a lockout line
        (spaces and all) cannot make the filter ban an address of the
        attacker's choosing: the filter is anchored to the lockout logger's
        line, and user names are escaped.
        """
        pattern = fail2banPattern()
        harness = Harness(lockout=LockoutConfig(max_failures=100, tarpit=0))
        session = harness.connect()
        session.startTLS()
        session.command(b"EHLO client.example")
        forged = (
            "x lockout start kind=ip key=ip:203.0.113.9 client=203.0.113.9 "
            "user=x failures=5 duration=900s"
        )
        with capturedLogs() as events:
            session.command(b"AUTH PLAIN " + plain(forged, "guess"))
            session.command(b"AUTH LOGIN")
            session.command(b64("x\n" + forged))
            session.command(b64("guess"))
        lines = [line for e in events for line in asFail2banSeesIt(e)]
        self.assertTrue(any("203.0.113.9" in line for line in lines))
        self.assertEqual([line for line in lines if pattern.search(line)], [])
