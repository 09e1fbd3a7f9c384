"""
Maildir delivery: each spooled message becomes one file in a Maildir's
C{new/}, readable by any mail client or C{mutt -f}.

The file is written in C{tmp/}, fsynced, renamed into C{new/} and the
directory fsynced before the delivery counts as done; only then does the
queue runner remove the message from the spool.
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpauth_relay.durable import fsyncDirectory
from smtpauth_relay.envelope import DeliveryReport, Envelope
from smtpauth_relay.interfaces import IDeliveryAgent
from smtpauth_relay.threads import RunInThread

_counter = itertools.count()


def ensureMaildir(directory: str) -> None:
    """
    Create C{directory} with its C{tmp}, C{new} and C{cur} folders.
    """
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(directory, sub), mode=0o750, exist_ok=True)


def uniqueName(now: float) -> str:
    """
    A Maildir file name: C{seconds.M<micro>P<pid>Q<n>.<host>}.
    """
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micro}P{os.getpid()}Q{next(_counter)}.{host}"


def envelopeHeaders(envelope: Envelope) -> bytes:
    """
    The lines a Maildir copy gets on top: the envelope sender and the
    envelope recipients, which are otherwise not in the message.
    """
    lines = [f"Return-Path: <{envelope.sender}>"]
    lines += [f"X-Envelope-To: <{r}>" for r in envelope.recipients]
    return ("\n".join(lines) + "\n").encode("utf-8")


@implementer(IDeliveryAgent)
class MaildirDelivery:
    """
    Delivers every recipient of a message at once, into one Maildir.
    """

    def __init__(self, directory: str, runInThread: RunInThread, clock: Any) -> None:
        self.directory = directory
        self._runInThread = runInThread
        self._clock = clock

    def deliver(self, envelope: Envelope, messagePath: str) -> Deferred[DeliveryReport]:
        return self._runInThread(
            self._deliverInThread, envelope, messagePath, self._clock.seconds()
        )

    def _deliverInThread(
        self, envelope: Envelope, messagePath: str, now: float
    ) -> DeliveryReport:
        ensureMaildir(self.directory)
        name = uniqueName(now)
        tmp = os.path.join(self.directory, "tmp", name)
        try:
            with open(messagePath, "rb") as source, open(tmp, "xb") as target:
                target.write(envelopeHeaders(envelope))
                while chunk := source.read(1 << 20):
                    target.write(chunk)
                target.flush()
                os.fsync(target.fileno())
            new = os.path.join(self.directory, "new")
            os.rename(tmp, os.path.join(new, name))
            fsyncDirectory(new)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return DeliveryReport(
            delivered=tuple(envelope.recipients), host=f"maildir:{self.directory}"
        )
