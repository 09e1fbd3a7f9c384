"""
The envelope of a spooled message and its JSON form.

Envelopes are stored as JSON beside the message bytes, never pickled, so an
admin can read them and a later version can still load them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

ENVELOPE_VERSION = 1

NULL_AUTH = "<>"
"""
The C{AUTH=} value recorded when the submitter's identity is not vouched for
(RFC 4954 section 5).
"""


@dataclass(frozen=True)
class Attempt:
    """
    One delivery attempt.

    @ivar time: POSIX time the attempt ended.
    @ivar host: the host talked to, or the Maildir path.
    @ivar reply: the reply or error text that decided the outcome.
    """

    time: float
    host: str
    reply: str


#: Where L{Envelope.toJSON} keeps its result, in the instance's C{__dict__}.
_JSON = "_json"


@dataclass(frozen=True)
class Envelope:
    """
    Everything the relay knows about an accepted message besides its bytes.

    @ivar queueId: the spool id, also in the C{Received} header and the 250.
    @ivar sender: the reverse-path without angle brackets; C{""} is the null
        sender.
    @ivar recipients: the forward-paths still to deliver, in RCPT order.
    @ivar auth: the C{AUTH=} value to pass on: an identity, or C{"<>"}.
    @ivar authUser: the SMTP AUTH user of the session, or C{None} when the
        client relayed as a trusted network.
    @ivar clientAddress: the client's IP address.
    @ivar helo: the (sanitised) HELO/EHLO name.
    @ivar receivedAt: POSIX time the message was accepted.
    @ivar size: octets of the message as stored.
    @ivar body: C{"7BIT"} or C{"8BITMIME"}.
    @ivar attempts: delivery attempts so far.
    @ivar nextAttempt: POSIX time of the next attempt (0: as soon as
        possible); kept across restarts.
    @ivar delayWarned: whether the sender was already told of a delay.
    """

    queueId: str
    sender: str
    recipients: tuple[str, ...]
    auth: str = NULL_AUTH
    authUser: str | None = None
    clientAddress: str = ""
    helo: str = ""
    receivedAt: float = 0.0
    size: int = 0
    body: str = "7BIT"
    attempts: tuple[Attempt, ...] = field(default=())
    nextAttempt: float = 0.0
    delayWarned: bool = False

    def toJSON(self) -> bytes:
        """
        Serialise for the spool.

        An envelope does not change, so this is computed once: a worker
        process writes it into the spool (in a thread) and then sends the
        same bytes to the main process.
        """
        raw: bytes | None = self.__dict__.get(_JSON)
        if raw is None:
            # Not an attribute assignment: the dataclass is frozen.
            raw = self.__dict__[_JSON] = self._encode()
        return raw

    def _encode(self) -> bytes:
        # Field by field rather than asdict() (a deep copy), and without
        # indent= (which makes json fall back to its pure-Python encoder):
        # this runs for every message accepted and every attempt.
        data: dict[str, Any] = dict(self.__dict__)
        data.pop(_JSON, None)
        data["recipients"] = list(self.recipients)
        data["attempts"] = [dict(a.__dict__) for a in self.attempts]
        data["version"] = ENVELOPE_VERSION
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def fromJSON(cls, raw: bytes) -> Envelope:
        """
        Load an envelope written by L{toJSON}.

        @raise ValueError: if C{raw} is not a valid envelope.
        """
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("envelope is not a JSON object")
            data.pop("version", None)
            _check(data, _ENVELOPE_TYPES)
            data["recipients"] = tuple(data["recipients"])
            attempts = []
            for a in data.get("attempts", ()):
                if not isinstance(a, dict):
                    raise ValueError("attempt is not a JSON object")
                _check(a, _ATTEMPT_TYPES)
                attempts.append(Attempt(**a))
            data["attempts"] = tuple(attempts)
            return cls(**data)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"bad envelope: {e}") from e

    def withAttempt(self, attempt: Attempt, remaining: tuple[str, ...]) -> Envelope:
        """
        A copy recording C{attempt}, with only C{remaining} recipients left.
        """
        return replace(
            self, attempts=self.attempts + (attempt,), recipients=tuple(remaining)
        )


_STR = (str,)
_NUMBER = (int, float)
_ENVELOPE_TYPES: dict[str, tuple[type, ...]] = {
    "queueId": _STR,
    "sender": _STR,
    "recipients": (list,),
    "auth": _STR,
    "authUser": (str, type(None)),
    "clientAddress": _STR,
    "helo": _STR,
    "receivedAt": _NUMBER,
    "size": (int,),
    "body": _STR,
    "attempts": (list,),
    "nextAttempt": _NUMBER,
    "delayWarned": (bool,),
}
_ATTEMPT_TYPES: dict[str, tuple[type, ...]] = {
    "time": _NUMBER,
    "host": _STR,
    "reply": _STR,
}


def _check(data: dict[str, Any], types: dict[str, tuple[type, ...]]) -> None:
    """
    Refuse unknown fields and fields of the wrong JSON type (a hand-edited
    or corrupt envelope must not be delivered to one-letter addresses).

    @raise ValueError: naming the field at fault.
    """
    for name, value in data.items():
        if name not in types:
            raise ValueError(f"unknown envelope field {name!r}")
        if (isinstance(value, bool) and bool not in types[name]) or not isinstance(
            value, types[name]
        ):
            raise ValueError(f"envelope field {name!r} has the wrong type")
    recipients = data.get("recipients")
    if recipients is not None and not all(isinstance(r, str) for r in recipients):
        raise ValueError("envelope field 'recipients' must hold strings")


@dataclass(frozen=True)
class DeliveryReport:
    """
    The outcome of one delivery attempt, per recipient.

    @ivar delivered: recipients the next hop accepted.
    @ivar deferred: recipient to reply text, for temporary failures (retry).
    @ivar failed: recipient to reply text, for permanent failures (bounce).
    @ivar host: who the attempt talked to.
    """

    delivered: tuple[str, ...] = ()
    deferred: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    host: str = ""
