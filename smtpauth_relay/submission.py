"""
Message intake: the lines of one C{DATA} go to one spool writer.

Twisted's SMTP server makes one L{twisted.mail.smtp.IMessage} per recipient and
feeds each every line; this relay keeps one writer per transaction, however
many recipients, and decides here, line by line, whether the message can be
accepted at all:

  - a line longer than C{max_line_length} (with its CRLF) fails the message
    with 554 5.6.0; it is never split or truncated;
  - a bare CR or LF inside a line fails it with 550 5.6.11 (SMTP smuggling:
    the relay never passes on a line ending a lenient next hop could read as
    the end of the message);
  - more octets than C{max_message_size} fail it with 552 5.3.4.

Once failed, nothing more is written and the spool file is thrown away; the
protocol reports the failure after the final dot, and the session goes on.
The spool receives LF-terminated, un-stuffed lines (what Twisted's ESMTP
client and a Maildir expect).
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred

from smtpauth_relay import replies
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.interfaces import ISpoolWriter
from smtpauth_relay.replies import Reply

_HEADER_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")

MAX_HOPS = 50
"""Received fields (ours included) beyond which a message is looping."""
MAX_FIELD = 8192
"""Longest From: field kept for the sender check."""


def hasLongLine(chunk: bytes, maxLength: int) -> bool:
    """
    Whether a line of C{chunk} (CRLF lines, ending with a line end) is
    longer than C{maxLength} octets with its CRLF.  A few C{find} calls per
    C{maxLength / 2} octets instead of splitting the chunk into lines: if
    every stretch of that length holds a line end, no line is longer than
    C{maxLength - 1}; only a chunk with a long stretch is measured exactly.
    """
    half = max(1, maxLength // 2)
    find = chunk.find
    for start in range(0, len(chunk), half):
        if find(b"\n", start, start + half) < 0:
            # A piece between LFs is a line's text and its CR.
            return max(map(len, chunk.split(b"\n"))) + 1 > maxLength
    return False


class MessageIntake:
    """
    Collects one message for the spool.

    @ivar error: the reply that refuses the message, once it has failed.
    @ivar size: octets received so far, counted as on the wire without the
        dot-stuffing (each line plus CRLF), as RFC 1870 counts.
    @ivar eightBit: whether any octet above 127 was seen.
    """

    def __init__(
        self,
        writer: ISpoolWriter,
        receivedHeader: bytes,
        maxSize: int,
        maxLineLength: int,
    ) -> None:
        self.writer = writer
        self.maxSize = maxSize
        self.maxLineLength = maxLineLength
        self.error: Reply | None = None
        self.size = 0
        self.eightBit = False
        self._firstLine = True
        self._inHeader = True
        self._currentField: bytes | None = None
        self._fromFields: list[bytes] = []
        self.hops = 1  # our own Received
        writer.write(receivedHeader)

    @property
    def queueId(self) -> str:
        return str(self.writer.queueId)

    def _fail(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply
            self.writer.abort()

    def overlongLine(self) -> None:
        """
        The protocol discarded a line longer than its buffer allows.
        """
        self._fail(replies.DATA_LINE_TOO_LONG)

    def lineReceived(self, line: bytes) -> None:
        """
        One line of C{DATA} as received: CRLF removed, still dot-stuffed.
        """
        if self.error is not None:
            return
        if line.startswith(b"."):
            line = line[1:]
        # RFC 5321 4.5.3.1.6: the limit does not count the transparency dot.
        if len(line) + 2 > self.maxLineLength:
            self._fail(replies.DATA_LINE_TOO_LONG)
            return
        if b"\r" in line or b"\n" in line:
            self._fail(replies.BARE_LINE_ENDING)
            return
        self.size += len(line) + 2
        if self.size > self.maxSize:
            self._fail(replies.TOO_BIG)
            return
        if not self.eightBit and not line.isascii():
            self.eightBit = True
        if self._firstLine:
            self._firstLine = False
            # A message that starts with body text (no header fields) needs
            # the blank line that ends the header section, or its first line
            # would become part of our Received header.
            if line and not _HEADER_FIELD.match(line):
                self.writer.write(b"\n")
                self._inHeader = False
        if self._inHeader:
            self._headerLine(line)
            if self.error is not None:
                return
        self.writer.write(line + b"\n")

    @property
    def acceptsChunks(self) -> bool:
        """
        Whether L{bodyChunk} may be tried: in the body, with no error yet.
        """
        return self.error is None and not self._inHeader and not self._firstLine

    def bodyChunk(self, chunk: bytes) -> bool:
        """
        The fast path for the body: whole CRLF-terminated lines at once
        (still dot-stuffed, without the final dot's line), checked and
        written with a few calls over the whole chunk instead of several per
        line.

        @return: C{False}, having done nothing, if the chunk cannot take the
            fast path (still in the header section, an error already, a line
            too long, a bare CR or LF): the caller then feeds its lines to
            L{lineReceived}, which finds and reports what is wrong.
        """
        if not self.acceptsChunks:
            return False
        lines = chunk.count(b"\n")
        # Every LF ends a CRLF (a bare CR shows as a length mismatch below).
        if not lines or chunk.count(b"\r\n") != lines or chunk[-1:] != b"\n":
            return False
        if hasLongLine(chunk, self.maxLineLength):
            return False
        if chunk[:1] == b"." or b"\r\n." in chunk:
            # Dot-unstuffing: one dot off the start of each line.
            unstuffed = (chunk[1:] if chunk[:1] == b"." else chunk).replace(
                b"\r\n.", b"\r\n"
            )
        else:
            unstuffed = chunk
        # With every LF after a CR, dropping the CRs turns CRLF into LF; if
        # more went than one per line, there was a bare CR.
        data = unstuffed.replace(b"\r", b"")
        if len(data) != len(unstuffed) - lines:
            return False
        self.size += len(data) + lines
        if self.size > self.maxSize:
            self._fail(replies.TOO_BIG)
            return True
        if not self.eightBit and not data.isascii():
            self.eightBit = True
        self.writer.write(data)
        return True

    def _headerLine(self, line: bytes) -> None:
        """
        Follow the header section: count the hops (RFC 5321 6.3: a message
        with too many Received fields is in a loop) and keep the From:
        fields, unfolded.
        """
        if not line:
            self._inHeader = False
            self._endField()
            return
        if line[:1] in (b" ", b"\t"):
            if self._currentField is not None and len(self._currentField) < MAX_FIELD:
                self._currentField += b" " + line.strip()
            return
        self._endField()
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"received":
            self.hops += 1
            if self.hops > MAX_HOPS:
                self._fail(replies.TOO_MANY_HOPS)
        elif name == b"from":
            self._currentField = line.split(b":", 1)[1].strip()

    def _endField(self) -> None:
        if self._currentField is not None:
            self._fromFields.append(self._currentField)
            self._currentField = None

    @property
    def fromFields(self) -> list[str]:
        """
        The values of the message's From: header fields, unfolded.
        """
        fields = list(self._fromFields)
        if self._currentField is not None:
            fields.append(self._currentField)
        return [f.decode("utf-8", "replace") for f in fields]

    def refuse(self, reply: Reply) -> None:
        """
        Refuse the message (a policy decision at the final dot).
        """
        self._fail(reply)

    def finish(self, envelope: Envelope) -> Deferred[str] | Reply:
        """
        The final dot arrived: commit to the spool, or return the reply that
        refuses the message.
        """
        if self.error is not None:
            return self.error
        return self.writer.commit(envelope)

    def abort(self) -> None:
        """
        The session ended before the final dot.
        """
        self._fail(replies.SPOOL_FAILED)
