"""
Files replaced so that a crash leaves the old content or the new, never a
part: a temporary file in the same file system, written and fsynced, renamed
over the old one, and the directory fsynced so that the rename survives too.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_T = TypeVar("_T")


def fsyncDirectory(path: str) -> None:
    """
    Make the renames and creations in directory C{path} durable.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replaceFile(
    path: str,
    data: bytes,
    mode: int | None = 0o600,
    like: os.stat_result | None = None,
) -> None:
    """
    Replace (or create) C{path} with C{data}, atomically and durably.

    @param mode: the new file's permissions; C{None} for the default of a
        temporary file (0600).
    @param like: the old file's C{stat}: its mode and owner are kept instead
        (root editing a C{root:relay 0640} file must not leave one the relay
        can no longer read).
    @raise OSError: if it cannot be written; C{path} is then as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(
        dir=directory,
        prefix=f".{os.path.basename(path)}.",
        suffix=".tmp",
    )
    try:
        with os.fdopen(fd, "wb") as f:
            if like is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(like.st_mode))
                created = os.fstat(f.fileno())
                if (created.st_uid, created.st_gid) != (like.st_uid, like.st_gid):
                    os.fchown(f.fileno(), like.st_uid, like.st_gid)
            elif mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    fsyncDirectory(directory)


class DirectorySync:
    """
    Group commit of a directory's fsync: callers whose renames are done ask
    for a sync, and one fsync, run in a thread, serves everyone who asked
    before it started; those who ask while it runs share the next one.
    Under load, N concurrent commits cost about one directory fsync per
    batch instead of N.
    """

    def __init__(self, path: str, runInThread: Any) -> None:
        """
        @param path: the directory.
        @param runInThread: runs a blocking call in a thread, returning a
            L{Deferred} of its result.
        """
        self.path = path
        self._runInThread = runInThread
        self._waiting: list[tuple[Deferred[Any], Callable[[], Any] | None]] = []
        self._running = False
        self.syncs = 0
        """How many fsyncs were run (for tests and benchmarks)."""

    def sync(self, work: Callable[[], _T] | None = None) -> Deferred[_T | None]:
        """
        @param work: file operations in the directory (renames, unlinks) to
            run in the batch's thread trip just before its fsync, so that a
            caller needs no trip of its own.  Its exception fails only this
            caller.
        @return: a L{Deferred} that fires, with C{work}'s result, once an
            fsync of the directory that started after this call has
            completed (or fails with its error).
        """
        d: Deferred[Any] = Deferred()
        self._waiting.append((d, work))
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True
        self.syncs += 1

        def syncBatch() -> list[object]:
            results: list[object] = []
            for _, work in batch:
                try:
                    results.append(work() if work is not None else None)
                except Exception:
                    results.append(Failure())
            fsyncDirectory(self.path)
            return results

        def done(outcome: list[object] | Failure) -> None:
            self._running = False
            for i, (d, _) in enumerate(batch):
                result = outcome if isinstance(outcome, Failure) else outcome[i]
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
            if self._waiting:
                self._start()

        self._runInThread(syncBatch).addBoth(done)
