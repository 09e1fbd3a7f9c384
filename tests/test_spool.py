"""
Tests for L{smtpauth_relay.spool}: one contract for the real spool and its
memory fake, then what only the disk spool does (fsync, crash traces, errors).
"""

from __future__ import annotations

import errno
import json
import os
import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smtpauth_relay import durable
from smtpauth_relay import spool as spoolModule
from smtpauth_relay.durable import DirectorySync
from smtpauth_relay.envelope import Attempt, Envelope
from smtpauth_relay.errors import SpoolError, SpoolLocked
from smtpauth_relay.filepool import FilePool
from smtpauth_relay.interfaces import ISpool, ISpoolWriter
from smtpauth_relay.spool import Spool, SpoolWriter, newQueueId
from smtpauth_relay.testing import MemorySpool, RecordingRunner


def envelopeFor(queueId: str, **kw: Any) -> Envelope:
    fields: dict[str, Any] = dict(
        sender="alice@example.org",
        recipients=("bob@example.net", "carol@example.net"),
        auth="alice",
        authUser="alice",
        clientAddress="192.0.2.1",
        helo="client.example",
        receivedAt=1_800_000_000.0,
        size=12,
    )
    fields.update(kw)
    return Envelope(queueId=queueId, **fields)


class SpoolContractMixin:
    """
    What every L{ISpool} does.
    """

    spool: Any

    def makeSpool(self) -> Any:
        raise NotImplementedError()

    def messageOf(self, queueId: str) -> bytes:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.spool = self.makeSpool()
        self.committed: list[str] = []
        self.spool.addListener(self.committed.append)

    def commit(self, data: bytes = b"Subject: x\n\nhello\n", **kw: Any) -> str:
        writer = self.spool.newMessage()
        writer.write(data)
        d = writer.commit(envelopeFor(writer.queueId, **kw))
        return self.successResultOf(d)

    def test_interfaces(self) -> None:
        """
        The spool and its writers provide L{ISpool} and L{ISpoolWriter}.
        """
        self.assertTrue(verifyObject(ISpool, self.spool))
        self.assertTrue(verifyObject(ISpoolWriter, self.spool.newMessage()))

    def test_commit(self) -> None:
        """
        A committed message is queued with its envelope and bytes, and the
        listeners hear of it.
        """
        queueId = self.commit()
        self.assertEqual(self.spool.queued(), [queueId])
        self.assertEqual(self.spool.load(queueId), envelopeFor(queueId))
        self.assertEqual(self.messageOf(queueId), b"Subject: x\n\nhello\n")
        self.assertEqual(self.committed, [queueId])

    def test_uncommittedInvisible(self) -> None:
        """
        A message being written is not in the queue.
        """
        writer = self.spool.newMessage()
        writer.write(b"data\n")
        self.assertEqual(self.spool.queued(), [])

    def test_abort(self) -> None:
        """
        An aborted message leaves nothing behind.
        """
        writer = self.spool.newMessage()
        writer.write(b"data\n")
        self.successResultOf(writer.abort())
        self.assertEqual(self.spool.queued(), [])
        self.assertEqual(self.committed, [])

    def test_saveEnvelope(self) -> None:
        """
        A replaced envelope is what L{ISpool.load} gives afterwards.
        """
        queueId = self.commit()
        updated = self.spool.load(queueId).withAttempt(
            Attempt(1.0, "mx.example.net", "451 4.3.0 try later"), ("bob@example.net",)
        )
        self.successResultOf(self.spool.saveEnvelope(updated))
        self.assertEqual(self.spool.load(queueId), updated)

    def test_remove(self) -> None:
        """
        A removed message is gone.
        """
        queueId = self.commit()
        self.successResultOf(self.spool.remove(queueId))
        self.assertEqual(self.spool.queued(), [])
        self.assertRaises(KeyError, self.spool.load, queueId)

    def test_loadUnknown(self) -> None:
        """
        Loading an unknown id raises L{KeyError}.
        """
        self.assertRaises(KeyError, self.spool.load, "NOPE")

    def test_uniqueIds(self) -> None:
        """
        Every message gets its own id.
        """
        ids = {self.commit() for _ in range(20)}
        self.assertEqual(len(ids), 20)


class MemorySpoolTests(SpoolContractMixin, SynchronousTestCase):
    def makeSpool(self) -> MemorySpool:
        return MemorySpool()

    def messageOf(self, queueId: str) -> bytes:
        return self.spool.messageBytes(queueId)


class DiskSpoolTests(SpoolContractMixin, SynchronousTestCase):
    def makeSpool(self) -> Spool:
        self.directory = self.mktemp()
        self.runner = RecordingRunner()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        spool = Spool(self.directory, self.runner, self.clock)
        spool.prepare()
        return spool

    def messageOf(self, queueId: str) -> bytes:
        with open(self.spool.messagePath(queueId), "rb") as f:
            return f.read()

    def test_layout(self) -> None:
        """
        A committed message is C{queued/ID.msg} plus a readable JSON
        C{queued/ID.env}; C{tmp/} is empty again.
        """
        queueId = self.commit()
        queued = os.path.join(self.directory, "queued")
        self.assertEqual(
            sorted(os.listdir(queued)), [queueId + ".env", queueId + ".msg"]
        )
        with open(os.path.join(queued, queueId + ".env")) as f:
            data = json.load(f)
        self.assertEqual(data["sender"], "alice@example.org")
        self.assertEqual(data["recipients"], ["bob@example.net", "carol@example.net"])
        self.assertEqual(data["authUser"], "alice")
        self.assertEqual(data["clientAddress"], "192.0.2.1")
        self.assertEqual(data["version"], 1)
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])

    def test_fileWorkInThreads(self) -> None:
        """
        Writing, committing, saving and removing all go through
        C{runInThread}, never the caller's (reactor) thread.  The queue
        directory's fsync runs in batches (C{syncBatch}), and a removal's
        renames ride with one.
        """
        queueId = self.commit()
        self.successResultOf(self.spool.saveEnvelope(self.spool.load(queueId)))
        self.successResultOf(self.spool.remove(queueId))
        names = [f.__name__ for f in self.runner.calls]
        self.assertEqual(
            names,
            [
                "_commitInThread",
                "syncBatch",
                "saveInThread",
                "syncBatch",
                "syncBatch",
            ],
        )

    def test_fsync(self) -> None:
        """
        Commit fsyncs the message, the envelope and the queue directory
        before it reports success.
        """
        synced: list[int] = []
        realFsync = os.fsync

        def spyFsync(fd: int) -> None:
            synced.append(os.fstat(fd).st_ino)
            realFsync(fd)

        self.patch(os, "fsync", spyFsync)
        queueId = self.commit()
        queued = os.path.join(self.directory, "queued")
        self.assertEqual(
            synced,
            [
                os.stat(self.spool.messagePath(queueId)).st_ino,
                os.stat(os.path.join(queued, queueId + ".env")).st_ino,
                os.stat(queued).st_ino,
            ],
        )

    def test_chunkedWrites(self) -> None:
        """
        Large messages are written in chunks as they arrive, not held in
        memory until the end.
        """
        self.spool.chunkSize = 1000
        writer = self.spool.newMessage()
        for _ in range(10):
            writer.write(b"x" * 299 + b"\n")
        self.assertEqual(
            [f.__name__ for f in self.runner.calls], ["_writeChunk", "_writeChunk"]
        )
        self.successResultOf(writer.commit(envelopeFor(writer.queueId)))
        self.assertEqual(self.messageOf(writer.queueId), (b"x" * 299 + b"\n") * 10)

    def test_prepareRemovesCrashTraces(self) -> None:
        """
        At start, partial files in C{tmp/} and message bytes without an
        envelope (a crash before the 250) are removed; committed messages
        stay.
        """
        kept = self.commit()
        queued = os.path.join(self.directory, "queued")
        with open(os.path.join(queued, "ORPHAN.msg"), "wb") as f:
            f.write(b"never acknowledged")
        with open(os.path.join(self.directory, "tmp", "PARTIAL.msg"), "wb") as f:
            f.write(b"half")
        self.spool.prepare()
        self.assertEqual(sorted(os.listdir(queued)), [kept + ".env", kept + ".msg"])
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.assertEqual(self.spool.queued(), [kept])

    def test_lockedAgainstSecondProcess(self) -> None:
        """
        A second spool on the same directory (a second relay started by
        mistake) cannot prepare it: the first one's messages in flight are
        never cleaned away under it.
        """
        other = Spool(self.directory, self.runner, self.clock)
        self.assertRaises(SpoolLocked, other.prepare)

    def test_workerSpool(self) -> None:
        """
        A worker process's spool on the same directory (not prepared: the
        main process holds the lock) writes messages the main spool sees
        once adopted: the listeners hear of them, the envelope given (or
        none) is what the first attempt uses.
        """
        worker = Spool(self.directory, self.runner, self.clock)
        heard: list[str] = []
        worker.addListener(heard.append)
        writer = worker.newMessage()
        writer.write(b"Subject: from a worker\n\nhi\n")
        envelope = envelopeFor(writer.queueId)
        queueId = self.successResultOf(writer.commit(envelope))
        self.assertEqual(heard, [queueId])
        self.assertEqual(worker.recent(queueId), envelope)
        self.assertEqual(self.spool.queued(), [queueId])
        self.assertEqual(self.committed, [])
        self.spool.adopt(queueId, envelope)
        self.assertEqual(self.committed, [queueId])
        self.assertEqual(self.spool.recent(queueId), envelope)
        self.spool.adopt(queueId, None)
        self.assertIsNone(self.spool.recent(queueId))
        self.assertEqual(self.spool.load(queueId), envelope)
        self.assertIn(b"Subject: from a worker", self.messageOf(queueId))

    def test_envelopeWithoutMessageQuarantined(self) -> None:
        """
        An envelope whose message bytes are missing is moved to C{corrupt/}
        at start, with an error logged, instead of being retried for ever.
        """
        queueId = self.commit()
        os.unlink(self.spool.messagePath(queueId))
        self.spool.prepare()
        self.assertEqual(self.spool.queued(), [])
        self.assertEqual(
            os.listdir(os.path.join(self.directory, "corrupt")), [queueId + ".env"]
        )

    def test_sameIdNeverOverwrites(self) -> None:
        """
        Two writers given the same queue id (a collision) never overwrite:
        the second commit fails and the first message is intact.
        """
        first = self.spool.newMessage()
        second = SpoolWriter(self.spool, first.queueId)
        first.write(b"first\n")
        self.successResultOf(first.commit(envelopeFor(first.queueId)))
        second.write(b"second\n")
        self.failureResultOf(second.commit(envelopeFor(first.queueId)), SpoolError)
        self.assertEqual(self.messageOf(first.queueId), b"first\n")
        self.assertEqual(self.spool.load(first.queueId), envelopeFor(first.queueId))

    def test_failedCommitLeavesNoEnvelope(self) -> None:
        """
        If the last step of a commit (the directory fsync) fails, the client
        gets an error and neither the envelope nor the bytes stay queued.
        """

        def failingFsync(path: str) -> None:
            raise OSError(errno.EIO, "Input/output error")

        writer = self.spool.newMessage()
        writer.write(b"data\n")
        self.patch(spoolModule, "fsyncDirectory", failingFsync)
        self.patch(durable, "fsyncDirectory", failingFsync)
        self.failureResultOf(writer.commit(envelopeFor(writer.queueId)), SpoolError)
        self.assertEqual(os.listdir(os.path.join(self.directory, "queued")), [])

    def test_writeErrorReportedAtCommit(self) -> None:
        """
        A write error (disk full) fails the commit with an insufficient
        storage L{SpoolError}, and leaves nothing behind.
        """
        writer = self.spool.newMessage()

        def fullWrite(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", fullWrite)
        writer.write(b"data\n")
        writer._flushPending()
        failure = self.failureResultOf(
            writer.commit(envelopeFor(writer.queueId)), SpoolError
        )
        self.assertTrue(failure.value.insufficientStorage)
        self.assertEqual(self.spool.queued(), [])
        self.assertEqual(self.committed, [])

    def test_shortWritesCompleted(self) -> None:
        """
        A write that takes only part of the data (a signal, a pipe-like
        file system) is continued: the message arrives whole.
        """
        realWrite = os.write

        def shortWrite(fd: int, data: Any) -> int:
            return realWrite(fd, bytes(data[:3]))

        self.patch(os, "write", shortWrite)
        queueId = self.commit(b"Subject: short\n\nwritten three bytes at a time\n")
        self.assertEqual(
            self.messageOf(queueId),
            b"Subject: short\n\nwritten three bytes at a time\n",
        )
        self.assertEqual(self.spool.load(queueId), envelopeFor(queueId))

    def test_commitErrorIsSpoolError(self) -> None:
        """
        An I/O error while committing becomes a L{SpoolError} that is not a
        lack of space, and the message is not queued.
        """
        writer = self.spool.newMessage()
        writer.write(b"data\n")
        os.rmdir(os.path.join(self.directory, "tmp"))
        failure = self.failureResultOf(
            writer.commit(envelopeFor(writer.queueId)), SpoolError
        )
        self.assertFalse(failure.value.insufficientStorage)
        self.assertEqual(self.spool.queued(), [])

    def remove(self, queueId: str) -> None:
        self.successResultOf(self.spool.remove(queueId))

    def inodes(self, queueId: str) -> set[int]:
        return {
            os.stat(self.spool.messagePath(queueId)).st_ino,
            os.stat(self.spool._envelopePath(queueId)).st_ino,
        }

    def test_filesReused(self) -> None:
        """
        The files of a delivered message are written again for later
        messages, emptied first (no new inode per message, and no delivered
        mail left in them); C{tmp/} stays empty.
        """
        first = self.commit(b"first message\n")
        firstInodes = self.inodes(first)
        self.remove(first)
        free = os.path.join(self.directory, "free")
        self.assertEqual(len(os.listdir(free)), 2)
        # Released by the next removal's trip to the thread.
        second = self.commit(b"second\n")
        self.remove(second)
        sizes = {}
        for name in os.listdir(free):
            st = os.stat(os.path.join(free, name))
            sizes[st.st_ino] = st.st_size
        self.assertEqual({sizes[inode] for inode in firstInodes}, {0})
        third = self.commit(b"third\n")
        self.assertEqual(self.inodes(third), firstInodes)
        self.assertEqual(self.messageOf(third), b"third\n")
        self.assertEqual(self.spool.load(third), envelopeFor(third))
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.assertEqual(self.spool.files.reused, 2)

    def test_notReusedBeforeRemovalIsDurable(self) -> None:
        """
        The files of a removed message are not written again until the
        queue directory's fsync has made the removal durable: a crash can
        never leave a queued name on a rewritten file.
        """
        availableAtFsync: list[int] = []
        realFsync = durable.fsyncDirectory

        def spyFsync(path: str) -> None:
            # What another spool thread could take from the pool while the
            # removal's renames are not durable yet.
            availableAtFsync.append(len(self.spool.files))
            realFsync(path)

        self.patch(durable, "fsyncDirectory", spyFsync)
        first, second = self.commit(), self.commit()
        self.remove(first)
        self.assertEqual(availableAtFsync[-1], 0)
        self.assertEqual(len(self.spool.files), 0)
        # The next removal's batch releases the first one's files.
        self.remove(second)
        self.assertEqual(len(self.spool.files), 2)
        self.commit()
        self.assertEqual(self.spool.files.reused, 2)

    def test_crashBetweenLinkAndUnlink(self) -> None:
        """
        A free file that is also queued (a crash after the link into the
        queue, before the unlink of its free name) only loses its free name
        at start; the queued message is intact.
        """
        queueId = self.commit(b"kept\n")
        free = os.path.join(self.directory, "free")
        os.link(self.spool.messagePath(queueId), os.path.join(free, "stale"))
        with open(os.path.join(free, "used"), "wb") as f:
            f.write(b"old delivered mail")
        self.spool.prepare()
        self.assertEqual(self.messageOf(queueId), b"kept\n")
        self.assertEqual(os.listdir(free), ["used"])
        self.assertEqual(os.path.getsize(os.path.join(free, "used")), 0)
        self.assertEqual(len(self.spool.files), 1)

    def test_workerFilesReused(self) -> None:
        """
        The files of a worker's delivered messages go back to that worker
        (into C{free/w1/}, once their removal is durable), and its next
        messages are written into them.
        """
        self.spool.files.outlet(1)
        worker = Spool(self.directory, self.runner, self.clock, worker=1)
        queueIds = []
        for text in (b"one\n", b"two\n"):
            writer = worker.newMessage()
            writer.write(text)
            queueId = self.successResultOf(writer.commit(envelopeFor(writer.queueId)))
            self.spool.adopt(queueId, None, worker=1)
            queueIds.append(queueId)
        firstInodes = self.inodes(queueIds[0])
        self.assertEqual(worker.files.created, 4)
        self.remove(queueIds[0])
        # Released (and passed on) by the next removal's batch.
        self.remove(queueIds[1])
        outlet = os.path.join(self.directory, "free", "w1")
        self.assertEqual(
            {os.stat(os.path.join(outlet, n)).st_ino for n in os.listdir(outlet)},
            firstInodes,
        )
        self.assertEqual(len(self.spool.files), 0)
        writer = worker.newMessage()
        writer.write(b"three\n")
        third = self.successResultOf(writer.commit(envelopeFor(writer.queueId)))
        self.assertEqual(self.inodes(third), firstInodes)
        self.assertEqual(self.messageOf(third), b"three\n")
        self.assertEqual((worker.files.created, worker.files.reused), (4, 2))
        self.assertEqual(os.listdir(outlet), [])

    def test_workerEnded(self) -> None:
        """
        When worker 1 has ended, the files it was writing in C{tmp/} are
        removed (not worker 10's, nor the main process's), and the queued
        messages are listed, the one it committed but did not report
        among them.
        """
        tmp = os.path.join(self.directory, "tmp")
        self.spool.files.outlet(1)
        workers = {
            n: Spool(self.directory, self.runner, self.clock, worker=n) for n in (1, 10)
        }
        writer = workers[1].newMessage()
        writer.write(b"reported\n")
        queueId = self.successResultOf(writer.commit(envelopeFor(writer.queueId)))
        kept = []
        for files in (workers[10].files, self.spool.files, workers[1].files):
            path, fd = files.take()
            os.close(fd)
            kept.append(os.path.basename(path))
        mine = kept.pop()
        self.assertTrue(mine.startswith("w1-"), mine)
        self.assertEqual(self.spool.workerEnded(1), [queueId])
        self.assertEqual(sorted(os.listdir(tmp)), sorted(kept))
        self.assertEqual(self.messageOf(queueId), b"reported\n")

    def test_filesKeptWhenNotOwed(self) -> None:
        """
        The main process keeps the files of its own messages: a worker is
        given only as many as it used.
        """
        self.spool.files.outlet(1)
        first, second = self.commit(), self.commit()
        self.remove(first)
        self.remove(second)
        self.assertEqual(len(self.spool.files), 2)
        self.assertEqual(os.listdir(os.path.join(self.directory, "free", "w1")), [])

    def test_prepareTakesBackWorkerFiles(self) -> None:
        """
        At start, the files left in the workers' directories come back to
        the main process's pool, emptied; one that is also queued (a crash
        between link and unlink) only loses its free name.
        """
        queueId = self.commit(b"kept\n")
        outlet = self.spool.files.outlet(2)
        os.link(self.spool.messagePath(queueId), os.path.join(outlet, "stale"))
        with open(os.path.join(outlet, "used"), "wb") as f:
            f.write(b"old delivered mail")
        self.spool.prepare()
        free = os.path.join(self.directory, "free")
        self.assertEqual(self.messageOf(queueId), b"kept\n")
        self.assertEqual(os.listdir(outlet), [])
        self.assertEqual(sorted(os.listdir(free)), ["used", "w2"])
        self.assertEqual(os.path.getsize(os.path.join(free, "used")), 0)
        self.assertEqual(len(self.spool.files), 1)

    def test_poolBounded(self) -> None:
        """
        At most C{keep} free files are kept; the files of later removals
        are deleted.
        """
        self.spool.files.keep = 2
        ids = [self.commit() for _ in range(3)]
        for queueId in ids:
            self.remove(queueId)
        self.spool.prepare()
        self.assertEqual(len(os.listdir(os.path.join(self.directory, "free"))), 2)

    def test_recentEnvelope(self) -> None:
        """
        The envelope of a message just committed is at hand once, without
        reading it back; a saved or removed message's is not.
        """
        queueId = self.commit()
        self.assertEqual(self.spool.recent(queueId), envelopeFor(queueId))
        self.assertIsNone(self.spool.recent(queueId))
        saved, removed = self.commit(), self.commit()
        self.successResultOf(self.spool.saveEnvelope(self.spool.load(saved)))
        self.remove(removed)
        self.assertIsNone(self.spool.recent(saved))
        self.assertIsNone(self.spool.recent(removed))

    def test_recentBounded(self) -> None:
        """
        Envelopes nobody took are not kept without bound.
        """
        self.spool.recentLimit = 2
        ids = [self.commit() for _ in range(3)]
        self.assertIsNone(self.spool.recent(ids[2]))
        self.assertEqual(self.spool.recent(ids[0]), envelopeFor(ids[0]))

    def test_orderOfQueue(self) -> None:
        """
        L{Spool.queued} lists messages oldest first.
        """
        first = self.commit()
        self.clock.advance(1)
        second = self.commit()
        self.assertEqual(self.spool.queued(), [first, second])

    def test_envelopeOnlyForItsMessage(self) -> None:
        """
        Committing a writer with another message's envelope is refused.
        """
        writer = self.spool.newMessage()
        self.assertRaises(ValueError, writer.commit, envelopeFor("OTHER"))


class QueueIdTests(SynchronousTestCase):
    def test_sortsByTime(self) -> None:
        """
        Queue ids sort in the order of their times.
        """
        self.assertLess(newQueueId(1_800_000_000.001), newQueueId(1_800_000_000.002))

    def test_safeForFileNames(self) -> None:
        """
        Queue ids are upper-case hex only.
        """
        queueId = newQueueId(1_800_000_000)
        self.assertRegex(queueId, r"^[0-9A-F]{27}$")


class DirectorySyncTests(SynchronousTestCase):
    """
    Group commit of the queue directory's fsync (L{DirectorySync}).
    """

    def test_oneSyncServesEveryoneWaiting(self) -> None:
        """
        Callers that ask while a sync runs share the next one: three
        commits during one fsync cost two fsyncs in all, and each caller
        hears only after an fsync that started after it asked.
        """
        pending: list[tuple[Deferred[object], Any]] = []

        def runInThread(f: Any, *args: object) -> Deferred[object]:
            d: Deferred[object] = Deferred()
            pending.append((d, f))
            return d

        def runBatch(i: int) -> None:
            d, f = pending[i]
            d.callback(f())

        sync = DirectorySync(self.mktemp(), runInThread)
        os.mkdir(sync.path)
        first = sync.sync()
        self.assertEqual(len(pending), 1)
        second, third = sync.sync(), sync.sync(lambda: "renamed")
        self.assertEqual(len(pending), 1)
        runBatch(0)
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(len(pending), 2)
        runBatch(1)
        self.successResultOf(second)
        self.assertEqual(self.successResultOf(third), "renamed")
        self.assertEqual(sync.syncs, 2)

    def test_workFailureIsItsCallersOnly(self) -> None:
        """
        Work given to a batch runs before its fsync; if it raises, only its
        caller fails, and the others of the batch are synced.
        """
        synced: list[str] = []
        self.patch(durable, "fsyncDirectory", synced.append)

        def broken() -> None:
            raise OSError(errno.ENOENT, "gone")

        sync = DirectorySync("/queue", RecordingRunner())
        self.failureResultOf(sync.sync(broken), OSError)
        self.assertEqual(synced, ["/queue"])
        self.assertEqual(self.successResultOf(sync.sync(lambda: 7)), 7)

    def test_failureReachesTheBatch(self) -> None:
        """
        A failed fsync fails every caller of its batch, and the next caller
        gets a new attempt.
        """
        pending: list[tuple[Deferred[object], Any]] = []

        def runInThread(f: Any, *args: object) -> Deferred[object]:
            d: Deferred[object] = Deferred()
            pending.append((d, f))
            return d

        sync = DirectorySync(self.mktemp(), runInThread)
        os.mkdir(sync.path)
        first = sync.sync()
        pending[0][0].errback(OSError(errno.EIO, "Input/output error"))
        self.failureResultOf(first, OSError)
        later = sync.sync()
        self.assertEqual(len(pending), 2)
        pending[1][0].callback(pending[1][1]())
        self.successResultOf(later)


class WorkerFilePoolTests(SynchronousTestCase):
    """
    A worker's L{FilePool}: files the main process put in its directory,
    taken by several spool threads.
    """

    def setUp(self) -> None:
        base = self.mktemp()
        self.outlet = os.path.join(base, "free", "w1")
        self.tmp = os.path.join(base, "tmp")
        os.makedirs(self.outlet)
        os.makedirs(self.tmp)
        self.pool = FilePool(self.outlet, self.tmp, fromMain=True)

    def given(self, count: int) -> set[int]:
        """
        The main process passes C{count} empty files on.
        """
        inodes = set()
        for i in range(count):
            path = os.path.join(self.outlet, f"f{i}")
            with open(path, "wb"):
                pass
            inodes.add(os.stat(path).st_ino)
        return inodes

    def test_claimedOnce(self) -> None:
        """
        A name listed twice (by two threads' listings, or while another
        thread writes its file) is handed out once: the second take gets
        another file.
        """
        (inode,) = self.given(1)
        path, fd = self.pool.take()
        self.addCleanup(os.close, fd)
        self.assertEqual(os.fstat(fd).st_ino, inode)
        self.assertEqual(os.path.dirname(path), self.tmp)
        self.pool._free.append("f0")
        other, otherFd = self.pool.take()
        self.addCleanup(os.close, otherFd)
        self.assertNotEqual(os.fstat(otherFd).st_ino, inode)
        self.assertEqual((self.pool.reused, self.pool.created), (1, 1))

    def test_threadsNeverShareAFile(self) -> None:
        """
        Spool threads taking at once each get a file of their own.
        """
        given = self.given(200)
        taken: list[int] = []
        lock = threading.Lock()

        def takeMany() -> None:
            for _ in range(60):
                path, fd = self.pool.take()
                with lock:
                    taken.append(os.fstat(fd).st_ino)
                os.close(fd)

        threads = [threading.Thread(target=takeMany) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(taken), 240)
        self.assertEqual(len(set(taken)), 240)
        self.assertTrue(set(taken) >= given)
