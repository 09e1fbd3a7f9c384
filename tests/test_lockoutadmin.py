"""
Tests for C{smtpauth-relay lockout} (L{smtpauth_relay.lockoutadmin}) and
the control socket's lockout requests.
"""

from __future__ import annotations

import io
import json
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.config import LockoutConfig
from smtpauth_relay.control import ControlFactory, parseRequest
from smtpauth_relay.lockout import Lockout
from smtpauth_relay.lockoutadmin import lockoutCommand
from tests.test_queueadmin import FakeRelay, SpoolFixture


def run(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    status = lockoutCommand(list(argv), stdout, stderr)
    return status, stdout.getvalue(), stderr.getvalue()


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fixture = SpoolFixture(self)

    def test_usage(self) -> None:
        """
        Missing or wrong arguments print the usage and exit 2.
        """
        for argv in ([], ["list"], ["-c", self.fixture.config], ["-c", "x", "frob"]):
            self.assertEqual(run(*argv)[0], 2, argv)
        self.assertEqual(run("-c", self.fixture.config, "clear")[0], 2)
        self.assertEqual(run("--help")[0], 0)

    def test_relayNotRunning(self) -> None:
        """
        With the relay stopped nothing is locked: list says so (0), clear
        fails (1).
        """
        status, _, err = run("-c", self.fixture.config, "list")
        self.assertEqual(status, 0)
        self.assertIn("not running", err)
        self.assertEqual(run("-c", self.fixture.config, "clear", "192.0.2.7")[0], 1)

    def test_list(self) -> None:
        """
        list asks the relay for its locks and prints one per line.
        """
        self.fixture.holdLock()
        until = time.time() + 3600
        reply = "OK " + json.dumps([{"key": "ip:192.0.2.7", "until": until}]) + "\n"
        relay = FakeRelay(self, self.fixture.directory, reply.encode())
        status, out, _ = run("-c", self.fixture.config, "list")
        self.assertEqual(status, 0)
        self.assertEqual(relay.requests, [b"LOCKOUTS\n"])
        self.assertTrue(out.startswith("ip:192.0.2.7  ends in "), out)

    def test_clear(self) -> None:
        """
        clear sends UNLOCK with the target and prints the reply.
        """
        self.fixture.holdLock()
        relay = FakeRelay(self, self.fixture.directory, b"OK unlocked 2\n")
        self.assertEqual(
            run("-c", self.fixture.config, "clear", "alice"), (0, "OK unlocked 2\n", "")
        )
        self.assertEqual(relay.requests, [b"UNLOCK alice\n"])


class ControlRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.lockout = Lockout(LockoutConfig(max_failures=1), self.clock)

    def request(self, line: bytes, lockout: Lockout | None = None) -> bytes:
        factory = ControlFactory(object(), self.clock, lockout)  # type: ignore[arg-type]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(line + b"\n")
        return transport.value()

    def test_parse(self) -> None:
        """
        LOCKOUTS takes nothing; UNLOCK takes one printable token.
        """
        self.assertEqual(parseRequest(b"LOCKOUTS"), ("LOCKOUTS", None))
        self.assertEqual(
            parseRequest(b"UNLOCK 192.0.2.0/24"), ("UNLOCK", "192.0.2.0/24")
        )
        self.assertRaises(ValueError, parseRequest, b"UNLOCK a b")
        self.assertRaises(ValueError, parseRequest, b"UNLOCK ")

    def test_lockoutsAndUnlock(self) -> None:
        """
        LOCKOUTS answers the locks as JSON; UNLOCK ends them.
        """
        self.lockout.failed("192.0.2.7", None)
        reply = self.request(b"LOCKOUTS", self.lockout)
        self.assertTrue(reply.startswith(b"OK "))
        self.assertEqual(
            json.loads(reply[3:]), [{"key": "ip:192.0.2.7", "until": 1_800_000_900.0}]
        )
        self.assertEqual(
            self.request(b"UNLOCK 192.0.2.7", self.lockout), b"OK unlocked 1\n"
        )
        self.assertEqual(self.lockout.locks(), [])

    def test_withoutLockout(self) -> None:
        """
        Without a lockout the requests are refused cleanly.
        """
        self.assertEqual(self.request(b"LOCKOUTS"), b"ERR lockout is not enabled\n")
