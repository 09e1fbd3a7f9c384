# -*- test-case-name: tests.test_htpasswd -*-
"""
Password files in the C{htpasswd} format: one C{user:hash} per line.

Blank lines and lines starting with C{#} are ignored.  The hashes may be of any
scheme L{smtpauth_relay.passwords} verifies; new ones are bcrypt unless
C{passwd --scheme} asks for SCRAM-SHA-256 or CRAM-MD5.  A file written by
Apache's C{htpasswd -B} works as it is.  A hash never contains white space,
nor C{:} except in PostgreSQL's SCRAM-SHA-256 layout
(C{SCRAM-SHA-256$4096:SALT$STOREDKEY:SERVERKEY}).

This module also holds C{smtpauth-relay passwd FILE USER}, which adds or
replaces one user in such a file.
"""

from __future__ import annotations

import getpass as _getpass
import os
from collections.abc import Callable
from typing import TextIO

from twisted.logger import Logger

from smtpauth_relay import passwords
from smtpauth_relay.durable import replaceFile
from smtpauth_relay.passwordpolicy import checkPassword

__all__ = ["parseHtpasswd", "passwdCommand", "setUser", "validateUsername"]

log = Logger()

NEW_FILE_MODE = 0o640
"""
The permissions of a password file L{setUser} creates: readable by the group
the relay runs as, never by everyone.
"""

_BOM = b"\xef\xbb\xbf"


def validateUsername(user: str) -> None:
    """
    Check that a user name can be stored in a password file.

    @param user: The user name.

    @raise ValueError: If it is empty or contains C{:}, white space or a
        control character.
    """
    if not user:
        raise ValueError("the user name is empty")
    for character in user:
        if character == ":":
            raise ValueError("the user name contains ':'")
        if character.isspace():
            raise ValueError("the user name contains white space")
        if not character.isprintable():
            raise ValueError("the user name contains a control character")


def _isValidUsername(user: str) -> bool:
    """
    @return: Whether L{validateUsername} accepts C{user}.
    """
    try:
        validateUsername(user)
    except ValueError:
        return False
    return True


def _validHash(encoded: str) -> bool:
    """
    @return: Whether C{encoded} can be stored after C{user:} on a line: not
        empty, no white space, and no C{:} unless it is a SCRAM-SHA-256 hash
        in PostgreSQL's layout (which has two).
    """
    if not encoded or any(c.isspace() for c in encoded):
        return False
    if ":" in encoded:
        return encoded.startswith("SCRAM-SHA-256$") and encoded.count(":") == 2
    return True


def _splitEntry(line: bytes) -> tuple[str, str] | None:
    """
    Split one line of a password file.

    @param line: The line, without its line ending.

    @return: C{(user, hash)} for an entry; C{None} for a blank or comment line.

    @raise ValueError: If the line is neither (the message never includes the
        line, which may hold a hash).
    """
    text = line.decode("utf-8").strip()
    if not text or text.startswith("#"):
        return None
    user, sep, encoded = text.partition(":")
    if not sep:
        raise ValueError("no ':'")
    if not _isValidUsername(user):
        raise ValueError("invalid user name")
    if not encoded:
        raise ValueError("empty hash")
    if not _validHash(encoded):
        raise ValueError("extra fields after the hash")
    return user, encoded


def _rawLines(data: bytes) -> list[bytes]:
    """
    Split file contents into lines, each keeping its line ending (only LF
    ends a line; a CR before it is part of the ending).
    """
    parts = data.split(b"\n")
    raw = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        raw.append(parts[-1])
    return raw


def _body(raw: bytes) -> bytes:
    """
    A line without its line ending.
    """
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def parseHtpasswd(data: bytes | str, path: str) -> dict[str, str]:
    """
    Parse the contents of a password file.

    A malformed line is skipped with a warning naming the file and the line
    number (never the line itself: it may hold a hash, or a password typed on
    the wrong line).  If a user appears twice the first line wins, as with
    Apache, and the others are warned about.

    @param data: The contents of the file, UTF-8.
    @param path: The file's name, for the warnings.

    @return: The hash of each user, by user name.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    users: dict[str, str] = {}
    for lineNumber, raw in enumerate(_rawLines(data), start=1):
        try:
            entry = _splitEntry(_body(raw))
        except UnicodeDecodeError:
            log.warn(
                "Skipping line {lineNumber} of password file {path}: not UTF-8",
                path=path,
                lineNumber=lineNumber,
            )
            continue
        except ValueError as e:
            log.warn(
                "Skipping malformed line {lineNumber} of password file {path}:"
                " {problem}",
                path=path,
                lineNumber=lineNumber,
                problem=str(e),
            )
            continue
        if entry is None:
            continue
        user, encoded = entry
        if user in users:
            log.warn(
                "Ignoring line {lineNumber} of password file {path}: user {user}"
                " already appeared on an earlier line",
                path=path,
                lineNumber=lineNumber,
                user=user,
            )
            continue
        users[user] = encoded
    return users


def _entryUser(line: bytes) -> str | None:
    """
    @return: The user a line of a password file is about, or C{None} for a
        blank, comment or malformed line.
    """
    try:
        entry = _splitEntry(line)
    except ValueError:  # UnicodeDecodeError included
        return None
    return None if entry is None else entry[0]


def setUser(path: str, user: str, encoded: str) -> None:
    """
    Add a user to a password file, or replace its hash.

    Every other line, comments and malformed lines included, is kept as it
    was.  If the user appears more than once, the first line is replaced and
    the others removed.  If the file does not exist it is created with mode
    L{NEW_FILE_MODE}; otherwise its mode, owner and group are kept.

    The file is replaced atomically: readers see the old or the new file,
    never a mixture, and after a crash the change is either wholly there or
    not at all.  If C{path} is a symbolic link, the file it points to is
    replaced.

    @param path: The password file.
    @param user: The user name.
    @param encoded: The new hash.

    @raise ValueError: If C{user} or C{encoded} cannot be stored in the file.
    @raise OSError: If the file cannot be read or written; it is then left as
        it was.
    """
    validateUsername(user)
    if not _validHash(encoded):
        raise ValueError("the hash is empty or contains ':' or white space")

    path = os.path.realpath(path)
    newLine = f"{user}:{encoded}".encode()
    original: os.stat_result | None
    try:
        with open(path, "rb") as f:
            existing = f.read()
            original = os.fstat(f.fileno())
    except FileNotFoundError:
        existing, original = b"", None
    content = _replaceEntry(existing, user, newLine)

    replaceFile(path, content, NEW_FILE_MODE, like=original)


def _replaceEntry(existing: bytes, user: str, newLine: bytes) -> bytes:
    """
    Put C{newLine} in place of C{user}'s first line in a password file's
    contents, drop its other lines, or append C{newLine} if there are none.
    Every other byte is kept.
    """
    lead = b""
    if existing.startswith(_BOM):
        lead, existing = _BOM, existing[len(_BOM) :]
    out: list[bytes] = [lead]
    replaced = False
    for raw in _rawLines(existing):
        body = _body(raw)
        if _entryUser(body) == user:
            if not replaced:
                out.append(newLine + (raw[len(body) :] or b"\n"))
                replaced = True
            continue
        out.append(raw)
    if not replaced:
        if not out[-1].endswith(b"\n") and out[-1] != b"":
            out[-1] += b"\n"
        out.append(newLine + b"\n")
    return b"".join(out)


_USAGE = (
    "usage: smtpauth-relay passwd [--scheme bcrypt|scram-sha-256|cram-md5]"
    " [--iterations N] FILE USER [--force]\n"
)
_HELP = (
    _USAGE
    + f"""
Add USER to the password file FILE, or change USER's password, with a bcrypt
hash. The password is read from standard input (one line) when it is not a
terminal, else asked for twice. FILE is created (mode 0640) if it does not
exist; other lines are kept.

--scheme scram-sha-256 stores SCRAM-SHA-256 keys instead (PBKDF2 with
--iterations N, default {passwords.DEFAULT_SCRAM_ITERATIONS}, at least
{passwords.MIN_SCRAM_ITERATIONS}): the user can then log in with the
SCRAM-SHA-256 mechanism as well as PLAIN and LOGIN. --scheme cram-md5 stores
Dovecot's {{CRAM-MD5}} HMAC state, for CRAM-MD5 clients; it is as good as the
password to anyone who reads the file. A mechanism other than PLAIN and LOGIN
is offered only when every user of the file has an entry of its scheme.

A weak password is refused: one shorter than 12 characters, one containing
the user name or (for a USER like alice@example.org) the domain, or one easy
to guess by zxcvbn's estimate. --force sets it anyway, with a warning.
"""
)


def _takeOption(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """
    Remove C{NAME VALUE} or C{NAME=VALUE} from C{argv}.

    @return: The other arguments, and the value (C{None} if absent).

    @raise ValueError: If the option has no value or is given twice.
    """
    rest: list[str] = []
    value: str | None = None
    arguments = iter(argv)
    for arg in arguments:
        if arg == name or arg.startswith(name + "="):
            if value is not None:
                raise ValueError(f"{name} given twice")
            if arg == name:
                value = next(arguments, None)
                if value is None:
                    raise ValueError(f"{name} needs a value")
            else:
                value = arg[len(name) + 1 :]
        else:
            rest.append(arg)
    return rest, value


def passwdCommand(
    argv: list[str],
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    getpass: Callable[[str], str] = _getpass.getpass,
    *,
    rounds: int = passwords.DEFAULT_BCRYPT_ROUNDS,
) -> int:
    """
    C{smtpauth-relay passwd [--scheme SCHEME] [--iterations N] FILE USER
    [--force]}: set a user's password in a password file.

    C{--scheme} is one of L{passwords.NEW_HASH_SCHEMES}: C{bcrypt} (the
    default), C{scram-sha-256} (whose PBKDF2 iteration count is
    C{--iterations}) or C{cram-md5}.  The hash is computed in this process,
    which does nothing else meanwhile.

    The password is one line read from C{stdin} when that is not a terminal
    (for scripts: C{echo "$pw" | smtpauth-relay passwd ...}); otherwise it is
    asked for twice with C{getpass}, and the two must match.  Neither the
    password nor its hash is ever written to C{stdout} or C{stderr}.

    A password L{smtpauth_relay.passwordpolicy.checkPassword} finds weak is
    refused with the reasons, unless C{--force} is given (anywhere in
    C{argv}): then the reasons are a warning and the password is set.  The
    domain of a user name that looks like an address counts as the user's
    domain.  Passwords bcrypt cannot take (empty, over 72 bytes) are refused
    even with C{--force}.

    @param argv: The arguments after C{passwd}: C{[FILE, USER]}, and
        C{--force}, C{--scheme} and C{--iterations} anywhere.
    @param stdin: Where to read the password from when it is not a terminal.
    @param stdout: Where the confirmation goes.
    @param stderr: Where errors go.
    @param getpass: Prompts for a password without echoing it.
    @param rounds: The bcrypt cost.

    @return: The exit status: 0 on success, 1 on failure, 2 on a usage error.
    """
    force = "--force" in argv
    argv = [arg for arg in argv if arg != "--force"]
    if argv and argv[0] in ("-h", "--help"):
        stdout.write(_HELP)
        return 0
    try:
        argv, scheme = _takeOption(argv, "--scheme")
        argv, iterationsText = _takeOption(argv, "--iterations")
    except ValueError as e:
        stderr.write(f"smtpauth-relay passwd: {e}\n{_USAGE}")
        return 2
    scheme = (scheme or passwords.BCRYPT).lower()
    if scheme not in passwords.NEW_HASH_SCHEMES:
        stderr.write(
            f"smtpauth-relay passwd: unknown --scheme {scheme!r}: choose one of"
            f" {', '.join(passwords.NEW_HASH_SCHEMES)}\n"
        )
        return 2
    iterations = passwords.DEFAULT_SCRAM_ITERATIONS
    if iterationsText is not None:
        if scheme != passwords.SCRAM_SHA_256:
            stderr.write(
                "smtpauth-relay passwd: --iterations is only for"
                " --scheme scram-sha-256\n"
            )
            return 2
        if not iterationsText.isdigit() or not (
            passwords.MIN_SCRAM_ITERATIONS
            <= int(iterationsText)
            <= passwords.MAX_SCRAM_ITERATIONS
        ):
            stderr.write(
                "smtpauth-relay passwd: --iterations must be a number from"
                f" {passwords.MIN_SCRAM_ITERATIONS} to"
                f" {passwords.MAX_SCRAM_ITERATIONS}\n"
            )
            return 2
        iterations = int(iterationsText)
    if len(argv) != 2 or argv[0].startswith("-"):
        stderr.write(_USAGE)
        return 2
    path, user = argv
    try:
        validateUsername(user)
    except ValueError as e:
        stderr.write(f"smtpauth-relay passwd: invalid user name: {e}\n")
        return 2

    try:
        if stdin.isatty():
            password = getpass(f"New password for {user}: ")
            again = getpass(f"Retype new password for {user}: ")
            if password != again:
                stderr.write("smtpauth-relay passwd: the passwords do not match\n")
                return 1
        else:
            password = stdin.readline()
            if password.endswith("\n"):
                password = password[:-1]
                if password.endswith("\r"):
                    password = password[:-1]
    except (EOFError, KeyboardInterrupt):
        stderr.write("\nsmtpauth-relay passwd: no password given\n")
        return 1
    if not password:
        stderr.write("smtpauth-relay passwd: empty password refused\n")
        return 1

    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        # The error's message would quote part of the password.
        stderr.write("smtpauth-relay passwd: the password is not valid text\n")
        return 1
    try:
        encoded = passwords.hashPassword(
            secret, rounds=rounds, scheme=scheme, iterations=iterations
        )
    except ValueError as e:
        stderr.write(f"smtpauth-relay passwd: {e}\n")
        return 1

    # After hashing, so that a password the scheme cannot take at all (over
    # 72 bytes for bcrypt, refused by SASLprep for SCRAM) is refused for
    # that, --force or not.
    local, at, domain = user.rpartition("@")
    domains = [domain] if at and local and domain else []
    reasons = checkPassword(password, user, domains)
    if reasons:
        listed = "".join(f"  - {reason}\n" for reason in reasons)
        if not force:
            stderr.write(
                f"smtpauth-relay passwd: weak password refused:\n{listed}"
                "Choose another, or give --force to set it anyway.\n"
            )
            return 1
        stderr.write(
            f"smtpauth-relay passwd: warning: setting a weak password (--force):\n"
            f"{listed}"
        )
    try:
        setUser(path, user, encoded)
    except OSError as e:
        reason = e.strerror or str(e)
        stderr.write(f"smtpauth-relay passwd: cannot update {path}: {reason}\n")
        return 1
    stdout.write(f"Password for {user} set in {path}\n")
    return 0
