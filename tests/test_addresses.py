"""
Tests for L{smtpauth_relay.addresses}.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.addresses import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    MailFrom,
    ParameterError,
    PathSyntaxError,
    parseMailFrom,
    parsePath,
    parseRcptTo,
    xtextDecode,
    xtextEncode,
)

# The characters that matter to paths, and a few that do not.
LITERAL_ALPHABET = st.sampled_from(list('09af.:IPv6-<> "\\\r\n\t[]@(),;\x00\x7f'))


def outsideQuotes(path: str) -> str:
    """
    C{path} with its quoted strings (and their escapes) removed.
    """
    return re.sub(r'"(?:[^"\\]|\\.)*"', "", path)


class ParsePathTests(SynchronousTestCase):
    """
    Tests for L{parsePath}.
    """

    def test_simple(self) -> None:
        """
        C{<local@domain>} gives C{local@domain}.
        """
        self.assertEqual(
            parsePath(b"<alice@example.org>", allowNull=False), "alice@example.org"
        )

    def test_dotAtom(self) -> None:
        """
        A dot-string local part with the atext specials is accepted as is.
        """
        local = "a.b+tag!#$%&'*/=?^_`{|}~-z"
        self.assertEqual(
            parsePath(f"<{local}@mail.example.org>".encode(), allowNull=False),
            f"{local}@mail.example.org",
        )

    def test_quotedLocalPart(self) -> None:
        """
        A quoted local part may hold spaces, C{@}, angle brackets and
        backslash-escaped quotes; it is returned with its quotes.
        """
        for local in (
            b'"john doe"',
            b'"a@b"',
            b'"x<>y"',
            b'"say \\"hi\\""',
            b'""',
        ):
            self.assertEqual(
                parsePath(b"<" + local + b"@example.org>", allowNull=False),
                local.decode() + "@example.org",
            )

    def test_badDotString(self) -> None:
        """
        Leading, trailing and doubled dots, and unquoted specials, make the
        local part invalid.
        """
        for local in (b".a", b"a.", b"a..b", b"a b", b"a(b)", b"a,b", b"a\\b", b"a;b"):
            self.assertRaises(
                PathSyntaxError,
                parsePath,
                b"<" + local + b"@example.org>",
                False,
            )

    def test_badQuotedString(self) -> None:
        """
        A quoted local part must be closed and hold only printable ASCII.
        """
        for local in (b'"abc', b'"a\tb"', b'"a\x7fb"', b'"a\\"', b'"a"b'):
            self.assertRaises(
                PathSyntaxError,
                parsePath,
                b"<" + local + b"@example.org>",
                False,
            )

    def test_addressLiterals(self) -> None:
        """
        IPv4 and IPv6 address literals are accepted as domains.
        """
        for literal in (b"[192.0.2.1]", b"[IPv6:2001:db8::1]", b"[IPv6:::1]"):
            self.assertEqual(
                parsePath(b"<postmaster@" + literal + b">", allowNull=False),
                "postmaster@" + literal.decode(),
            )

    def test_badAddressLiteral(self) -> None:
        """
        An address literal may not be empty, hold spaces or brackets, or be
        unclosed.
        """
        for literal in (b"[]", b"[192.0.2.1", b"[1 2]", b"[a[b]", b"[a\\b]"):
            self.assertRaises(
                PathSyntaxError, parsePath, b"<u@" + literal + b">", False
            )

    def test_addressLiteralNoAngleBrackets(self) -> None:
        """
        An address literal may not hold angle brackets: they are no part of
        an IPv4, IPv6 or general address literal (RFC 5321 section 4.1.3),
        and would let the path end early when it is written out again.
        """
        for raw in (b"<u@[<]>", b"<u@[a<b]>", b"<u@[IPv6:<::1]>"):
            self.assertRaises(PathSyntaxError, parsePath, raw, False)

    def test_addressLiteralForms(self) -> None:
        """
        Only the RFC 5321 section 4.1.3 forms are address literals: a dotted
        quad, C{IPv6:} and an IPv6 address, or C{tag:content}; arbitrary
        bracketed text is not.
        """
        for raw in (
            b"<u@[example.org]>",
            b"<u@[192.0.2]>",
            b"<u@[192.0.2.256]>",
            b"<u@[IPv6:not-an-address]>",
        ):
            self.assertRaises(PathSyntaxError, parsePath, raw, False)

    def test_badDomains(self) -> None:
        """
        Labels may not start or end with a hyphen, be empty or be longer
        than 63 characters; a trailing dot or underscore is refused.
        """
        for domain in (
            b"-a.example",
            b"a-.example",
            b"a..example",
            b"example.",
            b".example",
            b"ex_ample.org",
            b"a" * 64 + b".example",
            b"",
        ):
            self.assertRaises(PathSyntaxError, parsePath, b"<u@" + domain + b">", False)

    def test_longestLabel(self) -> None:
        """
        A 63-character label is allowed.
        """
        domain = "a" * 63 + ".example"
        self.assertEqual(parsePath(f"<u@{domain}>".encode(), False), f"u@{domain}")

    def test_sourceRouteStripped(self) -> None:
        """
        An obsolete source route is accepted and dropped (RFC 5321 section
        4.1.2 and appendix C).
        """
        self.assertEqual(
            parsePath(b"<@a.example,@b.example:user@d.example>", allowNull=False),
            "user@d.example",
        )
        self.assertEqual(
            parsePath(b"<@relay.example:user@d.example>", allowNull=False),
            "user@d.example",
        )

    def test_badSourceRoute(self) -> None:
        """
        A malformed source route makes the path invalid rather than being
        partly taken as the mailbox.
        """
        for raw in (
            b"<@a.example:@b.example:user@d.example>",
            b"<@a.example,user@d.example>",
            b"<@:user@d.example>",
            b"<@a.example:>",
        ):
            self.assertRaises(PathSyntaxError, parsePath, raw, False)

    def test_nullPath(self) -> None:
        """
        C{<>} is the null path where allowed, and an error elsewhere.
        """
        self.assertEqual(parsePath(b"<>", allowNull=True), "")
        self.assertRaises(PathSyntaxError, parsePath, b"<>", False)

    def test_missingBrackets(self) -> None:
        """
        The path must be enclosed in angle brackets.
        """
        for raw in (b"alice@example.org", b"<alice@example.org", b"alice@example.org>"):
            self.assertRaises(PathSyntaxError, parsePath, raw, True)

    def test_noDomain(self) -> None:
        """
        A mailbox without C{@domain} is refused.
        """
        for raw in (b"<alice>", b"<alice@>", b"<@example.org>"):
            self.assertRaises(PathSyntaxError, parsePath, raw, False)

    def test_nonASCII(self) -> None:
        """
        Non-ASCII (SMTPUTF8 is not offered) is refused in either part.
        """
        for raw in ("<jösé@example.org>", "<jose@exämple.org>", '<"ü"@example.org>'):
            self.assertRaises(PathSyntaxError, parsePath, raw.encode("utf-8"), False)

    def test_controlCharacters(self) -> None:
        """
        CR, LF, NUL and spaces in an unquoted address are refused.
        """
        for raw in (
            b"<a\r\nb@example.org>",
            b"<ab@example.org\r\n>",
            b"<a\0b@example.org>",
            b"<a b@example.org>",
            b"<ab@exam ple.org>",
        ):
            self.assertRaises(PathSyntaxError, parsePath, raw, False)

    def test_localPartLimit(self) -> None:
        """
        A local part of 64 octets is accepted, 65 refused (RFC 5321
        4.5.3.1.1).
        """
        self.assertEqual(MAX_LOCAL_PART, 64)
        local = "l" * 64
        self.assertEqual(
            parsePath(f"<{local}@example.org>".encode(), False), f"{local}@example.org"
        )
        self.assertRaises(
            PathSyntaxError, parsePath, f"<{local}x@example.org>".encode(), False
        )

    def test_quotedLocalPartLimit(self) -> None:
        """
        The local part limit counts a quoted local part with its quotes.
        """
        local = '"' + "q" * 62 + '"'
        self.assertEqual(
            parsePath(f"<{local}@x.org>".encode(), False), f"{local}@x.org"
        )
        local = '"' + "q" * 63 + '"'
        self.assertRaises(
            PathSyntaxError, parsePath, f"<{local}@x.org>".encode(), False
        )

    def test_domainLimit(self) -> None:
        """
        A domain longer than 255 octets is refused.
        """
        self.assertEqual(MAX_DOMAIN, 255)
        domain = ".".join(["d" * 63] * 4)  # 255 octets
        self.assertEqual(len(domain), 255)
        self.assertRaises(PathSyntaxError, parsePath, f"<u@{domain}x>".encode(), False)

    def test_pathLimit(self) -> None:
        """
        A path of 256 octets, counting its angle brackets (RFC 5321
        4.5.3.1.3: "including the punctuation and element separators"), is
        accepted; one of 257 is refused.
        """
        self.assertEqual(MAX_PATH, 256)
        local = "l" * 64
        # "<" + local + "@" + domain + ">" == 256
        domain = ".".join(["d" * 63, "d" * 63, "d" * 61])
        raw = f"<{local}@{domain}>".encode()
        self.assertEqual(len(raw), 256)
        self.assertEqual(parsePath(raw, False), raw[1:-1].decode())
        raw = f"<{local}@{domain}d>".encode()
        self.assertEqual(len(raw), 257)
        self.assertRaises(PathSyntaxError, parsePath, raw, False)

    @settings(derandomize=True, max_examples=500)
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, raw: bytes) -> None:
        """
        On any bytes, L{parsePath} returns a string or raises
        L{PathSyntaxError}; nothing else escapes.
        """
        for candidate in (raw, b"<" + raw + b">"):
            for allowNull in (True, False):
                try:
                    result = parsePath(candidate, allowNull)
                except PathSyntaxError:
                    continue
                self.assertIsInstance(result, str)

    @settings(derandomize=True, max_examples=500)
    @given(
        st.lists(
            st.sampled_from(list('abcAZ09.-_+=!#@[]:,"\\ <>\r\n\t()') + ["IPv6:", "é"]),
            max_size=80,
        ).map("".join)
    )
    def test_acceptedPathsAreSafe(self, inner: str) -> None:
        """
        Whatever path is accepted holds no CR or LF at all, and no space or
        angle bracket outside a quoted local part, so it can be written back
        between angle brackets on a command line safely.
        """
        raw = ("<" + inner + ">").encode("utf-8")
        try:
            result = parsePath(raw, allowNull=True)
        except PathSyntaxError:
            return
        self.assertNotIn("\r", result)
        self.assertNotIn("\n", result)
        self.assertTrue(result.isascii())
        bare = outsideQuotes(result)
        for c in " <>\t":
            self.assertNotIn(c, bare)
        self.assertLessEqual(len(result), MAX_PATH)

    @settings(derandomize=True, max_examples=500)
    @given(
        st.one_of(
            st.text(alphabet="abz09.!#-_+", min_size=1, max_size=70),
            st.text(alphabet=LITERAL_ALPHABET, max_size=70).map(
                lambda t: '"' + t + '"'
            ),
        ),
        st.one_of(
            st.lists(st.text(alphabet="ab-9", min_size=1, max_size=10), min_size=1).map(
                ".".join
            ),
            st.text(alphabet=LITERAL_ALPHABET, min_size=1, max_size=40).map(
                lambda t: "[" + t + "]"
            ),
        ),
    )
    def test_mailboxShapes(self, local: str, domain: str) -> None:
        """
        Among local parts and domains shaped like real ones but holding any
        ASCII, whatever is accepted is returned unchanged, holds no CR, LF or
        other control character, and nothing outside its quotes that would
        end the path or the command.
        """
        inner = f"{local}@{domain}"
        try:
            result = parsePath(("<" + inner + ">").encode("ascii"), allowNull=False)
        except PathSyntaxError:
            return
        self.assertEqual(result, inner)
        self.assertFalse(any(ord(c) < 0x20 or ord(c) == 0x7F for c in result))
        bare = outsideQuotes(result)
        for c in " <>":
            self.assertNotIn(c, bare)


class ParseMailFromTests(SynchronousTestCase):
    """
    Tests for L{parseMailFrom}.
    """

    def test_plain(self) -> None:
        """
        C{FROM:<path>} with no parameters gives the defaults.
        """
        self.assertEqual(
            parseMailFrom(b"FROM:<alice@example.org>"),
            MailFrom(sender="alice@example.org", size=None, body="7BIT", auth=None),
        )

    def test_keywordCaseAndSpace(self) -> None:
        """
        C{FROM:} is case-insensitive and a space after the colon is
        tolerated.
        """
        self.assertEqual(
            parseMailFrom(b"from: <alice@example.org>").sender, "alice@example.org"
        )

    def test_wrongKeyword(self) -> None:
        """
        An argument not starting with C{FROM:} is a syntax error.
        """
        for raw in (b"TO:<a@example.org>", b"FROM<a@example.org>", b""):
            self.assertRaises(PathSyntaxError, parseMailFrom, raw)

    def test_nullSender(self) -> None:
        """
        C{<>} is the null sender.
        """
        self.assertEqual(parseMailFrom(b"FROM:<>").sender, "")

    def test_sourceRoute(self) -> None:
        """
        A source route in MAIL FROM is dropped.
        """
        self.assertEqual(
            parseMailFrom(b"FROM:<@a.example,@b.example:u@d.example>").sender,
            "u@d.example",
        )

    def test_missingBrackets(self) -> None:
        """
        A path without angle brackets, or unterminated, is a syntax error.
        """
        for raw in (b"FROM:alice@example.org", b"FROM:<alice@example.org", b"FROM:"):
            self.assertRaises(PathSyntaxError, parseMailFrom, raw)

    def test_garbageAfterPath(self) -> None:
        """
        Anything but a space straight after the closing bracket is a syntax
        error.
        """
        for raw in (
            b"FROM:<a@example.org>x",
            b"FROM:<a@example.org>>",
            b"FROM:<a@example.org><b@example.org>",
            b"FROM:<a@example.org>SIZE=10",
        ):
            self.assertRaises(PathSyntaxError, parseMailFrom, raw)

    def test_quotedBracket(self) -> None:
        """
        A C{>} inside a quoted local part does not end the path.
        """
        self.assertEqual(
            parseMailFrom(b'FROM:<"a>b"@example.org> SIZE=5'),
            MailFrom(sender='"a>b"@example.org', size=5),
        )

    def test_size(self) -> None:
        """
        C{SIZE=} takes decimal digits.
        """
        self.assertEqual(parseMailFrom(b"FROM:<a@example.org> SIZE=12345").size, 12345)
        self.assertEqual(parseMailFrom(b"FROM:<a@example.org> size=0").size, 0)

    def test_badSize(self) -> None:
        """
        A C{SIZE} that is not all digits, is empty or missing, or is absurdly
        long is a bad value (not an unknown parameter).
        """
        for value in (
            b"SIZE=-1",
            b"SIZE=1e3",
            b"SIZE=",
            b"SIZE",
            b"SIZE=+5",
            b"SIZE=" + b"9" * 21,
            b"SIZE=0x10",
        ):
            with self.assertRaises(ParameterError) as e:
                parseMailFrom(b"FROM:<a@example.org> " + value)
            self.assertFalse(e.exception.unknown, value)

    def test_body(self) -> None:
        """
        C{BODY=} is C{7BIT} or C{8BITMIME}, in any case, normalised to upper
        case.
        """
        for value, expected in (
            (b"7BIT", "7BIT"),
            (b"7bit", "7BIT"),
            (b"8BITMIME", "8BITMIME"),
            (b"8bitMime", "8BITMIME"),
        ):
            self.assertEqual(
                parseMailFrom(b"FROM:<a@example.org> BODY=" + value).body, expected
            )

    def test_badBody(self) -> None:
        """
        Any other C{BODY} (including C{BINARYMIME}, not offered) is a bad
        value.
        """
        for value in (b"BODY=BINARYMIME", b"BODY=8BIT", b"BODY", b"BODY="):
            with self.assertRaises(ParameterError) as e:
                parseMailFrom(b"FROM:<a@example.org> " + value)
            self.assertFalse(e.exception.unknown, value)

    def test_auth(self) -> None:
        """
        C{AUTH=} is xtext-decoded; C{AUTH=<>} is kept as C{<>}.
        """
        self.assertEqual(
            parseMailFrom(b"FROM:<a@example.org> AUTH=alice@example.org").auth,
            "alice@example.org",
        )
        self.assertEqual(
            parseMailFrom(b"FROM:<a@example.org> AUTH=a+2Bb+3Dc").auth, "a+b=c"
        )
        self.assertEqual(parseMailFrom(b"FROM:<a@example.org> AUTH=<>").auth, "<>")

    def test_badAuth(self) -> None:
        """
        A missing value or malformed xtext in C{AUTH} is a bad value.
        """
        for value in (b"AUTH", b"AUTH=", b"AUTH=a+2b", b"AUTH=a+", b"AUTH=a+G1"):
            with self.assertRaises(ParameterError) as e:
                parseMailFrom(b"FROM:<a@example.org> " + value)
            self.assertFalse(e.exception.unknown, value)

    def test_allParameters(self) -> None:
        """
        Several parameters, separated by one or more spaces, are all parsed.
        """
        self.assertEqual(
            parseMailFrom(b"FROM:<> SIZE=10  BODY=8BITMIME AUTH=<>"),
            MailFrom(sender="", size=10, body="8BITMIME", auth="<>"),
        )

    def test_duplicateParameter(self) -> None:
        """
        A parameter given twice, in whatever case, is a bad value (501), not
        an unknown one.
        """
        for params in (b"SIZE=1 SIZE=2", b"BODY=7BIT body=7BIT", b"AUTH=<> AUTH=<>"):
            with self.assertRaises(ParameterError) as e:
                parseMailFrom(b"FROM:<a@example.org> " + params)
            self.assertFalse(e.exception.unknown, params)

    def test_unknownParameter(self) -> None:
        """
        A well-formed parameter that is not supported is flagged C{unknown}
        (555 in the server).
        """
        for params in (b"SMTPUTF8", b"RET=FULL", b"ENVID=x", b"X-FOO", b"X=a=b"):
            with self.assertRaises(ParameterError) as e:
                parseMailFrom(b"FROM:<a@example.org> " + params)
            self.assertTrue(e.exception.unknown, params)

    def test_malformedParameter(self) -> None:
        """
        A malformed keyword, or a known keyword with a malformed value, is a
        bad value (501).
        """
        for params in (b"=1", b"-X=1", b"S_IZE=1", b"SIZE=a=b", "SIZE=\u00e9".encode()):
            with self.assertRaises(ParameterError) as e:
                parseMailFrom(b"FROM:<a@example.org> " + params)
            self.assertFalse(e.exception.unknown, params)

    @settings(derandomize=True, max_examples=500)
    @given(st.binary(max_size=120))
    def test_arbitraryBytes(self, raw: bytes) -> None:
        """
        On any bytes, L{parseMailFrom} either parses or raises one of its two
        documented errors.
        """
        for candidate in (raw, b"FROM:<a@example.org> " + raw, b"FROM:" + raw):
            try:
                parseMailFrom(candidate)
            except (PathSyntaxError, ParameterError):
                pass


class ParseRcptToTests(SynchronousTestCase):
    """
    Tests for L{parseRcptTo}.
    """

    def test_recipient(self) -> None:
        """
        C{TO:<path>} gives the address.
        """
        self.assertEqual(parseRcptTo(b"TO:<bob@example.net>"), "bob@example.net")
        self.assertEqual(parseRcptTo(b"to: <bob@example.net>"), "bob@example.net")

    def test_addressLiteral(self) -> None:
        """
        Address-literal domains are accepted in RCPT too.
        """
        self.assertEqual(
            parseRcptTo(b"TO:<postmaster@[IPv6:2001:db8::25]>"),
            "postmaster@[IPv6:2001:db8::25]",
        )

    def test_sourceRouteStripped(self) -> None:
        """
        A source route in RCPT is dropped: the relay never follows it.
        """
        self.assertEqual(
            parseRcptTo(b"TO:<@relay.example:bob@example.net>"), "bob@example.net"
        )

    def test_noNullRecipient(self) -> None:
        """
        The null path is not a recipient.
        """
        self.assertRaises(PathSyntaxError, parseRcptTo, b"TO:<>")

    def test_wrongKeyword(self) -> None:
        """
        C{FROM:} is not C{TO:}.
        """
        self.assertRaises(PathSyntaxError, parseRcptTo, b"FROM:<bob@example.net>")

    def test_garbage(self) -> None:
        """
        Text straight after the path, or no brackets, is a syntax error.
        """
        for raw in (b"TO:<b@example.net>x", b"TO:b@example.net", b"TO:<b@example.net"):
            self.assertRaises(PathSyntaxError, parseRcptTo, raw)

    def test_parametersUnknown(self) -> None:
        """
        RCPT takes no parameters: any well-formed one is unknown (555).
        """
        for params in (b"NOTIFY=NEVER", b"ORCPT=rfc822;b@example.net", b"SIZE=1"):
            with self.assertRaises(ParameterError) as e:
                parseRcptTo(b"TO:<b@example.net> " + params)
            self.assertTrue(e.exception.unknown, params)

    def test_malformedParameter(self) -> None:
        """
        A malformed RCPT parameter is a bad value, not an unknown one.
        """
        with self.assertRaises(ParameterError) as e:
            parseRcptTo(b"TO:<b@example.net> =x")
        self.assertFalse(e.exception.unknown)


class XtextTests(SynchronousTestCase):
    """
    Tests for L{xtextDecode} and L{xtextEncode} (RFC 3461 section 4).
    """

    def test_encode(self) -> None:
        """
        C{+}, C{=}, controls, space and non-ASCII are escaped with upper-case
        hex; other printable ASCII is kept.
        """
        self.assertEqual(xtextEncode("a+b=c d"), "a+2Bb+3Dc+20d")
        self.assertEqual(xtextEncode("\r\n"), "+0D+0A")
        self.assertEqual(xtextEncode("é"), "+C3+A9")
        self.assertEqual(xtextEncode("alice@example.org"), "alice@example.org")
        self.assertEqual(xtextEncode(""), "")

    def test_decode(self) -> None:
        """
        C{+XX} escapes are decoded; other characters are kept.
        """
        self.assertEqual(xtextDecode(b"a+2Bb+3Dc+20d"), "a+b=c d")
        self.assertEqual(xtextDecode(b"<>"), "<>")

    def test_decodeMalformed(self) -> None:
        """
        Lower-case or short escapes, C{=}, spaces, controls and bytes that do
        not form UTF-8 are refused.
        """
        for raw in (
            b"+2b",
            b"+2",
            b"+",
            b"a=b",
            b"a b",
            b"\x01",
            b"\x80",
            b"+FF",
            b"+C3",
        ):
            self.assertRaises(ParameterError, xtextDecode, raw)

    @settings(derandomize=True, max_examples=500)
    @given(st.text())
    def test_roundTrip(self, text: str) -> None:
        """
        Decoding an encoding gives the text back, and the encoding is valid
        xtext (printable ASCII, no C{=}, no bare C{+}).
        """
        encoded = xtextEncode(text)
        self.assertRegex(encoded, r"\A(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")
        self.assertEqual(xtextDecode(encoded.encode("ascii")), text)
