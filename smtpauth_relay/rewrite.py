# -*- test-case-name: tests.test_rewrite -*-
"""
Sender rewriting for an upstream that takes only the mailbox it
authenticated (Microsoft 365 and Google refuse to "send as" anyone else):
C{[delivery] rewrite_sender}, C{rewrite_from}, and per-user overrides in the
sender login map (C{alice: alice@example.org => mailbox@example.org}).

At delivery time, never in the spool:

  - the envelope sender (C{MAIL FROM}) becomes the rewrite address; the
    null sender (a bounce) is never rewritten;
  - with C{rewrite_from}, the header as it is sent changes too: the address
    of C{From:} becomes the rewrite address, its display name kept
    (C{"Alice Example" <mailbox@example.org>}); the original C{From:} value
    is kept in C{X-Original-From:} and, when the message has no
    C{Reply-To:}, in a new C{Reply-To:}, so replies still reach the author;
    a C{Sender:} field (which would name someone the mailbox may not send
    for) is dropped and kept in C{X-Original-Sender:}.

The body is streamed unchanged after the rewritten header.  The spooled
file holds LF-terminated lines; so does the header made here (the ESMTP
client turns every line ending into CRLF and dot-stuffs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import IO

from smtpauth_relay.envelope import Envelope
from smtpauth_relay.senders import SenderLoginMap, headerFromAddresses

__all__ = [
    "MAX_HEADER",
    "RewrittenMessage",
    "SenderRewrite",
    "SenderRewriter",
    "openRewritten",
    "rewriteHeader",
]

MAX_HEADER = 256 * 1024
"""
The most octets of header read to rewrite C{From:}; a message whose header
is longer is sent with its header unchanged (only the envelope is
rewritten).
"""

TRACE_FROM = b"X-Original-From"
"""The field that keeps the original C{From:} value."""
TRACE_SENDER = b"X-Original-Sender"
"""The field that keeps the original C{Sender:} value."""


class RewriteUnavailable(Exception):
    """
    The per-user rewrite address cannot be known now (the sender login map
    cannot be read): the message must wait rather than go out unrewritten.
    """


@dataclass(frozen=True)
class SenderRewrite:
    """
    How one message's sender is rewritten.

    @ivar address: the upstream mailbox, C{local@domain}.
    @ivar rewriteFrom: whether C{From:} is rewritten too.
    """

    address: str
    rewriteFrom: bool = False


class SenderRewriter:
    """
    Decides the L{SenderRewrite} of each message: the sender login map's
    rewrite address for its user, else C{[delivery] rewrite_sender}.
    """

    def __init__(
        self,
        address: str = "",
        rewriteFrom: bool = False,
        senderMap: SenderLoginMap | None = None,
    ) -> None:
        """
        @param address: the default rewrite address, or C{""} for none.
        @param senderMap: the map holding per-user rewrite addresses.
        """
        self.address = address
        self.rewriteFrom = rewriteFrom
        self.senderMap = senderMap

    def forEnvelope(self, envelope: Envelope) -> SenderRewrite | None:
        """
        @return: the rewrite for C{envelope}, or C{None} (a bounce, or no
            rewrite address).
        @raise RewriteUnavailable: if the sender login map cannot be read.
        """
        if not envelope.sender:
            return None
        address = self.address
        if self.senderMap is not None and envelope.authUser:
            try:
                override = self.senderMap.rewriteFor(envelope.authUser)
            except OSError as e:
                raise RewriteUnavailable(
                    "the sender login map cannot be read "
                    f"({e.strerror or e}); the sender cannot be rewritten"
                ) from None
            address = override or address
        if not address:
            return None
        return SenderRewrite(address, self.rewriteFrom)


_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_ANGLE_ADDR = re.compile(r"<[^<>]*>\s*\Z")


def _fields(header: bytes) -> list[bytes]:
    """
    Split a header block (LF-terminated lines, no blank line) into fields,
    each with its continuation lines and line endings.
    """
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name(field: bytes) -> bytes:
    match = _FIELD_NAME.match(field)
    return match.group(1).lower() if match else b""


def _value(field: bytes) -> bytes:
    """
    The value of a field, as written (folding kept), without the line
    ending at its end.
    """
    value = field.split(b":", 1)[1]
    if value.endswith(b"\n"):
        value = value[:-1]
    return value


def _displayName(value: bytes) -> str:
    """
    The display name of a C{From:} value holding one address, as written
    (encoded words and quotes kept), or C{""}.
    """
    try:
        text = value.decode("utf-8")
        if len(headerFromAddresses(text)) != 1:
            return ""
    except (UnicodeDecodeError, ValueError):
        return ""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", text).strip()
    match = _ANGLE_ADDR.search(unfolded)
    if match is None:
        return ""
    return unfolded[: match.start()].strip()


def rewriteHeader(header: bytes, rewrite: SenderRewrite) -> bytes:
    """
    Rewrite C{From:} in a header block (see the module docstring).

    @param header: the fields, LF-terminated lines, without the blank line
        that ends the header.
    @return: the new header block, likewise.
    """
    fields = _fields(header)
    hasReplyTo = any(_name(f) == b"reply-to" for f in fields)
    address = rewrite.address.encode("utf-8")
    result: list[bytes] = []
    fromDone = False
    for field in fields:
        name = _name(field)
        if name == b"from":
            value = _value(field)
            if not fromDone:
                fromDone = True
                display = _displayName(value)
                new = b"<" + address + b">"
                if display:
                    new = display.encode("utf-8") + b" " + new
                result.append(b"From: " + new + b"\n")
                if not hasReplyTo:
                    result.append(b"Reply-To:" + value + b"\n")
            result.append(TRACE_FROM + b":" + value + b"\n")
        elif name == b"sender":
            result.append(TRACE_SENDER + b":" + _value(field) + b"\n")
        else:
            result.append(field)
    if not fromDone:
        result.append(b"From: <" + address + b">\n")
    return b"".join(result)


class RewrittenMessage:
    """
    A spooled message read with a rewritten header: the file-like object
    the ESMTP client sends from.

    @ivar growth: octets the message grew by (for C{SIZE=}).
    """

    def __init__(self, header: bytes, body: IO[bytes], growth: int) -> None:
        self._pending = header
        self._body = body
        self.growth = growth

    def read(self, size: int = -1) -> bytes:
        if self._pending:
            if size < 0:
                data, self._pending = self._pending + self._body.read(), b""
                return data
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return self._body.read(size)

    def close(self) -> None:
        self._body.close()


def openRewritten(messagePath: str, rewrite: SenderRewrite) -> RewrittenMessage:
    """
    Open a spooled message to be sent with C{From:} rewritten.

    A header longer than L{MAX_HEADER} is left as it is.

    @raise OSError: if the file cannot be read.
    """
    f = open(messagePath, "rb")
    try:
        start = f.read(MAX_HEADER + 2)
        if start.startswith(b"\n"):
            end, bodyStart = 0, 0
        else:
            found = start.find(b"\n\n")
            if found < 0:
                if len(start) > MAX_HEADER:
                    f.seek(0)
                    return RewrittenMessage(b"", f, 0)
                found = len(start)
                end, bodyStart = found, found
            else:
                end, bodyStart = found + 1, found + 1
        header = start[:end]
        rewritten = rewriteHeader(header, rewrite)
        f.seek(bodyStart)
    except BaseException:
        f.close()
        raise
    return RewrittenMessage(rewritten, f, len(rewritten) - len(header))
