"""
End-to-end tests: the real relay (C{twistd -n smtpauth-relay --config ...})
in a subprocess, driven over real sockets with smtplib, swaks and raw
sockets.

Each class starts one relay for all its tests (see L{SharedRelay}); the
crash test starts and kills its own.  Every client connection comes from its
own loopback address (127.77.x.y), so per-address limits and lockouts of one
test never touch another.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from typing import Any

from twisted.trial.unittest import SkipTest

from tests.e2e_support import (
    CLIENT_NAME,
    HOST,
    HOSTNAME,
    IO_TIMEOUT,
    OTHER_USER,
    PASSWORD,
    QUEUED,
    STOP_TIMEOUT,
    USER,
    ConnectionClosed,
    RawSMTP,
    RelayProcess,
    SharedRelayTestCase,
    SMTPReply,
    b64,
    clientContext,
    closeQuietly,
    loopbackAddresses,
    markedMessage,
    plainResponse,
    poll,
    queueCommand,
)

SWAKS = "/usr/bin/swaks"
MAX_MESSAGE_SIZE = 20000
MAX_RECIPIENTS = 3

nextSourceAddress = loopbackAddresses(77)


class SharedRelay(SharedRelayTestCase):
    """
    Base for the test classes here: one relay shared by the tests of a
    class (see L{SharedRelayTestCase}), and helpers.
    """

    # -- helpers ------------------------------------------------------------

    def marker(self) -> str:
        """
        A unique string for a Subject, so a test finds its own message.
        """
        return f"e2e-{self._testMethodName}-{uuid.uuid4().hex}"

    def addresses(self, count: int = 1) -> tuple[str, list[str]]:
        """
        A sender and C{count} recipients used by this test alone.
        """
        tag = uuid.uuid4().hex[:8]
        name = self._testMethodName.replace("_", "-")
        sender = f"{name}-{tag}@sender.example"
        recipients = [f"{name}-{tag}-{i}@rcpt.example" for i in range(count)]
        return sender, recipients

    def assertReply(
        self, reply: tuple[int, bytes] | SMTPReply, code: int, enhanced: str = ""
    ) -> None:
        """
        Assert a reply's code and (if given) enhanced status code.
        """
        if isinstance(reply, SMTPReply):
            actual, text = reply.code, reply.text
        else:
            actual, text = reply[0], reply[1].decode("utf-8", "replace")
        words = text.split()
        actualEnhanced = words[0] if words and words[0][:1].isdigit() else ""
        message = f"expected {code} {enhanced}, got {actual} {text!r}"
        self.assertEqual(actual, code, message)
        if enhanced:
            self.assertEqual(actualEnhanced, enhanced, message)

    def smtp(self, port: int | None = None) -> smtplib.SMTP:
        """
        An smtplib session to the STARTTLS port (or C{port}), greeting read.
        """
        client = smtplib.SMTP(
            HOST,
            port or self.relay.starttlsPort,
            local_hostname=CLIENT_NAME,
            timeout=IO_TIMEOUT,
            source_address=(nextSourceAddress(), 0),
        )
        self.addCleanup(closeQuietly, client)
        return client

    def smtpSSL(self, context: ssl.SSLContext | None = None) -> smtplib.SMTP_SSL:
        """
        An smtplib session to the implicit TLS port, greeting read.
        """
        client = smtplib.SMTP_SSL(
            HOST,
            self.relay.implicitPort,
            local_hostname=CLIENT_NAME,
            timeout=IO_TIMEOUT,
            source_address=(nextSourceAddress(), 0),
            context=context or clientContext(),
        )
        self.addCleanup(closeQuietly, client)
        return client

    def tlsSession(self) -> smtplib.SMTP:
        """
        A session on the STARTTLS port after STARTTLS and a second EHLO.
        """
        client = self.smtp()
        self.assertReply(client.ehlo(), 250)
        self.assertReply(client.starttls(context=clientContext()), 220, "2.0.0")
        self.assertReply(client.ehlo(), 250)
        return client

    def authenticated(self, implicit: bool = False) -> smtplib.SMTP:
        """
        A session after TLS (STARTTLS, or implicit) and AUTH PLAIN.
        """
        if implicit:
            client: smtplib.SMTP = self.smtpSSL()
            self.assertReply(client.ehlo(), 250)
        else:
            client = self.tlsSession()
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)),
            235,
            "2.7.0",
        )
        return client

    def raw(self, port: int | None = None, implicitTLS: bool = False) -> RawSMTP:
        """
        A raw session (greeting not read yet).
        """
        if port is None:
            port = self.relay.implicitPort if implicitTLS else self.relay.starttlsPort
        client = RawSMTP(
            port, implicitTLS=implicitTLS, sourceAddress=nextSourceAddress()
        )
        self.addCleanup(client.close)
        return client

    def rawAuthenticated(self) -> RawSMTP:
        """
        A raw session on the implicit TLS port after EHLO and AUTH PLAIN.
        """
        client = self.raw(implicitTLS=True)
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(
            client.command("AUTH PLAIN " + plainResponse(USER, PASSWORD)),
            235,
            "2.7.0",
        )
        return client

    def queuedId(self, reply: tuple[int, bytes] | SMTPReply) -> str:
        """
        The queue id named by a C{250 2.0.0 Ok: queued as ID}.
        """
        self.assertReply(reply, 250, "2.0.0")
        text = reply.text if isinstance(reply, SMTPReply) else reply[1].decode()
        match = QUEUED.match(text)
        if match is None:
            self.fail(f"not a 'queued as' reply: {text!r}")
        return match.group(1)

    def message(self, marker: str, body: bytes = b"Hello.\r\n") -> bytes:
        """
        A small message with CRLF line endings and C{marker} as Subject.
        """
        return markedMessage(marker, body)

    def submit(
        self,
        client: smtplib.SMTP,
        message: bytes,
        sender: str,
        recipients: list[str],
        mailOptions: tuple[str, ...] = (),
    ) -> tuple[int, bytes]:
        """
        MAIL, RCPT (each must be accepted), DATA; the reply after the dot.
        """
        self.assertReply(client.mail(sender, list(mailOptions)), 250, "2.1.0")
        for recipient in recipients:
            self.assertReply(client.rcpt(recipient), 250, "2.1.5")
        return client.data(message)

    def assertNothingSpooled(self, *markers: str) -> None:
        """
        Nothing is left in the spool, and no message with one of
        C{markers} was delivered.
        """
        self.relay.waitForEmptySpool()
        for marker in markers:
            self.assertEqual(
                self.relay.delivered(marker.encode()),
                [],
                f"a message with {marker} was delivered",
            )

    def splitDelivered(
        self, content: bytes, sender: str, recipients: list[str]
    ) -> tuple[bytes, bytes]:
        """
        Split a delivered Maildir file into its C{Received} header and the
        message as the client sent it, checking the envelope lines on top.
        """
        envelopeLines = f"Return-Path: <{sender}>\n".encode() + b"".join(
            f"X-Envelope-To: <{r}>\n".encode() for r in recipients
        )
        self.assertTrue(
            content.startswith(envelopeLines), f"unexpected start: {content!r}"
        )
        rest = content[len(envelopeLines) :]
        self.assertTrue(rest.startswith(b"Received: "), f"no Received: {rest!r}")
        lines = rest.split(b"\n")
        end = 1
        while lines[end].startswith(b"\t"):
            end += 1
        received = b"\n".join(lines[:end]) + b"\n"
        return received, rest[len(received) :]


class SubmissionTests(SharedRelay):
    """
    Submission over STARTTLS, implicit TLS and a plain listener, with a
    small C{max_message_size} and C{max_recipients}.
    """

    relayServer = {
        "max_message_size": MAX_MESSAGE_SIZE,
        "max_recipients": MAX_RECIPIENTS,
    }

    # -- before TLS -----------------------------------------------------------

    def test_ehloBeforeTLSOffersStartTLSNotAuth(self) -> None:
        """
        On the STARTTLS port, EHLO before TLS offers STARTTLS and no AUTH,
        and the greeting and EHLO name the configured hostname.
        """
        client = self.smtp()
        code, text = client.ehlo()
        self.assertEqual(code, 250)
        self.assertTrue(text.startswith(HOSTNAME.encode()), text)
        self.assertTrue(client.has_extn("starttls"), client.esmtp_features)
        self.assertFalse(client.has_extn("auth"), client.esmtp_features)

    def test_authBeforeTLSRefused(self) -> None:
        """
        AUTH before TLS gets 538 5.7.11, even with good credentials, and
        does not authenticate the session.
        """
        client = self.smtp()
        client.ehlo()
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)),
            538,
            "5.7.11",
        )
        self.assertReply(client.docmd("AUTH", "LOGIN"), 538, "5.7.11")
        self.assertReply(client.mail("x@sender.example"), 530, "5.7.0")

    def test_mailWithoutAuthRefused(self) -> None:
        """
        MAIL without AUTH gets 530 5.7.0, before TLS and after it.
        """
        sender, _ = self.addresses()
        client = self.smtp()
        client.ehlo()
        self.assertReply(client.mail(sender), 530, "5.7.0")
        tls = self.tlsSession()
        self.assertReply(tls.mail(sender), 530, "5.7.0")

    # -- AUTH after STARTTLS ----------------------------------------------------

    def test_ehloAfterStartTLSOffersAuth(self) -> None:
        """
        After STARTTLS, EHLO offers AUTH PLAIN LOGIN and no longer STARTTLS.
        """
        client = self.tlsSession()
        self.assertEqual(
            client.esmtp_features.get("auth", "").split(), ["PLAIN", "LOGIN"]
        )
        self.assertFalse(client.has_extn("starttls"), client.esmtp_features)
        self.assertReply(client.docmd("STARTTLS"), 503, "5.5.1")

    def test_authPlainGood(self) -> None:
        """
        AUTH PLAIN with the right password gets 235 2.7.0, and then MAIL is
        accepted.
        """
        client = self.tlsSession()
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)),
            235,
            "2.7.0",
        )
        sender, _ = self.addresses()
        self.assertReply(client.mail(sender), 250, "2.1.0")

    def test_authPlainWithoutInitialResponse(self) -> None:
        """
        AUTH PLAIN without an initial response gets an empty 334 challenge;
        the credentials sent then get 235 2.7.0.
        """
        client = self.tlsSession()
        self.assertEqual(client.docmd("AUTH", "PLAIN"), (334, b""))
        self.assertReply(client.docmd(plainResponse(USER, PASSWORD)), 235, "2.7.0")

    def test_authPlainBadPassword(self) -> None:
        """
        AUTH PLAIN with a wrong password gets 535 5.7.8 and leaves the
        session unauthenticated (MAIL gets 530 5.7.0).
        """
        client = self.tlsSession()
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, "wrong")),
            535,
            "5.7.8",
        )
        self.assertReply(client.mail("x@sender.example"), 530, "5.7.0")

    def test_authPlainUnknownUser(self) -> None:
        """
        AUTH PLAIN for a user who does not exist gets the same 535 5.7.8 as
        a wrong password.
        """
        client = self.tlsSession()
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse("mallory", PASSWORD)),
            535,
            "5.7.8",
        )

    def test_authLoginGood(self) -> None:
        """
        AUTH LOGIN asks Username: then Password: (base64) and gets 235 2.7.0.
        """
        client = self.tlsSession()
        self.assertEqual(
            client.docmd("AUTH", "LOGIN"), (334, b64("Username:").encode())
        )
        self.assertEqual(client.docmd(b64(USER)), (334, b64("Password:").encode()))
        self.assertReply(client.docmd(b64(PASSWORD)), 235, "2.7.0")
        sender, _ = self.addresses()
        self.assertReply(client.mail(sender), 250, "2.1.0")

    def test_authLoginWithInitialResponse(self) -> None:
        """
        AUTH LOGIN with the user name as initial response asks Password:.
        """
        client = self.tlsSession()
        self.assertEqual(
            client.docmd("AUTH", "LOGIN " + b64(USER)),
            (334, b64("Password:").encode()),
        )
        self.assertReply(client.docmd(b64(PASSWORD)), 235, "2.7.0")

    def test_secondAuthRefused(self) -> None:
        """
        A second AUTH after a successful one gets 503 5.5.1.
        """
        client = self.tlsSession()
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)), 235
        )
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)),
            503,
            "5.5.1",
        )
        self.assertReply(client.docmd("AUTH", "LOGIN"), 503, "5.5.1")

    def test_authBadBase64(self) -> None:
        """
        Undecodable base64, as initial response or as a LOGIN answer, gets
        501 5.5.2 and the session goes back to commands.
        """
        client = self.tlsSession()
        self.assertReply(client.docmd("AUTH", "PLAIN !!!not-base64!!!"), 501, "5.5.2")
        self.assertReply(client.docmd("AUTH", "LOGIN"), 334)
        self.assertReply(client.docmd("%%%%"), 501, "5.5.2")
        self.assertReply(client.noop(), 250, "2.0.0")

    def test_authAbort(self) -> None:
        """
        C{*} in answer to a challenge aborts the exchange with 501 5.7.0, for
        LOGIN and for PLAIN; AUTH works afterwards.
        """
        client = self.tlsSession()
        self.assertReply(client.docmd("AUTH", "LOGIN"), 334)
        self.assertReply(client.docmd("*"), 501, "5.7.0")
        self.assertReply(client.docmd("AUTH", "PLAIN"), 334)
        self.assertReply(client.docmd("*"), 501, "5.7.0")
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)),
            235,
            "2.7.0",
        )

    def test_authUnknownMechanism(self) -> None:
        """
        A mechanism not offered gets 504 5.5.4.
        """
        client = self.tlsSession()
        self.assertReply(client.docmd("AUTH", "CRAM-MD5"), 504, "5.5.4")
        self.assertReply(client.docmd("AUTH", "XYZZY"), 504, "5.5.4")

    def test_authPlainOtherAuthzidRefused(self) -> None:
        """
        AUTH PLAIN with an authorization identity other than the user (acting
        as someone else) gets 535 5.7.8, even with the right password.
        """
        client = self.tlsSession()
        self.assertReply(
            client.docmd(
                "AUTH", "PLAIN " + plainResponse(USER, PASSWORD, authzid=OTHER_USER)
            ),
            535,
            "5.7.8",
        )
        self.assertReply(client.mail("x@sender.example"), 530, "5.7.0")

    def test_authPlainSameAuthzidAccepted(self) -> None:
        """
        AUTH PLAIN with the user itself as authorization identity is
        accepted.
        """
        client = self.tlsSession()
        self.assertReply(
            client.docmd(
                "AUTH", "PLAIN " + plainResponse(USER, PASSWORD, authzid=USER)
            ),
            235,
            "2.7.0",
        )

    def test_tls12AcceptedByDefault(self) -> None:
        """
        With the default C{minimum_version}, a TLS 1.2 client is served.
        """
        context = clientContext(maximum=ssl.TLSVersion.TLSv1_2)
        client = self.smtpSSL(context)
        self.assertEqual(client.sock.version(), "TLSv1.2")
        self.assertReply(client.ehlo(), 250)

    # -- implicit TLS ---------------------------------------------------------

    def test_implicitTLSSubmission(self) -> None:
        """
        On the implicit TLS port EHLO offers AUTH and no STARTTLS, AUTH LOGIN
        works, and the delivered message says C{with ESMTPSA} and the TLS
        version.
        """
        client = self.smtpSSL()
        self.assertReply(client.ehlo(), 250)
        self.assertEqual(
            client.esmtp_features.get("auth", "").split(), ["PLAIN", "LOGIN"]
        )
        self.assertFalse(client.has_extn("starttls"))
        self.assertReply(client.docmd("AUTH", "LOGIN"), 334)
        self.assertReply(client.docmd(b64(USER)), 334)
        self.assertReply(client.docmd(b64(PASSWORD)), 235, "2.7.0")
        marker = self.marker()
        sender, recipients = self.addresses()
        queueId = self.queuedId(
            self.submit(client, self.message(marker), sender, recipients)
        )
        content = self.relay.waitForDelivery(marker.encode())
        received, _ = self.splitDelivered(content, sender, recipients)
        self.assertIn(f" with ESMTPSA id {queueId}\n".encode(), received)
        self.assertIn(f"(using {client.sock.version()} with cipher ".encode(), received)

    # -- plain listener, no trusted networks --------------------------------

    def test_plainPortRefusesMailAfterEhlo(self) -> None:
        """
        On the plain port (no TLS, no trusted networks) EHLO offers neither
        AUTH nor STARTTLS, AUTH gets 538 5.7.11 and MAIL (even the null
        sender) 530 5.7.0: no open relay.
        """
        client = self.smtp(self.relay.plainPort)
        self.assertReply(client.ehlo(), 250)
        self.assertFalse(client.has_extn("auth"), client.esmtp_features)
        self.assertFalse(client.has_extn("starttls"), client.esmtp_features)
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)),
            538,
            "5.7.11",
        )
        sender, _ = self.addresses()
        self.assertReply(client.mail(sender), 530, "5.7.0")
        self.assertReply(client.mail(""), 530, "5.7.0")

    def test_plainPortRefusesMailAfterHelo(self) -> None:
        """
        On the plain port after HELO, MAIL gets 530 5.7.0.
        """
        client = self.smtp(self.relay.plainPort)
        self.assertReply(client.helo(), 250)
        sender, _ = self.addresses()
        self.assertReply(client.mail(sender), 530, "5.7.0")

    def test_plainPortRelayTricksRefused(self) -> None:
        """
        Without AUTH on the plain port, percent-hack, source-route and
        quoted-local-part recipients are all refused (after EHLO and after
        HELO), DATA is refused, and nothing is spooled.
        """
        marker = self.marker()
        tricks = [
            f"<user%other.example@{HOSTNAME}>",
            "<@a.example:u@b.example>",
            "<@a.example,@c.example:u@b.example>",
            f'<"u@b.example"@{HOSTNAME}>',
            "<u@b.example>",
        ]
        for greeting in (f"EHLO {CLIENT_NAME}", f"HELO {CLIENT_NAME}"):
            client = self.raw(self.relay.plainPort)
            self.assertReply(client.reply(), 220)
            self.assertReply(client.command(greeting), 250)
            self.assertReply(
                client.command("MAIL FROM:<attacker@evil.example>"), 530, "5.7.0"
            )
            for trick in tricks:
                reply = client.command(f"RCPT TO:{trick}")
                self.assertTrue(500 <= reply.code < 600, f"{trick}: {reply}")
            reply = client.command("DATA")
            self.assertTrue(500 <= reply.code < 600, f"DATA: {reply}")
            # Whatever is sent now is taken as commands, not as a message.
            for line in (b"Subject: " + marker.encode(), b"", b"spam", b"."):
                reply = client.command(line)
                self.assertTrue(500 <= reply.code < 600, f"{line!r}: {reply}")
            self.assertEqual(client.command("QUIT").code, 221)
        self.assertNothingSpooled(marker)

    # -- delivery ---------------------------------------------------------------

    def test_messageDeliveredByteExact(self) -> None:
        """
        A message submitted after STARTTLS and AUTH reaches the Maildir with
        the body as sent (LF line endings, dot-stuffing undone, 8-bit text
        and a 998-octet line intact), under a Received header naming this
        relay, ESMTPSA, the TLS version, the queue id of the 250 reply and
        the one recipient.
        """
        marker = self.marker()
        sender, recipients = self.addresses()
        client = self.authenticated()
        body = b"\r\n".join(
            [
                b"First line.",
                b".starts with a dot",
                b"..starts with two dots",
                b".",
                b"..",
                b"",
                "8-bit: Grüße aus Köln, 日本語, ☃".encode(),
                b"x" * 998,
                b"   leading and trailing spaces   ",
                b"\ttab",
                b"last line",
                b"",
            ]
        )
        message = self.message(marker, body)
        queueId = self.queuedId(
            self.submit(client, message, sender, recipients, ("BODY=8BITMIME",))
        )
        content = self.relay.waitForDelivery(marker.encode())
        received, delivered = self.splitDelivered(content, sender, recipients)
        self.assertEqual(delivered, message.replace(b"\r\n", b"\n"))
        self.assertTrue(
            received.startswith(f"Received: from {CLIENT_NAME} ([127.77.".encode()),
            received,
        )
        version = client.sock.version()
        self.assertIn(f"\t(using {version} with cipher ".encode(), received)
        self.assertIn(
            f"\tby {HOSTNAME} (smtpauth-relay) with ESMTPSA id {queueId}\n".encode(),
            received,
        )
        self.assertIn(f"\tfor <{recipients[0]}>; ".encode(), received)

    def test_dotStuffingOverRawSocket(self) -> None:
        """
        Dot-stuffed lines sent byte by byte (C{..x}, C{...}, C{..}) arrive
        with one leading dot removed, and a lone C{.} only after CRLF ends
        the message.
        """
        marker = self.marker()
        sender, recipients = self.addresses()
        client = self.rawAuthenticated()
        self.assertReply(client.command(f"MAIL FROM:<{sender}>"), 250)
        self.assertReply(client.command(f"RCPT TO:<{recipients[0]}>"), 250)
        self.assertReply(client.command("DATA"), 354)
        client.send(
            b"Subject: " + marker.encode() + b"\r\n\r\n"
            b"..hidden\r\n...\r\n..\r\na.b\r\n. not the end\r\n.\r\n"
        )
        queueId = self.queuedId(client.reply())
        content = self.relay.waitForDelivery(marker.encode())
        received, delivered = self.splitDelivered(content, sender, recipients)
        self.assertIn(f" id {queueId}\n".encode(), received)
        self.assertEqual(
            delivered,
            b"Subject: " + marker.encode() + b"\n\n.hidden\n..\n.\na.b\n not the end\n",
        )

    def test_dotStuffedLongestLineAccepted(self) -> None:
        """
        A 998-octet line that starts with a dot is accepted although it is
        999 octets once dot-stuffed: RFC 5321 section 4.5.3.1.6 does not
        count the dot added for transparency.
        """
        marker = self.marker()
        sender, recipients = self.addresses()
        client = self.authenticated()
        message = self.message(marker, b"." + b"d" * 997 + b"\r\n")
        self.queuedId(self.submit(client, message, sender, recipients))
        content = self.relay.waitForDelivery(marker.encode())
        _, delivered = self.splitDelivered(content, sender, recipients)
        self.assertEqual(delivered, message.replace(b"\r\n", b"\n"))

    def test_receivedHeloSanitised(self) -> None:
        """
        An EHLO name with parentheses and spaces cannot forge parts of the
        Received header: those characters become C{_}.
        """
        marker = self.marker()
        sender, recipients = self.addresses()
        client = self.tlsSession()
        self.assertReply(client.ehlo("evil.example) by trusted.example ("), 250)
        self.assertReply(
            client.docmd("AUTH", "PLAIN " + plainResponse(USER, PASSWORD)), 235
        )
        self.queuedId(self.submit(client, self.message(marker), sender, recipients))
        content = self.relay.waitForDelivery(marker.encode())
        received, _ = self.splitDelivered(content, sender, recipients)
        self.assertTrue(
            received.startswith(
                b"Received: from evil.example__by_trusted.example__ ([127.77."
            ),
            received,
        )
        self.assertNotIn(b"by trusted.example", received)

    def test_twoRecipientsNoForClause(self) -> None:
        """
        With two recipients, both are delivered (one file, both in
        X-Envelope-To) and the Received header has no C{for} clause.
        """
        marker = self.marker()
        sender, recipients = self.addresses(2)
        client = self.authenticated()
        queueId = self.queuedId(
            self.submit(client, self.message(marker), sender, recipients)
        )
        content = self.relay.waitForDelivery(marker.encode())
        received, _ = self.splitDelivered(content, sender, recipients)
        self.assertIn(f"with ESMTPSA id {queueId}\n".encode(), received)
        self.assertNotIn(b"for <", received)
        for recipient in recipients:
            self.assertNotIn(recipient.encode(), received)

    def test_overlongDataLineRefused(self) -> None:
        """
        A 999-octet line (1001 with CRLF) fails the message with 554 5.6.0
        after the final dot; nothing is spooled, and the next message in the
        same session is accepted and delivered.
        """
        tooLong = self.marker()
        sender, recipients = self.addresses()
        client = self.authenticated()
        body = b"before\r\n" + b"y" * 999 + b"\r\nafter\r\n"
        self.assertReply(
            self.submit(client, self.message(tooLong, body), sender, recipients),
            554,
            "5.6.0",
        )
        self.assertReply(client.noop(), 250, "2.0.0")
        fine = self.marker()
        self.queuedId(self.submit(client, self.message(fine), sender, recipients))
        self.relay.waitForDelivery(fine.encode())
        self.assertNothingSpooled(tooLong)

    def test_veryLongDataLineRefused(self) -> None:
        """
        A 100000-octet line, longer than the relay buffers, also fails the
        message with 554 5.6.0 after the final dot, and the session goes on.
        """
        tooLong = self.marker()
        sender, recipients = self.addresses()
        client = self.authenticated()
        body = b"before\r\n" + b"z" * 100000 + b"\r\nafter\r\n"
        self.assertReply(
            self.submit(client, self.message(tooLong, body), sender, recipients),
            554,
            "5.6.0",
        )
        self.assertReply(client.noop(), 250, "2.0.0")
        self.assertNothingSpooled(tooLong)

    # -- SMTP smuggling -----------------------------------------------------------

    def assertSmugglingRefused(self, client: RawSMTP, separator: bytes) -> None:
        """
        On an authenticated session, a message whose body holds
        C{separator} (a would-be end of data) and a second, smuggled
        transaction gets exactly one reply, 550 5.6.11, and nothing is
        delivered.
        """
        marker = self.marker()
        sender, recipients = self.addresses(2)
        self.assertReply(client.command(f"MAIL FROM:<{sender}>"), 250)
        self.assertReply(client.command(f"RCPT TO:<{recipients[0]}>"), 250)
        self.assertReply(client.command("DATA"), 354)
        client.send(
            b"Subject: "
            + marker.encode()
            + b"-first\r\n\r\nfirst part"
            + separator
            + b"MAIL FROM:<x@evil.example>\r\n"
            + f"RCPT TO:<{recipients[1]}>\r\n".encode()
            + b"DATA\r\n"
            + b"From: <ceo@victim.example>\r\n"
            + b"Subject: "
            + marker.encode()
            + b"-smuggled\r\n\r\n"
            + b"smuggled\r\n.\r\n"
        )
        self.assertReply(client.reply(), 550, "5.6.11")
        # Any reply for a smuggled transaction would come before QUIT's.
        replies = [client.command("QUIT")] + client.readUntilClosed()
        self.assertEqual([r.code for r in replies], [221], [str(r) for r in replies])
        self.assertNothingSpooled(marker)

    def test_smugglingBareLFDotBareLF(self) -> None:
        """
        C{LF . LF} inside DATA does not end the message: the whole message
        is refused with one 550 5.6.11 after the real final dot.
        """
        self.assertSmugglingRefused(self.rawAuthenticated(), b"\n.\n")

    def test_smugglingCRLFDotBareLF(self) -> None:
        """
        C{CRLF . LF} inside DATA is refused with one 550 5.6.11.
        """
        self.assertSmugglingRefused(self.rawAuthenticated(), b"\r\n.\n")

    def test_smugglingBareLFDotCRLF(self) -> None:
        """
        C{LF . CRLF} inside DATA is refused with one 550 5.6.11.
        """
        self.assertSmugglingRefused(self.rawAuthenticated(), b"\n.\r\n")

    def test_smugglingBareCRDotBareCR(self) -> None:
        """
        C{CR . CR} inside DATA is refused with one 550 5.6.11.
        """
        self.assertSmugglingRefused(self.rawAuthenticated(), b"\r.\r")

    def test_smugglingOverStartTLS(self) -> None:
        """
        The same smuggling attempt (C{LF . LF}) in a session upgraded with
        STARTTLS by hand is refused with one 550 5.6.11.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(client.command("STARTTLS"), 220, "2.0.0")
        client.startTLS()
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(
            client.command("AUTH PLAIN " + plainResponse(USER, PASSWORD)), 235
        )
        self.assertSmugglingRefused(client, b"\n.\n")

    # -- SIZE and recipients ----------------------------------------------------

    def test_sizeAdvertisedAndDeclaredSizeChecked(self) -> None:
        """
        EHLO advertises SIZE with C{max_message_size}; MAIL with a larger
        SIZE= gets 552 5.3.4, with exactly that size 250.
        """
        client = self.authenticated()
        self.assertEqual(client.esmtp_features.get("size"), str(MAX_MESSAGE_SIZE))
        sender, _ = self.addresses()
        self.assertReply(
            client.mail(sender, [f"SIZE={MAX_MESSAGE_SIZE + 1}"]), 552, "5.3.4"
        )
        self.assertReply(client.mail(sender, [f"SIZE={MAX_MESSAGE_SIZE}"]), 250)

    def test_actualSizeTooBig(self) -> None:
        """
        A message larger than C{max_message_size} (declared or not) gets
        552 5.3.4 after the final dot and is not spooled; the session goes
        on.
        """
        marker = self.marker()
        sender, recipients = self.addresses()
        client = self.authenticated()
        body = (b"a" * 98 + b"\r\n") * (MAX_MESSAGE_SIZE // 100 + 10)
        self.assertReply(
            self.submit(client, self.message(marker, body), sender, recipients),
            552,
            "5.3.4",
        )
        self.assertReply(client.noop(), 250, "2.0.0")
        self.assertNothingSpooled(marker)

    def test_sizeBoundary(self) -> None:
        """
        A message of exactly C{max_message_size} octets (CRLFs counted, the
        final dot not) is accepted; one octet more gets 552 5.3.4 after the
        final dot and is not spooled.
        """
        sender, recipients = self.addresses()
        client = self.authenticated()
        markers = []
        for extra in (0, 1):
            marker = self.marker()
            markers.append(marker)
            head = self.message(marker, b"")
            missing = MAX_MESSAGE_SIZE + extra - len(head)
            lines, rest = divmod(missing, 80)
            # Lines of 78 octets and CRLF, then one of the rest (at least 3).
            body = (b"f" * 78 + b"\r\n") * (lines - 1) + b"g" * (78 + rest) + b"\r\n"
            message = head + body
            self.assertEqual(len(message), MAX_MESSAGE_SIZE + extra)
            self.assertReply(
                client.mail(sender, [f"SIZE={MAX_MESSAGE_SIZE}"]), 250, "2.1.0"
            )
            self.assertReply(client.rcpt(recipients[0]), 250)
            reply = client.data(message)
            if extra == 0:
                self.queuedId(reply)
            else:
                self.assertReply(reply, 552, "5.3.4")
        self.relay.waitForDelivery(markers[0].encode())
        self.assertNothingSpooled(markers[1])

    def test_maxRecipients(self) -> None:
        """
        RCPTs beyond C{max_recipients} get 452 4.5.3; the message goes to
        the accepted ones.
        """
        marker = self.marker()
        sender, recipients = self.addresses(MAX_RECIPIENTS + 1)
        client = self.authenticated()
        self.assertReply(client.mail(sender), 250)
        for recipient in recipients[:MAX_RECIPIENTS]:
            self.assertReply(client.rcpt(recipient), 250, "2.1.5")
        self.assertReply(client.rcpt(recipients[-1]), 452, "4.5.3")
        self.queuedId(client.data(self.message(marker)))
        content = self.relay.waitForDelivery(marker.encode())
        self.splitDelivered(content, sender, recipients[:MAX_RECIPIENTS])
        self.assertNotIn(recipients[-1].encode(), content)

    # -- commands -----------------------------------------------------------------

    def test_unknownCommand(self) -> None:
        """
        An unknown command gets 500 5.5.1.
        """
        client = self.smtp()
        self.assertReply(client.docmd("FROBNICATE", "now"), 500, "5.5.1")
        self.assertReply(client.docmd("XSTARTTLS"), 500, "5.5.1")

    def test_vrfyAndExpn(self) -> None:
        """
        VRFY gets 252 (no verdict on the address) and EXPN 502.
        """
        client = self.smtp()
        client.ehlo()
        self.assertReply(client.verify(USER), 252, "2.5.0")
        self.assertReply(client.expn("staff"), 502, "5.5.1")

    def test_overlongCommandLine(self) -> None:
        """
        A 600-octet command line gets 500 5.5.2 and the session keeps
        working.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(b"NOOP " + b"n" * 595), 500, "5.5.2")
        self.assertReply(client.command(b"RCPT TO:<" + b"r" * 590 + b">"), 500, "5.5.2")
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(client.command("NOOP"), 250, "2.0.0")

    def test_hugeCommandLine(self) -> None:
        """
        A 100000-octet command line gets one 500 5.5.2 and the session keeps
        working.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(b"NOOP " + b"n" * 100000), 500, "5.5.2")
        self.assertReply(client.command("NOOP"), 250, "2.0.0")

    # -- pipelining -------------------------------------------------------------

    def test_pipelining(self) -> None:
        """
        After AUTH, MAIL, RCPT and DATA sent at once get 250, 250, 354 in
        order; the message, the final dot and QUIT sent at once get 250 then
        221, and the message is delivered.
        """
        marker = self.marker()
        sender, recipients = self.addresses()
        client = self.rawAuthenticated()
        client.send(
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipients[0]}>\r\nDATA\r\n".encode()
        )
        self.assertReply(client.reply(), 250, "2.1.0")
        self.assertReply(client.reply(), 250, "2.1.5")
        self.assertReply(client.reply(), 354)
        client.send(self.message(marker) + b".\r\nQUIT\r\n")
        queueId = self.queuedId(client.reply())
        replies = client.readUntilClosed()
        self.assertEqual([r.code for r in replies], [221], [str(r) for r in replies])
        content = self.relay.waitForDelivery(marker.encode())
        self.assertIn(f" id {queueId}\n".encode(), content)

    def test_startTLSDropsPipelinedCommands(self) -> None:
        """
        A command sent in the same packet as STARTTLS (in the clear) is
        never answered: the first reply inside TLS is the one to the EHLO
        sent after the handshake, and no transaction was started.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        self.assertReply(client.reply(), 220, "2.0.0")
        client.startTLS()
        reply = client.command(f"EHLO {CLIENT_NAME}")
        self.assertEqual(reply.code, 250, str(reply))
        self.assertTrue(reply.lines[0].startswith(HOSTNAME), str(reply))
        self.assertIn("AUTH PLAIN LOGIN", reply.lines)
        self.assertReply(
            client.command("AUTH PLAIN " + plainResponse(USER, PASSWORD)), 235
        )
        # Had the injected MAIL been taken, this would be 503 nested MAIL.
        sender, _ = self.addresses()
        self.assertReply(client.command(f"MAIL FROM:<{sender}>"), 250, "2.1.0")

    def test_mailAfterStartTLSBeforeEhlo(self) -> None:
        """
        STARTTLS forgets the EHLO: MAIL and AUTH after the handshake but
        before a new EHLO get 503 5.5.1.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(client.command("STARTTLS"), 220)
        client.startTLS()
        self.assertReply(client.command("MAIL FROM:<a@b.example>"), 503, "5.5.1")
        self.assertReply(
            client.command("AUTH PLAIN " + plainResponse(USER, PASSWORD)),
            503,
            "5.5.1",
        )
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)

    # -- swaks ------------------------------------------------------------------

    def swaks(self, tlsOption: str, port: int, mechanism: str) -> None:
        """
        Deliver a message with swaks and check it arrives.
        """
        if not os.path.exists(SWAKS):
            raise SkipTest(f"swaks is not installed at {SWAKS}")
        marker = self.marker()
        sender, recipients = self.addresses()
        command = [
            SWAKS,
            "--server",
            HOST,
            "--port",
            str(port),
            tlsOption,
            "--auth",
            mechanism,
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
            "--from",
            sender,
            "--to",
            recipients[0],
            "--helo",
            CLIENT_NAME,
            "--local-interface",
            nextSourceAddress(),
            "--header",
            f"Subject: {marker}",
            "--body",
            "Sent by swaks.",
            "--timeout",
            "10",
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, output)
        self.assertIn(f"{mechanism}", output)
        content = self.relay.waitForDelivery(marker.encode())
        received, delivered = self.splitDelivered(content, sender, recipients)
        self.assertIn(b" with ESMTPSA id ", received)
        self.assertIn(b"\nSent by swaks.\n", delivered)

    def test_swaksStartTLSPlain(self) -> None:
        """
        swaks --tls --auth PLAIN delivers a message (exit status 0).
        """
        self.swaks("--tls", self.relay.starttlsPort, "PLAIN")

    def test_swaksStartTLSLogin(self) -> None:
        """
        swaks --tls --auth LOGIN delivers a message (exit status 0).
        """
        self.swaks("--tls", self.relay.starttlsPort, "LOGIN")

    def test_swaksImplicitPlain(self) -> None:
        """
        swaks --tls-on-connect --auth PLAIN delivers a message.
        """
        self.swaks("--tls-on-connect", self.relay.implicitPort, "PLAIN")

    def test_swaksImplicitLogin(self) -> None:
        """
        swaks --tls-on-connect --auth LOGIN delivers a message.
        """
        self.swaks("--tls-on-connect", self.relay.implicitPort, "LOGIN")

    # -- garbage ----------------------------------------------------------------

    def test_httpRequestClosesConnection(self) -> None:
        """
        An HTTP request on the SMTP port closes that connection, and the
        relay still serves a new session.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        client.send(b"GET / HTTP/1.1\r\nHost: relay\r\nUser-Agent: e2e\r\n\r\n")
        self.assertTrue(client.closedWithoutReply())
        other = self.raw()
        self.assertReply(other.reply(), 220)
        self.assertReply(other.command(f"EHLO {CLIENT_NAME}"), 250)

    def test_tlsHandshakeOnPlainPort(self) -> None:
        """
        A TLS handshake on the plain port fails and closes that connection,
        and the relay still serves a new session there.
        """
        client = self.raw(self.relay.plainPort)
        self.assertReply(client.reply(), 220)
        with self.assertRaises((ssl.SSLError, OSError)):
            client.startTLS()
            client.command("EHLO x")
        other = self.raw(self.relay.plainPort)
        self.assertReply(other.reply(), 220)
        self.assertReply(other.command(f"HELO {CLIENT_NAME}"), 250)


class LimitsTests(SharedRelay):
    """
    A relay with small connection limits, a 2 second idle timeout and TLS
    1.3 as the minimum version.
    """

    relayServer = {"max_connections_per_ip": 3, "idle_timeout": 2}
    relayTLS = {"minimum_version": "TLSv1.3"}

    def test_perAddressConnectionLimit(self) -> None:
        """
        The 4th simultaneous connection from one address gets 421 4.7.0 at
        connect and is closed, while the other 3 go on working; once one of
        them leaves, a new connection is served again.
        """
        source = nextSourceAddress()

        def connect() -> RawSMTP:
            client = RawSMTP(self.relay.starttlsPort, sourceAddress=source)
            self.addCleanup(client.close)
            return client

        sessions = [connect() for _ in range(3)]
        for client in sessions:
            self.assertReply(client.reply(), 220)
        refused = connect()
        self.assertReply(refused.reply(), 421, "4.7.0")
        self.assertEqual(refused.readUntilClosed(), [])
        for client in sessions:
            self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        # Another address is not affected.
        elsewhere = self.raw()
        self.assertReply(elsewhere.reply(), 220)
        sessions.pop().close()

        def served() -> bool:
            client = connect()
            reply = client.reply()
            client.close()
            return reply.code == 220

        poll(served, 10, lambda: "a connection served after one closed")

    def test_idleTimeout(self) -> None:
        """
        A session that stays silent for C{idle_timeout} seconds gets
        421 4.4.2 and is closed.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        started = time.monotonic()
        self.assertReply(client.reply(), 421, "4.4.2")
        self.assertGreater(time.monotonic() - started, 1.0)
        self.assertEqual(client.readUntilClosed(), [])

    def assertClosedWithin(self, sock: socket.socket, seconds: float) -> bytes:
        """
        Read from C{sock} until the relay closes it, which must happen
        within C{seconds}; return what was read.
        """
        sock.settimeout(seconds)
        received = b""
        started = time.monotonic()
        try:
            while chunk := sock.recv(65536):
                received += chunk
                sock.settimeout(max(0.1, seconds - (time.monotonic() - started)))
        except TimeoutError:
            self.fail(
                f"still open after {seconds}s (idle_timeout is 2s); "
                f"received {received!r}\n{self.relay.log()}"
            )
        except ConnectionResetError:
            pass
        return received

    def test_idleTimeoutBeforeImplicitTLSHandshake(self) -> None:
        """
        A client that connects to the implicit TLS port and never starts the
        handshake is disconnected after C{idle_timeout}, like any idle
        session, so silent connections cannot pile up.
        """
        sock = socket.create_connection(
            (HOST, self.relay.implicitPort),
            timeout=IO_TIMEOUT,
            source_address=(nextSourceAddress(), 0),
        )
        self.addCleanup(sock.close)
        self.assertClosedWithin(sock, IO_TIMEOUT)

    def test_idleTimeoutAfterStartTLSBeforeHandshake(self) -> None:
        """
        A client that sends STARTTLS, gets 220 and never starts the handshake
        is disconnected after C{idle_timeout}.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(client.command("STARTTLS"), 220)
        self.assertClosedWithin(client.sock, IO_TIMEOUT)

    def test_silentImplicitTLSConnectionsFreeTheirSlots(self) -> None:
        """
        Connections to the implicit TLS port that never start the handshake
        do not keep their address's C{max_connections_per_ip} slots for
        ever: once the idle timeout has closed them, a TLS client from that
        address is served.
        """
        source = nextSourceAddress()
        for _ in range(3):
            sock = socket.create_connection(
                (HOST, self.relay.implicitPort),
                timeout=IO_TIMEOUT,
                source_address=(source, 0),
            )
            self.addCleanup(sock.close)

        def served() -> bool:
            try:
                client = RawSMTP(
                    self.relay.implicitPort, implicitTLS=True, sourceAddress=source
                )
            except OSError:
                return False
            try:
                return client.reply().code == 220
            except (OSError, ConnectionClosed):
                return False
            finally:
                client.close()

        poll(
            served,
            IO_TIMEOUT,
            lambda: (
                "a TLS session from an address whose silent connections "
                "should have timed out after 2s\n" + self.relay.log()
            ),
            interval=0.5,
        )

    def test_tlsFloorRefusesTLS12(self) -> None:
        """
        With C{minimum_version = "TLSv1.3"}, a client limited to TLS 1.2
        fails the handshake on the implicit port and after STARTTLS.
        """
        context = clientContext(maximum=ssl.TLSVersion.TLSv1_2)
        with self.assertRaises(ssl.SSLError):
            RawSMTP(
                self.relay.implicitPort,
                implicitTLS=True,
                context=context,
                sourceAddress=nextSourceAddress(),
            ).close()
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(client.command("STARTTLS"), 220)
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            client.startTLS(context)

    def test_tlsFloorAcceptsTLS13(self) -> None:
        """
        With C{minimum_version = "TLSv1.3"}, a TLS 1.3 client is served on
        the implicit port.
        """
        client = self.raw(implicitTLS=True)
        self.assertEqual(client.sock.version(), "TLSv1.3")  # type: ignore[attr-defined]
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)


class CrashRecoveryTests(SharedRelay):
    """
    C{kill -9} after the 250 loses nothing: each test runs its own relay.
    """

    def setUp(self) -> None:
        self.relay = RelayProcess()
        self.addCleanup(self.relay.remove)
        self.relay.start()

    def test_sigtermStopsRelay(self) -> None:
        """
        SIGTERM (what systemd sends) stops the relay cleanly within seconds,
        even with a session open, and closes that session with 421 4.3.2.
        """
        client = self.raw()
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        process = self.relay.process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(
                f"still running {STOP_TIMEOUT}s after SIGTERM\n{self.relay.log()}"
            )
        # twistd ends by re-raising the signal it stopped for (status
        # -SIGTERM), which systemd counts as a clean stop.
        self.assertIn(status, (0, -signal.SIGTERM), self.relay.log())
        self.assertIn("Server Shut Down.", self.relay.log())
        client.sock.settimeout(IO_TIMEOUT)
        try:
            rest = client.readUntilClosed()
        except ConnectionResetError:
            rest = []
        self.assertEqual([str(r) for r in rest], ["421 4.3.2 Service shutting down"])

    def test_killAfterQueuedKeepsMessage(self) -> None:
        """
        A message accepted (250) while delivery is impossible survives
        C{kill -9} in C{queue/queued/ID.msg} and C{ID.env} (JSON with the
        sender, the recipients and the AUTH user); restarted with delivery
        possible again (and flushed), the relay delivers it and empties the
        spool.
        """
        relay = self.relay
        # Delivery fails while the Maildir path is a regular file.
        shutil.rmtree(relay.maildir)
        with open(relay.maildir, "w") as f:
            f.write("not a maildir\n")
        marker = self.marker()
        sender, recipients = self.addresses()
        client = self.authenticated()
        message = self.message(marker)
        queueId = self.queuedId(self.submit(client, message, sender, recipients))
        relay.kill9()
        closeQuietly(client)

        queued = os.path.join(relay.queueDirectory, "queued")
        msgPath = os.path.join(queued, queueId + ".msg")
        envPath = os.path.join(queued, queueId + ".env")
        self.assertTrue(os.path.isfile(msgPath), os.listdir(queued))
        self.assertTrue(os.path.isfile(envPath), os.listdir(queued))
        with open(envPath, "rb") as f:
            envelope: dict[str, Any] = json.load(f)
        self.assertEqual(envelope["queueId"], queueId)
        self.assertEqual(envelope["sender"], sender)
        self.assertEqual(envelope["recipients"], recipients)
        self.assertEqual(envelope["authUser"], USER)
        with open(msgPath, "rb") as f:
            spooled = f.read()
        self.assertTrue(spooled.endswith(message.replace(b"\r\n", b"\n")), spooled)

        os.unlink(relay.maildir)
        relay.start()
        # The first attempt may have failed before the kill, scheduling the
        # next one a minute later: ask for it now.
        status, output = queueCommand(relay, "flush")
        self.assertEqual(status, 0, output)
        content = relay.waitForDelivery(marker.encode())
        received, delivered = self.splitDelivered(content, sender, recipients)
        self.assertIn(f" id {queueId}\n".encode(), received)
        self.assertEqual(delivered, message.replace(b"\r\n", b"\n"))
        poll(
            lambda: not os.path.exists(envPath) and not os.path.exists(msgPath),
            10,
            lambda: f"{queueId} to leave the spool: {relay.spoolFiles()}",
        )
