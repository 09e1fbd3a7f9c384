"""
End-to-end tests of the credential checker plugins: the real relay
(C{twistd -n smtpauth-relay --config ...}) in a subprocess whose C{[auth]
checkers} chain real backends -- SQLite, a real slapd
(L{tests.slapd_support}), a real Dovecot (L{tests.dovecot_support}) -- and
backends that refuse connections, driven with smtplib over STARTTLS with
AUTH PLAIN and LOGIN.

Each class starts one relay (and its Dovecot) for all its tests; slapd is
the one the test run shares.  Every client connection comes from its own
loopback address (127.83.x.y), so lockouts of one test never touch another,
except where a test means them to.
"""

from __future__ import annotations

import os
import smtplib
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

from twisted.trial.unittest import SkipTest

from smtpauth_relay.passwords import hashPassword
from tests import dovecot_support
from tests.dovecot_support import SERVER_NAME, DovecotProcess
from tests.e2e_support import (
    CLIENT_NAME,
    HOST,
    IO_TIMEOUT,
    QUEUED,
    RelayProcess,
    ServerProcess,
    SharedRelayTestCase,
    clientContext,
    closeQuietly,
    freePorts,
    loopbackAddresses,
    poll,
    toml,
)
from tests.slapd_support import (
    AD_USERS_BY_NAME,
    SERVICE_DN,
    SERVICE_PASSWORD,
    SUFFIX,
    sharedSlapd,
    slapdMissing,
)

nextSourceAddress = loopbackAddresses(83)

MECHANISMS = ("PLAIN", "LOGIN")

SQL_QUERY = "SELECT password FROM users WHERE name = :user"
LDAP_FILTER = "(&(objectClass=testADAccount)(sAMAccountName=%s))"

SQL_USER = ("sqluser", "only in sqlite")
"""Known to SQLite only."""
SQL_SHADOW_PASSWORD = "sqlite has another one"
"""SQLite's password for C{carol}, whom LDAP and Dovecot know with
C{carol-secret}: that password is wrong for the first checker that knows
her, so it must be refused without asking the others."""
LDAP_USER = ("dave", AD_USERS_BY_NAME["dave"][1])
"""Known to slapd only (an Active-Directory-style entry, found by search)."""
SHADOWED_USER = ("carol", AD_USERS_BY_NAME["carol"][1])
"""In SQLite (another password), slapd and Dovecot (this password)."""
IMAP_USER = ("erin", "only in dovecot")
"""Known to Dovecot only."""
UNKNOWN_USER = ("mallory", "known nowhere")

WRONG = "not the password"

AUTH_OK = (235, "2.7.0")
AUTH_FAILED = (535, "5.7.8")
AUTH_UNAVAILABLE = (454, "4.7.0")
UNAVAILABLE_TEXT = "Temporary authentication failure"
"""The text of the 454 for an unavailable checker (a lockout's 454 says
something else)."""


@dataclass(eq=False)
class ChainRelay(RelayProcess):
    """
    A relay whose C{[auth] checkers} are L{checkers} (when there are some)
    instead of the usual htpasswd file, and which removes the L{backends}
    it was given when it is removed.

    @ivar checkers: strcred descriptions, in the order they are asked.
    @ivar backends: servers started for this relay alone.
    """

    checkers: list[str] = field(default_factory=list)
    backends: list[ServerProcess] = field(default_factory=list)

    def _writeConfig(self) -> None:
        super()._writeConfig()
        if not self.checkers:
            return
        with open(self.configPath, encoding="utf-8") as f:
            text = f.read()
        usual = f"checkers = {toml(['htpasswd:' + self.users])}\n"
        if usual not in text:
            raise AssertionError(f"no {usual!r} in the relay's config:\n{text}")
        text = text.replace(usual, f"checkers = {toml(self.checkers)}\n", 1)
        with open(self.configPath, "w", encoding="utf-8") as f:
            f.write(text)

    def remove(self) -> None:
        try:
            super().remove()
        finally:
            for backend in self.backends:
                backend.remove()

    def sqliteChecker(self, users: dict[str, str]) -> str:
        """
        Make a SQLite database in the relay's directory with C{users} (and
        bcrypt hashes of their passwords).

        @return: the C{sql:} description of a checker for it.
        """
        path = os.path.join(self.directory, "users.db")
        connection = sqlite3.connect(path)
        try:
            with connection:
                connection.execute(
                    "CREATE TABLE users (name TEXT PRIMARY KEY, password TEXT)"
                )
                connection.executemany(
                    "INSERT INTO users VALUES (?, ?)",
                    [
                        (name, hashPassword(password.encode(), rounds=4))
                        for name, password in users.items()
                    ],
                )
        finally:
            connection.close()
        return f"sql:sqlite:///{quote(path)}?query={SQL_QUERY}"

    def secretFile(self, name: str, secret: str) -> str:
        """
        Write C{secret} to a C{0600} file C{name} in the relay's directory.

        @return: its path.
        """
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return path


class CheckerRelayTestCase(SharedRelayTestCase):
    """
    Base for the classes here: skips when a backend cannot run, and logs
    in over STARTTLS with smtplib.
    """

    def setUp(self) -> None:
        self.skipUnlessBackends()
        super().setUp()

    def skipUnlessBackends(self) -> None:
        """
        Raise L{SkipTest} if a backend the class needs cannot run here.
        """

    def session(self, sourceAddress: str | None = None) -> smtplib.SMTP:
        """
        A session on the STARTTLS port after STARTTLS and a second EHLO,
        from C{sourceAddress} (by default one of its own).
        """
        client = smtplib.SMTP(
            HOST,
            self.relay.starttlsPort,
            local_hostname=CLIENT_NAME,
            timeout=IO_TIMEOUT,
            source_address=(sourceAddress or nextSourceAddress(), 0),
        )
        self.addCleanup(closeQuietly, client)
        self.assertEqual(client.ehlo()[0], 250)
        self.assertEqual(client.starttls(context=clientContext())[0], 220)
        self.assertEqual(client.ehlo()[0], 250)
        return client

    def authenticate(
        self, client: smtplib.SMTP, mechanism: str, user: str, password: str
    ) -> tuple[int, str]:
        """
        AUTH C{mechanism} (PLAIN or LOGIN, as smtplib sends them) for
        C{user} and C{password}.

        @return: the final reply's code and text.
        """
        client.user, client.password = user, password
        method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
        text: bytes | str
        try:
            code, text = client.auth(mechanism, method)
        except smtplib.SMTPAuthenticationError as e:
            code, text = e.smtp_code, e.smtp_error
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return code, text

    def assertLogins(
        self,
        user: str,
        password: str,
        expected: tuple[int, str],
        sourceAddress: str | None = None,
    ) -> list[str]:
        """
        Log in as C{user} with C{password}, once with each mechanism, each
        in a session of its own, and assert each final reply's code and
        enhanced status code.

        @return: the texts of the replies.
        """
        texts = []
        for mechanism in MECHANISMS:
            client = self.session(sourceAddress)
            code, text = self.authenticate(client, mechanism, user, password)
            self.assertEqual(
                (code, text.split(" ", 1)[0]),
                expected,
                f"AUTH {mechanism} as {user}: {code} {text}\n{self.relay.log()}",
            )
            texts.append(text)
        return texts


class ChainTests(CheckerRelayTestCase):
    """
    A relay whose chain is C{sql:} (SQLite), C{ldap:} (search then bind,
    so that users it does not have are passed on) and C{imap:} (last, since
    an IMAP server cannot tell an unknown user from a wrong password).
    Its smarthost refuses connections, so that accepted messages stay in the
    spool to be looked at.
    """

    dovecotUsers = dict([IMAP_USER, SHADOWED_USER])

    def skipUnlessBackends(self) -> None:
        for reason in (slapdMissing(), dovecot_support.skipReason):
            if reason is not None:
                raise SkipTest(reason)

    @classmethod
    def makeRelay(cls) -> ChainRelay:
        """
        The relay, its SQLite database and service account password file,
        and its own Dovecot, started.
        """
        slapd = sharedSlapd()
        [deadSmarthost] = freePorts(1)
        relay = ChainRelay(
            lockout={"tarpit": 0.1},
            delivery={
                "mode": "smarthost",
                "host": HOST,
                "port": deadSmarthost,
                "tls": "none",
            },
        )
        try:
            dovecot = DovecotProcess(cls.dovecotUsers)
            relay.backends.append(dovecot)
            dovecot.start()
            sql = relay.sqliteChecker(
                dict([SQL_USER, (SHADOWED_USER[0], SQL_SHADOW_PASSWORD)])
            )
            ldapOptions = {
                "base": SUFFIX,
                "filter": LDAP_FILTER,
                "bind_dn": SERVICE_DN,
                "bind_password_file": relay.secretFile("ldap.pass", SERVICE_PASSWORD),
                "ca_file": slapd.caPath,
            }
            query = "&".join(f"{k}={v}" for k, v in ldapOptions.items())
            relay.checkers = [
                sql,
                f"ldap:{slapd.url('ldaps')}?{query}",
                f"imap:imaps://{SERVER_NAME}:{dovecot.imapsPort}"
                f"?ca_file={dovecot.caPath}",
            ]
            relay._writeConfig()
        except BaseException:
            relay.remove()
            raise
        return relay

    @property
    def dovecot(self) -> DovecotProcess:
        """
        The relay's Dovecot.
        """
        relay = self.relay
        assert isinstance(relay, ChainRelay)
        (dovecot,) = relay.backends
        assert isinstance(dovecot, DovecotProcess)
        return dovecot

    def dovecotSaw(self, user: str) -> bool:
        """
        Whether Dovecot logged a login or failed login of C{user}.
        """
        return f"user=<{user}>" in self.dovecot.log()

    def test_sqliteUser(self) -> None:
        """
        A user only SQLite knows logs in with PLAIN and LOGIN, without
        Dovecot being asked.
        """
        self.assertLogins(*SQL_USER, AUTH_OK)
        self.assertFalse(self.dovecotSaw(SQL_USER[0]), self.dovecot.log())

    def test_ldapUser(self) -> None:
        """
        A user only slapd knows (SQLite has no such user and passes on)
        logs in with PLAIN and LOGIN, without Dovecot being asked.
        """
        self.assertLogins(*LDAP_USER, AUTH_OK)
        self.assertFalse(self.dovecotSaw(LDAP_USER[0]), self.dovecot.log())

    def test_imapUser(self) -> None:
        """
        A user only Dovecot knows (SQLite and slapd pass on) logs in with
        PLAIN and LOGIN: Dovecot logs both logins.
        """
        self.assertLogins(*IMAP_USER, AUTH_OK)
        poll(
            lambda: self.dovecot.log().count(f"Login: user=<{IMAP_USER[0]}>") >= 2,
            IO_TIMEOUT,
            lambda: (
                f"two logins of {IMAP_USER[0]} in Dovecot's log\n" + self.dovecot.log()
            ),
        )

    def test_sqliteWrongPassword(self) -> None:
        """
        A wrong password for a user SQLite knows is refused (535) and final:
        slapd and Dovecot are not asked, even when they would take that
        password; the relay logs the failures without the passwords.
        """
        self.assertLogins(SQL_USER[0], WRONG, AUTH_FAILED)
        # carol-secret is carol's password in slapd and in Dovecot, not in
        # SQLite: were they asked, it would be 235.
        self.assertLogins(*SHADOWED_USER, AUTH_FAILED)
        for user in (SQL_USER[0], SHADOWED_USER[0]):
            self.assertFalse(self.dovecotSaw(user), self.dovecot.log())
        log = self.relay.log()
        for mechanism in MECHANISMS:
            for user in (SQL_USER[0], SHADOWED_USER[0]):
                self.assertIn(f"AUTH {mechanism} failed for {user} from", log)
        for user in (SQL_USER[0], SHADOWED_USER[0]):
            self.assertNotIn(f"refused the password of {user}", log)
        for password in (WRONG, SHADOWED_USER[1]):
            self.assertNotIn(password, log)

    def test_unknownUser(self) -> None:
        """
        A user no backend knows is refused (535) after every checker was
        asked (Dovecot, the last, logs the failed logins).
        """
        self.assertLogins(*UNKNOWN_USER, AUTH_FAILED)
        poll(
            lambda: self.dovecotSaw(UNKNOWN_USER[0]),
            IO_TIMEOUT,
            lambda: f"{UNKNOWN_USER[0]} in Dovecot's log\n{self.dovecot.log()}",
        )
        self.assertNotIn(UNKNOWN_USER[1], self.relay.log())

    def test_ldapUserSubmits(self) -> None:
        """
        A user slapd authenticated submits a message: it is accepted (250),
        its spool envelope names the user, and its C{Received} header says
        C{ESMTPSA}.
        """
        client = self.session()
        self.assertEqual(self.authenticate(client, "PLAIN", *LDAP_USER)[0], AUTH_OK[0])
        tag = uuid.uuid4().hex[:8]
        sender = f"dave-{tag}@sender.example"
        recipient = f"rcpt-{tag}@rcpt.example"
        message = (
            f"From: Dave <{sender}>\r\nTo: <{recipient}>\r\n"
            f"Subject: checkers-{tag}\r\n\r\nHello.\r\n"
        ).encode()
        self.assertEqual(client.mail(sender)[0], 250)
        self.assertEqual(client.rcpt(recipient)[0], 250)
        code, reply = client.data(message)
        self.assertEqual(code, 250, reply)
        match = QUEUED.match(reply.decode())
        assert match is not None, reply
        queueId = match.group(1)
        envelope = poll(
            lambda: self.relay.envelopes().get(queueId),
            IO_TIMEOUT,
            lambda: f"the envelope of {queueId}: {self.relay.spoolFiles()}",
        )
        self.assertEqual(envelope["authUser"], LDAP_USER[0])
        self.assertEqual(envelope["sender"], sender)
        self.assertEqual(envelope["recipients"], [recipient])
        path = os.path.join(self.relay.queueDirectory, "queued", queueId + ".msg")
        with open(path, "rb") as f:
            stored = f.read()
        self.assertIn(f"with ESMTPSA id {queueId}".encode(), stored)
        self.assertIn(f"Subject: checkers-{tag}".encode(), stored)


if TYPE_CHECKING:
    _DeadBackendBase = CheckerRelayTestCase
else:
    _DeadBackendBase = object


class DeadBackendMixin(_DeadBackendBase):
    """
    Mixed into a L{CheckerRelayTestCase}: a relay whose first checker's backend refuses connections and whose
    second (SQLite) knows the user: every login is 454 4.7.0, the second
    checker is never asked, and no number of them locks anyone out.
    """

    maxFailures = 2

    @classmethod
    def deadChecker(cls, relay: ChainRelay) -> str:
        """
        The description of a checker whose backend refuses connections.
        """
        raise NotImplementedError()

    @classmethod
    def makeRelay(cls) -> ChainRelay:
        """
        The relay, with a lockout after L{maxFailures} failures.
        """
        relay = ChainRelay(lockout={"max_failures": cls.maxFailures, "tarpit": 0.1})
        try:
            relay.checkers = [
                cls.deadChecker(relay),
                relay.sqliteChecker(dict([SQL_USER])),
            ]
            relay._writeConfig()
        except BaseException:
            relay.remove()
            raise
        return relay

    def test_unavailableNotLockedOut(self) -> None:
        """
        Many more logins than C{max_failures}, from one address as one
        user, with PLAIN and LOGIN, all get 454 4.7.0 for an unavailable
        checker (not 535, and not the lockout's 454); the relay logs each
        as unavailable, starts no lockout and logs no password.
        """
        source = nextSourceAddress()
        attempts = 3 * self.maxFailures
        for _ in range(attempts // len(MECHANISMS)):
            texts = self.assertLogins(*SQL_USER, AUTH_UNAVAILABLE, source)
            for text in texts:
                self.assertIn(UNAVAILABLE_TEXT, text)
        log = self.relay.log()
        self.assertEqual(
            log.count(f"for {SQL_USER[0]} from {source}"),
            attempts,
            log,
        )
        self.assertEqual(log.count(": checker unavailable"), attempts, log)
        self.assertNotIn("lockout start", log)
        self.assertNotIn(SQL_USER[1], log)


class DeadLDAPTests(DeadBackendMixin, CheckerRelayTestCase):
    """
    The first checker is C{ldap:} to a port that refuses connections.
    """

    @classmethod
    def deadChecker(cls, relay: ChainRelay) -> str:
        [port] = freePorts(1)
        return f"ldap:ldaps://{HOST}:{port}/?base={SUFFIX}&filter={LDAP_FILTER}"


class DeadPostgresTests(DeadBackendMixin, CheckerRelayTestCase):
    """
    The first checker is C{sql:postgresql://} to a port that refuses
    connections.
    """

    def skipUnlessBackends(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SkipTest(
                'psycopg is not installed: pip install "psycopg[binary]"'
            ) from None

    @classmethod
    def deadChecker(cls, relay: ChainRelay) -> str:
        [port] = freePorts(1)
        passwordFile = relay.secretFile("db.pass", "db secret")
        return (
            f"sql:postgresql://relay@{HOST}:{port}/mail"
            f"?password_file={passwordFile}&query={SQL_QUERY}"
        )
