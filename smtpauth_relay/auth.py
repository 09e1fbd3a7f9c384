"""
Authentication: the Portal, its realm, and the ordered chain of checkers.

C{Portal.registerChecker} keeps one checker per credentials interface, so
several C{--auth} options would silently collapse to the last one registered.
L{ChainChecker} holds them all, in configuration order, and is the only
checker the portal sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.interfaces import ISubmitter

log = Logger()

DEFAULT_CHECKER_TIMEOUT = 15.0


@implementer(ISubmitter)
@dataclass(frozen=True)
class Submitter:
    """
    The authenticated identity of a session; see L{ISubmitter}.
    """

    username: str
    mechanism: str
    tls: bool


@dataclass(frozen=True)
class LoginContext:
    """
    The I{mind} passed to L{Portal.login}: how the session logged in.
    """

    mechanism: str
    tls: bool


@implementer(IRealm)
class SubmitterRealm:
    """
    Turns an authenticated avatar id into a L{Submitter}.
    """

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, Submitter, Any]:
        if ISubmitter not in interfaces:
            raise NotImplementedError("only ISubmitter avatars")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        context = mind if isinstance(mind, LoginContext) else LoginContext("", False)
        return (
            ISubmitter,
            Submitter(str(avatarId), context.mechanism, context.tls),
            lambda: None,
        )


@implementer(ICredentialsChecker)
class ChainChecker:
    """
    Ask checkers in order; the first that knows the user decides.

    A checker raising L{UnknownUser} passes the question to the next one; a
    wrong password (any other L{UnauthorizedLogin}) ends it.  A checker that
    fails otherwise or does not answer within C{timeout} seconds makes the
    whole login fail with L{CheckerUnavailable}: asking the next checker then
    could let a weaker backend speak for a user the first one owns.
    """

    def __init__(
        self,
        checkers: Sequence[ICredentialsChecker],
        clock: Any,
        timeout: float = DEFAULT_CHECKER_TIMEOUT,
    ) -> None:
        self.checkers = list(checkers)
        self._clock = clock
        self._timeout = timeout
        interfaces: list[Any] = []
        for checker in self.checkers:
            for iface in checker.credentialInterfaces:
                if iface not in interfaces:
                    interfaces.append(iface)
        self.credentialInterfaces = tuple(interfaces)

    def timeoutOf(self, checker: ICredentialsChecker) -> float:
        """
        Seconds C{checker} may take: its own C{timeout} attribute (a checker
        plugin's C{timeout=} option) if it has one, else the chain's.
        """
        timeout = getattr(checker, "timeout", None)
        if isinstance(timeout, (int, float)) and timeout > 0:
            return float(timeout)
        return self._timeout

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: ICredentials) -> Any:
        asked = False
        for checker in self.checkers:
            if not any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                continue
            asked = True
            timeout = self.timeoutOf(checker)
            d = maybeDeferred(checker.requestAvatarId, credentials)
            d.addTimeout(timeout, self._clock)
            try:
                return await d
            except UnknownUser:
                continue
            except UnauthorizedLogin:
                raise
            except CheckerUnavailable:
                raise
            except TimeoutError:
                log.error(
                    "credential checker {checker!r} timed out after {timeout}s",
                    checker=checker,
                    timeout=timeout,
                )
                raise CheckerUnavailable(f"{checker!r} timed out") from None
            except Exception:
                log.failure("credential checker {checker!r} failed", checker=checker)
                raise CheckerUnavailable(f"{checker!r} failed") from None
        if not asked:
            raise UnhandledCredentials("no checker for these credentials")
        raise UnauthorizedLogin("unknown user")


def makePortal(checkers: Sequence[ICredentialsChecker], clock: Any) -> Portal:
    """
    A portal whose only checker is the chain of C{checkers}.
    """
    portal = Portal(SubmitterRealm())
    chain = ChainChecker(checkers, clock)
    if chain.credentialInterfaces:
        portal.registerChecker(chain)
    return portal


def login(
    portal: Portal, credentials: IUsernamePassword, context: LoginContext
) -> Deferred[Submitter]:
    """
    Log in through C{portal}, returning the L{Submitter}.
    """

    def avatar(result: Any) -> Submitter:
        submitter: Submitter = result[1]
        return submitter

    return portal.login(credentials, context, ISubmitter).addCallback(avatar)
