"""
Tests for L{smtpauth_relay.checkers} and the C{htpasswd} strcred plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import findCheckerFactory, makeChecker
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay.auth import ChainChecker
from smtpauth_relay.checkers import HtpasswdChecker
from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.interfaces import ISASLMechanisms, IScramStore
from smtpauth_relay.passwords import (
    CRAM_MD5,
    SCRAM_SHA_256,
    ScramSecrets,
    dummyHash,
    hashPassword,
    verifyPassword,
)
from smtpauth_relay.sasl import CramMD5, ScramCredentials, ScramSHA256
from smtpauth_relay.testing import MemoryChecker
from tests.plugin_support import (
    assertCheckerFactory,
    checkerMadeAlone,
    pluginImports,
)

ALICE_PASSWORD = b"alice's secret"
BOB_PASSWORD = b"bob's secret"
# openssl passwd -6 -salt saltsalt secret
CAROL_SHA512 = (
    "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8w"
    "iOQSpT0Y77vwPZN.Pq.H91p5hVO1"
)
# PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("secret")
DAVE_ARGON2ID = (
    "$argon2id$v=19$m=8,t=1,p=1$C5Xsp6qxbwXhEc5cR9n74w"
    "$3rAnmPZGr27Cg210qG+QbUn+Oll/fxYEqJkBE29ZpGc"
)


@implementer(IUsernamePassword)
class TextCredentials:
    """
    Username/password credentials holding text, as some callers make.
    """

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def checkPassword(self, password: bytes) -> bool:
        return password == self.password.encode()


class SynchronousThreadSpy:
    """
    A C{runInThread} that runs the call at once, in this thread, and records
    it.

    @ivar calls: C{(f, args)} for each call, in order.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append((f, args))
        return maybeDeferred(f, *args)


class PendingThreadSpy:
    """
    A C{runInThread} whose Deferreds the test fires itself, as the thread
    pool would when the work is done.

    @ivar calls: C{(f, args, deferred)} for each call, in order.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]]
        self.calls = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self) -> None:
        """
        Run every pending call and fire its Deferred with the result.
        """
        calls, self.calls = self.calls, []
        for f, args, d in calls:
            d.callback(f(*args))


class FakeThreadPool:
    """
    Runs C{callInThreadWithCallback} calls at once, recording the functions.
    """

    def __init__(self) -> None:
        self.functions: list[Callable[..., Any]] = []

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None],
        f: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.functions.append(f)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class FakeThreadsReactor:
    """
    The parts of a reactor that C{deferToThreadPool} uses.
    """

    def __init__(self) -> None:
        self.threadPool = FakeThreadPool()
        self.fromThread = 0

    def getThreadPool(self) -> FakeThreadPool:
        return self.threadPool

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.fromThread += 1
        f(*args, **kw)


class HtpasswdCheckerTests(SynchronousTestCase):
    """
    Tests for L{HtpasswdChecker}.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "users")
        self.aliceHash = hashPassword(ALICE_PASSWORD, rounds=4)
        self.bobHash = hashPassword(BOB_PASSWORD, rounds=4)
        self.writeUsers(
            f"# test users\n"
            f"alice:{self.aliceHash}\n"
            f"carol:{CAROL_SHA512}\n"
            f"dave:{DAVE_ARGON2ID}\n"
        )
        self.spy = SynchronousThreadSpy()
        self.checker = self.makeChecker()

    def makeChecker(self, **kwargs: Any) -> HtpasswdChecker:
        kwargs.setdefault("runInThread", self.spy)
        kwargs.setdefault("dummyHash", dummyHash(rounds=4))
        return HtpasswdChecker(self.path, **kwargs)

    def writeUsers(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)

    def login(self, username: bytes, password: bytes) -> Deferred[str]:
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    def assertRejected(self, d: Deferred[str], unknown: bool) -> Failure:
        """
        C{d} failed with L{UnknownUser} if C{unknown}, else with a plain
        L{UnauthorizedLogin}.
        """
        failure = self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(failure.check(UnknownUser) is not None, unknown)
        return failure

    def test_interface(self) -> None:
        """
        The checker provides L{ICredentialsChecker} for username/password,
        SCRAM and CRAM-MD5 credentials, L{IScramStore} and
        L{ISASLMechanisms}.
        """
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertTrue(verifyObject(IScramStore, self.checker))
        self.assertTrue(verifyObject(ISASLMechanisms, self.checker))
        self.assertEqual(
            [i.__name__ for i in self.checker.credentialInterfaces],
            ["IUsernamePassword", "IScramCredentials", "ICramMD5Credentials"],
        )

    def test_boundedWaitingChecks(self) -> None:
        """
        Beyond C{maxPending} password checks waiting for a thread, a login
        fails at once with L{CheckerUnavailable} (454) instead of queueing;
        once checks finish, logins are checked again.
        """
        waiting: list[Deferred[Any]] = []

        def slowThread(f: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            waiting.append(d)
            return d.addCallback(lambda _: f(*args))

        self.checker = self.makeChecker(runInThread=slowThread)
        self.checker.maxPending = 2
        first = self.login(b"alice", ALICE_PASSWORD)
        self.login(b"mallory", b"guess")
        self.failureResultOf(self.login(b"alice", ALICE_PASSWORD), CheckerUnavailable)
        waiting[0].callback(None)
        self.assertEqual(self.successResultOf(first), "alice")
        third = self.login(b"alice", b"a wrong password")
        waiting[2].callback(None)
        self.assertRejected(third, unknown=False)

    def test_verifiedPasswordRemembered(self) -> None:
        """
        A password that verified is answered from memory for
        C{verifiedTTL} seconds, without another hash check; a wrong one is
        always checked in full, and after the time is up the right one is
        checked again.
        """
        clock = Clock()
        self.checker = self.makeChecker(reactor=clock)
        self.assertEqual(
            self.successResultOf(self.login(b"alice", ALICE_PASSWORD)), "alice"
        )
        self.assertEqual(len(self.spy.calls), 1)
        clock.advance(self.checker.verifiedTTL - 1)
        self.assertEqual(
            self.successResultOf(self.login(b"alice", ALICE_PASSWORD)), "alice"
        )
        self.assertEqual(len(self.spy.calls), 1)
        self.assertRejected(self.login(b"alice", b"close, but no"), unknown=False)
        self.assertEqual(len(self.spy.calls), 2)
        clock.advance(1)
        self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
        self.assertEqual(len(self.spy.calls), 3)
        self.assertNotIn(ALICE_PASSWORD, repr(vars(self.checker._verified)).encode())

    def test_bcrypt(self) -> None:
        """
        The right password for a bcrypt user gives the user name, as text; the
        hash was verified through C{runInThread}.
        """
        result = self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
        self.assertEqual(result, "alice")
        self.assertIsInstance(result, str)
        self.assertEqual(
            self.spy.calls, [(verifyPassword, (ALICE_PASSWORD, self.aliceHash))]
        )

    def test_sha512Crypt(self) -> None:
        """
        sha512-crypt users log in with the right password and not a wrong one.
        """
        self.assertEqual(self.successResultOf(self.login(b"carol", b"secret")), "carol")
        self.assertRejected(self.login(b"carol", b"secreT"), unknown=False)

    def test_argon2id(self) -> None:
        """
        argon2id users log in with the right password and not a wrong one.
        """
        self.assertEqual(self.successResultOf(self.login(b"dave", b"secret")), "dave")
        self.assertRejected(self.login(b"dave", b"Secret"), unknown=False)

    def test_textCredentials(self) -> None:
        """
        Credentials holding text rather than bytes work too.
        """
        credentials = TextCredentials("alice", ALICE_PASSWORD.decode())
        d = self.checker.requestAvatarId(credentials)
        self.assertEqual(self.successResultOf(d), "alice")

    def test_wrongPassword(self) -> None:
        """
        A wrong password is L{UnauthorizedLogin}, not L{UnknownUser}: the
        user exists, and the next checker must not be asked.
        """
        self.assertRejected(self.login(b"alice", BOB_PASSWORD), unknown=False)
        self.assertEqual(
            self.spy.calls, [(verifyPassword, (BOB_PASSWORD, self.aliceHash))]
        )

    def test_unknownUser(self) -> None:
        """
        An unknown user costs a verification against the dummy hash, in the
        thread, before L{UnknownUser}.
        """
        self.assertRejected(self.login(b"mallory", b"guess"), unknown=True)
        self.assertEqual(
            self.spy.calls, [(verifyPassword, (b"guess", self.checker.dummyHash))]
        )

    def test_unknownUserWaitsForHash(self) -> None:
        """
        The answer for an unknown user comes only once the dummy verification
        has finished in the thread, just as for a wrong password.
        """
        spy = PendingThreadSpy()
        self.checker = self.makeChecker(runInThread=spy)
        unknown = self.login(b"mallory", b"guess")
        wrong = self.login(b"alice", b"guess")
        self.assertNoResult(unknown)
        self.assertNoResult(wrong)
        self.assertEqual(
            [(f, args) for f, args, _ in spy.calls],
            [
                (verifyPassword, (b"guess", self.checker.dummyHash)),
                (verifyPassword, (b"guess", self.aliceHash)),
            ],
        )
        spy.finish()
        self.assertRejected(unknown, unknown=True)
        self.assertRejected(wrong, unknown=False)

    def test_caseSensitive(self) -> None:
        """
        User names are compared exactly: C{Alice} is not C{alice}.
        """
        self.assertRejected(self.login(b"Alice", ALICE_PASSWORD), unknown=True)
        self.assertRejected(self.login(b"alice ", ALICE_PASSWORD), unknown=True)

    def test_utf8Username(self) -> None:
        """
        User names are UTF-8.
        """
        self.writeUsers(f"j\u00fcrgen:{self.aliceHash}\n")
        d = self.login("j\u00fcrgen".encode(), ALICE_PASSWORD)
        self.assertEqual(self.successResultOf(d), "j\u00fcrgen")

    def test_undecodableUsername(self) -> None:
        """
        A user name that is not UTF-8 costs the dummy verification and is
        L{UnauthorizedLogin}.
        """
        self.assertRejected(self.login(b"alic\xe9", b"guess"), unknown=False)
        self.assertEqual(
            self.spy.calls, [(verifyPassword, (b"guess", self.checker.dummyHash))]
        )

    def test_rereadWhenModified(self) -> None:
        """
        A change of the file's modification time alone (same inode, same
        size) is enough for the file to be read again.
        """
        self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
        before = os.stat(self.path)
        with open(self.path, "r+b") as f:
            data = f.read().replace(self.aliceHash.encode(), self.bobHash.encode())
            f.seek(0)
            f.write(data)
        os.utime(self.path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        after = os.stat(self.path)
        self.assertEqual((after.st_ino, after.st_size), (before.st_ino, before.st_size))

        self.assertEqual(
            self.successResultOf(self.login(b"alice", BOB_PASSWORD)), "alice"
        )
        self.assertRejected(self.login(b"alice", ALICE_PASSWORD), unknown=False)

    def test_rereadWhenReplaced(self) -> None:
        """
        A file replaced by another (a new inode, as C{setUser} and editors
        do) is read again, so new users can log in without a restart.
        """
        self.assertRejected(self.login(b"bob", BOB_PASSWORD), unknown=True)
        replacement = self.path + ".new"
        with open(replacement, "w") as f:
            f.write(f"bob:{self.bobHash}\n")
        os.replace(replacement, self.path)
        self.assertEqual(self.successResultOf(self.login(b"bob", BOB_PASSWORD)), "bob")
        self.assertRejected(self.login(b"alice", ALICE_PASSWORD), unknown=True)

    def test_notRereadWhenUnchanged(self) -> None:
        """
        While the file's inode, size and modification time stay the same it
        is read only once: a change that keeps them all is not seen.
        """
        with capturedLogs() as events:
            self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
            self.successResultOf(self.login(b"carol", b"secret"))
            before = os.stat(self.path)
            with open(self.path, "r+b") as f:
                data = f.read().replace(self.aliceHash.encode(), self.bobHash.encode())
                f.seek(0)
                f.write(data)
            os.utime(self.path, ns=(before.st_atime_ns, before.st_mtime_ns))
            self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
        loads = [e for e in events if "Loaded" in e.get("log_format", "")]
        self.assertEqual(len(loads), 1)
        self.assertEqual(loads[0]["count"], 3)
        self.assertEqual(loads[0]["path"], self.path)

    def test_deleted(self) -> None:
        """
        A deleted file has no users: everyone is unknown (after the dummy
        verification), and users come back with the file.
        """
        self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
        os.rename(self.path, self.path + ".bak")
        self.spy.calls.clear()
        self.assertRejected(self.login(b"alice", ALICE_PASSWORD), unknown=True)
        self.assertEqual(
            self.spy.calls,
            [(verifyPassword, (ALICE_PASSWORD, self.checker.dummyHash))],
        )
        os.rename(self.path + ".bak", self.path)
        self.successResultOf(self.login(b"alice", ALICE_PASSWORD))

    def test_unreadable(self) -> None:
        """
        A file that cannot be read makes every request fail with
        L{CheckerUnavailable} (and hash nothing), even if it was read before;
        once it can be read again, logins work again.
        """
        self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
        os.rename(self.path, self.path + ".bak")
        os.mkdir(self.path)  # Opening a directory fails even for root.
        self.spy.calls.clear()
        with capturedLogs() as events:
            self.failureResultOf(
                self.login(b"alice", ALICE_PASSWORD), CheckerUnavailable
            )
            self.failureResultOf(self.login(b"nobody", b"x"), CheckerUnavailable)
        self.assertEqual(self.spy.calls, [])
        errors = [e for e in events if "Cannot read" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1, "logged once while it lasts")
        self.assertEqual(errors[0]["path"], self.path)

        os.rmdir(self.path)
        os.rename(self.path + ".bak", self.path)
        self.successResultOf(self.login(b"alice", ALICE_PASSWORD))

    def test_permissionDenied(self) -> None:
        """
        A file the relay has no permission to read is L{CheckerUnavailable}.
        """
        if os.geteuid() == 0:
            raise SkipTest("root can read anything")
        os.chmod(self.path, 0)
        self.addCleanup(os.chmod, self.path, 0o600)
        self.failureResultOf(self.login(b"alice", ALICE_PASSWORD), CheckerUnavailable)

    def test_unreachable(self) -> None:
        """
        A path that cannot even be looked up (a component is not a directory)
        is L{CheckerUnavailable}.
        """
        self.checker = HtpasswdChecker(
            os.path.join(self.path, "users"),
            runInThread=self.spy,
            dummyHash=self.checker.dummyHash,
        )
        self.failureResultOf(self.login(b"alice", ALICE_PASSWORD), CheckerUnavailable)

    def test_passwordNeverLogged(self) -> None:
        """
        Nothing logged while loading the file and checking passwords, right
        or wrong, contains a password or a hash.
        """
        self.writeUsers(
            f"alice:{self.aliceHash}\nbroken line {BOB_PASSWORD.decode()}\n"
        )
        with capturedLogs() as events:
            self.successResultOf(self.login(b"alice", ALICE_PASSWORD))
            self.assertRejected(self.login(b"alice", BOB_PASSWORD), unknown=False)
            self.assertRejected(self.login(b"bob", BOB_PASSWORD), unknown=True)
        self.assertTrue(events)
        for event in events:
            text = formatEvent(event) + repr(event)
            for secret in [ALICE_PASSWORD, BOB_PASSWORD]:
                self.assertNotIn(secret.decode(), text)
            self.assertNotIn(self.aliceHash, text)

    def test_defaultThreadPool(self) -> None:
        """
        By default hashes are verified in the reactor's thread pool, with the
        result delivered back in the reactor thread.
        """
        reactor = FakeThreadsReactor()
        self.checker = self.makeChecker(runInThread=None, reactor=reactor)
        d = self.login(b"alice", ALICE_PASSWORD)
        self.assertEqual(self.successResultOf(d), "alice")
        self.assertEqual(reactor.threadPool.functions, [verifyPassword])
        self.assertEqual(reactor.fromThread, 1)

    def test_defaultDummyHash(self) -> None:
        """
        By default the dummy hash is L{dummyHash} at the default cost, the
        cost of the hashes C{smtpauth-relay passwd} writes.
        """
        checker = HtpasswdChecker(self.path, runInThread=self.spy)
        self.assertIs(checker.dummyHash, dummyHash())
        self.assertTrue(checker.dummyHash.startswith("$2b$12$"))


def scramLogin(store: Any, checker: Any, username: str, password: str) -> Deferred[str]:
    """
    A SCRAM-SHA-256 exchange of scramp's client with L{ScramSHA256} over
    C{store}, whose credentials go to C{checker}.
    """
    from scramp import ScramClient

    mechanism = ScramSHA256(store)
    client = ScramClient(["SCRAM-SHA-256"], username, password)
    first: list[bytes] = []
    step = mechanism.respond(client.get_client_first().encode())
    assert isinstance(step, Deferred)
    step.addCallback(first.append)
    client.set_server_first(first[0].decode())
    credentials = mechanism.respond(client.get_client_final().encode())
    assert isinstance(credentials, ScramCredentials)
    return checker.requestAvatarId(credentials)


def cramLogin(checker: Any, username: bytes, password: bytes) -> Deferred[str]:
    """
    A CRAM-MD5 response computed from C{password}, checked by C{checker}.
    """
    import hmac

    mechanism = CramMD5("relay.test", 0)
    digest = hmac.digest(password, mechanism.challenge(), "md5").hex()
    return checker.requestAvatarId(mechanism.respond(username + b" " + digest.encode()))


class HtpasswdSASLTests(SynchronousTestCase):
    """
    L{HtpasswdChecker} with SCRAM-SHA-256 and C{{CRAM-MD5}} entries.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "users")
        self.scram = hashPassword(ALICE_PASSWORD, scheme=SCRAM_SHA_256, iterations=4096)
        self.cram = hashPassword(BOB_PASSWORD, scheme=CRAM_MD5)
        self.writeUsers(f"alice:{self.scram}\nbob:{self.cram}\n")
        self.spy = SynchronousThreadSpy()
        self.checker = HtpasswdChecker(self.path, runInThread=self.spy)

    def writeUsers(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)
        # A new modification time even within the clock's resolution.
        stat = os.stat(self.path)
        os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    def test_passwordAgainstScramAndCram(self) -> None:
        """
        PLAIN and LOGIN passwords verify against SCRAM and CRAM-MD5 entries
        (in a thread), and wrong ones do not.
        """
        ok = self.checker.requestAvatarId(UsernamePassword(b"alice", ALICE_PASSWORD))
        self.assertEqual(self.successResultOf(ok), "alice")
        ok = self.checker.requestAvatarId(UsernamePassword(b"bob", BOB_PASSWORD))
        self.assertEqual(self.successResultOf(ok), "bob")
        self.assertEqual([f for f, _ in self.spy.calls], [verifyPassword] * 2)
        for user, password in [(b"alice", BOB_PASSWORD), (b"bob", ALICE_PASSWORD)]:
            d = self.checker.requestAvatarId(UsernamePassword(user, password))
            failure = self.failureResultOf(d, UnauthorizedLogin)
            self.assertIsNone(failure.check(UnknownUser))

    def test_scram(self) -> None:
        """
        A SCRAM exchange with the right password logs in; a wrong one is
        L{UnauthorizedLogin}, an unknown user L{UnknownUser} (after made-up
        secrets), and a user whose entry is not SCRAM L{UnauthorizedLogin}.
        """
        password = ALICE_PASSWORD.decode()
        d = scramLogin(self.checker, self.checker, "alice", password)
        self.assertEqual(self.successResultOf(d), "alice")
        d = scramLogin(self.checker, self.checker, "alice", "wrong")
        self.assertIsNone(self.failureResultOf(d, UnauthorizedLogin).check(UnknownUser))
        d = scramLogin(self.checker, self.checker, "mallory", password)
        self.failureResultOf(d, UnknownUser)
        d = scramLogin(self.checker, self.checker, "bob", BOB_PASSWORD.decode())
        self.assertIsNone(self.failureResultOf(d, UnauthorizedLogin).check(UnknownUser))
        self.assertEqual(self.spy.calls, [])

    def test_scramSecrets(self) -> None:
        """
        The store gives a SCRAM user's secrets; for others, made-up ones
        with the file's usual iteration count, the same each time.
        """
        found = self.successResultOf(self.checker.scramSecrets("alice"))
        self.assertTrue(found.known)
        self.assertEqual(found.format(), self.scram)
        fake = self.successResultOf(self.checker.scramSecrets("mallory"))
        self.assertFalse(fake.known)
        self.assertEqual(fake.iterations, 4096)
        again = self.successResultOf(self.checker.scramSecrets("mallory"))
        self.assertEqual(again.salt, fake.salt)
        self.assertFalse(self.successResultOf(self.checker.scramSecrets("bob")).known)

    def test_cramMD5(self) -> None:
        """
        A CRAM-MD5 response checks against a C{{CRAM-MD5}} entry; wrong,
        unknown and non-CRAM users are refused as for SCRAM.
        """
        d = cramLogin(self.checker, b"bob", BOB_PASSWORD)
        self.assertEqual(self.successResultOf(d), "bob")
        d = cramLogin(self.checker, b"bob", b"wrong")
        self.assertIsNone(self.failureResultOf(d, UnauthorizedLogin).check(UnknownUser))
        self.failureResultOf(cramLogin(self.checker, b"mallory", b"x"), UnknownUser)
        d = cramLogin(self.checker, b"alice", ALICE_PASSWORD)
        self.assertIsNone(self.failureResultOf(d, UnauthorizedLogin).check(UnknownUser))
        d = cramLogin(self.checker, b"\xff", b"x")
        self.assertIsNone(self.failureResultOf(d, UnauthorizedLogin).check(UnknownUser))

    def test_mechanisms(self) -> None:
        """
        SCRAM-SHA-256 (CRAM-MD5) is served only while every entry of the
        file is SCRAM (CRAM-MD5); the file is looked at again when it
        changes; an unreadable file serves only PLAIN and LOGIN (whose
        logins then get 454).
        """
        self.assertEqual(self.checker.saslMechanisms(), {"PLAIN", "LOGIN"})
        self.writeUsers(f"alice:{self.scram}\n")
        self.assertEqual(
            self.checker.saslMechanisms(), {"PLAIN", "LOGIN", "SCRAM-SHA-256"}
        )
        self.writeUsers(f"bob:{self.cram}\n# comment\n")
        self.assertEqual(self.checker.saslMechanisms(), {"PLAIN", "LOGIN", "CRAM-MD5"})
        self.writeUsers(f"bob:{self.cram}\ncarol:{CAROL_SHA512}\n")
        self.assertEqual(self.checker.saslMechanisms(), {"PLAIN", "LOGIN"})
        self.checker.path = os.path.join(self.path, "not-a-directory")
        self.assertEqual(self.checker.saslMechanisms(), {"PLAIN", "LOGIN"})

    def test_dummyFollowsFile(self) -> None:
        """
        Without a given dummy hash, an unknown user's password is checked
        against a dummy of the scheme most entries have, so that it costs
        what a known user's does.
        """
        self.writeUsers(f"alice:{self.scram}\n")
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"mallory", b"x")),
            UnknownUser,
        )
        self.assertTrue(self.spy.calls[-1][1][1].startswith("SCRAM-SHA-256$4096:"))
        self.writeUsers(f"bob:{self.cram}\n")
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"mallory", b"x")),
            UnknownUser,
        )
        self.assertTrue(self.spy.calls[-1][1][1].startswith("{CRAM-MD5}"))
        self.writeUsers(f"carol:{CAROL_SHA512}\n")
        self.failureResultOf(
            self.checker.requestAvatarId(UsernamePassword(b"mallory", b"x")),
            UnknownUser,
        )
        self.assertTrue(self.spy.calls[-1][1][1].startswith("$2b$"))

    def test_scramSecretsUnavailable(self) -> None:
        """
        An unreadable file fails the secrets lookup with
        L{CheckerUnavailable}.
        """
        self.checker.path = os.path.join(self.path, "not-a-directory")
        self.failureResultOf(self.checker.scramSecrets("alice"), CheckerUnavailable)


class ChainSASLTests(SynchronousTestCase):
    """
    L{ChainChecker} with SCRAM stores and mechanisms, over htpasswd and
    memory checkers.
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        directory = self.mktemp()
        os.mkdir(directory)
        self.paths = [os.path.join(directory, name) for name in ("one", "two")]
        with open(self.paths[0], "w") as f:
            f.write(
                "alice:"
                + hashPassword(ALICE_PASSWORD, scheme=SCRAM_SHA_256, iterations=5000)
                + "\n"
            )
        with open(self.paths[1], "w") as f:
            f.write(
                "bob:"
                + hashPassword(BOB_PASSWORD, scheme=SCRAM_SHA_256, iterations=6000)
                + "\n"
            )
        self.spy = SynchronousThreadSpy()
        self.checkers = [
            HtpasswdChecker(path, runInThread=self.spy) for path in self.paths
        ]
        self.chain = ChainChecker(self.checkers, self.clock)

    def test_interface(self) -> None:
        """
        The chain is an L{IScramStore}.
        """
        self.assertTrue(verifyObject(IScramStore, self.chain))

    def test_secretsInOrder(self) -> None:
        """
        The first checker with secrets for the user gives them; for a user
        no checker has, the first checker's made-up ones.
        """
        self.assertEqual(
            self.successResultOf(self.chain.scramSecrets("bob")).iterations, 6000
        )
        self.assertEqual(
            self.successResultOf(self.chain.scramSecrets("alice")).iterations, 5000
        )
        fake = self.successResultOf(self.chain.scramSecrets("mallory"))
        self.assertEqual((fake.known, fake.iterations), (False, 5000))

    def test_loginThroughChain(self) -> None:
        """
        A SCRAM login of a user of the second checker goes through the
        first (unknown user) to the second; an unknown one fails with
        L{UnauthorizedLogin}.
        """
        d = scramLogin(self.chain, self.chain, "bob", BOB_PASSWORD.decode())
        self.assertEqual(self.successResultOf(d), "bob")
        d = scramLogin(self.chain, self.chain, "mallory", "x")
        self.failureResultOf(d, UnauthorizedLogin)

    def test_mechanisms(self) -> None:
        """
        PLAIN and LOGIN are offered when any checker takes passwords; SCRAM
        and CRAM-MD5 only when every checker serves them, in the allowed
        order.  A memory checker with passwords serves CRAM-MD5 (Twisted's
        C{memory:} takes L{IUsernameHashedPassword}), ours not SCRAM.
        """
        allowed = ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN"]
        self.assertEqual(
            self.chain.mechanisms(allowed), ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
        )
        self.chain.checkers.append(MemoryChecker(carol="x"))
        self.assertEqual(self.chain.mechanisms(allowed), ["PLAIN", "LOGIN"])
        from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

        self.chain.checkers = [InMemoryUsernamePasswordDatabaseDontUse(carol=b"x")]
        self.assertEqual(self.chain.mechanisms(allowed), ["CRAM-MD5", "PLAIN", "LOGIN"])
        self.chain.checkers = []
        self.assertEqual(self.chain.mechanisms(allowed), [])

    def test_secretsUnavailable(self) -> None:
        """
        A store that cannot answer fails the lookup with
        L{CheckerUnavailable}; one that raises something else too.
        """
        self.checkers[0].path = os.path.join(self.paths[0], "x")
        self.failureResultOf(self.chain.scramSecrets("bob"), CheckerUnavailable)

        @implementer(IScramStore)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def scramSecrets(self, username: str) -> Deferred[ScramSecrets]:
                raise RuntimeError("boom")

        self.chain.checkers = [Broken()]
        self.failureResultOf(self.chain.scramSecrets("bob"), CheckerUnavailable)
        self.flushLoggedErrors(RuntimeError)

    def test_secretsTimeout(self) -> None:
        """
        A store that does not answer in its timeout fails the lookup with
        L{CheckerUnavailable}.
        """

        @implementer(IScramStore)
        class Silent:
            credentialInterfaces = (IUsernamePassword,)
            timeout = 2.0

            def scramSecrets(self, username: str) -> Deferred[ScramSecrets]:
                return Deferred()

        self.chain.checkers = [Silent()]
        d = self.chain.scramSecrets("bob")
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.failureResultOf(d, CheckerUnavailable)


class HtpasswdPluginTests(SynchronousTestCase):
    """
    Tests for the C{htpasswd} strcred plugin.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "users")
        with open(self.path, "w") as f:
            f.write(f"carol:{CAROL_SHA512}\n")

    def test_found(self) -> None:
        """
        strcred finds the plugin by its name, and it provides
        L{ICheckerFactory} and L{IPlugin}.
        """
        factory = assertCheckerFactory(
            self,
            "htpasswd",
            "bcrypt",
            ["IUsernamePassword", "IScramCredentials", "ICramMD5Credentials"],
        )
        self.assertEqual(
            factory.credentialInterfaces, HtpasswdChecker.credentialInterfaces
        )

    def test_generateChecker(self) -> None:
        """
        C{--auth htpasswd:PATH} gives an L{HtpasswdChecker} for PATH, which
        provides L{ICredentialsChecker}.
        """
        checker = makeChecker("htpasswd:" + self.path)
        self.assertIsInstance(checker, HtpasswdChecker)
        assert isinstance(checker, HtpasswdChecker)
        self.assertEqual(checker.path, self.path)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))

    def test_noArgument(self) -> None:
        """
        An empty argument is a L{ValueError} saying a file is needed.
        """
        factory = findCheckerFactory("htpasswd")
        error = self.assertRaises(ValueError, factory.generateChecker, "")
        self.assertIn("requires the path of a password file", str(error))
        self.assertRaises(ValueError, factory.generateChecker, "  ")

    def test_missingFile(self) -> None:
        """
        A file that does not exist is a L{ValueError} naming it.
        """
        factory = findCheckerFactory("htpasswd")
        missing = self.path + ".missing"
        error = self.assertRaises(ValueError, factory.generateChecker, missing)
        self.assertIn(missing, str(error))
        self.assertIn("does not exist", str(error))
        directory = os.path.dirname(self.path)
        self.assertRaises(ValueError, factory.generateChecker, directory)

    def test_thin(self) -> None:
        """
        Importing the plugin file (as every twistd run does) imports neither
        the checker nor the hashing libraries.
        """
        imported = pluginImports(
            "smtpauth_relay_htpasswd",
            [
                "smtpauth_relay.checkers",
                "smtpauth_relay.passwords",
                "bcrypt",
                "argon2",
                "twisted.internet.reactor",
            ],
        )
        self.assertEqual(imported, [])

    def test_noReactorInstalled(self) -> None:
        """
        Making a checker (as C{check-config} does) does not import the global
        reactor, which would install one behind twistd's back.
        """
        output = checkerMadeAlone("htpasswd:" + os.path.abspath(self.path))
        self.assertEqual(output, "HtpasswdChecker False")
