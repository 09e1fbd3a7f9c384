"""
Tests for L{smtpauth_relay.trace}.
"""

from __future__ import annotations

from email.utils import formatdate

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.trace import (
    MAX_HELO,
    TLSInfo,
    addressLiteral,
    headerDate,
    receivedHeader,
    sanitiseHelo,
    withKeyword,
)

WHEN = 1_800_000_000.0
TLS = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)


def header(**overrides: object) -> bytes:
    """
    A C{Received} header with sensible arguments, some overridden.
    """
    arguments: dict[str, object] = dict(
        helo="client.example",
        peerHost="192.0.2.10",
        reverseName=None,
        byHost="relay.example.org",
        esmtp=True,
        tls=TLS,
        authenticated=True,
        queueId="Q0001",
        recipients=("bob@example.net",),
        when=WHEN,
    )
    arguments.update(overrides)
    return receivedHeader(**arguments)  # type: ignore[arg-type]


class SanitiseHeloTests(SynchronousTestCase):
    """
    Tests for L{sanitiseHelo}.
    """

    def test_domainKept(self) -> None:
        """
        Domain names and address literals pass unchanged.
        """
        for helo in (
            b"mail.example.org",
            b"[192.0.2.1]",
            b"[IPv6:2001:db8::1]",
            b"my_host-1",
        ):
            self.assertEqual(sanitiseHelo(helo), helo.decode())

    def test_stripped(self) -> None:
        """
        Surrounding whitespace is dropped.
        """
        self.assertEqual(sanitiseHelo(b"  client.example \t"), "client.example")

    def test_dangerousReplaced(self) -> None:
        """
        CR, LF, parentheses, spaces and non-ASCII become C{_}, one per byte.
        """
        self.assertEqual(sanitiseHelo(b"evil\r\nBcc: x (y)"), "evil__Bcc:_x__y_")
        self.assertEqual(sanitiseHelo("h\u00e9".encode()), "h__")

    def test_empty(self) -> None:
        """
        An empty or blank argument becomes C{unknown}.
        """
        self.assertEqual(sanitiseHelo(b""), "unknown")
        self.assertEqual(sanitiseHelo(b" \t "), "unknown")

    def test_truncated(self) -> None:
        """
        At most 255 characters are kept.
        """
        self.assertEqual(sanitiseHelo(b"a" * 1000), "a" * MAX_HELO)

    @settings(derandomize=True, max_examples=500)
    @given(st.binary(max_size=400))
    def test_alwaysSafe(self, helo: bytes) -> None:
        """
        Whatever the client sent, the result is non-empty printable ASCII of
        at most 255 characters, without CR, LF, parentheses or whitespace.
        """
        result = sanitiseHelo(helo)
        self.assertTrue(result)
        self.assertLessEqual(len(result), MAX_HELO)
        self.assertTrue(result.isascii())
        for c in "\r\n() \t\0":
            self.assertNotIn(c, result)
        self.assertTrue(result.isprintable())


class AddressLiteralTests(SynchronousTestCase):
    """
    Tests for L{addressLiteral}.
    """

    def test_ipv4(self) -> None:
        """
        An IPv4 peer gives C{[a.b.c.d]}.
        """
        self.assertEqual(addressLiteral("192.0.2.1"), "[192.0.2.1]")

    def test_ipv6(self) -> None:
        """
        An IPv6 peer gives C{[IPv6:...]} in compressed form.
        """
        self.assertEqual(
            addressLiteral("2001:0db8:0:0:0:0:0:0001"), "[IPv6:2001:db8::1]"
        )

    def test_mapped(self) -> None:
        """
        An IPv4-mapped peer is shown as the IPv4 address.
        """
        self.assertEqual(addressLiteral("::ffff:192.0.2.1"), "[192.0.2.1]")

    def test_unix(self) -> None:
        """
        A non-IP peer gives C{[UNIX]}.
        """
        self.assertEqual(addressLiteral("/run/relay.sock"), "[UNIX]")


class HeaderDateTests(SynchronousTestCase):
    @given(st.floats(min_value=0, max_value=4_000_000_000))
    def test_sameAsFormatdate(self, when: float) -> None:
        """
        The cached date is what C{formatdate} gives for that (whole) second,
        in local time, whatever came before it.
        """
        self.assertEqual(headerDate(when), formatdate(int(when), localtime=True))

    def test_newSecondNewDate(self) -> None:
        """
        Within one second the date is reused; the next second gets its own.
        """
        first = headerDate(1_800_000_000.1)
        self.assertEqual(headerDate(1_800_000_000.9), first)
        self.assertNotEqual(headerDate(1_800_000_001.0), first)


class WithKeywordTests(SynchronousTestCase):
    """
    Tests for L{withKeyword}.
    """

    def test_keywords(self) -> None:
        """
        The four RFC 3848 keywords: ESMTP, ESMTPS (TLS), ESMTPA (AUTH),
        ESMTPSA (both).
        """
        self.assertEqual(withKeyword(False, False), "ESMTP")
        self.assertEqual(withKeyword(True, False), "ESMTPS")
        self.assertEqual(withKeyword(False, True), "ESMTPA")
        self.assertEqual(withKeyword(True, True), "ESMTPSA")


class ReceivedHeaderTests(SynchronousTestCase):
    """
    Tests for L{receivedHeader}.
    """

    def test_oneRecipientTLS(self) -> None:
        """
        With TLS, AUTH and one recipient the header names the TLS session,
        C{ESMTPSA}, the queue id and the recipient, folded over four lines.
        """
        self.assertEqual(
            header(),
            (
                "Received: from client.example ([192.0.2.10])\n"
                "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"
                " (256/256 bits))\n"
                "\tby relay.example.org (smtpauth-relay) with ESMTPSA id Q0001\n"
                f"\tfor <bob@example.net>; {formatdate(WHEN, localtime=True)}\n"
            ).encode("ascii"),
        )

    def test_reverseName(self) -> None:
        """
        A reverse DNS name goes before the address literal.
        """
        self.assertTrue(
            header(reverseName="client.example.net").startswith(
                b"Received: from client.example (client.example.net [192.0.2.10])\n"
            )
        )

    def test_tlsWithoutBits(self) -> None:
        """
        When the key size is unknown, the TLS comment leaves it out.
        """
        self.assertIn(
            b"\t(using TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256)\n",
            header(tls=TLSInfo("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")),
        )

    def test_severalRecipients(self) -> None:
        """
        With several recipients no C{for} clause is written, so Bcc
        recipients are not disclosed.
        """
        value = header(recipients=("bob@example.net", "secret@example.com"))
        self.assertNotIn(b"for", value)
        self.assertNotIn(b"example.net", value)
        self.assertNotIn(b"secret", value)
        self.assertTrue(
            value.endswith(f"\n\t{formatdate(WHEN, localtime=True)}\n".encode())
        )

    def test_heloOnly(self) -> None:
        """
        A HELO (not EHLO) session is received C{with SMTP}, whatever its TLS
        and AUTH state; without TLS there is no TLS comment.
        """
        self.assertEqual(
            header(esmtp=False, tls=None, authenticated=False),
            (
                "Received: from client.example ([192.0.2.10])\n"
                "\tby relay.example.org (smtpauth-relay) with SMTP id Q0001\n"
                f"\tfor <bob@example.net>; {formatdate(WHEN, localtime=True)}\n"
            ).encode("ascii"),
        )

    def test_keywordVariants(self) -> None:
        """
        An EHLO session's keyword follows its TLS and AUTH state.
        """
        for tls, authenticated, keyword in (
            (None, False, b"ESMTP"),
            (TLS, False, b"ESMTPS"),
            (None, True, b"ESMTPA"),
            (TLS, True, b"ESMTPSA"),
        ):
            self.assertIn(
                b" with " + keyword + b" id ",
                header(tls=tls, authenticated=authenticated),
            )

    def test_ipv6Peer(self) -> None:
        """
        An IPv6 peer is written as an IPv6 address literal.
        """
        self.assertTrue(
            header(peerHost="2001:db8::5").startswith(
                b"Received: from client.example ([IPv6:2001:db8::5])\n"
            )
        )

    def test_folding(self) -> None:
        """
        Every line but the first starts with a TAB, every line ends with LF
        alone, and nothing is non-ASCII.
        """
        for value in (
            header(),
            header(tls=None, recipients=("a@x.org", "b@x.org")),
            header(esmtp=False, tls=None),
            header(reverseName="r.example", peerHost="::ffff:192.0.2.1"),
        ):
            self.assertTrue(value.endswith(b"\n"))
            self.assertNotIn(b"\r", value)
            value.decode("ascii")
            lines = value[:-1].split(b"\n")
            self.assertTrue(lines[0].startswith(b"Received: from "))
            for line in lines[1:]:
                self.assertTrue(line.startswith(b"\t"), line)

    @settings(derandomize=True, max_examples=200)
    @given(
        helo=st.binary(max_size=300),
        recipients=st.lists(
            st.text(alphabet="abc@.-", min_size=1, max_size=20), min_size=1, max_size=3
        ),
        tls=st.booleans(),
        authenticated=st.booleans(),
        esmtp=st.booleans(),
    )
    def test_foldingProperty(
        self,
        helo: bytes,
        recipients: list[str],
        tls: bool,
        authenticated: bool,
        esmtp: bool,
    ) -> None:
        """
        With a sanitised HELO, the header is always one C{Received:} line
        followed by TAB-started continuation lines.
        """
        value = header(
            helo=sanitiseHelo(helo),
            recipients=tuple(recipients),
            tls=TLS if tls else None,
            authenticated=authenticated,
            esmtp=esmtp,
        )
        lines = value[:-1].split(b"\n")
        self.assertTrue(lines[0].startswith(b"Received: from "))
        self.assertNotIn(b"\r", value)
        for line in lines[1:]:
            self.assertTrue(line.startswith(b"\t"), line)
