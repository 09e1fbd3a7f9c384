"""
The C{smtpauth-relay queue} command: see and steer the delivery queue.

C{list} and C{show} read the spool directly, read-only, whether or not the
relay runs (files may vanish under them as messages are delivered; that is
expected).  C{flush}, C{delete} and C{bounce} change the queue, so while the
relay runs they go through its control socket (L{smtpauth_relay.control})
and the relay's queue runner does the work; the command never touches a
spool the running relay owns.  Whether the relay runs is told by the
spool's C{lock} file: the relay holds an exclusive C{flock} on it for as
long as it lives.

With the relay stopped, C{delete} removes the message itself, holding the
lock meanwhile (a relay started at that instant refuses to start rather than
find a half-deleted message); C{flush} and C{bounce} need the relay.

No reactor: this is a plain blocking command.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from smtpauth_relay.control import controlSocketPath, isQueueId
from smtpauth_relay.durable import fsyncDirectory
from smtpauth_relay.envelope import Envelope

__all__ = [
    "humanDuration",
    "queueCommand",
    "readQueue",
    "relayIsRunning",
    "sendRequest",
]

USAGE = """\
usage: smtpauth-relay queue --config PATH COMMAND

commands:
  list [--json]   the queued messages, oldest first
  show ID         one message: its envelope, attempts and headers
  flush           attempt every queued message now (relay running)
  delete ID       remove a message without delivering it
  bounce ID       give up on a message and bounce it (relay running)

options:
  -c, --config PATH   the relay's configuration file (required)
  --json              (list) print a JSON list, for scripts
"""

_NAME = "smtpauth-relay queue"
_COMMANDS = {"list": 0, "show": 1, "flush": 0, "delete": 1, "bounce": 1}

REPLY_TIMEOUT = 30.0
"""Seconds to wait for the relay to answer on its control socket."""

_MAX_REPLY = 1024
_MAX_HEADER_BYTES = 256 * 1024
_FIELD_WIDTH = 40
_MIN_ERROR_WIDTH = 20


class _UsageError(Exception):
    pass


def queueCommand(
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    *,
    now: Callable[[], float] = time.time,
    width: int | None = None,
    timeout: float = REPLY_TIMEOUT,
) -> int:
    """
    C{smtpauth-relay queue --config PATH list|show ID|flush|delete ID|bounce ID}.

    @param argv: the arguments after C{queue}.
    @param stdout: where listings and the relay's C{OK} replies go.
    @param stderr: where errors, warnings and C{ERR} replies go.
    @param now: the current POSIX time (ages and next attempts).
    @param width: the width of the C{list} table, by default the terminal's.
    @param timeout: seconds to wait for the relay's reply.
    @return: the exit status: 0 on success, 1 on failure (including an
        C{ERR} reply and an unknown queue id), 2 on a usage error.
    """
    try:
        options = _parseArguments(list(argv))
    except _UsageError as e:
        stderr.write(f"{_NAME}: {e}\n{USAGE}")
        return 2
    if options is None:
        stdout.write(USAGE)
        return 0
    configPath, command, queueId, asJSON = options

    from smtpauth_relay.config import loadConfigOrReport

    config = loadConfigOrReport(configPath, stderr)
    if config is None:
        return 1
    directory = config.queue.directory

    try:
        if command == "list":
            return _list(directory, stdout, stderr, now(), asJSON, width)
        if command == "show":
            assert queueId is not None
            return _show(directory, queueId, stdout, stderr, now())
        return _change(directory, command, queueId, stdout, stderr, timeout)
    except OSError as e:
        stderr.write(f"{_NAME}: {_describeOSError(e)}\n")
        return 1


def _parseArguments(
    argv: list[str],
) -> tuple[str, str, str | None, bool] | None:
    """
    @return: the configuration path, the command, its queue id and whether
        JSON was asked for; or C{None} when help was asked for.
    @raise _UsageError: if the arguments are wrong.
    """
    configPath: str | None = None
    asJSON = False
    positional: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            return None
        if arg in ("-c", "--config"):
            configPath = next(args, None)
            if configPath is None:
                raise _UsageError(f"{arg} needs a value")
        elif arg.startswith("--config="):
            configPath = arg[len("--config=") :]
        elif arg == "--json":
            asJSON = True
        elif arg.startswith("-") and arg != "-":
            raise _UsageError(f"unknown option {arg!r}")
        else:
            positional.append(arg)
    if not configPath:
        raise _UsageError("--config PATH is required")
    if not positional:
        raise _UsageError("no command given")
    command, rest = positional[0], positional[1:]
    if command not in _COMMANDS:
        raise _UsageError(f"unknown command {command!r}")
    if len(rest) != _COMMANDS[command]:
        expected = "a queue id" if _COMMANDS[command] else "no arguments"
        raise _UsageError(f"{command} takes {expected}")
    if asJSON and command != "list":
        raise _UsageError("--json goes with list only")
    queueId = rest[0] if rest else None
    if queueId is not None and not isQueueId(queueId):
        raise _UsageError(f"not a queue id: {_printable(queueId)!r}")
    return configPath, command, queueId, asJSON


def _describeOSError(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    hint = " (run as root or as the relay's user)" if e.errno == errno.EACCES else ""
    return f"{where}{e.strerror or e}{hint}"


def _printable(text: str) -> str:
    """
    C{text} with control characters (terminal escapes in an upstream's
    reply, say) replaced by C{?}.
    """
    return "".join(c if c.isprintable() else "?" for c in text)


def _truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    return text[: width - 3] + "..."


def humanDuration(seconds: float) -> str:
    """
    A short human form of a duration: C{45s}, C{3m}, C{2h}, C{5d}
    (rounded down; negative durations count as 0).
    """
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _nextAttempt(envelope: Envelope, now: float) -> str:
    if envelope.nextAttempt <= now:
        return "now"
    return "in " + humanDuration(envelope.nextAttempt - now)


def _sender(envelope: Envelope) -> str:
    return envelope.sender or "<>"


def _lastError(envelope: Envelope) -> str | None:
    return envelope.attempts[-1].reply if envelope.attempts else None


def _timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _queuedDirectory(directory: str) -> str:
    return os.path.join(directory, "queued")


def readQueue(directory: str) -> tuple[list[tuple[str, Envelope]], list[str]]:
    """
    Read every envelope in the spool in C{directory}, without locking.

    A message that leaves the queue while it is being read (delivered,
    deleted) is left out.

    @return: the queue ids and envelopes, oldest first; and one warning per
        envelope that could not be read.
    @raise OSError: if the spool cannot be listed.
    """
    queued = _queuedDirectory(directory)
    messages: list[tuple[str, Envelope]] = []
    warnings: list[str] = []
    for name in sorted(os.listdir(queued)):
        if not name.endswith(".env"):
            continue
        queueId = name[:-4]
        try:
            with open(os.path.join(queued, name), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        except OSError as e:
            warnings.append(f"{_printable(queueId)}: {_describeOSError(e)}")
            continue
        try:
            messages.append((queueId, Envelope.fromJSON(raw)))
        except ValueError as e:
            warnings.append(f"{_printable(queueId)}: unreadable envelope: {e}")
    return messages, warnings


def _list(
    directory: str,
    stdout: TextIO,
    stderr: TextIO,
    now: float,
    asJSON: bool,
    width: int | None,
) -> int:
    messages, warnings = readQueue(directory)
    for warning in warnings:
        stderr.write(f"{_NAME}: {warning}\n")
    if asJSON:
        json.dump([_summary(i, e) for i, e in messages], stdout, indent=1)
        stdout.write("\n")
        return 0
    if not messages:
        stdout.write("queue is empty\n")
        return 0
    if width is None:
        width = shutil.get_terminal_size((120, 24)).columns
    headers = ["ID", "AGE", "SIZE", "SENDER", "RECIPIENTS", "ATTEMPTS", "NEXT"]
    rightAligned = {2, 5}
    rows = []
    for queueId, envelope in messages:
        recipients = envelope.recipients
        recipient = _truncate(recipients[0], _FIELD_WIDTH) if recipients else "-"
        if len(recipients) > 1:
            recipient += f" (+{len(recipients) - 1})"
        rows.append(
            [
                queueId,
                humanDuration(now - envelope.receivedAt),
                str(envelope.size),
                _truncate(_sender(envelope), _FIELD_WIDTH),
                recipient,
                str(len(envelope.attempts)),
                _nextAttempt(envelope, now),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    used = sum(widths) + 2 * len(widths)
    errorWidth = max(_MIN_ERROR_WIDTH, width - used)

    def line(cells: list[str], error: str) -> str:
        padded = [
            c.rjust(w) if i in rightAligned else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return _printable("  ".join(padded) + "  " + error).rstrip() + "\n"

    stdout.write(line(headers, "LAST ERROR"))
    for row, (_, envelope) in zip(rows, messages, strict=True):
        error = _printable(" ".join((_lastError(envelope) or "-").split()))
        stdout.write(line(row, _truncate(error, errorWidth)))
    total = sum(e.size for _, e in messages)
    count = len(messages)
    stdout.write(f"{count} message{'' if count == 1 else 's'}, {total} bytes\n")
    return 0


def _summary(queueId: str, envelope: Envelope) -> dict[str, Any]:
    """
    One message in C{list --json}.
    """
    return {
        "id": queueId,
        "receivedAt": envelope.receivedAt,
        "size": envelope.size,
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "authUser": envelope.authUser,
        "attempts": len(envelope.attempts),
        "nextAttempt": envelope.nextAttempt,
        "lastError": _lastError(envelope),
    }


def _show(
    directory: str, queueId: str, stdout: TextIO, stderr: TextIO, now: float
) -> int:
    queued = _queuedDirectory(directory)
    try:
        with open(os.path.join(queued, queueId + ".env"), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        stderr.write(f"{_NAME}: no message {queueId} in the queue\n")
        return 1
    try:
        envelope = Envelope.fromJSON(raw)
    except ValueError as e:
        stderr.write(f"{_NAME}: {queueId}: unreadable envelope: {e}\n")
        return 1
    recipients = list(envelope.recipients) or ["-"]
    nextAttempt = _nextAttempt(envelope, now)
    if envelope.nextAttempt > now:
        nextAttempt = f"{_timestamp(envelope.nextAttempt)} ({nextAttempt})"
    lines = [
        ("id", queueId),
        (
            "received",
            f"{_timestamp(envelope.receivedAt)} "
            f"({humanDuration(now - envelope.receivedAt)} ago)",
        ),
        ("sender", f"<{envelope.sender}>"),
        ("recipients", recipients[0]),
        *(("", r) for r in recipients[1:]),
        ("size", f"{envelope.size} bytes, {envelope.body}"),
        ("client", f"{envelope.clientAddress} (HELO {envelope.helo})"),
        ("auth user", envelope.authUser or "- (trusted network)"),
        ("AUTH=", envelope.auth),
        ("next attempt", nextAttempt),
        ("delay warned", "yes" if envelope.delayWarned else "no"),
        ("attempts", str(len(envelope.attempts))),
    ]
    for label, value in lines:
        heading = f"{label}:" if label else ""
        stdout.write(_printable(f"{heading:<14}{value}") + "\n")
    for attempt in envelope.attempts:
        reply = " ".join(attempt.reply.split())
        stdout.write(
            _printable(f"  {_timestamp(attempt.time)}  {attempt.host}  {reply}") + "\n"
        )
    stdout.write("headers:\n")
    try:
        headers = _readHeaders(os.path.join(queued, queueId + ".msg"))
    except FileNotFoundError:
        stdout.write("  (the message has just left the queue)\n")
        return 0
    for header in headers:
        stdout.write("  " + _printable(header.expandtabs(4)) + "\n")
    return 0


def _readHeaders(path: str) -> list[str]:
    """
    The header lines of the message in C{path}: up to the first empty line,
    at most L{_MAX_HEADER_BYTES}.
    """
    lines = []
    size = 0
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if not line or size > _MAX_HEADER_BYTES:
                break
            size += len(raw)
            lines.append(line.decode("utf-8", "replace"))
    return lines


@contextmanager
def relayIsRunning(directory: str) -> Iterator[bool]:
    """
    Tell whether a relay runs on the spool in C{directory}: whether another
    open file holds the C{flock} on its C{lock} file.  When none does, this
    process holds the lock until the block ends, so that no relay starts
    meanwhile.

    The lock file is opened read-only and never created: a root-owned
    C{lock} would stop the relay's user from starting the relay.

    @return: a context manager giving C{True} when a relay runs.
    @raise OSError: if the lock file exists but cannot be opened.
    """
    try:
        fd = os.open(os.path.join(directory, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # No relay ever ran on this spool.
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            running = False
        except BlockingIOError:
            running = True
        yield running
    finally:
        os.close(fd)  # releases the lock, if it is ours


def sendRequest(
    socketPath: str,
    request: str,
    timeout: float = REPLY_TIMEOUT,
    maxReply: int = _MAX_REPLY,
) -> str:
    """
    Send one request line to the relay's control socket; return its reply
    line (without the line end).

    @raise OSError: if the relay cannot be reached or does not answer in
        C{timeout} seconds (L{TimeoutError}).
    @raise ValueError: if the relay closes without a complete reply line.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socketPath)
        s.sendall(request.encode("ascii") + b"\n")
        reply = b""
        while b"\n" not in reply and len(reply) <= maxReply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    line, newline, _ = reply.partition(b"\n")
    if not newline:
        raise ValueError("the relay closed the connection without a reply")
    return line.rstrip(b"\r").decode("ascii", "replace")


def _change(
    directory: str,
    command: str,
    queueId: str | None,
    stdout: TextIO,
    stderr: TextIO,
    timeout: float,
) -> int:
    """
    C{flush}, C{delete} or C{bounce}: through the relay if it runs, else
    (C{delete} only) on the spool directly.
    """
    with relayIsRunning(directory) as running:
        if not running:
            if command == "delete":
                assert queueId is not None
                return _deleteOffline(directory, queueId, stdout, stderr)
            if command == "flush":
                stderr.write(
                    f"{_NAME}: the relay is not running; nothing was done "
                    "(it attempts every queued message when it starts)\n"
                )
            else:
                stderr.write(
                    f"{_NAME}: the relay must be running to send a bounce; "
                    "nothing was done\n"
                )
            return 1
    request = command.upper() + (f" {queueId}" if queueId else "")
    path = controlSocketPath(directory)
    try:
        reply = sendRequest(path, request, timeout)
    except TimeoutError:
        stderr.write(
            f"{_NAME}: no reply from the relay within {timeout:g} seconds; "
            f"the request may still be carried out (check with list)\n"
        )
        return 1
    except (OSError, ValueError) as e:
        reason = _describeOSError(e) if isinstance(e, OSError) else str(e)
        stderr.write(
            f"{_NAME}: the relay is running but its control socket {path} "
            f"does not answer: {reason}\n"
        )
        return 1
    reply = _printable(reply)
    if reply.startswith("OK"):
        stdout.write(reply + "\n")
        return 0
    stderr.write(reply + "\n")
    return 1


def _deleteOffline(directory: str, queueId: str, stdout: TextIO, stderr: TextIO) -> int:
    """
    Remove a message from a spool no relay runs on (the caller holds the
    lock): the envelope first, so a failure half-way leaves bytes the relay
    cleans at start, never an envelope without bytes.
    """
    queued = _queuedDirectory(directory)
    try:
        os.unlink(os.path.join(queued, queueId + ".env"))
    except FileNotFoundError:
        stderr.write(f"ERR unknown message {queueId}\n")
        return 1
    try:
        os.unlink(os.path.join(queued, queueId + ".msg"))
    except FileNotFoundError:
        pass
    fsyncDirectory(queued)
    stdout.write(f"OK deleted {queueId}\n")
    return 0
