"""
Tests for L{smtpauth_relay.queueadmin}, the C{smtpauth-relay queue}
command: listings of a spool written by the real L{Spool}, offline
deletion, and the control-socket client against a fake relay (a blocking
server thread) and against the real control service.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import socket
import tempfile
import threading
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay import cli
from smtpauth_relay.control import makeControlService
from smtpauth_relay.envelope import Attempt, Envelope
from smtpauth_relay.errors import QueueBusy
from smtpauth_relay.interfaces import IQueueControl
from smtpauth_relay.queueadmin import USAGE, humanDuration, queueCommand
from smtpauth_relay.spool import Spool
from smtpauth_relay.testing import runNow

NOW = 1_800_000_000.0

MESSAGE_A = (
    b"Received: from client.example (client.example [192.0.2.1])\n"
    b"\tby relay.example with ESMTPSA id 1\n"
    b"Subject: quarterly report\n"
    b"From: alice@example.org\n"
    b"\n"
    b"Subject: not a header, the body\n"
)
MESSAGE_B = b"Subject: bounce\n\nbody\n"
GREYLISTED = "451 4.7.1 greylisted, try again later"


def shortDirectory(case: SynchronousTestCase) -> str:
    """
    A new empty directory, removed after the test, whose path is short
    enough for a UNIX socket in it (C{mktemp} paths may not be).
    """
    directory = tempfile.mkdtemp(prefix="qa", dir="/tmp")
    case.addCleanup(shutil.rmtree, directory)
    return directory


def writeConfig(case: SynchronousTestCase, queueDirectory: str) -> str:
    """
    A valid configuration file whose spool is C{queueDirectory}.
    """
    path = os.path.abspath(case.mktemp()) + ".toml"
    maildir = os.path.abspath(case.mktemp())
    with open(path, "w") as f:
        f.write(
            "[[listener]]\n"
            'endpoint = "tcp:port=2525"\n'
            'tls = "none"\n'
            "[auth]\n"
            "require_tls = false\n"
            "[queue]\n"
            f'directory = "{queueDirectory}"\n'
            "[delivery]\n"
            f'directory = "{maildir}"\n'
        )
    return path


class SpoolFixture:
    """
    A spool in a short directory, written by the real L{Spool} and then
    released (as if the relay had stopped), and a configuration naming it.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.directory = shortDirectory(case)
        self.config = writeConfig(case, self.directory)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.spool = Spool(self.directory, runNow, self.clock)
        self.spool.prepare()
        self.releaseLock()

    def releaseLock(self) -> None:
        """
        Let go of the lock L{Spool.prepare} took: the relay is not running.
        """
        self.spool._lockFile.close()
        self.spool._lockFile = None

    def add(self, data: bytes, receivedAt: float, **fields: Any) -> str:
        """
        Commit a message received at C{receivedAt}; return its queue id.
        """
        self.clock.advance(receivedAt - self.clock.seconds())
        writer = self.spool.newMessage()
        writer.write(data)
        envelope = Envelope(
            queueId=writer.queueId,
            receivedAt=receivedAt,
            size=len(data),
            **fields,
        )
        return self.case.successResultOf(writer.commit(envelope))

    def addA(self) -> str:
        """
        A message two hours old, retried twice, for three recipients.
        """
        return self.add(
            MESSAGE_A,
            NOW - 2 * 3600 - 5,
            sender="alice@example.org",
            recipients=("bob@example.net", "carol@example.net", "dave@example.net"),
            auth="alice",
            authUser="alice",
            clientAddress="192.0.2.1",
            helo="client.example",
            attempts=(
                Attempt(NOW - 3600, "smtp.example.net", "421 4.3.2 shutting down"),
                Attempt(NOW - 600, "smtp.example.net", GREYLISTED),
            ),
            nextAttempt=NOW + 300,
        )

    def addB(self) -> str:
        """
        A bounce (null sender) three minutes old, never attempted.
        """
        return self.add(
            MESSAGE_B,
            NOW - 185,
            sender="",
            recipients=("postmaster@example.com",),
            clientAddress="127.0.0.1",
            helo="localhost",
        )

    def files(self, queueId: str) -> list[str]:
        """
        The files of C{queueId} in C{queued/}.
        """
        return sorted(
            name
            for name in os.listdir(self.spool.queuedDirectory)
            if name.startswith(queueId)
        )

    def holdLock(self) -> None:
        """
        Lock the spool through another open file description, as the
        running relay does.
        """
        f = open(os.path.join(self.directory, "lock"))
        self.case.addCleanup(f.close)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def run(self, *argv: str, **kw: Any) -> tuple[int, str, str]:
        """
        Run C{queue --config CONFIG ARGV...}; return the status, stdout and
        stderr.
        """
        return run("--config", self.config, *argv, **kw)


def run(*argv: str, **kw: Any) -> tuple[int, str, str]:
    """
    Run L{queueCommand} at L{NOW}; return the status, stdout and stderr.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    kw.setdefault("now", lambda: NOW)
    kw.setdefault("width", 160)
    status = queueCommand(list(argv), stdout, stderr, **kw)
    return status, stdout.getvalue(), stderr.getvalue()


class FakeRelay:
    """
    A blocking control-socket server in a thread: accepts one connection,
    records the request line and answers C{reply} (or, if C{reply} is
    C{None}, nothing until the test ends).
    """

    def __init__(
        self, case: SynchronousTestCase, directory: str, reply: bytes | None
    ) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self._release = threading.Event()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(os.path.join(directory, "control.sock"))
        self._socket.listen(1)
        self._socket.settimeout(10)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        case.addCleanup(self.stop)

    def _serve(self) -> None:
        try:
            connection, _ = self._socket.accept()
        except OSError:
            return
        with connection:
            data = b""
            while b"\n" not in data:
                chunk = connection.recv(1024)
                if not chunk:
                    break
                data += chunk
            self.requests.append(data)
            if self.reply is None:
                self._release.wait(10)
            else:
                connection.sendall(self.reply)

    def stop(self) -> None:
        self._release.set()
        self._socket.close()
        self._thread.join(10)


class UsageTests(SynchronousTestCase):
    """
    Arguments, configuration errors and the C{cli} dispatch.
    """

    def test_help(self) -> None:
        """
        C{-h} and C{--help} print the usage to stdout, status 0.
        """
        for flag in ("-h", "--help"):
            self.assertEqual(run(flag), (0, USAGE, ""))

    def test_usageErrors(self) -> None:
        """
        Wrong arguments are named on stderr with the usage, status 2.
        """
        cases = {
            (): "--config PATH is required",
            ("list",): "--config PATH is required",
            ("-c", "x.toml"): "no command given",
            ("-c",): "-c needs a value",
            ("--config",): "--config needs a value",
            ("-c", "x.toml", "frob"): "unknown command 'frob'",
            ("-c", "x.toml", "list", "extra"): "list takes no arguments",
            ("-c", "x.toml", "flush", "0123456789"): "flush takes no arguments",
            ("-c", "x.toml", "show"): "show takes a queue id",
            ("-c", "x.toml", "delete"): "delete takes a queue id",
            ("-c", "x.toml", "bounce", "A" * 10, "B" * 10): "bounce takes a queue id",
            ("-c", "x.toml", "show", "../../etc/passwd"): "not a queue id",
            ("-c", "x.toml", "delete", "abcdef0123"): "not a queue id",
            ("-c", "x.toml", "--json", "show", "A" * 10): "--json goes with list",
            ("-c", "x.toml", "--verbose", "list"): "unknown option '--verbose'",
        }
        for argv, message in cases.items():
            status, out, err = run(*argv)
            self.assertEqual((status, out), (2, ""), argv)
            self.assertTrue(err.startswith("smtpauth-relay queue: " + message), err)
            self.assertTrue(err.endswith(USAGE), argv)

    def test_configErrors(self) -> None:
        """
        A configuration that cannot be loaded gives its problems on stderr,
        status 1, before anything else is done.
        """
        missing = os.path.abspath(self.mktemp())
        status, out, err = run("--config", missing, "list")
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(err.startswith(f"{missing}: cannot read configuration"))

    def test_optionForms(self) -> None:
        """
        C{-c PATH}, C{--config PATH} and C{--config=PATH} all work, before
        or after the command.
        """
        fixture = SpoolFixture(self)
        for argv in (
            ("-c", fixture.config, "list"),
            ("--config", fixture.config, "list"),
            (f"--config={fixture.config}", "list"),
            ("list", "-c", fixture.config),
        ):
            self.assertEqual(run(*argv), (0, "queue is empty\n", ""), argv)

    def test_cliDispatch(self) -> None:
        """
        C{smtpauth-relay queue ...} runs L{queueCommand}, and the top-level
        usage names it.
        """
        self.assertIn("queue", cli.COMMANDS)
        self.assertIn("queue --config PATH", cli.USAGE)
        stdout, stderr = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["queue", "--help"], stdout, stderr), 0)
        self.assertEqual(stdout.getvalue(), USAGE)

    def test_noSpool(self) -> None:
        """
        A queue directory that does not exist is an error naming it, status 1.
        """
        directory = os.path.abspath(self.mktemp())
        config = writeConfig(self, directory)
        status, out, err = run("-c", config, "list")
        self.assertEqual((status, out), (1, ""))
        self.assertIn(os.path.join(directory, "queued"), err)


class HumanDurationTests(SynchronousTestCase):
    """
    Tests for L{humanDuration}.
    """

    def test_units(self) -> None:
        """
        Seconds, minutes, hours and days, rounded down; negative is 0s.
        """
        cases = {
            -5: "0s",
            0: "0s",
            59.9: "59s",
            60: "1m",
            3599: "59m",
            3600: "1h",
            86399: "23h",
            86400: "1d",
            5 * 86400 + 7000: "5d",
        }
        for seconds, text in cases.items():
            self.assertEqual(humanDuration(seconds), text, seconds)


class ListTests(SynchronousTestCase):
    """
    C{queue list}: read straight from the spool.
    """

    def setUp(self) -> None:
        self.fixture = SpoolFixture(self)

    def test_empty(self) -> None:
        """
        An empty queue says so.
        """
        self.assertEqual(self.fixture.run("list"), (0, "queue is empty\n", ""))

    def test_table(self) -> None:
        """
        One row per message, oldest first: id, age, size, sender (C{<>} for
        the null sender), first recipient and how many more, attempts, next
        attempt (C{now} when due) and the last attempt's reply; then the
        totals.
        """
        a, b = self.fixture.addA(), self.fixture.addB()
        status, out, err = self.fixture.run("list")
        self.assertEqual((status, err), (0, ""))
        size = len(MESSAGE_A) + len(MESSAGE_B)
        self.assertEqual(
            out,
            "ID                           AGE  SIZE  SENDER             "
            "RECIPIENTS              ATTEMPTS  NEXT   LAST ERROR\n"
            f"{a}  2h    {len(MESSAGE_A)}  alice@example.org  "
            f"bob@example.net (+2)           2  in 5m  {GREYLISTED}\n"
            f"{b}  3m     {len(MESSAGE_B)}  <>                 "
            "postmaster@example.com         0  now    -\n"
            f"2 messages, {size} bytes\n",
        )

    def test_oneMessage(self) -> None:
        """
        The total of a single message is in the singular.
        """
        self.fixture.addB()
        out = self.fixture.run("list")[1]
        self.assertTrue(out.endswith(f"\n1 message, {len(MESSAGE_B)} bytes\n"))

    def test_lastErrorTruncated(self) -> None:
        """
        The last error is cut to fit the width, and put on one line.
        """
        self.fixture.add(
            b"x\n",
            NOW,
            sender="a@example.org",
            recipients=("b@example.org",),
            attempts=(Attempt(NOW, "mx", "550 5.1.1 " + "no such user\r\n" * 20),),
        )
        out = self.fixture.run("list", width=110)[1]
        row = out.splitlines()[1]
        self.assertEqual(len(row), 110)
        self.assertTrue(row.endswith("  550 5.1.1 no such use..."), row)

    def test_controlCharacters(self) -> None:
        """
        Control characters from upstream replies or addresses never reach
        the terminal.
        """
        self.fixture.add(
            b"x\n",
            NOW,
            sender="a\x1b]0;pwned\x07@example.org",
            recipients=("b@example.org",),
            attempts=(Attempt(NOW, "mx", "451 \x1b[2Jcleared"),),
        )
        out = self.fixture.run("list")[1]
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x07", out)
        self.assertIn("a?]0;pwned?@example.org", out)
        self.assertIn("451 ?[2Jcleared", out)

    def test_json(self) -> None:
        """
        C{list --json} prints every message as a JSON object, for scripts:
        full recipient list, raw times, the null sender as C{""}.
        """
        a, b = self.fixture.addA(), self.fixture.addB()
        status, out, err = self.fixture.run("list", "--json")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            json.loads(out),
            [
                {
                    "id": a,
                    "receivedAt": NOW - 7205,
                    "size": len(MESSAGE_A),
                    "sender": "alice@example.org",
                    "recipients": [
                        "bob@example.net",
                        "carol@example.net",
                        "dave@example.net",
                    ],
                    "authUser": "alice",
                    "attempts": 2,
                    "nextAttempt": NOW + 300,
                    "lastError": GREYLISTED,
                },
                {
                    "id": b,
                    "receivedAt": NOW - 185,
                    "size": len(MESSAGE_B),
                    "sender": "",
                    "recipients": ["postmaster@example.com"],
                    "authUser": None,
                    "attempts": 0,
                    "nextAttempt": 0,
                    "lastError": None,
                },
            ],
        )

    def test_jsonEmpty(self) -> None:
        """
        An empty queue is an empty JSON list.
        """
        self.assertEqual(self.fixture.run("list", "--json"), (0, "[]\n", ""))

    def test_vanishedMessage(self) -> None:
        """
        A message that leaves the queue while it is being listed (here: an
        envelope name whose file is gone) is left out without complaint.
        """
        b = self.fixture.addB()
        os.symlink(
            "gone", os.path.join(self.fixture.spool.queuedDirectory, "0" * 27 + ".env")
        )
        status, out, err = self.fixture.run("list")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(len(out.splitlines()), 3)
        self.assertIn(b, out)

    def test_corruptEnvelope(self) -> None:
        """
        An envelope that cannot be read is named on stderr; the others are
        listed.
        """
        b = self.fixture.addB()
        with open(
            os.path.join(self.fixture.spool.queuedDirectory, "F" * 27 + ".env"), "w"
        ) as f:
            f.write("{")
        status, out, err = self.fixture.run("list")
        self.assertEqual(status, 0)
        self.assertIn(b, out)
        self.assertTrue(err.startswith(f"smtpauth-relay queue: {'F' * 27}: unreadable"))

    def test_whileRelayRuns(self) -> None:
        """
        Listing needs no lock: it works while the relay holds the spool.
        """
        b = self.fixture.addB()
        self.fixture.holdLock()
        status, out, err = self.fixture.run("list")
        self.assertEqual((status, err), (0, ""))
        self.assertIn(b, out)


class ShowTests(SynchronousTestCase):
    """
    C{queue show ID}.
    """

    def setUp(self) -> None:
        self.fixture = SpoolFixture(self)

    def test_show(self) -> None:
        """
        Every envelope field, every attempt (time, host, reply) and the
        message's headers, not its body.
        """
        a = self.fixture.addA()
        status, out, err = self.fixture.run("show", a)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out,
            f"id:           {a}\n"
            "received:     2027-01-15 05:59:55 UTC (2h ago)\n"
            "sender:       <alice@example.org>\n"
            "recipients:   bob@example.net\n"
            "              carol@example.net\n"
            "              dave@example.net\n"
            f"size:         {len(MESSAGE_A)} bytes, 7BIT\n"
            "client:       192.0.2.1 (HELO client.example)\n"
            "auth user:    alice\n"
            "AUTH=:        alice\n"
            "next attempt: 2027-01-15 08:05:00 UTC (in 5m)\n"
            "delay warned: no\n"
            "attempts:     2\n"
            "  2027-01-15 07:00:00 UTC  smtp.example.net  421 4.3.2 shutting down\n"
            f"  2027-01-15 07:50:00 UTC  smtp.example.net  {GREYLISTED}\n"
            "headers:\n"
            "  Received: from client.example (client.example [192.0.2.1])\n"
            "      by relay.example with ESMTPSA id 1\n"
            "  Subject: quarterly report\n"
            "  From: alice@example.org\n",
        )

    def test_showBounce(self) -> None:
        """
        The null sender shows as C{<>}, a trusted-network client as such,
        and a due message as due now.
        """
        b = self.fixture.addB()
        out = self.fixture.run("show", b)[1]
        self.assertIn("sender:       <>\n", out)
        self.assertIn("auth user:    - (trusted network)\n", out)
        self.assertIn("next attempt: now\n", out)
        self.assertIn("attempts:     0\nheaders:\n  Subject: bounce\n", out)

    def test_unknown(self) -> None:
        """
        An id not in the queue is an error naming it, status 1.
        """
        self.fixture.addB()
        status, out, err = self.fixture.run("show", "0123456789ABCDEF")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            err, "smtpauth-relay queue: no message 0123456789ABCDEF in the queue\n"
        )

    def test_messageGone(self) -> None:
        """
        If the message bytes go (delivered) between reading the envelope
        and the headers, the envelope is still shown.
        """
        b = self.fixture.addB()
        os.unlink(self.fixture.spool.messagePath(b))
        status, out, err = self.fixture.run("show", b)
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(
            out.endswith("headers:\n  (the message has just left the queue)\n")
        )


class OfflineTests(SynchronousTestCase):
    """
    C{flush}, C{delete} and C{bounce} while the relay is not running.
    """

    def setUp(self) -> None:
        self.fixture = SpoolFixture(self)

    def assertUnlocked(self) -> None:
        """
        Nobody holds the spool lock any more.
        """
        with open(os.path.join(self.fixture.directory, "lock")) as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_delete(self) -> None:
        """
        C{delete} removes the message's envelope and bytes itself, says so
        like the relay would, and lets go of the lock.
        """
        a, b = self.fixture.addA(), self.fixture.addB()
        self.assertEqual(self.fixture.run("delete", a), (0, f"OK deleted {a}\n", ""))
        self.assertEqual(self.fixture.files(a), [])
        self.assertEqual(self.fixture.files(b), [f"{b}.env", f"{b}.msg"])
        self.assertUnlocked()

    def test_deleteEnvelopeWithoutBytes(self) -> None:
        """
        An envelope whose bytes are already gone is still deleted.
        """
        b = self.fixture.addB()
        os.unlink(self.fixture.spool.messagePath(b))
        self.assertEqual(self.fixture.run("delete", b)[0], 0)
        self.assertEqual(self.fixture.files(b), [])

    def test_deleteUnknown(self) -> None:
        """
        Deleting an id not in the queue fails, status 1, touching nothing.
        """
        b = self.fixture.addB()
        self.assertEqual(
            self.fixture.run("delete", "0123456789"),
            (1, "", "ERR unknown message 0123456789\n"),
        )
        self.assertEqual(self.fixture.files(b), [f"{b}.env", f"{b}.msg"])

    def test_deleteCreatesNoLock(self) -> None:
        """
        A spool without a C{lock} file (no relay ever ran on it) gets none
        from the command: a root-owned lock would stop the relay.
        """
        b = self.fixture.addB()
        os.unlink(os.path.join(self.fixture.directory, "lock"))
        self.assertEqual(self.fixture.run("delete", b)[0], 0)
        self.assertFalse(os.path.exists(os.path.join(self.fixture.directory, "lock")))

    def test_flush(self) -> None:
        """
        C{flush} needs the relay: it says nothing was done, status 1.
        """
        b = self.fixture.addB()
        status, out, err = self.fixture.run("flush")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("the relay is not running; nothing was done", err)
        self.assertEqual(self.fixture.files(b), [f"{b}.env", f"{b}.msg"])
        self.assertUnlocked()

    def test_bounce(self) -> None:
        """
        C{bounce} needs the relay (the bounce is written by its queue
        runner): status 1, nothing touched.
        """
        b = self.fixture.addB()
        status, out, err = self.fixture.run("bounce", b)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("the relay must be running to send a bounce", err)
        self.assertEqual(self.fixture.files(b), [f"{b}.env", f"{b}.msg"])


class ThroughRelayTests(SynchronousTestCase):
    """
    C{flush}, C{delete} and C{bounce} while the relay runs (the spool lock
    is held by another open file): requests go over the control socket,
    here to a fake relay.
    """

    def setUp(self) -> None:
        self.fixture = SpoolFixture(self)
        self.fixture.holdLock()

    def test_delete(self) -> None:
        """
        C{delete} sends C{DELETE ID}, prints the relay's C{OK} reply, status
        0, and leaves the files to the relay.
        """
        b = self.fixture.addB()
        relay = FakeRelay(self, self.fixture.directory, f"OK deleted {b}\n".encode())
        self.assertEqual(self.fixture.run("delete", b), (0, f"OK deleted {b}\n", ""))
        self.assertEqual(relay.requests, [f"DELETE {b}\n".encode()])
        self.assertEqual(self.fixture.files(b), [f"{b}.env", f"{b}.msg"])

    def test_flushAndBounce(self) -> None:
        """
        C{flush} sends C{FLUSH} and C{bounce} sends C{BOUNCE ID}.
        """
        relay = FakeRelay(self, self.fixture.directory, b"OK 4 scheduled\n")
        self.assertEqual(self.fixture.run("flush"), (0, "OK 4 scheduled\n", ""))
        self.assertEqual(relay.requests, [b"FLUSH\n"])
        relay.stop()
        os.unlink(os.path.join(self.fixture.directory, "control.sock"))
        relay = FakeRelay(self, self.fixture.directory, b"OK bounced 0123456789\n")
        self.assertEqual(self.fixture.run("bounce", "0123456789")[0], 0)
        self.assertEqual(relay.requests, [b"BOUNCE 0123456789\n"])

    def test_errorReply(self) -> None:
        """
        An C{ERR} reply goes to stderr, status 1.
        """
        reply = "ERR busy 0123456789: being delivered, try again\n"
        FakeRelay(self, self.fixture.directory, reply.encode())
        self.assertEqual(self.fixture.run("delete", "0123456789"), (1, "", reply))

    def test_noSocket(self) -> None:
        """
        A running relay without a control socket (still starting, or an
        older version) is reported, status 1; nothing is touched.
        """
        b = self.fixture.addB()
        status, out, err = self.fixture.run("delete", b)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("the relay is running but its control socket", err)
        self.assertIn("No such file or directory", err)
        self.assertEqual(self.fixture.files(b), [f"{b}.env", f"{b}.msg"])

    def test_closedWithoutReply(self) -> None:
        """
        A relay that closes without a complete reply line is reported,
        status 1.
        """
        FakeRelay(self, self.fixture.directory, b"OK del")
        status, out, err = self.fixture.run("flush")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("closed the connection without a reply", err)

    def test_noReply(self) -> None:
        """
        A relay that does not answer in time is reported, with a warning
        that the request may still be carried out, status 1.
        """
        FakeRelay(self, self.fixture.directory, None)
        status, out, err = self.fixture.run("flush", timeout=0.2)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no reply from the relay within 0.2 seconds", err)


@implementer(IQueueControl)
class RecordingQueueControl:
    """
    An L{IQueueControl} that knows one message, answers at once and
    records what it was asked.
    """

    def __init__(self, known: str) -> None:
        self.known = known
        self.calls: list[tuple[str, str | None]] = []

    def flush(self) -> int:
        self.calls.append(("flush", None))
        return 1

    def _act(self, method: str, queueId: str) -> Deferred[None]:
        self.calls.append((method, queueId))
        if queueId != self.known:
            return fail(KeyError(queueId))
        return succeed(None)

    def delete(self, queueId: str) -> Deferred[None]:
        return self._act("delete", queueId)

    def bounce(self, queueId: str) -> Deferred[None]:
        if queueId == self.known:
            self.calls.append(("bounce", queueId))
            return fail(QueueBusy(queueId))
        return self._act("bounce", queueId)


class RoundTripTests(TestCase):
    """
    The command against the real control service on a real UNIX socket,
    the command in a thread, the service on the reactor.
    """

    def test_roundTrip(self) -> Deferred[None]:
        """
        Each request reaches the queue control through the socket and each
        reply comes back to the command's output and status.
        """
        from twisted.internet import reactor

        fixture = SpoolFixture(self)
        b = fixture.addB()
        fixture.holdLock()
        control = RecordingQueueControl(b)
        self.assertTrue(verifyObject(IQueueControl, control))
        service = makeControlService(fixture.directory, control, reactor)
        service.startService()
        self.addCleanup(service.stopService)

        def runAll() -> list[tuple[int, str, str]]:
            return [
                fixture.run("flush"),
                fixture.run("delete", b),
                fixture.run("delete", "0123456789"),
                fixture.run("bounce", b),
            ]

        def check(results: list[tuple[int, str, str]]) -> None:
            self.assertEqual(
                results,
                [
                    (0, "OK 1 scheduled\n", ""),
                    (0, f"OK deleted {b}\n", ""),
                    (1, "", "ERR unknown message 0123456789\n"),
                    (1, "", f"ERR busy {b}: being delivered, try again\n"),
                ],
            )
            self.assertEqual(
                control.calls,
                [
                    ("flush", None),
                    ("delete", b),
                    ("delete", "0123456789"),
                    ("bounce", b),
                ],
            )
            mode = os.stat(os.path.join(fixture.directory, "control.sock")).st_mode
            self.assertEqual(mode & 0o777, 0o600)

        d: Deferred[None] = deferToThread(runAll).addCallback(check)
        return d
