"""
Files replaced so that a crash leaves the old content or the new, never a
part: a temporary file in the same file system, written and fsynced, renamed
over the old one, and the directory fsynced so that the rename survives too.
"""

from __future__ import annotations

import os
import stat
import tempfile


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
    tmpDirectory: str | None = None,
) -> None:
    """
    Replace (or create) C{path} with C{data}, atomically and durably.

    @param mode: the new file's permissions; C{None} for the default of a
        temporary file (0600).
    @param like: the old file's C{stat}: its mode and owner are kept instead
        (root editing a C{root:relay 0640} file must not leave one the relay
        can no longer read).
    @param tmpDirectory: where the temporary file is made, on the same file
        system as C{path} (by default C{path}'s directory).

    @raise OSError: if it cannot be written; C{path} is then as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(
        dir=tmpDirectory or directory,
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
