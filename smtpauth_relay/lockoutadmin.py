"""
C{smtpauth-relay lockout --config PATH list|clear TARGET}: see and end the
brute-force lockouts of the running relay (they live in its memory), over
its control socket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TextIO

from smtpauth_relay.control import controlSocketPath
from smtpauth_relay.queueadmin import humanDuration, relayIsRunning, sendRequest

USAGE = """\
usage: smtpauth-relay lockout --config PATH list
       smtpauth-relay lockout --config PATH clear ADDRESS|SUBNET|USER

  list     the lockouts in force: the key (ip:, user:NAME@SUBNET, net:) and
           when each ends
  clear    end the lockouts of an address, a subnet or a user name
"""

_NAME = "smtpauth-relay lockout"


def lockoutCommand(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    """
    Run the command; return the exit status (0 ok, 1 failure, 2 usage).
    """
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        (stdout if args else stderr).write(USAGE)
        return 0 if args else 2
    configPath = None
    rest = []
    it = iter(args)
    for arg in it:
        if arg in ("-c", "--config"):
            configPath = next(it, None)
        elif arg.startswith("--config="):
            configPath = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not configPath or not rest or rest[0] not in ("list", "clear"):
        stderr.write(USAGE)
        return 2
    if (rest[0] == "list") != (len(rest) == 1) or len(rest) > 2:
        stderr.write(USAGE)
        return 2

    from smtpauth_relay.config import loadConfigOrReport

    config = loadConfigOrReport(configPath, stderr)
    if config is None:
        return 1
    directory = config.queue.directory
    with relayIsRunning(directory) as running:
        if not running:
            stderr.write(
                f"{_NAME}: the relay is not running, so nothing is locked "
                "(lockouts are kept in the relay's memory)\n"
            )
            return 1 if rest[0] == "clear" else 0
    request = "LOCKOUTS" if rest[0] == "list" else f"UNLOCK {rest[1]}"
    try:
        reply = sendRequest(controlSocketPath(directory), request, maxReply=4 << 20)
    except (OSError, ValueError) as e:
        stderr.write(f"{_NAME}: the relay does not answer: {e}\n")
        return 1
    if not reply.startswith("OK"):
        stderr.write(reply + "\n")
        return 1
    if rest[0] == "clear":
        stdout.write(reply + "\n")
        return 0
    locks = json.loads(reply[3:])
    if not locks:
        stdout.write("no lockouts\n")
        return 0
    now = time.time()
    width = max(len(lock["key"]) for lock in locks)
    for lock in locks:
        stdout.write(
            f"{lock['key']:{width}}  ends in {humanDuration(lock['until'] - now)}\n"
        )
    return 0
