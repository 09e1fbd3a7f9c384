"""
An OAuth2 authorization server for the tests (twisted.web): the token
endpoint and the device authorization endpoint, and the access tokens that
the test upstreams accept.

  - L{TokenIssuer} makes access tokens (HMAC-signed, with an expiry, so an
    upstream in another thread or process can check them with the same
    key) and revokes them.
  - L{TokenEndpoint} speaks RFC 6749 / 8628 at C{.../token} and
    C{.../devicecode}: the client-credentials grant with a client secret or
    with a JWT client assertion (RFC 7523) whose RS256 signature it checks
    with the registered certificate (and whose C{x5t}, audience, issuer,
    subject, lifetime and C{jti} it checks too), the refresh-token grant
    with rotation, and the device-code grant with C{authorization_pending}
    and C{slow_down}.  It records each request; L{TokenEndpoint.failWith}
    makes it answer errors, L{TokenEndpoint.hold} makes it slow.
  - C{python -m tests.tokenendpoint CONFIG.json} runs one on a port, for the
    end-to-end tests (the relay is another process).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    """
    Access tokens: C{PAYLOAD.SIGNATURE}, the payload naming the mailbox and
    the expiry, signed with HMAC-SHA256 under C{key}.
    """

    def __init__(self, key: bytes, clock: Any = None) -> None:
        """
        @param clock: its C{seconds()} is the time (default: the wall
            clock).
        """
        self.key = key
        self.clock = clock
        self.revoked: set[str] = set()
        self.issued: list[str] = []

    def now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def issue(self, subject: str, lifetime: float) -> str:
        payload = _b64url(
            json.dumps(
                {
                    "sub": subject,
                    "exp": self.now() + lifetime,
                    "n": secrets.token_hex(8),
                }
            ).encode()
        )
        signature = hmac.new(self.key, payload.encode(), hashlib.sha256).digest()
        token = payload + "." + _b64url(signature)
        self.issued.append(token)
        return token

    def check(self, token: str, subject: str) -> bool:
        """
        Whether C{token} is one of ours, for C{subject}, unexpired and not
        revoked.
        """
        payload, _, signature = token.partition(".")
        expected = hmac.new(self.key, payload.encode(), hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(_unb64url(signature), expected):
                return False
            claims = json.loads(_unb64url(payload))
        except ValueError:
            return False
        return (
            claims.get("sub") == subject
            and claims.get("exp", 0) > self.now()
            and token not in self.revoked
        )

    def revokeAll(self) -> None:
        """
        Revoke every token issued so far.
        """
        self.revoked.update(self.issued)


def makeAssertionCertificate(directory: str) -> tuple[str, str, x509.Certificate]:
    """
    An RSA key and a self-signed certificate, as registered with an
    application for client assertions.

    @return: the paths of the certificate and the key (PEM), and the
        certificate.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtpauth-relay app")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    certificatePath = os.path.join(directory, "app.crt")
    keyPath = os.path.join(directory, "app.key")
    with open(certificatePath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(os.open(keyPath, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certificatePath, keyPath, certificate


@dataclass
class Device:
    """
    One device authorization: approved after C{approveAfter} polls;
    C{slowDownAt} polls get C{slow_down}.
    """

    userCode: str
    approveAfter: int = 2
    slowDownAt: tuple[int, ...] = ()
    polls: int = 0
    pollTimes: list[float] = field(default_factory=list)
    done: bool = False


class TokenEndpoint(Resource):
    """
    The authorization server; see the module docstring.

    @ivar requests: C{(path, fields)} of every request, in order.
    @ivar refreshToken: the refresh token now valid (rotated on each use
        when C{rotate}).
    """

    isLeaf = True

    def __init__(
        self,
        issuer: TokenIssuer,
        clientId: str,
        subject: str,
        clientSecret: str | None = None,
        certificate: x509.Certificate | None = None,
        audience: str = "",
        refreshToken: str | None = None,
        rotate: bool = True,
        expiresIn: int = 3600,
        scope: str | None = None,
        approveAfter: int = 2,
        slowDownAt: tuple[int, ...] = (),
        interval: int = 5,
    ) -> None:
        """
        @param subject: the mailbox tokens are for.
        @param clientSecret: the secret a confidential client must send.
        @param certificate: the certificate a client assertion must be
            signed for.
        @param audience: the C{aud} a client assertion must name (the token
            endpoint's URL).
        @param scope: the scope a request must ask for, if any.
        """
        super().__init__()
        self.issuer = issuer
        self.clientId = clientId
        self.subject = subject
        self.clientSecret = clientSecret
        self.certificate = certificate
        self.audience = audience
        self.refreshToken = refreshToken
        self.rotate = rotate
        self.expiresIn = expiresIn
        self.scope = scope
        self.approveAfter = approveAfter
        self.slowDownAt = slowDownAt
        self.interval = interval
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.failure: tuple[int, dict[str, str]] | None = None
        self.held: list[Callable[[], None]] | None = None
        self.devices: dict[str, Device] = {}
        self.seenAssertions: set[str] = set()
        self.onRequest: Callable[[str, dict[str, str]], None] | None = None

    # -- steering -------------------------------------------------------------

    def failWith(self, code: int = 503, **body: str) -> None:
        """
        Answer every request with C{code} and the JSON C{body} (default:
        C{temporarily_unavailable}) until L{recover}.
        """
        self.failure = (code, body or {"error": "temporarily_unavailable"})

    def recover(self) -> None:
        self.failure = None

    def hold(self) -> None:
        """
        Answer nothing until L{release}.
        """
        self.held = []

    def release(self) -> None:
        held, self.held = self.held or [], None
        for answer in held:
            answer()

    def grants(self, grantType: str | None = None) -> list[dict[str, str]]:
        """
        The fields of each token request (of C{grantType}).
        """
        return [
            f
            for path, f in self.requests
            if path.endswith("/token") and grantType in (None, f.get("grant_type"))
        ]

    # -- HTTP -----------------------------------------------------------------

    def render_POST(self, request: Request) -> bytes | int:
        path = request.path.decode()
        fields = {
            k.decode(): v[0].decode() for k, v in (request.args or {}).items() if v
        }
        self.requests.append((path, fields))
        if self.onRequest is not None:
            self.onRequest(path, fields)
        if self.failure is not None:
            code, body = self.failure
        elif path.endswith("/devicecode"):
            code, body = self.deviceAuthorization(fields)
        else:
            code, body = self.token(fields)
        data = json.dumps(body).encode()

        def headers() -> None:
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(data))

        def answer() -> None:
            headers()
            request.write(data)
            request.finish()

        if self.held is not None:
            self.held.append(answer)
            return NOT_DONE_YET
        headers()
        return data

    def deviceAuthorization(self, fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if fields.get("client_id") != self.clientId:
            return 400, {"error": "invalid_client"}
        deviceCode = secrets.token_urlsafe(24)
        userCode = "WDJB-MJHT"
        self.devices[deviceCode] = Device(
            userCode, approveAfter=self.approveAfter, slowDownAt=self.slowDownAt
        )
        return 200, {
            "device_code": deviceCode,
            "user_code": userCode,
            "verification_uri": "https://login.example.test/device",
            "expires_in": 900,
            "interval": self.interval,
            "message": f"To sign in, open https://login.example.test/device and "
            f"enter the code {userCode}.",
        }

    def token(self, fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
        problem = self.checkClient(fields)
        if problem is not None:
            return 401, {"error": "invalid_client", "error_description": problem}
        if self.scope is not None and fields.get("scope") != self.scope:
            return 400, {"error": "invalid_scope"}
        grant = fields.get("grant_type")
        if grant == "client_credentials":
            if self.clientSecret is None and self.certificate is None:
                return 400, {"error": "unauthorized_client"}
            return 200, self.issue(refresh=False)
        if grant == "refresh_token":
            if (
                self.refreshToken is None
                or fields.get("refresh_token") != self.refreshToken
            ):
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "AADSTS70000: the refresh token was revoked",
                }
            return 200, self.issue(refresh=self.rotate)
        if grant == DEVICE_GRANT:
            device = self.devices.get(fields.get("device_code", ""))
            if device is None or device.done:
                return 400, {"error": "expired_token"}
            device.polls += 1
            device.pollTimes.append(self.issuer.now())
            if device.polls in device.slowDownAt:
                return 400, {"error": "slow_down"}
            if device.polls < device.approveAfter:
                return 400, {"error": "authorization_pending"}
            device.done = True
            return 200, self.issue(refresh=True)
        return 400, {"error": "unsupported_grant_type"}

    def issue(self, refresh: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": self.expiresIn,
            "access_token": self.issuer.issue(self.subject, self.expiresIn),
        }
        if refresh:
            self.refreshToken = "rt-" + secrets.token_urlsafe(24)
            body["refresh_token"] = self.refreshToken
        return body

    def checkClient(self, fields: dict[str, str]) -> str | None:
        """
        @return: why the client is not authenticated, or C{None}.
        """
        if fields.get("client_id") != self.clientId:
            return "unknown client_id"
        if self.clientSecret is not None:
            if fields.get("client_secret") != self.clientSecret:
                return "wrong client secret"
            return None
        if self.certificate is not None:
            if fields.get("client_assertion_type") != ASSERTION_TYPE:
                return "no client assertion"
            return self.checkAssertion(fields.get("client_assertion", ""))
        return None

    def checkAssertion(self, assertion: str) -> str | None:
        """
        Check a JWT client assertion against the registered certificate.
        """
        assert self.certificate is not None
        try:
            headerPart, claimsPart, signaturePart = assertion.split(".")
            header = json.loads(_unb64url(headerPart))
            claims = json.loads(_unb64url(claimsPart))
            signature = _unb64url(signaturePart)
        except ValueError:
            return "malformed assertion"
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        if header.get("alg") != "RS256":
            return "not RS256"
        if header.get("x5t") != _b64url(hashlib.sha1(der).digest()):
            return "x5t does not name the certificate"
        if header.get("x5t#S256") != _b64url(hashlib.sha256(der).digest()):
            return "x5t#S256 does not name the certificate"
        key = self.certificate.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            key.verify(
                signature,
                (headerPart + "." + claimsPart).encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return "bad signature"
        now = self.issuer.now()
        if claims.get("aud") != self.audience:
            return "wrong audience"
        if claims.get("iss") != self.clientId or claims.get("sub") != self.clientId:
            return "wrong issuer or subject"
        if not claims.get("nbf", now + 1) <= now + 60 < claims.get("exp", 0) + 60:
            return "not valid now"
        if claims.get("exp", 0) - claims.get("nbf", 0) > 600:
            return "valid too long"
        jti = claims.get("jti")
        if not jti or jti in self.seenAssertions:
            return "jti missing or replayed"
        self.seenAssertions.add(jti)
        return None


# -- a process of its own ---------------------------------------------------------


def main(argv: list[str]) -> None:
    """
    C{python -m tests.tokenendpoint CONFIG.json}: serve a L{TokenEndpoint} on
    127.0.0.1, at the port and with the settings of the JSON file; each
    request's grant type is appended to C{requestLog} (one per line).
    """
    from twisted.internet import reactor
    from twisted.web.server import Site

    with open(argv[0]) as f:
        config = json.load(f)
    issuer = TokenIssuer(config["key"].encode())
    endpoint = TokenEndpoint(
        issuer,
        config["clientId"],
        config["subject"],
        clientSecret=config.get("clientSecret"),
        expiresIn=config.get("expiresIn", 3600),
    )

    def record(path: str, fields: dict[str, str]) -> None:
        with open(config["requestLog"], "a") as f:
            f.write(f"{path} {fields.get('grant_type')}\n")

    endpoint.onRequest = record
    reactor.listenTCP(  # type: ignore[attr-defined]
        config["port"], Site(endpoint), interface="127.0.0.1"
    )
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
