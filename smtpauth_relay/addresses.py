"""
Parsing of the C{MAIL FROM} and C{RCPT TO} arguments (RFC 5321 section 4.1.2,
RFC 1870, RFC 6152, RFC 4954 section 5).

Pure functions, no I/O: the server protocol turns L{PathSyntaxError} and
L{ParameterError} into replies.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 4.1.2: atext of RFC 5322.
_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rb"(?:" + _ATEXT + rb"+(?:\." + _ATEXT + rb"+)*)"
# qtextSMTP (%d32-33 / %d35-91 / %d93-126) or quoted-pairSMTP (%d92 %d32-126).
_QUOTED_STRING = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LOCAL_PART = rb"(?:" + _DOT_STRING + rb"|" + _QUOTED_STRING + rb")"
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rb"(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*)"
_ADDRESS_LITERAL = rb"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]"
_MAILBOX = re.compile(
    rb"(" + _LOCAL_PART + rb")@(" + _DOMAIN + rb"|" + _ADDRESS_LITERAL + rb")\Z"
)
# An obsolete source route, "@a,@b:", which RFC 5321 says to accept and ignore.
_SOURCE_ROUTE = re.compile(rb"@" + _DOMAIN + rb"(?:,@" + _DOMAIN + rb")*:")
_ESMTP_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e]+\Z")

_MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "AUTH"})

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class PathSyntaxError(ValueError):
    """
    The path (the address in angle brackets) is malformed.
    """


class ParameterError(ValueError):
    """
    An ESMTP parameter is malformed or not supported.

    @ivar unknown: C{True} when the keyword itself is not supported
        (RFC 5321: 555), C{False} when its value is bad (501).
    """

    def __init__(self, message: str, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


@dataclass(frozen=True)
class MailFrom:
    """
    A parsed C{MAIL FROM}.

    @ivar sender: the reverse-path; C{""} for the null sender C{<>}.
    @ivar size: the declared C{SIZE=}, or C{None}.
    @ivar body: C{"7BIT"} or C{"8BITMIME"}.
    @ivar auth: the decoded C{AUTH=} value (C{"<>"} for none given as such),
        or C{None} when the parameter was absent.
    """

    sender: str
    size: int | None = None
    body: str = "7BIT"
    auth: str | None = None


def parsePath(raw: bytes, allowNull: bool) -> str:
    """
    Parse C{<local@domain>} and return C{local@domain}.

    @raise PathSyntaxError: when C{raw} is not a valid path.
    """
    if not (raw.startswith(b"<") and raw.endswith(b">")):
        raise PathSyntaxError("address must be in angle brackets")
    # RFC 5321 4.5.3.1.3: 256 octets including the punctuation.
    if len(raw) > MAX_PATH:
        raise PathSyntaxError("address too long")
    inner = raw[1:-1]
    if inner == b"":
        if allowNull:
            return ""
        raise PathSyntaxError("null address not allowed here")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    m = _MAILBOX.match(inner)
    if not m:
        raise PathSyntaxError("malformed address")
    local, domain = m.group(1), m.group(2)
    if len(local) > MAX_LOCAL_PART:
        raise PathSyntaxError("local part too long")
    if len(domain) > MAX_DOMAIN:
        raise PathSyntaxError("domain too long")
    if domain.startswith(b"[") and not _validLiteral(domain[1:-1]):
        raise PathSyntaxError("malformed address literal")
    return inner.decode("ascii")


def _validLiteral(literal: bytes) -> bool:
    """
    Whether C{literal} (without brackets) is an IPv4 or C{IPv6:} address
    literal (RFC 5321 4.1.3); general address literals are not accepted.
    """
    text = literal.decode("ascii")
    try:
        if text.startswith("IPv6:"):
            ipaddress.IPv6Address(text[5:])
        else:
            ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _splitArgument(argument: bytes, keyword: bytes) -> tuple[bytes, list[bytes]]:
    """
    Split C{FROM:<path> params} into the path and the parameters.

    Tolerates a space after the colon, which many clients send.
    """
    if argument[: len(keyword)].upper() != keyword:
        raise PathSyntaxError(f"expected {keyword.decode()}")
    rest = argument[len(keyword) :].lstrip(b" ")
    if not rest.startswith(b"<"):
        raise PathSyntaxError("address must be in angle brackets")
    end = _closingBracket(rest)
    path, params = rest[: end + 1], rest[end + 1 :]
    if params and not params.startswith(b" "):
        raise PathSyntaxError("garbage after address")
    return path, params.split()


def _closingBracket(data: bytes) -> int:
    """
    The index of the C{>} closing the path, skipping quoted strings.
    """
    inQuote = False
    i = 1
    while i < len(data):
        c = data[i : i + 1]
        if inQuote and c == b"\\":
            i += 2
            continue
        if c == b'"':
            inQuote = not inQuote
        elif c == b">" and not inQuote:
            return i
        i += 1
    raise PathSyntaxError("unterminated address")


def _parameters(params: list[bytes], known: frozenset[str]) -> dict[str, bytes | None]:
    """
    Split ESMTP parameters into a dict; a keyword not in C{known} is
    reported as unknown (555) before its value is looked at.
    """
    result: dict[str, bytes | None] = {}
    for p in params:
        keyword, sep, value = p.partition(b"=")
        if not _ESMTP_KEYWORD.match(keyword):
            raise ParameterError("malformed parameter")
        name = keyword.decode("ascii").upper()
        if name not in known:
            raise ParameterError(f"{name} parameter not supported", unknown=True)
        if name in result:
            raise ParameterError(f"duplicate {name} parameter")
        if sep and not _ESMTP_VALUE.match(value):
            raise ParameterError(f"malformed {name} value")
        result[name] = value if sep else None
    return result


def xtextDecode(value: bytes) -> str:
    """
    Decode RFC 3461 xtext (C{+XX} escapes); the octets are read as UTF-8.

    @raise ParameterError: on a malformed escape or invalid UTF-8.
    """
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == 0x2B:  # "+"
            hexpair = value[i + 1 : i + 3]
            if not re.fullmatch(rb"[0-9A-F]{2}", hexpair):
                raise ParameterError("malformed xtext in AUTH")
            out.append(int(hexpair, 16))
            i += 3
        elif 0x21 <= c <= 0x7E and c != 0x3D:
            out.append(c)
            i += 1
        else:
            raise ParameterError("malformed xtext in AUTH")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ParameterError("malformed xtext in AUTH") from None


def xtextEncode(value: str) -> str:
    """
    Encode C{value} as RFC 3461 xtext.
    """
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8")
    )


def parseMailFrom(argument: bytes) -> MailFrom:
    """
    Parse the argument of C{MAIL}: C{FROM:<path> [SIZE=n] [BODY=x] [AUTH=x]}.

    @raise PathSyntaxError: for a malformed path.
    @raise ParameterError: for a malformed or unsupported parameter.
    """
    path, rawParams = _splitArgument(argument, b"FROM:")
    sender = parsePath(path, allowNull=True)
    params = _parameters(rawParams, _MAIL_PARAMETERS)
    size: int | None = None
    body = "7BIT"
    auth: str | None = None
    for name, value in params.items():
        if name == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise ParameterError("SIZE must be a number")
            size = int(value)
        elif name == "BODY":
            if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
                raise ParameterError("BODY must be 7BIT or 8BITMIME")
            body = value.upper().decode("ascii")
        elif name == "AUTH":
            if value is None:
                raise ParameterError("AUTH needs a value")
            auth = "<>" if value == b"<>" else xtextDecode(value)
    return MailFrom(sender=sender, size=size, body=body, auth=auth)


def parseRcptTo(argument: bytes) -> str:
    """
    Parse the argument of C{RCPT}: C{TO:<path>}; no parameters are supported.

    @raise PathSyntaxError: for a malformed path.
    @raise ParameterError: for any parameter.
    """
    path, rawParams = _splitArgument(argument, b"TO:")
    recipient = parsePath(path, allowNull=False)
    _parameters(rawParams, frozenset())
    return recipient
