"""
The seams of the relay: the spool, the outbound delivery agents and the
authenticated identity.

Each real implementation has a fake in L{smtpauth_relay.testing}; tests check
both with C{verifyObject}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smtpauth_relay.envelope import DeliveryReport, Envelope


class ISubmitter(Interface):
    """
    The avatar of an authenticated SMTP session: who logged in, how, and over
    what.  The realm hands it to the server protocol, which uses it for the
    relay decision, the envelope and the C{Received} header.
    """

    username = Attribute("The authenticated identity (C{str}).")
    mechanism = Attribute("The SASL mechanism used (C{str}, e.g. C{'PLAIN'}).")
    tls = Attribute("C{True} if the session was encrypted when it logged in.")


class ISpoolWriter(Interface):
    """
    One message being written into the spool.  Nothing is visible to the queue
    until L{commit} has fired.
    """

    queueId = Attribute("The queue id allocated to this message (C{str}).")

    def write(data: bytes) -> None:
        """
        Append message bytes (LF line endings, un-stuffed).  Errors are
        remembered and reported by L{commit}.
        """

    def commit(envelope: Envelope) -> Deferred[str]:
        """
        Make the message and its envelope durable (fsync of files and
        directory) and visible to the queue.

        @return: a L{Deferred} firing with the queue id, or failing with
            L{smtpauth_relay.errors.SpoolError}.
        """

    def abort() -> Deferred[None]:
        """
        Throw the message away; nothing of it stays in the spool.
        """


class ISpool(Interface):
    """
    The relay's durable message store.
    """

    def newMessage() -> ISpoolWriter:
        """
        Start writing a new message.
        """

    def queued() -> list[str]:
        """
        The ids of every committed message still in the spool, oldest first.
        """

    def load(queueId: str) -> Envelope:
        """
        Read the envelope of a committed message.

        @raise KeyError: if there is no such message.
        """

    def messagePath(queueId: str) -> str:
        """
        The path of the message bytes of a committed message.
        """

    def saveEnvelope(envelope: Envelope) -> Deferred[None]:
        """
        Durably replace the envelope of a committed message (its attempts,
        its remaining recipients).

        @raise KeyError: (in the Deferred) if the message is gone: an
            envelope is never written back for a removed message.
        """

    def remove(queueId: str) -> Deferred[None]:
        """
        Remove a delivered message from the spool (durably); nothing happens
        if it is already gone.
        """

    def quarantine(queueId: str) -> Deferred[None]:
        """
        Move a message whose envelope cannot be read out of the queue (to
        C{corrupt/}), for the admin to look at.
        """

    def addListener(listener: Callable[[str], object]) -> None:
        """
        Call C{listener(queueId)} each time a message is committed.
        """


class IDeliveryAgent(Interface):
    """
    Sends one spooled message onwards (to a Maildir, a smarthost, MX hosts).
    """

    def deliver(envelope: Envelope, messagePath: str) -> Deferred[DeliveryReport]:
        """
        Deliver the message to every recipient in C{envelope}.

        @return: a L{Deferred} firing with a
            L{smtpauth_relay.envelope.DeliveryReport} once the message is
            durably in the hands of the next hop; failing means no
            recipient was delivered and the attempt should be retried.
        """


class IQueueControl(Interface):
    """
    What an admin can ask of the running queue (C{smtpauth-relay queue}).
    """

    def flush() -> int:
        """
        Attempt every queued message now (not waiting for its retry time).

        @return: how many messages were scheduled.
        """

    def delete(queueId: str) -> Deferred[None]:
        """
        Remove a message from the queue without delivering or bouncing it.

        @raise KeyError: (in the Deferred) if there is no such message.
        @raise QueueBusy: (in the Deferred) if it is being delivered right
            now; try again.
        """

    def bounce(queueId: str) -> Deferred[None]:
        """
        Give up on a message: its sender gets a bounce (unless the sender is
        null) for every recipient not yet delivered, and it leaves the
        queue.

        @raise KeyError: (in the Deferred) if there is no such message.
        @raise QueueBusy: (in the Deferred) if it is being delivered right
            now; try again.
        """
