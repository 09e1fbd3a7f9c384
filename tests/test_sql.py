"""
Tests for L{smtpauth_relay.sqlchecker} and the C{sql} strcred plugin,
against a real SQLite database and a real PostgreSQL server
(L{tests.postgres_support}).
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import quote

from argon2 import PasswordHasher
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import findCheckerFactory, makeChecker
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python import threadable
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from smtpauth_relay import passwords
from smtpauth_relay.auth import ChainChecker
from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.sqlchecker import (
    DEFAULT_TIMEOUT,
    SQLChecker,
    SQLDatabase,
    parseArgument,
    translateQuery,
)
from smtpauth_relay.testing import CheckerContractMixin
from smtpauth_relay.threads import threadPoolRunner
from tests import postgres_support
from tests.e2e_support import freePorts
from tests.plugin_support import (
    assertCheckerFactory,
    checkerMadeAlone,
    pluginImports,
)

_T = TypeVar("_T")

ALICE = ("alice", "wonderland")  # bcrypt
BOB = ("bob", "can we fix it")  # argon2id
CAROL = ("carol", "sha512 pass")  # sha512-crypt
BLOB = ("blobby", "stored as bytes")  # bcrypt in a BLOB / BYTEA column
TWIN_PASSWORD = "twin secret"
DEFAULT_QUERY = "SELECT password FROM users WHERE name = :user"

INJECTIONS = [
    "' OR '1'='1",
    "alice'--",
    "alice' --",
    "alice' OR 'x'='x",
    "' OR 1=1 --",
    '" OR ""="',
    "alice'; DROP TABLE users; --",
    "x' UNION SELECT password FROM users WHERE name='alice",
]

try:
    import psycopg  # noqa: F401
except ImportError:
    NO_PSYCOPG: str | None = 'psycopg is not installed: pip install "psycopg[binary]"'
else:
    NO_PSYCOPG = None

DB_PASSWORD = "db secret 42"
DB_ROLE = "relay"


@functools.cache
def cheapHashes() -> dict[str, str]:
    """
    The users' hashes, at the lowest cost each scheme allows (once per run).
    """
    argon2 = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    return {
        "alice": passwords.hashPassword(ALICE[1].encode(), rounds=4),
        "bob": argon2.hash(BOB[1]),
        "carol": passwords.sha512Crypt(CAROL[1].encode(), "$6$rounds=1000$saltsalt"),
        "blobby": passwords.hashPassword(BLOB[1].encode(), rounds=4),
        "twin": passwords.hashPassword(TWIN_PASSWORD.encode(), rounds=4),
        "dummy": passwords.hashPassword(b"nobody knows this", rounds=4),
    }


def userRows() -> list[tuple[str, str | None]]:
    """
    The rows of the C{users} table.
    """
    hashes = cheapHashes()
    return [
        ("alice", hashes["alice"]),
        ("bob", hashes["bob"]),
        ("carol", hashes["carol"]),
        ("nohash", None),
        ("emptyhash", ""),
        ("plain", "not a hash at all"),
        # As Dovecot's tables hold them; alice's password.
        ("dove", "{BLF-CRYPT}" + hashes["alice"]),
    ]


class ThreadSpy:
    """
    A C{runInThread} that records what it was asked to run and in which
    thread it ran, and runs it in the reactor's thread pool.
    """

    def __init__(self) -> None:
        from twisted.internet import reactor

        self._run = threadPoolRunner(reactor)
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.inIOThread: list[bool] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append((f, args))

        def recorded(*a: Any) -> Any:
            self.inIOThread.append(threadable.isInIOThread())
            return f(*a)

        return self._run(recorded, *args)

    def hashesVerified(self) -> list[str]:
        return [args[1] for f, args in self.calls if f is passwords.verifyPassword]


class CheckerHelpers:
    """
    Making checkers for a live database and checking with them; mixed into
    a L{TestCase}, which provides L{argument}.
    """

    engine: str
    blobType: str

    # Provided by TestCase.
    addCleanup: Callable[..., None]
    assertEqual: Callable[..., None]
    assertIn: Callable[..., None]
    assertNotIn: Callable[..., None]
    assertLess: Callable[..., None]
    assertIsInstance: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFalse: Callable[..., None]
    fail: Callable[..., Any]
    patch: Callable[..., Any]

    def argument(self, query: str = DEFAULT_QUERY, **options: str) -> str:
        """
        The argstring for this engine's live database.
        """
        raise NotImplementedError

    def makeChecker(self, query: str = DEFAULT_QUERY, **options: str) -> SQLChecker:
        """
        A checker for the live database with a cheap dummy hash, a thread spy
        and a log capture; closed after the test.
        """
        checker = SQLChecker(
            parseArgument(self.argument(query, **options)),
            runInThread=self.spy,
            dummyHash=cheapHashes()["dummy"],
        )
        checker.log = Logger(observer=cast(ILogObserver, self.events.append))
        self.addCleanup(checker.close)
        return checker

    def setUpBehaviour(self) -> None:
        self.spy = ThreadSpy()
        self.events: list[dict[str, Any]] = []

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    async def check(self, checker: SQLChecker, user: str, password: str) -> Any:
        """
        The outcome of a check: the avatar id or the exception.
        """
        try:
            return await checker.requestAvatarId(
                UsernamePassword(user.encode(), password.encode())
            )
        except Exception as e:
            return e

    async def assertLogin(self, checker: SQLChecker, user: str, password: str) -> None:
        self.assertEqual(await self.check(checker, user, password), user)

    async def assertOutcome(
        self,
        awaitable: Awaitable[Any],
        exceptionType: type[BaseException],
        exact: bool = True,
    ) -> Any:
        result = await awaitable
        self.assertIsInstance(result, exceptionType)
        if exact:
            self.assertEqual(type(result), exceptionType)
        return result


class CheckerBehaviourMixin(CheckerHelpers):
    """
    The checker's behaviour against a live database; mixed into a
    L{TestCase} per engine.
    """

    slowQuery = DEFAULT_QUERY
    """
    A query that runs for seconds.
    """
    slowQueryError = ""
    """
    What the driver says when it cuts the slow query.
    """

    async def test_good(self) -> None:
        """
        The right password logs in with each hash scheme (bcrypt, argon2id,
        sha512-crypt), and the avatar id is the user name as text.
        """
        checker = self.makeChecker()
        for user, password in (ALICE, BOB, CAROL):
            await self.assertLogin(checker, user, password)
        self.assertEqual(
            self.spy.hashesVerified(),
            [cheapHashes()[u] for u in ("alice", "bob", "carol")],
        )

    async def test_wrongPassword(self) -> None:
        """
        A wrong password is L{UnauthorizedLogin} (final), not L{UnknownUser};
        the password appears in no log line.
        """
        checker = self.makeChecker()
        for user, _ in (ALICE, BOB, CAROL):
            await self.assertOutcome(
                self.check(checker, user, "hunter2 wrong"), UnauthorizedLogin
            )
        await self.assertOutcome(self.check(checker, "alice", ""), UnauthorizedLogin)
        self.assertNotIn("hunter2", " ".join(self.logged()))

    async def test_unknownUser(self) -> None:
        """
        A user the query finds no row for is L{UnknownUser}, after the
        password was verified against the dummy hash.
        """
        checker = self.makeChecker()
        await self.assertOutcome(self.check(checker, "mallory", "x"), UnknownUser)
        self.assertEqual(self.spy.hashesVerified(), [cheapHashes()["dummy"]])
        # Names are compared by the database, exactly.
        await self.assertOutcome(self.check(checker, "ALICE", ALICE[1]), UnknownUser)

    async def test_injection(self) -> None:
        """
        SQL in the user name is only ever data: none of the classic
        injections logs in (with alice's password) or finds a row, and the
        table is intact afterwards.
        """
        checker = self.makeChecker()
        for name in INJECTIONS:
            result = await self.check(checker, name, ALICE[1])
            self.assertIsInstance(result, UnknownUser, name)
        await self.assertLogin(checker, *ALICE)

    async def test_placeholderInsideQuotesOfTheData(self) -> None:
        """
        A user name that is the placeholder itself or the driver's own
        parameter marker is data too.
        """
        checker = self.makeChecker()
        for name in (":user", "?", "%s", "%(user)s", "$1"):
            await self.assertOutcome(self.check(checker, name, ALICE[1]), UnknownUser)

    async def test_multipleRows(self) -> None:
        """
        A query that finds more than one row for a user is refused with
        L{CheckerUnavailable} (a misconfigured query), and logged; even the
        right password does not log in.
        """
        checker = self.makeChecker("SELECT password FROM dupes WHERE name = :user")
        await self.assertOutcome(
            self.check(checker, "twin", TWIN_PASSWORD), CheckerUnavailable
        )
        self.assertIn("more than one row for user twin", " ".join(self.logged()))

    async def test_wildcardUserName(self) -> None:
        """
        With a (careless) C{LIKE :user} query, the user name C{%} matches every
        row: that is refused as more than one row, not a login as anyone.
        """
        checker = self.makeChecker("SELECT password FROM users WHERE name LIKE :user")
        await self.assertOutcome(self.check(checker, "%", ALICE[1]), CheckerUnavailable)
        await self.assertLogin(checker, *ALICE)

    async def test_unusableHash(self) -> None:
        """
        A NULL, empty or unrecognised hash is a wrong password (not an unknown
        user), logged as a configuration problem naming the user, never the
        stored value; the dummy hash is verified so timing is the same.
        """
        checker = self.makeChecker()
        for user, problem in (
            ("nohash", "NULL"),
            ("emptyhash", "empty"),
            ("plain", "no known scheme"),
        ):
            self.events.clear()
            await self.assertOutcome(
                self.check(checker, user, "not a hash at all"), UnauthorizedLogin
            )
            [line] = self.logged()
            self.assertIn(f"user {user} has no usable password hash", line)
            self.assertIn(problem, line)
            self.assertNotIn("not a hash at all", line)
        self.assertEqual(self.spy.hashesVerified(), [cheapHashes()["dummy"]] * 3)

    async def test_hashInBinaryColumn(self) -> None:
        """
        A hash stored in a binary column (BLOB, BYTEA) is used as text.
        """
        checker = self.makeChecker("SELECT hash FROM blobs WHERE name = :user")
        await self.assertLogin(checker, *BLOB)
        await self.assertOutcome(self.check(checker, BLOB[0], "no"), UnauthorizedLogin)

    async def test_dovecotPrefix(self) -> None:
        """
        A Dovecot C{{SCHEME}} prefix is not a known scheme, and the README's
        C{replace()} query (the same in SQLite and PostgreSQL) strips it.
        """
        checker = self.makeChecker()
        await self.assertOutcome(
            self.check(checker, "dove", ALICE[1]), UnauthorizedLogin
        )
        checker = self.makeChecker(
            "SELECT replace(password, '{BLF-CRYPT}', '') FROM users WHERE name = :user"
        )
        await self.assertLogin(checker, "dove", ALICE[1])

    async def test_notOneColumn(self) -> None:
        """
        A query returning other than one column is refused as misconfigured.
        """
        checker = self.makeChecker(
            "SELECT password, name FROM users WHERE name = :user"
        )
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        self.assertIn("one column", " ".join(self.logged()))

    async def test_queryError(self) -> None:
        """
        A query the database rejects (no such table) is L{CheckerUnavailable},
        logged once while it lasts.
        """
        checker = self.makeChecker("SELECT password FROM nosuchtable WHERE n = :user")
        for _ in range(3):
            await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        lines = self.logged()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("nosuchtable", lines[0])

    async def test_readOnly(self) -> None:
        """
        The relay only reads: a query that writes fails (unavailable) and the
        row is still there.
        """
        checker = self.makeChecker(
            "DELETE FROM users WHERE name = :user RETURNING password"
        )
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        await self.assertLogin(self.makeChecker(), *ALICE)

    async def test_placeholderTwiceAndPercent(self) -> None:
        """
        The placeholder may appear more than once (bound each time), and
        C{%} and C{?} in string literals are left alone.
        """
        checker = self.makeChecker(
            "SELECT password FROM users WHERE (name = :user OR name = lower(:user))"
            " AND name NOT LIKE '%zz%' AND name <> '?'"
        )
        await self.assertLogin(checker, *ALICE)
        await self.assertOutcome(self.check(checker, "x", "y"), UnknownUser)

    async def test_slowQuery(self) -> None:
        """
        A query that runs longer than C{timeout=} is cut by the database
        driver (the thread is freed), and the check is unavailable.
        """
        checker = self.makeChecker(self.slowQuery, timeout="0.5")
        started = time.monotonic()
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        self.assertLess(time.monotonic() - started, 4)
        self.assertIn(self.slowQueryError, " ".join(self.logged()))

    async def test_hashOffReactorThread(self) -> None:
        """
        Hashes are verified through C{runInThread}, in a thread other than
        the reactor's.
        """
        checker = self.makeChecker()
        await self.assertLogin(checker, *ALICE)
        await self.assertOutcome(self.check(checker, "mallory", "x"), UnknownUser)
        self.assertEqual(len(self.spy.calls), 2)
        self.assertEqual(self.spy.inIOThread, [False, False])

    async def test_defaultRunnerOffReactorThread(self) -> None:
        """
        Without an injected runner, hashes are verified in the reactor's
        thread pool, not on the reactor thread.
        """
        inIOThread = []
        verify = passwords.verifyPassword

        def spy(password: bytes, encoded: str) -> bool:
            inIOThread.append(threadable.isInIOThread())
            return verify(password, encoded)

        self.patch(passwords, "verifyPassword", spy)
        checker = SQLChecker(
            parseArgument(self.argument()), dummyHash=cheapHashes()["dummy"]
        )
        self.addCleanup(checker.close)
        await self.assertLogin(checker, *ALICE)
        self.assertEqual(inIOThread, [False])

    async def test_oddUserNames(self) -> None:
        """
        A user name that is not UTF-8 is a wrong password, and one holding
        NUL an unknown user, both without asking the database.
        """
        checker = self.makeChecker()
        result = await checker.requestAvatarId(
            UsernamePassword(b"\xff\xfe", b"x")
        ).addErrback(lambda f: f.value)
        self.assertEqual(type(result), UnauthorizedLogin)
        await self.assertOutcome(self.check(checker, "ali\x00ce", "x"), UnknownUser)

    async def test_close(self) -> None:
        """
        After C{close()} (which waits for the pool's threads), checks are
        unavailable; closing twice is harmless.
        """
        checker = self.makeChecker()
        await self.assertLogin(checker, *ALICE)
        await checker.close()
        await checker.close()
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)

    async def test_throughChain(self) -> None:
        """
        In a chain, an unknown user passes to the next checker, and the
        checker's own C{timeout=} is the one applied.
        """
        from twisted.internet import reactor

        checker = self.makeChecker(timeout="7")
        self.assertEqual(checker.timeout, 7.0)
        chain = ChainChecker([checker], clock=reactor)
        self.assertEqual(chain.timeoutOf(checker), 7.0)
        self.assertEqual(
            await chain.requestAvatarId(
                UsernamePassword(ALICE[0].encode(), ALICE[1].encode())
            ),
            "alice",
        )


class SQLiteMixin:
    """
    A fresh SQLite database per test.
    """

    engine = "sqlite"
    blobType = "BLOB"
    mktemp: Callable[[], str]

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        # A name that needs quoting in a file: URI.
        self.path = os.path.abspath(os.path.join(directory, "users ?#%.db"))
        connection = sqlite3.connect(self.path)
        with connection:
            createTables(connection, "BLOB", "?")
        connection.close()

    def argument(self, query: str = DEFAULT_QUERY, **options: str) -> str:
        extra = "".join(f"{k}={v}&" for k, v in options.items())
        return f"sqlite:///{quote(self.path)}?{extra}query={query}"


def createTables(connection: Any, blobType: str, marker: str) -> None:
    """
    The tables the tests query: C{users}, C{dupes} (two rows for one name)
    and C{blobs} (a hash in a binary column).
    """
    cursor = connection.cursor()
    cursor.execute("CREATE TABLE users (name TEXT PRIMARY KEY, password TEXT)")
    cursor.execute("CREATE TABLE dupes (name TEXT, password TEXT)")
    cursor.execute(f"CREATE TABLE blobs (name TEXT, hash {blobType})")
    insert = f"INSERT INTO users VALUES ({marker}, {marker})"
    for row in userRows():
        cursor.execute(insert, row)
    twin = cheapHashes()["twin"]
    for _ in range(2):
        cursor.execute(f"INSERT INTO dupes VALUES ({marker}, {marker})", ("twin", twin))
    cursor.execute(
        f"INSERT INTO blobs VALUES ({marker}, {marker})",
        (BLOB[0], cheapHashes()["blobby"].encode()),
    )


class SQLiteCheckerTests(SQLiteMixin, CheckerBehaviourMixin, TestCase):
    """
    L{SQLChecker} against a real SQLite database.
    """

    slowQuery = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"
        " SELECT password FROM users WHERE name = :user"
        " AND (SELECT max(x) FROM (SELECT x FROM c LIMIT 1000000000)) > 0"
    )
    slowQueryError = "interrupted"

    def setUp(self) -> None:
        SQLiteMixin.setUp(self)
        self.setUpBehaviour()

    def test_readOnlyURI(self) -> None:
        """
        The database is opened read-only through a C{file:} URI with the
        path quoted.
        """
        database = parseArgument(self.argument())
        self.assertEqual(database.dbapiName, "sqlite3")
        uri = database.connectKeywords["database"]
        self.assertTrue(uri.startswith("file:/"))
        self.assertTrue(uri.endswith("?mode=ro"))
        self.assertIn("%3F%23%25.db", uri)
        self.assertTrue(database.connectKeywords["uri"])

    async def test_databaseGone(self) -> None:
        """
        A database file removed after the checker was made is unavailable
        (not an empty user list), and the error is logged.
        """
        checker = self.makeChecker()
        os.remove(self.path)
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        self.assertIn("unable to open database file", " ".join(self.logged()))

    async def test_seesChanges(self) -> None:
        """
        Rows added and changed after the checker connected are seen at the
        next check.
        """
        checker = self.makeChecker()
        await self.assertOutcome(self.check(checker, "dave", "new one"), UnknownUser)
        connection = sqlite3.connect(self.path)
        with connection:
            connection.execute(
                "INSERT INTO users VALUES (?, ?)",
                ("dave", passwords.hashPassword(b"new one", rounds=4)),
            )
        connection.close()
        await self.assertLogin(checker, "dave", "new one")


class PostgresMixin:
    """
    The shared PostgreSQL server, with a database per test class.
    """

    engine = "postgresql"
    blobType = "BYTEA"
    mktemp: Callable[[], str]
    _prepared: dict[str, tuple[postgres_support.PostgresServer, str]] = {}

    def setUpServer(self) -> None:
        server = postgres_support.sharedServer()
        key = type(self).__name__
        dbname = "relay_" + key.lower()
        if self._prepared.get(key) != (server, dbname):
            server.createDatabase(dbname, DB_ROLE, DB_PASSWORD)
            with server.connect(dbname) as connection:
                createTables(connection, "BYTEA", "%s")
                connection.execute(
                    f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {DB_ROLE}"
                )
            self._prepared[key] = (server, dbname)
        self.server = server
        self.dbname = dbname
        directory = self.mktemp()
        os.makedirs(directory)
        self.passwordFile = os.path.abspath(os.path.join(directory, "db.pass"))
        with open(self.passwordFile, "w") as f:
            f.write(DB_PASSWORD + "\n")

    def argument(self, query: str = DEFAULT_QUERY, **options: str) -> str:
        options = {"password_file": self.passwordFile, **options}
        extra = "".join(f"{k}={v}&" for k, v in options.items())
        return (
            f"postgresql://{DB_ROLE}@{postgres_support.HOST}:{self.server.port}"
            f"/{self.dbname}?{extra}query={query}"
        )


class PostgresCheckerTests(PostgresMixin, CheckerBehaviourMixin, TestCase):
    """
    L{SQLChecker} against a real PostgreSQL server.
    """

    slowQuery = "SELECT password FROM users, pg_sleep(5) AS s WHERE name = :user"
    slowQueryError = "statement timeout"

    def setUp(self) -> None:
        self.setUpServer()
        self.setUpBehaviour()

    async def test_wrongDatabasePassword(self) -> None:
        """
        If the database refuses the relay's own login, checks are
        unavailable, and neither password is logged.
        """
        with open(self.passwordFile, "w") as f:
            f.write("not the db password\n")
        checker = self.makeChecker()
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        logged = " ".join(self.logged())
        self.assertIn("password authentication failed", logged)
        self.assertNotIn("not the db password", logged)
        self.assertNotIn(ALICE[1], logged)

    async def test_refusedPort(self) -> None:
        """
        A server that refuses connections makes checks unavailable.
        """
        checker = SQLChecker(
            parseArgument(
                f"postgresql://{DB_ROLE}@127.0.0.1:{freePorts(1)[0]}"
                f"/{self.dbname}?password_file={self.passwordFile}"
                f"&query={DEFAULT_QUERY}"
            ),
            runInThread=self.spy,
            dummyHash=cheapHashes()["dummy"],
        )
        checker.log = Logger(observer=cast(ILogObserver, self.events.append))
        self.addCleanup(checker.close)
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        self.assertIn("Connection refused", " ".join(self.logged()))
        self.assertEqual(self.spy.calls, [])

    async def test_unixSocket(self) -> None:
        """
        A percent-encoded path as the host is a Unix socket directory.
        """
        host = quote(self.server.socketDirectory, safe="")
        checker = SQLChecker(
            parseArgument(
                f"postgresql://{DB_ROLE}@{host}:{self.server.port}/{self.dbname}"
                f"?query={DEFAULT_QUERY}"
            ),
            dummyHash=cheapHashes()["dummy"],
        )
        self.addCleanup(checker.close)
        self.assertEqual(
            checker.database.connectKeywords["host"], self.server.socketDirectory
        )
        await self.assertLogin(checker, *ALICE)

    async def test_sslRequired(self) -> None:
        """
        C{sslmode=require} against a server without TLS is unavailable, not
        a silent fallback to plain text.
        """
        checker = self.makeChecker(sslmode="require")
        await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        self.assertIn("SSL", " ".join(self.logged()))


class PostgresRestartTests(CheckerHelpers, TestCase):
    """
    L{SQLChecker} while its PostgreSQL server stops and starts (a server of
    its own, not the shared one).
    """

    engine = "postgresql"
    blobType = "BYTEA"

    def setUp(self) -> None:
        self.setUpBehaviour()
        self.server = postgres_support.PostgresServer()
        self.addCleanup(self.server.remove)
        self.server.start()
        self.server.createDatabase("mail", DB_ROLE, DB_PASSWORD)
        with self.server.connect("mail") as connection:
            createTables(connection, "BYTEA", "%s")
            connection.execute(
                f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {DB_ROLE}"
            )
        self.passwordFile = os.path.abspath(self.mktemp())
        with open(self.passwordFile, "w") as f:
            f.write(DB_PASSWORD + "\n")

    def argument(self, query: str = DEFAULT_QUERY, **options: str) -> str:
        return (
            f"postgresql://{DB_ROLE}@127.0.0.1:{self.server.port}/mail"
            f"?password_file={self.passwordFile}&query={query}"
        )

    async def test_serverDown(self) -> None:
        """
        While the server is stopped, checks are unavailable (logged once);
        when it is back, checks work again and that is logged.
        """
        checker = self.makeChecker()
        await self.assertLogin(checker, *ALICE)
        self.server.stop()
        for _ in range(2):
            await self.assertOutcome(self.check(checker, *ALICE), CheckerUnavailable)
        self.assertEqual(
            len([line for line in self.logged() if "Cannot check" in line]), 1
        )
        self.server.start()
        await self.assertLogin(checker, *ALICE)
        self.assertIn("answers again", self.logged()[-1])

    async def test_restartBetweenChecks(self) -> None:
        """
        A server restart between two checks costs nothing: the pooled
        connection it cut is found broken, and the query runs again on a new
        one.
        """
        checker = self.makeChecker()
        await self.assertLogin(checker, *ALICE)
        self.server.stop()
        self.server.start()
        await self.assertLogin(checker, *ALICE)
        self.assertIn("reconnecting", " ".join(self.logged()))


class SQLiteContractTests(SQLiteMixin, CheckerContractMixin, TestCase):
    """
    The operator kit's contract, for the C{sql} plugin with SQLite.
    """

    authType = "sql"
    validUser = ALICE

    def checkerArgument(self) -> str:
        return self.argument()

    def unavailableChecker(self) -> ICredentialsChecker:
        """
        A checker for a database file removed after the checker was made.
        """
        gone = self.path + ".gone"
        shutil.copyfile(self.path, gone)
        checker = self.contractChecker(
            self.argument().replace(quote(self.path), quote(gone), 1)
        )
        os.remove(gone)
        return checker


class PostgresContractTests(PostgresMixin, CheckerContractMixin, TestCase):
    """
    The operator kit's contract, for the C{sql} plugin with PostgreSQL.
    """

    authType = "sql"
    validUser = ALICE

    def setUp(self) -> None:
        self.setUpServer()

    def checkerArgument(self) -> str:
        return self.argument()

    def unavailableArgument(self) -> str:
        """
        A port on which nothing listens.
        """
        return (
            f"postgresql://{DB_ROLE}@127.0.0.1:{freePorts(1)[0]}"
            f"/{self.dbname}?password_file={self.passwordFile}&query={DEFAULT_QUERY}"
        )


class ParseArgumentTests(SynchronousTestCase):
    """
    Tests for L{parseArgument} and L{translateQuery}: the argument's syntax
    and every option's validation.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.directory = os.path.abspath(directory)
        self.db = os.path.join(self.directory, "users.db")
        sqlite3.connect(self.db).close()
        self.passwordFile = os.path.join(self.directory, "db pass")
        with open(self.passwordFile, "w") as f:
            f.write("s3cret=&?%\nsecond line ignored\n")
        self.pg = "postgresql://relay@db.example.org/mail"

    def assertInvalid(self, argument: str, *fragments: str) -> None:
        error = self.assertRaises(ValueError, parseArgument, argument)
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_sqlite(self) -> None:
        """
        C{sqlite:////PATH?query=SQL}: the query is everything after
        C{query=}, verbatim; the timeout defaults to 10 seconds.
        """
        database = parseArgument(
            f"sqlite:///{self.db}?query=SELECT password FROM users WHERE"
            " name = :user AND flags & 1 = 1 AND note <> 'a=b&c'"
        )
        self.assertEqual(database.engine, "sqlite")
        self.assertEqual(
            database.query,
            "SELECT password FROM users WHERE name = :user AND flags & 1 = 1"
            " AND note <> 'a=b&c'",
        )
        self.assertEqual(
            database.statement,
            "SELECT password FROM users WHERE name = ? AND flags & 1 = 1"
            " AND note <> 'a=b&c'",
        )
        self.assertEqual(database.placeholders, 1)
        self.assertEqual(database.timeout, DEFAULT_TIMEOUT)
        self.assertEqual(database.description, f"sqlite:///{self.db}")

    def test_postgresql(self) -> None:
        """
        A PostgreSQL URL gives psycopg's connect keywords: the password read
        from C{password_file=}'s first line, TLS options, and timeouts for
        connecting and for statements; the description holds no password.
        """
        cert = os.path.join(self.directory, "cert.pem")
        with open(cert, "w"):
            pass
        database = parseArgument(
            f"postgres://relay@db.example.org:5433/mail?password_file="
            f"{self.passwordFile.replace(' ', '%20')}&sslmode=verify-full&"
            f"sslrootcert={cert}&timeout=2.5&query=SELECT hash FROM mailbox WHERE"
            " username = :user AND active AND domain LIKE '%.org';"
        )
        self.assertEqual(database.engine, "postgresql")
        self.assertEqual(database.dbapiName, "psycopg")
        keywords = database.connectKeywords
        self.assertEqual(keywords["password"], "s3cret=&?%")
        self.assertEqual(keywords["host"], "db.example.org")
        self.assertEqual(keywords["port"], 5433)
        self.assertEqual(keywords["user"], "relay")
        self.assertEqual(keywords["dbname"], "mail")
        self.assertEqual(keywords["sslmode"], "verify-full")
        self.assertEqual(keywords["sslrootcert"], cert)
        self.assertEqual(keywords["connect_timeout"], 3)
        self.assertIn("statement_timeout=2500", keywords["options"])
        self.assertIn("default_transaction_read_only=on", keywords["options"])
        self.assertEqual(database.timeout, 2.5)
        self.assertEqual(
            database.statement,
            "SELECT hash FROM mailbox WHERE username = %s AND active AND domain"
            " LIKE '%%.org'",
        )
        self.assertEqual(
            database.description, "postgresql://relay@db.example.org:5433/mail"
        )
        self.assertNotIn("s3cret", repr(database))
        checker = SQLChecker(database, dummyHash=cheapHashes()["dummy"])
        self.assertNotIn("s3cret", repr(checker))
        self.assertEqual(checker.timeout, 2.5)

    if NO_PSYCOPG:
        test_postgresql.skip = NO_PSYCOPG  # type: ignore[attr-defined]

    def test_empty(self) -> None:
        """
        An empty argument asks for a URL and a query.
        """
        self.assertInvalid("", "requires a database URL and a query")
        self.assertInvalid("  ", "requires a database URL and a query")

    def test_scheme(self) -> None:
        """
        Only sqlite: and postgresql: (postgres:) are known.
        """
        self.assertInvalid("mysql://db/mail?query=SELECT 1 WHERE :user", "sqlite:")
        self.assertInvalid("/var/lib/users.db?query=x", "sqlite:")

    def test_queryRequired(self) -> None:
        """
        The query is required.
        """
        self.assertInvalid(f"sqlite:///{self.db}", "option 'query' is required")
        self.assertInvalid(f"sqlite:///{self.db}?timeout=3", "'query' is required")
        self.assertInvalid(f"sqlite:///{self.db}?query=", "'query' is empty")

    def test_unknownOption(self) -> None:
        """
        Unknown options, options of the other engine, options given twice
        and options without a value are errors naming them.
        """
        self.assertInvalid(f"sqlite:///{self.db}?user=x&query=:user", "'user'")
        self.assertInvalid(
            f"sqlite:///{self.db}?sslmode=require&query=:user",
            "unknown option 'sslmode'",
        )
        self.assertInvalid(
            f"sqlite:///{self.db}?timeout=1&timeout=2&query=:user",
            "'timeout' is given twice",
        )
        self.assertInvalid(
            f"sqlite:///{self.db}?timeout&query=:user", "'timeout' needs a value"
        )

    def test_timeout(self) -> None:
        """
        C{timeout=} is a number of seconds, more than 0 and at most 3600.
        """
        for bad in ("0", "-1", "abc", "nan", "inf", "3601", ""):
            self.assertInvalid(
                f"sqlite:///{self.db}?timeout={bad}&query=SELECT p FROM t WHERE n = :user",
                "option 'timeout'",
            )
        database = parseArgument(
            f"sqlite:///{self.db}?timeout=0.25&query=SELECT p FROM t WHERE n = :user"
        )
        self.assertEqual(database.timeout, 0.25)
        self.assertEqual(database.connectKeywords["timeout"], 0.25)

    def test_sqlitePath(self) -> None:
        """
        The SQLite path must be absolute (four slashes) and exist.
        """
        query = "?query=SELECT p FROM t WHERE n = :user"
        self.assertInvalid("sqlite:///users.db" + query, "four slashes")
        self.assertInvalid("sqlite:users.db" + query, "four slashes")
        missing = self.db + ".missing"
        self.assertInvalid(f"sqlite:///{missing}" + query, missing, "does not exist")
        self.assertInvalid(f"sqlite:///{self.directory}" + query, "does not exist")

    def test_passwordInURL(self) -> None:
        """
        A password in the URL is refused, pointing at C{password_file=}.
        """
        self.assertInvalid(
            "postgresql://relay:s3cret@db/mail?query=SELECT 1 WHERE :user",
            "must not contain a password",
            "password_file",
        )
        error = self.assertRaises(
            ValueError,
            parseArgument,
            "postgresql://relay:s3cret@db/mail?query=SELECT 1 WHERE :user",
        )
        self.assertNotIn("s3cret", str(error))
        self.assertInvalid("postgresql://relay:@db/mail?query=:user", "password")

    def test_postgresqlURL(self) -> None:
        """
        The PostgreSQL URL must name the database and have a valid port.
        """
        self.assertInvalid(
            "postgresql://relay@db?query=:user", "must name the database"
        )
        self.assertInvalid(
            "postgresql://relay@db/?query=:user", "must name the database"
        )
        self.assertInvalid("postgresql://relay@db:99999/mail?query=:user", "not valid")
        for url, host, port in (
            ("postgresql://relay@[::1]:5433/mail", "::1", 5433),
            ("postgresql://relay@DB.example.org:/mail", "DB.example.org", None),
            ("postgresql://%2FRun%2FPG/mail", "/Run/PG", None),
        ):
            keywords = parseArgument(
                url + "?query=SELECT 1 WHERE :user"
            ).connectKeywords
            self.assertEqual(keywords["host"], host)
            self.assertEqual(keywords.get("port"), port)
        database = parseArgument("postgresql:///mail?query=SELECT 1 WHERE :user")
        self.assertNotIn("host", database.connectKeywords)
        self.assertNotIn("user", database.connectKeywords)
        self.assertNotIn("password", database.connectKeywords)

    if NO_PSYCOPG:
        test_postgresqlURL.skip = NO_PSYCOPG  # type: ignore[attr-defined]

    def test_passwordFile(self) -> None:
        """
        C{password_file=} must be an absolute path to a file whose first line
        is not empty.
        """
        query = "&query=SELECT 1 WHERE :user"
        self.assertInvalid(
            f"{self.pg}?password_file=db.pass" + query, "'password_file'"
        )
        self.assertInvalid(
            f"{self.pg}?password_file={self.directory}/none" + query,
            "'password_file'",
            "no such file",
        )
        empty = os.path.join(self.directory, "empty")
        with open(empty, "w") as f:
            f.write("\nsecret on line two\n")
        self.assertInvalid(
            f"{self.pg}?password_file={empty}" + query, "empty first line"
        )

    def test_tlsOptions(self) -> None:
        """
        C{sslmode=} is one of libpq's modes; C{sslrootcert=}, C{sslcert=} and
        C{sslkey=} name files, and the last two go together.
        """
        query = "&query=SELECT 1 WHERE :user"
        self.assertInvalid(f"{self.pg}?sslmode=on" + query, "option 'sslmode'")
        self.assertInvalid(
            f"{self.pg}?sslrootcert=/nonexistent/ca.pem" + query, "'sslrootcert'"
        )
        self.assertInvalid(
            f"{self.pg}?sslcert={self.passwordFile}" + query, "'sslcert' and 'sslkey'"
        )
        database = parseArgument(
            f"{self.pg}?sslcert={self.passwordFile}&sslkey={self.passwordFile}" + query
        )
        self.assertEqual(database.connectKeywords["sslkey"], self.passwordFile)
        database = parseArgument(f"{self.pg}?sslrootcert=system" + query)
        self.assertEqual(database.connectKeywords["sslrootcert"], "system")
        self.assertInvalid(f"{self.pg}?sslmode=%FF" + query, "option 'sslmode'")

    if NO_PSYCOPG:
        test_tlsOptions.skip = NO_PSYCOPG  # type: ignore[attr-defined]

    def test_placeholder(self) -> None:
        """
        The query must hold C{:user} outside quotes; a quoted one is pointed
        out.
        """
        self.assertInvalid(
            f"sqlite:///{self.db}?query=SELECT p FROM t WHERE n = 'alice'",
            "must contain :user",
        )
        self.assertInvalid(
            f"sqlite:///{self.db}?query=SELECT p FROM t WHERE n = ':user'",
            "without quotes",
        )

    def test_driverParameters(self) -> None:
        """
        The driver's own parameter markers are refused outside quotes.
        """
        for query in (
            "SELECT p FROM t WHERE n = ? OR n = :user",
            "SELECT p FROM t WHERE n = :name OR n = :user",
            "SELECT p FROM t WHERE n = @name OR n = :user",
        ):
            self.assertInvalid(f"sqlite:///{self.db}?query={query}", "is a parameter")
        self.assertInvalid(
            f"{self.pg}?query=SELECT p FROM t WHERE n = $1 OR n = :user",
            "is a parameter",
        )

    def test_oneStatement(self) -> None:
        """
        One statement only (a trailing semicolon is fine).
        """
        self.assertInvalid(
            f"sqlite:///{self.db}?query=SELECT p FROM t WHERE n = :user; DELETE FROM t",
            "single SQL statement",
        )
        parseArgument(f"sqlite:///{self.db}?query=SELECT p FROM t WHERE n = :user ;")

    def test_queryLast(self) -> None:
        """
        An option after the query would be swallowed by it: refused, saying
        C{query=} goes last.
        """
        self.assertInvalid(
            f"sqlite:///{self.db}?query=SELECT p FROM t WHERE n = :user&timeout=5",
            "must be the last option",
        )

    def test_unterminated(self) -> None:
        """
        An unterminated string or comment is refused.
        """
        for query in ("SELECT p FROM t WHERE n = :user AND x = 'a", "SELECT :user /*"):
            self.assertInvalid(f"sqlite:///{self.db}?query={query}", "unterminated")

    def test_translateQuery(self) -> None:
        """
        Only C{:user} in code is replaced: not in strings, quoted names,
        comments or dollar quotes, nor a C{::user} cast or a longer name; for
        psycopg every C{%} is doubled.
        """
        self.assertEqual(
            translateQuery(
                'SELECT "a:user" FROM t -- :user\n'
                " WHERE n = :user::text AND x = ':user' AND y::user = 1"
                " AND z = :username /* :user */ AND w = $$ :user $$"
                " AND e = E'it\\'s :user'",
                "postgresql",
            ),
            (
                'SELECT "a:user" FROM t -- :user\n'
                " WHERE n = %s::text AND x = ':user' AND y::user = 1"
                " AND z = :username /* :user */ AND w = $$ :user $$"
                " AND e = E'it\\'s :user'",
                1,
            ),
        )
        self.assertEqual(
            translateQuery("SELECT p FROM t WHERE n = :user OR m = :user", "sqlite"),
            ("SELECT p FROM t WHERE n = ? OR m = ?", 2),
        )
        self.assertEqual(
            translateQuery("SELECT p FROM t WHERE n LIKE '%' || :user", "postgresql"),
            ("SELECT p FROM t WHERE n LIKE '%%' || %s", 1),
        )


class SQLPluginTests(SynchronousTestCase):
    """
    Tests for the C{sql} strcred plugin.
    """

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.db = os.path.abspath(os.path.join(directory, "users.db"))
        sqlite3.connect(self.db).close()

    def test_found(self) -> None:
        """
        strcred finds the plugin by its name, and it provides
        L{ICheckerFactory} and L{IPlugin}.
        """
        assertCheckerFactory(self, "sql", ":user", ["IUsernamePassword"])

    def test_generateChecker(self) -> None:
        """
        C{--auth sql:URL?query=...} gives an L{SQLChecker} that provides
        L{ICredentialsChecker}; making it connects to nothing.
        """
        checker = makeChecker(
            f"sql:sqlite:///{self.db}?timeout=3&query=SELECT password FROM users"
            " WHERE name = :user"
        )
        self.assertIsInstance(checker, SQLChecker)
        assert isinstance(checker, SQLChecker)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertIsInstance(checker.database, SQLDatabase)
        self.assertEqual(checker.timeout, 3.0)
        self.assertIsNone(checker._pool)

    def test_invalid(self) -> None:
        """
        An invalid argument is a L{ValueError} from C{generateChecker}.
        """
        factory = findCheckerFactory("sql")
        self.assertRaises(ValueError, factory.generateChecker, "")
        error = self.assertRaises(
            ValueError,
            factory.generateChecker,
            f"sqlite:///{self.db}?timeout=soon&query=SELECT 1 WHERE :user",
        )
        self.assertIn("'timeout'", str(error))

    def test_thin(self) -> None:
        """
        Importing the plugin file (as every twistd run does) imports neither
        the checker, nor a database driver, nor the reactor; making a checker
        (as validating a configuration does) does not import the reactor.
        """
        imported = pluginImports(
            "smtpauth_relay_sql",
            [
                "smtpauth_relay.sqlchecker",
                "smtpauth_relay.passwords",
                "sqlite3",
                "psycopg",
                "twisted.enterprise.adbapi",
                "bcrypt",
                "argon2",
                "twisted.internet.reactor",
            ],
        )
        self.assertEqual(imported, [])
        output = checkerMadeAlone(f"sql:sqlite:///{self.db}?query=SELECT 1 WHERE :user")
        self.assertEqual(output, "SQLChecker False")
