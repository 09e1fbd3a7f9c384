"""
Exceptions shared across the relay's seams.

Credential checkers raise these so the L{smtpauth_relay.auth.ChainChecker} and the
server protocol can tell apart the three outcomes RFC 4954 distinguishes: the
checker does not know the user (ask the next checker), the password is wrong
(535 5.7.8, stop), and the backend could not answer (454 4.7.0, not a failure).
"""

from twisted.cred.error import UnauthorizedLogin


class UnknownUser(UnauthorizedLogin):
    """
    The checker has no such user; the next checker in the chain may know it.

    Checkers raise this only after spending the same time a wrong password
    costs, so that the answer does not reveal which users exist.
    """


class CheckerUnavailable(Exception):
    """
    The credential backend could not give an answer (down, timed out,
    unreadable); the client gets 454 4.7.0 and it does not count as a failed
    login.
    """


class SpoolError(Exception):
    """
    A message could not be made durable in the spool.

    @ivar insufficientStorage: C{True} when the cause was lack of space
        (answered 452 4.3.1), else C{False} (answered 451 4.3.0).
    """

    def __init__(self, message: str, insufficientStorage: bool = False) -> None:
        super().__init__(message)
        self.insufficientStorage = insufficientStorage


class QueueBusy(Exception):
    """
    The message is being delivered right now; the admin command cannot act
    on it until the attempt ends.
    """


class SpoolLocked(Exception):
    """
    Another process holds the spool; this one must not start.
    """


class ConfigError(Exception):
    """
    The configuration is invalid.

    @ivar problems: One human-readable line per problem, each naming the file,
        line (where known) and key at fault.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class ListenerUnavailable(Exception):
    """
    A listener cannot be set up at start, e.g. a C{systemd:} endpoint naming
    a socket systemd did not pass.
    """
