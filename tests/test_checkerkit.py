"""
The operator kit, L{smtpauth_relay.testing.CheckerContractMixin}: our own
htpasswd plugin passes it, and checkers that break the contract fail it.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet.defer import Deferred, fail, succeed
from twisted.plugin import IPlugin
from twisted.trial.reporter import TestResult
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from smtpauth_relay.errors import CheckerUnavailable, UnknownUser
from smtpauth_relay.htpasswd import setUser
from smtpauth_relay.passwords import hashPassword
from smtpauth_relay.testing import CheckerContractMixin


class HtpasswdContractTests(CheckerContractMixin, TestCase):
    """
    The htpasswd plugin against the operator kit.
    """

    authType = "htpasswd"
    validUser = ("alice", "wonderland")

    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "users")
        setUser(self.path, "alice", hashPassword(b"wonderland", rounds=4))

    def checkerArgument(self) -> str:
        return self.path

    def unavailableChecker(self) -> ICredentialsChecker:
        """
        A password file that turned into something unreadable after the
        checker was made.
        """
        broken = self.path + ".broken"
        shutil.copy(self.path, broken)
        checker = self.contractChecker(broken)
        os.remove(broken)
        os.mkdir(broken)
        return checker


# -- checkers that break the contract, to show the kit catches them ---------


class Behaviour:
    """
    How a L{BrokenChecker} answers.
    """

    unknownForWrongPassword = False
    refuseUnknownPlainly = False
    downAsRefusal = False
    blockFor = 0.0
    emptyPasswordLogsIn = False


@implementer(ICredentialsChecker)
class BrokenChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, behaviour: type[Behaviour], down: bool) -> None:
        self.behaviour = behaviour
        self.down = down

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[Any]:
        b = self.behaviour
        assert IUsernamePassword.providedBy(credentials)
        if b.blockFor:
            time.sleep(b.blockFor)
        if self.down:
            return fail(
                UnauthorizedLogin() if b.downAsRefusal else CheckerUnavailable()
            )
        if credentials.username != b"alice":
            return fail(
                UnauthorizedLogin() if b.refuseUnknownPlainly else UnknownUser()
            )
        if credentials.password == b"secret" or (
            b.emptyPasswordLogsIn and credentials.password == b""
        ):
            return succeed(b"alice")
        return fail(UnknownUser() if b.unknownForWrongPassword else UnauthorizedLogin())


@implementer(ICheckerFactory, IPlugin)
class BrokenFactory:
    authType = "broken"
    authHelp = "A checker for testing the kit."
    argStringFormat = "up or down"
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, behaviour: type[Behaviour]) -> None:
        self.behaviour = behaviour

    def generateChecker(self, argstring: str) -> BrokenChecker:
        return BrokenChecker(self.behaviour, argstring == "down")


def contractFailures(behaviour: type[Behaviour]) -> set[str]:
    """
    Run the kit against a checker behaving as C{behaviour}; return the
    names of the contract tests that failed (discovery is left out: the
    broken checker is no installed plugin).
    """

    class Contract(CheckerContractMixin, TestCase):
        authType = "broken"
        validUser = ("alice", "secret")
        blockingLimit = 0.05

        def contractFactory(self) -> Any:
            return BrokenFactory(behaviour)

        def checkerArgument(self) -> str:
            return "up"

        def unavailableArgument(self) -> str:
            return "down"

    names = [
        name
        for name in dir(CheckerContractMixin)
        if name.startswith("test_contract") and name != "test_contractDiscoverable"
    ]
    result = TestResult()
    for name in names:
        Contract(name).run(result)
    failed = {
        test.id().rsplit(".", 1)[-1] for test, _ in result.failures + result.errors
    }
    return failed


class KitCatchesBrokenCheckersTests(SynchronousTestCase):
    """
    Each rule of the contract fails a checker that breaks it, and only
    that rule.
    """

    def test_wellBehaved(self) -> None:
        """
        A checker keeping every rule passes.
        """
        self.assertEqual(contractFailures(Behaviour), set())

    def test_wrongPasswordAsUnknownUser(self) -> None:
        """
        Answering a wrong password with L{UnknownUser} (so a later checker
        could log the user in) is caught.
        """

        class B(Behaviour):
            unknownForWrongPassword = True

        self.assertEqual(
            contractFailures(B),
            {"test_contractWrongPassword", "test_contractEmptyPassword"},
        )

    def test_unknownUserNotPassedOn(self) -> None:
        """
        A checker that says it can tell unknown users but refuses them as a
        wrong password is caught.
        """

        class B(Behaviour):
            refuseUnknownPlainly = True

        self.assertEqual(contractFailures(B), {"test_contractUnknownUser"})

    def test_downAsRefusal(self) -> None:
        """
        A dead backend reported as a wrong password (which would count
        towards lockouts and tell the user their password is wrong) is
        caught, in the chain and in the session.
        """

        class B(Behaviour):
            downAsRefusal = True

        self.assertEqual(
            contractFailures(B), {"test_contractUnavailable", "test_contractSession"}
        )

    def test_blocking(self) -> None:
        """
        A checker that does its work on the reactor thread is caught.
        """

        class B(Behaviour):
            blockFor = 0.2

        self.assertIn("test_contractDoesNotBlock", contractFailures(B))

    def test_emptyPassword(self) -> None:
        """
        A checker that lets an empty password in is caught.
        """

        class B(Behaviour):
            emptyPasswordLogsIn = True

        self.assertEqual(contractFailures(B), {"test_contractEmptyPassword"})
