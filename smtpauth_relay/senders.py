# -*- test-case-name: tests.test_senders -*-
"""
Which sender addresses each authenticated user may use: the sender login map
(C{[relay] sender_login_map}).

The map is a UTF-8 text file with one line per user::

    # user: items, comma separated
    alice: alice@example.org, "alice smith"@example.org
    bob: @example.com, @.lists.example.com
    bounces: <>
    admin: *

Each item is one of:

  - C{local@domain}: that address.  The local part is compared exactly
    (C{ALICE@example.org} is not C{alice@example.org}) once quoting that
    changes nothing is undone (C{"alice"@example.org} and
    C{"al\\ice"@example.org} are C{alice@example.org}); the domain is compared
    without regard to case and, for internationalised names, in its IDNA
    A-label form (UTS #46 mapping, non-transitional), so C{bücher.example}
    and C{xn--bcher-kva.example} are one domain.  Address literals
    (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}) are compared as IP addresses.
  - C{@domain}: any address in that domain, and not in its subdomains.
  - C{@.domain}: any address in that domain or in any of its subdomains.
  - C{*}: any address, but not the null sender.
  - C{<>}: the null sender (C{MAIL FROM:<>}).  Users seldom send bounces, so
    it is allowed only when listed, even to a user with C{*}.

Blank lines, and lines whose first non-blank character is C{#}, are ignored.
A C{#} anywhere else is part of an item (C{#} may appear in a local part), so
there are no comments at the end of a line.  White space around the user
name and the items is ignored; empty items (a trailing comma) are too.  A
user may appear on several lines: the items add up.  There is no default
entry: a user the map does not name may send as nobody.

A line that cannot be read in full (no C{:}, an invalid user name, an item
that is not one of the above, bytes that are not UTF-8) is skipped as a whole,
with a warning naming the file and the line; the user's other lines still
count.

With C{plusTags} (the default), an address entry also allows that address
with a C{+tag} after its local part: C{alice@example.org} allows
C{alice+news@example.org}.  A tagged sender counts only when its local part
needs no quoting and its tag holds neither C{%} nor C{!} (old routing
syntax), so neither quoting nor a tag can make one address pass for another.

Senders the module cannot read (invalid syntax, an empty local part, a source
route, a trailing dot in the domain) are refused unless the user has C{*}.

A line may end with C{=> ADDRESS}: mail from that user is sent to the
smarthost as ADDRESS (C{[delivery] rewrite_sender} for that user alone; see
L{smtpauth_relay.rewrite})::

    alice: alice@example.org, @example.com => shared-mailbox@example.org

A user has one rewrite address; a line naming a different one than an
earlier line is skipped with a warning.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.errors import InvalidHeaderDefect
from email.headerregistry import AddressHeader, HeaderRegistry
from email.utils import getaddresses

import idna
from twisted.logger import Logger

from smtpauth_relay.htpasswd import validateUsername
from smtpauth_relay.watchedfile import WatchedFile

__all__ = [
    "Refusal",
    "SenderGrants",
    "SenderLoginMap",
    "headerFromAddresses",
    "parseSenderLoginMap",
]

log = Logger()

_BOM = b"\xef\xbb\xbf"

# RFC 5322 atext, plus any non-ASCII character (RFC 6532); non-ASCII
# characters must also be printable, which _validNonAscii checks.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
_DOT_ATOM = re.compile(_ATOM + r"(?:\." + _ATOM + r")*\Z")
# qtext and quoted pairs (RFC 5321 4.1.2, RFC 6532).
_QUOTED_LOCAL = re.compile(
    r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]'
    r'|\\[\x20-\x7e\u0080-\U0010ffff])*)"@'
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(_LABEL + r"(?:\." + _LABEL + r")*\Z")

MAX_SHOWN = 200
"""
The most characters of an address or user name a refusal quotes.
"""

MAX_HEADER = 8192
"""
The longest C{From:} header value L{headerFromAddresses} parses.
"""


class Refusal(str):
    """
    Why a user may not use a sender address: the text of the refusal, fit to
    follow an SMTP reply code (printable ASCII, one line).

    @ivar temporary: C{True} when the refusal comes from a local problem (the
        map cannot be read) rather than from the map's contents, so a 4xx
        reply fits better than a 5xx one.
    """

    temporary: bool

    def __new__(cls, text: str, temporary: bool = False) -> Refusal:
        self = super().__new__(cls, text)
        self.temporary = temporary
        return self


@dataclass(frozen=True)
class SenderGrants:
    """
    The sender addresses one user may use.

    @ivar addresses: C{(localPart, domain)} pairs as L{canonicalAddress}
        gives them.
    @ivar domains: Domains (canonical) any of whose addresses may be used.
    @ivar domainTrees: Domains (canonical) any of whose addresses, or of
        whose subdomains' addresses, may be used.
    @ivar anything: Whether any non-null sender may be used.
    @ivar nullSender: Whether the null sender C{<>} may be used.
    @ivar rewrite: The address the user's mail is sent upstream as
        (C{=> ADDRESS}), or C{None}.
    """

    addresses: frozenset[tuple[str, str]] = frozenset()
    domains: frozenset[str] = frozenset()
    domainTrees: frozenset[str] = frozenset()
    anything: bool = False
    nullSender: bool = False
    rewrite: str | None = None


@dataclass
class _GrantsBuilder:
    """
    L{SenderGrants} being collected from the lines of a file.
    """

    addresses: set[tuple[str, str]] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    domainTrees: set[str] = field(default_factory=set)
    anything: bool = False
    nullSender: bool = False
    rewrite: str | None = None

    def freeze(self) -> SenderGrants:
        return SenderGrants(
            addresses=frozenset(self.addresses),
            domains=frozenset(self.domains),
            domainTrees=frozenset(self.domainTrees),
            anything=self.anything,
            nullSender=self.nullSender,
            rewrite=self.rewrite,
        )


def _shown(text: str) -> str:
    """
    C{text} made safe to quote in an SMTP reply or a log line: anything but
    printable ASCII is written as a Python escape (so no CR, LF or terminal
    escape gets through) and it is cut to L{MAX_SHOWN} characters.
    """
    shown = "".join(c if " " <= c <= "~" else ascii(c)[1:-1] for c in text)
    if len(shown) > MAX_SHOWN:
        shown = shown[: MAX_SHOWN - 3] + "..."
    return shown


def _validNonAscii(text: str) -> bool:
    """
    Whether every non-ASCII character of C{text} is printable (no format
    characters such as zero-width spaces, no non-ASCII white space).
    """
    return all(c.isascii() or c.isprintable() for c in text)


def canonicalDomain(domain: str) -> str:
    """
    The form of a domain that sender addresses are compared in.

    Host names are lower-cased; internationalised ones are given as IDNA
    A-labels (UTS #46 mapping, non-transitional, STD3 rules), so case and
    the U-label or A-label spelling make no difference.  Address literals
    are written as C{[192.0.2.1]} or C{[IPv6:2001:db8::1]} (compressed).

    @param domain: The domain part of an address.

    @return: The canonical form.

    @raise ValueError: If C{domain} is not a valid host name or address
        literal; a trailing dot is not accepted.
    """
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if "%" in literal:
            # ipaddress takes "fe80::1%eth0"; an address literal has no zone.
            raise ValueError("malformed address literal")
        try:
            if literal[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(literal[5:]).compressed}]"
            return f"[{ipaddress.IPv4Address(literal)}]"
        except ValueError:
            raise ValueError("malformed address literal") from None
    if domain.isascii():
        canonical = domain.lower()
    else:
        try:
            canonical = idna.encode(
                domain, uts46=True, std3_rules=True, transitional=False
            ).decode("ascii")
        except UnicodeError:
            # idna.IDNAError is a UnicodeError.
            raise ValueError("invalid internationalised domain name") from None
    if len(canonical) > 253 or not _HOSTNAME.match(canonical):
        raise ValueError("invalid domain")
    return canonical


def _splitLocalPart(address: str) -> tuple[str, str, bool]:
    """
    Split an address into its local part's value and its domain.

    @return: C{(value, domain, plain)}: the local part with any quoting
        undone, the domain as written, and whether the local part's value is
        a dot-atom (needs no quoting).

    @raise ValueError: If the local part is neither a dot-atom nor a quoted
        string, or is empty.
    """
    quoted = _QUOTED_LOCAL.match(address)
    if quoted:
        value = _QUOTED_PAIR.sub(r"\1", quoted.group(1))
        domain = address[quoted.end() :]
    else:
        value, at, domain = address.partition("@")
        if not at:
            raise ValueError("no '@'")
        if not _DOT_ATOM.match(value):
            raise ValueError("malformed local part")
    if not value:
        raise ValueError("empty local part")
    if not _validNonAscii(value):
        raise ValueError("unprintable character in the local part")
    return value, domain, bool(_DOT_ATOM.match(value))


def canonicalAddress(address: str) -> tuple[str, str]:
    """
    The form of an address that sender addresses are compared in.

    @param address: C{local@domain}; the local part a dot-atom or a quoted
        string, without angle brackets or a source route.

    @return: C{(localPart, domain)}: the local part's value, with quoting
        undone (C{"al\\ice"} is C{alice}; C{"a b"} is C{a b}), and the
        L{canonicalDomain}.

    @raise ValueError: If C{address} is not such an address.
    """
    value, domain, _plain = _splitLocalPart(address)
    return value, canonicalDomain(domain)


def _parseItem(item: str, grants: _GrantsBuilder) -> None:
    """
    Add what one item of a line allows to C{grants}.

    @raise ValueError: If the item is malformed.
    """
    if item == "*":
        grants.anything = True
    elif item == "<>":
        grants.nullSender = True
    elif item.startswith("@."):
        domain = canonicalDomain(item[2:])
        if domain.startswith("["):
            raise ValueError("an address literal has no subdomains")
        grants.domainTrees.add(domain)
    elif item.startswith("@"):
        grants.domains.add(canonicalDomain(item[1:]))
    else:
        grants.addresses.add(canonicalAddress(item))


def _splitRewrite(text: str) -> tuple[str, str | None]:
    """
    Split the part of a line after the user name at a C{=>} outside quoted
    strings.

    @return: the items, and the rewrite address (stripped) or C{None}.
    @raise ValueError: if the rewrite address is not an address.
    """
    inQuote = escaped = False
    for position, c in enumerate(text):
        if escaped:
            escaped = False
        elif inQuote and c == "\\":
            escaped = True
        elif c == '"':
            inQuote = not inQuote
        elif not inQuote and text.startswith("=>", position):
            address = text[position + 2 :].strip()
            try:
                canonicalAddress(address)
            except ValueError as e:
                raise ValueError(f"rewrite address '{_shown(address)}': {e}") from None
            return text[:position], address
    return text, None


def _splitItems(text: str) -> list[str]:
    """
    Split the part of a line after the user name at the commas outside
    quoted strings, stripping white space around each item.

    @raise ValueError: If a quoted string is not closed.
    """
    items: list[str] = []
    current: list[str] = []
    inQuote = escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif inQuote and c == "\\":
            escaped = True
        elif c == '"':
            inQuote = not inQuote
        elif c == "," and not inQuote:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(c)
    if inQuote:
        raise ValueError("unterminated quoted string")
    items.append("".join(current).strip())
    return [item for item in items if item]


def _parseLine(text: str) -> tuple[str, _GrantsBuilder] | None:
    """
    Parse one line of a sender login map.

    @return: C{(user, grants)}, or C{None} for a blank or comment line.

    @raise ValueError: If the line is malformed; the message says why.
    """
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    user, sep, rest = text.partition(":")
    if not sep:
        raise ValueError("no ':' after the user name")
    user = user.strip()
    try:
        validateUsername(user)
    except ValueError as e:
        raise ValueError(f"invalid user name: {e}") from None
    rest, rewrite = _splitRewrite(rest)
    items = _splitItems(rest)
    if not items:
        raise ValueError(f"no addresses listed for {_shown(user)}")
    grants = _GrantsBuilder(rewrite=rewrite)
    for item in items:
        try:
            _parseItem(item, grants)
        except ValueError as e:
            raise ValueError(f"item '{_shown(item)}': {e}") from None
    return user, grants


def parseSenderLoginMap(data: bytes | str, path: str) -> dict[str, SenderGrants]:
    """
    Parse the contents of a sender login map (see the module's docstring).

    A malformed line is skipped, with a warning naming the file, the line
    number and the problem.  The items of all lines naming a user are merged.

    @param data: The contents of the file, UTF-8 (an initial BOM is ignored).
    @param path: The file's name, for the warnings.

    @return: What each user may send as, by user name.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    builders: dict[str, _GrantsBuilder] = {}
    for lineNumber, raw in enumerate(data.split(b"\n"), start=1):
        try:
            entry = _parseLine(raw.decode("utf-8"))
        except UnicodeDecodeError:
            log.warn(
                "Skipping line {lineNumber} of sender login map {path}: not UTF-8",
                path=path,
                lineNumber=lineNumber,
            )
            continue
        except ValueError as e:
            log.warn(
                "Skipping malformed line {lineNumber} of sender login map {path}:"
                " {problem}",
                path=path,
                lineNumber=lineNumber,
                problem=str(e),
            )
            continue
        if entry is None:
            continue
        user, grants = entry
        merged = builders.setdefault(user, _GrantsBuilder())
        if grants.rewrite is not None:
            if merged.rewrite is not None and merged.rewrite != grants.rewrite:
                log.warn(
                    "Skipping line {lineNumber} of sender login map {path}: "
                    "{user} already has another rewrite address",
                    path=path,
                    lineNumber=lineNumber,
                    user=_shown(user),
                )
                continue
            merged.rewrite = grants.rewrite
        merged.addresses |= grants.addresses
        merged.domains |= grants.domains
        merged.domainTrees |= grants.domainTrees
        merged.anything |= grants.anything
        merged.nullSender |= grants.nullSender
    return {user: builder.freeze() for user, builder in builders.items()}


def _allowedBy(grants: SenderGrants, sender: str, plusTags: bool) -> bool:
    """
    Whether C{grants} allow the non-null C{sender}.
    """
    if grants.anything:
        return True
    try:
        value, rawDomain, plain = _splitLocalPart(sender)
        domain = canonicalDomain(rawDomain)
    except ValueError:
        return False
    if domain in grants.domains:
        return True
    if any(domain == d or domain.endswith("." + d) for d in grants.domainTrees):
        return True
    if (value, domain) in grants.addresses:
        return True
    if plusTags and plain:
        for position, c in enumerate(value):
            if c != "+":
                continue
            tag = value[position + 1 :]
            if "%" in tag or "!" in tag:
                continue
            if (value[:position], domain) in grants.addresses:
                return True
    return False


_Signature = tuple[int, int, int, int]


class SenderLoginMap:
    """
    A sender login map file (see the module's docstring), consulted on every
    C{MAIL FROM}.

    The file is looked at with C{stat} on each check and read again only
    when its device, inode, size or modification time changed, so edits (in
    place or by renaming a new file over it) take effect without a restart
    at the cost of one C{stat} per check.  A change of only its permissions
    keeps what was last read.

    If the file cannot be read (deleted, permissions, I/O error), every check
    is refused with a temporary L{Refusal} naming the problem, and the
    problem is logged as an error once while it lasts: the map fails closed,
    never falling back to what it last read.

    @ivar path: The file.
    @ivar plusTags: Whether an address entry also allows that address with a
        C{+tag}.
    """

    log = Logger()

    def __init__(self, path: str, plusTags: bool = True) -> None:
        """
        Read the map.

        @param path: The file.
        @param plusTags: Whether C{alice@example.org} also allows
            C{alice+tag@example.org}.

        @raise FileNotFoundError: If there is no file at C{path}.  Other
            problems reading it are logged, and checks refused, instead.
        """
        self.path = path
        self.plusTags = plusTags
        self._file = WatchedFile(path, parseSenderLoginMap, "sender login map")
        try:
            os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "sender login map does not exist", path
            ) from None
        except OSError:
            pass  # Logged by _current.
        self._current()

    def _current(self) -> dict[str, SenderGrants] | Refusal:
        """
        The map as the file holds it now, read again only if it changed.

        @return: The grants by user, or a temporary L{Refusal} if the file
            cannot be read (never the last contents: fail closed).
        """
        try:
            return self._file.current()
        except OSError as e:
            return Refusal(
                f"the sender login map cannot be read ({_shown(e.strerror or str(e))})",
                temporary=True,
            )

    def mayUse(self, user: str, sender: str) -> Refusal | None:
        """
        Whether a user may use a sender address.

        @param user: The authenticated user name (compared exactly).
        @param sender: The address as L{smtpauth_relay.addresses.MailFrom}
            holds it (C{local@domain}, no angle brackets, C{""} for the null
            sender), or one of L{headerFromAddresses}.

        @return: C{None} if the user may; otherwise why not, as a
            L{Refusal} (a L{str}) that quotes the address and the user safely.
        """
        current = self._current()
        if isinstance(current, Refusal):
            return current
        grants = current.get(user)
        if grants is None:
            return Refusal(f"no sender addresses are listed for {_shown(user)}")
        if sender == "":
            if grants.nullSender:
                return None
            return Refusal(
                f"the null sender <> is not an address {_shown(user)} may send as"
            )
        if _allowedBy(grants, sender, self.plusTags):
            return None
        return Refusal(
            f"<{_shown(sender)}> is not an address {_shown(user)} may send as"
        )

    def rewriteFor(self, user: str) -> str | None:
        """
        The address C{user}'s mail is sent upstream as (C{=> ADDRESS}).

        @return: the address, or C{None} when the map gives none.
        @raise OSError: if the map cannot be read (fail closed: the caller
            must not send the message unrewritten).
        """
        current = self._file.current()
        grants = current.get(user)
        return grants.rewrite if grants is not None else None


_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


def _sameAddress(a: str, b: str) -> bool:
    """
    Whether two parsers' readings of one address agree.
    """
    if a == b:
        return True
    try:
        return canonicalAddress(a) == canonicalAddress(b)
    except ValueError:
        return False


def _strictAddresses(value: str) -> Iterable[str]:
    """
    The addresses in a header value as the RFC 5322 parser of
    L{email.headerregistry} reads it.

    @raise ValueError: If that parser finds the value invalid.
    """
    try:
        header = HeaderRegistry()("From", value)
        assert isinstance(header, AddressHeader)
        addresses = [address.addr_spec for address in header.addresses]
    except Exception:
        # A parser bug on hostile input must refuse the message, not crash.
        raise ValueError("the From: header is malformed") from None
    if any(isinstance(defect, InvalidHeaderDefect) for defect in header.defects):
        raise ValueError("the From: header is malformed")
    return addresses


def headerFromAddresses(headerValue: str) -> list[str]:
    """
    The addresses of a C{From:} header, each to be checked with
    L{SenderLoginMap.mayUse}.

    The value is read by L{email.utils.getaddresses} and, to rule out the
    differences between parsers that forged headers exploit (CVE-2023-27043:
    C{alice@example.org)<bob@example.org>} reads as Alice to one and Bob to
    another), by the stricter parser of L{email.headerregistry} as well.
    Unless both find the same addresses, the header is refused.

    @param headerValue: The header's value, possibly folded.

    @return: The addresses (C{local@domain}), at least one; display names
        and source routes are dropped.

    @raise ValueError: If the header has no address, an empty one (C{<>}, a
        group), is malformed, is longer than L{MAX_HEADER}, or is read
        differently by the two parsers.  The message suits a 550 5.7.1
        reply.
    """
    if len(headerValue) > MAX_HEADER:
        raise ValueError("the From: header is too long")
    value = _UNFOLD.sub("", headerValue)
    if any(c in value for c in "\r\n\0"):
        raise ValueError("the From: header is malformed")
    found = [address for name, address in getaddresses([value])]
    if not found or not value.strip():
        raise ValueError("the From: header has no address")
    if "" in found:
        raise ValueError("the From: header has an empty address")
    strict = list(_strictAddresses(value))
    if len(strict) != len(found) or not all(
        _sameAddress(a, b) for a, b in zip(found, strict, strict=True)
    ):
        raise ValueError("the From: header is ambiguous")
    return found
