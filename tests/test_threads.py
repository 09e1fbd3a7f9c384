"""
Tests for L{smtpauth_relay.threads}: where blocking work runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from smtpauth_relay.threads import ThreadRunner, ownThreadRunner, runNow


class FakeReactor:
    """
    Records what threads ask the reactor thread to do, and what runs at
    shutdown; the test runs them.
    """

    def __init__(self) -> None:
        self.fromThreads: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.triggers: list[tuple[str, str, Callable[[], Any]]] = []
        self.handedBack = threading.Event()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.fromThreads.append((f, args))
        self.handedBack.set()

    def addSystemEventTrigger(
        self, phase: str, event: str, f: Callable[[], Any]
    ) -> None:
        self.triggers.append((phase, event, f))

    def runFromThreads(self) -> int:
        calls, self.fromThreads = self.fromThreads, []
        for f, args in calls:
            f(*args)
        return len(calls)


class ThreadRunnerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.runner = ThreadRunner(self.reactor, "test", 2)
        self.addCleanup(self.runner.stop)

    def results(self, d: Deferred[Any]) -> list[Any]:
        got: list[Any] = []
        d.addBoth(got.append)
        return got

    def test_result(self) -> None:
        """
        The Deferred fires on the reactor thread with what the function
        returned, once the reactor runs what the thread handed back.
        """
        got = self.results(self.runner(lambda a, b: a + b, 2, 3))
        self.runner.stop()
        self.assertEqual(got, [])
        self.assertEqual(self.reactor.runFromThreads(), 1)
        self.assertEqual(got, [5])

    def test_exception(self) -> None:
        """
        An exception raised by the function fails the Deferred with it.
        """

        def broken() -> None:
            raise OSError(28, "No space left on device")

        d = self.runner(broken)
        self.runner.stop()
        self.reactor.runFromThreads()
        failure = self.failureResultOf(d, OSError)
        self.assertEqual(failure.value.errno, 28)

    def test_offReactorThread(self) -> None:
        """
        The function runs in another thread, named after the runner.
        """
        d = self.runner(lambda: threading.current_thread())
        self.runner.stop()
        self.reactor.runFromThreads()
        thread = self.successResultOf(d)
        self.assertIsNot(thread, threading.current_thread())
        self.assertEqual(thread.name, "test-1")

    def test_batched(self) -> None:
        """
        Jobs that finish before the reactor thread has run the first one's
        hand-back go back with it: one C{callFromThread} for all.
        """
        release = threading.Event()
        results = [self.results(self.runner(release.wait, 10)) for _ in range(5)]
        release.set()
        self.runner.stop()
        self.assertEqual(self.reactor.runFromThreads(), 1)
        self.assertEqual(results, [[True]] * 5)

    def test_atMostSize(self) -> None:
        """
        No more threads than the size run, however many jobs wait.
        """
        release = threading.Event()

        def job() -> str:
            release.wait(10)
            return threading.current_thread().name

        ds = [self.runner(job) for _ in range(6)]
        release.set()
        self.runner.stop()
        self.reactor.runFromThreads()
        names = {self.successResultOf(d) for d in ds}
        self.assertLessEqual(names, {"test-1", "test-2"})

    def test_idleThreadReused(self) -> None:
        """
        A thread whose job is done takes the next job; no second thread
        starts for jobs given one at a time.
        """
        names = []
        for _ in range(3):
            self.reactor.handedBack.clear()
            d = self.runner(lambda: threading.current_thread().name)
            # The thread counts itself idle before it hands the result back.
            self.assertTrue(self.reactor.handedBack.wait(10))
            self.reactor.runFromThreads()
            names.append(self.successResultOf(d))
        self.assertEqual(names, ["test-1"] * 3)

    def test_stopFinishesGivenJobs(self) -> None:
        """
        L{ThreadRunner.stop} returns after the jobs given before it are
        done; jobs given after it fail at once.
        """
        done: list[int] = []
        for i in range(10):
            self.runner(done.append, i)
        self.runner.stop()
        self.assertEqual(sorted(done), list(range(10)))
        self.failureResultOf(self.runner(done.append, 10), RuntimeError)
        self.assertEqual(len(done), 10)

    def test_size(self) -> None:
        """
        A runner needs a thread.
        """
        self.assertRaises(ValueError, ThreadRunner, self.reactor, "none", 0)


class OwnThreadRunnerTests(unittest.TestCase):
    def test_stoppedAfterShutdown(self) -> None:
        """
        L{ownThreadRunner} stops the runner after the reactor's shutdown.
        """
        fake = FakeReactor()
        runner = ownThreadRunner(fake, "spool", 4)
        self.assertEqual(fake.triggers, [("after", "shutdown", runner.stop)])
        self.assertEqual(runner.name, "spool")

    def test_realReactor(self) -> None:
        """
        With the real reactor the result arrives without the test's help.
        """
        runner = ThreadRunner(reactor, "real", 2)
        self.addCleanup(runner.stop)
        d = runner(sum, [1, 2, 3])
        d.addCallback(self.assertEqual, 6)
        return d


class RunNowTests(unittest.TestCase):
    def test_runNow(self) -> None:
        """
        L{runNow} runs at once and gives the result or the failure.
        """
        self.assertEqual(self.successResultOf(runNow(max, 1, 2)), 2)
        self.failureResultOf(runNow(int, "x"), ValueError)
