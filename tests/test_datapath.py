"""
The DATA fast path (whole chunks of body lines at once) must store exactly
what the careful line-by-line path stores, refuse exactly what it refuses,
and count the same size, however the client's bytes are split into packets.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.submission import MessageIntake
from tests.support import Harness

LINE = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from(
        [
            b".",
            b"..",
            b".x",
            b"",
            b"\xc3\xa9t\xc3\xa9",
            b"x" * 499,
            b"x" * 500,
            b"x" * 997,
            b"x" * 998,
            b"x" * 999,
            b"." + b"x" * 998,
        ]
    ),
    st.sampled_from([b"bare\nlf", b"bare\rcr", b"x\r\r", b"\n.", b".\n"]),
)


def run(body: bytes, splits: list[int], fast: bool) -> tuple[list[bytes], object]:
    """
    Send a message with C{body} split at C{splits}; return the replies to
    the data and what was spooled.
    """
    harness = Harness(tlsMode="implicit")
    session = harness.connect()
    session.login()
    session.command(b"MAIL FROM:<alice@example.org>")
    session.command(b"RCPT TO:<bob@example.net>")
    session.command(b"DATA")
    data = b"Subject: test\r\n\r\n" + body + b".\r\n"
    replies: list[bytes] = []
    start = 0
    for cut in sorted({min(max(c, 0), len(data)) for c in splits}) + [len(data)]:
        replies += session.send(data[start:cut])
        start = cut
    stored = [
        (envelope.size, envelope.body, message)
        for envelope, message in harness.spool.messages.values()
    ]
    return [r.split(b" queued as ")[0] for r in replies], stored


class FastPathEquivalenceTests(SynchronousTestCase):
    """
    Property: the fast path changes nothing but speed.
    """

    @settings(max_examples=150, deadline=None)
    @given(
        lines=st.lists(LINE, max_size=40),
        splits=st.lists(st.integers(min_value=0, max_value=50000), max_size=6),
    )
    def test_sameAsLineByLine(self, lines: list[bytes], splits: list[int]) -> None:
        """
        Any body, split anywhere: the same replies (250 or the same
        refusal), the same stored bytes, size and 8-bit flag.
        """
        self.assertEqualPaths(b"".join(line + b"\r\n" for line in lines), splits)

    def test_lineLengthBoundaries(self) -> None:
        """
        Lines at and just over the limit (1,000 octets with CRLF), alone or
        among short ones, in one packet or split: the same outcome both
        ways (the fast path measures lines without splitting the chunk).
        """
        for body in [
            b"a\r\n" + b"x" * 998 + b"\r\n",
            b"a\r\n" + b"x" * 999 + b"\r\n",
            b"a\r\n" + b"." + b"x" * 998 + b"\r\n",
            b"a\r\n" + b"y\r\n" * 300 + b"x" * 999 + b"\r\nb\r\n",
            b"a\r\n" + (b"x" * 499 + b"\r\n") * 5,
            b"a\r\n" + b"x" * 500 + b"\rx" * 300 + b"\r\n",
        ]:
            for splits in ([], [40], [600, 1200]):
                self.assertEqualPaths(body, splits)

    def assertEqualPaths(self, body: bytes, splits: list[int]) -> None:
        fast = run(body, splits, fast=True)
        original = MessageIntake.bodyChunk
        MessageIntake.bodyChunk = lambda self, chunk: False  # type: ignore[method-assign]
        try:
            slow = run(body, splits, fast=False)
        finally:
            MessageIntake.bodyChunk = original  # type: ignore[method-assign]
        self.assertEqual(fast, slow, (body[:40], len(body), splits))

    def test_fastPathTaken(self) -> None:
        """
        A plain body does go through the fast path (one call for the lines
        that arrived together), dot-unstuffed.
        """
        calls: list[bytes] = []
        original = MessageIntake.bodyChunk

        def spy(intake: MessageIntake, chunk: bytes) -> bool:
            calls.append(chunk)
            return original(intake, chunk)

        self.patch(MessageIntake, "bodyChunk", spy)
        _, stored = run(b"one\r\n..two\r\nthree\r\n", [], fast=True)
        self.assertEqual(calls, [b"one\r\n..two\r\nthree\r\n"])
        [(size, _, message)] = stored  # type: ignore[misc]
        self.assertTrue(message.endswith(b"Subject: test\n\none\n.two\nthree\n"))
