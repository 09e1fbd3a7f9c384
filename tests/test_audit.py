"""
Tests for L{smtpauth_relay.audit}, C{smtpauth-relay audit FILE}.
"""

from __future__ import annotations

import io
import os
import re
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.audit import DEFAULT_TIME_LIMIT, DEFAULT_TOP, auditCommand
from smtpauth_relay.passwords import hashPassword, verifyPassword

STRONG = "vivid quartz lantern"

PROGRESS = re.compile(r"\r\[[#-]{30}\] \d{1,3}% \d+/\d+ checks *")
"""
One drawing of the progress bar.
"""


def bcrypt4(password: str) -> str:
    """
    A cheap (cost 4) bcrypt hash of C{password}.
    """
    return hashPassword(password.encode(), rounds=4)


class SteppingClock:
    """
    A clock that moves on by C{step} seconds each time it is read, so that
    a time limit is reached after a known number of readings.

    @ivar interruptAt: The reading at which to raise L{KeyboardInterrupt}
        instead, as if the user had pressed Ctrl-C, or C{None}.
    """

    def __init__(self, step: float = 1.0, interruptAt: int | None = None) -> None:
        self.now = 1000.0
        self.step = step
        self.readings = 0
        self.interruptAt = interruptAt

    def __call__(self) -> float:
        self.readings += 1
        if self.readings == self.interruptAt:
            raise KeyboardInterrupt()
        now = self.now
        self.now += self.step
        return now


class VerifySpy:
    """
    Records the hashes it is asked about, in the worker threads, and
    verifies for real, except that it raises for the hashes in C{broken}.
    """

    def __init__(self, broken: frozenset[str] = frozenset()) -> None:
        self.broken = broken
        self.lock = threading.Lock()
        self.calls: list[tuple[bytes, str]] = []
        self.threads: set[str] = set()

    def __call__(self, password: bytes, encoded: str) -> bool:
        with self.lock:
            self.calls.append((password, encoded))
            self.threads.add(threading.current_thread().name)
        if encoded in self.broken:
            raise RuntimeError("cannot check this hash")
        return verifyPassword(password, encoded)


class AuditCommandTests(SynchronousTestCase):
    """
    Tests for L{auditCommand}.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "users")
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()

    def writeUsers(self, *entries: tuple[str, str]) -> None:
        """
        Write a password file of C{(user, hash)} lines.
        """
        with open(self.path, "w") as f:
            for user, encoded in entries:
                f.write(f"{user}:{encoded}\n")

    def audit(self, *argv: str, **kwargs: Any) -> int:
        """
        Run the command with C{argv}, or on the password file with a small
        C{--top} if there is none.
        """
        args = list(argv) or [self.path, "--top", "50"]
        return auditCommand(args, self.stdout, self.stderr, **kwargs)

    def assertNoPasswordShown(self, *passwords: str) -> None:
        """
        Neither output shows any of C{passwords}; the word "password" may
        appear in "weak password" only.
        """
        for output in [self.stdout.getvalue(), self.stderr.getvalue()]:
            for password in passwords:
                self.assertNotIn(password, output.replace("weak password", ""))

    def test_defaults(self) -> None:
        """
        By default the 1000 most common passwords are tried, for at most
        five minutes.
        """
        self.assertEqual((DEFAULT_TOP, DEFAULT_TIME_LIMIT), (1000, 300.0))

    def test_weakAccountsListed(self) -> None:
        """
        The accounts whose password is a common one or a variant of the user
        name are listed, with their number, and the status is 1; a strong
        password is not found, and no password is ever shown.
        """
        self.writeUsers(
            ("bob", bcrypt4("password")),
            ("carol", bcrypt4(STRONG)),
            ("alice", bcrypt4("alice123")),
        )
        self.assertEqual(self.audit(), 1)
        self.assertEqual(
            self.stdout.getvalue(),
            "bob: weak password (one of the 50 most common)\n"
            "alice: weak password (a variant of the user name)\n"
            f"2 of 3 accounts in {self.path} have a weak password.\n",
        )
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertNoPasswordShown("password", "alice123", STRONG)

    def test_nameVariants(self) -> None:
        """
        The user name is tried as it is, capitalised, backwards, with digits
        or C{!} added; for an address, its local part is the name.
        """
        self.writeUsers(
            ("dave", bcrypt4("evad")),
            ("Erin", bcrypt4("Erin1")),
            ("frank@example.org", bcrypt4("frank!")),
            ("gina", bcrypt4("Gina123")),
        )
        self.assertEqual(self.audit(), 1)
        self.assertIn("4 of 4 accounts", self.stdout.getvalue())
        self.assertEqual(
            self.stdout.getvalue().count("weak password (a variant of the user name)"),
            4,
        )

    def test_commonVariant(self) -> None:
        """
        A common word with a capital and a digit or symbol added, such as
        C{Welcome1}, is found and described as such.
        """
        self.writeUsers(("dave", bcrypt4("Welcome1")), ("erin", bcrypt4("Qwerty1!")))
        self.assertEqual(self.audit(), 1)
        self.assertEqual(
            self.stdout.getvalue(),
            "dave: weak password (a common word with a capital and a digit or"
            " symbol added)\n"
            "erin: weak password (a common word with a capital and a digit or"
            " symbol added)\n"
            f"2 of 2 accounts in {self.path} have a weak password.\n",
        )
        self.assertNoPasswordShown("Welcome1", "Qwerty1!")

    def test_top(self) -> None:
        """
        C{--top N} bounds the common passwords tried: one ranked beyond N is
        not found.
        """
        self.writeUsers(("bob", bcrypt4("baseball")))  # the 12th most common
        self.assertEqual(self.audit(self.path, "--top", "11"), 0)
        self.assertEqual(self.audit(self.path, "--top=12"), 1)
        self.assertIn(
            "bob: weak password (one of the 12 most common)", self.stdout.getvalue()
        )

    def test_noneFound(self) -> None:
        """
        When no password falls, the report says so and the status is 0.
        """
        self.writeUsers(("carol", bcrypt4(STRONG)))
        self.assertEqual(self.audit(), 0)
        self.assertEqual(
            self.stdout.getvalue(),
            f"No weak password found among 1 account in {self.path}.\n",
        )

    def test_unsupportedSkipped(self) -> None:
        """
        Accounts whose hash is of a scheme the relay does not know are listed
        as skipped and never checked.
        """
        bob = bcrypt4("password")
        self.writeUsers(
            ("frank", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="),
            ("bob", bob),
            ("gina", "$apr1$salt$abcdefghijklmnopqrstuv"),
        )
        spy = VerifySpy()
        self.assertEqual(self.audit(verify=spy), 1)
        self.assertEqual(
            self.stdout.getvalue(),
            "bob: weak password (one of the 50 most common)\n"
            "frank: skipped (unsupported hash scheme)\n"
            "gina: skipped (unsupported hash scheme)\n"
            f"1 of 1 account in {self.path} has a weak password.\n",
        )
        self.assertEqual({encoded for _, encoded in spy.calls}, {bob})

    def test_onlyUnsupported(self) -> None:
        """
        A file with no account that can be checked is not a failure.
        """
        self.writeUsers(("frank", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="))
        self.assertEqual(self.audit(isatty=lambda: True), 0)
        self.assertIn(
            "frank: skipped (unsupported hash scheme)", self.stdout.getvalue()
        )
        self.assertIn("No weak password found among 0 accounts", self.stdout.getvalue())
        self.assertEqual(self.stderr.getvalue(), "")

    def test_checkFails(self) -> None:
        """
        An account whose hash raises an exception when checked is listed as
        skipped, and the others are still checked.
        """
        broken = bcrypt4(STRONG)
        self.writeUsers(("carol", broken), ("bob", bcrypt4("password")))
        spy = VerifySpy(frozenset([broken]))
        self.assertEqual(
            self.audit(self.path, "--top", "50", "--jobs", "1", verify=spy), 1
        )
        self.assertEqual(
            self.stdout.getvalue(),
            "bob: weak password (one of the 50 most common)\n"
            "carol: skipped (the hash could not be checked)\n"
            f"1 of 1 account in {self.path} has a weak password.\n",
        )
        self.assertEqual([e for _, e in spy.calls].count(broken), 1)

    def test_offMainThread(self) -> None:
        """
        The hashes are checked in worker threads, as many as C{--jobs} says.
        """
        self.writeUsers(("carol", bcrypt4(STRONG)))
        spy = VerifySpy()
        self.assertEqual(
            self.audit(self.path, "--top", "20", "--jobs", "2", verify=spy), 0
        )
        self.assertNotIn(threading.current_thread().name, spy.threads)
        self.assertLessEqual(len(spy.threads), 2)
        self.assertGreater(len(spy.calls), 20)

    def test_foundAccountDropsOut(self) -> None:
        """
        Once an account's password is found, no more candidates are tried
        against it.
        """
        weak = bcrypt4("123456")  # the most common of all: the first tried
        self.writeUsers(("bob", weak), ("carol", bcrypt4(STRONG)))
        spy = VerifySpy()
        self.assertEqual(
            self.audit(self.path, "--top", "50", "--jobs", "1", verify=spy), 1
        )
        self.assertEqual([e for _, e in spy.calls].count(weak), 1)

    def test_timeLimit(self) -> None:
        """
        When the time limit is reached, the audit stops, lists what it found,
        says how far it got, and exits by what it found.
        """
        self.writeUsers(
            ("bob", bcrypt4("123456")),
            ("carol", bcrypt4(STRONG)),
            ("alice", bcrypt4("alice123")),
        )
        clock = SteppingClock()
        status = self.audit(self.path, "--time-limit", "6", "--jobs", "1", clock=clock)
        self.assertEqual(status, 1)
        output = self.stdout.getvalue()
        self.assertTrue(
            output.startswith(
                "bob: weak password (one of the 1000 most common)\n"
                f"1 of 3 accounts in {self.path} has a weak password.\n"
                "Time limit of 6 s reached after "
            ),
            output,
        )
        self.assertRegex(
            output,
            r"after \d of \d+ checks \(\d+\.\d s\); each account not listed was"
            r" tried with at least its [12] most likely passwords\.\n$",
        )
        self.assertNotIn("alice", output)
        self.assertLess(clock.readings, 12)

    def test_timeLimitNothingFound(self) -> None:
        """
        An audit cut short that found nothing has status 0, and says it was
        cut short.
        """
        self.writeUsers(("carol", bcrypt4(STRONG)))
        status = self.audit(self.path, "--time-limit=3.5", clock=SteppingClock())
        self.assertEqual(status, 0)
        self.assertIn("Time limit of 3.5 s reached after", self.stdout.getvalue())

    def test_turns(self) -> None:
        """
        The accounts take turns, each its most likely candidate first, so
        that a time limit too short to try every candidate of one account
        still finds a weak password of the last account in the file.
        """
        self.writeUsers(
            ("carol", bcrypt4(STRONG)),
            ("dave", bcrypt4("glacier-mint-otter")),
            ("erin", bcrypt4("unicorn velvet tram")),
            ("alice", bcrypt4("alice")),
        )
        spy = VerifySpy()
        status = self.audit(
            self.path,
            "--time-limit",
            "60",
            "--jobs",
            "1",
            clock=SteppingClock(),
            verify=spy,
        )
        self.assertEqual(status, 1)
        self.assertIn("alice: weak password", self.stdout.getvalue())
        self.assertIn("Time limit of 60 s reached", self.stdout.getvalue())
        first = [password for password, _ in spy.calls[:8]]
        self.assertEqual(first, [b"123456"] * 4 + [b"password"] * 4)

    def test_interrupted(self) -> None:
        """
        Ctrl-C stops the audit: what was found is listed, the report says it
        was interrupted, and the status is 1 if a password was found, 130
        if none was.
        """
        self.writeUsers(("bob", bcrypt4("123456")), ("carol", bcrypt4(STRONG)))
        clock = SteppingClock(step=0.001, interruptAt=6)
        self.assertEqual(self.audit(self.path, "--jobs", "1", clock=clock), 1)
        output = self.stdout.getvalue()
        self.assertIn("bob: weak password", output)
        self.assertIn("\nInterrupted after ", output)

        self.stdout = io.StringIO()
        self.writeUsers(("carol", bcrypt4(STRONG)))
        clock = SteppingClock(step=0.001, interruptAt=6)
        self.assertEqual(self.audit(self.path, "--jobs", "1", clock=clock), 130)
        self.assertIn("\nInterrupted after ", self.stdout.getvalue())

    def test_progressBar(self) -> None:
        """
        When stderr is a terminal, a progress bar is drawn there, redrawn in
        place with C{\\r} and ended with a newline at 100%; the report on
        stdout has none of it.
        """
        self.writeUsers(("bob", bcrypt4("password")), ("carol", bcrypt4(STRONG)))
        clock = SteppingClock(step=0.05)
        self.assertEqual(self.audit(isatty=lambda: True, clock=clock), 1)
        progress = self.stderr.getvalue()
        self.assertTrue(progress.startswith("\r["), progress[:80])
        self.assertTrue(progress.endswith("\n"))
        drawings = PROGRESS.findall(progress)
        self.assertGreater(len(drawings), 2)
        self.assertEqual("".join(drawings) + "\n", progress)
        self.assertRegex(drawings[-1], r"\[#{30}\] 100% (\d+)/\1 checks")
        self.assertNotIn("\r", self.stdout.getvalue())
        self.assertNoPasswordShown("password", STRONG)

    def test_noProgressBarOffTerminal(self) -> None:
        """
        When stderr is not a terminal, nothing is written there; by default
        stderr itself is asked.
        """
        self.writeUsers(("bob", bcrypt4("password")))
        self.assertEqual(self.audit(isatty=lambda: False), 1)
        self.assertEqual(self.audit(), 1)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_help(self) -> None:
        """
        C{--help} prints the usage on stdout, status 0.
        """
        self.assertEqual(self.audit("--help"), 0)
        self.assertIn(
            "usage: smtpauth-relay audit FILE [--time-limit SECONDS] [--top N]",
            self.stdout.getvalue(),
        )

    def test_usage(self) -> None:
        """
        A missing or extra FILE, an unknown option, an option without its
        value and values out of range are usage errors: status 2, the problem
        and the usage on stderr.
        """
        self.writeUsers(("bob", bcrypt4("password")))
        for argv, problem in [
            ([], "give one password FILE"),
            ([self.path, self.path], "give one password FILE"),
            ([self.path, "--verbose"], "unknown option --verbose"),
            ([self.path, "--top"], "--top needs a value"),
            ([self.path, "--top", "0"], "--top must be a whole number from 1 to"),
            ([self.path, "--top", "ten"], "--top must be a whole number"),
            ([self.path, "--top", "100000"], "--top must be a whole number"),
            ([self.path, "--jobs", "0"], "--jobs must be a whole number"),
            ([self.path, "--time-limit", "0"], "--time-limit must be a positive"),
            ([self.path, "--time-limit", "-5"], "--time-limit must be a positive"),
            ([self.path, "--time-limit", "nan"], "--time-limit must be a positive"),
            ([self.path, "--time-limit", "inf"], "--time-limit must be a positive"),
            ([self.path, "--time-limit=soon"], "--time-limit must be a positive"),
        ]:
            self.stderr = io.StringIO()
            self.assertEqual(auditCommand(argv, self.stdout, self.stderr), 2, argv)
            self.assertTrue(
                self.stderr.getvalue().startswith(f"smtpauth-relay audit: {problem}"),
                (argv, self.stderr.getvalue()),
            )
            self.assertIn("usage: smtpauth-relay audit FILE", self.stderr.getvalue())
        self.assertEqual(self.stdout.getvalue(), "")

    def test_unreadable(self) -> None:
        """
        A file that cannot be read is status 2 with the reason on stderr.
        """
        missing = self.path + ".missing"
        self.assertEqual(self.audit(missing), 2)
        self.assertEqual(
            self.stderr.getvalue(),
            f"smtpauth-relay audit: cannot read {missing}: No such file or directory\n",
        )
