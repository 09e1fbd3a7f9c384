"""
Tests for L{smtpauth_relay.rewrite}: sender rewriting for single-mailbox
upstreams, checked on the header functions, on the sender login map's
C{=> ADDRESS} overrides, and on the bytes that reach an in-memory upstream.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.delivery.client import (
    ClientSettings,
    Outbound,
    RelayClientFactory,
)
from smtpauth_relay.delivery.pool import ConnectionPool
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.rewrite import (
    MAX_HEADER,
    RewriteUnavailable,
    SenderRewrite,
    SenderRewriter,
    openRewritten,
    rewriteHeader,
)
from smtpauth_relay.senders import SenderLoginMap, parseSenderLoginMap
from tests.fakeupstream import MemoryConnector, UpstreamScript

MAILBOX = "mailbox@example.org"
REWRITE = SenderRewrite(MAILBOX, rewriteFrom=True)


class RewriteHeaderTests(SynchronousTestCase):
    def test_displayNameKept(self) -> None:
        """
        C{From:} gets the mailbox with the original display name; the
        original value goes to C{Reply-To:} and C{X-Original-From:}; other
        fields stay as they were, in order.
        """
        header = (
            b"Subject: hi\n"
            b'From: "Alice Example" <alice@example.com>\n'
            b"To: bob@example.net\n"
        )
        self.assertEqual(
            rewriteHeader(header, REWRITE),
            b"Subject: hi\n"
            b'From: "Alice Example" <mailbox@example.org>\n'
            b'Reply-To: "Alice Example" <alice@example.com>\n'
            b'X-Original-From: "Alice Example" <alice@example.com>\n'
            b"To: bob@example.net\n",
        )

    def test_bareAddress(self) -> None:
        """
        A From: without a display name becomes the bare mailbox.
        """
        self.assertEqual(
            rewriteHeader(b"From: alice@example.com\n", REWRITE),
            b"From: <mailbox@example.org>\n"
            b"Reply-To: alice@example.com\n"
            b"X-Original-From: alice@example.com\n",
        )

    def test_existingReplyToKept(self) -> None:
        """
        A message that has a Reply-To: keeps it, and gets no second one.
        """
        rewritten = rewriteHeader(
            b"Reply-To: list@example.com\nFrom: Alice <alice@example.com>\n", REWRITE
        )
        self.assertEqual(
            rewritten,
            b"Reply-To: list@example.com\n"
            b"From: Alice <mailbox@example.org>\n"
            b"X-Original-From: Alice <alice@example.com>\n",
        )

    def test_foldedAndEncoded(self) -> None:
        """
        A folded From: with an encoded-word display name keeps the name as
        written, and its folding in the trace field.
        """
        rewritten = rewriteHeader(
            b"From: =?utf-8?q?J=C3=BCrgen?=\n <juergen@example.com>\n", REWRITE
        )
        self.assertEqual(
            rewritten,
            b"From: =?utf-8?q?J=C3=BCrgen?= <mailbox@example.org>\n"
            b"Reply-To: =?utf-8?q?J=C3=BCrgen?=\n <juergen@example.com>\n"
            b"X-Original-From: =?utf-8?q?J=C3=BCrgen?=\n <juergen@example.com>\n",
        )

    def test_senderDropped(self) -> None:
        """
        A Sender: field is kept only as X-Original-Sender:.
        """
        rewritten = rewriteHeader(
            b"From: alice@example.com\nSender: secretary@example.com\n", REWRITE
        )
        self.assertNotIn(b"\nSender:", b"\n" + rewritten)
        self.assertIn(b"X-Original-Sender: secretary@example.com\n", rewritten)

    def test_ambiguousFrom(self) -> None:
        """
        A From: the strict parsers disagree on (or with several addresses)
        becomes the bare mailbox: no display name is carried over.
        """
        for value in (
            b"alice@example.org)<bob@example.org>",
            b"a@example.com, b@example.com",
        ):
            rewritten = rewriteHeader(b"From: " + value + b"\n", REWRITE)
            self.assertTrue(rewritten.startswith(b"From: <mailbox@example.org>\n"))

    def test_severalFrom(self) -> None:
        """
        Several From: fields leave one From: (the mailbox), each original
        kept in an X-Original-From:.
        """
        rewritten = rewriteHeader(
            b"From: a@example.com\nFrom: b@example.com\n", REWRITE
        )
        self.assertEqual(
            rewritten.count(b"\nFrom:") + rewritten.startswith(b"From:"), 1
        )
        self.assertEqual(rewritten.count(b"X-Original-From:"), 2)

    def test_noFrom(self) -> None:
        """
        A header without From: gets one.
        """
        self.assertEqual(
            rewriteHeader(b"Subject: x\n", REWRITE),
            b"Subject: x\nFrom: <mailbox@example.org>\n",
        )


class OpenRewrittenTests(SynchronousTestCase):
    def message(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_bodyUnchanged(self) -> None:
        """
        The body follows the rewritten header byte for byte, read in small
        chunks; C{growth} is the size difference.
        """
        body = b"\nline one\n.dot line\n" + b"x" * 10000 + b"\n"
        original = b"From: a@example.com\nSubject: s\n" + body
        f = openRewritten(self.message(original), REWRITE)
        chunks = []
        while chunk := f.read(7):
            chunks.append(chunk)
        f.close()
        data = b"".join(chunks)
        self.assertTrue(data.endswith(body))
        self.assertTrue(data.startswith(b"From: <mailbox@example.org>\n"))
        self.assertEqual(len(data) - len(original), f.growth)

    def test_hugeHeaderLeftAlone(self) -> None:
        """
        A header longer than L{MAX_HEADER} is sent unchanged.
        """
        original = (
            b"From: a@example.com\n" + b"X-Junk: y\n" * (MAX_HEADER // 10) + b"\nbody\n"
        )
        f = openRewritten(self.message(original), REWRITE)
        self.assertEqual(f.read(), original)
        self.assertEqual(f.growth, 0)
        f.close()


class SenderMapRewriteTests(SynchronousTestCase):
    def test_parsed(self) -> None:
        """
        A line ending in C{=> ADDRESS} gives the user that rewrite address,
        and its items still count as grants.
        """
        grants = parseSenderLoginMap(
            'alice: alice@example.org, "x=>y"@example.org => shared@example.org\n'
            "bob: bob@example.org\n",
            "map",
        )
        self.assertEqual(grants["alice"].rewrite, "shared@example.org")
        self.assertIn(("x=>y", "example.org"), grants["alice"].addresses)
        self.assertIn(("alice", "example.org"), grants["alice"].addresses)
        self.assertIsNone(grants["bob"].rewrite)

    def test_badRewriteSkipped(self) -> None:
        """
        A line whose rewrite address is not an address is skipped.
        """
        grants = parseSenderLoginMap("alice: alice@example.org => nobody\n", "map")
        self.assertNotIn("alice", grants)

    def test_conflictingRewrite(self) -> None:
        """
        A second, different rewrite address for a user is skipped; the
        first stays.
        """
        grants = parseSenderLoginMap(
            "alice: a@example.org => one@example.org\n"
            "alice: b@example.org => two@example.org\n",
            "map",
        )
        self.assertEqual(grants["alice"].rewrite, "one@example.org")
        self.assertNotIn(("b", "example.org"), grants["alice"].addresses)

    def test_rewriter(self) -> None:
        """
        The map's address for the message's user wins over
        C{rewrite_sender}; other users get C{rewrite_sender}; bounces are
        never rewritten.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice: alice@example.org => shared@example.org\nbob: *\n")
        rewriter = SenderRewriter(MAILBOX, True, SenderLoginMap(path))

        def envelope(sender: str, user: str | None) -> Envelope:
            return Envelope("Q", sender, ("r@example.net",), authUser=user)

        self.assertEqual(
            rewriter.forEnvelope(envelope("alice@example.org", "alice")),
            SenderRewrite("shared@example.org", True),
        )
        self.assertEqual(
            rewriter.forEnvelope(envelope("bob@example.org", "bob")),
            SenderRewrite(MAILBOX, True),
        )
        self.assertEqual(
            rewriter.forEnvelope(envelope("x@example.org", None)),
            SenderRewrite(MAILBOX, True),
        )
        self.assertIsNone(rewriter.forEnvelope(envelope("", "alice")))
        self.assertIsNone(
            SenderRewriter("", False, None).forEnvelope(envelope("a@example.org", "a"))
        )
        os.unlink(path)
        self.assertRaises(
            RewriteUnavailable,
            rewriter.forEnvelope,
            envelope("alice@example.org", "alice"),
        )


class UpstreamBytesTests(SynchronousTestCase):
    """
    Rewriting as the upstream sees it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.script = UpstreamScript()
        self.connector = MemoryConnector(self.script)
        self.pool = ConnectionPool(
            RelayClientFactory(
                ClientSettings(heloName="relay.example.org", host="upstream"),
            ),
            self.connector,
            self.clock,
        )

    def send(self, sender: str, data: bytes, rewrite: SenderRewrite | None) -> Any:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        envelope = Envelope("Q1", sender, ("bob@example.net",), auth="alice")
        d = self.pool.send(Outbound(envelope, path, rewrite=rewrite))
        self.connector.flush()
        return self.successResultOf(d)

    def test_envelopeAndHeader(self) -> None:
        """
        MAIL FROM names the mailbox, SIZE counts the rewritten message, the
        header is rewritten, the body arrives unchanged, every line ends in
        CRLF and dot-stuffing is undone by the upstream as usual.
        """
        data = (
            b'From: "Alice Example" <alice@example.com>\nSubject: hi\n\n'
            b"Hello\n.leading dot\n"
        )
        report = self.send("alice@example.com", data, REWRITE)
        self.assertEqual(report.delivered, ("bob@example.net",))
        (transaction,) = self.script.transactions
        expected = (
            b'From: "Alice Example" <mailbox@example.org>\r\n'
            b'Reply-To: "Alice Example" <alice@example.com>\r\n'
            b'X-Original-From: "Alice Example" <alice@example.com>\r\n'
            b"Subject: hi\r\n\r\nHello\r\n.leading dot\r\n"
        )
        self.assertEqual(transaction.data, expected)
        self.assertEqual(
            transaction.mailFrom,
            b"MAIL FROM:<mailbox@example.org> SIZE=%d AUTH=<>"
            % (len(expected.replace(b"\r\n", b"\n"))),
        )

    def test_envelopeOnly(self) -> None:
        """
        Without C{rewrite_from} only MAIL FROM changes; the message is sent
        as spooled.
        """
        data = b"From: alice@example.com\n\nbody\n"
        self.send("alice@example.com", data, SenderRewrite(MAILBOX))
        (transaction,) = self.script.transactions
        self.assertTrue(
            transaction.mailFrom.startswith(b"MAIL FROM:<mailbox@example.org>")
        )
        self.assertEqual(transaction.data, b"From: alice@example.com\r\n\r\nbody\r\n")

    def test_bounceNotRewritten(self) -> None:
        """
        A bounce (null sender) keeps C{MAIL FROM:<>} and its header.
        """
        data = b"From: MAILER-DAEMON@relay.example.org\n\nbounce\n"
        self.send("", data, REWRITE)
        (transaction,) = self.script.transactions
        self.assertTrue(transaction.mailFrom.startswith(b"MAIL FROM:<>"))
        self.assertEqual(
            transaction.data, b"From: MAILER-DAEMON@relay.example.org\r\n\r\nbounce\r\n"
        )
