"""
Where blocking work runs: C{runInThread(f, *args) -> Deferred} callables.

Disk and hash work never runs on the reactor thread.  The spool and the
Maildir get a thread pool of their own, so that a flood of password checks
(bcrypt on the reactor's pool) cannot delay the fsync before a 250.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.threadpool import ThreadPool

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


def ownThreadPool(reactor: Any, name: str, maxThreads: int) -> ThreadPool:
    """
    A thread pool started when C{reactor} runs and stopped after it has
    shut down, once every service has finished with it.
    """
    pool = ThreadPool(minthreads=0, maxthreads=maxThreads, name=name)
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
    return pool
