"""
Every SMTP reply the server gives, with its RFC 3463 enhanced status code.

Kept in one place because these codes are part of the user-facing contract
(CONTRACT.md): clients and admins' log searches depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """
    An SMTP reply: basic code, enhanced status code (RFC 2034; C{None} for
    the replies RFC 2034 leaves out: the greeting, EHLO/HELO, 334 and 354)
    and text.
    """

    code: int
    enhanced: str | None
    text: str

    def lines(self) -> list[bytes]:
        """
        The reply as lines without CRLF; multi-line for text with newlines.
        """
        texts = self.text.split("\n")
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            prefix = f"{self.code}{sep}"
            if self.enhanced is not None:
                prefix += self.enhanced + " "
            out.append((prefix + text).encode("utf-8"))
        return out

    def withText(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(
    214,
    "2.0.0",
    "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH",
)
VRFY = Reply(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
EXPN = Reply(502, "5.5.1", "EXPN not available")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")

UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
HELO_FIRST = Reply(503, "5.5.1", "Send EHLO or HELO first")
EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first (this is an ESMTP extension)")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Parameter not recognized")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
DATA_LINE_TOO_LONG = Reply(554, "5.6.0", "Message line too long; message refused")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many Received headers: mail loop?")
BARE_LINE_ENDING = Reply(
    550, "5.6.11", "Bare CR or LF in message; use CRLF line endings (RFC 5321)"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors; closing connection")

TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_TOO_OLD = Reply(421, "4.7.0", "TLS version too old; use TLS 1.2 or later")

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(
    503, "5.5.1", "AUTH not permitted during a mail transaction"
)
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not allowed for this login")
HEADER_FROM_NOT_ALLOWED = Reply(550, "5.7.1", "From: header not allowed for this login")
AUTH_NEEDS_TLS = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "AUTH not available")
AUTH_LOCKED = Reply(454, "4.7.0", "Too many failed logins; try again later")
TOO_MANY_AUTH_FAILURES = Reply(
    421, "4.7.0", "Too many failed logins; closing connection"
)

QUEUED = Reply(250, "2.0.0", "Ok: queued as {queueId}")
SPOOL_FAILED = Reply(
    451, "4.3.0", "Requested action aborted: local error in processing"
)
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections; try again later")
TOO_MANY_CONNECTIONS_RATE = Reply(
    421, "4.7.0", "Too many connections per minute from your address; try again later"
)
TOO_MANY_MESSAGES_IN_SESSION = Reply(
    421, "4.7.0", "Too many messages in one session; please reconnect"
)
MESSAGE_RATE = Reply(451, "4.7.1", "Hourly message limit reached; try again later")
RECIPIENT_RATE = Reply(451, "4.7.1", "Hourly recipient limit reached; try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout; closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit reached; closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")
