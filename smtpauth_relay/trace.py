"""
The C{Received} trace header (RFC 5321 section 4.4) with the RFC 3848
C{with} keywords: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache

from smtpauth_relay.policy import clientAddress

_HELO_SAFE = re.compile(rb"[^A-Za-z0-9.\-_\[\]:]")
MAX_HELO = 255


def sanitiseHelo(helo: bytes) -> str:
    """
    Make a HELO/EHLO argument safe to put in a header: only the characters of
    domain names and address literals survive (anything else, including CR,
    LF, parentheses and non-ASCII, becomes C{_}), at most 255 of them.
    """
    return _HELO_SAFE.sub(b"_", helo.strip()[:MAX_HELO]).decode("ascii") or "unknown"


def logSafe(text: str, limit: int = 256) -> str:
    """
    A client-controlled string (an AUTH identity) made safe for one log
    line: backslashes, spaces, control and non-ASCII characters are escaped
    (C{\\r}, C{\\x20}, C{\\xe9}), so a CR or LF cannot start a forged
    line nor spaces make up fields of one; cut at C{limit} characters.
    """
    escaped = text[:limit].encode("unicode_escape").decode("ascii")
    # Spaces too: a user name cannot pose as the rest of a log line.
    return escaped.replace(" ", "\\x20")


@lru_cache(maxsize=4096)
def addressLiteral(host: str) -> str:
    """
    The RFC 5321 address literal for a peer: C{[192.0.2.1]} or
    C{[IPv6:2001:db8::1]}; a non-IP peer (UNIX socket) gives C{[UNIX]}.
    """
    address = clientAddress(host)
    if address is None:
        return "[UNIX]"
    if address.version == 6:
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


_lastDate: tuple[int, str] = (-1, "")


def headerDate(when: float) -> str:
    """
    The RFC 5322 date of C{when} in local time, as C{formatdate} gives it;
    whole seconds only, so it is computed once per second, not per message.
    """
    global _lastDate
    second = int(when)
    if _lastDate[0] != second:
        _lastDate = (second, formatdate(second, localtime=True))
    return _lastDate[1]


def withKeyword(tls: bool, authenticated: bool) -> str:
    """
    The RFC 3848 protocol keyword.
    """
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


@dataclass(frozen=True)
class TLSInfo:
    """
    What the C{Received} header says of the TLS session.
    """

    version: str
    cipher: str
    bits: int | None = None

    def comment(self) -> str:
        bits = f" ({self.bits}/{self.bits} bits)" if self.bits else ""
        return f"(using {self.version} with cipher {self.cipher}{bits})"


def receivedHeader(
    *,
    helo: str,
    peerHost: str,
    reverseName: str | None,
    byHost: str,
    esmtp: bool,
    tls: TLSInfo | None,
    authenticated: bool,
    queueId: str,
    recipients: tuple[str, ...],
    when: float,
    legacy: tuple[str, ...] = (),
) -> bytes:
    """
    Build the C{Received} header, folded, LF-terminated lines.

    The C{for} clause names the recipient only when there is exactly one, so
    the header never discloses the other (possibly Bcc) recipients.

    @param legacy: what the legacy lane allowed this session (C{"AUTH
        without TLS"}, C{"TLSv1"}, C{"bare LF accepted"}), named in a
        comment so that mail from such a device can be told apart.
    """
    peer = addressLiteral(peerHost)
    fromPart = f"{reverseName} {peer}" if reverseName else peer
    lines = [f"Received: from {helo} ({fromPart})"]
    if tls is not None:
        lines.append(f"\t{tls.comment()}")
    if legacy:
        lines.append(f"\t(legacy device: {', '.join(legacy)})")
    # RFC 3848 names ESMTP's variants; a HELO session over implicit TLS is
    # still better described by ESMTPS than by a bare SMTP.
    secure = tls is not None
    protocol = withKeyword(secure, authenticated) if esmtp or secure else "SMTP"
    lines.append(f"\tby {byHost} (smtpauth-relay) with {protocol} id {queueId}")
    forPart = f"for <{recipients[0]}>; " if len(recipients) == 1 else ""
    lines.append(f"\t{forPart}{headerDate(when)}")
    return ("\n".join(lines) + "\n").encode("ascii", "replace")
