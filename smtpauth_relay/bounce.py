"""
Delivery status notifications: the bounces (RFC 3464) the queue runner sends
back to a message's envelope sender when delivery failed, or is late.

Pure: the only I/O is reading the original message's header section from
the spool file.  The result follows the spool's conventions (LF line ends,
no CR, no line over 998 octets, un-stuffed), is 7-bit ASCII throughout, and
is meant to be queued with C{MAIL FROM:<>} (RFC 5321 section 4.5.5) to the
original sender.

Every text that came from elsewhere (upstream replies, host names,
addresses, the original headers) is made safe before it is written: control
characters, CR and LF become spaces, so a hostile reply cannot add header
fields or MIME parts; other bytes are escaped; overlong field lines are
folded.
"""

from __future__ import annotations

import binascii
import re
import secrets
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate

from smtpauth_relay.envelope import Envelope

FAILED = "failed"
DELAYED = "delayed"
ACTIONS = (FAILED, DELAYED)
"""
The RFC 3464 C{Action} values a bounce reports.
"""

EXPIRED_STATUS = "4.4.7"
"""
RFC 3463 "delivery time expired", for expired messages without a better code.
"""

LOCAL_DIAGNOSTIC_TYPE = "X-smtpauth-relay"
"""
The RFC 3464 diagnostic-type for reasons that are not an SMTP reply
("connection refused"), as Postfix writes C{X-Postfix}.
"""

MAX_REPLY_CHARACTERS = 4000
"""
Reply texts longer than this are cut (with C{[...]}) in the bounce.
"""

_BASIC_CODE = re.compile(r"([2-5])[0-9]{2}(?:-|(?=\s)|$)")
_ENHANCED_CODE = re.compile(r"[ \t]*([245])\.[0-9]{1,3}\.[0-9]{1,3}(?=\s|$)")
_UNSAFE = re.compile(r"[\x00-\x20\x7f]+")
_CR_BEFORE_LF = re.compile(rb"\r*\n")
_PLAIN_HEADERS = re.compile(rb"(?:[\t\x20-\x7e]{0,998}\n)*")
_MESSAGE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

_FOLD_AT = 78
_LONGEST_WORD = 900
_TEXT_WIDTH = 72


@dataclass(frozen=True)
class RecipientFailure:
    """
    Why one recipient was not (yet) delivered.

    @ivar recipient: the envelope recipient.
    @ivar reply: the upstream reply as received (C{"550 5.1.1 <bob@x>:
        Recipient address rejected"}), possibly several lines, or a local
        reason (C{"connection refused"}).
    @ivar remoteHost: the upstream host that gave C{reply}; C{None} for a
        local reason.
    @ivar action: L{FAILED} or L{DELAYED} (the RFC 3464 C{Action}).
    """

    recipient: str
    reply: str
    remoteHost: str | None
    action: str = FAILED

    def __post_init__(self) -> None:
        """
        @raise ValueError: for an C{action} not in L{ACTIONS}.
        """
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")


def statusCode(reply: str, permanent: bool) -> str:
    """
    The RFC 3463 status code for a reply.

    The class comes from the reply's basic code (RFC 5321), or from
    C{permanent} when the reply has no 4xx or 5xx code.  The enhanced code
    (RFC 2034) in the reply is used when it has that class; a mismatched one
    (C{"550 4.1.1"}) is not believed, and the class alone is given
    (C{"5.0.0"}).

    @param reply: the reply text; only its first line is looked at.
    @param permanent: whether a reply without a 4xx or 5xx code is a
        permanent failure.
    @return: a code such as C{"5.1.1"}.
    """
    text = reply.lstrip()
    basic = _BASIC_CODE.match(text)
    if basic is not None and basic.group(1) in "45":
        statusClass = basic.group(1)
        rest = basic.end()
    else:
        statusClass = "5" if permanent else "4"
        rest = basic.end() if basic is not None else 0
    enhanced = _ENHANCED_CODE.match(text, rest)
    if enhanced is not None and enhanced.group(1) == statusClass:
        return enhanced.group(0).strip()
    return f"{statusClass}.0.0"


def shouldBounce(envelope: Envelope) -> bool:
    """
    Whether a failure of C{envelope} may be reported to its sender.

    Never for the null sender: that message was itself a notification, and
    answering it could loop (RFC 5321 section 6.1, RFC 3464 section 2).
    """
    return envelope.sender != ""


def _randomToken() -> str:
    """
    24 random hex digits, for a C{Message-ID} or a MIME boundary.
    """
    return secrets.token_hex(12)


def makeBounce(
    envelope: Envelope,
    failures: Sequence[RecipientFailure],
    messagePath: str,
    reportingHost: str,
    now: float,
    *,
    expired: bool = False,
    maxOriginalHeaderBytes: int = 64 * 1024,
    randomToken: Callable[[], str] = _randomToken,
) -> bytes:
    """
    A complete C{multipart/report} delivery status notification (RFC 3464,
    RFC 6522) to C{envelope}'s sender: an explanation for people, the
    machine-readable report, and the original message's header section.

    The subject is "Delayed Mail (still being retried)" when every failure is
    L{DELAYED} and the message has not expired, else "Undelivered Mail
    Returned to Sender".

    @param envelope: the original message's envelope; its C{receivedAt} is
        the arrival date and its last attempt the last attempt date.
    @param failures: the recipients to report, in order.
    @param messagePath: the spool file holding the original message (LF line
        ends).
    @param reportingHost: the relay's host name, for C{From}, C{Message-ID}
        and C{Reporting-MTA}.
    @param now: POSIX time for the C{Date} header.
    @param expired: the message outlived the queue lifetime: every failure is
        reported as L{FAILED}, with status 4.4.7 unless the reply gives a
        more specific code.
    @param maxOriginalHeaderBytes: include at most this many octets of the
        original header section, cut at a line end.
    @param randomToken: returns a fresh random token (letters and digits) for
        the C{Message-ID} and the MIME boundary; replaceable for tests.
    @return: the message, LF-terminated lines, 7-bit ASCII.
    @raise ValueError: for no failures, the null sender (see
        L{shouldBounce}), an empty or whitespace-holding C{reportingHost},
        or a negative C{maxOriginalHeaderBytes}.
    @raise OSError: if C{messagePath} cannot be read.
    """
    if not failures:
        raise ValueError("no failures to report")
    if not shouldBounce(envelope):
        raise ValueError("never bounce a message from the null sender")
    if not re.fullmatch(r"[\x21-\x7e]+", reportingHost):
        raise ValueError(f"bad reporting host {reportingHost!r}")
    if maxOriginalHeaderBytes < 0:
        raise ValueError("maxOriginalHeaderBytes must not be negative")

    originalHeaders = _readHeaderSection(messagePath, maxOriginalHeaderBytes)
    headersEncoding: str | None = None
    if not _PLAIN_HEADERS.fullmatch(originalHeaders):
        headersEncoding = "quoted-printable"
        originalHeaders = _quotedPrintable(originalHeaders)

    reports = [_Report.fromFailure(f, expired) for f in failures]
    delayedOnly = all(r.action == DELAYED for r in reports)
    lastAttempt = envelope.attempts[-1].time if envelope.attempts else now

    text = _explanation(envelope, reports, reportingHost, now, expired)
    status = _deliveryStatus(envelope, reports, reportingHost, lastAttempt)

    parts: list[tuple[list[str], bytes]] = [
        (
            [
                "Content-Description: Notification",
                "Content-Type: text/plain; charset=us-ascii",
            ],
            text.encode("ascii"),
        ),
        (
            [
                "Content-Description: Delivery report",
                "Content-Type: message/delivery-status",
            ],
            status.encode("ascii"),
        ),
        (
            [
                "Content-Description: Undelivered Message Headers",
                "Content-Type: text/rfc822-headers",
            ]
            + (
                []
                if headersEncoding is None
                else [f"Content-Transfer-Encoding: {headersEncoding}"]
            ),
            originalHeaders,
        ),
    ]

    messageId = f"<{_messageIdPart(envelope.queueId)}.{randomToken()}@{reportingHost}>"
    boundary = f"=_{randomToken()}"
    while any(boundary.encode("ascii") in content for _, content in parts):
        boundary = f"=_{randomToken()}"

    subject = (
        "Delayed Mail (still being retried)"
        if delayedOnly
        else "Undelivered Mail Returned to Sender"
    )
    head = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{reportingHost}>"),
        _field("To", f"<{_clean(envelope.sender)}>"),
        _field("Subject", subject),
        _field("Date", formatdate(now, localtime=True)),
        _field("Message-ID", messageId),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        _field(
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ),
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = ["\n".join(head).encode("ascii") + b"\n"]
    for partHeaders, content in parts:
        out.append(f"--{boundary}\n".encode("ascii"))
        out.append("\n".join(partHeaders).encode("ascii") + b"\n\n")
        out.append(content)
        out.append(b"\n")
    out.append(f"--{boundary}--\n".encode("ascii"))
    return b"".join(out)


@dataclass(frozen=True)
class _Report:
    """
    One recipient's line in the report, made safe to write.
    """

    recipient: str
    reply: str
    remoteHost: str | None
    action: str
    status: str
    isSMTPReply: bool

    @classmethod
    def fromFailure(cls, failure: RecipientFailure, expired: bool) -> _Report:
        raw = failure.reply
        reply = _clean(raw)
        if len(reply) > MAX_REPLY_CHARACTERS:
            reply = reply[:MAX_REPLY_CHARACTERS] + " [...]"
        if expired:
            action = FAILED
            status = statusCode(raw, permanent=False)
            if status == "4.0.0":
                status = EXPIRED_STATUS
        else:
            action = failure.action
            status = statusCode(raw, permanent=action == FAILED)
        remoteHost = None
        if failure.remoteHost is not None:
            remoteHost = _clean(failure.remoteHost) or None
        return cls(
            recipient=_clean(failure.recipient),
            reply=reply,
            remoteHost=remoteHost,
            action=action,
            status=status,
            isSMTPReply=_BASIC_CODE.match(raw.lstrip()) is not None,
        )


def _deliveryStatus(
    envelope: Envelope,
    reports: Sequence[_Report],
    reportingHost: str,
    lastAttempt: float,
) -> str:
    """
    The C{message/delivery-status} body: the per-message fields, then one
    block of fields for each recipient, blocks separated by empty lines.
    """
    blocks = [
        [
            _field("Reporting-MTA", f"dns; {reportingHost}"),
        ]
    ]
    queueId = _clean(envelope.queueId)
    if queueId:
        blocks[0].append(_field("X-Queue-ID", queueId))
    blocks[0].append(
        _field("Arrival-Date", formatdate(envelope.receivedAt, localtime=True))
    )
    for report in reports:
        block = [
            _field("Final-Recipient", f"rfc822; {report.recipient}"),
            _field("Action", report.action),
            _field("Status", report.status),
        ]
        if report.remoteHost is not None:
            block.append(_field("Remote-MTA", f"dns; {report.remoteHost}"))
        if report.isSMTPReply:
            block.append(_field("Diagnostic-Code", f"smtp; {report.reply}"))
        elif report.reply:
            block.append(
                _field("Diagnostic-Code", f"{LOCAL_DIAGNOSTIC_TYPE}; {report.reply}")
            )
        block.append(
            _field("Last-Attempt-Date", formatdate(lastAttempt, localtime=True))
        )
        blocks.append(block)
    return "\n\n".join("\n".join(block) for block in blocks)


def _explanation(
    envelope: Envelope,
    reports: Sequence[_Report],
    reportingHost: str,
    now: float,
    expired: bool,
) -> str:
    """
    The C{text/plain} part, for the person who sent the message.
    """
    failed = [r for r in reports if r.action == FAILED]
    delayed = [r for r in reports if r.action == DELAYED]
    paragraphs = [f"This is the mail system at {reportingHost}."]
    if expired:
        paragraphs.append(
            "Your message could not be delivered to one or more recipients."
            " The mail system kept trying for"
            f" {_duration(now - envelope.receivedAt)}, but the message has"
            " now expired and will not be delivered."
        )
    elif failed:
        paragraphs.append(
            "Your message could not be delivered to one or more recipients."
        )
    else:
        paragraphs.append(
            "Your message has not yet been delivered to one or more"
            " recipients. This is only a warning: the mail system is still"
            " trying, and you do not need to send the message again."
        )
    paragraphs.append(
        f"You sent it on {formatdate(envelope.receivedAt, localtime=True)}."
        " Its headers are attached so you can recognise it."
    )
    out = [_wrap(p) for p in paragraphs]
    if failed:
        out.append("NOT DELIVERED to:")
        out.extend(_describe(r) for r in failed)
        out.append(
            _wrap(
                "Check these addresses for typing mistakes. If an address is"
                " right, the reply shown under it says why delivery failed;"
                " you may need to reach that person another way."
            )
        )
    if delayed:
        out.append("STILL TRYING to deliver to:")
        out.extend(_describe(r) for r in delayed)
        out.append(
            _wrap(
                "The mail system will keep trying for these recipients. You"
                " will get another message if it finally gives up."
            )
        )
    out.append(
        _wrap("If you need help, forward this whole message to your IT support.")
    )
    return "\n\n".join(out) + "\n"


def _describe(report: _Report) -> str:
    """
    One recipient and its reply, indented.
    """
    reply = report.reply or "(no reason given)"
    lines = _wrap(report.recipient, "    ").splitlines()
    if report.remoteHost is not None:
        said = f"The receiving mail server {report.remoteHost} replied:"
        lines.extend(_wrap(said, "      ").splitlines())
        lines.extend(_wrap(reply, "      ").splitlines())
    else:
        lines.extend(_wrap(f"Reason: {reply}", "      ").splitlines())
    return "\n".join(lines)


def _wrap(text: str, indent: str = "") -> str:
    """
    Fill C{text} to the text part's width, breaking overlong words.
    """
    return textwrap.fill(
        text,
        _TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    )


def _duration(seconds: float) -> str:
    """
    A rough, human duration: C{"5 days"}, C{"1 day"}, C{"3 hours"}.
    """
    seconds = max(0, int(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size or unit == "minute":
            count = seconds // size
            return f"{count} {unit}" + ("" if count == 1 else "s")
    raise AssertionError("unreachable")


def _clean(text: str) -> str:
    """
    Make C{text} safe for one field or text line: non-ASCII escaped
    (C{\\xe9}), every run of whitespace and control characters (CR and LF
    included, so multi-line replies join into one) a single space.
    """
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return _UNSAFE.sub(" ", text).strip()


def _field(name: str, value: str) -> str:
    """
    A header or delivery-status field, folded at spaces after about 78
    columns (RFC 5322 section 2.2.3).  A word too long for a line is split
    (unfolding then shows a space in it), so no line exceeds 998 octets.

    @param value: text already made safe by L{_clean} (or fixed text).
    """
    pieces: list[str] = []
    for word in value.split(" "):
        while len(word) > _LONGEST_WORD:
            pieces.append(word[:_LONGEST_WORD])
            word = word[_LONGEST_WORD:]
        pieces.append(word)
    lines = [f"{name}: {pieces[0]}"]
    for piece in pieces[1:]:
        if len(lines[-1]) + 1 + len(piece) > _FOLD_AT:
            lines.append(f" {piece}")
        else:
            lines[-1] += f" {piece}"
    return "\n".join(lines)


def _messageIdPart(queueId: str) -> str:
    """
    The queue id reduced to characters safe in a C{Message-ID}.
    """
    return _MESSAGE_ID_UNSAFE.sub("", queueId) or "bounce"


def _readHeaderSection(path: str, maxBytes: int) -> bytes:
    """
    The header section of the message in C{path}: every line before the
    first empty one, LF-terminated, or as many whole lines as fit in
    C{maxBytes}.

    @raise OSError: if the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read(maxBytes + 1)
    atEnd = len(data) <= maxBytes
    # A CR before a line end (a CRLF file) is dropped; the count shrinks,
    # so the cut below stays within maxBytes.
    data = _CR_BEFORE_LF.sub(b"\n", data)
    if data.startswith(b"\n"):
        return b""
    end = data.find(b"\n\n")
    if end != -1:
        return data[: end + 1]
    if atEnd:
        # The whole file is headers (a message without a body).
        return data if data.endswith(b"\n") or not data else data + b"\n"
    cut = data[:maxBytes]
    return cut[: cut.rfind(b"\n") + 1]


def _quotedPrintable(data: bytes) -> bytes:
    """
    Quoted-printable (RFC 2045), which RFC 6522 allows for broken headers:
    LF line ends kept, bare CR encoded too.
    """
    encoded = binascii.b2a_qp(data, istext=True)
    return encoded.replace(b"\r", b"=0D")
