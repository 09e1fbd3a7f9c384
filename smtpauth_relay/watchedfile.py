"""
A small file that is read again whenever it changes on disk (the sender
login map, per-user networks): edits take effect at the next use, without a
restart.

Each use costs one C{stat}; the file is read and parsed again only when its
device, inode, size or modification time changed.  A file that cannot be
read is reported once (while the problem lasts) and never silently replaced
by its last contents: callers fail closed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sized
from typing import Generic, TypeVar

from twisted.logger import Logger

T = TypeVar("T")

log = Logger()

_Signature = tuple[int, int, int, int]


class WatchedFile(Generic[T]):
    """
    The parsed contents of C{path}, kept current.

    @ivar path: the file.
    @ivar what: what the file is, for log lines ("sender login map").
    """

    def __init__(self, path: str, parse: Callable[[bytes, str], T], what: str) -> None:
        self.path = path
        self.what = what
        self._parse = parse
        self._signature: _Signature | None = None
        self._value: T | None = None
        self._problem: str | None = None

    def current(self) -> T:
        """
        The contents as the file holds them now.

        @raise OSError: if the file cannot be read (logged once).
        """
        try:
            info = os.stat(self.path)
            signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            if signature == self._signature and self._value is not None:
                return self._value
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._signature = None
            self._value = None
            problem = e.strerror or str(e)
            if problem != self._problem:
                log.error(
                    "Cannot read {what} {path}: {problem}",
                    what=self.what,
                    path=self.path,
                    problem=problem,
                )
                self._problem = problem
            raise
        self._value = self._parse(data, self.path)
        self._signature = signature
        self._problem = None
        log.info(
            "Loaded {what} {path}: {count} entries",
            what=self.what,
            path=self.path,
            count=len(self._value) if isinstance(self._value, Sized) else None,
        )
        return self._value
