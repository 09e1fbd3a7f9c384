"""
Tests for L{smtpauth_relay.imapchecker} and the C{imap} strcred plugin.

The conversation is tested in memory (L{IMAPLoginClient} over a
L{TLSStringTransport}); the checker against a real Dovecot
(L{tests.dovecot_support}), a refused port and a server that never answers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import findCheckerFactory, makeChecker
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.mail.imap4 import IMAP4Exception
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay.auth import ChainChecker
from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.imapchecker import (
    DEFAULT_TIMEOUT,
    IMPLICIT,
    PLAINTEXT,
    STARTTLS,
    IMAPChecker,
    IMAPCheckerOptions,
    IMAPLoginClient,
    IMAPProtocolError,
    LoginCache,
    checkerFromArgument,
    loginLines,
    parseArgument,
    runLogin,
)
from smtpauth_relay.testing import CheckerContractMixin, TLSStringTransport
from tests.dovecot_support import SERVER_NAME, SharedDovecotMixin, skipReason
from tests.e2e_support import HOST, freePorts
from tests.plugin_support import (
    assertCheckerFactory,
    checkerMadeAlone,
    pluginImports,
)
from tests.upstream_support import CertificateAuthority

ALICE = ("alice", "wonderland")
SPECIAL = ("carol", 'p"a\\s s{3}%*() \u00e4\u20ac')
"""Quote, backslash, space, IMAP specials and non-ASCII in the password."""
CONTROL = ("erin", "tab\there\r\n0002 LOGOUT\r\n")
"""
CR, LF and a tab in the password, made to look like a command: Dovecot
refuses control characters in passwords, so this must be a clean wrong
password (not a desynchronised conversation).
"""
DOERTE = ("d\u00f6rte@example.org", "gr\u00fc\u00dfe")
"""A UTF-8 user name."""


def credentials(user: str, password: str) -> UsernamePassword:
    """
    Credentials as twisted.mail makes them: bytes.
    """
    return UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))


def formattedLog(events: Sequence[LogEvent]) -> str:
    """
    Every captured event, formatted and as its repr, for searching.
    """
    return "\n".join(formatEvent(e) + " " + repr(e) for e in events)


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class CountingReactor:
    """
    A spy around the real reactor that counts the TCP connections made
    through it.

    @ivar connections: C{(host, port)} of every C{connectTCP}.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.connections: list[tuple[str, int]] = []

    @property
    def nameResolver(self) -> Any:
        return self._reactor.nameResolver

    def installNameResolver(self, resolver: Any) -> Any:
        return self._reactor.installNameResolver(resolver)

    def connectTCP(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.connections.append((host, port))
        return self._reactor.connectTCP(host, port, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class OptionTests(SynchronousTestCase):
    """
    Tests for L{parseArgument}: the C{imap:} argument string.
    """

    def assertInvalid(self, argstring: str, *fragments: str) -> str:
        error = self.assertRaises(ValueError, parseArgument, argstring)
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        return str(error)

    def test_imaps(self) -> None:
        """
        C{imaps://host} is implicit TLS on port 993 with the defaults.
        """
        self.assertEqual(
            parseArgument("imaps://mail.example.org"),
            IMAPCheckerOptions("mail.example.org", 993, IMPLICIT, None, 10.0, 0.0),
        )
        self.assertEqual(parseArgument("imaps://mail.example.org:1993/").port, 1993)
        self.assertEqual(DEFAULT_TIMEOUT, 10.0)

    def test_starttls(self) -> None:
        """
        C{imap://host?starttls=yes} is STARTTLS on port 143.
        """
        options = parseArgument("imap://Mail.Example.org?starttls=yes")
        self.assertEqual(
            (options.host, options.port, options.tls),
            ("mail.example.org", 143, STARTTLS),
        )
        self.assertEqual(options.url, "imap://mail.example.org:143")
        self.assertEqual(parseArgument("imap://h:10143?starttls=true").port, 10143)

    def test_ipv6(self) -> None:
        """
        An IPv6 literal in brackets gives the bare address.
        """
        options = parseArgument("imaps://[2001:db8::1]:993")
        self.assertEqual(options.host, "2001:db8::1")
        self.assertEqual(options.url, "imaps://[2001:db8::1]:993")

    def test_timeoutAndCache(self) -> None:
        """
        C{timeout=} and C{cache=} take seconds; C{cache=0} is off.
        """
        options = parseArgument("imaps://h?timeout=2.5&cache=300")
        self.assertEqual((options.timeout, options.cache), (2.5, 300.0))
        self.assertEqual(parseArgument("imaps://h?cache=0").cache, 0.0)
        for bad in ("0", "-1", "nan", "inf", "soon", "", "3601"):
            self.assertInvalid(f"imaps://h?timeout={bad}", "timeout=")
        for bad in ("-1", "nan", "x", "86401"):
            self.assertInvalid(f"imaps://h?cache={bad}", "cache=")

    def test_plaintextRefused(self) -> None:
        """
        C{imap://} without C{starttls=yes} is refused: it would send
        passwords in the clear.
        """
        self.assertInvalid("imap://mail.example.org", "in the clear", "starttls=yes")
        self.assertInvalid("imap://mail.example.org?starttls=no", "in the clear")

    def test_allowPlaintextLoopbackOnly(self) -> None:
        """
        C{allow_plaintext=yes} gives TLS-less C{imap://} for loopback servers
        only, and contradicts C{starttls=yes} and C{imaps://}.
        """
        for host in ("127.0.0.1", "localhost", "[::1]", "127.1.2.3"):
            options = parseArgument(f"imap://{host}:1143?allow_plaintext=yes")
            self.assertEqual(options.tls, PLAINTEXT)
        self.assertInvalid(
            "imap://mail.example.org?allow_plaintext=yes", "allow_plaintext", "loopback"
        )
        self.assertInvalid(
            "imap://10.0.0.1?allow_plaintext=yes", "allow_plaintext", "loopback"
        )
        self.assertInvalid(
            "imap://127.0.0.1?allow_plaintext=yes&starttls=yes", "allow_plaintext"
        )
        self.assertInvalid("imaps://127.0.0.1?allow_plaintext=yes", "allow_plaintext")
        self.assertInvalid("imap://127.0.0.1?allow_plaintext=maybe", "allow_plaintext")

    def test_starttlsOnlyForImap(self) -> None:
        """
        C{starttls=} on an C{imaps://} URL is an error naming it.
        """
        self.assertInvalid("imaps://h?starttls=yes", "starttls=")
        self.assertInvalid("imap://h?starttls=perhaps", "starttls=")

    def test_caFile(self) -> None:
        """
        C{ca_file=} must name a readable PEM file of certificates.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        ca = CertificateAuthority(directory)
        options = parseArgument(f"imaps://h?ca_file={ca.certificatePath}")
        self.assertEqual(options.caFile, ca.certificatePath)
        self.assertInvalid(f"imaps://h?ca_file={directory}/missing.pem", "ca_file=")
        garbage = os.path.join(directory, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        self.assertInvalid(f"imaps://h?ca_file={garbage}", "ca_file=", "PEM")
        self.assertInvalid("imaps://h?ca_file=", "ca_file=")
        self.assertInvalid(
            f"imap://127.0.0.1?allow_plaintext=yes&ca_file={ca.certificatePath}",
            "ca_file=",
        )

    def test_unknownAndRepeatedOptions(self) -> None:
        """
        Unknown options and options given twice are errors naming them.
        """
        self.assertInvalid("imaps://h?port=1", "unknown option port=")
        self.assertInvalid("imaps://h?timeout=1&timeout=2", "timeout=", "twice")
        self.assertInvalid("imaps://h?timeout", "name=value")

    def test_badURLs(self) -> None:
        """
        Other schemes, no host, a path, a fragment, a bad port, or a user
        name and password in the URL are refused.
        """
        self.assertInvalid("", "requires the URL")
        self.assertInvalid("   ", "requires the URL")
        self.assertInvalid("mail.example.org", "imaps://")
        self.assertInvalid("pop3s://mail.example.org", "imaps://")
        self.assertInvalid("imaps://", "no host")
        self.assertInvalid("imaps://h/INBOX", "no path")
        self.assertInvalid("imaps://h#x", "fragment")
        self.assertInvalid("imaps://h:99999", "port")
        self.assertInvalid("imaps://h:0", "port")
        message = self.assertInvalid("imaps://admin:s3cret@h", "user name or password")
        self.assertNotIn("s3cret", message)


class LoginLinesTests(SynchronousTestCase):
    """
    Tests for L{loginLines}: how C{LOGIN}'s arguments are written.
    """

    def test_quoted(self) -> None:
        """
        ASCII values are quoted strings, with C{\\} and C{"} escaped.
        """
        self.assertEqual(loginLines(b"alice", b"wonderland"), [b'"alice" "wonderland"'])
        self.assertEqual(
            loginLines(b'a"b', b"c\\d {3} %*()"), [b'"a\\"b" "c\\\\d {3} %*()"']
        )
        self.assertEqual(loginLines(b"", b""), [b'"" ""'])

    def test_literalPassword(self) -> None:
        """
        A password with 8-bit characters, CR or LF is a synchronizing
        literal, sent after the server's continuation.
        """
        self.assertEqual(
            loginLines(b"alice", "gr\u00fc\u00dfe".encode()),
            [b'"alice" {7}', "gr\u00fc\u00dfe".encode()],
        )
        self.assertEqual(loginLines(b"alice", b"a\r\nb"), [b'"alice" {4}', b"a\r\nb"])

    def test_literalUser(self) -> None:
        """
        A user name that needs a literal comes first, then the password.
        """
        user = "d\u00f6rte".encode()
        self.assertEqual(loginLines(user, b"pw"), [b"{6}", user + b' "pw"'])
        self.assertEqual(loginLines(user, b"\xff"), [b"{6}", user + b" {1}", b"\xff"])

    def test_long(self) -> None:
        """
        A value over 1000 bytes goes as a literal.
        """
        self.assertEqual(loginLines(b"u", b"x" * 1001)[0], b'"u" {1001}')


class LoginCacheTests(SynchronousTestCase):
    """
    Tests for L{LoginCache}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = LoginCache(60, self.clock.seconds)

    def test_hit(self) -> None:
        """
        A stored login is found with the same password, not another one,
        nor for another user.
        """
        self.cache.store("alice", b"wonderland")
        self.assertTrue(self.cache.check("alice", b"wonderland"))
        self.assertFalse(self.cache.check("alice", b"wonderlan"))
        self.assertFalse(self.cache.check("bob", b"wonderland"))

    def test_expiry(self) -> None:
        """
        An entry lasts C{ttl} seconds from the store; hits do not extend
        it, and an expired entry is removed.
        """
        self.cache.store("alice", b"wonderland")
        self.clock.advance(59)
        self.assertTrue(self.cache.check("alice", b"wonderland"))
        self.clock.advance(1)
        self.assertFalse(self.cache.check("alice", b"wonderland"))
        self.assertNotIn("alice", self.cache)

    def test_evict(self) -> None:
        """
        L{LoginCache.evict} forgets a user.
        """
        self.cache.store("alice", b"wonderland")
        self.cache.evict("alice")
        self.cache.evict("nobody")
        self.assertFalse(self.cache.check("alice", b"wonderland"))

    def test_disabled(self) -> None:
        """
        With a C{ttl} of 0 nothing is stored.
        """
        cache = LoginCache(0, self.clock.seconds)
        cache.store("alice", b"wonderland")
        self.assertEqual(len(cache), 0)
        self.assertFalse(cache.check("alice", b"wonderland"))

    def test_bounded(self) -> None:
        """
        At most C{maxEntries} are kept, the oldest dropped first.
        """
        self.cache.maxEntries = 2
        for user in ("a", "b", "c"):
            self.cache.store(user, b"pw")
        self.assertEqual(len(self.cache), 2)
        self.assertNotIn("a", self.cache)
        self.assertTrue(self.cache.check("c", b"pw"))

    def test_saltedNeverThePassword(self) -> None:
        """
        The cache holds neither the password nor its plain hash: two users
        with the same password have different entries, and no byte string
        in the cache contains the password.
        """
        password = b"correct horse battery staple"
        self.cache.store("alice", password)
        self.cache.store("bob", password)
        entries = self.cache._entries
        self.assertNotEqual(entries["alice"].digest, entries["bob"].digest)
        self.assertNotEqual(entries["alice"].salt, entries["bob"].salt)
        for blob in allBytes(self.cache):
            self.assertNotIn(password, blob)
        import hashlib

        for entry in entries.values():
            self.assertNotEqual(entry.digest, hashlib.sha256(password).digest())


def allBytes(root: object) -> list[bytes]:
    """
    Every L{bytes} and L{str} (encoded) reachable from C{root} through
    attributes, dictionaries and sequences.
    """
    found: list[bytes] = []
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, bytes):
            found.append(item)
        elif isinstance(item, str):
            found.append(item.encode("utf-8"))
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not callable(item):
            stack.extend(vars(item).values())
        elif hasattr(item, "__dataclass_fields__"):
            stack.extend(getattr(item, f) for f in item.__dataclass_fields__)
    return found


class ConversationTests(SynchronousTestCase):
    """
    Tests for L{runLogin} and L{IMAPLoginClient}, in memory: what is sent,
    and how each answer is taken.
    """

    creator = object()

    def setUp(self) -> None:
        self.client = IMAPLoginClient()
        self.transport = TLSStringTransport()
        self.client.makeConnection(self.transport)

    def login(
        self,
        user: bytes = b"alice",
        password: bytes = b"wonderland",
        starttls: bool = False,
        usePlain: bool = True,
    ) -> Deferred[bool]:
        return Deferred.fromCoroutine(
            runLogin(
                self.client,
                user,
                password,
                self.creator if starttls else None,  # type: ignore[arg-type]
                usePlain,
            )
        )

    def receive(self, *lines: bytes) -> None:
        self.client.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def test_plain(self) -> None:
        """
        With C{AUTH=PLAIN} offered, C{AUTHENTICATE PLAIN} is sent, the
        credentials only after the continuation; C{OK} is a yes.
        """
        d = self.login()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN] ready")
        self.assertEqual(self.sent(), b"0001 AUTHENTICATE PLAIN\r\n")
        self.receive(b"+ ")
        self.assertEqual(self.sent(), b"AGFsaWNlAHdvbmRlcmxhbmQ=\r\n")
        self.assertNoResult(d)
        self.receive(b"0001 OK Logged in")
        self.assertIs(self.successResultOf(d), True)

    def test_plainAsksCapabilities(self) -> None:
        """
        A greeting without capabilities makes the client ask for them.
        """
        d = self.login()
        self.receive(b"* OK [ALERT] hello")
        self.assertEqual(self.sent(), b"0001 CAPABILITY\r\n")
        self.receive(b"* CAPABILITY IMAP4rev1 auth=plain", b"0001 OK done")
        self.assertEqual(self.sent(), b"0002 AUTHENTICATE PLAIN\r\n")
        self.receive(b"+ ", b"0002 OK Logged in")
        self.assertIs(self.successResultOf(d), True)

    def test_loginQuoted(self) -> None:
        """
        Without C{AUTH=PLAIN}, C{LOGIN} with quoted strings.
        """
        d = self.login(b"al\\ice", b'won"der land', usePlain=False)
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready")
        self.assertEqual(self.sent(), b'0001 LOGIN "al\\\\ice" "won\\"der land"\r\n')
        self.receive(b"0001 OK Logged in")
        self.assertIs(self.successResultOf(d), True)

    def test_loginLiteral(self) -> None:
        """
        A non-ASCII password goes as a literal, only after the server's
        continuation request.
        """
        password = "gr\u00fc\u00dfe".encode()
        d = self.login(b"alice", password)
        self.receive(b"* OK [CAPABILITY IMAP4rev1] ready")
        self.assertEqual(self.sent(), b'0001 LOGIN "alice" {7}\r\n')
        self.receive(b"+ OK")
        self.assertEqual(self.sent(), password + b"\r\n")
        self.receive(b"0001 NO [AUTHENTICATIONFAILED] Authentication failed.")
        self.assertIs(self.successResultOf(d), False)

    def test_wrongPassword(self) -> None:
        """
        C{NO} with C{[AUTHENTICATIONFAILED]}, another credentials code, or
        none at all, is a no.
        """
        for answer in (
            b"NO [AUTHENTICATIONFAILED] Authentication failed.",
            b"NO Login failed",
            b"NO [EXPIRED] Password expired",
        ):
            self.setUp()
            d = self.login()
            self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready", b"+ ")
            self.receive(b"0001 " + answer)
            self.assertIs(self.successResultOf(d), False, answer)

    def test_temporaryFailure(self) -> None:
        """
        C{NO [UNAVAILABLE]} (and the other RFC 5530 codes that say nothing
        about the password), C{NO [REFERRAL ...]} and C{BAD} are errors,
        not a no.
        """
        for answer in (
            b"NO [UNAVAILABLE] Temporary authentication failure.",
            b"NO [SERVERBUG] oops",
            b"NO [LIMIT] too many connections",
            b"NO [REFERRAL imap://other.example.org/] try there",
            b"BAD Error in IMAP command",
        ):
            self.setUp()
            d = self.login()
            self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready", b"+ ")
            self.receive(b"0001 " + answer)
            failure = self.failureResultOf(d, IMAPProtocolError)
            self.assertIn(answer.split()[0].decode(), str(failure.value))

    def test_byeGreeting(self) -> None:
        """
        A C{BYE} greeting is an error, and the connection is dropped.
        """
        d = self.login()
        self.receive(b"* BYE Too many connections")
        failure = self.failureResultOf(d, IMAPProtocolError)
        self.assertIn("BYE Too many connections", str(failure.value))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.sent(), b"")

    def test_notIMAP(self) -> None:
        """
        A greeting that is not IMAP (an SMTP server on the port) is an
        error.
        """
        d = self.login()
        self.receive(b"220 mail.example.org ESMTP")
        self.failureResultOf(d, IMAPProtocolError)
        self.assertEqual(self.sent(), b"")

    def test_preauth(self) -> None:
        """
        A C{PREAUTH} greeting (any password would do) is an error, not a
        yes.
        """
        d = self.login()
        self.receive(b"* PREAUTH [CAPABILITY IMAP4rev1] welcome")
        failure = self.failureResultOf(d, IMAPProtocolError)
        self.assertIn("PREAUTH", str(failure.value))
        self.assertEqual(self.sent(), b"")

    def test_greetingWithoutText(self) -> None:
        """
        A bare C{* OK} greeting is accepted.
        """
        d = self.login()
        self.receive(b"* OK")
        self.assertEqual(self.sent(), b"0001 CAPABILITY\r\n")
        self.receive(b"* CAPABILITY IMAP4rev1", b"0001 OK done")
        self.assertEqual(self.sent(), b'0002 LOGIN "alice" "wonderland"\r\n')
        self.receive(b"0002 OK hi")
        self.assertIs(self.successResultOf(d), True)

    def test_lostConnection(self) -> None:
        """
        A connection lost before the answer is an error, not a no.
        """
        d = self.login()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready", b"+ ")
        self.receive(b"* BYE shutting down")
        self.client.connectionLost(Failure(ConnectionError("gone")))
        self.failureResultOf(d, ConnectionError)

    def test_secondChallenge(self) -> None:
        """
        PLAIN has one step: a second challenge is cancelled with C{*}.
        """
        d = self.login()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready", b"+ ")
        self.sent()
        self.receive(b"+ more?")
        self.assertEqual(self.sent(), b"*\r\n")
        self.receive(b"0001 BAD cancelled")
        self.failureResultOf(d, IMAPProtocolError)

    def test_loginDisabled(self) -> None:
        """
        C{LOGINDISABLED} without C{AUTH=PLAIN} is an error; no password is
        sent.
        """
        d = self.login()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=GSSAPI] ready")
        self.failureResultOf(d, IMAPProtocolError)
        self.assertEqual(self.sent(), b"")

    def test_starttls(self) -> None:
        """
        With STARTTLS, nothing but C{STARTTLS} goes before TLS, and the
        capabilities are asked again after it: those from before TLS are
        not trusted.
        """
        d = self.login(starttls=True)
        self.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready")
        self.assertEqual(self.sent(), b"0001 STARTTLS\r\n")
        self.receive(b"0001 OK Begin TLS negotiation now.")
        self.assertIs(self.transport.tlsStarted, self.creator)
        self.assertEqual(self.transport.beforeTLS, b"")
        self.assertEqual(self.sent(), b"0002 CAPABILITY\r\n")
        self.receive(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN", b"0002 OK done")
        self.assertEqual(self.sent(), b"0003 AUTHENTICATE PLAIN\r\n")
        self.receive(b"+ ", b"0003 OK Logged in")
        self.assertIs(self.successResultOf(d), True)

    def test_starttlsAsksCapabilities(self) -> None:
        """
        A greeting without capabilities makes the client ask whether
        STARTTLS is offered.
        """
        d = self.login(starttls=True)
        self.receive(b"* OK ready")
        self.assertEqual(self.sent(), b"0001 CAPABILITY\r\n")
        self.receive(b"* CAPABILITY IMAP4rev1 STARTTLS", b"0001 OK done")
        self.assertEqual(self.sent(), b"0002 STARTTLS\r\n")
        self.assertNoResult(d)

    def test_starttlsNotOffered(self) -> None:
        """
        A server that does not offer STARTTLS gets no password: an error.
        """
        d = self.login(starttls=True)
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready")
        self.assertEqual(self.sent(), b"0001 CAPABILITY\r\n")
        self.receive(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN", b"0001 OK done")
        failure = self.failureResultOf(d, IMAPProtocolError)
        self.assertIn("STARTTLS", str(failure.value))
        self.assertEqual(self.sent(), b"")
        self.assertIsNone(self.transport.tlsStarted)

    def test_starttlsRefused(self) -> None:
        """
        C{NO} to STARTTLS is an error; nothing more is sent.
        """
        d = self.login(starttls=True)
        self.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready")
        self.sent()
        self.receive(b"0001 NO not now")
        self.failureResultOf(d, IMAP4Exception)
        self.assertEqual(self.sent(), b"")
        self.assertIsNone(self.transport.tlsStarted)

    def test_starttlsInjection(self) -> None:
        """
        Data after STARTTLS's C{OK} in the same packet, before the
        handshake, is refused (a man in the middle could have injected
        it): TLS is not started, nothing else is sent, the connection is
        dropped.
        """
        d = self.login(starttls=True)
        self.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready")
        self.sent()
        self.receive(
            b"0001 OK Begin TLS",
            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN",
            b"0002 OK done",
            b"+ ",
            b"0003 OK Logged in",
        )
        failure = self.failureResultOf(d, IMAPProtocolError)
        self.assertIn("after STARTTLS", str(failure.value))
        self.assertIsNone(self.transport.tlsStarted)
        self.assertEqual(self.sent(), b"")


class LocalRejectionTests(SynchronousTestCase):
    """
    Credentials that cannot be sent to an IMAP server are refused without
    a connection.
    """

    def test_refusedWithoutConnecting(self) -> None:
        """
        An empty user name or password, a NUL, or a user name that is not
        UTF-8 is a wrong password, and no connection is made.
        """
        reactor = MemoryReactorClock()
        checker = checkerFromArgument("imaps://mail.example.org", reactor=reactor)
        for username, password in (
            (b"", b"pw"),
            (b"alice", b""),
            (b"alice", b"pw\0x"),
            (b"al\0ice", b"pw"),
            (b"\xff", b"pw"),
        ):
            d = checker.requestAvatarId(UsernamePassword(username, password))
            failure = self.failureResultOf(d, UnauthorizedLogin)
            self.assertNotIsInstance(failure.value, UnknownUser)
        self.assertEqual(reactor.tcpClients, [])

    def test_interface(self) -> None:
        """
        The checker provides L{ICredentialsChecker} for
        L{IUsernamePassword}, has C{timeout} and C{close}, and its repr
        names the server.
        """
        checker = checkerFromArgument("imaps://mail.example.org?timeout=3")
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertEqual(checker.credentialInterfaces, (IUsernamePassword,))
        self.assertEqual(checker.timeout, 3.0)
        self.assertEqual(repr(checker), "<IMAPChecker imaps://mail.example.org:993>")
        self.assertEqual(ChainChecker([checker], Clock()).timeoutOf(checker), 3.0)
        self.successResultOf(checker.close())


class SilentProtocol(Protocol):
    """
    Accepts a connection and never says anything.
    """

    factory: SilentFactory

    def connectionMade(self) -> None:
        self.factory.connected.append(self)
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.lost += 1
        if self.factory.lostWaiting is not None:
            self.factory.lostWaiting.callback(None)
            self.factory.lostWaiting = None


class SilentFactory(Factory):
    """
    Makes L{SilentProtocol}s and tells when they connect and are lost.
    """

    def __init__(self) -> None:
        self.connected: list[SilentProtocol] = []
        self.waiting: list[Deferred[SilentProtocol]] = []
        self.lost = 0
        self.lostWaiting: Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol = SilentProtocol()
        protocol.factory = self
        return protocol

    def nextConnection(self) -> Deferred[SilentProtocol]:
        d: Deferred[SilentProtocol] = Deferred()
        self.waiting.append(d)
        return d

    def nextLoss(self) -> Deferred[None]:
        self.lostWaiting = Deferred()
        return self.lostWaiting


class UnreachableServerTests(TestCase):
    """
    A refused port or a server that never answers gives
    L{CheckerUnavailable}, logged without the password.
    """

    def listenSilently(self) -> tuple[SilentFactory, int]:
        from twisted.internet import reactor

        factory = SilentFactory()
        port = cast(Any, reactor).listenTCP(0, factory, interface=HOST)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def test_refused(self) -> None:
        """
        A refused connection is L{CheckerUnavailable}, logged with the
        server and without the password.
        """
        (port,) = freePorts(1)
        checker = checkerFromArgument(f"imaps://{HOST}:{port}?timeout=5")
        self.addCleanup(checker.close)
        with capturedLogs() as events:
            d = checker.requestAvatarId(credentials("alice", "hunter2-secret"))
            with self.assertRaises(CheckerUnavailable):
                await d
        log = formattedLog(events)
        self.assertIn(f"imaps://{HOST}:{port}", log)
        self.assertIn("alice", log)
        self.assertNotIn("hunter2-secret", log)

    async def test_silentServerTimesOut(self) -> None:
        """
        A server that accepts the connection and never greets: after
        C{timeout} seconds on the checker's clock the login is
        L{CheckerUnavailable} and the connection is dropped.
        """
        from twisted.internet import reactor

        factory, port = self.listenSilently()
        clock = Clock()
        for url in (
            f"imaps://{SERVER_NAME}:{port}?timeout=7",
            f"imap://{HOST}:{port}?allow_plaintext=yes&timeout=7",
            f"imap://{HOST}:{port}?starttls=yes&timeout=7",
        ):
            checker = checkerFromArgument(url, reactor=reactor, clock=clock)
            self.addCleanup(checker.close)
            connected = factory.nextConnection()
            with capturedLogs() as events:
                d = checker.requestAvatarId(credentials("alice", "hunter2-secret"))
                await connected
                self.assertNoResult(d)
                lost = factory.nextLoss()
                clock.advance(6.9)
                self.assertNoResult(d)
                clock.advance(0.1)
                failure = self.failureResultOf(d, CheckerUnavailable)
                self.assertIn("7 seconds", str(failure.value))
                await lost
            log = formattedLog(events)
            self.assertIn("no answer within 7 seconds", log)
            self.assertNotIn("hunter2-secret", log)

    async def test_chainTimeout(self) -> None:
        """
        Through L{ChainChecker}, a silent server is L{CheckerUnavailable}
        after the checker's own C{timeout}.
        """
        from twisted.internet import reactor

        factory, port = self.listenSilently()
        clock = Clock()
        checker = checkerFromArgument(
            f"imap://{HOST}:{port}?allow_plaintext=yes&timeout=3",
            reactor=reactor,
            clock=clock,
        )
        self.addCleanup(checker.close)
        chain = ChainChecker([checker], clock, timeout=100)
        connected = factory.nextConnection()
        d = chain.requestAvatarId(credentials("alice", "pw"))
        await connected
        clock.advance(3)
        self.failureResultOf(d, CheckerUnavailable)


class DovecotTests(SharedDovecotMixin, TestCase):
    """
    The checker against a real Dovecot: implicit TLS and STARTTLS, good and
    wrong passwords, awkward characters, certificates, the cache.
    """

    if skipReason is not None:
        skip = skipReason

    dovecotUsers = dict([ALICE, SPECIAL, CONTROL, DOERTE])

    def setUp(self) -> None:
        self.setUpDovecot()

    def checker(
        self, url: str | None = None, usePlain: bool = True, **kwargs: Any
    ) -> IMAPChecker:
        """
        A checker for C{url} (by default Dovecot's imaps port, trusting its
        CA), closed after the test.
        """
        if url is None:
            url = self.imaps()
        checker = IMAPChecker(parseArgument(url), usePlain=usePlain, **kwargs)
        self.addCleanup(checker.close)
        return checker

    def imaps(self, query: str = "") -> str:
        return (
            f"imaps://{SERVER_NAME}:{self.dovecot.imapsPort}"
            f"?ca_file={self.dovecot.caPath}{query}"
        )

    def starttls(self, query: str = "") -> str:
        return (
            f"imap://{SERVER_NAME}:{self.dovecot.imapPort}"
            f"?starttls=yes&ca_file={self.dovecot.caPath}{query}"
        )

    async def assertAccepted(
        self, checker: IMAPChecker, user: str, password: str
    ) -> None:
        result = await checker.requestAvatarId(credentials(user, password))
        self.assertEqual(result, user)

    async def assertRejected(
        self, checker: IMAPChecker, user: str, password: str
    ) -> None:
        with self.assertRaises(UnauthorizedLogin) as raised:
            await checker.requestAvatarId(credentials(user, password))
        self.assertNotIsInstance(raised.exception, UnknownUser)

    async def assertUnavailable(
        self, checker: IMAPChecker, user: str = ALICE[0], password: str = ALICE[1]
    ) -> str:
        with capturedLogs() as events:
            with self.assertRaises(CheckerUnavailable):
                await checker.requestAvatarId(credentials(user, password))
        log = formattedLog(events)
        self.assertNotIn(password, log)
        return log

    async def test_imaps(self) -> None:
        """
        Over implicit TLS, the right password is accepted (the user name is
        the avatar ID) and a wrong one or an unknown user is a final
        L{UnauthorizedLogin}.
        """
        checker = self.checker()
        await self.assertAccepted(checker, *ALICE)
        await self.assertRejected(checker, ALICE[0], "wrong")
        await self.assertRejected(checker, "mallory", "wrong")

    async def test_starttls(self) -> None:
        """
        Over STARTTLS, the same.
        """
        checker = self.checker(self.starttls())
        await self.assertAccepted(checker, *ALICE)
        await self.assertRejected(checker, ALICE[0], "wrong")

    async def test_loggedInOverTLS(self) -> None:
        """
        Dovecot logs each login as over TLS, and as logged out.
        """
        for url in (self.imaps(), self.starttls()):
            checker = self.checker(url)
            await self.assertAccepted(checker, *ALICE)
            await checker.close()
        log = self.dovecot.log()
        self.assertIn("Login: user=<alice>, method=PLAIN", log)
        self.assertNotIn(ALICE[1], log)

    async def test_specialCharacters(self) -> None:
        """
        Quotes, backslashes, spaces, IMAP specials and non-ASCII in the
        password, and a UTF-8 user name, work with both
        C{AUTHENTICATE PLAIN} and C{LOGIN} (quoted strings and literals).
        CR and LF in a password cannot inject a command: the server sees
        one password (which Dovecot refuses, as it refuses all control
        characters) and the answer is a clean wrong password.
        """
        for usePlain in (True, False):
            for url in (self.imaps(), self.starttls()):
                checker = self.checker(url, usePlain=usePlain)
                for user, password in (SPECIAL, DOERTE):
                    await self.assertAccepted(checker, user, password)
            # Each refusal costs half a second in Dovecot: once per way of
            # sending the password is enough.
            checker = self.checker(usePlain=usePlain)
            for user, password in (SPECIAL, DOERTE):
                await self.assertRejected(checker, user, password + "x")
            await self.assertRejected(checker, SPECIAL[0], '"')
            await self.assertRejected(checker, *CONTROL)

    async def test_allowPlaintextLoopback(self) -> None:
        """
        With C{allow_plaintext=yes}, a loopback server is used without TLS.
        """
        checker = self.checker(
            f"imap://{HOST}:{self.dovecot.imapPort}?allow_plaintext=yes"
        )
        await self.assertAccepted(checker, *ALICE)
        await self.assertRejected(checker, ALICE[0], "wrong")

    async def test_untrustedCertificate(self) -> None:
        """
        A certificate from a CA that is not trusted (the system's store, or
        another C{ca_file}) is L{CheckerUnavailable}, for implicit TLS and
        STARTTLS alike.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        other = CertificateAuthority(directory, name="another CA")
        port, tlsPort = self.dovecot.imapPort, self.dovecot.imapsPort
        for url in (
            f"imaps://{SERVER_NAME}:{tlsPort}",
            f"imap://{SERVER_NAME}:{port}?starttls=yes",
            f"imaps://{SERVER_NAME}:{tlsPort}?ca_file={other.certificatePath}",
            f"imap://{SERVER_NAME}:{port}?starttls=yes&ca_file={other.certificatePath}",
        ):
            log = await self.assertUnavailable(self.checker(url))
            self.assertIn("cannot check alice", log)

    async def test_wrongName(self) -> None:
        """
        A certificate that is not for the name connected to is
        L{CheckerUnavailable}, even from the trusted CA.
        """
        await self.assertUnavailable(
            self.checker(
                f"imaps://{HOST}:{self.dovecot.imapsPort}?ca_file={self.dovecot.caPath}"
            )
        )

    async def test_implicitTLSOnPlainPort(self) -> None:
        """
        C{imaps://} pointed at the plaintext port is L{CheckerUnavailable}.
        """
        checker = self.checker(
            f"imaps://{SERVER_NAME}:{self.dovecot.imapPort}"
            f"?ca_file={self.dovecot.caPath}&timeout=5"
        )
        await self.assertUnavailable(checker)

    async def test_cacheHit(self) -> None:
        """
        With C{cache=}, a repeated login with the same password is answered
        without connecting; another password is checked with the server.
        """
        from twisted.internet import reactor

        counting = CountingReactor(reactor)
        checker = self.checker(self.imaps("&cache=300"), reactor=counting)
        await self.assertAccepted(checker, *ALICE)
        made = len(counting.connections)
        self.assertGreater(made, 0)
        for _ in range(3):
            await self.assertAccepted(checker, *ALICE)
        self.assertEqual(len(counting.connections), made)
        await self.assertRejected(checker, ALICE[0], "guess")
        self.assertGreater(len(counting.connections), made)

    async def test_noCacheByDefault(self) -> None:
        """
        Without C{cache=}, every login connects.
        """
        from twisted.internet import reactor

        counting = CountingReactor(reactor)
        checker = self.checker(reactor=counting)
        await self.assertAccepted(checker, *ALICE)
        made = len(counting.connections)
        await self.assertAccepted(checker, *ALICE)
        self.assertGreater(len(counting.connections), made)
        self.assertEqual(len(checker.cache), 0)

    async def test_cacheExpiry(self) -> None:
        """
        A cached login expires after C{cache} seconds on the checker's
        clock; then the server is asked again.
        """
        from twisted.internet import reactor

        counting = CountingReactor(reactor)
        clock = Clock()
        checker = self.checker(self.imaps("&cache=60"), reactor=counting, clock=clock)
        await self.assertAccepted(checker, *ALICE)
        made = len(counting.connections)
        clock.advance(59)
        await self.assertAccepted(checker, *ALICE)
        self.assertEqual(len(counting.connections), made)
        clock.advance(1)
        await self.assertAccepted(checker, *ALICE)
        self.assertGreater(len(counting.connections), made)

    async def test_wrongPasswordEvicts(self) -> None:
        """
        A login the server refuses removes the user's cache entry, so the
        old password is checked with the server again.
        """
        from twisted.internet import reactor

        counting = CountingReactor(reactor)
        checker = self.checker(self.imaps("&cache=300"), reactor=counting)
        await self.assertAccepted(checker, *ALICE)
        self.assertIn(ALICE[0], checker.cache)
        await self.assertRejected(checker, ALICE[0], "guess")
        self.assertNotIn(ALICE[0], checker.cache)
        made = len(counting.connections)
        await self.assertAccepted(checker, *ALICE)
        self.assertGreater(len(counting.connections), made)

    async def test_cacheNeverStoresPassword(self) -> None:
        """
        After successful logins, nothing reachable from the checker (its
        cache included) holds a password.
        """
        checker = self.checker(self.imaps("&cache=300"))
        for user, password in (ALICE, SPECIAL, DOERTE):
            await self.assertAccepted(checker, user, password)
        self.assertEqual(len(checker.cache), 3)
        blobs = allBytes(checker.cache) + allBytes(checker.options)
        for _, password in (ALICE, SPECIAL, DOERTE):
            for blob in blobs:
                self.assertNotIn(password.encode("utf-8"), blob)

    async def test_unavailableAfterStop(self) -> None:
        """
        A cached login is still answered from the cache when the server is
        down; any other login is L{CheckerUnavailable}.  (Runs against a
        second Dovecot so the shared one stays up.)
        """
        from tests.dovecot_support import DovecotProcess

        server = DovecotProcess(dict([ALICE]))
        self.addCleanup(server.remove)
        server.start()
        checker = self.checker(
            f"imaps://{SERVER_NAME}:{server.imapsPort}"
            f"?ca_file={server.caPath}&cache=300&timeout=5"
        )
        await self.assertAccepted(checker, *ALICE)
        await checker.close()
        server.stop()
        await self.assertAccepted(checker, *ALICE)
        await self.assertUnavailable(checker, ALICE[0], "another password")

    async def test_throughChain(self) -> None:
        """
        Through L{ChainChecker}: accepted, wrong password final, and a dead
        server L{CheckerUnavailable}.
        """
        from twisted.internet import reactor

        checker = self.checker()
        chain = ChainChecker([checker], reactor)
        self.assertEqual(await chain.requestAvatarId(credentials(*ALICE)), ALICE[0])
        with self.assertRaises(UnauthorizedLogin):
            await chain.requestAvatarId(credentials(ALICE[0], "wrong"))
        (port,) = freePorts(1)
        dead = self.checker(f"imaps://{SERVER_NAME}:{port}?timeout=5")
        with self.assertRaises(CheckerUnavailable):
            await ChainChecker([dead], reactor).requestAvatarId(credentials(*ALICE))


class IMAPPluginTests(SynchronousTestCase):
    """
    Tests for the C{imap} strcred plugin.
    """

    def test_found(self) -> None:
        """
        strcred finds the plugin by its name, and it provides
        L{ICheckerFactory} and L{IPlugin}.
        """
        assertCheckerFactory(self, "imap", "imaps://", ["IUsernamePassword"])

    def test_generateChecker(self) -> None:
        """
        C{--auth imap:URL} gives an L{IMAPChecker} for the server.
        """
        checker = makeChecker("imap:imaps://mail.example.org?timeout=4&cache=60")
        self.assertIsInstance(checker, IMAPChecker)
        assert isinstance(checker, IMAPChecker)
        self.assertEqual(checker.options.host, "mail.example.org")
        self.assertEqual(checker.timeout, 4.0)
        self.assertEqual(checker.cache.ttl, 60.0)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))

    def test_invalid(self) -> None:
        """
        An invalid argument is a L{ValueError} naming the problem.
        """
        factory = findCheckerFactory("imap")
        error = self.assertRaises(ValueError, factory.generateChecker, "")
        self.assertIn("requires the URL", str(error))
        error = self.assertRaises(
            ValueError, factory.generateChecker, "imaps://h?cache=soon"
        )
        self.assertIn("cache=", str(error))

    def test_thin(self) -> None:
        """
        Importing the plugin file (as every twistd run does) imports neither
        the checker, twisted.mail.imap4, TLS, nor the reactor.
        """
        imported = pluginImports(
            "smtpauth_relay_imap",
            [
                "smtpauth_relay.imapchecker",
                "twisted.mail.imap4",
                "OpenSSL",
                "twisted.internet.reactor",
            ],
        )
        self.assertEqual(imported, [])

    def test_noReactorInstalled(self) -> None:
        """
        Making a checker (as C{check-config} does) does not import the
        global reactor.
        """
        output = checkerMadeAlone("imap:imaps://mail.example.org?cache=60")
        self.assertEqual(output, "IMAPChecker False")


class IMAPSContractTests(SharedDovecotMixin, CheckerContractMixin, TestCase):
    """
    The operator kit's contract, against Dovecot over implicit TLS.
    """

    if skipReason is not None:
        skip = skipReason

    authType = "imap"
    validUser = ALICE
    distinguishesUnknownUsers = False
    dovecotUsers = dict([ALICE])

    def setUp(self) -> None:
        self.setUpDovecot()

    def checkerArgument(self) -> str:
        return (
            f"imaps://{SERVER_NAME}:{self.dovecot.imapsPort}"
            f"?ca_file={self.dovecot.caPath}&timeout=10"
        )

    def unavailableArgument(self) -> str:
        (port,) = freePorts(1)
        return f"imaps://{SERVER_NAME}:{port}?ca_file={self.dovecot.caPath}&timeout=5"


class STARTTLSContractTests(IMAPSContractTests):
    """
    The operator kit's contract, against Dovecot with STARTTLS.
    """

    def checkerArgument(self) -> str:
        return (
            f"imap://{SERVER_NAME}:{self.dovecot.imapPort}"
            f"?starttls=yes&ca_file={self.dovecot.caPath}"
        )

    def unavailableArgument(self) -> str:
        (port,) = freePorts(1)
        return f"imap://{SERVER_NAME}:{port}?starttls=yes&timeout=5"
