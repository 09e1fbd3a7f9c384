"""
Tests for L{smtpauth_relay.sasl}.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.sasl import (
    MECHANISMS,
    AuthorizationRefused,
    Login,
    MechanismError,
    Plain,
)


class PlainTests(SynchronousTestCase):
    """
    Tests for L{Plain} (RFC 4616).
    """

    def assertCredentials(
        self, result: object, username: bytes, password: bytes
    ) -> None:
        self.assertIsInstance(result, UsernamePassword)
        assert isinstance(result, UsernamePassword)
        self.assertTrue(IUsernamePassword.providedBy(result))
        self.assertEqual((result.username, result.password), (username, password))

    def test_name(self) -> None:
        """
        The mechanism is called C{PLAIN} and listed under that name.
        """
        self.assertEqual(Plain.name, "PLAIN")
        self.assertIs(MECHANISMS["PLAIN"], Plain)

    def test_challenge(self) -> None:
        """
        Without an initial response the server sends an empty challenge.
        """
        self.assertEqual(Plain().challenge(), b"")

    def test_noAuthzid(self) -> None:
        """
        C{NUL user NUL password} gives the credentials.
        """
        self.assertCredentials(
            Plain().respond(b"\0alice\0wonder land"), b"alice", b"wonder land"
        )

    def test_authzidSameUser(self) -> None:
        """
        An authzid equal to the authcid is allowed.
        """
        self.assertCredentials(
            Plain().respond(b"alice\0alice\0secret"), b"alice", b"secret"
        )

    def test_authzidOtherUser(self) -> None:
        """
        Asking to act as somebody else is refused.
        """
        self.assertRaises(AuthorizationRefused, Plain().respond, b"root\0alice\0secret")

    def test_authzidCaseMatters(self) -> None:
        """
        The authzid is compared octet for octet: C{Alice} is not C{alice}.
        """
        self.assertRaises(
            AuthorizationRefused, Plain().respond, b"Alice\0alice\0secret"
        )

    def test_fieldCount(self) -> None:
        """
        Anything but exactly three NUL-separated fields is malformed, so a
        NUL inside the password is not silently cut.
        """
        for response in (b"", b"alice", b"alice\0secret", b"\0alice\0sec\0ret"):
            self.assertRaises(MechanismError, Plain().respond, response)

    def test_emptyUser(self) -> None:
        """
        An empty authentication identity is malformed.
        """
        self.assertRaises(MechanismError, Plain().respond, b"\0\0secret")
        self.assertRaises(MechanismError, Plain().respond, b"alice\0\0secret")

    def test_emptyPassword(self) -> None:
        """
        An empty password is passed on for the checker to refuse.
        """
        self.assertCredentials(Plain().respond(b"\0alice\0"), b"alice", b"")

    def test_utf8(self) -> None:
        """
        UTF-8 names and passwords are passed on as bytes.
        """
        user = "j\u00f6rg".encode()
        password = "p\u00e4ss".encode()
        self.assertCredentials(
            Plain().respond(b"\0" + user + b"\0" + password), user, password
        )

    def test_errorsAreValueErrors(self) -> None:
        """
        Both refusals are L{ValueError}s and neither is the other.
        """
        self.assertTrue(issubclass(MechanismError, ValueError))
        self.assertTrue(issubclass(AuthorizationRefused, ValueError))
        self.assertFalse(issubclass(MechanismError, AuthorizationRefused))
        self.assertFalse(issubclass(AuthorizationRefused, MechanismError))

    @settings(derandomize=True, max_examples=300)
    @given(st.binary(max_size=50))
    def test_arbitrary(self, response: bytes) -> None:
        """
        Any response gives credentials or one of the two documented errors;
        credentials always have a non-empty user name.
        """
        try:
            result = Plain().respond(response)
        except (MechanismError, AuthorizationRefused):
            return
        assert isinstance(result, UsernamePassword)
        self.assertTrue(result.username)


class LoginTests(SynchronousTestCase):
    """
    Tests for L{Login}.
    """

    def test_name(self) -> None:
        """
        The mechanism is called C{LOGIN} and listed under that name.
        """
        self.assertEqual(Login.name, "LOGIN")
        self.assertIs(MECHANISMS["LOGIN"], Login)

    def test_exchange(self) -> None:
        """
        The server asks C{Username:}, then C{Password:}, then gives the
        credentials.
        """
        mechanism = Login()
        self.assertEqual(mechanism.challenge(), b"Username:")
        self.assertEqual(mechanism.respond(b"alice"), b"Password:")
        result = mechanism.respond(b"secret")
        assert isinstance(result, UsernamePassword)
        self.assertEqual((result.username, result.password), (b"alice", b"secret"))

    def test_emptyUser(self) -> None:
        """
        An empty user name is malformed.
        """
        self.assertRaises(MechanismError, Login().respond, b"")

    def test_emptyPassword(self) -> None:
        """
        An empty password is passed on for the checker to refuse.
        """
        mechanism = Login()
        mechanism.respond(b"alice")
        result = mechanism.respond(b"")
        assert isinstance(result, UsernamePassword)
        self.assertEqual((result.username, result.password), (b"alice", b""))

    def test_independent(self) -> None:
        """
        Each instance is its own exchange.
        """
        first = Login()
        first.respond(b"alice")
        self.assertEqual(Login().respond(b"bob"), b"Password:")

    def test_onlyTwo(self) -> None:
        """
        Only the two mechanisms are offered.
        """
        self.assertEqual(sorted(MECHANISMS), ["LOGIN", "PLAIN"])
