"""
Authentication: the Portal, its realm, and the ordered chain of checkers.

C{Portal.registerChecker} keeps one checker per credentials interface, so
several C{--auth} options would silently collapse to the last one registered.
L{ChainChecker} holds them all, in configuration order, and is the only
checker the portal sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    ICredentials,
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.interfaces import (
    ICramMD5Credentials,
    ISASLMechanisms,
    IScramCredentials,
    IScramStore,
    ISubmitter,
)
from smtpauth_relay.passwords import (
    DEFAULT_SCRAM_ITERATIONS,
    ScramSecrets,
    fakeScramSecrets,
)

log = Logger()

DEFAULT_CHECKER_TIMEOUT = 15.0

PASSWORD_MECHANISMS = frozenset({"PLAIN", "LOGIN"})
"""
The mechanisms that hand the checkers a password: offered when any checker
takes one.
"""

SASL_CREDENTIALS = (IScramCredentials, ICramMD5Credentials, IUsernameHashedPassword)
"""
The credentials the SCRAM-SHA-256 and CRAM-MD5 mechanisms produce; the
portal sends them to the chain whatever its checkers were at start-up, since
a reload may bring checkers that take them.
"""


def checkerMechanisms(checker: ICredentialsChecker) -> frozenset[str]:
    """
    The SASL mechanisms every user of C{checker} can log in with now.

    A checker that provides L{ISASLMechanisms} says so itself; for any
    other, PLAIN and LOGIN if it takes a password (L{IUsernamePassword}),
    and CRAM-MD5 if it takes L{IUsernameHashedPassword} (it has the
    passwords themselves, as Twisted's C{memory:} and unhashed C{file:}
    checkers do).
    """
    if ISASLMechanisms.providedBy(checker):
        try:
            return frozenset(checker.saslMechanisms())
        except Exception:
            log.failure("credential checker {checker!r} failed", checker=checker)
            return frozenset()
    interfaces = tuple(getattr(checker, "credentialInterfaces", ()))
    result: set[str] = set()
    if IUsernamePassword in interfaces:
        result |= PASSWORD_MECHANISMS
    if IUsernameHashedPassword in interfaces:
        result.add("CRAM-MD5")
    return frozenset(result)


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


@implementer(ICredentialsChecker, IScramStore)
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

    def mechanisms(self, allowed: Sequence[str]) -> list[str]:
        """
        The mechanisms of C{allowed} (in its order) this chain can serve
        now: PLAIN and LOGIN when any checker can, any other only when every
        checker can, for every one of its users (see L{checkerMechanisms});
        a client that picked SCRAM-SHA-256 must not find itself unable to
        log in because its user has only a bcrypt hash.
        """
        if not self.checkers:
            return []
        each = [checkerMechanisms(checker) for checker in self.checkers]
        anyChecker = frozenset().union(*each)
        everyChecker = frozenset.intersection(*each)
        return [
            name
            for name in allowed
            if (
                name in anyChecker
                if name in PASSWORD_MECHANISMS
                else name in everyChecker
            )
        ]

    def scramSecrets(self, username: str) -> Deferred[ScramSecrets]:
        """
        The SCRAM secrets of the first checker (in order) that has some for
        C{username}; otherwise the made-up ones of the first that provides
        L{IScramStore} (so that they look like its real ones), or made-up
        ones with the default iteration count.  Each checker has its
        timeout, and fails as in L{requestAvatarId}.
        """
        return Deferred.fromCoroutine(self._scramSecrets(username))

    async def _scramSecrets(self, username: str) -> ScramSecrets:
        fake: ScramSecrets | None = None
        for checker in self.checkers:
            if not IScramStore.providedBy(checker):
                continue
            found: ScramSecrets = await self._ask(
                checker, checker.scramSecrets, username
            )
            if found.known:
                return found
            if fake is None:
                fake = found
        if fake is None:
            fake = fakeScramSecrets(username, DEFAULT_SCRAM_ITERATIONS)
        return fake

    async def _ask(self, checker: Any, call: Callable[..., Any], *args: Any) -> Any:
        """
        C{call(*args)} on C{checker}, within its timeout.  A refusal
        (L{UnauthorizedLogin}, L{UnknownUser}) and L{CheckerUnavailable}
        pass through; a timeout or any other failure is logged and becomes
        L{CheckerUnavailable}.
        """
        timeout = self.timeoutOf(checker)
        d = maybeDeferred(call, *args)
        d.addTimeout(timeout, self._clock)
        try:
            return await d
        except (UnauthorizedLogin, CheckerUnavailable):
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

    async def _check(self, credentials: ICredentials) -> Any:
        asked = False
        for checker in self.checkers:
            if not any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                continue
            asked = True
            try:
                return await self._ask(checker, checker.requestAvatarId, credentials)
            except UnknownUser:
                continue
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
        interfaces = dict.fromkeys(chain.credentialInterfaces + SASL_CREDENTIALS)
        portal.registerChecker(chain, *interfaces)
    return portal


def chainOf(portal: Portal) -> ChainChecker | None:
    """
    The L{ChainChecker} of a portal L{makePortal} made, if it has one.
    """
    for checker in portal.checkers.values():
        if isinstance(checker, ChainChecker):
            return checker
    return None


def login(
    portal: Portal, credentials: ICredentials, context: LoginContext
) -> Deferred[Submitter]:
    """
    Log in through C{portal}, returning the L{Submitter}.
    """

    def avatar(result: Any) -> Submitter:
        submitter: Submitter = result[1]
        return submitter

    return portal.login(credentials, context, ISubmitter).addCallback(avatar)
