"""
Tests for L{smtpauth_relay.auth}: the chain checker, the realm and the portal.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    Anonymous,
    IAnonymous,
    ICredentials,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay.auth import (
    DEFAULT_CHECKER_TIMEOUT,
    ChainChecker,
    LoginContext,
    Submitter,
    SubmitterRealm,
    login,
    makePortal,
)
from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.interfaces import ISubmitter
from smtpauth_relay.testing import MemoryChecker


class Broken(Exception):
    """
    A checker's unexpected failure.
    """


@implementer(ICredentialsChecker)
class SpyChecker:
    """
    A checker that records each question and gives a fixed answer.

    @ivar asked: the credentials asked about, in order.
    """

    def __init__(self, interfaces: tuple[Any, ...], answer: Any) -> None:
        self.credentialInterfaces = interfaces
        self.answer = answer
        self.asked: list[ICredentials] = []

    def requestAvatarId(self, credentials: ICredentials) -> Any:
        self.asked.append(credentials)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def alice(password: str = "secret") -> UsernamePassword:
    return UsernamePassword(b"alice", password.encode())


class ChainCheckerTests(SynchronousTestCase):
    """
    Tests for L{ChainChecker}.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_interface(self) -> None:
        """
        The chain is an L{ICredentialsChecker}, and so is the memory fake.
        """
        chain = ChainChecker([MemoryChecker(alice="secret")], self.clock)
        self.assertTrue(verifyObject(ICredentialsChecker, chain))
        self.assertTrue(verifyObject(ICredentialsChecker, MemoryChecker()))

    def test_credentialInterfacesUnion(self) -> None:
        """
        The chain accepts every interface one of its checkers accepts, each
        once, in first-seen order.
        """
        chain = ChainChecker(
            [
                SpyChecker((IUsernamePassword,), None),
                SpyChecker((IAnonymous, IUsernamePassword), None),
                SpyChecker((IUsernameHashedPassword,), None),
            ],
            self.clock,
        )
        self.assertEqual(
            chain.credentialInterfaces,
            (IUsernamePassword, IAnonymous, IUsernameHashedPassword),
        )

    def test_noCheckers(self) -> None:
        """
        An empty chain accepts no interface and handles no credentials.
        """
        chain = ChainChecker([], self.clock)
        self.assertEqual(chain.credentialInterfaces, ())
        self.failureResultOf(chain.requestAvatarId(alice()), UnhandledCredentials)

    def test_firstKnowsUser(self) -> None:
        """
        The first checker that knows the user answers; later ones are not
        asked.
        """
        first = MemoryChecker(alice="secret")
        second = MemoryChecker(alice="other")
        chain = ChainChecker([first, second], self.clock)
        self.assertEqual(self.successResultOf(chain.requestAvatarId(alice())), b"alice")
        self.assertEqual(first.asked, [b"alice"])
        self.assertEqual(second.asked, [])

    def test_unknownPassesOn(self) -> None:
        """
        A checker that does not know the user passes the question to the
        next.
        """
        first = MemoryChecker(bob="builder")
        second = MemoryChecker(alice="secret")
        chain = ChainChecker([first, second], self.clock)
        self.assertEqual(self.successResultOf(chain.requestAvatarId(alice())), b"alice")
        self.assertEqual(first.asked, [b"alice"])
        self.assertEqual(second.asked, [b"alice"])

    def test_wrongPasswordStops(self) -> None:
        """
        A wrong password from the checker that knows the user ends the
        login: the next checker, which would accept it, is not asked.
        """
        first = MemoryChecker(alice="secret")
        second = MemoryChecker(alice="guess")
        chain = ChainChecker([first, second], self.clock)
        failure = self.failureResultOf(
            chain.requestAvatarId(alice("guess")), UnauthorizedLogin
        )
        self.assertNotIsInstance(failure.value, UnknownUser)
        self.assertEqual(second.asked, [])

    def test_unavailableStops(self) -> None:
        """
        A checker that cannot answer makes the login fail with
        L{CheckerUnavailable}; the next checker is not asked.
        """
        first = MemoryChecker(alice="secret")
        first.unavailable = True
        second = MemoryChecker(alice="secret")
        chain = ChainChecker([first, second], self.clock)
        self.failureResultOf(chain.requestAvatarId(alice()), CheckerUnavailable)
        self.assertEqual(second.asked, [])

    def test_unexpectedException(self) -> None:
        """
        A checker that fails unexpectedly (synchronously or not) makes the
        login fail with L{CheckerUnavailable}, and the error is logged; the
        next checker is not asked.
        """
        for answer in (Broken("boom"), None):
            broken = SpyChecker((IUsernamePassword,), answer)
            if answer is None:
                d: Deferred[Any] = Deferred()
                broken.answer = d
            second = MemoryChecker(alice="secret")
            chain = ChainChecker([broken, second], self.clock)
            result = chain.requestAvatarId(alice())
            if answer is None:
                d.errback(Broken("later"))
            self.failureResultOf(result, CheckerUnavailable)
            self.assertEqual(second.asked, [])
            self.assertEqual(len(self.flushLoggedErrors(Broken)), 1)

    def test_timeout(self) -> None:
        """
        A checker that never answers makes the login fail with
        L{CheckerUnavailable} after the timeout, not before; the next
        checker is not asked.
        """
        slow = MemoryChecker(alice="secret")
        slow.pending = []
        second = MemoryChecker(alice="secret")
        chain = ChainChecker([slow, second], self.clock, timeout=5.0)
        d = chain.requestAvatarId(alice())
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, CheckerUnavailable)
        self.assertEqual(second.asked, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lateAnswerIgnored(self) -> None:
        """
        An answer arriving after the timeout changes nothing and raises
        nothing.
        """
        slow = MemoryChecker(alice="secret")
        slow.pending = []
        chain = ChainChecker([slow], self.clock, timeout=1.0)
        d = chain.requestAvatarId(alice())
        self.clock.advance(1.0)
        self.failureResultOf(d, CheckerUnavailable)
        slow.pending[0].callback(b"alice")

    def test_defaultTimeout(self) -> None:
        """
        The default timeout is 15 seconds.
        """
        self.assertEqual(DEFAULT_CHECKER_TIMEOUT, 15.0)
        slow = MemoryChecker(alice="secret")
        slow.pending = []
        d = ChainChecker([slow], self.clock).requestAvatarId(alice())
        self.clock.advance(14.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, CheckerUnavailable)

    def test_answerInTimeCancelsTimer(self) -> None:
        """
        A slow answer within the timeout is used, and leaves no timer
        behind.
        """
        slow = MemoryChecker(alice="secret")
        slow.pending = []
        chain = ChainChecker([slow], self.clock, timeout=5.0)
        d = chain.requestAvatarId(alice())
        self.clock.advance(3)
        slow.pending[0].callback(b"alice")
        self.assertEqual(self.successResultOf(d), b"alice")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutPerChecker(self) -> None:
        """
        Each checker gets its own timeout: slow unknown-user answers from
        several checkers do not add up to a failure.
        """
        first = MemoryChecker()
        first.pending = []
        second = MemoryChecker(alice="secret")
        chain = ChainChecker([first, second], self.clock, timeout=5.0)
        d = chain.requestAvatarId(alice())
        self.clock.advance(4)
        first.pending[0].errback(UnknownUser())
        self.clock.advance(4)
        self.assertEqual(self.successResultOf(d), b"alice")

    def test_checkerOwnTimeout(self) -> None:
        """
        A checker with its own C{timeout} attribute (a plugin's C{timeout=}
        option) is given that long instead of the chain's default.
        """
        slow = MemoryChecker(alice="secret")
        slow.pending = []
        slow.timeout = 2.0  # type: ignore[attr-defined]
        d = ChainChecker([slow], self.clock, timeout=5.0).requestAvatarId(alice())
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, CheckerUnavailable)

    def test_otherInterfacesSkipped(self) -> None:
        """
        Checkers for other credentials interfaces are not asked.
        """
        anonymous = SpyChecker((IAnonymous,), succeed("anon"))
        memory = MemoryChecker(alice="secret")
        chain = ChainChecker([anonymous, memory], self.clock)
        self.assertEqual(self.successResultOf(chain.requestAvatarId(alice())), b"alice")
        self.assertEqual(anonymous.asked, [])
        self.assertEqual(memory.asked, [b"alice"])

    def test_anonymousCredentials(self) -> None:
        """
        Credentials of an interface only some checkers take go to those.
        """
        anonymous = SpyChecker((IAnonymous,), succeed("anon"))
        memory = MemoryChecker(alice="secret")
        chain = ChainChecker([memory, anonymous], self.clock)
        self.assertEqual(
            self.successResultOf(chain.requestAvatarId(Anonymous())), "anon"
        )
        self.assertEqual(memory.asked, [])

    def test_noCheckerForInterface(self) -> None:
        """
        Credentials no checker takes are unhandled, not a wrong password.
        """
        chain = ChainChecker([MemoryChecker(alice="secret")], self.clock)
        self.failureResultOf(chain.requestAvatarId(Anonymous()), UnhandledCredentials)

    def test_allUnknown(self) -> None:
        """
        When no checker knows the user the login fails with
        L{UnauthorizedLogin}, after every checker was asked.
        """
        checkers = [MemoryChecker(bob="x"), MemoryChecker(carol="y")]
        chain = ChainChecker(checkers, self.clock)
        self.failureResultOf(chain.requestAvatarId(alice()), UnauthorizedLogin)
        self.assertEqual([c.asked for c in checkers], [[b"alice"], [b"alice"]])

    def test_checkersKept(self) -> None:
        """
        The chain keeps its checkers in the order given.
        """
        checkers = [MemoryChecker(), MemoryChecker(), MemoryChecker()]
        self.assertEqual(ChainChecker(checkers, self.clock).checkers, checkers)


class RealmTests(SynchronousTestCase):
    """
    Tests for L{SubmitterRealm} and L{Submitter}.
    """

    def test_interfaces(self) -> None:
        """
        The realm is an L{IRealm} and its avatars are L{ISubmitter}s.
        """
        self.assertTrue(verifyObject(IRealm, SubmitterRealm()))
        self.assertTrue(verifyObject(ISubmitter, Submitter("alice", "PLAIN", True)))

    def test_requestAvatar(self) -> None:
        """
        The avatar carries the decoded user name and the mechanism and TLS
        state from the L{LoginContext}; logout is a no-op.
        """
        iface, avatar, logout = SubmitterRealm().requestAvatar(
            b"alice", LoginContext("LOGIN", True), ISubmitter
        )
        self.assertIs(iface, ISubmitter)
        self.assertEqual(avatar, Submitter("alice", "LOGIN", True))
        self.assertIsNone(logout())

    def test_utf8Name(self) -> None:
        """
        A UTF-8 avatar id becomes text.
        """
        _, avatar, _ = SubmitterRealm().requestAvatar(
            "j\u00f6rg".encode(), LoginContext("PLAIN", False), ISubmitter
        )
        self.assertEqual(avatar.username, "j\u00f6rg")

    def test_textAvatarId(self) -> None:
        """
        A text avatar id is kept.
        """
        _, avatar, _ = SubmitterRealm().requestAvatar(
            "alice", LoginContext("PLAIN", False), ISubmitter
        )
        self.assertEqual(avatar.username, "alice")

    def test_noContext(self) -> None:
        """
        Without a L{LoginContext} the mechanism is unknown and TLS is
        assumed absent.
        """
        _, avatar, _ = SubmitterRealm().requestAvatar("alice", None, ISubmitter)
        self.assertEqual(avatar, Submitter("alice", "", False))

    def test_otherInterface(self) -> None:
        """
        Only L{ISubmitter} avatars are made.
        """
        self.assertRaises(
            NotImplementedError,
            SubmitterRealm().requestAvatar,
            "alice",
            None,
            IAnonymous,
        )


class PortalTests(SynchronousTestCase):
    """
    Tests for L{makePortal} and L{login}.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_login(self) -> None:
        """
        A good login gives the L{Submitter} with the context's mechanism and
        TLS state.
        """
        portal = makePortal([MemoryChecker(alice="secret")], self.clock)
        submitter = self.successResultOf(
            login(portal, alice(), LoginContext("PLAIN", True))
        )
        self.assertEqual(submitter, Submitter("alice", "PLAIN", True))
        self.assertTrue(verifyObject(ISubmitter, submitter))

    def test_badLogin(self) -> None:
        """
        A wrong password fails with L{UnauthorizedLogin}.
        """
        portal = makePortal([MemoryChecker(alice="secret")], self.clock)
        self.failureResultOf(
            login(portal, alice("wrong"), LoginContext("PLAIN", True)),
            UnauthorizedLogin,
        )

    def test_twoCheckersKept(self) -> None:
        """
        A portal made from two checkers for the same interface keeps both
        (C{Portal.registerChecker} alone would keep only the last): a user
        known only to the first and one known only to the second can both
        log in.
        """
        first = MemoryChecker(alice="secret")
        second = MemoryChecker(bob="builder")
        portal = makePortal([first, second], self.clock)
        self.assertEqual(
            self.successResultOf(login(portal, alice(), LoginContext("LOGIN", False))),
            Submitter("alice", "LOGIN", False),
        )
        self.assertEqual(
            self.successResultOf(
                login(
                    portal,
                    UsernamePassword(b"bob", b"builder"),
                    LoginContext("PLAIN", True),
                )
            ),
            Submitter("bob", "PLAIN", True),
        )
        chain = portal.checkers[IUsernamePassword]
        assert isinstance(chain, ChainChecker)
        self.assertEqual(chain.checkers, [first, second])

    def test_chainUsesClock(self) -> None:
        """
        The portal's chain times out on the clock given to L{makePortal}.
        """
        slow = MemoryChecker(alice="secret")
        slow.pending = []
        portal = makePortal([slow], self.clock)
        d = login(portal, alice(), LoginContext("PLAIN", True))
        self.assertNoResult(d)
        self.clock.advance(DEFAULT_CHECKER_TIMEOUT)
        self.failureResultOf(d, CheckerUnavailable)

    def test_noCheckers(self) -> None:
        """
        A portal without checkers refuses every login as unhandled.
        """
        portal = makePortal([], self.clock)
        self.assertEqual(portal.listCredentialsInterfaces(), [])
        self.failureResultOf(
            login(portal, alice(), LoginContext("PLAIN", True)), UnhandledCredentials
        )
