"""
Tests for L{smtpauth_relay.sasl}.
"""

from __future__ import annotations

import base64
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st
from scramp import ScramClient
from twisted.cred.credentials import (
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpauth_relay.interfaces import (
    ICramMD5Credentials,
    IScramCredentials,
    IScramStore,
)
from smtpauth_relay.passwords import (
    ScramSecrets,
    cramMD5State,
    fakeScramSecrets,
    scramSecrets,
)
from smtpauth_relay.sasl import (
    MECHANISMS,
    AuthorizationRefused,
    ChannelBindingNotSupported,
    CramMD5,
    CramMD5Credentials,
    Login,
    MechanismError,
    Plain,
    ScramCredentials,
    ScramSHA256,
    makeMechanism,
)

# RFC 7677 section 3.
RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC7677_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC7677_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC7677_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


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

    def test_implemented(self) -> None:
        """
        Four mechanisms are implemented.
        """
        self.assertEqual(
            sorted(MECHANISMS), ["CRAM-MD5", "LOGIN", "PLAIN", "SCRAM-SHA-256"]
        )


@implementer(IScramStore)
class SpyStore:
    """
    An L{IScramStore} over a dict of passwords (made-up secrets for the
    others), recording the users asked about.

    @ivar pending: when set, answers wait in this list as Deferreds the test
        fires itself.
    """

    def __init__(self, **users: str) -> None:
        self.secrets = {
            name: scramSecrets(password.encode(), b"salt of " + name.encode(), 4096)
            for name, password in users.items()
        }
        self.asked: list[str] = []
        self.pending: list[Deferred[ScramSecrets]] | None = None

    def scramSecrets(self, username: str) -> Deferred[ScramSecrets]:
        self.asked.append(username)
        found = self.secrets.get(username) or fakeScramSecrets(username, 4096)
        if self.pending is not None:
            d: Deferred[ScramSecrets] = Deferred()
            self.pending.append(d)
            return d
        return succeed(found)


def resultOf(step: object) -> object:
    """
    The result of a mechanism step that fired at once.
    """
    if isinstance(step, Deferred):
        results: list[object] = []
        step.addBoth(results.append)
        assert results, "the step has not fired"
        return results[0]
    return step


class ScramTests(SynchronousTestCase):
    """
    Tests for L{ScramSHA256} (RFC 5802, RFC 7677).
    """

    def setUp(self) -> None:
        self.store = SpyStore(alice="wonderland")

    def exchange(
        self, username: str, password: str, mechanism: ScramSHA256 | None = None
    ) -> tuple[ScramSHA256, ScramClient, ScramCredentials]:
        """
        Run a whole exchange with scramp's client.
        """
        if mechanism is None:
            mechanism = ScramSHA256(self.store)
        client = ScramClient(["SCRAM-SHA-256"], username, password)
        serverFirst = resultOf(mechanism.respond(client.get_client_first().encode()))
        assert isinstance(serverFirst, bytes)
        client.set_server_first(serverFirst.decode())
        credentials = mechanism.respond(client.get_client_final().encode())
        assert isinstance(credentials, ScramCredentials)
        return mechanism, client, credentials

    def test_name(self) -> None:
        """
        The mechanism is called C{SCRAM-SHA-256}, client-first with an empty
        challenge, and L{makeMechanism} makes it with the store.
        """
        self.assertIs(MECHANISMS["SCRAM-SHA-256"], ScramSHA256)
        self.assertEqual(ScramSHA256(self.store).challenge(), b"")
        mechanism = makeMechanism("SCRAM-SHA-256", self.store, "relay.test", 0.0)
        self.assertIsInstance(mechanism, ScramSHA256)

    def test_rfc7677(self) -> None:
        """
        The exchange of RFC 7677 section 3, with its nonce, gives its
        server-first-message, a proof that checks against the StoredKey of
        "pencil", and its server signature.
        """
        secrets = scramSecrets(b"pencil", RFC7677_SALT, 4096)
        store = SpyStore()
        store.secrets["user"] = secrets
        mechanism = ScramSHA256(store, nonce=RFC7677_SERVER_NONCE)
        self.assertEqual(
            resultOf(mechanism.respond(RFC7677_CLIENT_FIRST)), RFC7677_SERVER_FIRST
        )
        self.assertEqual(store.asked, ["user"])
        credentials = mechanism.respond(RFC7677_CLIENT_FINAL)
        assert isinstance(credentials, ScramCredentials)
        self.assertTrue(verifyObject(IScramCredentials, credentials))
        self.assertEqual(credentials.username, b"user")
        self.assertTrue(credentials.checkProof(secrets.storedKey))
        wrong = scramSecrets(b"pencil2", RFC7677_SALT, 4096)
        self.assertFalse(credentials.checkProof(wrong.storedKey))
        self.assertEqual(mechanism.finalChallenge(), RFC7677_SERVER_FINAL)

    def test_scramp(self) -> None:
        """
        An independent client (scramp) logs in, and accepts the server's
        signature.
        """
        mechanism, client, credentials = self.exchange("alice", "wonderland")
        self.assertTrue(credentials.checkProof(self.store.secrets["alice"].storedKey))
        client.set_server_final(mechanism.finalChallenge().decode())

    def test_wrongPassword(self) -> None:
        """
        A wrong password gives credentials whose proof does not check.
        """
        _, _, credentials = self.exchange("alice", "rabbit")
        self.assertFalse(credentials.checkProof(self.store.secrets["alice"].storedKey))

    def test_unknownUser(self) -> None:
        """
        An unknown user gets a server-first-message of the same shape (the
        store's made-up salt), and a proof that checks against nothing.
        """
        mechanism = ScramSHA256(self.store)
        client = ScramClient(["SCRAM-SHA-256"], "mallory", "x")
        first = resultOf(mechanism.respond(client.get_client_first().encode()))
        assert isinstance(first, bytes)
        self.assertRegex(first, rb"\Ar=[^,]+,s=[A-Za-z0-9+/]{22}==,i=4096\Z")

    def test_nonceRandom(self) -> None:
        """
        The server nonce is random: two exchanges never share it.
        """
        first = resultOf(ScramSHA256(self.store).respond(b"n,,n=alice,r=abc"))
        second = resultOf(ScramSHA256(self.store).respond(b"n,,n=alice,r=abc"))
        assert isinstance(first, bytes) and isinstance(second, bytes)
        self.assertNotEqual(first.split(b",")[0], second.split(b",")[0])
        self.assertTrue(first.startswith(b"r=abc"))

    def test_channelBindingRefused(self) -> None:
        """
        A C{p=} flag (channel binding wanted) is refused with
        L{ChannelBindingNotSupported}, before any lookup.
        """
        self.assertRaises(
            ChannelBindingNotSupported,
            ScramSHA256(self.store).respond,
            b"p=tls-exporter,,n=alice,r=abc",
        )
        self.assertEqual(self.store.asked, [])
        self.assertTrue(issubclass(ChannelBindingNotSupported, MechanismError))

    def test_clientSupportsBinding(self) -> None:
        """
        A C{y} flag (the client could bind but thinks the server cannot) is
        accepted, and must be repeated in C{c=}.
        """
        mechanism = ScramSHA256(self.store, nonce=b"SERVER")
        serverFirst = resultOf(mechanism.respond(b"y,,n=alice,r=abc"))
        assert isinstance(serverFirst, bytes)
        self.assertRaises(
            MechanismError, mechanism.respond, b"c=biws,r=abcSERVER,p=AAAA"
        )
        mechanism = ScramSHA256(self.store, nonce=b"SERVER")
        resultOf(mechanism.respond(b"y,,n=alice,r=abc"))
        result = mechanism.respond(
            b"c=" + base64.b64encode(b"y,,") + b",r=abcSERVER,p=AAAA"
        )
        self.assertIsInstance(result, ScramCredentials)

    def test_authzid(self) -> None:
        """
        An authorization identity equal to the user is accepted; another
        one is refused like PLAIN's, naming the user.
        """
        mechanism = ScramSHA256(self.store, nonce=b"S")
        self.assertIsInstance(
            resultOf(mechanism.respond(b"n,a=alice,n=alice,r=abc")), bytes
        )
        credentials = mechanism.respond(
            b"c=" + base64.b64encode(b"n,a=alice,") + b",r=abcS,p=AAAA"
        )
        self.assertIsInstance(credentials, ScramCredentials)
        error = self.assertRaises(
            AuthorizationRefused,
            ScramSHA256(self.store).respond,
            b"n,a=root,n=alice,r=abc",
        )
        self.assertEqual(error.username, "alice")

    def test_saslname(self) -> None:
        """
        C{=2C} and C{=3D} in the user name are C{,} and C{=}; the name is
        SASLprep'ed; other escapes and empty names are malformed.
        """
        ScramSHA256(self.store).respond(b"n,,n=a=2Cb=3Dc,r=abc")
        ScramSHA256(self.store).respond("n,,n=I\u00adX,r=abc".encode())
        self.assertEqual(self.store.asked, ["a,b=c", "IX"])
        for bad in (b"n,,n=a=2Xb,r=abc", b"n,,n=,r=abc", b"n,,n=\xff,r=abc"):
            self.assertRaises(MechanismError, ScramSHA256(self.store).respond, bad)

    def test_malformedClientFirst(self) -> None:
        """
        Client-first messages that do not follow RFC 5802 are malformed:
        bad flag, missing attributes, a mandatory extension, a bad nonce.
        """
        for bad in (
            b"",
            b"n",
            b"x,,n=alice,r=abc",
            b"n,,r=abc,n=alice",
            b"n,,n=alice",
            b"n,,m=ext,n=alice,r=abc",
            b"n,,n=alice,r=abc,m=ext",
            b"n,,n=alice,r=a\x01c",
            b"n,,n=alice,r=",
            b"n,x=y,n=alice,r=abc",
        ):
            self.assertRaises(
                (MechanismError, AuthorizationRefused),
                ScramSHA256(self.store).respond,
                bad,
            )

    def test_malformedClientFinal(self) -> None:
        """
        A client-final message without a proof, with the wrong nonce or
        channel binding data, or bad base64, is malformed.
        """
        for bad in (
            b"c=biws,r=abcS",
            b"c=biws,r=abcX,p=AAAA",
            b"c=eSws,r=abcS,p=AAAA",
            b"c=biws,r=abcS,p=!!",
            b"r=abcS,c=biws,p=AAAA",
        ):
            mechanism = ScramSHA256(self.store, nonce=b"S")
            resultOf(mechanism.respond(b"n,,n=alice,r=abc"))
            self.assertRaises(MechanismError, mechanism.respond, bad)

    def test_noMoreAfterFinal(self) -> None:
        """
        Nothing is taken after the client-final-message.
        """
        mechanism, _, _ = self.exchange("alice", "wonderland")
        self.assertRaises(MechanismError, mechanism.respond, b"")

    def test_lookupWaits(self) -> None:
        """
        The server-first-message waits for the store's answer.
        """
        self.store.pending = []
        mechanism = ScramSHA256(self.store, nonce=b"S")
        d = mechanism.respond(b"n,,n=alice,r=abc")
        assert isinstance(d, Deferred)
        results: list[object] = []
        d.addCallback(results.append)
        self.assertEqual(results, [])
        self.store.pending[0].callback(scramSecrets(b"x", b"s", 4096))
        self.assertEqual(results, [b"r=abcS,s=cw==,i=4096"])

    def test_shortProof(self) -> None:
        """
        A proof of the wrong length never checks.
        """
        credentials = ScramCredentials(b"alice", b"message", b"short")
        self.assertFalse(credentials.checkProof(b"k" * 32))


class CramMD5Tests(SynchronousTestCase):
    """
    Tests for L{CramMD5} (RFC 2195) and L{CramMD5Credentials}.
    """

    def test_challenge(self) -> None:
        """
        The challenge is C{<random.counter.timestamp@hostname>}, unique.
        """
        mechanism = CramMD5("relay.example.org", 1700000000.5)
        self.assertIs(MECHANISMS["CRAM-MD5"], CramMD5)
        self.assertRegex(
            mechanism.challenge(),
            rb"\A<[0-9]+\.[0-9]+\.1700000000@relay\.example\.org>\Z",
        )
        self.assertNotEqual(
            mechanism.challenge(),
            CramMD5("relay.example.org", 1700000000.5).challenge(),
        )

    def test_rfc2195(self) -> None:
        """
        The response of RFC 2195's example checks against the password and
        against its stored state; a wrong one against neither.
        """
        challenge = b"<1896.697170952@postoffice.reston.mci.net>"
        credentials = CramMD5Credentials(
            b"tim", challenge, bytes.fromhex("b913a602c7eda7a495b4e6e7334d3890")
        )
        self.assertTrue(verifyObject(ICramMD5Credentials, credentials))
        self.assertTrue(verifyObject(IUsernameHashedPassword, credentials))
        self.assertTrue(credentials.checkPassword(b"tanstaaftanstaaf"))
        self.assertTrue(credentials.checkPassword("tanstaaftanstaaf"))
        self.assertTrue(credentials.checkCramState(cramMD5State(b"tanstaaftanstaaf")))
        self.assertFalse(credentials.checkPassword(b"tanstaaf"))
        self.assertFalse(credentials.checkCramState(cramMD5State(b"tanstaaf")))
        self.assertFalse(credentials.checkCramState(b"short"))

    def test_response(self) -> None:
        """
        The response is the user name (everything before the last space)
        and 32 hex digits, either case.
        """
        mechanism = CramMD5("relay.test", 0)
        digest = hmac.digest(b"secret", mechanism.challenge(), "md5").hex()
        credentials = mechanism.respond(b"alice smith " + digest.upper().encode())
        self.assertEqual(credentials.username, b"alice smith")
        self.assertTrue(credentials.checkPassword(b"secret"))
        self.assertIsNone(mechanism.finalChallenge())

    def test_malformed(self) -> None:
        """
        A response without a user name or without a 32-hex-digit digest is
        malformed.
        """
        for bad in (
            b"",
            b"alice",
            b" " + b"0" * 32,
            b"alice " + b"0" * 31,
            b"alice " + b"g" * 32,
        ):
            self.assertRaises(MechanismError, CramMD5("relay.test", 0).respond, bad)
