"""
Tests for L{smtpauth_relay.oauth2} (the token client), the XOAUTH2 /
OAUTHBEARER login of the delivery client and its pool, and
L{smtpauth_relay.oauth2admin} (the device-code flow): against the token
endpoint of L{tests.tokenendpoint} (through treq's in-memory StubTreq) and
the in-memory upstream of L{tests.fakeupstream}, on a L{Clock}.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import stat
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.delivery.client import (
    ClientSettings,
    Outbound,
    RelayClientFactory,
    UpstreamError,
)
from smtpauth_relay.delivery.pool import ConnectionPool
from smtpauth_relay.envelope import Envelope
from smtpauth_relay.oauth2 import (
    OAuth2Settings,
    TokenClient,
    TokenError,
    checkTokenEndpoint,
    defaultScope,
    deviceAuthorizationEndpoint,
    oauthbearerResponse,
    renewalDelay,
    writeSecretFile,
    xoauth2Response,
)
from smtpauth_relay.oauth2admin import AuthorizationFailed, authorize
from smtpauth_relay.oauth2admin import main as oauth2Main
from tests.fakeupstream import FakeTLSContext, MemoryConnector, UpstreamScript
from tests.tokenendpoint import TokenEndpoint, TokenIssuer, makeAssertionCertificate

ENDPOINT = "https://login.example.test/tenant/oauth2/v2.0/token"
MAILBOX = "relay@example.org"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SECRET = "client-secret-Zq8~very-secret"


def writeFile(path: str, text: str) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text + "\n")
    return path


class DeadHTTP:
    """
    An HTTP client whose every request is refused.
    """

    def __init__(self) -> None:
        self.requests = 0

    def post(self, url: str, **kw: Any) -> Deferred[Any]:
        self.requests += 1
        return fail(ConnectionRefusedError("token endpoint down"))


class SASLTests(SynchronousTestCase):
    def test_xoauth2(self) -> None:
        """
        The XOAUTH2 response is C{user=U^Aauth=Bearer T^A^A}.
        """
        self.assertEqual(
            xoauth2Response("relay@example.org", "tok"),
            b"user=relay@example.org\x01auth=Bearer tok\x01\x01",
        )

    def test_oauthbearer(self) -> None:
        """
        The OAUTHBEARER response (RFC 7628) has the GS2 header with the
        authzid (C{,} and C{=} escaped), host, port and the bearer token.
        """
        self.assertEqual(
            oauthbearerResponse("a,b=c@example.org", "tok", "smtp.example", 587),
            b"n,a=a=2Cb=3Dc@example.org,\x01host=smtp.example\x01port=587\x01"
            b"auth=Bearer tok\x01\x01",
        )


class HelperTests(SynchronousTestCase):
    def test_tokenEndpointMustBeHTTPS(self) -> None:
        """
        The token endpoint must be https; plain http only on loopback.
        """
        self.assertIsNone(checkTokenEndpoint(ENDPOINT))
        self.assertIsNone(checkTokenEndpoint("http://127.0.0.1:8080/token"))
        self.assertIsNone(checkTokenEndpoint("http://[::1]:8080/token"))
        self.assertIn(
            "not https", checkTokenEndpoint("http://login.example/token") or ""
        )
        self.assertIn("not https", checkTokenEndpoint("http://10.0.0.1/token") or "")
        self.assertIsNotNone(checkTokenEndpoint("ftp://login.example/token"))
        self.assertIsNotNone(checkTokenEndpoint("login.example/token"))
        self.assertRaises(
            ValueError,
            TokenClient,
            OAuth2Settings("http://login.example/t", CLIENT_ID, MAILBOX),
            Clock(),
            DeadHTTP(),
        )

    def test_defaultScope(self) -> None:
        """
        The scope defaults to what Microsoft 365 (app-only or delegated) or
        Google wants for SMTP, and to none for other endpoints.
        """
        microsoft = "https://login.microsoftonline.com/contoso/oauth2/v2.0/token"
        self.assertEqual(
            defaultScope(microsoft, False), "https://outlook.office365.com/.default"
        )
        self.assertEqual(
            defaultScope(microsoft, True),
            "https://outlook.office.com/SMTP.Send offline_access",
        )
        self.assertEqual(
            defaultScope("https://oauth2.googleapis.com/token", True),
            "https://mail.google.com/",
        )
        self.assertEqual(defaultScope(ENDPOINT, True), "")

    def test_deviceEndpoint(self) -> None:
        """
        The device authorization endpoint is derived for Microsoft and
        Google, taken from the settings when given, else unknown.
        """
        microsoft = "https://login.microsoftonline.com/contoso/oauth2/v2.0/token"
        self.assertEqual(
            deviceAuthorizationEndpoint(OAuth2Settings(microsoft, "c", "u")),
            "https://login.microsoftonline.com/contoso/oauth2/v2.0/devicecode",
        )
        self.assertEqual(
            deviceAuthorizationEndpoint(
                OAuth2Settings("https://oauth2.googleapis.com/token", "c", "u")
            ),
            "https://oauth2.googleapis.com/device/code",
        )
        self.assertIsNone(
            deviceAuthorizationEndpoint(OAuth2Settings(ENDPOINT, "c", "u"))
        )
        self.assertEqual(
            deviceAuthorizationEndpoint(
                OAuth2Settings(
                    ENDPOINT, "c", "u", deviceAuthorizationEndpoint="https://x/dev"
                )
            ),
            "https://x/dev",
        )

    def test_renewalDelay(self) -> None:
        """
        A token is renewed at 80% of its life or 5 minutes before its end,
        whichever is first, but not before half of it.
        """
        self.assertEqual(renewalDelay(3600), 2880)
        self.assertEqual(renewalDelay(600), 300)
        self.assertEqual(renewalDelay(60), 30)

    def test_writeSecretFile(self) -> None:
        """
        A secret is replaced by a new file (a new inode) of mode 0600,
        holding the secret and a newline, with no temporary file left.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "refresh-token")
        with open(path, "w") as f:
            f.write("old\n")
        os.chmod(path, 0o644)
        before = os.stat(path).st_ino
        writeSecretFile(path, "new-token")
        with open(path) as f:
            self.assertEqual(f.read(), "new-token\n")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertNotEqual(os.stat(path).st_ino, before)
        self.assertEqual(os.listdir(directory), ["refresh-token"])


class TokenClientTestCase(SynchronousTestCase):
    """
    A token endpoint and a token client on one clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.issuer = TokenIssuer(b"upstream key", self.clock)
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.secretFile = writeFile(os.path.join(self.directory, "secret"), SECRET)
        self.endpoint = TokenEndpoint(
            self.issuer, CLIENT_ID, MAILBOX, clientSecret=SECRET, audience=ENDPOINT
        )
        self.http = StubTreq(self.endpoint)

    def client(self, **settings: Any) -> TokenClient:
        options: dict[str, Any] = dict(
            tokenEndpoint=ENDPOINT,
            clientId=CLIENT_ID,
            username=MAILBOX,
            clientSecretFile=self.secretFile,
        )
        options.update(settings)
        return TokenClient(OAuth2Settings(**options), self.clock, self.http)


class TokenClientTests(TokenClientTestCase):
    def test_clientCredentials(self) -> None:
        """
        Without a refresh token file the client-credentials grant is used,
        with the client id, the secret from its file and the scope; the
        token it returns is valid.
        """
        client = self.client(scope="https://outlook.office365.com/.default")
        token = self.successResultOf(client.getToken())
        self.assertTrue(self.issuer.check(token, MAILBOX))
        (fields,) = self.endpoint.grants()
        self.assertEqual(
            fields,
            {
                "grant_type": "client_credentials",
                "client_id": CLIENT_ID,
                "client_secret": SECRET,
                "scope": "https://outlook.office365.com/.default",
            },
        )

    def test_cached(self) -> None:
        """
        A token is fetched once and reused while it is fresh.
        """
        client = self.client()
        first = self.successResultOf(client.getToken())
        self.clock.advance(1000)
        self.assertEqual(self.successResultOf(client.getToken()), first)
        self.assertEqual(len(self.endpoint.grants()), 1)

    def test_renewedBeforeExpiry(self) -> None:
        """
        A token is renewed at 80% of its lifetime (for an hour's token,
        after 48 minutes), while it is still valid.
        """
        client = self.client()
        first = self.successResultOf(client.getToken())
        self.clock.advance(2879)
        self.assertEqual(self.successResultOf(client.getToken()), first)
        self.clock.advance(1)
        second = self.successResultOf(client.getToken())
        self.assertNotEqual(second, first)
        self.assertTrue(self.issuer.check(first, MAILBOX))
        self.assertEqual(len(self.endpoint.grants()), 2)

    def test_oneRequestForConcurrentCallers(self) -> None:
        """
        Callers that ask while a request is under way share it.
        """
        self.endpoint.hold()
        client = self.client()
        waiting = [client.getToken() for _ in range(5)]
        self.http.flush()
        self.assertNoResult(waiting[0])
        self.endpoint.release()
        self.http.flush()
        tokens = {self.successResultOf(d) for d in waiting}
        self.assertEqual(len(tokens), 1)
        self.assertEqual(len(self.endpoint.grants()), 1)

    def test_invalidate(self) -> None:
        """
        A token the upstream refused is dropped: the next caller gets a new
        one.  Dropping an older token keeps the current one.
        """
        client = self.client()
        first = self.successResultOf(client.getToken())
        client.invalidate(first)
        second = self.successResultOf(client.getToken())
        self.assertNotEqual(first, second)
        client.invalidate(first)
        self.assertEqual(self.successResultOf(client.getToken()), second)
        self.assertEqual(len(self.endpoint.grants()), 2)

    def test_refreshTokenRotated(self) -> None:
        """
        With a refresh token file the refresh-token grant is used; a new
        refresh token in the answer replaces the file's (mode 0600) and is
        the one used next time (the endpoint refuses the old one).
        """
        self.endpoint.refreshToken = "rt-original"
        refreshFile = writeFile(os.path.join(self.directory, "refresh"), "rt-original")
        self.endpoint.clientSecret = None
        client = self.client(refreshTokenFile=refreshFile, clientSecretFile=None)
        self.successResultOf(client.getToken())
        (fields,) = self.endpoint.grants()
        self.assertEqual(fields["grant_type"], "refresh_token")
        self.assertEqual(fields["refresh_token"], "rt-original")
        self.assertNotIn("client_secret", fields)
        with open(refreshFile) as f:
            stored = f.read().strip()
        self.assertEqual(stored, self.endpoint.refreshToken)
        self.assertNotEqual(stored, "rt-original")
        self.assertEqual(stat.S_IMODE(os.stat(refreshFile).st_mode), 0o600)
        self.clock.advance(3000)
        self.successResultOf(client.getToken())
        self.assertEqual(self.endpoint.grants()[1]["refresh_token"], stored)

    def test_refreshTokenNotRotated(self) -> None:
        """
        An answer without a new refresh token leaves the file alone.
        """
        self.endpoint.refreshToken = "rt-kept"
        self.endpoint.rotate = False
        refreshFile = writeFile(os.path.join(self.directory, "refresh"), "rt-kept")
        before = os.stat(refreshFile).st_ino
        client = self.client(refreshTokenFile=refreshFile)
        self.successResultOf(client.getToken())
        self.assertEqual(os.stat(refreshFile).st_ino, before)

    def test_missingRefreshToken(self) -> None:
        """
        Without the refresh token file, the failure says to run the
        authorize command.
        """
        client = self.client(refreshTokenFile=os.path.join(self.directory, "missing"))
        failure = self.failureResultOf(client.getToken(), TokenError)
        self.assertIn("oauth2 authorize", str(failure.value))
        self.assertEqual(self.endpoint.requests, [])

    def test_clientAssertion(self) -> None:
        """
        With a certificate and key the client authenticates with a JWT
        client assertion that the endpoint verifies (signature, thumbprint,
        audience, issuer, subject, lifetime); each request has a new one.
        """
        certificate, key, parsed = makeAssertionCertificate(self.directory)
        self.endpoint.clientSecret = None
        self.endpoint.certificate = parsed
        client = self.client(
            clientSecretFile=None, certificate=certificate, privateKey=key
        )
        first = self.successResultOf(client.getToken())
        self.assertTrue(self.issuer.check(first, MAILBOX))
        client.invalidate(first)
        self.successResultOf(client.getToken())
        assertions = [f["client_assertion"] for f in self.endpoint.grants()]
        self.assertEqual(len(set(assertions)), 2)
        header = json.loads(
            base64.urlsafe_b64decode(assertions[0].split(".")[0] + "==")
        )
        self.assertEqual(header["alg"], "RS256")
        self.assertIn("x5t", header)

    def test_clientAssertionWrongKey(self) -> None:
        """
        An assertion signed for another certificate is refused by the
        endpoint (so the test endpoint really checks), and the client fails
        with the endpoint's error code.
        """
        certificate, key, _ = makeAssertionCertificate(self.directory)
        other = os.path.join(self.directory, "other")
        os.mkdir(other)
        _, _, registered = makeAssertionCertificate(other)
        self.endpoint.clientSecret = None
        self.endpoint.certificate = registered
        client = self.client(
            clientSecretFile=None, certificate=certificate, privateKey=key
        )
        failure = self.failureResultOf(client.getToken(), TokenError)
        self.assertIn("invalid_client", str(failure.value))

    def test_endpointError(self) -> None:
        """
        An error answer fails the request with its error code and
        description, and never the secret.
        """
        self.endpoint.clientSecret = "another secret"
        failure = self.failureResultOf(self.client().getToken(), TokenError)
        self.assertIn(
            "HTTP 401: invalid_client (wrong client secret)", str(failure.value)
        )
        self.assertNotIn(SECRET, str(failure.value))

    def test_endpointDown(self) -> None:
        """
        An endpoint that cannot be reached fails the request.
        """
        client = TokenClient(
            OAuth2Settings(
                ENDPOINT, CLIENT_ID, MAILBOX, clientSecretFile=self.secretFile
            ),
            self.clock,
            DeadHTTP(),
        )
        failure = self.failureResultOf(client.getToken(), TokenError)
        self.assertIn("cannot be reached", str(failure.value))

    def test_endpointSlow(self) -> None:
        """
        A request that takes longer than the timeout fails.
        """
        self.endpoint.hold()
        client = self.client()
        d = client.getToken()
        self.clock.advance(client.timeout)
        failure = self.failureResultOf(d, TokenError)
        self.assertIn("timed out", str(failure.value))

    def test_renewalFailsWhileValid(self) -> None:
        """
        When renewal fails but the current token is still valid, it is used
        (and renewal tried again next time).
        """
        client = self.client()
        first = self.successResultOf(client.getToken())
        self.clock.advance(3000)
        self.endpoint.failWith()
        self.assertEqual(self.successResultOf(client.getToken()), first)
        self.endpoint.recover()
        self.assertNotEqual(self.successResultOf(client.getToken()), first)


class OAuthDeliveryTestCase(TokenClientTestCase):
    """
    The delivery pool logging in with tokens at an in-memory upstream.
    """

    mechanism = "XOAUTH2"

    def setUp(self) -> None:
        super().setUp()
        self.script = UpstreamScript(
            extensions=[b"SIZE 10000000", b"8BITMIME", b"AUTH XOAUTH2 OAUTHBEARER"],
            tls=True,
            tokens=self.issuer,
            oauthUser=MAILBOX,
        )
        self.connector = MemoryConnector(self.script)
        self.tokens = self.client()

    def pool(self, **settings: Any) -> ConnectionPool:
        options: dict[str, Any] = dict(
            heloName="relay.example.org",
            host="smtp.example.test",
            username=MAILBOX,
            startTLS=FakeTLSContext(),
            requireTLS=True,
            mechanism=self.mechanism,
            port=587,
        )
        options.update(settings)
        return ConnectionPool(
            RelayClientFactory(ClientSettings(**options)),
            self.connector,
            self.clock,
            tokens=self.tokens,
        )

    def send(self, pool: ConnectionPool, queueId: str = "Q1") -> Deferred[Any]:
        path = os.path.join(self.directory, queueId)
        with open(path, "wb") as f:
            f.write(b"Subject: hi\n\nhello\n")
        envelope = Envelope(
            queueId=queueId, sender="alice@example.org", recipients=("bob@example.net",)
        )
        return pool.send(Outbound(envelope, path))

    def flush(self) -> None:
        for _ in range(20):
            self.http.flush()
            self.connector.flush()

    def authCommands(self) -> list[bytes]:
        return [c for c in self.script.commands if c.startswith(b"AUTH")]


class OAuthDeliveryTests(OAuthDeliveryTestCase):
    def test_delivered(self) -> None:
        """
        The client starts TLS, logs in with XOAUTH2 and a fresh token, and
        the message is delivered.
        """
        d = self.send(self.pool())
        self.flush()
        self.assertEqual(self.successResultOf(d).delivered, ("bob@example.net",))
        self.assertEqual(self.script.commands[1], b"STARTTLS")
        (auth,) = self.authCommands()
        self.assertTrue(auth.startswith(b"AUTH XOAUTH2 "))
        self.assertEqual(self.script.authReplies, [b"235 2.7.0 Accepted"])

    def test_oauthbearer(self) -> None:
        """
        With OAUTHBEARER the client logs in with RFC 7628's response.
        """
        d = self.send(self.pool(mechanism="OAUTHBEARER"))
        self.flush()
        self.successResultOf(d)
        (auth,) = self.authCommands()
        response = base64.b64decode(auth.split()[2])
        self.assertTrue(response.startswith(b"n,a=relay@example.org,\x01host="))

    def test_tokenReusedAcrossConnections(self) -> None:
        """
        Several connections share the cached token: one request.
        """
        pool = self.pool()
        first = self.send(pool, "Q1")
        second = self.send(pool, "Q2")
        self.flush()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.script.connections, 2)
        self.assertEqual(len(self.endpoint.grants()), 1)

    def test_renewedToken(self) -> None:
        """
        A connection opened after the token's renewal time logs in with a
        new token, and the upstream takes it.
        """
        pool = self.pool()
        first = self.send(pool, "Q1")
        self.flush()
        self.successResultOf(first)
        self.clock.advance(pool.linger)
        self.flush()
        self.clock.advance(2900)
        d = self.send(pool, "Q2")
        self.flush()
        self.successResultOf(d)
        self.assertEqual(len(self.endpoint.grants()), 2)
        first, second = (base64.b64decode(a.split()[2]) for a in self.authCommands())
        self.assertNotEqual(first, second)

    def test_revokedToken(self) -> None:
        """
        The upstream refuses a revoked token with 535: the token is dropped,
        a new one fetched, and the login tried once more on a new
        connection; the message is delivered.
        """
        pool = self.pool()
        self.successResultOf(self.tokens.getToken())
        self.issuer.revokeAll()
        d = self.send(pool)
        self.flush()
        self.assertEqual(self.successResultOf(d).delivered, ("bob@example.net",))
        self.assertEqual(len(self.endpoint.grants()), 2)
        self.assertEqual(len(self.authCommands()), 2)
        self.assertEqual(self.script.connections, 2)
        self.assertEqual(
            self.script.authReplies[0], b"535 5.7.3 Authentication unsuccessful"
        )

    def test_revokedTokenErrorChallenge(self) -> None:
        """
        An error challenge (334 with base64 JSON) is answered with an empty
        response for XOAUTH2; the login then fails and is retried with a
        new token.
        """
        self.script.errorChallenge = True
        pool = self.pool()
        self.successResultOf(self.tokens.getToken())
        self.issuer.revokeAll()
        d = self.send(pool)
        self.flush()
        self.successResultOf(d)
        self.assertEqual(self.script.finishResponses, [b""])
        self.assertEqual(len(self.endpoint.grants()), 2)

    def test_errorChallengeOAuthBearer(self) -> None:
        """
        For OAUTHBEARER the error challenge is answered with a lone ^A
        (RFC 7628 section 3.2.3).
        """
        self.script.errorChallenge = True
        pool = self.pool(mechanism="OAUTHBEARER")
        self.successResultOf(self.tokens.getToken())
        self.issuer.revokeAll()
        d = self.send(pool)
        self.flush()
        self.successResultOf(d)
        self.assertEqual(self.script.finishResponses, [base64.b64encode(b"\x01")])

    def test_newTokenRefusedToo(self) -> None:
        """
        If the new token is refused as well, the message fails temporarily
        and deliveries are held: two logins, not one per message.
        """
        self.script.oauthUser = "someone-else@example.org"
        pool = self.pool()
        d = self.send(pool)
        self.flush()
        self.failureResultOf(d, UpstreamError)
        self.assertEqual(len(self.authCommands()), 2)
        held = self.send(pool, "Q2")
        self.assertIn("credentials", str(self.failureResultOf(held).value))
        self.assertEqual(len(self.authCommands()), 2)

    def test_endpointDownKeepsMailQueued(self) -> None:
        """
        While the token endpoint fails, the message fails temporarily
        (retried by the queue) without a connection to the upstream; once
        it answers again, the message is delivered.
        """
        self.endpoint.failWith(503)
        pool = self.pool()
        d = self.send(pool)
        self.flush()
        failure = self.failureResultOf(d, UpstreamError)
        self.assertIn("no OAuth2 token", str(failure.value))
        self.assertEqual(self.script.connections, 0)
        self.endpoint.recover()
        again = self.send(pool, "Q2")
        self.flush()
        self.assertEqual(self.successResultOf(again).delivered, ("bob@example.net",))

    def test_noTokenWithoutTLS(self) -> None:
        """
        An upstream that offers no STARTTLS never sees AUTH (or a token).
        """
        self.script.tls = False
        d = self.send(self.pool())
        self.flush()
        self.failureResultOf(d, UpstreamError)
        self.assertEqual(self.authCommands(), [])

    def test_mechanismNotOffered(self) -> None:
        """
        An upstream that does not offer the mechanism fails the message
        without AUTH.
        """
        self.script.extensions = [b"AUTH PLAIN LOGIN"]
        d = self.send(self.pool())
        self.flush()
        self.failureResultOf(d, UpstreamError)
        self.assertEqual(self.authCommands(), [])

    def test_noTokenInClientLineLog(self) -> None:
        """
        The client keeps no line log (Twisted's would hold the AUTH line,
        and its exceptions print it).
        """
        pool = self.pool()
        d = self.send(pool)
        self.flush()
        self.successResultOf(d)
        token = self.successResultOf(self.tokens.getToken())
        client = next(iter(pool.clients), None)
        if client is not None:
            self.assertNotIn(token.encode(), client.log.str())
        self.assertFalse(ClientSettings.__dataclass_fields__["token"].repr)


class NoSecretsInLogsTests(OAuthDeliveryTestCase):
    def test_noSecretInAnyLogEvent(self) -> None:
        """
        Through a whole flow (client secret, a revoked token, a refresh
        token rotated, a client assertion, an endpoint error), no log event
        holds a token, the client secret, a refresh token or an assertion.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        pool = self.pool()
        self.successResultOf(self.tokens.getToken())
        self.issuer.revokeAll()
        d = self.send(pool, "Q1")
        self.flush()
        self.successResultOf(d)

        self.endpoint.refreshToken = "rt-first-refresh-token"
        refreshFile = writeFile(
            os.path.join(self.directory, "refresh"), "rt-first-refresh-token"
        )
        self.tokens = self.client(refreshTokenFile=refreshFile)
        d = self.send(self.pool(), "Q2")
        self.flush()
        self.successResultOf(d)

        certificate, key, parsed = makeAssertionCertificate(self.directory)
        self.endpoint.clientSecret = None
        self.endpoint.certificate = parsed
        self.tokens = self.client(
            clientSecretFile=None, certificate=certificate, privateKey=key
        )
        d = self.send(self.pool(mechanism="OAUTHBEARER"), "Q3")
        self.flush()
        self.successResultOf(d)

        self.endpoint.failWith(400, error="invalid_grant")
        self.tokens = self.client(refreshTokenFile=refreshFile)
        self.failureResultOf(self.send(self.pool(), "Q4"))

        secrets = [SECRET, "rt-first-refresh-token", self.endpoint.refreshToken or ""]
        secrets += self.issuer.issued
        secrets += [
            f["client_assertion"]
            for f in self.endpoint.grants()
            if "client_assertion" in f
        ]
        secrets += [
            f["refresh_token"] for f in self.endpoint.grants() if "refresh_token" in f
        ]
        self.assertGreater(len(self.issuer.issued), 3)
        self.assertGreater(len(events), 5)
        for event in events:
            text = (formatEvent(event) or "") + repr(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += failure.getTraceback()
            for secret in secrets:
                self.assertNotIn(secret, text)
            # No fragment either (a token cut in two by a log line).
            for token in self.issuer.issued:
                self.assertNotIn(token[:20], text)


class DeviceFlowTests(TokenClientTestCase):
    def settings(self, **kw: Any) -> OAuth2Settings:
        options: dict[str, Any] = dict(
            tokenEndpoint=ENDPOINT,
            clientId=CLIENT_ID,
            username=MAILBOX,
            scope="https://outlook.office.com/SMTP.Send offline_access",
            refreshTokenFile=os.path.join(self.directory, "refresh-token"),
            deviceAuthorizationEndpoint="https://login.example.test/devicecode",
        )
        options.update(kw)
        return OAuth2Settings(**options)

    def runFlow(
        self, settings: OAuth2Settings, steps: int = 100
    ) -> tuple[Deferred[None], io.StringIO]:
        stdout = io.StringIO()
        d = Deferred.fromCoroutine(authorize(settings, self.http, self.clock, stdout))
        for _ in range(steps):
            if d.called:
                break
            self.clock.advance(1)
            self.http.flush()
        return d, stdout

    def test_deviceFlow(self) -> None:
        """
        The command shows the verification address and the user code,
        polls every C{interval} seconds until the sign-in is done, and
        stores the refresh token with mode 0600.
        """
        self.endpoint.clientSecret = None
        self.endpoint.approveAfter = 3
        settings = self.settings()
        d, stdout = self.runFlow(settings)
        self.successResultOf(d)
        output = stdout.getvalue()
        self.assertIn("https://login.example.test/device", output)
        self.assertIn("WDJB-MJHT", output)
        assert settings.refreshTokenFile is not None
        with open(settings.refreshTokenFile) as f:
            self.assertEqual(f.read(), self.endpoint.refreshToken + "\n")
        self.assertEqual(
            stat.S_IMODE(os.stat(settings.refreshTokenFile).st_mode), 0o600
        )
        self.assertNotIn(self.endpoint.refreshToken or "-", output)
        (device,) = self.endpoint.devices.values()
        self.assertEqual(device.polls, 3)
        gaps = [b - a for a, b in itertools.pairwise(device.pollTimes)]
        self.assertEqual(gaps, [5, 5])
        path, fields = self.endpoint.requests[0]
        self.assertEqual(path, "/devicecode")
        self.assertEqual(fields["scope"], settings.scope)

    def test_slowDown(self) -> None:
        """
        After C{slow_down} the client polls 5 seconds less often.
        """
        self.endpoint.clientSecret = None
        self.endpoint.approveAfter = 3
        self.endpoint.slowDownAt = (1,)
        d, _ = self.runFlow(self.settings())
        self.successResultOf(d)
        (device,) = self.endpoint.devices.values()
        gaps = [b - a for a, b in itertools.pairwise(device.pollTimes)]
        self.assertEqual(gaps, [10, 10])

    def test_clientSecretSent(self) -> None:
        """
        A confidential client (Google's) sends its secret with each poll.
        """
        d, _ = self.runFlow(self.settings(clientSecretFile=self.secretFile))
        self.successResultOf(d)
        polls = self.endpoint.grants("urn:ietf:params:oauth:grant-type:device_code")
        self.assertTrue(all(p["client_secret"] == SECRET for p in polls))

    def test_denied(self) -> None:
        """
        A refusal ends the flow with the endpoint's error, storing nothing.
        """
        self.endpoint.clientSecret = None
        settings = self.settings()
        stdout = io.StringIO()
        d = Deferred.fromCoroutine(authorize(settings, self.http, self.clock, stdout))
        self.endpoint.failWith(400, error="access_denied")
        self.clock.advance(5)
        failure = self.failureResultOf(d, AuthorizationFailed)
        self.assertIn("access_denied", str(failure.value))
        assert settings.refreshTokenFile is not None
        self.assertFalse(os.path.exists(settings.refreshTokenFile))

    def test_needsRefreshTokenFile(self) -> None:
        """
        An app-only setup (no refresh_token_file) needs no authorization.
        """
        d = Deferred.fromCoroutine(
            authorize(
                self.settings(refreshTokenFile=None),
                self.http,
                self.clock,
                io.StringIO(),
            )
        )
        self.assertIn("refresh_token_file", str(self.failureResultOf(d).value))

    def test_usage(self) -> None:
        """
        Without C{authorize --config PATH} the command prints its usage and
        exits 2; with a bad configuration, the problems and 1.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        self.assertEqual(oauth2Main([], stdout, stderr), 2)
        self.assertIn("usage", stderr.getvalue())
        self.assertEqual(oauth2Main(["authorize"], stdout, stderr), 2)
        self.assertEqual(oauth2Main(["--help"], stdout, stderr), 0)
        missing = os.path.join(self.directory, "missing.toml")
        stderr = io.StringIO()
        self.assertEqual(
            oauth2Main(["authorize", "--config", missing], stdout, stderr), 1
        )
        self.assertIn("cannot read", stderr.getvalue())
