# -*- test-case-name: tests.test_checkers -*-
"""
Credential checkers backed by local files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay import passwords
from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.htpasswd import parseHtpasswd
from smtpauth_relay.threads import RunInThread, threadPoolRunner

__all__ = ["HtpasswdChecker"]

_T = TypeVar("_T")


_Signature = tuple[int, int, int, int]


def _toBytes(value: bytes | str) -> bytes:
    """
    Credentials from twisted.mail hold bytes; other callers may pass text.
    """
    return value.encode("utf-8") if isinstance(value, str) else value


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """
    Check user names and passwords against a password file in the htpasswd
    format (see L{smtpauth_relay.htpasswd}).

    The file is looked at with C{stat} on every request and read again only
    when its inode, size or modification time changed, so edits (and
    C{smtpauth-relay passwd}) take effect without a restart.  If the file is
    deleted, it has no users.  If it cannot be read (permissions, I/O error),
    requests fail with L{CheckerUnavailable} until it can.

    Hashes are verified in a thread.  A user who is not in the file costs a
    verification against a dummy hash too, before L{UnknownUser}, so that
    timing does not tell which users exist.

    @ivar path: The password file.
    @ivar dummyHash: The hash verified against for unknown users.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()
    maxPending = 32
    """
    Hash checks allowed to wait for a thread at once; beyond that a login
    gets 454 4.7.0 at once instead of queueing without bound (a flood of
    AUTH attempts must not make every login wait minutes).
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorThreads | None = None,
        runInThread: RunInThread | None = None,
        dummyHash: str | None = None,
    ) -> None:
        """
        @param path: The password file.
        @param reactor: Whose thread pool verifies hashes; the global reactor
            if C{None} (imported at the first request, not here).  Unused when
            C{runInThread} is given.
        @param runInThread: Runs a blocking call in a thread and returns a
            L{Deferred} of its result; by default, C{deferToThreadPool} on
            C{reactor}'s thread pool.
        @param dummyHash: The hash to verify unknown users' passwords against.
            By default L{passwords.dummyHash}, which is made (one bcrypt hash
            at the default cost) the first time a checker is built, at
            start-up, not on the reactor thread while serving.
        """
        self.path = path
        self._reactor = reactor
        self._runInThread = runInThread
        if dummyHash is None:
            dummyHash = passwords.dummyHash()
        self.dummyHash = dummyHash
        self._signature: _Signature | None = None
        self._users: dict[str, str] = {}
        self._problem: str | None = None
        self._pending = 0

    def _inThread(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        """
        Call C{f(*args)} in a thread.

        The global reactor, when it is the one to use, is imported here on
        first use rather than when the checker is made: checkers are also made
        to validate a configuration, which must not install a reactor.
        """
        if self._runInThread is None:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor as globalReactor

                reactor = self._reactor = cast(IReactorThreads, globalReactor)
            self._runInThread = threadPoolRunner(reactor)
        return self._runInThread(f, *args)

    def _currentUsers(self) -> dict[str, str]:
        """
        The users in the file as it is now, read again only if it changed.

        @raise CheckerUnavailable: If the file cannot be read.
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if self._signature != (0, 0, 0, 0):
                self.log.warn(
                    "Password file {path} does not exist: it has no users",
                    path=self.path,
                )
                self._signature = (0, 0, 0, 0)
                self._users = {}
            self._problem = None
            return self._users
        except OSError as e:
            raise self._unavailable(e) from None

        signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if signature == self._signature:
            return self._users
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            # Deleted between stat and open: look again next time.
            return {}
        except OSError as e:
            raise self._unavailable(e) from None
        self._users = parseHtpasswd(data, self.path)
        self._signature = signature
        self._problem = None
        self.log.info(
            "Loaded {count} users from password file {path}",
            path=self.path,
            count=len(self._users),
        )
        return self._users

    def _unavailable(self, error: OSError) -> CheckerUnavailable:
        """
        Log (once while it lasts) that the file cannot be read.

        @return: The exception to raise.
        """
        problem = error.strerror or str(error)
        if problem != self._problem:
            self.log.error(
                "Cannot read password file {path}: {problem}",
                path=self.path,
                problem=problem,
            )
            self._problem = problem
        return CheckerUnavailable(f"cannot read password file {self.path}: {problem}")

    # Twisted declares avatar IDs as bytes; ours are the user name as text,
    # which is what the realm and the Received header want.
    def requestAvatarId(  # type: ignore[override]
        self, credentials: IUsernamePassword
    ) -> Deferred[str]:
        """
        Check a user name and password.

        @param credentials: The user name (compared exactly, after decoding
            as UTF-8) and password.

        @return: A L{Deferred} that fires with the user name (L{str}), or
            fails with L{UnknownUser} if the file has no such user,
            L{UnauthorizedLogin} if the password is wrong or the user name
            is not UTF-8, or L{CheckerUnavailable} if the file cannot be read.
        """
        try:
            users = self._currentUsers()
        except CheckerUnavailable:
            return fail()

        password = _toBytes(credentials.password)
        try:
            username: str | None = _toBytes(credentials.username).decode("utf-8")
        except UnicodeDecodeError:
            username = None
        encoded = None if username is None else users.get(username)

        if self._pending >= self.maxPending:
            self.log.warn(
                "{count} password checks already waiting for {path}; "
                "answering 454 until they are done",
                count=self._pending,
                path=self.path,
            )
            return fail(CheckerUnavailable("too many password checks waiting"))

        if encoded is None:
            d = self._verify(password, self.dummyHash)
            noSuchUser: UnauthorizedLogin = (
                UnauthorizedLogin() if username is None else UnknownUser()
            )

            def unknown(ignored: object) -> str:
                raise noSuchUser

            return d.addCallback(unknown)

        def checked(matched: bool) -> str:
            if not matched:
                raise UnauthorizedLogin()
            assert username is not None
            return username

        return self._verify(password, encoded).addCallback(checked)

    def _verify(self, password: bytes, encoded: str) -> Deferred[bool]:
        """
        Verify in a thread, counting the checks under way.
        """
        self._pending += 1

        def done(result: _T) -> _T:
            self._pending -= 1
            return result

        return self._inThread(passwords.verifyPassword, password, encoded).addBoth(done)
