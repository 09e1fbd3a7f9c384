# -*- test-case-name: tests.test_checkers -*-
"""
Credential checkers backed by local files.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay import passwords
from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.htpasswd import parseHtpasswd
from smtpauth_relay.interfaces import (
    ICramMD5Credentials,
    ISASLMechanisms,
    IScramCredentials,
    IScramStore,
)
from smtpauth_relay.logincache import LoginCache
from smtpauth_relay.threads import RunInThread, threadPoolRunner

__all__ = ["HtpasswdChecker"]

_T = TypeVar("_T")


_Signature = tuple[int, int, int, int]


def _toBytes(value: bytes | str) -> bytes:
    """
    Credentials from twisted.mail hold bytes; other callers may pass text.
    """
    return value.encode("utf-8") if isinstance(value, str) else value


@implementer(ICredentialsChecker, IScramStore, ISASLMechanisms)
class HtpasswdChecker:
    """
    Check user names and passwords against a password file in the htpasswd
    format (see L{smtpauth_relay.htpasswd}).

    Besides passwords (PLAIN, LOGIN), it checks SCRAM-SHA-256 proofs
    against users with a SCRAM-SHA-256 entry and CRAM-MD5 responses against
    users with a C{{CRAM-MD5}} entry (L{IScramStore},
    L{IScramCredentials}, L{ICramMD5Credentials}), and tells the server
    (L{ISASLMechanisms}) when every user of the file has such an entry, so
    that only then are those mechanisms offered.

    The file is looked at with C{stat} on every request and read again only
    when its inode, size or modification time changed, so edits (and
    C{smtpauth-relay passwd}) take effect without a restart.  If the file is
    deleted, it has no users.  If it cannot be read (permissions, I/O error),
    requests fail with L{CheckerUnavailable} until it can.

    Hashes are verified in a thread.  A user who is not in the file costs a
    verification against a dummy hash too, before L{UnknownUser}, so that
    timing does not tell which users exist; unless C{dummyHash} is given,
    the dummy is of the scheme most of the file's entries have (a bcrypt
    dummy would make unknown users slow in a file of SCRAM entries).

    @ivar path: The password file.
    @ivar dummyHash: The hash verified against for unknown users.
    """

    credentialInterfaces = (IUsernamePassword, IScramCredentials, ICramMD5Credentials)
    log = Logger()
    maxPending = 128
    """
    Hash checks allowed to wait for a thread at once; beyond that a login
    gets 454 4.7.0 at once instead of queueing without bound (a flood of
    AUTH attempts must not make every login wait minutes).
    """
    verifiedTTL = 300.0
    """
    Seconds a password that verified is remembered (as a keyed HMAC, see
    L{LoginCache}), so that a client logging in for every few messages
    costs one slow hash per five minutes, not one per session.  Only
    successes are remembered: a wrong password always costs a full check.
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
        self._fixedDummy = dummyHash is not None
        if dummyHash is None:
            dummyHash = passwords.dummyHash()
        self.dummyHash = dummyHash
        self._bcryptDummy = dummyHash
        self._signature: _Signature | None = None
        self._users: dict[str, str] = {}
        self._problem: str | None = None
        self._pending = 0
        self._verified = LoginCache(self.verifiedTTL, self._now)
        self._mechanisms = frozenset({"PLAIN", "LOGIN"})
        self._scramIterations = passwords.DEFAULT_SCRAM_ITERATIONS
        # Checked against for unknown users of the SCRAM and CRAM-MD5
        # mechanisms, so that they cost what a known one does.
        self._dummyScramKey = secrets.token_bytes(32)
        self._dummyCramState = secrets.token_bytes(32)

    def _now(self) -> float:
        seconds = getattr(self._reactor, "seconds", None)
        return float(seconds()) if seconds is not None else time.monotonic()

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
                self._learnSchemes()
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
        self._learnSchemes()
        self.log.info(
            "Loaded {count} users from password file {path}",
            path=self.path,
            count=len(self._users),
        )
        return self._users

    def _learnSchemes(self) -> None:
        """
        After reading the file: which mechanisms all its users can use, the
        usual SCRAM iteration count, and the dummy hash for unknown users.
        """
        schemes = Counter(passwords.hashScheme(h) for h in self._users.values())
        mechanisms = {"PLAIN", "LOGIN"}
        scram = [passwords.parseScram(h) for h in self._users.values()]
        if all(s is not None for s in scram):
            mechanisms.add("SCRAM-SHA-256")
        if all(passwords.parseCramMD5(h) is not None for h in self._users.values()):
            mechanisms.add("CRAM-MD5")
        self._mechanisms = frozenset(mechanisms)
        iterations = Counter(s.iterations for s in scram if s is not None)
        self._scramIterations = (
            iterations.most_common(1)[0][0]
            if iterations
            else passwords.DEFAULT_SCRAM_ITERATIONS
        )
        if self._fixedDummy:
            return
        common = schemes.most_common(1)[0][0] if schemes else None
        if common == passwords.SCRAM_SHA_256:
            self.dummyHash = passwords.fakeScramSecrets(
                "", self._scramIterations
            ).format()
        elif common == passwords.CRAM_MD5:
            self.dummyHash = "{CRAM-MD5}" + self._dummyCramState.hex()
        else:
            self.dummyHash = self._bcryptDummy

    def saslMechanisms(self) -> frozenset[str]:
        """
        PLAIN and LOGIN always; SCRAM-SHA-256 (CRAM-MD5) when every entry of
        the file is a SCRAM-SHA-256 (C{{CRAM-MD5}}) one.  Only PLAIN and
        LOGIN while the file cannot be read (their logins then get 454).
        """
        try:
            self._currentUsers()
        except CheckerUnavailable:
            return frozenset({"PLAIN", "LOGIN"})
        return self._mechanisms

    def scramSecrets(self, username: str) -> Deferred[passwords.ScramSecrets]:
        """
        The SCRAM secrets of C{username}'s entry; made-up ones, with the
        file's usual iteration count, if it has none (not in the file, or
        not a SCRAM entry).  See L{IScramStore}.
        """
        try:
            users = self._currentUsers()
        except CheckerUnavailable:
            return fail()
        encoded = users.get(username)
        found = None if encoded is None else passwords.parseScram(encoded)
        if found is None:
            found = passwords.fakeScramSecrets(username, self._scramIterations)
        return succeed(found)

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
        self, credentials: ICredentials
    ) -> Deferred[str]:
        """
        Check a user name and password, a SCRAM-SHA-256 proof or a CRAM-MD5
        response.

        @param credentials: L{IUsernamePassword}, L{IScramCredentials} or
            L{ICramMD5Credentials}; the user name is compared exactly, after
            decoding as UTF-8.

        @return: A L{Deferred} that fires with the user name (L{str}), or
            fails with L{UnknownUser} if the file has no such user,
            L{UnauthorizedLogin} if the password (proof, response) is wrong,
            the user's entry cannot serve the mechanism, or the user name is
            not UTF-8, or L{CheckerUnavailable} if the file cannot be read.
        """
        try:
            users = self._currentUsers()
        except CheckerUnavailable:
            return fail()
        if IScramCredentials.providedBy(credentials):
            return self._checkScram(credentials, users)
        if ICramMD5Credentials.providedBy(credentials):
            return self._checkCramMD5(credentials, users)
        return self._checkPassword(cast(IUsernamePassword, credentials), users)

    def _userOf(
        self, credentials: Any, users: dict[str, str]
    ) -> tuple[str | None, str | None]:
        """
        The user name of C{credentials} (C{None} if not UTF-8) and its
        entry (C{None} if not in the file).
        """
        try:
            username: str | None = _toBytes(credentials.username).decode("utf-8")
        except UnicodeDecodeError:
            username = None
        return username, None if username is None else users.get(username)

    def _decided(
        self, username: str | None, encoded: str | None, matched: bool
    ) -> Deferred[str]:
        """
        The outcome of a check done on the reactor thread (cheap: a few
        HMACs), the same way as L{_checkPassword}'s.
        """
        if encoded is None:
            return fail(UnauthorizedLogin() if username is None else UnknownUser())
        if not matched:
            return fail(UnauthorizedLogin())
        assert username is not None
        return succeed(username)

    def _checkScram(self, credentials: Any, users: dict[str, str]) -> Deferred[str]:
        """
        Check a SCRAM-SHA-256 proof against the user's StoredKey.  A user
        without a SCRAM entry is refused (an unknown one with
        L{UnknownUser}), after checking against a dummy key all the same.
        """
        username, encoded = self._userOf(credentials, users)
        found = None if encoded is None else passwords.parseScram(encoded)
        key = self._dummyScramKey if found is None else found.storedKey
        matched = credentials.checkProof(key) and found is not None
        return self._decided(username, encoded, matched)

    def _checkCramMD5(self, credentials: Any, users: dict[str, str]) -> Deferred[str]:
        """
        Check a CRAM-MD5 response against the user's C{{CRAM-MD5}} state.
        A user without one is refused as in L{_checkScram}.
        """
        username, encoded = self._userOf(credentials, users)
        state = None if encoded is None else passwords.parseCramMD5(encoded)
        matched = (
            credentials.checkCramState(self._dummyCramState if state is None else state)
            and state is not None
        )
        return self._decided(username, encoded, matched)

    def _checkPassword(
        self, credentials: IUsernamePassword, users: dict[str, str]
    ) -> Deferred[str]:
        """
        Check a password against the user's hash, in a thread.
        """
        password = _toBytes(credentials.password)
        try:
            username: str | None = _toBytes(credentials.username).decode("utf-8")
        except UnicodeDecodeError:
            username = None
        encoded = None if username is None else users.get(username)
        # The stored hash is part of the key: a changed password (or hash)
        # is never answered from the cache.
        cacheKey = f"{username}\0{encoded}"
        if encoded is not None and self._verified.check(cacheKey, password):
            assert username is not None
            return succeed(username)

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

        assert username is not None

        def checked(matched: bool) -> str:
            if not matched:
                raise UnauthorizedLogin()
            assert username is not None
            self._verified.store(cacheKey, password)
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
