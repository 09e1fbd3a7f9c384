"""
Empty files kept for reuse by the spool (C{free/}).

Every accepted message used to cost two new inodes (its bytes and its
envelope) and every delivered one two deletions.  Under load, allocating an
inode is the expensive part of a commit: the file system scans its inode
bitmap past every recently freed inode of the directory's group (ext4's
C{find_inode_bit}/C{recently_deleted} was 38 % of the spool threads' time at
64 sessions, see C{bench/README.md}), and the directory's lock serialises
the threads creating and unlinking.  Files of delivered messages are
therefore truncated and kept in C{free/}, up to L{FilePool.keep} of them,
and the next messages are written into them: no allocation, no deletion.

A file leaves C{queued/} for C{free/} by C{rename} (atomic), and becomes
free for reuse (truncated, handed out again) only after the queue
directory's fsync has made that rename durable: a crash can never leave a
queued name on a file that was truncated or rewritten.  It enters the queue
by C{link} then C{unlink} of its C{free/} name; a crash between the two
leaves a C{free/} name on a queued file, which L{FilePool.prepare}
recognises by its inode and only unlinks.

With worker processes (C{[server] workers}), the main process removes
every delivered message, the workers' included, while each worker writes its
own: the main process shares the files it releases.  Each worker has its own
directory, C{free/wN/}, that only it takes files from; the main process
moves a released file there (one C{rename}) while it owes that worker files,
two for each message the worker queued (L{FilePool.owe}), and keeps it
otherwise.  A worker lists its directory when it has run out, and claims
each file it takes by moving it to C{tmp/}: its spool threads list the same
names, and only the move tells which one has a file.

All methods run in the spool's threads (L{FilePool.prepare} at start);
the lists of free names and of files owed are L{collections.deque}s, whose
C{append}, C{pop} and C{popleft} are atomic.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections import deque

from twisted.logger import Logger

log = Logger()


class FilePool:
    """
    Empty files in C{directory}, handed out for writing and taken back
    (truncated) when their message leaves the queue.

    @ivar keep: at most this many files are kept; more are deleted.
    """

    keep = 8192

    def __init__(
        self,
        directory: str,
        tmpDirectory: str,
        fromMain: bool = False,
        prefix: str = "",
    ) -> None:
        """
        @param directory: where free files are kept (C{free/}).
        @param tmpDirectory: where new files are created when none is free;
            both on the spool's file system.
        @param fromMain: a worker's pool, on its directory (L{outlet}) that
            the main process fills.
        @param prefix: begins the name of each file being written in
            C{tmpDirectory} (a worker's, so that the main process can
            remove those a worker that died left there).
        """
        self.directory = directory
        self.fromMain = fromMain
        self.tmpDirectory = tmpDirectory
        self.prefix = prefix
        self._free: deque[str] = deque()
        self.created = 0
        """Files created because none was free (for tests and benchmarks)."""
        self.reused = 0
        """Files handed out from the pool (for tests and benchmarks)."""
        self._owed: dict[int, deque[None]] = {}
        """The files each worker is owed, one C{None} each (a deque: its
        C{extend} and C{popleft} are atomic)."""
        self._outlets: dict[int, str] = {}
        self._nextListing = 0
        """C{created} at which L{take} next lists the directory."""
        self._listing = threading.Lock()

    def prepare(self, queued: set[int]) -> None:
        """
        Create the directory and take stock of it after a crash: a name
        whose inode is also queued is unlinked, a file with content is
        truncated, and at most L{keep} files are kept.  Blocking; call at
        start, before anything is written.

        @param queued: the inode numbers of the files in the queue.
        """
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        self._free.clear()
        entries: list[tuple[os.DirEntry[str], str]] = []
        for entry in os.scandir(self.directory):
            if entry.is_dir(follow_symlinks=False):
                # A worker's: its files come back to the main process.
                with os.scandir(entry.path) as inner:
                    entries.extend((e, entry.path) for e in inner)
            else:
                entries.append((entry, ""))
        for entry, worker in sorted(entries, key=lambda e: (e[1], e[0].name)):
            if entry.inode() in queued or len(self._free) >= self.keep:
                os.unlink(entry.path)
                continue
            if entry.stat(follow_symlinks=False).st_size:
                os.truncate(entry.path, 0)
            if worker:
                os.rename(entry.path, os.path.join(self.directory, entry.name))
            self._free.append(entry.name)

    def __len__(self) -> int:
        return len(self._free)

    def take(self) -> tuple[str, int]:
        """
        A file to write, open for writing and empty: a free one, or a new
        one in C{tmpDirectory}.

        @return: its path and a file descriptor the caller closes.
        """
        if self.fromMain and not self._free and self.created >= self._nextListing:
            self._refill()
        while True:
            try:
                name = self._free.pop()
            except IndexError:
                break
            path = os.path.join(self.directory, name)
            try:
                if self.fromMain:
                    path = self._claim(path)
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            except FileNotFoundError:
                continue
            self.reused += 1
            return path, fd
        path = self._newPath()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.created += 1
        return path, fd

    def _newPath(self) -> str:
        return os.path.join(
            self.tmpDirectory, f"{self.prefix}{secrets.token_hex(8)}.new"
        )

    def _claim(self, path: str) -> str:
        """
        Make a listed file this writer's alone: moved to C{tmpDirectory}
        (atomic: of two spool threads that listed it, one gets it, the
        other L{FileNotFoundError}).  A file still in the directory is free;
        a name is listed again as long as its file is there, even while
        another thread writes it, so the name alone proves nothing.
        """
        claimed = self._newPath()
        os.rename(path, claimed)
        return claimed

    def _refill(self) -> None:
        """
        Take stock of the directory (a worker's, which the main process
        fills); when it is empty, look again only after another message's
        two files have been created.
        """
        with self._listing:
            if self._free:
                return
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:
                names = []
            self._free.extend(names)
            if not names:
                self._nextListing = self.created + 2

    def outlet(self, worker: int) -> str:
        """
        Create worker C{worker}'s directory, C{free/wN/}; its pool is a
        L{FilePool} on it.
        """
        directory = os.path.join(self.directory, f"w{worker}")
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self._outlets[worker] = directory
        self._owed.setdefault(worker, deque())
        return directory

    def owe(self, worker: int) -> None:
        """
        Worker C{worker} used a message's two files: the next two released
        go to it (see L{outlet}).
        """
        owed = self._owed.get(worker)
        if owed is not None and len(owed) < self.keep:
            owed.extend((None, None))

    def _give(self, path: str) -> bool:
        """
        Move a released file to a worker that is owed one.
        """
        for worker, owed in list(self._owed.items()):
            try:
                owed.popleft()
            except IndexError:
                continue
            try:
                os.rename(
                    path, os.path.join(self._outlets[worker], os.path.basename(path))
                )
            except OSError as e:
                log.warn("could not pass {path} on: {error}", path=path, error=e)
                return False
            return True
        return False

    def retire(self, path: str) -> str | None:
        """
        Take the file at C{path} out of the queue: renamed into the pool,
        or deleted when the pool is full.  It is not handed out before
        L{release}, which the caller calls once the rename is durable.

        @return: the file's new path, for L{release}; L{None} if it was
            deleted or is missing.
        """
        if len(self._free) >= self.keep:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return None
        free = os.path.join(self.directory, secrets.token_hex(8))
        try:
            os.rename(path, free)
        except FileNotFoundError:
            return None
        return free

    def release(self, paths: list[str]) -> None:
        """
        Make retired files (see L{retire}) available: truncated, so that
        delivered mail does not linger in them, and handed out by L{take}.
        """
        for path in paths:
            try:
                os.truncate(path, 0)
            except FileNotFoundError:
                continue
            except OSError as e:
                # Left as it is: prepare truncates it at the next start.
                log.warn("could not truncate {path}: {error}", path=path, error=e)
                continue
            if not self._give(path):
                self._free.append(os.path.basename(path))
