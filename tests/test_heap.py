"""
Tests for L{smtpauth_relay.heap}: the startup heap frozen.
"""

from __future__ import annotations

import gc
import weakref

from twisted.application.service import IService
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay.heap import StartupHeapFreezer


class FakeCollector:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def get_freeze_count(self) -> int:
        return 70_000


class StartupHeapFreezerTests(SynchronousTestCase):
    def test_afterReactorRuns(self) -> None:
        """
        Nothing happens until the reactor runs; then the startup garbage is
        collected and the rest frozen, in that order, once.
        """
        reactor = MemoryReactor()
        collector = FakeCollector()
        freezer = StartupHeapFreezer(reactor, collector)
        verifyObject(IService, freezer)
        freezer.startService()
        self.assertEqual(collector.calls, [])
        reactor.run()
        self.assertEqual(collector.calls, ["collect", "freeze"])

    def test_realCollector(self) -> None:
        """
        With the real C{gc} module the objects alive are frozen, and the
        garbage of a reference cycle is collected first, not frozen.
        """
        self.addCleanup(gc.unfreeze)
        alive = Node()
        garbage = Node()
        garbage.me = garbage
        collected = weakref.ref(garbage)
        del garbage
        StartupHeapFreezer(None).freeze()
        self.assertIsNone(collected())
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertFalse(any(o is alive for o in gc.get_objects()))
        gc.unfreeze()
        self.assertTrue(any(o is alive for o in gc.get_objects()))


class Node:
    me: object = None
