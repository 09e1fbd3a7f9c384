"""
The durable spool: every accepted message is here, fsynced, before the client
hears 250.

Layout of the queue directory::

    tmp/            new files being written (emptied at start)
    free/           empty files kept for reuse (L{smtpauth_relay.filepool})
    queued/ID.msg   message bytes: LF line endings, not dot-stuffed
    queued/ID.env   JSON envelope (L{smtpauth_relay.envelope.Envelope})

A message exists in the queue exactly when its C{.env} file does: the bytes
are renamed into C{queued/} first, the envelope last, and the directory is
fsynced before the commit's L{Deferred} fires.  A C{.msg} without a C{.env}
is the trace of a crash before the 250 and is removed at start.

One relay process at a time owns a spool (C{lock}, see L{Spool.prepare});
its worker processes (C{[server] workers}) add messages to it and hand them
to it with L{Spool.adopt}.
Every file operation runs off the reactor thread (C{runInThread}); the
operations of one message run in order.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay.durable import DirectorySync, fsyncDirectory
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.errors import SpoolError, SpoolLocked
from smtpauth_relay.filepool import FilePool
from smtpauth_relay.interfaces import ISpool, ISpoolWriter
from smtpauth_relay.threads import RunInThread

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}

log = Logger()


def workerFilePrefix(worker: int) -> str:
    """
    How the names of the files worker C{worker} is writing in C{tmp/} begin.
    """
    return f"w{worker}-"


def writeFileFrom(pool: FilePool, data: bytes) -> str:
    """
    Write C{data} to a file from C{pool} and fsync it.

    @return: its path, for L{FilePool.place} or C{os.replace}.
    """
    path, fd = pool.take()
    try:
        try:
            writeAll(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(path)
        raise
    return path


def writeAll(fd: int, data: bytes) -> None:
    """
    Write all of C{data} to the file descriptor C{fd}.  Raw writes, not a
    file object: opening one costs two more system calls (C{fstat},
    C{ioctl}), each a trip through the GIL for a spool thread.
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def newQueueId(now: float) -> str:
    """
    A queue id that sorts by time: milliseconds in hex, then randomness.
    """
    return f"{int(now * 1000):011X}{secrets.token_hex(8).upper()}"


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
        # The file being written: from the spool's pool of free files.
        self._tmpPath: str | None = None
        self._fd: int | None = None
        self._error: OSError | None = None
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._tail: Deferred[None] = succeed(None)
        self._finished = False
        # What this writer made in queued/, and so may remove on failure.
        self._created: list[str] = []

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

    def _open(self) -> None:
        """
        Take a file to write from the spool's pool.
        """
        self._tmpPath, self._fd = self._spool.files.take()

    def _writeChunk(self, chunk: bytes) -> None:
        if self._error is not None:
            return
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            writeAll(self._fd, chunk)
        except OSError as e:
            self._error = e

    def _commitInThread(self, envelope: Envelope, tail: bytes = b"") -> str:
        spool = self._spool
        if tail:
            # The last bytes ride with the commit: one trip to the thread
            # pool instead of two (a small message is all tail).
            self._writeChunk(tail)
        if self._error is not None:
            self._discardInThread()
            raise _spoolError(self._error, "writing message")
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            os.fsync(self._fd)
            fd, self._fd = self._fd, None
            os.close(fd)
            self._placeInQueue(spool.messagePath(self.queueId))
            self._tmpPath = writeFileFrom(spool.files, envelope.toJSON())
            self._placeInQueue(spool._envelopePath(self.queueId))
            # The queue directory's fsync, which makes both links durable,
            # is batched with concurrent commits (commit).
        except OSError as e:
            self._discardInThread()
            raise _spoolError(e, "committing message") from e
        return self.queueId

    def _placeInQueue(self, target: str) -> None:
        """
        Give the written file its name in the queue.  C{link}, not
        C{rename}: never replace a file already queued under that name.
        """
        assert self._tmpPath is not None
        os.link(self._tmpPath, target)
        self._created.append(target)
        os.unlink(self._tmpPath)
        self._tmpPath = None

    def _discardInThread(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        # The envelope first: without it the bytes are not a message.
        for path in [*reversed(self._created), self._tmpPath]:
            if path is None:
                continue
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
        tail = b"".join(self._pending)
        self._pending = []
        self._pendingSize = 0
        self._finished = True
        return Deferred.fromCoroutine(self._commit(envelope, tail))

    async def _commit(self, envelope: Envelope, tail: bytes) -> str:
        queueId: str = await self._then(self._commitInThread, envelope, tail)
        try:
            await self._spool.directorySync.sync()
        except OSError as e:
            await self._then(self._discardInThread)
            raise _spoolError(e, "committing message") from e
        self._spool._committed(queueId, envelope)
        return queueId

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
    recentLimit = 10_000
    """At most this many committed envelopes are kept for L{recent}."""

    def __init__(
        self,
        directory: str,
        runInThread: RunInThread,
        clock: Any,
        worker: int | None = None,
    ) -> None:
        """
        @param worker: in worker process number C{worker}, which adds
            messages to the main process's spool (C{[server] workers}).
        """
        self.directory = directory
        self.tmpDirectory = os.path.join(directory, "tmp")
        self.queuedDirectory = os.path.join(directory, "queued")
        self.runInThread = runInThread
        self.directorySync = DirectorySync(self.queuedDirectory, runInThread)
        free = os.path.join(directory, "free")
        self.files = (
            FilePool(free, self.tmpDirectory)
            if worker is None
            else FilePool(
                os.path.join(free, f"w{worker}"),
                self.tmpDirectory,
                True,
                workerFilePrefix(worker),
            )
        )
        # Files out of the queue by a durable rename, to be released into
        # the pool by the next removal's thread (see remove).
        self._retired: list[str] = []
        # Envelopes just committed, for the first delivery attempt.
        self._recent: dict[str, Envelope] = {}
        self._clock = clock
        self._listeners: list[Callable[[str], object]] = []
        self._lockFile: Any = None

    def prepare(self) -> None:
        """
        Lock the spool for this process, create the directories and clear
        the traces of a crash: partial files in C{tmp/} and message bytes
        whose envelope was never committed.  An envelope without its message
        bytes (which no normal sequence leaves) is moved to C{corrupt/} for
        the admin, never deleted.

        Blocking; call before the listeners start.

        @raise SpoolLocked: if another process has the spool.
        """
        for d in (self.directory, self.tmpDirectory, self.queuedDirectory):
            os.makedirs(d, mode=0o750, exist_ok=True)
        self._lock()
        for name in os.listdir(self.tmpDirectory):
            os.unlink(os.path.join(self.tmpDirectory, name))
        names = set(os.listdir(self.queuedDirectory))
        for name in sorted(names):
            path = os.path.join(self.queuedDirectory, name)
            if name.endswith(".msg") and name[:-4] + ".env" not in names:
                log.info("removing uncommitted spool file {name}", name=name)
                os.unlink(path)
            elif name.endswith(".env") and name[:-4] + ".msg" not in names:
                corrupt = os.path.join(self.directory, "corrupt")
                os.makedirs(corrupt, mode=0o750, exist_ok=True)
                log.error(
                    "envelope {name} has no message; moved to {corrupt}",
                    name=name,
                    corrupt=corrupt,
                )
                os.rename(path, os.path.join(corrupt, name))
        fsyncDirectory(self.queuedDirectory)
        with os.scandir(self.queuedDirectory) as entries:
            self.files.prepare({entry.inode() for entry in entries})

    def _lock(self) -> None:
        """
        Hold an exclusive lock on C{lock} in the spool for as long as this
        process lives, so a second relay started on the same spool by
        mistake refuses to start instead of "cleaning up" the first one's
        messages in flight.
        """
        if self._lockFile is not None:
            return
        lockFile = open(os.path.join(self.directory, "lock"), "a")
        try:
            fcntl.flock(lockFile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lockFile.close()
            raise SpoolLocked(
                f"spool {self.directory} is in use by another smtpauth-relay"
            ) from None
        self._lockFile = lockFile

    def newMessage(self) -> SpoolWriter:
        """
        See L{ISpool.newMessage}.
        """
        return SpoolWriter(self, newQueueId(self._clock.seconds()))

    def workerEnded(self, worker: int) -> list[str]:
        """
        Worker process C{worker} ended: remove the files it was writing
        (in C{tmp/}, its messages not committed, so not answered 250).
        Blocking.

        @return: the queued messages (L{queued}), among which any the
            worker committed but did not live to report.
        """
        prefix = workerFilePrefix(worker)
        removed = 0
        for name in os.listdir(self.tmpDirectory):
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join(self.tmpDirectory, name))
                except FileNotFoundError:
                    continue
                removed += 1
        if removed:
            log.info(
                "removed {count} unfinished spool files of worker {worker}",
                count=removed,
                worker=worker,
            )
        return self.queued()

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

    def recent(self, queueId: str) -> Envelope | None:
        """
        See L{ISpool.recent}.
        """
        return self._recent.pop(queueId, None)

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
        self._recent.pop(envelope.queueId, None)

        def saveInThread() -> None:
            if not os.path.exists(self.messagePath(envelope.queueId)):
                raise KeyError(envelope.queueId)
            written = writeFileFrom(self.files, envelope.toJSON())
            try:
                os.replace(written, self._envelopePath(envelope.queueId))
            except BaseException:
                os.unlink(written)
                raise

        return self.runInThread(saveInThread).addCallback(
            lambda _: self.directorySync.sync()
        )

    def quarantine(self, queueId: str) -> Deferred[None]:
        """
        See L{ISpool.quarantine}.
        """
        self._recent.pop(queueId, None)

        def quarantineInThread() -> None:
            corrupt = os.path.join(self.directory, "corrupt")
            os.makedirs(corrupt, mode=0o750, exist_ok=True)
            for path in (self._envelopePath(queueId), self.messagePath(queueId)):
                try:
                    os.rename(path, os.path.join(corrupt, os.path.basename(path)))
                except FileNotFoundError:
                    pass
            fsyncDirectory(self.queuedDirectory)
            fsyncDirectory(corrupt)

        return self.runInThread(quarantineInThread)

    def remove(self, queueId: str) -> Deferred[None]:
        """
        See L{ISpool.remove}.  The envelope goes first, so a crash half-way
        leaves bytes that L{prepare} cleans, never an envelope without bytes.
        The files go to the pool of free files; they are handed out again
        only after the directory's fsync has made their removal durable.
        """
        self._recent.pop(queueId, None)
        released, self._retired = self._retired, []

        def removeInThread() -> list[str]:
            if released:
                self.files.release(released)
            retired = []
            for path in (self._envelopePath(queueId), self.messagePath(queueId)):
                free = self.files.retire(path)
                if free is not None:
                    retired.append(free)
            return retired

        async def removing() -> None:
            # The renames ride with the batch's directory fsync: one trip
            # to a thread for all the removals of a batch.
            retired = await self.directorySync.sync(removeInThread)
            assert retired is not None
            self._retired.extend(retired)

        return Deferred.fromCoroutine(removing())

    def addListener(self, listener: Callable[[str], object]) -> None:
        """
        See L{ISpool.addListener}.
        """
        self._listeners.append(listener)

    def adopt(
        self, queueId: str, envelope: Envelope | None, worker: int | None = None
    ) -> None:
        """
        A worker process committed C{queueId} to this spool (C{[server]
        workers}): tell the listeners, as for a message of our own.

        @param envelope: its envelope, or C{None} to read it from disk.
        @param worker: the worker's number: it is owed the two files it
            used (L{FilePool.owe}).
        """
        if worker is not None:
            self.files.owe(worker)
        self._committed(queueId, envelope)

    def _committed(self, queueId: str, envelope: Envelope | None) -> None:
        if envelope is not None and len(self._recent) < self.recentLimit:
            self._recent[queueId] = envelope
        for listener in self._listeners:
            try:
                listener(queueId)
            except Exception:
                log.failure("spool listener failed for {queueId}", queueId=queueId)
