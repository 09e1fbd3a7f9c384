"""
Tests for L{smtpauth_relay.server}: the ESMTP session, driven in memory with
a string transport, a memory spool and a clock.
"""

from __future__ import annotations

import base64
import hmac
import os
import tempfile
from email.utils import formatdate
from typing import Any

from scramp import ScramClient
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay.auth import makePortal
from smtpauth_relay.checkers import HtpasswdChecker
from smtpauth_relay.config import LimitsConfig, LockoutConfig
from smtpauth_relay.errors import CheckerUnavailable, SpoolError
from smtpauth_relay.htpasswd import setUser
from smtpauth_relay.interfaces import ISASLMechanisms, IScramCredentials, IScramStore
from smtpauth_relay.passwords import (
    CRAM_MD5,
    SCRAM_SHA_256,
    ScramSecrets,
    hashPassword,
    scramSecrets,
)
from smtpauth_relay.senders import SenderLoginMap
from smtpauth_relay.testing import TLSStringTransport, spoolFull
from tests.support import CONTEXT, Harness, Session, b64, plain


def authenticated(harness: Harness, peer: str = "192.0.2.10") -> Session:
    """
    A session that did STARTTLS, EHLO and AUTH as alice.
    """
    session = harness.connect(peer)
    session.startTLS()
    assert session.login() == b"235 2.7.0 Authentication successful"
    return session


def transaction(session: Session, *recipients: bytes) -> None:
    assert session.last(b"MAIL FROM:<alice@example.org>").startswith(b"250 2.1.0")
    for r in recipients or (b"bob@example.net",):
        assert session.last(b"RCPT TO:<" + r + b">").startswith(b"250 2.1.5")
    assert session.last(b"DATA").startswith(b"354")


class GreetingTests(SynchronousTestCase):
    def test_greeting(self) -> None:
        """
        The server greets with 220, its hostname and no enhanced code.
        """
        session = Harness().connect()
        self.assertEqual(
            session.greeting, [b"220 relay.example.org ESMTP smtpauth-relay"]
        )

    def test_ehloBeforeTLS(self) -> None:
        """
        Before TLS on a STARTTLS listener with require_tls, EHLO offers
        PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES and STARTTLS, but
        not AUTH.
        """
        session = Harness().connect()
        self.assertEqual(
            session.command(b"EHLO client.example"),
            [
                b"250-relay.example.org Hello client.example [192.0.2.10]",
                b"250-PIPELINING",
                b"250-SIZE 26214400",
                b"250-8BITMIME",
                b"250-ENHANCEDSTATUSCODES",
                b"250 STARTTLS",
            ],
        )

    def test_ehloAfterTLS(self) -> None:
        """
        After STARTTLS, EHLO offers AUTH with the configured mechanisms and
        no longer STARTTLS.
        """
        session = Harness().connect()
        session.startTLS()
        lines = session.command(b"EHLO client.example")
        self.assertEqual(lines[-1], b"250 AUTH PLAIN LOGIN")
        self.assertNotIn(b"250-STARTTLS", lines)

    def test_implicitTLS(self) -> None:
        """
        On an implicit-TLS listener the session is secure from the start:
        AUTH is offered at once, STARTTLS never.
        """
        session = Harness(tlsMode="implicit").connect()
        lines = session.command(b"EHLO client.example")
        self.assertEqual(lines[-1], b"250 AUTH PLAIN LOGIN")
        self.assertNotIn(b"250-STARTTLS", lines)
        self.assertEqual(session.last(b"STARTTLS"), b"503 5.5.1 TLS already active")

    def test_plainListener(self) -> None:
        """
        On a listener without TLS and with require_tls, neither STARTTLS nor
        AUTH is offered and STARTTLS is not implemented.
        """
        session = Harness(tlsMode="none").connect()
        lines = session.command(b"EHLO client.example")
        self.assertEqual(lines[-1], b"250 ENHANCEDSTATUSCODES")
        self.assertEqual(
            session.last(b"STARTTLS"), b"502 5.5.1 Command not implemented"
        )

    def test_authOfferedWithoutTLSWhenAllowed(self) -> None:
        """
        With require_tls off, AUTH is offered before TLS.
        """
        session = Harness(requireTLS=False).connect()
        lines = session.command(b"EHLO client.example")
        self.assertIn(b"250 AUTH PLAIN LOGIN", lines)
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"235 2.7.0 Authentication successful",
        )

    def test_helo(self) -> None:
        """
        HELO gets a one-line 250 without extensions.
        """
        session = Harness().connect()
        self.assertEqual(
            session.command(b"HELO client.example"),
            [b"250 relay.example.org Hello client.example [192.0.2.10]"],
        )

    def test_heloNeedsArgument(self) -> None:
        """
        EHLO without a domain is a syntax error.
        """
        session = Harness().connect()
        self.assertEqual(
            session.last(b"EHLO"),
            b"501 5.5.4 Syntax error in parameters or arguments",
        )


class SimpleCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.session = Harness().connect()
        self.session.command(b"EHLO client.example")

    def test_unknownCommand(self) -> None:
        """
        An unknown command gets 500 5.5.1.
        """
        self.assertEqual(self.session.last(b"FROB"), b"500 5.5.1 Command unrecognized")

    def test_twistedInternalCommandNames(self) -> None:
        """
        Names of Twisted's internal handlers (C{do_UNKNOWN}) are unknown
        commands like any other, with an enhanced code.
        """
        self.assertEqual(
            self.session.last(b"UNKNOWN"), b"500 5.5.1 Command unrecognized"
        )

    def test_nonASCIICommand(self) -> None:
        """
        A command with non-ASCII octets is unknown, not a crash.
        """
        self.assertEqual(
            self.session.last("MAÏL".encode()), b"500 5.5.1 Command unrecognized"
        )

    def test_emptyLine(self) -> None:
        """
        An empty command line is a syntax error.
        """
        self.assertEqual(
            self.session.last(b""), b"501 5.5.4 Syntax error in parameters or arguments"
        )

    def test_vrfy(self) -> None:
        """
        VRFY gets 252: no verification, as RFC 5321 allows.
        """
        self.assertTrue(self.session.last(b"VRFY alice").startswith(b"252 2.5.0 "))

    def test_expn(self) -> None:
        """
        EXPN gets 502 5.5.1.
        """
        self.assertTrue(self.session.last(b"EXPN staff").startswith(b"502 5.5.1 "))

    def test_noopRsetHelpQuit(self) -> None:
        """
        NOOP and RSET get 250 2.0.0, HELP 214 2.0.0, QUIT 221 2.0.0 and the
        connection closes.
        """
        self.assertEqual(self.session.last(b"NOOP"), b"250 2.0.0 Ok")
        self.assertEqual(self.session.last(b"RSET"), b"250 2.0.0 Ok")
        self.assertTrue(self.session.last(b"HELP").startswith(b"214 2.0.0 "))
        self.assertEqual(self.session.last(b"QUIT"), b"221 2.0.0 Bye")
        self.assertTrue(self.session.closed())

    def test_lowerCaseCommands(self) -> None:
        """
        Commands are case-insensitive.
        """
        self.assertEqual(self.session.last(b"noop"), b"250 2.0.0 Ok")

    def test_bareLFCommands(self) -> None:
        """
        Commands ended by a bare LF are accepted, as most servers do.
        """
        self.assertEqual(self.session.send(b"NOOP\n"), [b"250 2.0.0 Ok"])

    def test_commandLineTooLong(self) -> None:
        """
        A command line over 512 octets gets 500 5.5.2 and the session goes
        on.
        """
        self.assertEqual(
            self.session.last(b"NOOP " + b"x" * 600), b"500 5.5.2 Line too long"
        )
        self.assertEqual(self.session.last(b"NOOP"), b"250 2.0.0 Ok")

    def test_commandLineLimitExact(self) -> None:
        """
        A command line of exactly 512 octets with CRLF is accepted.
        """
        line = b"NOOP " + b"x" * (510 - 5)
        self.assertEqual(len(line) + 2, 512)
        self.assertEqual(self.session.last(line), b"250 2.0.0 Ok")
        self.assertEqual(self.session.last(line + b"x"), b"500 5.5.2 Line too long")

    def test_unterminatedHugeLine(self) -> None:
        """
        Megabytes without a line ending are not buffered: one 500 5.5.2, the
        rest of the line is discarded, and the session goes on.
        """
        replies = []
        for _ in range(100):
            replies += self.session.send(b"x" * 20000)
        self.assertEqual(replies, [b"500 5.5.2 Line too long"])
        self.assertLess(len(self.session.protocol._buffer), 20001)
        self.assertEqual(self.session.send(b"\r\nNOOP\r\n"), [b"250 2.0.0 Ok"])

    def test_tooManyErrors(self) -> None:
        """
        After 20 errors the server gives 421 4.7.0 and closes the session.
        """
        for _ in range(19):
            self.session.command(b"FROB")
        self.assertFalse(self.session.closed())
        self.assertEqual(
            self.session.command(b"FROB"),
            [
                b"500 5.5.1 Command unrecognized",
                b"421 4.7.0 Too many errors; closing connection",
            ],
        )
        self.assertTrue(self.session.closed())

    def test_httpRequest(self) -> None:
        """
        An HTTP request on the SMTP port closes the connection at once.
        """
        session = Harness().connect()
        session.send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.assertTrue(session.closed())

    def test_tlsHandshakeOnPlainPort(self) -> None:
        """
        A TLS ClientHello on a plaintext session closes the connection.
        """
        session = Harness().connect()
        session.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertTrue(session.closed())


class StartTLSTests(SynchronousTestCase):
    def test_startTLS(self) -> None:
        """
        STARTTLS answers 220 2.0.0 and switches the transport to TLS with the
        listener's context factory.
        """
        session = Harness().connect()
        session.startTLS()
        self.assertIs(session.transport.tlsStarted, CONTEXT)

    def test_pipelinedAfterSTARTTLSDropped(self) -> None:
        """
        Commands sent in the same packet after STARTTLS are dropped, not
        answered inside the TLS session (RFC 3207, CVE-2011-0411).
        """
        session = Harness(requireTLS=False).connect()
        session.command(b"EHLO client.example")
        session.send(
            b"STARTTLS\r\nAUTH PLAIN " + plain("alice", "wonderland") + b"\r\n"
        )
        self.assertEqual(
            session.transport.beforeTLS, b"220 2.0.0 Ready to start TLS\r\n"
        )
        self.assertEqual(session.read(), [])
        self.assertEqual(session.protocol._submitter, None)

    def test_heloForgottenAfterSTARTTLS(self) -> None:
        """
        After STARTTLS the client must EHLO again: MAIL before it gets
        503 5.5.1.
        """
        session = Harness().connect()
        session.startTLS()
        self.assertEqual(
            session.last(b"MAIL FROM:<alice@example.org>"),
            b"503 5.5.1 Send EHLO or HELO first",
        )

    def test_startTLSWithArgument(self) -> None:
        """
        STARTTLS takes no argument (501 5.5.4).
        """
        session = Harness().connect()
        session.command(b"EHLO client.example")
        self.assertEqual(
            session.last(b"STARTTLS now"),
            b"501 5.5.4 Syntax error in parameters or arguments",
        )

    def test_startTLSTwice(self) -> None:
        """
        STARTTLS inside TLS gets 503 5.5.1.
        """
        session = Harness().connect()
        session.startTLS()
        self.assertEqual(session.last(b"STARTTLS"), b"503 5.5.1 TLS already active")


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = Harness()
        self.session = self.harness.connect()

    def secure(self) -> Session:
        self.session.startTLS()
        self.session.command(b"EHLO client.example")
        return self.session

    def test_authBeforeTLS(self) -> None:
        """
        AUTH before TLS gets 538 5.7.11 and the checker is never asked.
        """
        self.session.command(b"EHLO client.example")
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"538 5.7.11 Encryption required for requested authentication mechanism",
        )
        self.assertEqual(self.harness.checker.asked, [])

    def test_mailWithoutAuth(self) -> None:
        """
        MAIL without AUTH from an untrusted client gets 530 5.7.0.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"MAIL FROM:<alice@example.org>"),
            b"530 5.7.0 Authentication required",
        )

    def test_plainGood(self) -> None:
        """
        AUTH PLAIN with the right password gets 235 2.7.0.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"235 2.7.0 Authentication successful",
        )
        self.assertEqual(self.session.protocol._submitter.username, "alice")
        self.assertEqual(self.session.protocol._submitter.mechanism, "PLAIN")
        self.assertTrue(self.session.protocol._submitter.tls)

    def test_plainWrongPassword(self) -> None:
        """
        A wrong password gets 535 5.7.8.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("alice", "rabbit")),
            b"535 5.7.8 Authentication credentials invalid",
        )

    def test_plainUnknownUser(self) -> None:
        """
        An unknown user gets the same 535 5.7.8 as a wrong password.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("mallory", "x")),
            b"535 5.7.8 Authentication credentials invalid",
        )

    def test_checkerUnavailable(self) -> None:
        """
        A checker that cannot answer gives 454 4.7.0, not 535.
        """
        self.harness.checker.unavailable = True
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"454 4.7.0 Temporary authentication failure",
        )

    def test_plainChallenge(self) -> None:
        """
        AUTH PLAIN without initial response gets an empty 334 challenge,
        then the response is checked.
        """
        self.secure()
        self.assertEqual(self.session.command(b"AUTH PLAIN"), [b"334 "])
        self.assertEqual(
            self.session.last(plain("alice", "wonderland")),
            b"235 2.7.0 Authentication successful",
        )

    def test_authorizationIdentityRefused(self) -> None:
        """
        AUTH PLAIN with an authorization identity other than the user is
        refused with 535 5.7.8 even with the right password.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("alice", "wonderland", "bob")),
            b"535 5.7.8 Authentication credentials invalid",
        )
        self.assertEqual(self.harness.checker.asked, [])

    def test_authorizationIdentitySame(self) -> None:
        """
        An authorization identity equal to the user is accepted.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("alice", "wonderland", "alice")),
            b"235 2.7.0 Authentication successful",
        )

    def test_login(self) -> None:
        """
        AUTH LOGIN asks Username: and Password: (base64) and logs in.
        """
        self.secure()
        self.assertEqual(self.session.command(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(self.session.command(b64("alice")), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(
            self.session.last(b64("wonderland")), b"235 2.7.0 Authentication successful"
        )

    def test_loginInitialResponse(self) -> None:
        """
        AUTH LOGIN with the user name as initial response asks for the
        password only.
        """
        self.secure()
        self.assertEqual(
            self.session.command(b"AUTH LOGIN " + b64("alice")), [b"334 UGFzc3dvcmQ6"]
        )
        self.assertEqual(
            self.session.last(b64("wonderland")), b"235 2.7.0 Authentication successful"
        )

    def test_authTwice(self) -> None:
        """
        A second AUTH gets 503 5.5.1.
        """
        self.secure()
        self.session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("bob", "builder")),
            b"503 5.5.1 Already authenticated",
        )

    def test_authInTransaction(self) -> None:
        """
        AUTH during a mail transaction gets 503 5.5.1.
        """
        harness = Harness(trustedNetworks=("192.0.2.0/24",))
        session = harness.connect()
        session.startTLS()
        session.command(b"EHLO client.example")
        session.command(b"MAIL FROM:<alice@example.org>")
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"503 5.5.1 AUTH not permitted during a mail transaction",
        )

    def test_unknownMechanism(self) -> None:
        """
        An unknown or unoffered mechanism gets 504 5.5.4.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH CRAM-MD5"),
            b"504 5.5.4 Unrecognized authentication type",
        )

    def test_mechanismNotConfigured(self) -> None:
        """
        A mechanism the configuration leaves out is refused like an unknown
        one, and not advertised.
        """
        session = Harness(mechanisms=("PLAIN",)).connect()
        session.startTLS()
        self.assertIn(b"250 AUTH PLAIN", session.command(b"EHLO client.example"))
        self.assertEqual(
            session.last(b"AUTH LOGIN"), b"504 5.5.4 Unrecognized authentication type"
        )

    def test_badBase64(self) -> None:
        """
        A response that is not base64 gets 501 5.5.2.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN !!!notbase64"),
            b"501 5.5.2 Cannot decode response",
        )
        self.session.command(b"AUTH LOGIN")
        self.assertEqual(self.session.last(b"%%%"), b"501 5.5.2 Cannot decode response")

    def test_malformedPlain(self) -> None:
        """
        A PLAIN response without its three fields gets 501 5.5.2.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + b64("alice")),
            b"501 5.5.2 Cannot decode response",
        )

    def test_abort(self) -> None:
        """
        A C{*} response aborts the exchange with 501 5.7.0.
        """
        self.secure()
        self.session.command(b"AUTH LOGIN")
        self.assertEqual(self.session.last(b"*"), b"501 5.7.0 Authentication aborted")
        self.assertEqual(self.session.last(b"NOOP"), b"250 2.0.0 Ok")

    def test_authWithoutMechanism(self) -> None:
        """
        AUTH without a mechanism is a syntax error.
        """
        self.secure()
        self.assertEqual(
            self.session.last(b"AUTH"),
            b"501 5.5.4 Syntax error in parameters or arguments",
        )

    def test_authLineAllowance(self) -> None:
        """
        AUTH lines may be up to 12,288 octets (RFC 4954); longer ones get
        500 5.5.2.
        """
        self.secure()
        long = b64("alice\0" * 1000)
        self.assertLess(512, len(long))
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + long),
            b"501 5.5.2 Cannot decode response",
        )
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + b"A" * 13000), b"500 5.5.2 Line too long"
        )

    def test_pipelinedAfterAuthWaits(self) -> None:
        """
        Commands pipelined after AUTH wait for the password check, so MAIL
        is judged as an authenticated command and replies stay in order.
        """
        self.secure()
        self.harness.checker.pending = []
        self.assertEqual(
            self.session.send(
                b"AUTH PLAIN "
                + plain("alice", "wonderland")
                + b"\r\nMAIL FROM:<alice@example.org>\r\n"
            ),
            [],
        )
        self.harness.checker.pending[0].callback(b"alice")
        self.assertEqual(
            self.session.read(),
            [b"235 2.7.0 Authentication successful", b"250 2.1.0 Sender ok"],
        )

    def test_transportPausedDuringCheck(self) -> None:
        """
        While a password is being checked the transport is paused, so a
        client cannot make the server buffer without bound.
        """
        self.secure()
        self.harness.checker.pending = []
        self.session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        self.assertEqual(self.session.transport.producerState, "paused")
        self.harness.checker.pending[0].callback(b"alice")
        self.assertEqual(self.session.transport.producerState, "producing")


class MailTransactionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = Harness(maxMessageSize=1000, maxRecipients=3)
        self.session = authenticated(self.harness)

    def test_mailBeforeEhlo(self) -> None:
        """
        MAIL before EHLO/HELO gets 503 5.5.1.
        """
        session = Harness(trustedNetworks=("192.0.2.0/24",)).connect()
        self.assertEqual(
            session.last(b"MAIL FROM:<a@example.org>"),
            b"503 5.5.1 Send EHLO or HELO first",
        )

    def test_mailAccepted(self) -> None:
        """
        MAIL after AUTH gets 250 2.1.0, RCPT 250 2.1.5.
        """
        self.assertEqual(
            self.session.last(b"MAIL FROM:<alice@example.org>"), b"250 2.1.0 Sender ok"
        )
        self.assertEqual(
            self.session.last(b"RCPT TO:<bob@example.net>"), b"250 2.1.5 Recipient ok"
        )

    def test_nullSender(self) -> None:
        """
        The null reverse-path C{<>} is accepted.
        """
        self.assertEqual(self.session.last(b"MAIL FROM:<>"), b"250 2.1.0 Sender ok")

    def test_spaceAfterColon(self) -> None:
        """
        C{MAIL FROM: <addr>} with a space, as some clients send, is accepted.
        """
        self.assertEqual(
            self.session.last(b"MAIL FROM: <alice@example.org>"),
            b"250 2.1.0 Sender ok",
        )

    def test_nestedMail(self) -> None:
        """
        A second MAIL in a transaction gets 503 5.5.1.
        """
        self.session.command(b"MAIL FROM:<alice@example.org>")
        self.assertEqual(
            self.session.last(b"MAIL FROM:<alice@example.org>"),
            b"503 5.5.1 Sender already specified",
        )

    def test_rcptWithoutMail(self) -> None:
        """
        RCPT before MAIL gets 503 5.5.1.
        """
        self.assertEqual(
            self.session.last(b"RCPT TO:<bob@example.net>"),
            b"503 5.5.1 Need MAIL before RCPT",
        )

    def test_badSender(self) -> None:
        """
        A malformed sender gets 501 5.1.7.
        """
        self.assertTrue(
            self.session.last(b"MAIL FROM:<not an address>").startswith(b"501 5.1.7 ")
        )
        self.assertTrue(
            self.session.last(b"MAIL FROM:alice@example.org").startswith(b"501 5.1.7 ")
        )

    def test_badRecipient(self) -> None:
        """
        A malformed recipient gets 501 5.1.3; the null path is not a
        recipient.
        """
        self.session.command(b"MAIL FROM:<alice@example.org>")
        self.assertTrue(self.session.last(b"RCPT TO:<bob@>").startswith(b"501 5.1.3 "))
        self.assertTrue(self.session.last(b"RCPT TO:<>").startswith(b"501 5.1.3 "))

    def test_declaredSizeTooBig(self) -> None:
        """
        MAIL with SIZE over the limit gets 552 5.3.4.
        """
        self.assertEqual(
            self.session.last(b"MAIL FROM:<alice@example.org> SIZE=1001"),
            b"552 5.3.4 Message size exceeds fixed maximum message size",
        )
        self.assertEqual(
            self.session.last(b"MAIL FROM:<alice@example.org> SIZE=1000"),
            b"250 2.1.0 Sender ok",
        )

    def test_mailParameters(self) -> None:
        """
        BODY=8BITMIME and AUTH=<> are accepted; an unknown parameter gets
        555 5.5.4; a bad BODY value 501 5.5.4.
        """
        self.assertEqual(
            self.session.last(b"MAIL FROM:<alice@example.org> BODY=8BITMIME AUTH=<>"),
            b"250 2.1.0 Sender ok",
        )
        self.session.command(b"RSET")
        self.assertTrue(
            self.session.last(b"MAIL FROM:<alice@example.org> RET=HDRS").startswith(
                b"555 5.5.4 "
            )
        )
        self.assertTrue(
            self.session.last(
                b"MAIL FROM:<alice@example.org> BODY=BINARYMIME"
            ).startswith(b"501 5.5.4 ")
        )

    def test_rcptParameter(self) -> None:
        """
        RCPT parameters (DSN's NOTIFY is not offered) get 555 5.5.4.
        """
        self.session.command(b"MAIL FROM:<alice@example.org>")
        self.assertTrue(
            self.session.last(b"RCPT TO:<bob@example.net> NOTIFY=NEVER").startswith(
                b"555 5.5.4 "
            )
        )

    def test_mailLineAllowance(self) -> None:
        """
        A MAIL line with SIZE= and a long AUTH= may exceed 512 octets.
        """
        line = b"MAIL FROM:<alice@example.org> SIZE=100 AUTH=" + b"a" * 480
        self.assertLess(512, len(line) + 2)
        self.assertEqual(self.session.last(line), b"250 2.1.0 Sender ok")

    def test_tooManyRecipients(self) -> None:
        """
        RCPT beyond max_recipients gets 452 4.5.3 and the others stay.
        """
        self.session.command(b"MAIL FROM:<alice@example.org>")
        for i in range(3):
            self.session.command(b"RCPT TO:<r%d@example.net>" % i)
        self.assertEqual(
            self.session.last(b"RCPT TO:<r3@example.net>"),
            b"452 4.5.3 Too many recipients",
        )
        self.assertEqual(len(self.session.protocol._recipients), 3)

    def test_dataWithoutMail(self) -> None:
        """
        DATA without MAIL gets 503 5.5.1.
        """
        self.assertTrue(self.session.last(b"DATA").startswith(b"503 5.5.1 "))

    def test_dataWithoutRecipients(self) -> None:
        """
        DATA after MAIL but with no accepted recipient gets 554 5.5.1.
        """
        self.session.command(b"MAIL FROM:<alice@example.org>")
        self.assertEqual(self.session.last(b"DATA"), b"554 5.5.1 No valid recipients")

    def test_rset(self) -> None:
        """
        RSET ends the transaction: RCPT then needs a new MAIL.
        """
        self.session.command(b"MAIL FROM:<alice@example.org>")
        self.session.command(b"RSET")
        self.assertEqual(
            self.session.last(b"RCPT TO:<bob@example.net>"),
            b"503 5.5.1 Need MAIL before RCPT",
        )


class DataTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = Harness(maxMessageSize=5000)
        self.spool = self.harness.spool
        self.session = authenticated(self.harness)

    def stored(self) -> bytes:
        (queueId,) = self.spool.messages
        return self.spool.messageBytes(queueId)

    def body(self) -> bytes:
        """
        What was stored after our Received header.
        """
        data = self.stored()
        assert data.startswith(b"Received: ")
        end = data.index(b"\n", data.index(b"\tfor ") if b"\tfor " in data else 0)
        return data[end + 1 :]

    def test_messageQueued(self) -> None:
        """
        After the final dot the message is committed to the spool and the
        client gets C{250 2.0.0 Ok: queued as ID}.
        """
        transaction(self.session)
        self.assertEqual(
            self.session.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        envelope = self.spool.load("Q0001")
        self.assertEqual(envelope.sender, "alice@example.org")
        self.assertEqual(envelope.recipients, ("bob@example.net",))
        self.assertEqual(envelope.authUser, "alice")
        self.assertEqual(envelope.auth, "alice")
        self.assertEqual(envelope.clientAddress, "192.0.2.10")
        self.assertEqual(envelope.helo, "client.example")
        self.assertEqual(envelope.receivedAt, 1_800_000_000)

    def test_storedWithLFUnstuffed(self) -> None:
        """
        The spool holds LF-terminated lines with the dot-stuffing removed.
        """
        transaction(self.session)
        self.session.send(b"Subject: dots\r\n\r\n..leading dot\r\n...\r\nend\r\n.\r\n")
        self.assertEqual(self.body(), b"Subject: dots\n\n.leading dot\n..\nend\n")

    def test_eightBit(self) -> None:
        """
        8-bit octets pass unchanged and the envelope records 8BITMIME.
        """
        transaction(self.session)
        text = "Grüße aus Köln".encode()
        self.session.send(b"Subject: x\r\n\r\n" + text + b"\r\n.\r\n")
        self.assertEqual(self.body(), b"Subject: x\n\n" + text + b"\n")
        self.assertEqual(self.spool.load("Q0001").body, "8BITMIME")

    def test_receivedHeader(self) -> None:
        """
        The message starts with our Received header: HELO name, client IP
        literal, TLS in a comment, C{by} hostname C{with ESMTPSA}, the queue
        id, C{for} the one recipient, and the date.
        """
        transaction(self.session)
        self.session.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(
            self.stored().split(b"Subject")[0],
            b"Received: from client.example ([192.0.2.10])\n"
            b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\n"
            b"\tby relay.example.org (smtpauth-relay) with ESMTPSA id Q0001\n"
            b"\tfor <bob@example.net>; "
            + formatdate(1_800_000_000, localtime=True).encode()
            + b"\n",
        )

    def test_receivedNoForWithSeveralRecipients(self) -> None:
        """
        With several recipients the Received header names none of them.
        """
        transaction(self.session, b"bob@example.net", b"carol@example.net")
        self.session.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        header = self.stored().split(b"Subject")[0]
        self.assertNotIn(b"for <", header)
        self.assertNotIn(b"carol", header)

    def test_headerlessMessage(self) -> None:
        """
        A message that starts with body text gets a blank line after the
        Received header, so its first line does not become a header.
        """
        transaction(self.session)
        self.session.send(b"just text\r\n.\r\n")
        self.assertEqual(self.body(), b"\njust text\n")

    def test_lineLimit(self) -> None:
        """
        A 998-character line (1000 with CRLF) is accepted as is.
        """
        transaction(self.session)
        line = b"x" * 998
        self.assertEqual(
            self.session.send(b"Subject: x\r\n\r\n" + line + b"\r\n.\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        self.assertEqual(self.body(), b"Subject: x\n\n" + line + b"\n")

    def test_stuffedLineLimit(self) -> None:
        """
        A 998-character line that starts with a dot is accepted: the dot the
        client adds for transparency does not count (RFC 5321 4.5.3.1.6).
        """
        transaction(self.session)
        line = b"." + b"x" * 997
        self.assertEqual(
            self.session.send(b"Subject: x\r\n\r\n." + line + b"\r\n.\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001"],
        )
        self.assertEqual(self.body(), b"Subject: x\n\n" + line + b"\n")

    def test_lineTooLong(self) -> None:
        """
        A 999-character line fails the message with 554 5.6.0 after the
        final dot; nothing is spooled and the session goes on.
        """
        transaction(self.session)
        self.assertEqual(
            self.session.send(
                b"Subject: x\r\n\r\n" + b"x" * 999 + b"\r\nmore\r\n.\r\n"
            ),
            [b"554 5.6.0 Message line too long; message refused"],
        )
        self.assertEqual(self.spool.messages, {})
        self.assertEqual(self.spool.aborted, ["Q0001"])
        self.assertEqual(self.session.last(b"NOOP"), b"250 2.0.0 Ok")

    def test_lineTooLongAcrossPackets(self) -> None:
        """
        An overlong line arriving in pieces without a CRLF is discarded as it
        comes, and the final dot after it is still recognised.
        """
        transaction(self.session)
        self.session.send(b"Subject: x\r\n\r\n")
        for _ in range(50):
            self.assertEqual(self.session.send(b"y" * 700), [])
        self.assertLess(len(self.session.protocol._buffer), 1001)
        self.assertEqual(
            self.session.send(b"\r\n.\r\n"),
            [b"554 5.6.0 Message line too long; message refused"],
        )

    def test_crlfSplitAcrossPackets(self) -> None:
        """
        A CRLF split between two packets still ends the line.
        """
        transaction(self.session)
        self.session.send(b"Subject: x\r\n\r\nbody\r")
        self.assertEqual(self.session.send(b"\n.\r"), [])
        self.assertEqual(self.session.send(b"\n"), [b"250 2.0.0 Ok: queued as Q0001"])
        self.assertEqual(self.body(), b"Subject: x\n\nbody\n")

    def test_messageTooBig(self) -> None:
        """
        A message over max_message_size fails with 552 5.3.4 after the
        final dot and nothing is spooled.
        """
        transaction(self.session)
        lines = b"".join(b"x" * 98 + b"\r\n" for _ in range(51))
        self.assertEqual(
            self.session.send(b"Subject: x\r\n\r\n" + lines + b".\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(self.spool.messages, {})

    def test_bareLF(self) -> None:
        """
        A bare LF in DATA (the C{\\n.\\n} smuggling sequence) does not end
        the message; the message fails with 550 5.6.11 at the real final dot
        and the smuggled commands are never run.
        """
        transaction(self.session)
        replies = self.session.send(
            b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@example.org>\r\n"
            b"RCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n"
        )
        self.assertEqual(
            replies,
            [b"550 5.6.11 Bare CR or LF in message; use CRLF line endings (RFC 5321)"],
        )
        self.assertEqual(self.spool.messages, {})

    def test_crlfDotLF(self) -> None:
        """
        C{\\r\\n.\\n} does not end the message either.
        """
        transaction(self.session)
        replies = self.session.send(
            b"Subject: x\r\n\r\nhello\r\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n"
        )
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].startswith(b"550 5.6.11 "))

    def test_bareCR(self) -> None:
        """
        A bare CR (C{\\r.\\r}) fails the message with 550 5.6.11.
        """
        transaction(self.session)
        replies = self.session.send(b"Subject: x\r\n\r\nhello\r.\rworld\r\n.\r\n")
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].startswith(b"550 5.6.11 "))
        self.assertEqual(self.spool.messages, {})

    def test_spoolFull(self) -> None:
        """
        A spool out of space answers 452 4.3.1, so the client retries.
        """
        self.spool.failNextCommit = spoolFull()
        transaction(self.session)
        self.assertEqual(
            self.session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n"),
            [b"452 4.3.1 Insufficient system storage"],
        )

    def test_spoolError(self) -> None:
        """
        Any other spool failure answers 451 4.3.0, never a permanent 5xx.
        """
        self.spool.failNextCommit = SpoolError("Input/output error")
        transaction(self.session)
        self.assertEqual(
            self.session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n"),
            [b"451 4.3.0 Requested action aborted: local error in processing"],
        )
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 1)

    def test_quitWaitsForCommit(self) -> None:
        """
        A QUIT pipelined after the final dot waits until the message is
        durable: the client gets the 250 before the 221, and the connection
        stays open until then.
        """
        self.spool.holdCommits = True
        transaction(self.session)
        self.assertEqual(
            self.session.send(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"), []
        )
        self.assertFalse(self.session.closed())
        writer, envelope, d = self.spool.heldCommits[0]
        d.callback(writer.finishCommit(envelope))
        self.assertEqual(
            self.session.read(), [b"250 2.0.0 Ok: queued as Q0001", b"221 2.0.0 Bye"]
        )
        self.assertTrue(self.session.closed())

    def test_pipelinedTransaction(self) -> None:
        """
        MAIL, RCPT and DATA sent in one packet get their replies in order.
        """
        self.assertEqual(
            self.session.send(
                b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
                b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
            ),
            [
                b"250 2.1.0 Sender ok",
                b"250 2.1.5 Recipient ok",
                b"354 End data with <CR><LF>.<CR><LF>",
                b"250 2.0.0 Ok: queued as Q0001",
            ],
        )

    def test_twoMessages(self) -> None:
        """
        One session can send several messages; each gets its own queue id.
        """
        for expected in (b"Q0001", b"Q0002"):
            transaction(self.session)
            self.assertEqual(
                self.session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n"),
                [b"250 2.0.0 Ok: queued as " + expected],
            )

    def test_connectionLostInData(self) -> None:
        """
        A client that disconnects in the middle of DATA leaves nothing in the
        spool.
        """
        transaction(self.session)
        self.session.send(b"Subject: x\r\n\r\npartial")
        self.session.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(self.spool.messages, {})
        self.assertEqual(self.spool.aborted, ["Q0001"])


class RelayPolicyTests(SynchronousTestCase):
    def test_trustedNetworkRelays(self) -> None:
        """
        A client in trusted_networks may relay without AUTH; the envelope
        records no AUTH user and C{AUTH=<>}.
        """
        harness = Harness(trustedNetworks=("10.0.0.0/8",), tlsMode="none")
        session = harness.connect("10.1.2.3")
        session.command(b"HELO printer")
        self.assertEqual(
            session.last(b"MAIL FROM:<scanner@example.org> AUTH=boss@example.org"),
            b"250 2.1.0 Sender ok",
        )
        session.command(b"RCPT TO:<bob@example.net>")
        session.command(b"DATA")
        self.assertTrue(
            session.send(b"Subject: scan\r\n\r\nx\r\n.\r\n")[0].startswith(b"250")
        )
        envelope = harness.spool.load("Q0001")
        self.assertIsNone(envelope.authUser)
        self.assertEqual(envelope.auth, "<>")
        received = harness.spool.messageBytes("Q0001").split(b"Subject")[0]
        self.assertIn(b"with SMTP id Q0001", received)

    def test_ipv4MappedTrusted(self) -> None:
        """
        An IPv4-mapped IPv6 peer matches the IPv4 trusted network.
        """
        harness = Harness(trustedNetworks=("10.0.0.0/8",), tlsMode="none")
        session = harness.connect("::ffff:10.1.2.3")
        session.command(b"EHLO printer")
        self.assertEqual(
            session.last(b"MAIL FROM:<scanner@example.org>"), b"250 2.1.0 Sender ok"
        )

    def test_untrustedRefused(self) -> None:
        """
        Outside trusted_networks, MAIL without AUTH gets 530 5.7.0 whatever
        address tricks the client uses, and nothing is queued.
        """
        harness = Harness(trustedNetworks=("10.0.0.0/8",), tlsMode="none")
        session = harness.connect("192.0.2.99")
        session.command(b"EHLO attacker")
        for sender in (
            b"<x@relay.example.org>",
            b"<>",
            b'<"x@victim.example"@relay.example.org>',
            b"<@relay.example.org:x@victim.example>",
        ):
            self.assertEqual(
                session.last(b"MAIL FROM:" + sender),
                b"530 5.7.0 Authentication required",
            )
        for rcpt in (
            b"<victim%other.example@relay.example.org>",
            b"<@relay.example.org:victim@other.example>",
        ):
            self.assertTrue(session.last(b"RCPT TO:" + rcpt).startswith(b"503 5.5.1"))
        self.assertEqual(harness.spool.messages, {})

    def test_authParameterOfAuthenticatedClient(self) -> None:
        """
        An authenticated client's AUTH= naming someone else is recorded as
        its own identity.
        """
        harness = Harness()
        session = authenticated(harness)
        session.command(b"MAIL FROM:<alice@example.org> AUTH=bob@example.org")
        session.command(b"RCPT TO:<x@example.net>")
        session.command(b"DATA")
        session.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        self.assertEqual(harness.spool.load("Q0001").auth, "alice")

    def test_authParameterOfTrustedRelay(self) -> None:
        """
        A client in trusted_relays has its AUTH= value kept (xtext decoded).
        """
        harness = Harness(
            trustedNetworks=("10.0.0.0/8",),
            trustedRelays=("10.0.0.0/8",),
            tlsMode="none",
        )
        session = harness.connect("10.0.0.1")
        session.command(b"EHLO mta")
        session.command(b"MAIL FROM:<a@example.org> AUTH=carol+2Bx@example.org")
        session.command(b"RCPT TO:<x@example.net>")
        session.command(b"DATA")
        session.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        self.assertEqual(harness.spool.load("Q0001").auth, "carol+x@example.org")


class ConnectionTests(SynchronousTestCase):
    harnessClass = Harness

    def test_idleTimeout(self) -> None:
        """
        An idle session gets 421 4.4.2 after idle_timeout and is closed.
        """
        harness = self.harnessClass(idleTimeout=300)
        session = harness.connect()
        harness.clock.advance(299)
        self.assertFalse(session.closed())
        session.command(b"NOOP")
        harness.clock.advance(299)
        self.assertFalse(session.closed())
        harness.clock.advance(2)
        self.assertEqual(
            session.read(), [b"421 4.4.2 Idle timeout; closing connection"]
        )
        self.assertTrue(session.closed())

    def test_abortWhenCloseHangs(self) -> None:
        """
        A session closed by the server whose transport cannot flush (a
        client that never reads, or never finishes its TLS handshake) is
        aborted after the grace period, so it gives back its slot.
        """
        harness = self.harnessClass(idleTimeout=300)
        session = harness.connect()
        harness.clock.advance(300)
        self.assertTrue(session.closed())
        self.assertFalse(session.transport.disconnected)
        harness.clock.advance(10)
        self.assertTrue(session.transport.disconnected)

    def test_abortDuringHandshake(self) -> None:
        """
        A session closed before its TLS handshake completed (a client that
        sent STARTTLS and then nothing) is aborted at once: no reply can
        reach it anyway.
        """
        harness = self.harnessClass(idleTimeout=300)
        session = harness.connect()
        session.command(b"EHLO client.example")
        session.command(b"STARTTLS")
        harness.clock.advance(300)
        self.assertTrue(session.transport.disconnected)

    def test_handshakeListener(self) -> None:
        """
        The protocol hears of completed TLS handshakes from Twisted's TLS
        layer (L{IHandshakeListener}).
        """
        session = self.harnessClass().connect()
        self.assertTrue(verifyObject(IHandshakeListener, session.protocol))

    def test_noAbortAfterCleanClose(self) -> None:
        """
        Once the connection is gone, the abort fallback is cancelled.
        """
        harness = self.harnessClass()
        session = harness.connect()
        session.command(b"QUIT")
        session.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_noTimeoutWhileWaitingOnServer(self) -> None:
        """
        The idle timer does not run while the server itself is busy (a slow
        password check).
        """
        harness = self.harnessClass(idleTimeout=300)
        session = harness.connect()
        session.startTLS()
        session.command(b"EHLO client.example")
        harness.checker.pending = []
        session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        harness.clock.advance(1000)
        self.assertFalse(session.closed())

    def test_maxConnectionsPerAddress(self) -> None:
        """
        Beyond max_connections_per_ip the client gets 421 4.7.0 at connect;
        other addresses are still served.
        """
        harness = self.harnessClass(maxPerAddress=2)
        first, second = harness.connect(), harness.connect()
        third = harness.connect()
        self.assertEqual(
            third.greeting, [b"421 4.7.0 Too many connections from your address"]
        )
        self.assertTrue(third.closed())
        self.assertFalse(second.closed())
        other = harness.connect("198.51.100.1")
        self.assertTrue(other.greeting[0].startswith(b"220 "))
        third.protocol.connectionLost(None)  # type: ignore[arg-type]
        first.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertTrue(harness.connect().greeting[0].startswith(b"220 "))

    def test_maxConnections(self) -> None:
        """
        Beyond max_connections every new client gets 421 4.7.0 at connect.
        """
        harness = self.harnessClass(maxConnections=2)
        harness.connect("192.0.2.1")
        harness.connect("192.0.2.2")
        self.assertEqual(
            harness.connect("192.0.2.3").greeting,
            [b"421 4.7.0 Too many connections; try again later"],
        )


class ImplicitTLSTests(SynchronousTestCase):
    def test_receivedHeaderESMTPSA(self) -> None:
        """
        A message over implicit TLS after AUTH is stamped C{with ESMTPSA}.
        """
        harness = Harness(tlsMode="implicit")
        session = harness.connect()
        session.command(b"EHLO client.example")
        session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        transaction(session)
        session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        self.assertIn(b"with ESMTPSA id", harness.spool.messageBytes("Q0001"))


class HeaderInjectionTests(SynchronousTestCase):
    def test_heloSanitised(self) -> None:
        """
        A HELO name cannot inject text into the Received header: characters
        outside those of domain names become C{_}.
        """
        harness = Harness()
        session = harness.connect()
        session.startTLS()
        session.command(b"EHLO evil)\rBcc: x@y (")
        session.command(b"AUTH PLAIN " + plain("alice", "wonderland"))
        transaction(session)
        session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        first = harness.spool.messageBytes("Q0001").split(b"\n")[0]
        self.assertEqual(first, b"Received: from evil__Bcc:_x_y__ ([192.0.2.10])")


class ShutdownTests(SynchronousTestCase):
    def test_idleSessionsClosed(self) -> None:
        """
        At shutdown an idle session gets 421 4.3.2 and is closed; the drain
        completes once it is gone.
        """
        harness = Harness()
        session = harness.connect()
        drained = harness.limiter.drain(harness.clock, 10)
        self.assertEqual(session.read(), [b"421 4.3.2 Service shutting down"])
        self.assertTrue(session.closed())
        self.assertNoResult(drained)
        session.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(drained)

    def test_messageUnderWayFinished(self) -> None:
        """
        A session in the middle of DATA finishes its message (spooled,
        250) before it gets 421 4.3.2.
        """
        harness = Harness()
        session = authenticated(harness)
        transaction(session)
        session.send(b"Subject: x\r\n\r\nhalf")
        harness.limiter.drain(harness.clock, 10)
        self.assertEqual(session.read(), [])
        self.assertFalse(session.closed())
        self.assertEqual(
            session.send(b" done\r\n.\r\n"),
            [b"250 2.0.0 Ok: queued as Q0001", b"421 4.3.2 Service shutting down"],
        )
        self.assertTrue(session.closed())

    def test_newSessionsRefused(self) -> None:
        """
        A client connecting while the relay drains gets 421 4.3.2.
        """
        harness = Harness()
        harness.connect()
        harness.limiter.drain(harness.clock, 10)
        self.assertEqual(
            harness.connect().greeting, [b"421 4.3.2 Service shutting down"]
        )

    def test_graceThenAbort(self) -> None:
        """
        Sessions still open after the grace period are aborted and the
        drain completes.
        """
        harness = Harness()
        session = authenticated(harness)
        transaction(session)
        drained = harness.limiter.drain(harness.clock, 10)
        harness.clock.advance(10)
        self.assertTrue(session.transport.disconnected)
        session.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(drained)

    def test_nothingToDrain(self) -> None:
        """
        With no sessions the drain completes at once.
        """
        harness = Harness()
        self.successResultOf(harness.limiter.drain(harness.clock, 10))


class RobustnessTests(SynchronousTestCase):
    def test_outputBackpressure(self) -> None:
        """
        When the transport's send buffer is full (it pauses us, its
        producer), pipelined commands wait, and once 64 KiB of them are
        waiting reading stops too, so a client that never reads our replies
        cannot fill the server's memory (and a TLS handshake, during which
        the TLS layer pauses us, can still complete).
        """
        harness = Harness()
        session = harness.connect()
        self.assertIs(session.transport.producer, session.protocol)
        session.protocol.pauseProducing()
        self.assertEqual(session.send(b"NOOP\r\nNOOP\r\n"), [])
        self.assertEqual(session.transport.producerState, "producing")
        session.send(b"NOOP\r\n" * 20000)
        self.assertEqual(session.transport.producerState, "paused")
        session.protocol.resumeProducing()
        self.assertEqual(session.read(), [b"250 2.0.0 Ok"] * 20002)
        self.assertEqual(session.transport.producerState, "producing")

    def test_partialLinesDoNotKeepAlive(self) -> None:
        """
        Only complete lines count as activity: a client trickling one byte
        at a time is still timed out (slowloris).
        """
        harness = Harness(idleTimeout=300)
        session = harness.connect()
        harness.clock.advance(200)
        session.send(b"N")
        harness.clock.advance(200)
        session.send(b"O")
        harness.clock.advance(100)
        self.assertTrue(session.closed())

    def test_authNeedsEhlo(self) -> None:
        """
        AUTH after HELO (not EHLO) gets 503 5.5.1: AUTH is an ESMTP
        extension, and the Received header could not say ESMTPA.
        """
        harness = Harness(tlsMode="implicit")
        session = harness.connect()
        session.command(b"HELO client.example")
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"503 5.5.1 Send EHLO first (this is an ESMTP extension)",
        )

    def test_startTLSNeedsEhlo(self) -> None:
        """
        STARTTLS after HELO gets 503 5.5.1.
        """
        session = Harness().connect()
        session.command(b"HELO client.example")
        self.assertEqual(
            session.last(b"STARTTLS"),
            b"503 5.5.1 Send EHLO first (this is an ESMTP extension)",
        )

    def test_refusalWaitsForHandshake(self) -> None:
        """
        A connection refused over the limit on an implicit-TLS port is not
        aborted before its handshake, so the client can read the 421; it is
        aborted after the grace period if it never completes it.
        """
        harness = Harness(tlsMode="implicit", maxPerAddress=1)
        harness.connect()
        address = IPv4Address("TCP", "192.0.2.10", 40001)
        transport = TLSStringTransport(peerAddress=address)
        protocol = harness.factory.buildProtocol(address)
        protocol.makeConnection(transport)
        self.assertEqual(
            transport.value(), b"421 4.7.0 Too many connections from your address\r\n"
        )
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        harness.clock.advance(10)
        self.assertTrue(transport.disconnected)

    def test_inputAfterCloseIgnored(self) -> None:
        """
        Bytes arriving after the server decided to close (a TLS session
        waiting for its close_notify) are neither processed nor buffered.
        """
        session = Harness().connect()
        session.command(b"QUIT")
        session.send(b"NOOP\r\n" + b"x" * 100000)
        self.assertEqual(session.read(), [])
        self.assertEqual(session.protocol._buffer, b"")

    def test_manyLinesInOnePacket(self) -> None:
        """
        Thousands of pipelined commands in one packet are all answered, in
        order, and the buffer is empty afterwards.
        """
        session = Harness().connect()
        replies = session.send(b"NOOP\r\n" * 5000)
        self.assertEqual(replies, [b"250 2.0.0 Ok"] * 5000)
        self.assertEqual(session.protocol._buffer, b"")

    def test_closeUnregistersProducer(self) -> None:
        """
        Closing unregisters the session as the transport's producer: a TLS
        transport postpones its shutdown while a producer is registered.
        """
        session = Harness().connect()
        session.command(b"QUIT")
        self.assertIsNone(session.transport.producer)


class LockoutTests(SynchronousTestCase):
    harnessClass = Harness

    def setUp(self) -> None:
        self.harness = self.harnessClass(
            lockout=LockoutConfig(max_failures=3, tarpit=2),
            sessionMaxAuthFailures=10,
        )

    def secure(self, peer: str = "192.0.2.10") -> Session:
        session = self.harness.connect(peer)
        session.startTLS()
        session.command(b"EHLO client.example")
        return session

    def failLogin(self, session: Session, password: str = "guess") -> list[bytes]:
        """
        One failed AUTH, waiting out the tarpit.
        """
        replies = session.command(b"AUTH PLAIN " + plain("alice", password))
        self.harness.clock.advance(2)
        return replies + session.read()

    def test_tarpit(self) -> None:
        """
        A failed AUTH is answered only after the tarpit delay, growing with
        the address's failures; meanwhile other sessions are served.
        """
        session = self.secure()
        self.assertEqual(session.command(b"AUTH PLAIN " + plain("alice", "x")), [])
        other = self.secure("198.51.100.1")
        self.assertEqual(other.last(b"NOOP"), b"250 2.0.0 Ok")
        self.harness.clock.advance(0.25)
        self.assertEqual(
            session.read(), [b"535 5.7.8 Authentication credentials invalid"]
        )
        session.command(b"AUTH PLAIN " + plain("alice", "y"))
        self.harness.clock.advance(0.25)
        self.assertEqual(session.read(), [])
        self.harness.clock.advance(0.25)
        self.assertEqual(
            session.read(), [b"535 5.7.8 Authentication credentials invalid"]
        )

    def test_lockedEvenWithRightPassword(self) -> None:
        """
        After max_failures failures, the right password gets 454 4.7.0 and
        the checker is not even asked.
        """
        session = self.secure()
        for _ in range(3):
            self.failLogin(session)
        asked = len(self.harness.checker.asked)
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"454 4.7.0 Too many failed logins; try again later",
        )
        self.assertEqual(len(self.harness.checker.asked), asked)
        self.harness.clock.advance(900)
        later = self.secure()
        self.assertEqual(
            later.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"235 2.7.0 Authentication successful",
        )

    def test_unavailableNotCounted(self) -> None:
        """
        A checker that cannot answer (454) does not count as a failure.
        """
        self.harness.checker.unavailable = True
        session = self.secure()
        for _ in range(5):
            self.assertEqual(
                session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
                b"454 4.7.0 Temporary authentication failure",
            )
        self.harness.checker.unavailable = False
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"235 2.7.0 Authentication successful",
        )

    def test_authorizationIdentityCounts(self) -> None:
        """
        A refused authorization identity counts as a failed login of the
        authenticating user.
        """
        session = self.secure()
        for _ in range(3):
            session.command(b"AUTH PLAIN " + plain("alice", "wonderland", "bob"))
            self.harness.clock.advance(2)
        self.assertEqual(
            session.last(b"AUTH PLAIN " + plain("alice", "wonderland")),
            b"454 4.7.0 Too many failed logins; try again later",
        )

    def test_sessionClosedAfterTooManyFailures(self) -> None:
        """
        A session with session_max_failures failed logins is closed with
        421 4.7.0.
        """
        harness = self.harnessClass(
            lockout=LockoutConfig(max_failures=100, tarpit=0),
            sessionMaxAuthFailures=2,
        )
        session = harness.connect()
        session.startTLS()
        session.command(b"EHLO client.example")
        session.command(b"AUTH PLAIN " + plain("alice", "x"))
        self.assertEqual(
            session.command(b"AUTH PLAIN " + plain("alice", "y")),
            [
                b"535 5.7.8 Authentication credentials invalid",
                b"421 4.7.0 Too many failed logins; closing connection",
            ],
        )
        self.assertTrue(session.closed())


class SenderPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice: alice@example.org, @sales.example.org\n")
        self.harness = Harness()
        self.harness.factory.senders = SenderLoginMap(path)
        self.session = authenticated(self.harness)

    def test_allowedSender(self) -> None:
        """
        A sender in the user's list (an address, or in a listed domain) is
        accepted.
        """
        self.assertEqual(
            self.session.last(b"MAIL FROM:<alice@example.org>"), b"250 2.1.0 Sender ok"
        )
        self.session.command(b"RSET")
        self.assertEqual(
            self.session.last(b"MAIL FROM:<anyone@sales.example.org>"),
            b"250 2.1.0 Sender ok",
        )

    def test_forgedSender(self) -> None:
        """
        Any other MAIL FROM gets 553 5.7.1 naming the reason.
        """
        reply = self.session.last(b"MAIL FROM:<ceo@example.org>")
        self.assertTrue(reply.startswith(b"553 5.7.1 "), reply)
        self.assertIn(b"ceo@example.org", reply)

    def test_trustedNetworkNotChecked(self) -> None:
        """
        Clients relaying by trusted network have no login to check.
        """
        harness = Harness(trustedNetworks=("10.0.0.0/8",), tlsMode="none")
        harness.factory.senders = self.harness.factory.senders
        session = harness.connect("10.0.0.5")
        session.command(b"EHLO printer")
        self.assertEqual(
            session.last(b"MAIL FROM:<scanner@example.org>"), b"250 2.1.0 Sender ok"
        )

    def send(self, headers: bytes) -> list[bytes]:
        self.harness.factory.checkHeaderFrom = True
        transaction(self.session)
        return self.session.send(headers + b"\r\nbody\r\n.\r\n")

    def test_headerFromAllowed(self) -> None:
        """
        With check_header_from, an allowed From: header passes.
        """
        self.assertTrue(
            self.send(b"From: Alice <alice@example.org>\r\nSubject: x\r\n")[
                0
            ].startswith(b"250 ")
        )

    def test_headerFromForged(self) -> None:
        """
        With check_header_from, a From: header naming someone else gets
        550 5.7.1 after the dot and nothing is queued.
        """
        replies = self.send(b"From: CEO <ceo@example.org>\r\nSubject: x\r\n")
        self.assertTrue(replies[0].startswith(b"550 5.7.1 From: "), replies)
        self.assertEqual(self.harness.spool.messages, {})

    def test_headerFromFolded(self) -> None:
        """
        A folded From: header is unfolded before it is checked.
        """
        replies = self.send(b"From: Alice\r\n <ceo@example.org>\r\nSubject: x\r\n")
        self.assertTrue(replies[0].startswith(b"550 5.7.1 "), replies)

    def test_twoFromHeaders(self) -> None:
        """
        Two From: headers are refused (which one would a reader see?).
        """
        replies = self.send(
            b"From: alice@example.org\r\nFrom: ceo@example.org\r\nSubject: x\r\n"
        )
        self.assertTrue(replies[0].startswith(b"550 5.7.1 "), replies)


class LoopTests(SynchronousTestCase):
    def test_tooManyHops(self) -> None:
        """
        A message with 50 Received fields already (ours makes 51) is a mail
        loop: 554 5.4.6, nothing queued.
        """
        harness = Harness()
        session = authenticated(harness)
        transaction(session)
        received = b"Received: from a by b; Fri, 1 Jan 2027 00:00:00 +0000\r\n" * 50
        replies = session.send(received + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(replies, [b"554 5.4.6 Too many Received headers: mail loop?"])
        self.assertEqual(harness.spool.messages, {})

    def test_hopsBelowLimit(self) -> None:
        """
        49 Received fields are fine.
        """
        harness = Harness()
        session = authenticated(harness)
        transaction(session)
        received = b"Received: from a by b; Fri, 1 Jan 2027 00:00:00 +0000\r\n" * 49
        replies = session.send(received + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertTrue(replies[0].startswith(b"250 "))


class SessionTimeTests(SynchronousTestCase):
    def test_dataTimeout(self) -> None:
        """
        Inside DATA the inactivity limit is data_timeout, not idle_timeout.
        """
        harness = Harness(idleTimeout=300, dataTimeout=30)
        session = authenticated(harness)
        transaction(session)
        harness.clock.advance(29)
        session.send(b"Subject: x\r\n")
        harness.clock.advance(29)
        self.assertFalse(session.closed())
        harness.clock.advance(1)
        self.assertEqual(
            session.read(), [b"421 4.4.2 Idle timeout; closing connection"]
        )
        self.assertTrue(session.closed())

    def test_idleTimeoutAfterData(self) -> None:
        """
        After the message, idle_timeout applies again.
        """
        harness = Harness(idleTimeout=300, dataTimeout=30)
        session = authenticated(harness)
        transaction(session)
        session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        harness.clock.advance(100)
        self.assertFalse(session.closed())

    def test_maxSessionTime(self) -> None:
        """
        A session, however busy, ends after max_session_time with 421
        4.4.2.
        """
        harness = Harness(maxSessionTime=600)
        session = harness.connect()
        for _ in range(10):
            harness.clock.advance(59)
            session.command(b"NOOP")
        self.assertFalse(session.closed())
        harness.clock.advance(10)
        self.assertEqual(
            session.read(),
            [b"421 4.4.2 Session time limit reached; closing connection"],
        )
        self.assertTrue(session.closed())

    def test_authIdentityLogSafe(self) -> None:
        """
        An AUTH identity with CR/LF cannot forge a log line.
        """
        harness = Harness()
        session = harness.connect()
        session.startTLS()
        session.command(b"EHLO client.example")
        with capturedLogs() as events:
            session.command(b"AUTH PLAIN " + plain("x\r\nlockout start kind=ip", "y"))
        text = "\n".join(formatEvent(e) for e in events)
        self.assertNotIn("\nlockout start", text)
        self.assertIn("x\\r\\nlockout\\x20start", text)


class RateLimitTests(SynchronousTestCase):
    harnessClass = Harness

    def test_messagesPerHour(self) -> None:
        """
        A user past messages_per_hour gets 451 4.7.1 at MAIL, until the hour
        has passed.
        """
        harness = self.harnessClass(limits=LimitsConfig(messages_per_hour=2))
        session = authenticated(harness)
        for _ in range(2):
            transaction(session)
            session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(
            session.last(b"MAIL FROM:<alice@example.org>"),
            b"451 4.7.1 Hourly message limit reached; try again later",
        )
        harness.clock.advance(3600)
        later = authenticated(harness)
        self.assertEqual(
            later.last(b"MAIL FROM:<alice@example.org>"), b"250 2.1.0 Sender ok"
        )

    def test_recipientsPerHour(self) -> None:
        """
        Recipients count towards recipients_per_hour, including those of the
        transaction under way.
        """
        harness = self.harnessClass(limits=LimitsConfig(recipients_per_hour=3))
        session = authenticated(harness)
        transaction(session, b"a@example.net", b"b@example.net")
        session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        session.command(b"MAIL FROM:<alice@example.org>")
        self.assertEqual(
            session.last(b"RCPT TO:<c@example.net>"), b"250 2.1.5 Recipient ok"
        )
        self.assertEqual(
            session.last(b"RCPT TO:<d@example.net>"),
            b"451 4.7.1 Hourly recipient limit reached; try again later",
        )

    def test_limitsPerUser(self) -> None:
        """
        One user's limit does not hold back another user.
        """
        harness = self.harnessClass(limits=LimitsConfig(messages_per_hour=1))
        alice = authenticated(harness)
        transaction(alice)
        alice.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        bob = harness.connect("192.0.2.11")
        bob.startTLS()
        self.assertEqual(
            bob.login("bob", "builder"), b"235 2.7.0 Authentication successful"
        )
        self.assertEqual(
            bob.last(b"MAIL FROM:<bob@example.org>"), b"250 2.1.0 Sender ok"
        )

    def test_connectionsPerMinute(self) -> None:
        """
        Past connections_per_minute from one address, new connections get
        421 4.7.0; a minute later they are served again.
        """
        harness = self.harnessClass(limits=LimitsConfig(connections_per_minute=2))
        for _ in range(2):
            harness.connect().protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(
            harness.connect().greeting,
            [
                b"421 4.7.0 Too many connections per minute from your address; try again later"
            ],
        )
        harness.clock.advance(60)
        self.assertTrue(harness.connect().greeting[0].startswith(b"220 "))

    def test_messagesPerSession(self) -> None:
        """
        After messages_per_session messages the session is closed with 421
        4.7.0 at the next MAIL.
        """
        harness = self.harnessClass(limits=LimitsConfig(messages_per_session=1))
        session = authenticated(harness)
        transaction(session)
        session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(
            session.command(b"MAIL FROM:<alice@example.org>"),
            [b"421 4.7.0 Too many messages in one session; please reconnect"],
        )
        self.assertTrue(session.closed())


def scramHarness(
    users: dict[str, str],
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5"),
    **kwargs: Any,
) -> tuple[Harness, str]:
    """
    A harness whose only checker is an htpasswd file holding C{users} (name
    to hash), checked without threads.

    @return: the harness and the file's path.
    """
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "users")
    with open(path, "w") as f:
        f.writelines(f"{user}:{encoded}\n" for user, encoded in users.items())
    harness = Harness(mechanisms=mechanisms, **kwargs)
    checker = HtpasswdChecker(
        path, runInThread=lambda f, *a: maybeDeferred(f, *a), dummyHash="x"
    )
    harness.factory.portal = makePortal([checker], harness.clock)
    return harness, path


def decoded(line: bytes) -> str:
    """
    The text of a 334 challenge.
    """
    assert line.startswith(b"334 "), line
    return base64.b64decode(line[4:]).decode()


def encoded(text: str) -> bytes:
    return base64.b64encode(text.encode())


SCRAM_ALICE = hashPassword(b"wonderland", scheme=SCRAM_SHA_256, iterations=4096)
SCRAM_BOB = hashPassword(b"builder", scheme=SCRAM_SHA_256, iterations=4096)
CRAM_ALICE = hashPassword(b"wonderland", scheme=CRAM_MD5)
CRAM_BOB = hashPassword(b"builder", scheme=CRAM_MD5)


class ScramAuthTests(SynchronousTestCase):
    """
    AUTH SCRAM-SHA-256 through the session, with scramp as the client.
    """

    def setUp(self) -> None:
        self.harness, self.path = scramHarness(
            {"alice": SCRAM_ALICE, "bob": SCRAM_BOB},
            lockout=LockoutConfig(max_failures=3, tarpit=0),
            sessionMaxAuthFailures=10,
        )
        self.session = self.harness.connect()
        self.session.startTLS()

    def login(
        self, user: str, password: str, initial: bool = True
    ) -> tuple[list[bytes], ScramClient]:
        """
        Run the exchange up to the client-final-message.

        @return: the replies to it, and the client.
        """
        client = ScramClient(["SCRAM-SHA-256"], user, password)
        first = encoded(client.get_client_first())
        if initial:
            replies = self.session.command(b"AUTH SCRAM-SHA-256 " + first)
        else:
            self.assertEqual(self.session.command(b"AUTH SCRAM-SHA-256"), [b"334 "])
            replies = self.session.command(first)
        self.assertEqual(len(replies), 1, replies)
        client.set_server_first(decoded(replies[0]))
        return self.session.command(encoded(client.get_client_final())), client

    def test_offered(self) -> None:
        """
        With every user of the file having SCRAM secrets, EHLO offers
        SCRAM-SHA-256 (not -PLUS) in the configured order; CRAM-MD5 not.
        """
        lines = self.session.command(b"EHLO client.example")
        self.assertEqual(lines[-1], b"250 AUTH PLAIN LOGIN SCRAM-SHA-256")

    def test_notOfferedWithBcryptUser(self) -> None:
        """
        Once one user has only a bcrypt hash, SCRAM-SHA-256 is neither
        offered nor accepted (504 5.5.4); it comes back when that user
        has SCRAM secrets again.
        """
        setUser(self.path, "carol", hashPassword(b"x", rounds=4))
        self.assertEqual(
            self.session.command(b"EHLO client.example")[-1], b"250 AUTH PLAIN LOGIN"
        )
        self.assertEqual(
            self.session.last(b"AUTH SCRAM-SHA-256"),
            b"504 5.5.4 Unrecognized authentication type",
        )
        setUser(self.path, "carol", SCRAM_BOB + "")
        os.utime(self.path, ns=(0, os.stat(self.path).st_mtime_ns + 10**9))
        self.assertEqual(
            self.session.command(b"EHLO client.example")[-1],
            b"250 AUTH PLAIN LOGIN SCRAM-SHA-256",
        )

    def test_notConfigured(self) -> None:
        """
        SCRAM-SHA-256 left out of [auth] mechanisms is neither offered nor
        accepted.
        """
        harness, _ = scramHarness({"alice": SCRAM_ALICE}, mechanisms=("PLAIN",))
        session = harness.connect()
        session.startTLS()
        self.assertEqual(session.command(b"EHLO client.example")[-1], b"250 AUTH PLAIN")
        self.assertEqual(
            session.last(b"AUTH SCRAM-SHA-256"),
            b"504 5.5.4 Unrecognized authentication type",
        )

    def test_good(self) -> None:
        """
        The right password: the server signature (which the client
        accepts) in a 334, then 235 after the empty answer.
        """
        self.session.command(b"EHLO client.example")
        replies, client = self.login("alice", "wonderland")
        self.assertEqual(len(replies), 1)
        client.set_server_final(decoded(replies[0]))
        self.assertIsNone(self.session.protocol._submitter)
        self.assertEqual(
            self.session.command(b""), [b"235 2.7.0 Authentication successful"]
        )
        submitter = self.session.protocol._submitter
        assert submitter is not None
        self.assertEqual(
            (submitter.username, submitter.mechanism), ("alice", "SCRAM-SHA-256")
        )

    def test_goodWithoutInitialResponse(self) -> None:
        """
        C{AUTH SCRAM-SHA-256} alone gets an empty 334 first.
        """
        self.session.command(b"EHLO client.example")
        replies, client = self.login("bob", "builder", initial=False)
        client.set_server_final(decoded(replies[0]))
        self.assertEqual(self.session.last(b""), b"235 2.7.0 Authentication successful")

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets 535 5.7.8 (no server signature), is logged as
        a failed AUTH and counts for the lockout like PLAIN's.
        """
        self.session.command(b"EHLO client.example")
        with capturedLogs() as events:
            replies, _ = self.login("alice", "rabbit")
        self.assertEqual(replies, [b"535 5.7.8 Authentication credentials invalid"])
        self.assertIn(
            "AUTH SCRAM-SHA-256 failed for alice from 192.0.2.10: bad credentials",
            [formatEvent(e) for e in events],
        )
        self.login("alice", "rabbit")
        self.login("alice", "rabbit")
        replies, _ = self.login("alice", "wonderland")
        self.assertEqual(
            replies, [b"454 4.7.0 Too many failed logins; try again later"]
        )

    def test_unknownUser(self) -> None:
        """
        An unknown user gets a server-first-message of the same shape as a
        known one (a stable made-up salt, the file's iteration count) and
        the same 535 5.7.8 at the proof.
        """
        self.session.command(b"EHLO client.example")
        client = ScramClient(["SCRAM-SHA-256"], "mallory", "x")
        first = self.session.command(
            b"AUTH SCRAM-SHA-256 " + encoded(client.get_client_first())
        )
        serverFirst = decoded(first[0])
        self.assertRegex(serverFirst, r"\Ar=[^,]+,s=[A-Za-z0-9+/]{22}==,i=4096\Z")
        client.set_server_first(serverFirst)
        self.assertEqual(
            self.session.command(encoded(client.get_client_final())),
            [b"535 5.7.8 Authentication credentials invalid"],
        )

    def test_abort(self) -> None:
        """
        C{*} cancels the exchange at each step with 501 5.7.0, and the
        session goes on.
        """
        self.session.command(b"EHLO client.example")
        self.session.command(b"AUTH SCRAM-SHA-256")
        self.assertEqual(self.session.last(b"*"), b"501 5.7.0 Authentication aborted")
        client = ScramClient(["SCRAM-SHA-256"], "alice", "wonderland")
        self.session.command(
            b"AUTH SCRAM-SHA-256 " + encoded(client.get_client_first())
        )
        self.assertEqual(self.session.last(b"*"), b"501 5.7.0 Authentication aborted")
        replies, client = self.login("alice", "wonderland")
        self.assertTrue(replies[0].startswith(b"334 "))
        self.assertEqual(self.session.last(b"*"), b"501 5.7.0 Authentication aborted")
        self.assertIsNone(self.session.protocol._submitter)
        self.assertEqual(self.session.last(b"NOOP"), b"250 2.0.0 Ok")

    def test_finalAnswerMustBeEmpty(self) -> None:
        """
        Anything but an empty answer to the server signature is refused
        with 501 5.5.2, and the session is not logged in.
        """
        self.session.command(b"EHLO client.example")
        self.login("alice", "wonderland")
        self.assertEqual(
            self.session.last(b"eD15"), b"501 5.5.2 Cannot decode response"
        )
        self.assertIsNone(self.session.protocol._submitter)

    def test_channelBinding(self) -> None:
        """
        A client asking for channel binding (C{p=}) gets 501 5.5.2 saying
        it is not supported; it does not count as a failed login.
        """
        self.session.command(b"EHLO client.example")
        self.assertEqual(
            self.session.last(
                b"AUTH SCRAM-SHA-256 " + encoded("p=tls-exporter,,n=alice,r=abc")
            ),
            b"501 5.5.2 Channel binding is not supported",
        )
        self.assertEqual(self.session.protocol._authFailures, 0)

    def test_otherAuthzid(self) -> None:
        """
        An authorization identity other than the user is a failed login
        (535 5.7.8), before any lookup.
        """
        self.session.command(b"EHLO client.example")
        self.assertEqual(
            self.session.last(
                b"AUTH SCRAM-SHA-256 " + encoded("n,a=bob,n=alice,r=abc")
            ),
            b"535 5.7.8 Authentication credentials invalid",
        )
        self.assertEqual(self.session.protocol._authFailures, 1)

    def test_malformed(self) -> None:
        """
        A malformed client-first-message gets 501 5.5.2.
        """
        self.session.command(b"EHLO client.example")
        self.assertEqual(
            self.session.last(b"AUTH SCRAM-SHA-256 " + encoded("n,,r=abc")),
            b"501 5.5.2 Cannot decode response",
        )
        self.assertEqual(
            self.session.last(b"AUTH SCRAM-SHA-256 ="),
            b"501 5.5.2 Cannot decode response",
        )


@implementer(ICredentialsChecker, IScramStore, ISASLMechanisms)
class PendingScramStore:
    """
    A SCRAM store whose lookups wait for the test to fire them.
    """

    credentialInterfaces = (IScramCredentials,)

    def __init__(self) -> None:
        self.pending: list[Deferred[ScramSecrets]] = []
        self.secrets = scramSecrets(b"wonderland", b"sixteen byte salt", 4096)

    def saslMechanisms(self) -> frozenset[str]:
        return frozenset({"SCRAM-SHA-256"})

    def scramSecrets(self, username: str) -> Deferred[ScramSecrets]:
        d: Deferred[ScramSecrets] = Deferred()
        self.pending.append(d)
        return d

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        if credentials.checkProof(self.secrets.storedKey):
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())


class ScramLookupTests(SynchronousTestCase):
    """
    The session waits for the SCRAM lookup in the middle of the exchange.
    """

    def setUp(self) -> None:
        self.harness = Harness(mechanisms=("SCRAM-SHA-256",))
        self.store = PendingScramStore()
        self.harness.factory.portal = makePortal([self.store], self.harness.clock)
        self.session = self.harness.connect()
        self.session.startTLS()
        self.session.command(b"EHLO client.example")
        self.client = ScramClient(["SCRAM-SHA-256"], "alice", "wonderland")

    def test_waits(self) -> None:
        """
        While the lookup is under way nothing is answered and the transport
        is paused (what the client pipelines waits); then the exchange goes
        on, and the next line is its answer.
        """
        self.assertEqual(
            self.session.send(
                b"AUTH SCRAM-SHA-256 "
                + encoded(self.client.get_client_first())
                + b"\r\nNOOP\r\n"
            ),
            [],
        )
        self.assertEqual(self.session.transport.producerState, "paused")
        self.store.pending[0].callback(self.store.secrets)
        replies = self.session.read()
        self.assertEqual(len(replies), 2)
        self.client.set_server_first(decoded(replies[0]))
        self.assertEqual(replies[1], b"501 5.5.2 Cannot decode response")
        self.assertEqual(self.session.transport.producerState, "producing")

    def test_exchangeAfterLookup(self) -> None:
        """
        Without pipelining, the whole exchange completes once the lookup
        answers.
        """
        self.session.command(
            b"AUTH SCRAM-SHA-256 " + encoded(self.client.get_client_first())
        )
        self.store.pending[0].callback(self.store.secrets)
        self.client.set_server_first(decoded(self.session.read()[0]))
        final = self.session.command(encoded(self.client.get_client_final()))
        self.client.set_server_final(decoded(final[0]))
        self.assertEqual(self.session.last(b""), b"235 2.7.0 Authentication successful")

    def test_connectionLost(self) -> None:
        """
        If the client goes away during the lookup, its answer is dropped:
        nothing is written and nothing fails.
        """
        self.session.command(
            b"AUTH SCRAM-SHA-256 " + encoded(self.client.get_client_first())
        )
        self.session.protocol.connectionLost(Failure(ConnectionDone()))
        self.store.pending[0].callback(self.store.secrets)
        self.assertEqual(self.session.read(), [])

    def test_unavailable(self) -> None:
        """
        A lookup failing with L{CheckerUnavailable} answers 454 4.7.0 and
        does not count as a failed login.
        """
        self.session.command(
            b"AUTH SCRAM-SHA-256 " + encoded(self.client.get_client_first())
        )
        self.store.pending[0].errback(CheckerUnavailable("down"))
        self.assertEqual(
            self.session.read(), [b"454 4.7.0 Temporary authentication failure"]
        )
        self.assertEqual(self.session.protocol._authFailures, 0)
        self.assertEqual(self.session.last(b"NOOP"), b"250 2.0.0 Ok")

    def test_timeoutWhileWaiting(self) -> None:
        """
        The idle timeout does not run during the lookup (the chain's own
        timeout bounds it).
        """
        self.session.command(
            b"AUTH SCRAM-SHA-256 " + encoded(self.client.get_client_first())
        )
        self.harness.clock.advance(self.harness.settings.idleTimeout + 1)
        self.assertFalse(self.session.closed())


class CramMD5AuthTests(SynchronousTestCase):
    """
    AUTH CRAM-MD5 through the session.
    """

    def setUp(self) -> None:
        self.harness, self.path = scramHarness({"alice": CRAM_ALICE, "bob": CRAM_BOB})
        self.session = self.harness.connect()
        self.session.startTLS()
        self.session.command(b"EHLO client.example")

    def respond(self, user: str, password: str) -> list[bytes]:
        challenge = self.session.command(b"AUTH CRAM-MD5")
        self.assertEqual(len(challenge), 1)
        text = decoded(challenge[0])
        self.assertRegex(text, r"\A<[0-9]+\.[0-9]+\.[0-9]+@relay\.example\.org>\Z")
        digest = hmac.digest(password.encode(), text.encode(), "md5").hex()
        return self.session.command(encoded(f"{user} {digest}"))

    def test_offered(self) -> None:
        """
        With every user having a C{{CRAM-MD5}} entry and CRAM-MD5 allowed,
        EHLO offers it; not otherwise.
        """
        self.assertEqual(
            self.session.command(b"EHLO client.example")[-1],
            b"250 AUTH PLAIN LOGIN CRAM-MD5",
        )
        harness, _ = scramHarness({"alice": CRAM_ALICE}, mechanisms=("PLAIN", "LOGIN"))
        session = harness.connect()
        session.startTLS()
        self.assertEqual(
            session.command(b"EHLO client.example")[-1], b"250 AUTH PLAIN LOGIN"
        )

    def test_good(self) -> None:
        """
        The right digest logs in at once (235, no final challenge).
        """
        self.assertEqual(
            self.respond("alice", "wonderland"),
            [b"235 2.7.0 Authentication successful"],
        )
        submitter = self.session.protocol._submitter
        assert submitter is not None
        self.assertEqual(submitter.mechanism, "CRAM-MD5")

    def test_wrongAndUnknown(self) -> None:
        """
        A wrong password and an unknown user get the same 535 5.7.8.
        """
        self.assertEqual(
            self.respond("alice", "rabbit"),
            [b"535 5.7.8 Authentication credentials invalid"],
        )
        self.assertEqual(
            self.respond("mallory", "x"),
            [b"535 5.7.8 Authentication credentials invalid"],
        )

    def test_plainStillWorks(self) -> None:
        """
        PLAIN verifies against the C{{CRAM-MD5}} entry.
        """
        self.assertEqual(
            self.session.last(b"AUTH PLAIN " + plain("bob", "builder")),
            b"235 2.7.0 Authentication successful",
        )

    def test_initialResponseRefused(self) -> None:
        """
        CRAM-MD5 is server-first: an initial response gets 501 5.5.2.
        """
        self.assertEqual(
            self.session.last(b"AUTH CRAM-MD5 " + encoded("alice 0")),
            b"501 5.5.2 Cannot decode response",
        )
        self.assertEqual(self.session.last(b"NOOP"), b"250 2.0.0 Ok")

    def test_malformed(self) -> None:
        """
        A response that is not C{user digest} gets 501 5.5.2.
        """
        self.session.command(b"AUTH CRAM-MD5")
        self.assertEqual(
            self.session.last(encoded("alice")), b"501 5.5.2 Cannot decode response"
        )
