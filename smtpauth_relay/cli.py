"""
The C{smtpauth-relay} console command: C{check-config}, C{passwd}, C{queue},
C{demo}.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

USAGE = """\
usage: smtpauth-relay COMMAND [ARGS]

commands:
  check-config PATH     validate a configuration file (exit 0 if valid)
  passwd [--scheme bcrypt|scram-sha-256|cram-md5] FILE USER [--force]
                        add or replace USER in a password file (bcrypt, or
                        SCRAM-SHA-256 / CRAM-MD5 keys for those mechanisms);
                        weak passwords refused unless --force
  audit FILE [--time-limit SECONDS] [--top N] [--jobs N]
                        try the most common passwords against every hash
  queue --config PATH list|show ID|flush|delete ID|bounce ID
                        see and steer the delivery queue
  lockout --config PATH list|clear TARGET
                        see or end brute-force lockouts of the running relay
  oauth2 authorize --config PATH
                        sign in once (device code) and store the OAuth2
                        refresh token for the smarthost
  demo [DIRECTORY]      run a demo relay on 127.0.0.1:2587/2465 (files in ./var)

The relay itself runs under twistd:
  twistd -n smtpauth-relay --config /etc/smtpauth-relay/relay.toml
"""


def _checkConfig(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    from smtpauth_relay.config import checkConfigCommand

    return checkConfigCommand(argv, stdout, stderr)


def _passwd(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    from smtpauth_relay.htpasswd import passwdCommand

    return passwdCommand(argv, sys.stdin, stdout, stderr)


def _queue(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    from smtpauth_relay.queueadmin import queueCommand

    return queueCommand(argv, stdout, stderr)


def _lockout(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    from smtpauth_relay.lockoutadmin import lockoutCommand

    return lockoutCommand(argv, stdout, stderr)


def _audit(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    from smtpauth_relay.audit import auditCommand

    return auditCommand(argv, stdout, stderr)


def _oauth2(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    from smtpauth_relay.oauth2admin import main as oauth2Command

    return oauth2Command(argv, stdout, stderr)


def _demo(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    from smtpauth_relay.demo import demoCommand

    return demoCommand(argv, stdout, stderr)


COMMANDS: dict[str, Callable[[list[str], TextIO, TextIO], int]] = {
    "check-config": _checkConfig,
    "passwd": _passwd,
    "queue": _queue,
    "lockout": _lockout,
    "audit": _audit,
    "oauth2": _oauth2,
    "demo": _demo,
}


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
) -> int:
    """
    Run the command named by C{argv[0]}; return the exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        (stdout if args else stderr).write(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        stderr.write(f"smtpauth-relay: unknown command {args[0]!r}\n\n{USAGE}")
        return 2
    return command(args[1:], stdout, stderr)


if __name__ == "__main__":
    sys.exit(main())
