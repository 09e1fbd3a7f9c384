"""
Tests for L{smtpauth_relay.systemd}, with a real datagram socket standing in
for systemd's NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.systemd import Notifier, NotifyService


class FakeSystemd:
    """
    A NOTIFY_SOCKET: a bound UNIX datagram socket.
    """

    def __init__(self, case: SynchronousTestCase, abstract: bool = False) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.socket.close)
        if abstract:
            name = f"smtpauth-test-{os.getpid()}-{id(self)}"
            self.socket.bind("\0" + name)
            self.path = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="sd", dir="/tmp")
            self.path = os.path.join(directory, "notify")
            self.socket.bind(self.path)
            case.addCleanup(os.rmdir, directory)
            case.addCleanup(os.unlink, self.path)
        self.socket.settimeout(5)

    def receive(self) -> list[str]:
        return self.socket.recv(4096).decode().split("\n")


class NotifierTests(SynchronousTestCase):
    def test_notOutsideSystemd(self) -> None:
        """
        Without NOTIFY_SOCKET nothing is sent and nothing fails.
        """
        self.assertFalse(Notifier({}).notify("READY=1"))

    def test_path(self) -> None:
        """
        States go as one datagram to the socket path.
        """
        systemd = FakeSystemd(self)
        notifier = Notifier({"NOTIFY_SOCKET": systemd.path})
        self.assertTrue(notifier.notify("READY=1", "STATUS=ok"))
        self.assertEqual(systemd.receive(), ["READY=1", "STATUS=ok"])

    def test_abstract(self) -> None:
        """
        A NOTIFY_SOCKET starting with @ is in the abstract namespace.
        """
        systemd = FakeSystemd(self, abstract=True)
        Notifier({"NOTIFY_SOCKET": systemd.path}).notify("READY=1")
        self.assertEqual(systemd.receive(), ["READY=1"])

    def test_watchdogForUs(self) -> None:
        """
        WATCHDOG_USEC sets the interval, unless WATCHDOG_PID names another
        process.
        """
        self.assertEqual(Notifier({"WATCHDOG_USEC": "30000000"}).watchdogInterval, 30)
        self.assertIsNone(
            Notifier(
                {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
            ).watchdogInterval
        )


class NotifyServiceTests(SynchronousTestCase):
    def test_readyStoppingWatchdog(self) -> None:
        """
        READY=1 at start, WATCHDOG=1 every half interval, STOPPING=1 at
        stop; RELOADING=1 then READY=1 around a reload.
        """
        systemd = FakeSystemd(self)
        clock = Clock()
        service = NotifyService(
            Notifier({"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "10000000"}),
            clock,
        )
        service.startService()
        self.assertEqual(systemd.receive(), ["READY=1", "STATUS=accepting mail"])
        self.assertEqual(systemd.receive(), ["WATCHDOG=1"])
        clock.advance(5)
        self.assertEqual(systemd.receive(), ["WATCHDOG=1"])
        service.reloading()
        reloading = systemd.receive()
        self.assertEqual(reloading[0], "RELOADING=1")
        self.assertTrue(reloading[1].startswith("MONOTONIC_USEC="))
        service.reloaded("reloaded")
        self.assertEqual(systemd.receive(), ["READY=1", "STATUS=reloaded"])
        service.stopService()
        self.assertEqual(systemd.receive(), ["STOPPING=1", "STATUS=stopping"])
        self.assertEqual(clock.getDelayedCalls(), [])
