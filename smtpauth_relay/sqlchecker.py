# -*- test-case-name: tests.test_sql -*-
"""
A credential checker that looks password hashes up in an SQL database:
SQLite (the standard library's C{sqlite3}) or PostgreSQL (psycopg 3).

The administrator gives the database as a URL and a query with the
placeholder C{:user} where the user name goes::

    sqlite:////var/lib/smtpauth-relay/users.db?query=SELECT password FROM users WHERE name = :user
    postgresql://relay@db.example.org/mail?password_file=/etc/smtpauth-relay/db.pass&query=SELECT hash FROM mailbox WHERE username = :user AND active

The placeholder is translated to the driver's own parameter marker, so the
user name is always sent as a bound parameter, never pasted into the SQL.
The query returns the stored hash (bcrypt, argon2id or sha512-crypt, as
understood by L{smtpauth_relay.passwords}) in one column of at most one row.

Queries run through L{twisted.enterprise.adbapi.ConnectionPool} (blocking
DB-API calls in a small thread pool of their own); hashes are verified in the
reactor's thread pool.  Nothing here blocks the reactor thread.

See L{parseArgument} for the exact argument syntax.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote, urlsplit

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpauth_relay import passwords
from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.threads import RunInThread, threadPoolRunner

__all__ = [
    "DEFAULT_TIMEOUT",
    "PLACEHOLDER",
    "SQLChecker",
    "SQLDatabase",
    "parseArgument",
    "translateQuery",
]

_T = TypeVar("_T")

PLACEHOLDER = ":user"
"""
What the administrator writes in the query where the user name goes.
"""

DEFAULT_TIMEOUT = 10.0
"""
Seconds a check may take (connecting, querying) before the client gets
454 4.7.0.
"""

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

_OPTIONS = {
    "sqlite": ("timeout", "query"),
    "postgresql": (
        "timeout",
        "password_file",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "query",
    ),
}

_SCHEMES = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}


@dataclass(frozen=True)
class SQLDatabase:
    """
    A database and query, as parsed from the checker's argument.

    @ivar engine: C{"sqlite"} or C{"postgresql"}.
    @ivar description: The database for log lines (no password).
    @ivar dbapiName: The DB-API module, for L{adbapi.ConnectionPool}.
    @ivar connectKeywords: The module's C{connect()} keywords (for PostgreSQL,
        the password too: never log them).
    @ivar query: The query as the administrator wrote it.
    @ivar statement: The query translated to the driver's parameter style.
    @ivar placeholders: How many times the user name is bound.
    @ivar timeout: Seconds a check may take.
    """

    engine: str
    description: str
    dbapiName: str
    connectKeywords: dict[str, Any] = field(repr=False)
    query: str
    statement: str
    placeholders: int
    timeout: float


# -- the query --------------------------------------------------------------

_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_PLACEHOLDER = re.compile(r"(?<![:\w]):user(?!\w)")
_SQLITE_PARAMETER = re.compile(r"\?|(?<![:\w])[:@$][A-Za-z_]\w*")
_POSTGRES_PARAMETER = re.compile(r"\$[0-9]")


def _segments(query: str) -> list[tuple[str, bool]]:
    """
    Split SQL text into pieces that are code (C{True}) and pieces that are
    quoted strings, quoted identifiers or comments (C{False}).

    @raise ValueError: If a quote or comment is not closed.
    """
    pieces: list[tuple[str, bool]] = []
    code: list[str] = []
    i = 0
    n = len(query)
    while i < n:
        c = query[i]
        end = -1
        if c in "'\"`":
            # E'...' strings take backslash escapes.
            backslash = (
                c == "'"
                and i > 0
                and query[i - 1] in "eE"
                and (i < 2 or not (query[i - 2].isalnum() or query[i - 2] == "_"))
            )
            j = i + 1
            while j < n:
                if backslash and query[j] == "\\":
                    j += 2
                    continue
                if query[j] == c:
                    if j + 1 < n and query[j + 1] == c:
                        j += 2
                        continue
                    end = j + 1
                    break
                j += 1
            what = "string" if c == "'" else "quoted name"
        elif query.startswith("--", i):
            newline = query.find("\n", i)
            end = n if newline < 0 else newline + 1
            what = "comment"
        elif query.startswith("/*", i):
            close = query.find("*/", i + 2)
            end = -1 if close < 0 else close + 2
            what = "comment"
        elif c == "$" and (match := _DOLLAR_QUOTE.match(query, i)):
            tag = match.group(0)
            close = query.find(tag, match.end())
            end = -1 if close < 0 else close + len(tag)
            what = "dollar-quoted string"
        else:
            code.append(c)
            i += 1
            continue
        if end < 0:
            raise ValueError(f"option 'query': unterminated {what} in the query")
        if code:
            pieces.append(("".join(code), True))
            code = []
        pieces.append((query[i:end], False))
        i = end
    if code:
        pieces.append(("".join(code), True))
    return pieces


def translateQuery(query: str, engine: str) -> tuple[str, int]:
    """
    Translate the administrator's query to the driver's parameter style.

    C{:user} (outside quotes and comments) becomes C{?} for SQLite and C{%s}
    for psycopg, which then also needs every other C{%} doubled.  The
    placeholder may appear more than once; the user name is bound for each.

    @param query: The query with C{:user}; a trailing C{;} is dropped.
    @param engine: C{"sqlite"} or C{"postgresql"}.

    @return: The translated query and the number of placeholders.

    @raise ValueError: If the query is empty, has no C{:user}, quotes it, has
        parameters of the driver's own, holds more than one statement, or
        seems to swallow other options (C{query=} must be the last).
    """
    query = query.strip()
    while query.endswith(";"):
        query = query[:-1].rstrip()
    if not query:
        raise ValueError("option 'query' is empty")
    pieces = _segments(query)
    count = 0
    quoted = False
    out = []
    optionNames = "|".join(sorted({o for names in _OPTIONS.values() for o in names}))
    swallowed = re.compile(rf"&(?:{optionNames})=")
    for text, isCode in pieces:
        if not isCode:
            if _PLACEHOLDER.search(text):
                quoted = True
            out.append(text.replace("%", "%%") if engine == "postgresql" else text)
            continue
        if swallowed.search(text):
            raise ValueError(
                "option 'query' must be the last option: everything after"
                " 'query=' is the SQL, and it holds another option"
            )
        if ";" in text:
            raise ValueError("option 'query' must be a single SQL statement")
        found = len(_PLACEHOLDER.findall(text))
        count += found
        if engine == "sqlite":
            stripped = _PLACEHOLDER.sub("", text)
            other = _SQLITE_PARAMETER.search(stripped)
            if other is not None:
                raise ValueError(
                    f"option 'query': {other.group(0)!r} is a parameter; the only"
                    f" one allowed is {PLACEHOLDER} (the user name)"
                )
            out.append(_PLACEHOLDER.sub("?", text))
        else:
            other = _POSTGRES_PARAMETER.search(text)
            if other is not None:
                raise ValueError(
                    f"option 'query': {other.group(0)!r} is a parameter; the only"
                    f" one allowed is {PLACEHOLDER} (the user name)"
                )
            out.append(_PLACEHOLDER.sub("%s", text.replace("%", "%%")))
    if count == 0:
        if quoted:
            raise ValueError(
                f"option 'query': write {PLACEHOLDER} without quotes around it"
                " (it is a bound parameter, not text pasted into the SQL)"
            )
        raise ValueError(
            f"option 'query' must contain {PLACEHOLDER} where the user name goes"
        )
    return "".join(out), count


# -- the argument -------------------------------------------------------------


def _splitOptions(text: str) -> dict[str, str]:
    """
    Split C{name=value&name=value&query=SQL}: values percent-decoded, except
    the query, which is everything after C{query=} taken verbatim.
    """
    options: dict[str, str] = {}
    rest = text
    while rest:
        if rest.startswith("query="):
            options["query"] = rest[len("query=") :]
            break
        item, _, rest = rest.partition("&")
        if not item:
            continue
        name, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"option {name!r} needs a value (name=value)")
        if name in options:
            raise ValueError(f"option {name!r} is given twice")
        try:
            options[name] = unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(
                f"option {name!r}: percent-escapes are not UTF-8"
            ) from None
    return options


def _timeout(value: str | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and 0 < timeout <= 3600):
        raise ValueError(
            f"option 'timeout' must be a number of seconds (0 to 3600), not {value!r}"
        )
    return timeout


def _existingFile(name: str, value: str) -> str:
    if not value or not os.path.isabs(value):
        raise ValueError(f"option {name!r} must be an absolute path, not {value!r}")
    if not os.path.isfile(value):
        raise ValueError(f"option {name!r}: no such file {value!r}")
    return value


def _readSecret(path: str) -> str:
    """
    The first line of C{password_file}.
    """
    _existingFile("password_file", path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(
            f"option 'password_file': cannot read {path!r}: {e.strerror or e}"
        ) from None
    lines = data.splitlines()
    secret = lines[0] if lines else b""
    if not secret:
        raise ValueError(f"option 'password_file': {path!r} has an empty first line")
    try:
        return secret.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"option 'password_file': the password in {path!r} is not UTF-8"
        ) from None


def parseArgument(argstring: str) -> SQLDatabase:
    """
    Parse the C{sql:} checker's argument: a database URL, C{?}, options
    separated by C{&}, of which C{query=} must be the last::

        sqlite:////ABSOLUTE/PATH?[timeout=S&]query=SQL
        postgresql://[USER@]HOST[:PORT]/DBNAME?[OPTION=VALUE&...]query=SQL

    Everything after C{query=} is the SQL, verbatim (spaces, C{=}, C{&},
    C{%} and quotes included: it is not percent-decoded).  The other option
    values and the URL's parts are percent-decoded (C{%2F} for C{/}, so a
    PostgreSQL HOST of C{%2Frun%2Fpostgresql} is a Unix socket directory).

    SQLite needs four slashes (C{sqlite:} + C{//} + an absolute path); the
    file must exist, and it is opened read-only.  For PostgreSQL
    (C{postgres://} works too) the URL must not hold a password: the options
    are C{password_file=} (a file whose first line is the password),
    C{sslmode=} (libpq's: disable, allow, prefer, require, verify-ca,
    verify-full), C{sslrootcert=}, C{sslcert=} and C{sslkey=} (files).  Both
    take C{timeout=} (seconds, default 10).

    @raise ValueError: Naming the option or part at fault.
    """
    argstring = argstring.strip()
    if not argstring:
        raise ValueError(
            "requires a database URL and a query, e.g. sql:sqlite:////var/lib/"
            "smtpauth-relay/users.db?query=SELECT password FROM users"
            f" WHERE name = {PLACEHOLDER}"
        )
    url, question, optionText = argstring.partition("?")
    scheme, colon, _ = url.partition(":")
    engine = _SCHEMES.get(scheme.lower()) if colon else None
    if engine is None:
        raise ValueError(
            f"the database URL must start with sqlite: or postgresql:, not {url!r}"
        )
    options = _splitOptions(optionText) if question else {}
    for name in options:
        if name not in _OPTIONS[engine]:
            raise ValueError(
                f"unknown option {name!r} for {engine} (known:"
                f" {', '.join(_OPTIONS[engine])})"
            )
    if "query" not in options:
        raise ValueError(
            f"option 'query' is required (the last option), e.g. ?query=SELECT"
            f" password FROM users WHERE name = {PLACEHOLDER}"
        )
    timeout = _timeout(options.get("timeout"))
    statement, count = translateQuery(options["query"], engine)
    query = options["query"].strip()

    if engine == "sqlite":
        keywords, description = _sqlite(url, timeout)
        dbapiName = "sqlite3"
    else:
        keywords, description = _postgresql(url, options, timeout)
        dbapiName = "psycopg"
    return SQLDatabase(
        engine=engine,
        description=description,
        dbapiName=dbapiName,
        connectKeywords=keywords,
        query=query,
        statement=statement,
        placeholders=count,
        timeout=timeout,
    )


def _sqlite(url: str, timeout: float) -> tuple[dict[str, Any], str]:
    """
    The C{sqlite3.connect} keywords for a C{sqlite:////path} URL.
    """
    rest = url.partition(":")[2]
    if not rest.startswith("//"):
        raise ValueError(
            f"the SQLite URL must be sqlite:////ABSOLUTE/PATH (four slashes), not {url!r}"
        )
    path = unquote(rest[2:], errors="strict")
    if not path.startswith("//"):
        raise ValueError(
            "the SQLite database must be an absolute path: write four slashes,"
            f" sqlite:////var/lib/..., not {url!r}"
        )
    path = "/" + path.lstrip("/")
    if not os.path.isfile(path):
        raise ValueError(f"SQLite database {path!r} does not exist or is not a file")
    return (
        {
            # Read-only: the relay never writes to the user database.
            "database": "file:" + quote(path) + "?mode=ro",
            "uri": True,
            # adbapi keeps one connection per thread, and closes them all
            # from another thread when the pool is closed.
            "check_same_thread": False,
            "timeout": timeout,
        },
        f"sqlite:///{path}",
    )


def _postgresql(
    url: str, options: dict[str, str], timeout: float
) -> tuple[dict[str, Any], str]:
    """
    The C{psycopg.connect} keywords for a C{postgresql://} URL and options.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"the PostgreSQL URL is not valid: {e}") from None
    if parts.password is not None:
        raise ValueError(
            "the PostgreSQL URL must not contain a password: put it in a file"
            " and give its path with the option password_file="
        )
    if parts.query or parts.fragment:
        raise ValueError(f"the PostgreSQL URL is not valid: {url!r}")
    dbname = unquote(parts.path.lstrip("/"), errors="strict")
    if not dbname or "/" in dbname:
        raise ValueError(
            "the PostgreSQL URL must name the database:"
            f" postgresql://USER@HOST/DBNAME, not {url!r}"
        )
    keywords: dict[str, Any] = {"dbname": dbname}
    # Not parts.hostname, which lower-cases a socket directory's path too.
    host = parts.netloc.rpartition("@")[2]
    if port is not None or host.endswith(":"):
        host = host.rpartition(":")[0]
    host = unquote(host.removeprefix("[").removesuffix("]"), errors="strict")
    if host:
        keywords["host"] = host
    if port is not None:
        keywords["port"] = port
    user = unquote(parts.username or "", errors="strict")
    if user:
        keywords["user"] = user

    if "password_file" in options:
        keywords["password"] = _readSecret(options["password_file"])
    sslmode = options.get("sslmode")
    if sslmode is not None:
        if sslmode not in _SSLMODES:
            raise ValueError(
                f"option 'sslmode' must be one of {', '.join(_SSLMODES)}, not"
                f" {sslmode!r}"
            )
        keywords["sslmode"] = sslmode
    for name in ("sslrootcert", "sslcert", "sslkey"):
        if name == "sslrootcert" and options.get(name) == "system":
            # libpq 16 and later: the system's trusted CAs.
            keywords[name] = "system"
        elif name in options:
            keywords[name] = _existingFile(name, options[name])
    if ("sslcert" in options) != ("sslkey" in options):
        raise ValueError("options 'sslcert' and 'sslkey' go together")

    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ValueError(
            "PostgreSQL needs psycopg 3: pip install 'smtpauth-relay[sql]'"
            ' (or pip install "psycopg[binary]")'
        ) from None

    milliseconds = max(1, round(timeout * 1000))
    keywords.update(
        {
            # libpq counts whole seconds, and 1 means 2.
            "connect_timeout": max(2, math.ceil(timeout)),
            "options": f"-c statement_timeout={milliseconds}"
            " -c default_transaction_read_only=on",
            "application_name": "smtpauth-relay",
            "autocommit": True,
            # Works behind PgBouncer in transaction mode.
            "prepare_threshold": None,
        }
    )
    where = host or "(local socket)"
    if port is not None:
        where += f":{port}"
    description = f"postgresql://{user + '@' if user else ''}{where}/{dbname}"
    return keywords, description


# -- the checker ------------------------------------------------------------


def _toBytes(value: bytes | str) -> bytes:
    """
    Credentials from twisted.mail hold bytes; other callers may pass text.
    """
    return value.encode("utf-8") if isinstance(value, str) else value


class _Stale(Exception):
    """
    A query failed because the connection it used had been cut (the server
    restarted, or dropped it): worth one more try on a new connection.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Connection(adbapi.Connection):
    """
    An adbapi connection that, when it is found broken, is dropped quietly
    (so the next query reconnects) instead of logging two tracebacks.
    """

    def rollback(self) -> None:
        pool = self._pool
        connection: Any = self._connection
        try:
            connection.rollback()
            if pool.reconnect:
                cursor = connection.cursor()
                cursor.execute(pool.good_sql)
                cursor.close()
                connection.commit()
        except Exception:
            pool.disconnect(connection)


class _ConnectionPool(adbapi.ConnectionPool):
    connectionFactory = _Connection


@dataclass(frozen=True)
class _Result:
    """
    What a query gave: its column count (C{None} if it gave no result set)
    and its first two rows.
    """

    columns: int | None
    rows: list[Any]


def _hashText(value: object) -> tuple[str | None, str | None]:
    """
    The hash in a column's value, or what is wrong with it.

    @return: C{(hash, None)} or C{(None, problem)}.
    """
    if value is None:
        return None, "the hash is NULL"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None, "the hash is not ASCII text"
    if not isinstance(value, str):
        return None, f"the query returned a {type(value).__name__}, not text"
    # CHAR(n) columns pad with spaces; hashes never hold white space.
    value = value.strip()
    if not value:
        return None, "the hash is empty"
    if passwords.hashScheme(value) is None:
        return None, "the hash is of no known scheme"
    return value, None


@implementer(ICredentialsChecker)
class SQLChecker:
    """
    Check user names and passwords against hashes looked up in an SQL
    database.

    The outcome of a check:

      - no row: L{UnknownUser} (the next checker is asked), after verifying
        the password against a dummy hash so timing does not tell;
      - one row with a usable hash: the user name, or L{UnauthorizedLogin};
      - one row whose hash is NULL, empty or of no known scheme:
        L{UnauthorizedLogin}, and a warning naming the user (not the hash);
      - more than one row, or not one column: L{CheckerUnavailable}, logged
        as a misconfigured query;
      - a database error, a connection failure, a timeout, or too many checks
        waiting: L{CheckerUnavailable}, logged (once while the problem
        lasts).

    The connection pool is made at the first check, not when the checker is
    made (checkers are also made just to validate a configuration); L{close}
    closes it.

    @ivar database: What to query.
    @ivar timeout: Seconds a check may take (used by the chain checker).
    @ivar dummyHash: The hash verified against for unknown users.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()
    minConnections = 1
    maxConnections = 3
    maxPending = 32
    """
    Queries and hash checks allowed in threads (running or waiting) at once;
    beyond that a login gets 454 4.7.0 at once instead of queueing without
    bound behind a slow database.
    """

    def __init__(
        self,
        database: SQLDatabase,
        reactor: IReactorThreads | None = None,
        runInThread: RunInThread | None = None,
        dummyHash: str | None = None,
    ) -> None:
        """
        @param database: What to query (see L{parseArgument}).
        @param reactor: The reactor for the connection pool and the hash
            checks; the global reactor if C{None}, imported at the first
            check, not here.
        @param runInThread: Runs a blocking hash verification in a thread and
            returns a L{Deferred} of its result; by default
            C{deferToThreadPool} on the reactor's thread pool.
        @param dummyHash: The hash to verify unknown users' passwords against;
            by default L{passwords.dummyHash}.
        """
        self.database = database
        self.timeout = database.timeout
        self._reactor = reactor
        self._runInThread = runInThread
        if dummyHash is None:
            dummyHash = passwords.dummyHash()
        self.dummyHash = dummyHash
        self._pool: Any = None
        self._closed = False
        self._pending = 0
        self._problem: str | None = None

    def __repr__(self) -> str:
        return f"<SQLChecker {self.database.description}>"

    def _getReactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = cast(IReactorThreads, reactor)
        return self._reactor

    def _getPool(self) -> Any:
        """
        The connection pool, made on first use.
        """
        if self._pool is None:
            self._pool = _ConnectionPool(
                self.database.dbapiName,
                cp_min=self.minConnections,
                cp_max=self.maxConnections,
                cp_reconnect=True,
                cp_noisy=False,
                cp_reactor=self._getReactor(),
                **self.database.connectKeywords,
            )
        return self._pool

    def close(self) -> Deferred[None]:
        """
        Close the connection pool (in a thread: it waits for queries under
        way).  Checks after this fail with L{CheckerUnavailable}.

        @return: A L{Deferred} that fires when the pool is closed.
        """
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        reactor = self._getReactor()
        core = cast(IReactorCore, reactor)
        if pool.shutdownID is not None:
            core.removeSystemEventTrigger(pool.shutdownID)
            pool.shutdownID = None
        if pool.startID is not None:
            core.removeSystemEventTrigger(pool.startID)
            pool.startID = None
        from twisted.internet.threads import deferToThreadPool

        d: Deferred[None] = deferToThreadPool(
            reactor, reactor.getThreadPool(), pool.finalClose
        )
        return d

    def _shielded(self, d: Deferred[_T]) -> Deferred[_T]:
        """
        Count thread work until it has really finished: cancelling the
        returned L{Deferred} (the chain checker's timeout) does not stop a
        thread, so C{d} keeps counting until its thread is done.
        """
        self._pending += 1
        result: Deferred[_T] = Deferred()

        def finished(outcome: object) -> None:
            self._pending -= 1
            if result.called:
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(cast(_T, outcome))

        d.addBoth(finished)
        return result

    def _verify(self, password: bytes, encoded: str) -> Deferred[bool]:
        """
        Verify a hash in a thread.
        """
        if self._runInThread is None:
            self._runInThread = threadPoolRunner(self._getReactor())
        return self._shielded(
            self._runInThread(passwords.verifyPassword, password, encoded)
        )

    def _busy(self) -> CheckerUnavailable | None:
        """
        Why no more work can be taken now, or C{None}.
        """
        if self._closed:
            return CheckerUnavailable(f"{self!r} is closed")
        if self._pending >= self.maxPending:
            self.log.warn(
                "{count} database queries and password checks already waiting"
                " for {database}; answering 454 until they are done",
                count=self._pending,
                database=self.database.description,
            )
            return CheckerUnavailable("too many password checks waiting")
        return None

    # Twisted declares avatar IDs as bytes; ours are the user name as text,
    # which is what the realm and the Received header want.
    def requestAvatarId(  # type: ignore[override]
        self, credentials: IUsernamePassword
    ) -> Deferred[str]:
        """
        Check a user name and password.

        @param credentials: The user name (bound to the query after decoding
            as UTF-8) and password.

        @return: A L{Deferred} that fires with the user name (L{str}), or
            fails with L{UnknownUser}, L{UnauthorizedLogin} or
            L{CheckerUnavailable} (see the class docstring).
        """
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: IUsernamePassword) -> str:
        busy = self._busy()
        if busy is not None:
            raise busy
        password = _toBytes(credentials.password)
        try:
            username: str | None = _toBytes(credentials.username).decode("utf-8")
        except UnicodeDecodeError:
            username = None

        if username is None or "\x00" in username:
            # Not a name any database holds (PostgreSQL refuses NUL in text).
            await self._verify(password, self.dummyHash)
            raise UnauthorizedLogin() if username is None else UnknownUser()

        result = await self._lookup(username)
        if result.columns != 1:
            raise self._unavailable(
                "misconfigured query: it must return one column (the hash),"
                + (
                    " and gives no rows at all (is it a SELECT?)"
                    if result.columns is None
                    else f" not {result.columns}"
                )
            )
        if len(result.rows) > 1:
            self.log.error(
                "Misconfigured query for {database}: more than one row for user"
                " {user}; refusing the login (the query must return at most one"
                " row per user name)",
                database=self.database.description,
                user=username,
            )
            raise CheckerUnavailable("more than one row for the user")
        if not result.rows:
            await self._verify(password, self.dummyHash)
            raise UnknownUser()

        encoded, problem = _hashText(result.rows[0][0])
        if encoded is None:
            self.log.warn(
                "Configuration problem in {database}: user {user} has no usable"
                " password hash ({problem}); the login is refused",
                database=self.database.description,
                user=username,
                problem=problem,
            )
            await self._verify(password, self.dummyHash)
            raise UnauthorizedLogin()
        if not await self._verify(password, encoded):
            raise UnauthorizedLogin()
        return username

    async def _lookup(self, username: str) -> _Result:
        """
        Run the query for C{username}, once more on a new connection if the
        pooled one turns out to have been cut.

        @raise CheckerUnavailable: If the database does not answer.
        """
        reconnected = False
        while True:
            busy = self._busy()
            if busy is not None:
                raise busy
            try:
                result: _Result = await self._shielded(
                    self._getPool().runWithConnection(self._query, username)
                )
            except CancelledError:
                raise
            except _Stale as e:
                if not reconnected:
                    reconnected = True
                    self.log.info(
                        "Connection to {database} was cut ({problem}); reconnecting",
                        database=self.database.description,
                        problem=_describe(e.error),
                    )
                    continue
                raise self._unavailable(_describe(e.error)) from None
            except Exception as e:
                raise self._unavailable(_describe(e)) from None
            if self._problem is not None:
                self.log.info(
                    "Database {database} answers again",
                    database=self.database.description,
                )
                self._problem = None
            return result

    def _query(self, connection: Any, username: str) -> _Result:
        """
        Run the query, in a thread of the pool, on one of its connections.
        """
        sqlite = self.database.engine == "sqlite"
        if sqlite:
            deadline = time.monotonic() + self.timeout
            connection.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        cursor = connection.cursor()
        try:
            cursor.execute(
                self.database.statement, (username,) * self.database.placeholders
            )
            columns = None if cursor.description is None else len(cursor.description)
            rows = [] if columns is None else list(cursor.fetchmany(2))
        except Exception as e:
            if getattr(connection, "broken", False):
                raise _Stale(e) from None
            raise
        finally:
            try:
                cursor.close()
            except Exception:
                pass
            if sqlite:
                connection.set_progress_handler(None, 0)
        return _Result(columns, rows)

    def _unavailable(self, problem: str) -> CheckerUnavailable:
        """
        Log (once while it lasts) that the database cannot answer.

        @return: The exception to raise.
        """
        if problem != self._problem:
            self.log.error(
                "Cannot check passwords in {database}: {problem}",
                database=self.database.description,
                problem=problem,
            )
            self._problem = problem
        return CheckerUnavailable(f"{self.database.description}: {problem}")


def _describe(error: BaseException) -> str:
    """
    A one-line description of a database error (drivers put the server's
    message in it, never the connection password).
    """
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
