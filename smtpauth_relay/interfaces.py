"""
The seams of the relay: the spool, the outbound delivery agents, the
authenticated identity and what credential checkers can do for the SASL
mechanisms beyond PLAIN and LOGIN.

Each real implementation has a fake in L{smtpauth_relay.testing}; tests check
both with C{verifyObject}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smtpauth_relay.envelope import DeliveryReport, Envelope
    from smtpauth_relay.lockout import Lock
    from smtpauth_relay.passwords import ScramSecrets
    from smtpauth_relay.replies import Reply


class ISubmitter(Interface):
    """
    The avatar of an authenticated SMTP session: who logged in, how, and over
    what.  The realm hands it to the server protocol, which uses it for the
    relay decision, the envelope and the C{Received} header.
    """

    username = Attribute("The authenticated identity (C{str}).")
    mechanism = Attribute("The SASL mechanism used (C{str}, e.g. C{'PLAIN'}).")
    tls = Attribute("C{True} if the session was encrypted when it logged in.")


class IScramStore(Interface):
    """
    A credential checker that keeps SCRAM-SHA-256 secrets (RFC 5802): the
    salt and iteration count the SCRAM mechanism must send the client in
    the middle of the exchange, before any credentials can be checked.
    """

    def scramSecrets(username: str) -> Deferred[ScramSecrets]:
        """
        The SCRAM-SHA-256 secrets of a user.

        @param username: The user name (SASLprep'ed, as the client sent it).

        @return: A L{Deferred} firing with the user's
            L{smtpauth_relay.passwords.ScramSecrets}, or, for a user this
            checker has no SCRAM secrets for, made-up ones (C{known=False},
            see L{smtpauth_relay.passwords.fakeScramSecrets}) that look like
            this checker's real ones; failing with
            L{smtpauth_relay.errors.CheckerUnavailable} if the backend cannot
            answer.
        """


class IScramCredentials(ICredentials):
    """
    The outcome of a SCRAM-SHA-256 exchange, for the checker to decide on
    with its stored key: the client's proof, checked without the password.
    """

    username = Attribute("The user name (UTF-8 C{bytes}, SASLprep'ed).")

    def checkProof(storedKey: bytes) -> bool:
        """
        Whether the client's proof matches C{storedKey} (in constant time).
        """


class ICramMD5Credentials(ICredentials):
    """
    A CRAM-MD5 (RFC 2195) response, for a checker that keeps the HMAC-MD5
    state of the password (Dovecot's C{{CRAM-MD5}}) rather than the
    password itself.
    """

    username = Attribute("The user name (C{bytes}).")

    def checkCramState(state: bytes) -> bool:
        """
        Whether the response matches the password whose
        L{smtpauth_relay.passwords.cramMD5State} is C{state} (in constant
        time).
        """


class ISASLMechanisms(Interface):
    """
    A credential checker that can tell which SASL mechanisms every one of
    its users can log in with right now (say, only SCRAM-SHA-256 when every
    entry of a password file has SCRAM secrets).  The server offers a
    mechanism other than PLAIN and LOGIN only when every checker of the
    chain can serve it this way.
    """

    def saslMechanisms() -> frozenset[str]:
        """
        The mechanisms (upper-case names) every user of this checker can log
        in with now.  Blocking work is not allowed: it is asked at each
        EHLO.
        """


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

    def recent(queueId: str) -> Envelope | None:
        """
        The envelope of a message this process has just committed, from
        memory and only once (for its first delivery attempt, without
        reading it back); L{None} if it is not at hand (then L{load} it).
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


class ILoginGuard(Interface):
    """
    The brute-force lockout as a session sees it: L{smtpauth_relay.lockout.
    Lockout} in the main process, L{smtpauth_relay.ipc.RemoteLockout} in a
    worker (whose answers are L{Deferred}s).
    """

    settings: Any = Attribute("The C{[auth.lockout]} settings.")

    def check(host: str, user: str | None) -> Lock | None | Deferred[Lock | None]:
        """
        The lock refusing this login attempt, if any.
        """

    def failed(host: str, user: str | None) -> float | Deferred[float]:
        """
        Count a failed login; the seconds to wait before answering.
        """

    def succeeded(host: str, user: str) -> None:
        """
        A login succeeded.
        """


class ISessionLimits(Interface):
    """
    The rate limits as a session sees them: L{smtpauth_relay.limits.
    RateLimits} in the main process, L{smtpauth_relay.ipc.RemoteRateLimits}
    in a worker.
    """

    settings: Any = Attribute("The C{[limits]} settings.")

    def connectionAllowed(host: str) -> bool:
        """
        Count a new connection from C{host}; whether it is within the rate.
        (A worker's connections are counted by L{IAdmission} instead.)
        """

    def messageAllowed(user: str) -> bool | Deferred[bool]:
        """
        Whether C{user} may start another message.
        """

    def recipientAllowed(user: str, pending: int) -> bool | Deferred[bool]:
        """
        Whether C{user} may add a recipient to the C{pending} ones.
        """

    def messageQueued(user: str, recipients: int) -> None:
        """
        Count a message of C{user}'s, with its recipients.
        """


class IAdmission(Interface):
    """
    A worker's connection counting, done by the main process for every
    process (L{smtpauth_relay.ipc.RemoteAdmission}).
    """

    def connect(host: str) -> Deferred[Reply | None]:
        """
        Count a client; the 421 to give it, if any.  It counts until
        L{disconnect}, refused or not.
        """

    def disconnect(host: str) -> None:
        """
        A client counted by L{connect} is gone.
        """


class IFlowControl(Interface):
    """
    In-flow control as a session sees it (L{smtpauth_relay.flow.InFlow},
    L{smtpauth_relay.ipc.RemoteFlow}).
    """

    delay: float = Attribute("The longest a session waits, in seconds.")

    def admit() -> Deferred[None] | None:
        """
        C{None} or a fired L{Deferred} if a new message may be taken now;
        else a L{Deferred} firing when it may.
        """


class ISessionMetrics(Interface):
    """
    What SMTP sessions count (L{smtpauth_relay.metrics.RelayMetrics}; in a
    worker process, L{smtpauth_relay.ipc.MetricsForwarder}, which passes
    the counts on to the main process's).
    """

    def connectionOpened(listener: str, tls: str) -> None:
        """
        A connection was made.
        """

    def connectionClosed(listener: str) -> None:
        """
        A connection given to L{connectionOpened} was lost.
        """

    def connectionRefused(reason: str) -> None:
        """
        A connection was refused with a 421.
        """

    def authAttempt(mechanism: str, result: str) -> None:
        """
        An AUTH exchange ended with a verdict.
        """

    def messageAccepted(size: int) -> None:
        """
        A message was spooled and answered 250.
        """

    def messageRejected(reason: str) -> None:
        """
        A message, or its transaction, was refused.
        """
