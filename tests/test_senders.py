"""
Tests for L{smtpauth_relay.senders}.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpauth_relay.senders import (
    MAX_HEADER,
    Refusal,
    SenderGrants,
    SenderLoginMap,
    canonicalAddress,
    canonicalDomain,
    headerFromAddresses,
    parseSenderLoginMap,
)

MAP = """\
# Who may send as whom.
alice: alice@example.org, "smith, john"@example.org
bob: @example.com, @.lists.example.net
carol: *
bounces: <>, bounces@example.org
"""


def warnings(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The warnings among captured log events.
    """
    return [e for e in events if e.get("log_level") == LogLevel.warn]


def eventsWith(events: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """
    The captured log events whose format contains C{text}.
    """
    return [e for e in events if text in e.get("log_format", "")]


class MapTestMixin:
    """
    Writes sender login maps to temporary files.
    """

    def writeMap(self, text: str | bytes, path: str | None = None) -> str:
        """
        Write C{text} to C{path}, or to a new file.

        @return: The file's path.
        """
        if path is None:
            path = self.mktemp()  # type: ignore[attr-defined]
        data = text.encode("utf-8") if isinstance(text, str) else text
        with open(path, "wb") as f:
            f.write(data)
        return path

    def makeMap(self, text: str, plusTags: bool = True) -> SenderLoginMap:
        """
        A L{SenderLoginMap} reading C{text} from a new file.
        """
        return SenderLoginMap(self.writeMap(text), plusTags=plusTags)


class ParseSenderLoginMapTests(SynchronousTestCase):
    """
    Tests for L{parseSenderLoginMap}.
    """

    def test_entries(self) -> None:
        """
        Each line gives a user the addresses, domains, domain trees, C{*} and
        C{<>} it lists; comments and blank lines give nothing.
        """
        with capturedLogs() as events:
            result = parseSenderLoginMap(MAP, "map")
        self.assertEqual(warnings(events), [])
        self.assertEqual(
            result,
            {
                "alice": SenderGrants(
                    addresses=frozenset(
                        {
                            ("alice", "example.org"),
                            ("smith, john", "example.org"),
                        }
                    )
                ),
                "bob": SenderGrants(
                    domains=frozenset({"example.com"}),
                    domainTrees=frozenset({"lists.example.net"}),
                ),
                "carol": SenderGrants(anything=True),
                "bounces": SenderGrants(
                    addresses=frozenset({("bounces", "example.org")}),
                    nullSender=True,
                ),
            },
        )

    def test_whiteSpaceAndLineEndings(self) -> None:
        """
        White space around the user name and the items, indented comments,
        CRLF line endings, a UTF-8 BOM, empty items and a missing final line
        ending change nothing.
        """
        data = (
            b"\xef\xbb\xbf  # comment\r\n"
            b"\t\r\n"
            b"  alice :  alice@example.org ,\t@example.com ,, \r\n"
            b"bob:bob@example.org,"
        )
        self.assertEqual(
            parseSenderLoginMap(data, "map"),
            {
                "alice": SenderGrants(
                    addresses=frozenset({("alice", "example.org")}),
                    domains=frozenset({"example.com"}),
                ),
                "bob": SenderGrants(addresses=frozenset({("bob", "example.org")})),
            },
        )

    def test_merged(self) -> None:
        """
        A user on several lines may use everything any of them lists.
        """
        result = parseSenderLoginMap(
            "alice: alice@example.org\n"
            "bob: bob@example.org\n"
            "alice: @example.com, <>\n"
            "alice: alice@example.org, *\n",
            "map",
        )
        self.assertEqual(
            result["alice"],
            SenderGrants(
                addresses=frozenset({("alice", "example.org")}),
                domains=frozenset({"example.com"}),
                anything=True,
                nullSender=True,
            ),
        )
        self.assertEqual(
            result["bob"], SenderGrants(addresses=frozenset({("bob", "example.org")}))
        )

    def test_canonicalEntries(self) -> None:
        """
        Entries are kept in the form senders are compared in: quoting that
        changes nothing undone, domains lower-cased and as A-labels, address
        literals in their normal form.
        """
        result = parseSenderLoginMap(
            'alice: "alice"@EXAMPLE.org, "a\\"b"@example.org, @Bücher.Example,'
            " @.XN--BCHER-KVA.example, x@[IPv6:2001:DB8:0::1], @[192.0.2.1]\n",
            "map",
        )
        self.assertEqual(
            result["alice"],
            SenderGrants(
                addresses=frozenset(
                    {
                        ("alice", "example.org"),
                        ('a"b', "example.org"),
                        ("x", "[IPv6:2001:db8::1]"),
                    }
                ),
                domains=frozenset({"xn--bcher-kva.example", "[192.0.2.1]"}),
                domainTrees=frozenset({"xn--bcher-kva.example"}),
            ),
        )

    def test_quotedCommasAndColons(self) -> None:
        """
        Commas, colons and C{#} inside a quoted local part belong to the
        address; C{#} is part of an unquoted local part too.
        """
        result = parseSenderLoginMap(
            'alice: "a,b:c"@example.org, "x\\",y"@example.org, a#1@example.org\n',
            "map",
        )
        self.assertEqual(
            result["alice"].addresses,
            frozenset(
                {
                    ("a,b:c", "example.org"),
                    ('x",y', "example.org"),
                    ("a#1", "example.org"),
                }
            ),
        )

    def assertSkipped(self, line: bytes, problem: str) -> None:
        """
        Assert that C{line}, between two good lines, is skipped as a whole
        with one warning naming the file, its line number and C{problem}.
        """
        data = b"alice: alice@example.org\n" + line + b"\nbob: bob@example.org\n"
        with capturedLogs() as events:
            result = parseSenderLoginMap(data, "/etc/relay/senders")
        self.assertEqual(
            result,
            {
                "alice": SenderGrants(addresses=frozenset({("alice", "example.org")})),
                "bob": SenderGrants(addresses=frozenset({("bob", "example.org")})),
            },
        )
        [warning] = warnings(events)
        self.assertEqual(warning["path"], "/etc/relay/senders")
        self.assertEqual(warning["lineNumber"], 2)
        self.assertIn(problem, warning.get("problem", warning["log_format"]))

    def test_noColon(self) -> None:
        """
        A line without C{:} is skipped with a warning.
        """
        self.assertSkipped(b"carol carol@example.org", "no ':'")

    def test_invalidUserName(self) -> None:
        """
        A line whose user name is empty or holds white space is skipped with
        a warning.
        """
        self.assertSkipped(b": carol@example.org", "invalid user name")
        self.assertSkipped(b"car ol: carol@example.org", "invalid user name")

    def test_nothingListed(self) -> None:
        """
        A line listing nothing is skipped with a warning.
        """
        self.assertSkipped(b"carol: , ", "no addresses listed for carol")

    def test_malformedItem(self) -> None:
        """
        One malformed item makes the whole line skipped, good items included,
        and the warning names the item.
        """
        for item, problem in [
            (b"carol", "no '@'"),
            (b"carol@", "invalid domain"),
            (b"@", "invalid domain"),
            (b"@.", "invalid domain"),
            (b"carol@example.org.", "invalid domain"),
            (b"carol@exa_mple.org", "invalid domain"),
            (b"carol smith@example.org", "malformed local part"),
            (b"<carol@example.org>", "malformed local part"),
            (b"carol..x@example.org", "malformed local part"),
            (b'""@example.org', "empty local part"),
            (b"@relay.example:carol@example.org", "invalid domain"),
            (b"carol@example.org@evil.example", "invalid domain"),
            (b"carol@[192.0.2.300]", "malformed address literal"),
            (b"@.[192.0.2.1]", "no subdomains"),
            (b"**", "no '@'"),
            (b"<", "no '@'"),
        ]:
            self.assertSkipped(
                b"carol: carol@example.org, " + item + b", @example.com", problem
            )

    def test_trailingComment(self) -> None:
        """
        There are no comments after an item (C{#} may be part of a local
        part): such a line is skipped with a warning, not half read.
        """
        self.assertSkipped(
            b"carol: carol@example.org # work", "'carol@example.org # work'"
        )

    def test_unterminatedQuote(self) -> None:
        """
        A line with an unclosed quoted string is skipped with a warning.
        """
        self.assertSkipped(b'carol: "carol@example.org', "unterminated quoted")

    def test_notUtf8(self) -> None:
        """
        A line that is not UTF-8 is skipped with a warning.
        """
        self.assertSkipped(b"carol: caf\xe9@example.org", "not UTF-8")

    def test_unprintable(self) -> None:
        """
        A zero-width space in a local part makes the line malformed, and the
        warning shows it escaped.
        """
        self.assertSkipped(
            "carol: ca\u200brol@example.org".encode(), "ca\\u200brol@example.org"
        )

    @settings(derandomize=True, max_examples=300)
    @given(st.binary(max_size=200))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        On any bytes, L{parseSenderLoginMap} returns grants by user name
        (never raising), and every user name it returns appears in the data.
        """
        result = parseSenderLoginMap(data, "map")
        for user, grants in result.items():
            self.assertIsInstance(grants, SenderGrants)
            self.assertIn(user.encode("utf-8"), data)


class CanonicalTests(SynchronousTestCase):
    """
    Tests for L{canonicalDomain} and L{canonicalAddress}.
    """

    def test_domainCase(self) -> None:
        """
        Host names are lower-cased.
        """
        self.assertEqual(canonicalDomain("Mail.EXAMPLE.org"), "mail.example.org")

    def test_idn(self) -> None:
        """
        An internationalised name in U-labels, upper or lower case, and its
        A-label form are one domain.
        """
        for domain in ["bücher.example", "BÜCHER.Example", "XN--BCHER-KVA.example"]:
            self.assertEqual(canonicalDomain(domain), "xn--bcher-kva.example")

    def test_idnMapping(self) -> None:
        """
        UTS #46 mapping applies to internationalised names: characters it
        ignores (a zero-width space) and full-width forms give the domain
        they map to, so they cannot name a different one.
        """
        self.assertEqual(
            canonicalDomain("bü\u200bcher.example"), "xn--bcher-kva.example"
        )
        self.assertEqual(canonicalDomain("\uff45xample\u3002org"), "example.org")

    def test_idnNonTransitional(self) -> None:
        """
        IDNA 2008 (non-transitional) rules: C{faß.de} is not C{fass.de}, so an
        entry for one does not let anyone send as the other.
        """
        self.assertEqual(canonicalDomain("faß.de"), "xn--fa-hia.de")
        self.assertEqual(canonicalDomain("fass.de"), "fass.de")

    def test_invalidDomains(self) -> None:
        """
        Trailing dots, empty labels, underscores, white space, over-long
        labels and invalid IDNs are refused.
        """
        for domain in [
            "",
            ".",
            "example.org.",
            ".example.org",
            "example..org",
            "exa_mple.org",
            "exa mple.org",
            "-example.org",
            "a" * 64 + ".org",
            "faß.de.",
            "☃\u0301.example",
            "example.org\n",
        ]:
            self.assertRaises(ValueError, canonicalDomain, domain)

    def test_addressLiterals(self) -> None:
        """
        Address literals are compared as IP addresses; malformed ones and
        IPv6 zones are refused.
        """
        self.assertEqual(canonicalDomain("[192.0.2.1]"), "[192.0.2.1]")
        self.assertEqual(
            canonicalDomain("[ipv6:2001:DB8:0:0::1]"), "[IPv6:2001:db8::1]"
        )
        for literal in [
            "[192.0.2]",
            "[192.0.2.01]",
            "[IPv6:192.0.2.1]",
            "[2001:db8::1]",
            "[IPv6:fe80::1%eth0]",
            "[]",
        ]:
            self.assertRaises(ValueError, canonicalDomain, literal)

    def test_quoting(self) -> None:
        """
        A quoted local part is compared by its value: quoting and quoted
        pairs that change nothing are undone; what needs quoting keeps its
        characters.
        """
        self.assertEqual(
            canonicalAddress('"alice"@example.org'), ("alice", "example.org")
        )
        self.assertEqual(
            canonicalAddress('"al\\ice"@example.org'), ("alice", "example.org")
        )
        self.assertEqual(
            canonicalAddress('"alice smith"@example.org'),
            ("alice smith", "example.org"),
        )
        self.assertEqual(
            canonicalAddress('"alice@example.org"@evil.example'),
            ("alice@example.org", "evil.example"),
        )

    def test_invalidAddresses(self) -> None:
        """
        Addresses with an empty or malformed local part, a missing or bad
        domain, a source route or angle brackets are refused.
        """
        for address in [
            "",
            "alice",
            "@example.org",
            '""@example.org',
            "alice@",
            ".alice@example.org",
            "alice.@example.org",
            "al..ice@example.org",
            "alice @example.org",
            "al ice@example.org",
            '"alice"x@example.org',
            'al"ice"@example.org',
            '"alice@example.org',
            '"al"ice"@example.org',
            "<alice@example.org>",
            "@relay.example:alice@example.org",
            "alice@example.org@evil.example",
            "alice@example.org.",
            "alice\r\n@example.org",
            "ali\u00a0ce@example.org",
        ]:
            self.assertRaises(ValueError, canonicalAddress, address)


class MayUseTests(MapTestMixin, SynchronousTestCase):
    """
    Tests for L{SenderLoginMap.mayUse}.
    """

    def setUp(self) -> None:
        self.map = self.makeMap(MAP)

    def assertAllowed(self, user: str, *senders: str) -> None:
        """
        Assert that C{user} may use each of C{senders}.
        """
        for sender in senders:
            self.assertIsNone(
                self.map.mayUse(user, sender), f"{user} refused <{sender}>"
            )

    def assertRefused(self, user: str, *senders: str) -> None:
        """
        Assert that C{user} may use none of C{senders}, each refused with a
        permanent L{Refusal} that quotes it.
        """
        for sender in senders:
            reason = self.map.mayUse(user, sender)
            self.assertIsInstance(reason, Refusal, f"{user} allowed <{sender}>")
            assert reason is not None
            self.assertFalse(reason.temporary)
            self.assertTrue(re.fullmatch("[ -~]+", reason), reason)

    def test_address(self) -> None:
        """
        A listed address may be used, and an address the user's entries do
        not list may not, with a reason naming both.
        """
        self.assertAllowed("alice", "alice@example.org", '"smith, john"@example.org')
        self.assertEqual(
            self.map.mayUse("alice", "bob@example.org"),
            "<bob@example.org> is not an address alice may send as",
        )

    def test_unknownUser(self) -> None:
        """
        A user the map does not name may send as nobody, the null sender
        included.
        """
        for sender in ["alice@example.org", "", "dave@example.org"]:
            self.assertEqual(
                self.map.mayUse("dave", sender),
                "no sender addresses are listed for dave",
            )

    def test_userNameExact(self) -> None:
        """
        User names are compared exactly.
        """
        self.assertRefused("Alice", "alice@example.org")
        self.assertRefused("alice ", "alice@example.org")

    def test_domainCaseInsensitive(self) -> None:
        """
        The domain of a sender is compared without regard to case.
        """
        self.assertAllowed("alice", "alice@EXAMPLE.org", "alice@Example.ORG")

    def test_localPartExact(self) -> None:
        """
        Local parts are compared exactly: case matters.
        """
        self.assertRefused("alice", "ALICE@example.org", "Alice@example.org")

    def test_quotedEquivalent(self) -> None:
        """
        A quoted local part that needs no quoting is the same address.
        """
        self.assertAllowed(
            "alice",
            '"alice"@example.org',
            '"al\\ice"@example.org',
            '"smith, john"@EXAMPLE.org',
        )

    def test_quotingBypass(self) -> None:
        """
        Quoting never makes an address pass for a listed one: a quoted
        local part holding the whole address, or extra characters.
        """
        self.assertRefused(
            "alice",
            '"alice@example.org"@evil.example',
            '"alice@example.org"@example.org',
            '"alice"@evil.example',
            '"alice "@example.org',
            '" alice"@example.org',
            '"alice\\ "@example.org',
            '"alice."@example.org',
            '"alice"."x"@example.org',
            'alice"@example.org"',
        )

    def test_domainLookalikes(self) -> None:
        """
        A listed address's domain must be the sender's domain: not a longer
        name that starts or ends like it, and not a subdomain.
        """
        self.assertRefused(
            "alice",
            "alice@example.org.evil.example",
            "alice@evil.example.org",
            "alice@xexample.org",
            "alice@example.org.",
            "alice@example.or",
            "alice@example.org@evil.example",
        )

    def test_percentHack(self) -> None:
        """
        A percent-hack local part is not the listed address.
        """
        self.assertRefused(
            "alice",
            "alice%evil.example@example.org",
            "alice%example.org@evil.example",
        )

    def test_bangPath(self) -> None:
        """
        A UUCP bang path is not the listed address.
        """
        self.assertRefused(
            "alice",
            "evil.example!alice@example.org",
            "alice!evil.example@example.org",
        )

    def test_sourceRoute(self) -> None:
        """
        An address with a source route is refused (L{parsePath} removes the
        route from C{MAIL FROM} before this is asked).
        """
        self.assertRefused(
            "alice",
            "@example.org:alice@example.org",
            "@relay.example,@example.org:alice@example.org",
        )

    def test_malformed(self) -> None:
        """
        Empty local parts, spaces, angle brackets, stray characters and
        control characters are refused, and the refusal shows them escaped.
        """
        self.assertRefused(
            "alice",
            "@example.org",
            '""@example.org',
            "alice @example.org",
            "alice@ example.org",
            " alice@example.org",
            "alice@example.org ",
            "<alice@example.org>",
            "alice@example.org>",
            "alice",
            "alice\x00@example.org",
        )
        self.assertEqual(
            self.map.mayUse("alice", "alice@example.org\r\n250 OK"),
            "<alice@example.org\\r\\n250 OK> is not an address alice may send as",
        )

    def test_refusalQuotesSafely(self) -> None:
        """
        Refusals are one line of printable ASCII at most a little longer than
        L{MAX_SHOWN} characters, whatever the user name and the sender.
        """
        reason = self.map.mayUse("d\u00e9\nve", "x" * 1000 + "@example.org")
        self.assertEqual(reason, "no sender addresses are listed for d\\xe9\\nve")
        reason = self.map.mayUse("alice", "x" * 1000 + "\u00e9@example.org")
        assert reason is not None
        self.assertTrue(re.fullmatch("[ -~]+", reason))
        self.assertLess(len(reason), 260)

    def test_domain(self) -> None:
        """
        C{@domain} allows any address in the domain, in any case, but not in
        its subdomains or lookalike domains.
        """
        self.assertAllowed(
            "bob",
            "bob@example.com",
            "anyone@EXAMPLE.COM",
            '"any one"@example.com',
            "ALICE+x%y@example.com",
        )
        self.assertRefused(
            "bob",
            "bob@mail.example.com",
            "bob@example.com.evil.example",
            "bob@xexample.com",
            '"bob@example.com"@evil.example',
            '""@example.com',
        )

    def test_domainTree(self) -> None:
        """
        C{@.domain} allows any address in the domain and its subdomains, but
        not in a domain that merely ends with the same characters.
        """
        self.assertAllowed(
            "bob",
            "x@lists.example.net",
            "x@a.lists.example.net",
            "x@A.B.LISTS.EXAMPLE.NET",
        )
        self.assertRefused(
            "bob",
            "x@example.net",
            "x@evillists.example.net",
            "x@lists.example.net.evil.example",
            "x@lists-example.net",
        )

    def test_anything(self) -> None:
        """
        C{*} allows any sender except the null sender.
        """
        self.assertAllowed(
            "carol",
            "carol@example.org",
            "alice@example.org",
            "anything@anywhere.example",
        )
        self.assertEqual(
            self.map.mayUse("carol", ""),
            "the null sender <> is not an address carol may send as",
        )

    def test_nullSender(self) -> None:
        """
        The null sender is allowed only to users that list C{<>}; listing it
        allows nothing else.
        """
        self.assertAllowed("bounces", "", "bounces@example.org")
        self.assertRefused("alice", "")
        self.assertRefused("bob", "")
        self.assertRefused("bounces", "<>", "x@example.org")

    def test_plusTags(self) -> None:
        """
        With C{plusTags} (the default), a listed address also allows itself
        with a C{+tag}, quoted or not; a domain entry is unaffected.
        """
        self.assertTrue(self.map.plusTags)
        self.assertAllowed(
            "alice",
            "alice+news@example.org",
            "alice+@example.org",
            "alice+a+b@EXAMPLE.org",
            "alice+a.b-c=d@example.org",
            "alice+.x@example.org",
            '"alice+news"@example.org',
        )

    def test_plusTagsOff(self) -> None:
        """
        Without C{plusTags}, a tagged address is a different address.
        """
        self.map = self.makeMap(MAP, plusTags=False)
        self.assertFalse(self.map.plusTags)
        self.assertAllowed("alice", "alice@example.org")
        self.assertRefused("alice", "alice+news@example.org", "alice+@example.org")

    def test_tagBypass(self) -> None:
        """
        A tag cannot make another address pass for a listed one: the part
        before the C{+} must be the whole listed local part (in the same
        case), the domain must match, and the tag may not need quoting or
        hold routing characters.
        """
        self.assertRefused(
            "alice",
            "alicex+news@example.org",
            "ali+ce@example.org",
            "ALICE+news@example.org",
            "+alice@example.org",
            "x+alice@example.org",
            "alice+news@evil.example",
            "alice+news@example.org.evil.example",
            '"alice+x@evil.example"@example.org',
            '"alice+x y"@example.org',
            '"alice+"@evil.example',
            "alice+x%evil.example@example.org",
            "alice+evil.example!x@example.org",
            "alice+news..x@example.org",
            '"smith, john+x"@example.org',
        )

    def test_tagOnTaggedEntry(self) -> None:
        """
        An entry that has a tag itself allows itself with a further tag, but
        not the address without its tag.
        """
        self.map = self.makeMap("dave: dave+lists@example.org\n")
        self.assertAllowed(
            "dave", "dave+lists@example.org", "dave+lists+rust@example.org"
        )
        self.assertRefused("dave", "dave@example.org", "dave+list@example.org")

    def test_routingCharactersInEntry(self) -> None:
        """
        An entry holding C{%} still allows itself with a tag after it: only
        the tag is checked for routing characters.
        """
        self.map = self.makeMap("dave: dave+x%y@example.org\n")
        self.assertAllowed("dave", "dave+x%y@example.org", "dave+x%y+z@example.org")
        self.assertRefused("dave", "dave@example.org", "dave+x@example.org")

    def test_idn(self) -> None:
        """
        An internationalised domain matches in U-label or A-label form and in
        any case; a different IDNA 2003 spelling (C{ß} as C{ss}) does not.
        """
        self.map = self.makeMap("dave: dave@bücher.example, @faß.de\n")
        self.assertAllowed(
            "dave",
            "dave@bücher.example",
            "dave@BÜCHER.example",
            "dave@xn--bcher-kva.example",
            "dave@XN--BCHER-KVA.EXAMPLE",
            "x@faß.de",
            "x@xn--fa-hia.de",
        )
        self.assertRefused(
            "dave",
            "dave@bucher.example",
            "x@fass.de",
            "dave@bücher.example.",
        )

    def test_nonAsciiLocalPart(self) -> None:
        """
        Non-ASCII local parts (From: headers of RFC 6532 messages) are
        compared exactly.
        """
        self.map = self.makeMap("dave: délia@example.org\n")
        self.assertAllowed("dave", "délia@example.org", "délia+x@example.org")
        self.assertRefused("dave", "Délia@example.org", "de\u0301lia@example.org")

    def test_addressLiteral(self) -> None:
        """
        Address literals match as IP addresses.
        """
        self.map = self.makeMap("dave: dave@[IPv6:2001:db8::1], @[192.0.2.1]\n")
        self.assertAllowed(
            "dave",
            "dave@[IPv6:2001:DB8:0:0:0:0:0:1]",
            "x@[192.0.2.1]",
        )
        self.assertRefused(
            "dave",
            "dave@[IPv6:2001:db8::2]",
            "x@[192.0.2.2]",
            "dave@[2001:db8::1]",
            "x@sub.[192.0.2.1]",
        )


class ReloadTests(MapTestMixin, SynchronousTestCase):
    """
    Tests for how L{SenderLoginMap} follows changes to its file.
    """

    def setUp(self) -> None:
        self.path = self.writeMap("alice: alice@example.org\n")
        os.utime(self.path, ns=(1_000_000_000_000, 1_000_000_000_000))
        self.map = SenderLoginMap(self.path)

    def test_missingAtConstruction(self) -> None:
        """
        Making a map of a file that does not exist raises
        L{FileNotFoundError} naming the file.
        """
        path = self.mktemp()
        e = self.assertRaises(FileNotFoundError, SenderLoginMap, path)
        self.assertEqual(e.errno, errno.ENOENT)
        self.assertEqual(e.filename, path)
        self.assertEqual(e.strerror, "sender login map does not exist")
        self.assertIn(path, str(e))

    def test_loadedAtConstruction(self) -> None:
        """
        The file is read, and its malformed lines warned about, when the map
        is made, so configuration checks report them.
        """
        path = self.writeMap("alice: alice@example.org\nbroken\n")
        with capturedLogs() as events:
            SenderLoginMap(path)
        [warning] = warnings(events)
        self.assertEqual((warning["path"], warning["lineNumber"]), (path, 2))
        [loaded] = eventsWith(events, "Loaded")
        self.assertEqual((loaded["path"], loaded["count"]), (path, 1))

    def test_rereadWhenChanged(self) -> None:
        """
        A file changed in place is read again at the next check.
        """
        self.assertIsNone(self.map.mayUse("alice", "alice@example.org"))
        self.writeMap("alice: alice@example.com\nbob: bob@example.org\n", self.path)
        os.utime(self.path, ns=(2_000_000_000_000, 2_000_000_000_000))
        self.assertIsNotNone(self.map.mayUse("alice", "alice@example.org"))
        self.assertIsNone(self.map.mayUse("alice", "alice@example.com"))
        self.assertIsNone(self.map.mayUse("bob", "bob@example.org"))

    def test_rereadWhenMtimeChanges(self) -> None:
        """
        A change that keeps the size is seen through the modification time.
        """
        self.writeMap("alice: alice@example.com\n", self.path)
        os.utime(self.path, ns=(1_000_000_000_000, 1_000_000_000_001))
        self.assertIsNone(self.map.mayUse("alice", "alice@example.com"))
        self.assertIsNotNone(self.map.mayUse("alice", "alice@example.org"))

    def test_rereadWhenReplaced(self) -> None:
        """
        A file renamed over the old one is read again, even with the same
        size and modification time.
        """
        replacement = self.writeMap("alice: alice@example.com\n")
        os.utime(replacement, ns=(1_000_000_000_000, 1_000_000_000_000))
        os.replace(replacement, self.path)
        self.assertIsNone(self.map.mayUse("alice", "alice@example.com"))

    def test_notRereadWhenUnchanged(self) -> None:
        """
        While the file's device, inode, size and modification time stay the
        same it is not read again: one C{stat} per check.
        """
        with capturedLogs() as events:
            self.assertIsNone(self.map.mayUse("alice", "alice@example.org"))
            self.writeMap("alice: alice@example.com\n", self.path)
            os.utime(self.path, ns=(1_000_000_000_000, 1_000_000_000_000))
            self.assertIsNone(self.map.mayUse("alice", "alice@example.org"))
        self.assertEqual(eventsWith(events, "Loaded"), [])

    def test_malformedLinesOnReread(self) -> None:
        """
        Malformed lines in a changed file are warned about when it is read
        again, with their line numbers; the good lines count.
        """
        with capturedLogs() as events:
            self.writeMap(
                "alice: alice@example.org\n# c\nbob bob@example.org\n", self.path
            )
            os.utime(self.path, ns=(3_000_000_000_000, 3_000_000_000_000))
            self.assertIsNone(self.map.mayUse("alice", "alice@example.org"))
            self.assertIsNone(self.map.mayUse("alice", "alice@example.org"))
        [warning] = warnings(events)
        self.assertEqual(
            (warning["path"], warning["lineNumber"], warning["problem"]),
            (self.path, 3, "no ':' after the user name"),
        )

    def assertUnavailable(self, reason: str | None, problem: str) -> None:
        """
        Assert that C{reason} is a temporary refusal naming C{problem}.
        """
        self.assertIsInstance(reason, Refusal)
        assert isinstance(reason, Refusal)
        self.assertTrue(reason.temporary)
        self.assertEqual(reason, f"the sender login map cannot be read ({problem})")

    def test_deleted(self) -> None:
        """
        If the file is deleted, every check is refused (not answered from
        what was read before), the problem is logged once, and the map works
        again when the file is back.
        """
        os.rename(self.path, self.path + ".bak")
        with capturedLogs() as events:
            for user in ["alice", "alice", "nobody"]:
                self.assertUnavailable(
                    self.map.mayUse(user, "alice@example.org"),
                    "No such file or directory",
                )
        [error] = eventsWith(events, "Cannot read")
        self.assertEqual(error["log_level"], LogLevel.error)
        self.assertEqual(error["path"], self.path)
        self.assertEqual(error["problem"], "No such file or directory")
        os.rename(self.path + ".bak", self.path)
        self.assertIsNone(self.map.mayUse("alice", "alice@example.org"))

    def test_unreadable(self) -> None:
        """
        A file that cannot be opened fails closed, logged once while it
        lasts, and again after it recovers and fails anew.
        """
        os.rename(self.path, self.path + ".bak")
        os.mkdir(self.path)  # Opening a directory fails even for root.
        with capturedLogs() as events:
            self.assertUnavailable(
                self.map.mayUse("alice", "alice@example.org"), "Is a directory"
            )
            self.assertUnavailable(self.map.mayUse("alice", ""), "Is a directory")
            os.rmdir(self.path)
            os.rename(self.path + ".bak", self.path)
            self.assertIsNone(self.map.mayUse("alice", "alice@example.org"))
            os.rename(self.path, self.path + ".bak")
            os.mkdir(self.path)
            self.assertUnavailable(
                self.map.mayUse("alice", "alice@example.org"), "Is a directory"
            )
        self.assertEqual(len(eventsWith(events, "Cannot read")), 2)

    def test_unreadableAtConstruction(self) -> None:
        """
        A file that exists but cannot be read when the map is made is logged
        and fails closed rather than raising (the relay may read it later
        under another user).
        """
        path = self.mktemp()
        os.mkdir(path)
        with capturedLogs() as events:
            senderMap = SenderLoginMap(path)
        self.assertEqual(len(eventsWith(events, "Cannot read")), 1)
        self.assertUnavailable(
            senderMap.mayUse("alice", "alice@example.org"), "Is a directory"
        )

    def test_unreachable(self) -> None:
        """
        A path one of whose components is a file fails closed.
        """
        senderMap = SenderLoginMap(os.path.join(self.path, "x"))
        self.assertUnavailable(
            senderMap.mayUse("alice", "alice@example.org"), "Not a directory"
        )

    def test_permissionDenied(self) -> None:
        """
        A file the relay may not read fails closed once the change is seen.
        """
        if os.geteuid() == 0:
            raise SkipTest("root can read anything")
        os.chmod(self.path, 0)
        self.addCleanup(os.chmod, self.path, 0o600)
        os.utime(self.path, ns=(4_000_000_000_000, 4_000_000_000_000))
        self.assertUnavailable(
            self.map.mayUse("alice", "alice@example.org"), "Permission denied"
        )


class HeaderFromAddressesTests(SynchronousTestCase):
    """
    Tests for L{headerFromAddresses}.
    """

    def test_addresses(self) -> None:
        """
        The addresses of a C{From:} header, without display names, comments
        or source routes, in order.
        """
        for value, expected in [
            ("alice@example.org", ["alice@example.org"]),
            ("Alice <alice@example.org>", ["alice@example.org"]),
            ('"Smith, Alice" <alice@example.org>', ["alice@example.org"]),
            ("alice@example.org (Alice)", ["alice@example.org"]),
            ("=?utf-8?q?Al=C3=AFce?= <alice@example.org>", ["alice@example.org"]),
            (
                "Alice <alice@example.org>, bob@example.org",
                ["alice@example.org", "bob@example.org"],
            ),
            ("<@relay.example:alice@example.org>", ["alice@example.org"]),
            ('"alice"@example.org', ['"alice"@example.org']),
            ("Al <alice@bücher.example>", ["alice@bücher.example"]),
        ]:
            self.assertEqual(headerFromAddresses(value), expected, value)

    def test_folded(self) -> None:
        """
        A folded header is unfolded.
        """
        self.assertEqual(
            headerFromAddresses("Alice\r\n <alice@example.org>,\n\tbob@example.org"),
            ["alice@example.org", "bob@example.org"],
        )

    def test_quotedAddressKept(self) -> None:
        """
        A quoted local part holding an address stays one address in another
        domain.
        """
        self.assertEqual(
            headerFromAddresses('"alice@example.org"@evil.example'),
            ['"alice@example.org"@evil.example'],
        )

    def test_displayNameIsNotTheAddress(self) -> None:
        """
        An address in the display name is not returned; the real one is.
        """
        self.assertEqual(
            headerFromAddresses('"alice@example.org" <mallory@evil.example>'),
            ["mallory@evil.example"],
        )

    def test_refused(self) -> None:
        """
        Headers with no address, an empty one, or that the two parsers read
        differently (CVE-2023-27043) are refused with a reason.
        """
        for value, problem in [
            ("", "has no address"),
            ("   ", "has no address"),
            ("<>", "empty address"),
            ("Nobody <>", "empty address"),
            ("undisclosed-recipients:;", "empty address"),
            ("alice@example.org, ", "empty address"),
            ("alice@example.org)<mallory@evil.example>", "empty address"),
            ("alice@example.org<mallory@evil.example>", "malformed"),
            ("<alice@example.org> mallory@evil.example", "malformed"),
            ("mallory@evil.example <alice@example.org>", "malformed"),
            ('alice@example.org"@evil.example', "malformed"),
            ("alice.@example.org", "malformed"),
            ("alice@example.org\r\nBcc: x@example.org", "malformed"),
            ("alice@example.org\rx", "malformed"),
            ("alice@example.org\x00", "malformed"),
            ("Alice <alice@example.org", "malformed"),
        ]:
            e = self.assertRaises(ValueError, headerFromAddresses, value)
            self.assertIn(problem, str(e), value)
            self.assertTrue(str(e).startswith("the From: header "))

    def test_tooLong(self) -> None:
        """
        A header longer than L{MAX_HEADER} is refused without being parsed.
        """
        value = ", ".join(["a@example.org"] * (MAX_HEADER // 10))
        self.assertGreater(len(value), MAX_HEADER)
        e = self.assertRaises(ValueError, headerFromAddresses, value)
        self.assertEqual(str(e), "the From: header is too long")

    def test_checkedWithMayUse(self) -> None:
        """
        The addresses returned are the form L{SenderLoginMap.mayUse} checks.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice: alice@example.org\n")
        senderMap = SenderLoginMap(path)
        for value in [
            "Alice <alice@EXAMPLE.org>",
            '"alice"@example.org',
            "Alice <alice+list@example.org>",
        ]:
            for address in headerFromAddresses(value):
                self.assertIsNone(senderMap.mayUse("alice", address), value)
        for value in [
            '"alice@example.org"@evil.example',
            "Alice <ALICE@example.org>",
            "Alice <alice@example.org.evil.example>",
        ]:
            [address] = headerFromAddresses(value)
            self.assertIsNotNone(senderMap.mayUse("alice", address), value)

    @settings(derandomize=True, max_examples=300)
    @given(
        st.lists(
            st.sampled_from(
                list('aA@.,;:<>()"\\ \t\r\n[]%!+') + ["example.org", "é", "=?"]
            ),
            max_size=40,
        ).map("".join)
    )
    def test_arbitraryHeaders(self, value: str) -> None:
        """
        On any value, L{headerFromAddresses} returns non-empty addresses
        without CR or LF, or raises L{ValueError}; nothing else escapes.
        """
        try:
            addresses = headerFromAddresses(value)
        except ValueError:
            return
        self.assertTrue(addresses)
        for address in addresses:
            self.assertTrue(address)
            self.assertNotIn("\r", address)
            self.assertNotIn("\n", address)


def localValue(local: str) -> str:
    """
    The value of a local part, found without L{smtpauth_relay.senders}: the
    text between the quotes with quoted pairs undone, or the local part as
    it is.
    """
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def sameUpToCaseAndTag(sender: str, entry: str) -> bool:
    """
    Whether C{sender} is C{entry} but for the case of its (ASCII) domain,
    quoting, and a C{+tag} after the local part.
    """
    senderLocal, _, senderDomain = sender.rpartition("@")
    entryLocal, _, entryDomain = entry.rpartition("@")
    if senderDomain.lower() != entryDomain.lower():
        return False
    s, e = localValue(senderLocal), localValue(entryLocal)
    return s == e or s.startswith(e + "+")


_LOCALS = st.text(alphabet="abAB.+%!-", min_size=1, max_size=8)
_DOMAINS = st.lists(
    st.sampled_from(["example", "EXAMPLE", "org", "evil", "a", "b-c"]),
    min_size=1,
    max_size=3,
).map(".".join)
_ENTRIES = st.lists(
    st.tuples(
        st.one_of(_LOCALS, _LOCALS.map(lambda local: f'"{local}"')), _DOMAINS
    ).map("@".join),
    min_size=1,
    max_size=4,
)


@st.composite
def _senders(draw: st.DrawFn, entries: list[str]) -> str:
    """
    A sender address: a listed entry twisted in ways that may or may not
    keep it the same address, or hostile text.
    """
    hostile = st.text(alphabet='abAB.+%!@"\\ -,<>:[]', max_size=24)
    clean = st.text(alphabet="abAB.-", max_size=4)
    anyText = st.one_of(clean, hostile)
    if draw(st.booleans()):
        return draw(hostile)
    entry = draw(st.sampled_from(entries))
    local, _, domain = entry.rpartition("@")
    for twist in draw(
        st.lists(
            st.sampled_from(
                [
                    "swapcase",
                    "domaincase",
                    "quote",
                    "unquote",
                    "escape",
                    "tag",
                    "append",
                    "prefix",
                    "suffix",
                    "subdomain",
                    "superdomain",
                    "percent",
                    "nest",
                ]
            ),
            max_size=3,
        )
    ):
        if twist == "swapcase":
            local = local.swapcase()
        elif twist == "domaincase":
            domain = domain.swapcase()
        elif twist == "quote":
            local = f'"{localValue(local)}"'
        elif twist == "unquote":
            local = localValue(local)
        elif twist == "escape" and local.startswith('"'):
            local = '"' + "".join("\\" + c for c in localValue(local)) + '"'
        elif twist == "tag":
            local = local + "+" + draw(anyText)
        elif twist == "append":
            local = local + draw(anyText)
        elif twist == "prefix":
            local = draw(anyText) + local
        elif twist == "suffix":
            domain = domain + draw(anyText)
        elif twist == "subdomain":
            domain = "sub." + domain
        elif twist == "superdomain":
            domain = domain.partition(".")[2]
        elif twist == "percent":
            local = local + "%" + draw(_DOMAINS)
        elif twist == "nest":
            local, domain = f'"{local}@{domain}"', draw(_DOMAINS)
    return f"{local}@{domain}"


class PropertyTests(MapTestMixin, SynchronousTestCase):
    """
    Properties of L{SenderLoginMap.mayUse} over generated maps and senders.
    """

    @settings(derandomize=True, max_examples=400, deadline=None)
    @given(st.data())
    def test_addressEntriesAllowOnlyThemselves(self, data: st.DataObject) -> None:
        """
        Under a map of addresses only (no C{@domain}, no C{*}), any sender
        L{SenderLoginMap.mayUse} accepts is one of the listed addresses but
        for the case of its domain, quoting that changes nothing, and (with
        C{plusTags}) a C{+tag}; without C{plusTags}, not even the tag.
        """
        entries = data.draw(_ENTRIES, label="entries")
        plusTags = data.draw(st.booleans(), label="plusTags")
        # One line per entry, so a malformed one takes no other with it.
        text = "".join(f"dave: {entry}\n" for entry in entries)
        senderMap = SenderLoginMap(self.writeMap(text), plusTags=plusTags)
        for sender in data.draw(st.lists(_senders(entries), max_size=8), "senders"):
            reason = senderMap.mayUse("dave", sender)
            if reason is not None:
                self.assertTrue(re.fullmatch("[ -~]+", reason), reason)
                continue
            self.assertTrue(
                any(sameUpToCaseAndTag(sender, entry) for entry in entries),
                f"{sender!r} accepted under {entries!r}",
            )
            if not plusTags:
                self.assertTrue(
                    any(
                        canonicalAddress(sender) == canonicalAddress(entry)
                        for entry in entries
                        if _parses(entry)
                    ),
                    f"{sender!r} accepted without plusTags under {entries!r}",
                )

    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(_ENTRIES)
    def test_entriesAllowThemselves(self, entries: list[str]) -> None:
        """
        Every well-formed entry allows itself, with its domain in upper case.
        """
        text = "".join(f"dave: {entry}\n" for entry in entries)
        senderMap = SenderLoginMap(self.writeMap(text))
        for entry in entries:
            if _parses(entry):
                local, _, domain = entry.rpartition("@")
                self.assertIsNone(senderMap.mayUse("dave", entry))
                self.assertIsNone(senderMap.mayUse("dave", f"{local}@{domain.upper()}"))


def _parses(address: str) -> bool:
    """
    Whether L{canonicalAddress} accepts C{address}.
    """
    try:
        canonicalAddress(address)
    except ValueError:
        return False
    return True
