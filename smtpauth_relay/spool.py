"""
The durable spool: every accepted message is here, fsynced, before the client
hears 250.

Layout of the queue directory::

    tmp/            files being written (emptied at start)
    queued/ID.msg   message bytes: LF line endings, not dot-stuffed
    queued/ID.env   JSON envelope (L{smtpauth_relay.envelope.Envelope})

A message exists in the queue exactly when its C{.env} file does: the bytes
are renamed into C{queued/} first, the envelope last, and the directory is
fsynced before the commit's L{Deferred} fires.  A C{.msg} without a C{.env}
is the trace of a crash before the 250 and is removed at start.

Every file operation runs off the reactor thread (C{runInThread}); the
operations of one message run in order.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay.envelope import Envelope
from smtpauth_relay.errors import SpoolError
from smtpauth_relay.interfaces import ISpool, ISpoolWriter

T = TypeVar("T")
RunInThread = Callable[..., "Deferred[Any]"]

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}

log = Logger()


def reactorThreadRunner(reactor: Any) -> RunInThread:
    """
    A C{runInThread} that uses C{reactor}'s thread pool.
    """
    from twisted.internet.threads import deferToThreadPool

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def fsyncDirectory(path: str) -> None:
    """
    Make the entries of directory C{path} (renames, unlinks) durable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeFileDurably(directory: str, tmpDirectory: str, name: str, data: bytes) -> None:
    """
    Write C{data} to C{directory/name} atomically: a temp file in
    C{tmpDirectory} (same file system), fsync, rename, fsync of C{directory}.
    """
    tmp = os.path.join(tmpDirectory, name + "." + secrets.token_hex(4))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, name))
    fsyncDirectory(directory)


def newQueueId(now: float) -> str:
    """
    A queue id that sorts by time: milliseconds in hex, then randomness.
    """
    return f"{int(now * 1000):011X}{secrets.token_hex(3).upper()}"


def _spoolError(e: OSError, what: str) -> SpoolError:
    return SpoolError(f"{what}: {e}", insufficientStorage=e.errno in _NO_SPACE)


@implementer(ISpoolWriter)
class SpoolWriter:
    """
    Writes one message; see L{ISpoolWriter}.
    """

    def __init__(self, spool: Spool, queueId: str) -> None:
        self.queueId = queueId
        self._spool = spool
        self._tmpPath = os.path.join(spool.tmpDirectory, queueId + ".msg")
        self._file: Any = None
        self._error: OSError | None = None
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._tail: Deferred[None] = succeed(None)
        self._finished = False

    def write(self, data: bytes) -> None:
        """
        Buffer C{data}; hand it to the writing thread in chunks.
        """
        if self._finished:
            raise RuntimeError("write after commit or abort")
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize >= self._spool.chunkSize:
            self._flushPending()

    def _flushPending(self) -> None:
        chunk = b"".join(self._pending)
        self._pending = []
        self._pendingSize = 0
        if chunk:
            self._then(self._writeChunk, chunk)

    def _then(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} in the writing thread after everything queued before;
        the returned L{Deferred} has its outcome, the queue goes on either way.
        """
        result: Deferred[Any] = Deferred()

        def run(_: object) -> Deferred[Any]:
            return self._spool.runInThread(f, *args).chainDeferred(result)

        self._tail.addCallback(run)
        return result

    def _writeChunk(self, chunk: bytes) -> None:
        if self._error is not None:
            return
        try:
            if self._file is None:
                self._file = open(self._tmpPath, "wb")
            self._file.write(chunk)
        except OSError as e:
            self._error = e

    def _commitInThread(self, envelope: Envelope) -> str:
        spool = self._spool
        if self._error is not None:
            self._discardInThread()
            raise _spoolError(self._error, "writing message")
        try:
            if self._file is None:
                self._file = open(self._tmpPath, "wb")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._tmpPath, spool.messagePath(self.queueId))
            writeFileDurably(
                spool.queuedDirectory,
                spool.tmpDirectory,
                self.queueId + ".env",
                envelope.toJSON(),
            )
        except OSError as e:
            self._discardInThread()
            raise _spoolError(e, "committing message") from e
        return self.queueId

    def _discardInThread(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        for path in (self._tmpPath, self._spool.messagePath(self.queueId)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("could not remove {path}: {error}", path=path, error=e)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        """
        See L{ISpoolWriter.commit}.
        """
        if envelope.queueId != self.queueId:
            raise ValueError("envelope belongs to another message")
        self._flushPending()
        self._finished = True
        d = self._then(self._commitInThread, envelope)

        def committed(queueId: str) -> str:
            self._spool._committed(queueId)
            return queueId

        return d.addCallback(committed)

    def abort(self) -> Deferred[None]:
        """
        See L{ISpoolWriter.abort}.
        """
        self._pending = []
        self._pendingSize = 0
        self._finished = True
        return self._then(self._discardInThread)


@implementer(ISpool)
class Spool:
    """
    The on-disk spool; see the module docstring for the layout.

    @ivar chunkSize: bytes buffered in memory before a write to disk.
    """

    chunkSize = 256 * 1024

    def __init__(
        self,
        directory: str,
        runInThread: RunInThread,
        clock: Any,
    ) -> None:
        self.directory = directory
        self.tmpDirectory = os.path.join(directory, "tmp")
        self.queuedDirectory = os.path.join(directory, "queued")
        self.runInThread = runInThread
        self._clock = clock
        self._listeners: list[Callable[[str], object]] = []

    def prepare(self) -> None:
        """
        Create the directories and clear the traces of a crash: partial files
        in C{tmp/} and message bytes whose envelope was never committed.

        Blocking; call before the listeners start.
        """
        for d in (self.directory, self.tmpDirectory, self.queuedDirectory):
            os.makedirs(d, mode=0o750, exist_ok=True)
        for name in os.listdir(self.tmpDirectory):
            os.unlink(os.path.join(self.tmpDirectory, name))
        names = set(os.listdir(self.queuedDirectory))
        for name in names:
            if name.endswith(".msg") and name[:-4] + ".env" not in names:
                log.info("removing uncommitted spool file {name}", name=name)
                os.unlink(os.path.join(self.queuedDirectory, name))
        fsyncDirectory(self.queuedDirectory)

    def newMessage(self) -> SpoolWriter:
        """
        See L{ISpool.newMessage}.
        """
        return SpoolWriter(self, newQueueId(self._clock.seconds()))

    def queued(self) -> list[str]:
        """
        See L{ISpool.queued}.
        """
        return sorted(
            name[:-4]
            for name in os.listdir(self.queuedDirectory)
            if name.endswith(".env")
        )

    def load(self, queueId: str) -> Envelope:
        """
        See L{ISpool.load}.
        """
        try:
            with open(self._envelopePath(queueId), "rb") as f:
                return Envelope.fromJSON(f.read())
        except FileNotFoundError:
            raise KeyError(queueId) from None

    def messagePath(self, queueId: str) -> str:
        """
        See L{ISpool.messagePath}.
        """
        return os.path.join(self.queuedDirectory, queueId + ".msg")

    def _envelopePath(self, queueId: str) -> str:
        return os.path.join(self.queuedDirectory, queueId + ".env")

    def saveEnvelope(self, envelope: Envelope) -> Deferred[None]:
        """
        See L{ISpool.saveEnvelope}.
        """
        return self.runInThread(
            writeFileDurably,
            self.queuedDirectory,
            self.tmpDirectory,
            envelope.queueId + ".env",
            envelope.toJSON(),
        )

    def remove(self, queueId: str) -> Deferred[None]:
        """
        See L{ISpool.remove}.  The envelope goes first, so a crash half-way
        leaves bytes that L{prepare} cleans, never an envelope without bytes.
        """

        def removeInThread() -> None:
            os.unlink(self._envelopePath(queueId))
            try:
                os.unlink(self.messagePath(queueId))
            except FileNotFoundError:
                pass
            fsyncDirectory(self.queuedDirectory)

        return self.runInThread(removeInThread)

    def addListener(self, listener: Callable[[str], object]) -> None:
        """
        See L{ISpool.addListener}.
        """
        self._listeners.append(listener)

    def _committed(self, queueId: str) -> None:
        for listener in self._listeners:
            try:
                listener(queueId)
            except Exception:
                log.failure("spool listener failed for {queueId}", queueId=queueId)
