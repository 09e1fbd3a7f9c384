"""
Tests for L{smtpauth_relay.delivery.maildir}.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.delivery.maildir import MaildirDelivery, uniqueName
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.interfaces import IDeliveryAgent
from smtpauth_relay.testing import RecordingRunner

ENVELOPE = Envelope(
    queueId="Q1",
    sender="alice@example.org",
    recipients=("bob@example.net", "carol@example.net"),
)


class MaildirDeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.runner = RecordingRunner()
        self.clock = Clock()
        self.clock.advance(1_800_000_000.25)
        self.agent = MaildirDelivery(self.directory, self.runner, self.clock)
        self.message = self.mktemp()
        with open(self.message, "wb") as f:
            f.write(b"Subject: hi\n\nbody \xc3\xa9\n.dot\n")

    def test_interface(self) -> None:
        """
        L{MaildirDelivery} is an L{IDeliveryAgent}.
        """
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent))

    def test_deliver(self) -> None:
        """
        The message lands in C{new/} byte for byte, under the envelope's
        Return-Path and recipients, and every recipient counts as delivered.
        """
        report = self.successResultOf(self.agent.deliver(ENVELOPE, self.message))
        self.assertEqual(report.delivered, ("bob@example.net", "carol@example.net"))
        (name,) = os.listdir(os.path.join(self.directory, "new"))
        with open(os.path.join(self.directory, "new", name), "rb") as f:
            self.assertEqual(
                f.read(),
                b"Return-Path: <alice@example.org>\n"
                b"X-Envelope-To: <bob@example.net>\n"
                b"X-Envelope-To: <carol@example.net>\n"
                b"Subject: hi\n\nbody \xc3\xa9\n.dot\n",
            )
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "cur")), [])

    def test_inThread(self) -> None:
        """
        The copy and its fsyncs run through C{runInThread}.
        """
        self.successResultOf(self.agent.deliver(ENVELOPE, self.message))
        self.assertEqual([f.__name__ for f in self.runner.calls], ["_deliverInThread"])

    def test_fsyncBeforeReport(self) -> None:
        """
        The file and the C{new/} directory are fsynced before the delivery
        is reported, since the spool copy is deleted right after.
        """
        synced: list[str] = []
        real = os.fsync

        def spy(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        self.patch(os, "fsync", spy)
        self.successResultOf(self.agent.deliver(ENVELOPE, self.message))
        new = os.path.realpath(os.path.join(self.directory, "new"))
        self.assertTrue(
            synced[0].startswith(os.path.realpath(self.directory) + "/tmp/")
        )
        self.assertEqual(synced[1], new)

    def test_failureLeavesNothing(self) -> None:
        """
        A failed delivery (missing spool file) fails the Deferred and leaves
        no partial file in the Maildir.
        """
        self.failureResultOf(
            self.agent.deliver(ENVELOPE, self.message + ".missing"), FileNotFoundError
        )
        self.assertEqual(os.listdir(os.path.join(self.directory, "new")), [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])

    def test_uniqueNames(self) -> None:
        """
        Names made in the same microsecond still differ.
        """
        self.assertNotEqual(uniqueName(1.5), uniqueName(1.5))
