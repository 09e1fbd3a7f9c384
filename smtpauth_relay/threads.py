"""
Where blocking work runs: C{runInThread(f, *args) -> Deferred} callables.

Disk and hash work never runs on the reactor thread.  The spool and the
Maildir get threads of their own (L{ThreadRunner}), so that a flood of
password checks (bcrypt on the reactor's pool) cannot delay the fsync
before a 250.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

RunInThread = Callable[..., "Deferred[Any]"]
"""
C{runInThread(f, *args)} calls C{f(*args)} away from the reactor thread and
returns a L{Deferred} that fires with its result.
"""


def runNow(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    A C{runInThread} that runs C{f} at once in the caller's thread: for
    tests, and for callers that are already off the reactor thread.
    """
    try:
        return succeed(f(*args))
    except BaseException:
        return fail()


def threadPoolRunner(reactor: Any, pool: Any = None) -> RunInThread:
    """
    A C{runInThread} using C{pool}, or C{reactor}'s own thread pool.
    """
    from twisted.internet.threads import deferToThreadPool

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(
            reactor, pool if pool is not None else reactor.getThreadPool(), f, *args
        )

    return run


#: What a L{ThreadRunner} thread hands back: the Deferred, and the result or
#: the Failure (C{ok} tells which).
_Outcome = tuple["Deferred[Any]", bool, Any]


class ThreadRunner:
    """
    A C{runInThread} with threads of its own, for the spool's many small
    jobs (one or two per message accepted or delivered).

    L{twisted.internet.threads.deferToThreadPool} costs the reactor thread
    more than the spool's write and rename cost it: the pool's coordinator,
    a C{threading.Condition} per job, the log context copied in and out,
    and one C{callFromThread} per result.  Here a job is put on a
    C{queue.SimpleQueue} (C code, no Condition), and results go back in
    batches: the first finished job of a batch wakes the reactor, those
    finishing before it runs ride along.

    Threads start with the first job, at most C{size} of them; they are
    daemon threads (a job that never finishes does not keep the process
    alive), and are stopped and joined by L{stop}, which L{ownThreadRunner}
    calls after the reactor has shut down (every service has had its
    Deferreds by then).

    @ivar name: names the threads (C{name-1}, C{name-2}, ...).
    """

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        if size < 1:
            raise ValueError("a ThreadRunner needs at least one thread")
        self._reactor = reactor
        self.name = name
        self._size = size
        self._jobs: queue.SimpleQueue[
            tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._finished: list[_Outcome] = []
        self._wakeScheduled = False
        self._stopped = False

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Call C{f(*args)} in one of the threads.

        @return: a L{Deferred} fired on the reactor thread with the result,
            or with the exception as a L{Failure}.
        """
        if self._stopped:
            return fail(RuntimeError(f"thread runner {self.name} is stopped"))
        d: Deferred[Any] = Deferred()
        with self._lock:
            # A thread that finished a job and took no other since waits
            # for this one; otherwise a new thread, up to the size.
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._size:
                self._startThread()
        self._jobs.put((d, f, args))
        return d

    def _startThread(self) -> None:
        thread = threading.Thread(
            target=self._work,
            name=f"{self.name}-{len(self._threads) + 1}",
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        jobs, lock, finished = self._jobs, self._lock, self._finished
        while True:
            job = jobs.get()
            if job is None:
                return
            d, f, args = job
            outcome: _Outcome
            try:
                outcome = (d, True, f(*args))
            except BaseException:
                outcome = (d, False, Failure())
            del job, f, args
            with lock:
                finished.append(outcome)
                self._idle += 1
                if self._wakeScheduled:
                    continue
                self._wakeScheduled = True
            self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            batch = self._finished[:]
            del self._finished[:]
            self._wakeScheduled = False
        for d, ok, result in batch:
            if ok:
                d.callback(result)
            else:
                d.errback(result)

    def stop(self) -> None:
        """
        Let the threads finish the jobs already given, then end them and
        wait for them.  Later calls fail.
        """
        self._stopped = True
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()


def ownThreadRunner(reactor: Any, name: str, size: int) -> ThreadRunner:
    """
    A L{ThreadRunner} stopped after C{reactor} has shut down, once every
    service has finished with it.
    """
    runner = ThreadRunner(reactor, name, size)
    reactor.addSystemEventTrigger("after", "shutdown", runner.stop)
    return runner
