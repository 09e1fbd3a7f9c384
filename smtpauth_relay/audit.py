# -*- test-case-name: tests.test_audit -*-
"""
C{smtpauth-relay audit FILE}: try the most common passwords against every
hash in a password file, and list the accounts whose password fell, so that
an administrator finds them before a spammer does.

The candidates for each account are, most likely first: the ten most common
passwords; variants of the user's name (C{alice}, C{alice123}, C{Alice1},
C{ecila}, ...); the rest of the 100 most common; common words with a capital
and a digit or symbol added (C{Password1}, C{Welcome1!}); and the rest of the
C{--top N} most common passwords of zxcvbn's list.  The accounts take turns,
one candidate each, so that when the time limit cuts the audit short every
account has been tried with its most likely passwords.

The hashes are checked by a pool of threads (bcrypt and argon2 release the
GIL), never more at once than there are workers, so the audit stops within
one hash of its time limit.  The passwords found are never shown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TextIO

from smtpauth_relay import passwords
from smtpauth_relay.cpus import usableCpus
from smtpauth_relay.htpasswd import parseHtpasswd
from smtpauth_relay.passwordpolicy import commonPasswords

__all__ = ["DEFAULT_TIME_LIMIT", "DEFAULT_TOP", "USAGE", "auditCommand"]

DEFAULT_TIME_LIMIT = 300.0
"""
How long an audit may take, in seconds, unless C{--time-limit} says.
"""

DEFAULT_TOP = 1000
"""
How many of the most common passwords are tried, unless C{--top} says.
"""

USAGE = """\
usage: smtpauth-relay audit FILE [--time-limit SECONDS] [--top N] [--jobs N]

Try the N most common passwords (default 1000, from zxcvbn's list), variants
of each user's name and capitalised common words with a digit or symbol added
against every hash in the password file FILE, for at most SECONDS (default
300), in as many threads as --jobs says (default: one per CPU). The accounts
whose password was found are listed; the passwords themselves are never shown.
Each account's most likely candidates come first, and the accounts take turns,
so that a time limit still covers everyone's likeliest passwords.

Exit status: 0 if no password was found, 1 if one was, 2 on a usage error or
if FILE cannot be read, 130 if interrupted before finding any.
"""

_NAME = "smtpauth-relay audit"

COMMON = "common"
"""
A password of zxcvbn's list of common passwords.
"""

COMMON_VARIANT = "common-variant"
"""
A common word with a capital and a digit or symbol added.
"""

USER_NAME = "user-name"
"""
A variant of the user's own name.
"""

_HEAD = 10
"""
How many of the most common passwords come before the user name variants.
"""

_VARIANTS_AFTER = 100
"""
How many of the most common passwords come before the C{Password1} variants.
"""

_VARIANT_BASES = ("password", "welcome", "changeme", "letmein", "qwerty", "admin")
"""
Words administrators and users turn into C{Password1}-style passwords, first
among the bases of L{COMMON_VARIANT} candidates (the others are the first
alphabetic words of the common passwords).
"""

_VARIANT_BASE_COUNT = 30
_VARIANT_SUFFIXES = ("1", "123", "!", "1!")
_NAME_SUFFIXES = ("123", "1", "12", "1234", "!", "1!")

Candidate = tuple[str, str]
"""
A password to try and its kind: L{COMMON}, L{COMMON_VARIANT} or L{USER_NAME}.
"""


class _UsageError(Exception):
    """
    The command line is wrong; the message says how.
    """


@dataclass
class _Options:
    """
    The command line of C{smtpauth-relay audit}.
    """

    path: str
    timeLimit: float = DEFAULT_TIME_LIMIT
    top: int = DEFAULT_TOP
    jobs: int = 0


def _parseArguments(argv: Sequence[str], maxTop: int) -> _Options:
    """
    Parse C{FILE [--time-limit SECONDS] [--top N] [--jobs N]}, options in any
    order, C{--option=VALUE} too, and C{--} before a FILE starting with C{-}.

    @raise _UsageError: If they are wrong.
    """
    values: dict[str, str] = {}
    positional: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            positional.extend(args)
            break
        name, eq, value = arg.partition("=")
        if name in ("--time-limit", "--top", "--jobs"):
            if not eq:
                if not args:
                    raise _UsageError(f"{name} needs a value")
                value = args.pop(0)
            values[name] = value
        elif arg.startswith("-") and arg != "-":
            raise _UsageError(f"unknown option {arg}")
        else:
            positional.append(arg)
    if len(positional) != 1:
        raise _UsageError("give one password FILE")
    options = _Options(positional[0], jobs=usableCpus())
    if "--time-limit" in values:
        try:
            options.timeLimit = float(values["--time-limit"])
        except ValueError:
            options.timeLimit = math.nan
        if not (0 < options.timeLimit < math.inf):
            raise _UsageError("--time-limit must be a positive number of seconds")
    if "--top" in values:
        options.top = _positiveInteger("--top", values["--top"], maxTop)
    if "--jobs" in values:
        options.jobs = _positiveInteger("--jobs", values["--jobs"], 1024)
    return options


def _positiveInteger(name: str, text: str, maximum: int) -> int:
    """
    @return: C{text} as a whole number from 1 to C{maximum}.

    @raise _UsageError: If it is not one.
    """
    if text.isascii() and text.isdigit() and 1 <= int(text) <= maximum:
        return int(text)
    raise _UsageError(f"{name} must be a whole number from 1 to {maximum}")


def _variantBases(common: Sequence[str]) -> list[str]:
    """
    The words to make C{Password1}-style candidates of.
    """
    bases = list(_VARIANT_BASES)
    for word in common:
        if len(bases) >= _VARIANT_BASE_COUNT:
            break
        if word.isascii() and word.isalpha() and len(word) >= 5 and word not in bases:
            bases.append(word)
    return bases


def _sharedCandidates(common: Sequence[str]) -> list[Candidate]:
    """
    The candidates every account gets, most likely first: the common
    passwords, with L{COMMON_VARIANT}s after the first L{_VARIANTS_AFTER}.
    """
    seen = set(common)
    variants: list[Candidate] = []
    for base in _variantBases(common):
        capitalised = base.capitalize()
        for suffix in _VARIANT_SUFFIXES:
            candidate = capitalised + suffix
            if candidate not in seen:
                seen.add(candidate)
                variants.append((candidate, COMMON_VARIANT))
    return (
        [(password, COMMON) for password in common[:_VARIANTS_AFTER]]
        + variants
        + [(password, COMMON) for password in common[_VARIANTS_AFTER:]]
    )


def _nameCandidates(user: str) -> list[str]:
    """
    Variants of a user's name, most likely first: for C{Alice@example.org},
    C{alice}, C{alice123}, C{alice1}, ..., C{Alice1}, ..., C{ecila},
    C{alicealice}, and the whole address.
    """
    local, at, _ = user.rpartition("@")
    name = local if at and local else user
    lower = name.lower()
    capitalised = lower[:1].upper() + lower[1:]
    forms = [lower]
    forms += [lower + suffix for suffix in _NAME_SUFFIXES]
    forms += [capitalised] + [capitalised + suffix for suffix in _NAME_SUFFIXES]
    forms += [name, lower[::-1], name[::-1], lower + lower]
    if name != user:
        forms += [user, user.lower()]
    return list(dict.fromkeys(forms))


@dataclass
class _Account:
    """
    One account under audit.

    @ivar names: Its L{USER_NAME} candidates not among the first L{_HEAD}
        shared ones.
    @ivar total: How many candidates it has in all.
    @ivar submitted: How many have been handed to a worker.
    @ivar checked: How many have been checked.
    @ivar found: The kind of the candidate that matched, if one did.
    @ivar failed: Whether checking its hash raised an exception.
    """

    user: str
    encoded: str
    names: list[str]
    total: int
    submitted: int = 0
    checked: int = 0
    found: str | None = None
    failed: bool = False

    @property
    def finished(self) -> bool:
        """
        Whether there is no point in checking more of its candidates.
        """
        return self.found is not None or self.failed

    def candidates(self, shared: list[Candidate]) -> Iterator[Candidate]:
        """
        This account's candidates, most likely first, without repeats.
        """
        yield from shared[:_HEAD]
        for name in self.names:
            yield name, USER_NAME
        names = set(self.names)
        for candidate in shared[_HEAD:]:
            if candidate[0] not in names:
                yield candidate


def _makeAccount(user: str, encoded: str, shared: list[Candidate]) -> _Account:
    """
    Set up the audit of one account.
    """
    head = {password for password, _ in shared[:_HEAD]}
    names = [name for name in _nameCandidates(user) if name not in head]
    rest = {password for password, _ in shared[_HEAD:]}
    total = len(shared) + len(names) - sum(1 for name in names if name in rest)
    return _Account(user, encoded, names, total)


def _turns(
    accounts: list[_Account], shared: list[Candidate]
) -> Iterator[tuple[_Account, Candidate]]:
    """
    Every account's candidates, the accounts taking turns; an account drops
    out as soon as it is finished.
    """
    queue = [(account, account.candidates(shared)) for account in accounts]
    while queue:
        still: list[tuple[_Account, Iterator[Candidate]]] = []
        for account, candidates in queue:
            if account.finished:
                continue
            candidate = next(candidates, None)
            if candidate is None or account.finished:
                continue
            yield account, candidate
            still.append((account, candidates))
        queue = still


class _ProgressBar:
    """
    A progress line on a terminal, redrawn in place with C{\\r}.
    """

    width = 30
    interval = 0.1

    def __init__(self, stream: TextIO, clock: Callable[[], float]) -> None:
        self.stream = stream
        self.clock = clock
        self.lastDrawn = -math.inf
        self.lastLength = 0

    def update(self, done: int, total: int, *, force: bool = False) -> None:
        """
        Redraw the line, unless it was drawn less than L{interval} ago.
        """
        now = self.clock()
        if not force and now - self.lastDrawn < self.interval:
            return
        self.lastDrawn = now
        fraction = min(1.0, done / total) if total else 1.0
        filled = int(self.width * fraction)
        line = (
            f"[{'#' * filled}{'-' * (self.width - filled)}]"
            f" {int(fraction * 100)}% {done}/{total} checks"
        )
        padding = " " * max(0, self.lastLength - len(line))
        self.lastLength = len(line)
        self.stream.write(f"\r{line}{padding}")
        self.stream.flush()

    def finish(self) -> None:
        """
        End the line, so that what follows starts on a new one.
        """
        self.stream.write("\n")
        self.stream.flush()


class _NoProgress:
    """
    What stands for a L{_ProgressBar} when the output is not a terminal.
    """

    def update(self, done: int, total: int, *, force: bool = False) -> None:
        pass

    def finish(self) -> None:
        pass


class _Audit:
    """
    The checking of every account's candidates, in a thread pool, against a
    deadline.

    @ivar done: How many checks have completed.
    @ivar total: How many checks there will be if nothing stops the audit
        (it shrinks as accounts are found out).
    @ivar stopped: C{None} if every candidate was checked, C{"time"} if the
        time limit stopped the audit, C{"interrupt"} if Ctrl-C did.
    """

    def __init__(
        self,
        accounts: list[_Account],
        shared: list[Candidate],
        workers: int,
        deadline: float,
        clock: Callable[[], float],
        progress: _ProgressBar | _NoProgress,
        verify: Callable[[bytes, str], bool],
    ) -> None:
        self.accounts = accounts
        self.verify = verify
        self.shared = shared
        self.workers = workers
        self.deadline = deadline
        self.clock = clock
        self.progress = progress
        self.done = 0
        self.total = sum(account.total for account in accounts)
        self.stopped: str | None = None

    def run(self) -> None:
        """
        Check candidates until all are checked, the deadline passes or the
        user interrupts; the checks under way are always waited for.
        """
        turns = _turns(self.accounts, self.shared)
        inflight: dict[Future[bool], tuple[_Account, Candidate]] = {}
        executor = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="smtpauth-relay-audit"
        )
        try:
            while True:
                try:
                    if self.stopped is None:
                        self._submit(executor, turns, inflight)
                    if not inflight:
                        break
                    completed, _ = wait(inflight, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    if self.stopped == "interrupt":
                        # A second Ctrl-C: do not wait for the checks under
                        # way either.
                        break
                    self.stopped = "interrupt"
                    continue
                for future in completed:
                    account, (_, kind) = inflight.pop(future)
                    self._record(account, kind, future)
                self.progress.update(self.done, self.total)
        finally:
            # Only a second Ctrl-C leaves checks under way; do not wait.
            executor.shutdown(wait=not inflight, cancel_futures=True)
        self.progress.update(self.done, self.total, force=True)
        self.progress.finish()

    def _submit(
        self,
        executor: ThreadPoolExecutor,
        turns: Iterator[tuple[_Account, Candidate]],
        inflight: dict[Future[bool], tuple[_Account, Candidate]],
    ) -> None:
        """
        Give each idle worker a check, unless the deadline has passed.
        """
        while len(inflight) < self.workers:
            if self.clock() >= self.deadline:
                if next(turns, None) is not None:
                    self.stopped = "time"
                return
            turn = next(turns, None)
            if turn is None:
                return
            account, (password, _) = turn
            account.submitted += 1
            future = executor.submit(
                self.verify, password.encode("utf-8"), account.encoded
            )
            inflight[future] = turn

    def _record(self, account: _Account, kind: str, future: Future[bool]) -> None:
        """
        Note the result of one check.
        """
        self.done += 1
        account.checked += 1
        try:
            matched = future.result()
        except Exception:
            matched = False
            if not account.finished:
                account.failed = True
                self.total -= account.total - account.submitted
        if matched and not account.finished:
            account.found = kind
            self.total -= account.total - account.submitted


def _plural(count: int, noun: str) -> str:
    """
    C{"1 account"}, C{"2 accounts"}.
    """
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _describe(kind: str, top: int) -> str:
    """
    What is known of a found password, without giving it away.
    """
    if kind == COMMON:
        return f"one of the {top} most common"
    if kind == COMMON_VARIANT:
        return "a common word with a capital and a digit or symbol added"
    return "a variant of the user name"


def auditCommand(
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    *,
    isatty: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    verify: Callable[[bytes, str], bool] = passwords.verifyPassword,
) -> int:
    """
    C{smtpauth-relay audit FILE [--time-limit SECONDS] [--top N] [--jobs N]}:
    try the most common passwords against every hash in a password file.

    The accounts whose password was found are listed on C{stdout} with what
    kind of password it was (never the password), then the accounts that
    were skipped (a hash scheme L{passwords.hashScheme} does not know, or a
    hash that could not be checked), then how many fell and, if the time
    limit or Ctrl-C cut the audit short, how far it got.

    @param argv: The arguments after C{audit}.
    @param stdout: Where the report goes.
    @param stderr: Where usage errors and the progress bar go.
    @param isatty: Tells whether C{stderr} is a terminal, hence whether to
        draw a progress bar; C{stderr.isatty} if C{None}.
    @param clock: Gives the time in seconds, for the time limit.
    @param verify: Checks a password against a hash, like
        L{passwords.verifyPassword}; it is called in worker threads.

    @return: The exit status: 0 if no password was found, 1 if one was, 2 on
        a usage error or an unreadable FILE, 130 if interrupted before any
        was found.
    """
    args = list(argv)
    if any(arg in ("-h", "--help") for arg in args):
        stdout.write(USAGE)
        return 0
    common = commonPasswords(1 << 20)
    try:
        options = _parseArguments(args, len(common))
    except _UsageError as e:
        stderr.write(f"{_NAME}: {e}\n{USAGE}")
        return 2
    try:
        with open(options.path, "rb") as f:
            data = f.read()
    except OSError as e:
        stderr.write(f"{_NAME}: cannot read {options.path}: {e.strerror or e}\n")
        return 2

    shared = _sharedCandidates(common[: options.top])
    accounts: list[_Account] = []
    skipped: list[str] = []
    for user, encoded in parseHtpasswd(data, options.path).items():
        if passwords.hashScheme(encoded) is None:
            skipped.append(user)
        else:
            accounts.append(_makeAccount(user, encoded, shared))

    if isatty is None:
        isatty = getattr(stderr, "isatty", lambda: False)
    progress: _ProgressBar | _NoProgress = _NoProgress()
    if accounts and isatty():
        progress = _ProgressBar(stderr, clock)
    start = clock()
    audit = _Audit(
        accounts,
        shared,
        options.jobs,
        start + options.timeLimit,
        clock,
        progress,
        verify,
    )
    audit.run()
    elapsed = clock() - start

    weak = [account for account in accounts if account.found is not None]
    for account in weak:
        assert account.found is not None
        description = _describe(account.found, options.top)
        stdout.write(f"{account.user}: weak password ({description})\n")
    for account in accounts:
        if account.failed:
            stdout.write(f"{account.user}: skipped (the hash could not be checked)\n")
    for user in skipped:
        stdout.write(f"{user}: skipped (unsupported hash scheme)\n")

    checked = len(accounts) - sum(1 for account in accounts if account.failed)
    if weak:
        stdout.write(
            f"{len(weak)} of {_plural(checked, 'account')} in {options.path}"
            f" {'has' if len(weak) == 1 else 'have'} a weak password.\n"
        )
    else:
        stdout.write(
            f"No weak password found among {_plural(checked, 'account')}"
            f" in {options.path}.\n"
        )
    if audit.stopped is not None:
        unfinished = [account.checked for account in accounts if not account.finished]
        cause = (
            f"Time limit of {options.timeLimit:g} s reached"
            if audit.stopped == "time"
            else "Interrupted"
        )
        summary = (
            f"{cause} after {audit.done} of {_plural(audit.total, 'check')}"
            f" ({elapsed:.1f} s)"
        )
        if unfinished:
            summary += (
                "; each account not listed was tried with at least its"
                f" {min(unfinished)} most likely passwords"
            )
        stdout.write(summary + ".\n")
    if weak:
        return 1
    return 130 if audit.stopped == "interrupt" else 0
