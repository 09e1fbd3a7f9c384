"""
Tests for L{smtpauth_relay.bounce}.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from collections.abc import Iterator, Sequence
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.bounce import (
    EXPIRED_STATUS,
    LOCAL_DIAGNOSTIC_TYPE,
    RecipientFailure,
    makeBounce,
    shouldBounce,
    statusCode,
)
from smtpauth_relay.envelope import Attempt, Envelope

HOST = "relay.example.org"
NOW = 1_700_432_000
RECEIVED = NOW - 5 * 86400 - 600
LAST_ATTEMPT = NOW - 300

ENVELOPE = Envelope(
    queueId="018BE5A1C2D0F3A9B1",
    sender="alice@example.org",
    recipients=("bob@example.com", "carol@example.net", "dave@example.com"),
    authUser="alice",
    clientAddress="192.0.2.7",
    helo="laptop",
    receivedAt=RECEIVED,
    size=1234,
    attempts=(
        Attempt(RECEIVED + 60, "mx.example.com", "451 4.7.1 try later"),
        Attempt(LAST_ATTEMPT, "mx.example.com", "550 5.1.1 no such user"),
    ),
)

ORIGINAL_HEADERS = (
    b"Received: from laptop (laptop [192.0.2.7])\n"
    b"\tby relay.example.org with ESMTPSA id 018BE5A1C2D0F3A9B1;\n"
    b"\tSun, 19 Nov 2023 22:13:20 +0000\n"
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@example.com>\n"
    b"Subject: Quarterly figures\n"
    b"Message-ID: <abc123@laptop.example.org>\n"
)
ORIGINAL_BODY = b"Secret body text\nsecond line\n"

BOB = RecipientFailure(
    "bob@example.com",
    "550 5.1.1 <bob@example.com>: Recipient address rejected",
    "mx.example.com",
)
CAROL = RecipientFailure(
    "carol@example.net",
    "452 4.2.2 Mailbox full",
    "mx.example.net",
    action="delayed",
)
DAVE = RecipientFailure("dave@example.com", "connection refused", None)

CODE = re.compile(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}")

asciiText = st.text(alphabet=st.characters(max_codepoint=127))


def parse(raw: bytes) -> EmailMessage:
    """
    Parse a bounce as a mail client would.
    """
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[Message]:
    """
    The three parts of a parsed bounce.
    """
    payload = message.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def statusBlocks(message: EmailMessage) -> list[Message]:
    """
    The field blocks of a parsed bounce's C{message/delivery-status} part:
    per-message fields first, then one block per recipient.
    """
    blocks = parts(message)[1].get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


class StatusCodeTests(SynchronousTestCase):
    """
    Tests for L{statusCode}.
    """

    def test_enhancedCode(self) -> None:
        """
        The enhanced status code in the reply is the status.
        """
        self.assertEqual(
            statusCode("550 5.1.1 <bob@x>: Recipient address rejected", True),
            "5.1.1",
        )
        self.assertEqual(statusCode("451 4.7.1 Greylisted", False), "4.7.1")
        self.assertEqual(statusCode("552 5.3.4 Message too big", False), "5.3.4")

    def test_multiLineReply(self) -> None:
        """
        The code of a multi-line reply is read from its first line.
        """
        self.assertEqual(
            statusCode("550-5.1.1 The account\n550 5.1.1 does not exist", True),
            "5.1.1",
        )
        self.assertEqual(statusCode("550\n550 5.1.1 no", True), "5.0.0")

    def test_classMismatch(self) -> None:
        """
        An enhanced code whose class disagrees with the basic code is not
        believed: the basic code's class is the status.
        """
        self.assertEqual(statusCode("550 4.1.1 confused", False), "5.0.0")
        self.assertEqual(statusCode("451 5.7.1 confused", True), "4.0.0")
        self.assertEqual(statusCode("550 2.0.0 confused", True), "5.0.0")

    def test_basicCodeOnly(self) -> None:
        """
        A reply without an enhanced code gives its class with C{0.0}.
        """
        self.assertEqual(statusCode("550 No such user", False), "5.0.0")
        self.assertEqual(statusCode("452 Too many recipients", True), "4.0.0")
        self.assertEqual(statusCode("554", False), "5.0.0")
        self.assertEqual(statusCode("421-Busy\n421 Come back later", True), "4.0.0")

    def test_noCode(self) -> None:
        """
        A reason without any code is permanent or temporary as the caller
        says.
        """
        self.assertEqual(statusCode("connection refused", True), "5.0.0")
        self.assertEqual(statusCode("connection refused", False), "4.0.0")
        self.assertEqual(statusCode("", True), "5.0.0")

    def test_enhancedCodeWithoutBasicCode(self) -> None:
        """
        A local reason may carry an enhanced code, used when its class
        agrees with C{permanent}.
        """
        self.assertEqual(statusCode("4.4.1 connection timed out", False), "4.4.1")
        self.assertEqual(statusCode("4.4.1 connection timed out", True), "5.0.0")

    def test_notAFailureCode(self) -> None:
        """
        A 2xx or 3xx code says nothing about the failure: the class comes
        from C{permanent}.
        """
        self.assertEqual(statusCode("250 ok", True), "5.0.0")
        self.assertEqual(statusCode("354 go ahead", False), "4.0.0")

    def test_notCodes(self) -> None:
        """
        Digits that are not a well-formed code are ignored.
        """
        self.assertEqual(statusCode("5501 what", False), "4.0.0")
        self.assertEqual(statusCode("550 5.1.1: no", False), "5.0.0")
        self.assertEqual(statusCode("550 5.1234.1 no", False), "5.0.0")
        self.assertEqual(statusCode("550 3.1.1 no", False), "5.0.0")

    @settings(derandomize=True, max_examples=500)
    @given(reply=asciiText, permanent=st.booleans())
    def test_alwaysAStatus(self, reply: str, permanent: bool) -> None:
        """
        Any text gives a 4.x.x or 5.x.x status, in the class of its basic
        code when it has a 4xx or 5xx one.
        """
        status = statusCode(reply, permanent)
        self.assertTrue(CODE.fullmatch(status), status)
        basic = re.match(r"([45])[0-9]{2}(?:[ -]|$)", reply.lstrip())
        if basic is not None:
            self.assertEqual(status[0], basic.group(1))


class ShouldBounceTests(SynchronousTestCase):
    """
    Tests for L{shouldBounce}.
    """

    def test_nullSender(self) -> None:
        """
        A message from the null sender is never bounced.
        """
        self.assertFalse(shouldBounce(Envelope("Q1", "", ("bob@example.com",))))

    def test_sender(self) -> None:
        """
        A message with a sender is bounced to it.
        """
        self.assertTrue(shouldBounce(ENVELOPE))


class RecipientFailureTests(SynchronousTestCase):
    """
    Tests for L{RecipientFailure}.
    """

    def test_defaultAction(self) -> None:
        """
        A failure is final unless said otherwise.
        """
        self.assertEqual(RecipientFailure("a@b", "550 no", "mx").action, "failed")

    def test_badAction(self) -> None:
        """
        Only RFC 3464's C{failed} and C{delayed} are accepted.
        """
        self.assertRaises(
            ValueError, RecipientFailure, "a@b", "550 no", "mx", action="bounced"
        )


class MakeBounceTests(SynchronousTestCase):
    """
    Tests for L{makeBounce}.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.messagePath = self.writeMessage(ORIGINAL_HEADERS + b"\n" + ORIGINAL_BODY)

    def writeMessage(self, content: bytes) -> str:
        """
        Write C{content} as the original message file.

        @return: its path.
        """
        path = os.path.join(self.directory, "message.msg")
        with open(path, "wb") as f:
            f.write(content)
        return path

    def bounce(
        self,
        failures: Sequence[RecipientFailure] = (BOB,),
        envelope: Envelope = ENVELOPE,
        **kwargs: object,
    ) -> bytes:
        """
        Make a bounce of the original message and check it is well-formed.
        """
        raw = makeBounce(
            envelope,
            failures,
            self.messagePath,
            HOST,
            NOW,
            **kwargs,  # type: ignore[arg-type]
        )
        self.assertWellFormed(raw, len(failures))
        return raw

    def assertWellFormed(self, raw: bytes, recipients: int) -> EmailMessage:
        """
        Check C{raw} is a 7-bit, LF-terminated bounce without CR or overlong
        lines, whose structure the C{email} package parses without defects:
        exactly the expected top-level headers, three parts, and one status
        block per recipient holding only RFC 3464 fields.
        """
        raw.decode("ascii")
        self.assertNotIn(b"\r", raw)
        self.assertTrue(raw.endswith(b"\n"))
        for line in raw.split(b"\n"):
            self.assertLessEqual(len(line), 998)
        message = parse(raw)
        for part in message.walk():
            self.assertEqual(part.defects, [])
        self.assertEqual(
            message.keys(),
            [
                "From",
                "To",
                "Subject",
                "Date",
                "Message-ID",
                "Auto-Submitted",
                "MIME-Version",
                "Content-Type",
            ],
        )
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(
            [p.get_content_type() for p in parts(message)],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        blocks = statusBlocks(message)
        self.assertEqual(len(blocks), 1 + recipients)
        allowed = {
            "Final-Recipient",
            "Action",
            "Status",
            "Remote-MTA",
            "Diagnostic-Code",
            "Last-Attempt-Date",
        }
        for block in blocks[1:]:
            self.assertLessEqual(set(block.keys()), allowed)
            self.assertEqual(len(block.keys()), len(set(block.keys())))
            self.assertIn(block["Action"], ("failed", "delayed"))
            self.assertTrue(CODE.fullmatch(block["Status"]))
        return message

    def test_headers(self) -> None:
        """
        The bounce comes from the mailer daemon of the reporting host, goes
        to the envelope sender, is marked automatic (RFC 3834) and is a
        delivery-status report.
        """
        raw = self.bounce()
        message = parse(raw)
        self.assertEqual(
            message["From"], f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
        )
        self.assertIn(b"\nTo: <alice@example.org>\n", raw)
        self.assertEqual(message["To"].addresses[0].addr_spec, "alice@example.org")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(parsedate_to_datetime(message["Date"]).timestamp(), NOW)
        self.assertRegex(
            message["Message-ID"], rf"^<018BE5A1C2D0F3A9B1\.[0-9a-f]+@{HOST}>$"
        )
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertTrue(message.get_boundary())

    def test_uniqueMessageIds(self) -> None:
        """
        Two bounces of the same message have different Message-IDs and
        boundaries.
        """
        first, second = parse(self.bounce()), parse(self.bounce())
        self.assertNotEqual(first["Message-ID"], second["Message-ID"])
        self.assertNotEqual(first.get_boundary(), second.get_boundary())

    def test_explanation(self) -> None:
        """
        The first part tells the sender, in plain ASCII, who was not reached,
        what the receiving server replied, and that the message was not
        delivered.
        """
        explanation = parts(parse(self.bounce()))[0]
        self.assertEqual(explanation.get_content_type(), "text/plain")
        self.assertEqual(explanation.get_param("charset"), "us-ascii")
        text = explanation.get_payload()
        assert isinstance(text, str)
        self.assertIn("could not be delivered", text)
        self.assertIn("bob@example.com", text)
        self.assertIn("mx.example.com", text)
        self.assertIn("550 5.1.1 <bob@example.com>: Recipient address rejected", text)
        self.assertNotIn("still trying", text.lower())

    def test_perMessageFields(self) -> None:
        """
        The report names the reporting MTA, the queue id and the arrival
        date.
        """
        perMessage = statusBlocks(parse(self.bounce()))[0]
        self.assertEqual(perMessage["Reporting-MTA"], f"dns; {HOST}")
        self.assertEqual(perMessage["X-Queue-ID"], "018BE5A1C2D0F3A9B1")
        self.assertEqual(
            parsedate_to_datetime(perMessage["Arrival-Date"]).timestamp(), RECEIVED
        )

    def test_perRecipientFields(self) -> None:
        """
        Each recipient gets a block, in order, with its action, status,
        remote MTA, SMTP diagnostic and last attempt date.
        """
        message = parse(self.bounce([BOB, CAROL, DAVE]))
        blocks = statusBlocks(message)[1:]
        self.assertEqual(
            [dict(b.items()) for b in blocks],
            [
                {
                    "Final-Recipient": "rfc822; bob@example.com",
                    "Action": "failed",
                    "Status": "5.1.1",
                    "Remote-MTA": "dns; mx.example.com",
                    "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>:"
                    " Recipient address rejected",
                    "Last-Attempt-Date": blocks[0]["Last-Attempt-Date"],
                },
                {
                    "Final-Recipient": "rfc822; carol@example.net",
                    "Action": "delayed",
                    "Status": "4.2.2",
                    "Remote-MTA": "dns; mx.example.net",
                    "Diagnostic-Code": "smtp; 452 4.2.2 Mailbox full",
                    "Last-Attempt-Date": blocks[0]["Last-Attempt-Date"],
                },
                {
                    "Final-Recipient": "rfc822; dave@example.com",
                    "Action": "failed",
                    "Status": "5.0.0",
                    "Diagnostic-Code": f"{LOCAL_DIAGNOSTIC_TYPE}; connection refused",
                    "Last-Attempt-Date": blocks[0]["Last-Attempt-Date"],
                },
            ],
        )
        for block in blocks:
            self.assertEqual(
                parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp(),
                LAST_ATTEMPT,
            )
        text = parts(message)[0].get_payload()
        assert isinstance(text, str)
        for failure in (BOB, CAROL, DAVE):
            self.assertIn(failure.recipient, text)
            self.assertIn(failure.reply, text)

    def test_lastAttemptDateWithoutAttempts(self) -> None:
        """
        With no attempt recorded, the last attempt date is now.
        """
        envelope = Envelope("Q1", "alice@example.org", ("bob@example.com",))
        block = statusBlocks(parse(self.bounce(envelope=envelope)))[1]
        self.assertEqual(
            parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp(), NOW
        )

    def test_multiLineReply(self) -> None:
        """
        The lines of a multi-line reply are joined with spaces; the status
        comes from the first line.
        """
        failure = RecipientFailure(
            "bob@example.com",
            "550-5.1.1 The email account that you tried to reach does not exist.\n"
            "550 5.1.1 Please try double-checking the address.",
            "mx.example.com",
        )
        block = statusBlocks(parse(self.bounce([failure])))[1]
        self.assertEqual(block["Status"], "5.1.1")
        self.assertEqual(
            block["Diagnostic-Code"],
            "smtp; 550-5.1.1 The email account that you tried to reach does not"
            " exist. 550 5.1.1 Please try double-checking the address.",
        )

    def test_originalHeaders(self) -> None:
        """
        The third part holds the original header section, and not the body.
        """
        raw = self.bounce()
        headers = parts(parse(raw))[2]
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertNotIn("Content-Transfer-Encoding", headers)
        self.assertEqual(headers.get_payload(decode=True), ORIGINAL_HEADERS)
        self.assertNotIn(b"Secret body", raw)

    def test_originalHeadersCRLF(self) -> None:
        """
        A CRLF-terminated original gives the same headers, without CR.
        """
        self.messagePath = self.writeMessage(
            (ORIGINAL_HEADERS + b"\n" + ORIGINAL_BODY).replace(b"\n", b"\r\n")
        )
        headers = parts(parse(self.bounce()))[2]
        self.assertEqual(headers.get_payload(decode=True), ORIGINAL_HEADERS)

    def test_originalWithoutBody(self) -> None:
        """
        A message that is all headers, even without a final line end, is
        included whole.
        """
        self.messagePath = self.writeMessage(ORIGINAL_HEADERS.rstrip(b"\n"))
        headers = parts(parse(self.bounce()))[2]
        self.assertEqual(headers.get_payload(decode=True), ORIGINAL_HEADERS)

    def test_originalWithoutHeaders(self) -> None:
        """
        A message that starts with the empty line gives an empty third part.
        """
        self.messagePath = self.writeMessage(b"\n" + ORIGINAL_BODY)
        raw = self.bounce()
        self.assertEqual(parts(parse(raw))[2].get_payload(decode=True), b"")
        self.assertNotIn(b"Secret body", raw)

    def test_hugeHeadersTruncated(self) -> None:
        """
        An original header section over C{maxOriginalHeaderBytes} is cut at
        the last line end that fits.
        """
        lines = [f"X-Filler-{i}: {'x' * (i % 50)}\n".encode() for i in range(5000)]
        original = b"".join(lines)
        self.messagePath = self.writeMessage(original + b"\n" + ORIGINAL_BODY)
        limit = 10_000
        raw = self.bounce(maxOriginalHeaderBytes=limit)
        included = parts(parse(raw))[2].get_payload(decode=True)
        assert isinstance(included, bytes)
        self.assertLessEqual(len(included), limit)
        self.assertTrue(original.startswith(included))
        self.assertTrue(included.endswith(b"\n"))
        count = included.count(b"\n")
        self.assertGreater(len(included) + len(lines[count]), limit)
        self.assertNotIn(b"Secret body", raw)

    def test_hugeHeadersDefaultLimit(self) -> None:
        """
        By default at most 64 KiB of original headers are included.
        """
        original = b"X-Filler: " + b"y" * 200 + b"\n"
        self.messagePath = self.writeMessage(original * 1000 + b"\n")
        included = parts(parse(self.bounce()))[2].get_payload(decode=True)
        assert isinstance(included, bytes)
        self.assertEqual(len(included), (64 * 1024 // len(original)) * len(original))

    def test_headersExactlyAtLimit(self) -> None:
        """
        A header section of exactly C{maxOriginalHeaderBytes} is included
        whole; one octet less cuts its last line.
        """
        limit = len(ORIGINAL_HEADERS)
        whole = parts(parse(self.bounce(maxOriginalHeaderBytes=limit)))[2]
        self.assertEqual(whole.get_payload(decode=True), ORIGINAL_HEADERS)
        cut = parts(parse(self.bounce(maxOriginalHeaderBytes=limit - 1)))[2]
        self.assertEqual(
            cut.get_payload(decode=True),
            ORIGINAL_HEADERS[: ORIGINAL_HEADERS.rstrip(b"\n").rfind(b"\n") + 1],
        )

    def test_crlfHeadersTruncated(self) -> None:
        """
        A CRLF original whose header section is over the limit is cut at a
        line end, not taken whole because dropping CRs made it shorter.
        """
        original = b"".join(f"X-Filler-{i}: zz\r\n".encode() for i in range(100))
        self.messagePath = self.writeMessage(original + b"\r\n" + ORIGINAL_BODY)
        included = parts(parse(self.bounce(maxOriginalHeaderBytes=len(original) - 5)))[
            2
        ].get_payload(decode=True)
        self.assertEqual(
            included, b"".join(f"X-Filler-{i}: zz\n".encode() for i in range(99))
        )

    def test_eightBitHeaders(self) -> None:
        """
        Original headers with 8-bit octets, control characters or overlong
        lines are quoted-printable (RFC 6522), so the bounce stays 7-bit.
        """
        original = (
            b"Subject: Caf\xc3\xa9 \x00 bell\x07\n"
            b"X-Bare-CR: a\rb\n"
            b"X-Long: " + b"w" * 2000 + b"\n"
        )
        self.messagePath = self.writeMessage(original + b"\n" + ORIGINAL_BODY)
        headers = parts(parse(self.bounce()))[2]
        self.assertEqual(headers["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(headers.get_payload(decode=True), original)

    def test_boundaryCollision(self) -> None:
        """
        A boundary that occurs in the content is replaced by a fresh one.
        """
        self.messagePath = self.writeMessage(
            ORIGINAL_HEADERS + b"X-Trap: --=_clash\n\n" + ORIGINAL_BODY
        )
        tokens: Iterator[str] = iter(["messageid", "clash", "fresh"])
        message = parse(self.bounce(randomToken=lambda: next(tokens)))
        self.assertEqual(message.get_boundary(), "=_fresh")
        self.assertIn(
            "X-Trap: --=_clash", str(parts(message)[2].get_payload(decode=True))
        )

    def test_boundaryLikeHeaders(self) -> None:
        """
        Original headers full of MIME delimiters and nested multipart
        declarations do not disturb the structure.
        """
        trap = (
            b'Content-Type: multipart/mixed; boundary="=_abc"\n'
            b"X-A: --=_abc\n"
            b"--=_abc\n"
            b"--=_abc--\n"
            b"-- \n"
        )
        self.messagePath = self.writeMessage(trap + b"\n--=_abc\n" + ORIGINAL_BODY)
        headers = parts(parse(self.bounce([BOB, DAVE])))[2]
        self.assertEqual(headers.get_payload(decode=True), trap)

    def test_delayedOnly(self) -> None:
        """
        When every recipient is delayed, the bounce is a warning: its own
        subject, action C{delayed}, and a text that says delivery goes on.
        """
        message = parse(self.bounce([CAROL]))
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        block = statusBlocks(message)[1]
        self.assertEqual(block["Action"], "delayed")
        self.assertEqual(block["Status"], "4.2.2")
        text = parts(message)[0].get_payload()
        assert isinstance(text, str)
        text = " ".join(text.split())
        self.assertIn("still trying", text)
        self.assertIn("do not need to send the message again", text)
        self.assertNotIn("could not be delivered", text)

    def test_delayedLocalReason(self) -> None:
        """
        A delayed recipient without a code gets a temporary status.
        """
        failure = RecipientFailure("dave@example.com", "timed out", None, "delayed")
        block = statusBlocks(parse(self.bounce([failure])))[1]
        self.assertEqual(block["Status"], "4.0.0")

    def test_failedAndDelayed(self) -> None:
        """
        A mix of failed and delayed recipients is an undelivered-mail
        bounce naming both kinds.
        """
        message = parse(self.bounce([BOB, CAROL]))
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        text = parts(message)[0].get_payload()
        assert isinstance(text, str)
        self.assertIn("NOT DELIVERED", text)
        self.assertIn("STILL TRYING", text)
        self.assertLess(text.index("bob@example.com"), text.index("STILL TRYING"))
        self.assertGreater(text.index("carol@example.net"), text.index("STILL TRYING"))

    def test_expired(self) -> None:
        """
        An expired message is reported failed, with status 4.4.7 when the
        reply has nothing better, and the text says it expired and after how
        long.
        """
        timedOut = RecipientFailure(
            "dave@example.com", "connection timed out", None, "delayed"
        )
        generic = RecipientFailure("erin@example.com", "421 busy", "mx.example.com")
        message = parse(self.bounce([timedOut, generic], expired=True))
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        for block in statusBlocks(message)[1:]:
            self.assertEqual(block["Action"], "failed")
            self.assertEqual(block["Status"], EXPIRED_STATUS)
        text = parts(message)[0].get_payload()
        assert isinstance(text, str)
        self.assertIn("expired", text)
        self.assertIn("5 days", text)
        self.assertNotIn("STILL TRYING", text)

    def test_expiredKeepsBetterCodes(self) -> None:
        """
        An expired message keeps a reply's specific temporary code and a
        permanent reply's class.
        """
        full = RecipientFailure("carol@example.net", "452 4.2.2 full", "mx", "delayed")
        refused = RecipientFailure("bob@example.com", "550 go away", "mx")
        blocks = statusBlocks(parse(self.bounce([full, refused], expired=True)))
        self.assertEqual([b["Status"] for b in blocks[1:]], ["4.2.2", "5.0.0"])

    def test_longReplyFolded(self) -> None:
        """
        A reply too long for one line is folded, and a word too long for
        one line split, so no line exceeds 998 octets.
        """
        words = " ".join(f"word{i}" for i in range(100))
        failure = RecipientFailure(
            "bob@example.com", f"550 5.7.1 {words} {'z' * 3000}", "mx.example.com"
        )
        raw = self.bounce([failure])
        block = statusBlocks(parse(raw))[1]
        diagnostic = block["Diagnostic-Code"]
        self.assertTrue(diagnostic.startswith(f"smtp; 550 5.7.1 {words} zzz"))
        self.assertEqual(diagnostic.replace(" ", "").count("z"), 3000)
        self.assertGreater(raw.count(b"\n word"), 5)

    def test_hugeReplyShortened(self) -> None:
        """
        An absurdly long reply is cut.
        """
        failure = RecipientFailure("bob@example.com", "550 " + "y " * 50_000, "mx")
        raw = self.bounce([failure])
        self.assertLess(len(raw), 30_000)
        self.assertIn("[...]", statusBlocks(parse(raw))[1]["Diagnostic-Code"])

    def test_replyInjection(self) -> None:
        """
        CR, LF and other controls in a reply become spaces: they can add no
        header fields, status fields or MIME parts.
        """
        hostile = RecipientFailure(
            "bob@example.com",
            "550 5.1.1 no\r\nStatus: 2.0.0\r\n\r\nSubject: pwned\n--=_x\x0bX-A: b"
            "\x0cX-C: d\x1cX-E: f\x85",
            "mx.example.com\r\nX-Host: evil",
        )
        message = parse(self.bounce([hostile]))
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        block = statusBlocks(message)[1]
        self.assertEqual(block["Status"], "5.1.1")
        self.assertEqual(block["Remote-MTA"], "dns; mx.example.com X-Host: evil")
        self.assertEqual(
            block["Diagnostic-Code"],
            "smtp; 550 5.1.1 no Status: 2.0.0 Subject: pwned --=_x X-A: b X-C: d"
            " X-E: f\\x85",
        )

    def test_missingOriginal(self) -> None:
        """
        An unreadable original is an L{OSError} for the runner to handle.
        """
        self.assertRaises(
            OSError,
            makeBounce,
            ENVELOPE,
            [BOB],
            os.path.join(self.directory, "missing.msg"),
            HOST,
            NOW,
        )

    def test_refusals(self) -> None:
        """
        Bouncing to the null sender, bouncing nothing, a bad reporting host
        and a negative header limit are programming errors.
        """
        nullSender = Envelope("Q1", "", ("bob@example.com",))
        path = self.messagePath
        self.assertRaises(ValueError, makeBounce, nullSender, [BOB], path, HOST, NOW)
        self.assertRaises(ValueError, makeBounce, ENVELOPE, [], path, HOST, NOW)
        self.assertRaises(ValueError, makeBounce, ENVELOPE, [BOB], path, "", NOW)
        self.assertRaises(ValueError, makeBounce, ENVELOPE, [BOB], path, "a\nb: c", NOW)
        self.assertRaises(
            ValueError,
            makeBounce,
            ENVELOPE,
            [BOB],
            path,
            HOST,
            NOW,
            maxOriginalHeaderBytes=-1,
        )

    @settings(derandomize=True, max_examples=300, deadline=None)
    @given(
        failures=st.lists(
            st.builds(
                RecipientFailure,
                recipient=asciiText,
                reply=asciiText,
                remoteHost=st.none() | asciiText,
                action=st.sampled_from(["failed", "delayed"]),
            ),
            min_size=1,
            max_size=4,
        ),
        expired=st.booleans(),
        original=st.binary(max_size=3000),
        maxBytes=st.integers(min_value=0, max_value=4000),
    )
    def test_alwaysWellFormed(
        self,
        failures: list[RecipientFailure],
        expired: bool,
        original: bytes,
        maxBytes: int,
    ) -> None:
        """
        Whatever the replies, hosts, recipients and original message hold
        (CR, LF, controls, delimiters), the bounce is 7-bit, has no CR and
        no line over 998 octets, and parses into exactly the expected
        headers, parts and status fields.
        """
        self.messagePath = self.writeMessage(original)
        raw = makeBounce(
            ENVELOPE,
            failures,
            self.messagePath,
            HOST,
            NOW,
            expired=expired,
            maxOriginalHeaderBytes=maxBytes,
        )
        message = self.assertWellFormed(raw, len(failures))
        included = parts(message)[2].get_payload(decode=True)
        assert isinstance(included, bytes)
        self.assertLessEqual(len(included), max(maxBytes, len(original) + 1))
        for failure, block in zip(failures, statusBlocks(message)[1:], strict=True):
            self.assertEqual(block["Action"], "failed" if expired else failure.action)
