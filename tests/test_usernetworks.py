"""
Tests for per-user login networks and the watched file they live in.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.usernetworks import UserNetworks
from smtpauth_relay.watchedfile import WatchedFile
from tests.support import Harness, plain


class UserNetworksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write(
            "# office only\nalice: 192.0.2.0/24, 2001:db8::/48\nbad line\n"
            "carol: 10.0.0.1/8\n"
        )
        self.networks = UserNetworks(self.path)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def test_listedUser(self) -> None:
        """
        A listed user may log in from its networks only (IPv4, IPv6, and
        IPv4-mapped addresses).
        """
        self.assertTrue(self.networks.mayLogIn("alice", "192.0.2.77"))
        self.assertTrue(self.networks.mayLogIn("alice", "::ffff:192.0.2.77"))
        self.assertTrue(self.networks.mayLogIn("alice", "2001:db8:0:1::5"))
        self.assertFalse(self.networks.mayLogIn("alice", "198.51.100.1"))

    def test_unlistedUser(self) -> None:
        """
        Users not in the file are not restricted; malformed lines (a
        network with host bits set, no colon) are skipped.
        """
        self.assertTrue(self.networks.mayLogIn("bob", "198.51.100.1"))
        self.assertTrue(self.networks.mayLogIn("carol", "198.51.100.1"))

    def test_reread(self) -> None:
        """
        A change to the file takes effect at the next login.
        """
        self.write("alice: 198.51.100.0/24\n")
        os.utime(self.path, ns=(1, 1))
        self.assertTrue(self.networks.mayLogIn("alice", "198.51.100.1"))
        self.assertFalse(self.networks.mayLogIn("alice", "192.0.2.77"))

    def test_unreadableFailsClosed(self) -> None:
        """
        If the file cannot be read, no login is allowed (nobody it might
        restrict gets through).
        """
        os.unlink(self.path)
        self.assertFalse(self.networks.mayLogIn("bob", "192.0.2.1"))

    def test_missingAtStart(self) -> None:
        """
        A missing file at start is an error the configuration reports.
        """
        self.assertRaises(OSError, UserNetworks, self.path + ".missing")


class WatchedFileTests(SynchronousTestCase):
    def test_parsedOncePerChange(self) -> None:
        """
        The file is parsed again only when it changed.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("one")
        parsed: list[bytes] = []

        def parse(data: bytes, where: str) -> bytes:
            parsed.append(data)
            return data

        watched = WatchedFile(path, parse, "test file")
        self.assertEqual(watched.current(), b"one")
        self.assertEqual(watched.current(), b"one")
        with open(path, "w") as f:
            f.write("two!")
        os.utime(path, ns=(5, 5))
        self.assertEqual(watched.current(), b"two!")
        self.assertEqual(parsed, [b"one", b"two!"])


class LoginTests(SynchronousTestCase):
    def test_loginFromOtherNetworkRefused(self) -> None:
        """
        The right password from a network the user may not log in from gets
        535 5.7.8 (and counts as a failure); from its network it works.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice: 192.0.2.0/24\n")
        harness = Harness()
        harness.factory.userNetworks = UserNetworks(path)
        outside = harness.connect("198.51.100.7")
        outside.startTLS()
        self.assertEqual(
            outside.login(), b"535 5.7.8 Authentication credentials invalid"
        )
        inside = harness.connect("192.0.2.7")
        inside.startTLS()
        self.assertEqual(inside.login(), b"235 2.7.0 Authentication successful")
        self.assertEqual(
            inside.last(b"AUTH PLAIN " + plain("bob", "builder")),
            b"503 5.5.1 Already authenticated",
        )
