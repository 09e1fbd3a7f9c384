"""
A real PostgreSQL server for L{tests.test_sql}, run from Debian's
C{postgresql} package in a temporary directory.

L{PostgresServer} runs C{initdb} and then C{postgres} itself (not a
cluster managed by C{pg_ctlcluster}), listening on a free port on
127.0.0.1 and on a Unix socket in its own directory, with durability turned
off since the data is thrown away.  PostgreSQL refuses to run as root: when
the tests run as root, the server runs as the C{postgres} user (which the
package creates) and its directory is given to that user.

Local (Unix socket) connections are trusted, for the fixture's own
superuser work; TCP connections need a password (SCRAM), as the relay's
would.

L{sharedServer} is the one server a test run shares (started at first use,
stopped at exit); tests that stop the server make their own.  When the
binaries or psycopg are missing, both raise L{SkipTest} saying what to
install.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SkipTest

from tests.e2e_support import HOST, freePorts, stopProcess

SUPERUSER = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def binDirectory() -> str:
    """
    The directory holding C{initdb} and C{postgres}, the newest installed.

    @raise SkipTest: If there is none.
    """
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: (
            int(path.split("/")[-2]) if path.split("/")[-2].isdigit() else 0
        ),
    )
    for directory in reversed(candidates):
        if all(
            os.access(os.path.join(directory, name), os.X_OK)
            for name in ("initdb", "postgres")
        ):
            return directory
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("postgres") is not None:
        return os.path.dirname(initdb)
    raise SkipTest(
        "PostgreSQL server binaries (initdb, postgres) not found: "
        "apt-get install postgresql"
    )


def psycopgModule() -> Any:
    """
    The psycopg (3) module.

    @raise SkipTest: If it is not installed.
    """
    try:
        import psycopg
    except ImportError:
        raise SkipTest(
            'psycopg is not installed: pip install "psycopg[binary]"'
        ) from None
    return psycopg


class PostgresServer:
    """
    One PostgreSQL server in a temporary directory.

    @ivar directory: The temporary directory (data, socket, log), or C{None}
        before L{start}.
    @ivar port: The TCP port on 127.0.0.1.
    """

    def __init__(self) -> None:
        self.bin = binDirectory()
        self.psycopg = psycopgModule()
        self.directory: str | None = None
        (self.port,) = freePorts(1)
        self._process: subprocess.Popen[bytes] | None = None
        self._account: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise SkipTest(
                    f"running as root and there is no {SUPERUSER!r} user to run"
                    " PostgreSQL as (PostgreSQL refuses root)"
                ) from None
            self._account = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": [],
            }

    @property
    def socketDirectory(self) -> str:
        """
        Where the server's Unix socket is.
        """
        assert self.directory is not None
        return self.directory

    @property
    def dataDirectory(self) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, "data")

    @property
    def logPath(self) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, "postgres.log")

    def log(self) -> str:
        """
        What the server wrote to its log so far.
        """
        try:
            with open(self.logPath, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _run(self, *command: str) -> None:
        """
        Run a command as the server's account, failing with its output.
        """
        result = subprocess.run(
            command,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            **self._account,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{command[0]} failed ({result.returncode}):"
                f" {result.stdout.decode(errors='replace')}"
                f" {result.stderr.decode(errors='replace')}"
            )

    def start(self) -> None:
        """
        Make the cluster (the first time) and start the server; return once it
        takes connections.
        """
        if self._process is not None:
            return
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="smtpauth-relay-pg-")
            _running.add(self)
            if self._account:
                os.chown(self.directory, self._account["user"], self._account["group"])
            self._run(
                os.path.join(self.bin, "initdb"),
                "--pgdata",
                self.dataDirectory,
                "--username",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        logFile = open(self.logPath, "ab")
        try:
            self._process = subprocess.Popen(
                [
                    os.path.join(self.bin, "postgres"),
                    "-D",
                    self.dataDirectory,
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={HOST}",
                    "-c",
                    f"unix_socket_directories={self.socketDirectory}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=40",
                    "-c",
                    "shared_buffers=16MB",
                ],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=logFile,
                stderr=subprocess.STDOUT,
                **self._account,
            )
        finally:
            logFile.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"postgres exited at start:\n{self.log()}")
            try:
                self.connect().close()
                return
            except self.psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"postgres not ready after {START_TIMEOUT}s:\n{self.log()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """
        Stop the server (fast shutdown: sessions are cut), keeping its data.
        """
        process, self._process = self._process, None
        stopProcess(process, signal.SIGINT, STOP_TIMEOUT)

    def remove(self) -> None:
        """
        Stop the server and delete its directory.
        """
        self.stop()
        _running.discard(self)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    @property
    def running(self) -> bool:
        return self._process is not None

    def connect(self, dbname: str = "postgres") -> Any:
        """
        A superuser connection (autocommit) over the Unix socket.
        """
        return self.psycopg.connect(
            host=self.socketDirectory,
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            connect_timeout=5,
            autocommit=True,
        )

    def execute(
        self, statements: Sequence[tuple[str, Sequence[object]] | str], dbname: str
    ) -> None:
        """
        Run statements as the superuser in C{dbname}; each is SQL text, or a
        pair of SQL text with C{%s} placeholders and their values.
        """
        with self.connect(dbname) as connection:
            for statement in statements:
                if isinstance(statement, str):
                    connection.execute(statement)
                else:
                    connection.execute(statement[0], statement[1])

    def createDatabase(self, name: str, owner: str, password: str) -> None:
        """
        Create a login role C{owner} with C{password} (if there is none) and a
        database C{name} (afresh) that it owns.
        """
        sql = self.psycopg.sql
        with self.connect() as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,)
            ).fetchone()
            if exists is None:
                connection.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(owner), sql.Literal(password)
                    )
                )
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
            )
            connection.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(owner)
                )
            )


_running: set[PostgresServer] = set()
_shared: PostgresServer | None = None


def sharedServer() -> PostgresServer:
    """
    The server this test run shares, started on first use and removed at
    exit.

    @raise SkipTest: If PostgreSQL or psycopg is not installed.
    """
    global _shared
    if _shared is None:
        server = PostgresServer()
        server.start()
        _shared = server
    elif not _shared.running:
        _shared.start()
    return _shared


@atexit.register
def _removeAll() -> None:
    """
    Never leave a server or its directory behind, whatever the tests did.
    """
    for server in list(_running):
        server.remove()
