# -*- test-case-name: tests.test_oauth2 -*-
"""
OAuth2 access tokens for the login at the smarthost (C{[delivery] auth =
"xoauth2"} or C{"oauthbearer"}), as Microsoft 365 and Google want it once
basic (password) SMTP AUTH is gone.

  - L{TokenClient} gets tokens from the token endpoint with treq: the
    client-credentials grant (app-only: a client secret, or a client
    assertion signed with a certificate's key, as Microsoft's app-only flow
    uses) or the refresh-token grant (delegated: a refresh token obtained
    once with C{smtpauth-relay oauth2 authorize}; a rotated one is written
    back atomically).  Tokens are cached and renewed ahead of expiry;
    concurrent deliveries share one request; a token the upstream refused
    is dropped with L{TokenClient.invalidate}.
  - L{xoauth2Response} and L{oauthbearerResponse} are the SASL initial
    responses (Google's XOAUTH2 and RFC 7628's OAUTHBEARER).

A token endpoint that cannot be reached, or answers with an error, fails the
request with L{TokenError}: a temporary delivery failure, so the message
stays queued and is retried.  No token, client secret, refresh token or
client assertion is ever logged or put in an exception's message.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpauth_relay.durable import replaceFile
from smtpauth_relay.threads import RunInThread, runNow
from smtpauth_relay.tls import keyMatches, loadCertificates, loadPrivateKey

__all__ = [
    "MECHANISMS",
    "OAuth2Settings",
    "TokenClient",
    "TokenError",
    "checkTokenEndpoint",
    "clientAssertion",
    "defaultScope",
    "deviceAuthorizationEndpoint",
    "oauthbearerResponse",
    "writeSecretFile",
    "xoauth2Response",
]

log = Logger()

MECHANISMS = {"xoauth2": "XOAUTH2", "oauthbearer": "OAUTHBEARER"}
"""The SASL mechanism for each token-based C{[delivery] auth}."""

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
"""RFC 7523's C{client_assertion_type} for a JWT client assertion."""

ASSERTION_LIFETIME = 300
"""Seconds a client assertion is valid (it is used once, at once)."""

REQUEST_TIMEOUT = 30.0
"""Seconds a request to the token endpoint may take."""

DEFAULT_EXPIRES_IN = 3600
"""The lifetime assumed for a token whose response has no C{expires_in}."""

MAX_SHOWN = 300
"""The most characters of an endpoint's error text that a log line quotes."""

_MICROSOFT = "login.microsoftonline.com"
_GOOGLE = "oauth2.googleapis.com"


class TokenError(Exception):
    """
    No token could be had: the endpoint is down, slow, or refused.  Its
    message never holds a secret; for delivery it is a temporary failure.

    @ivar error: the OAuth2 C{error} code the endpoint answered, if any
        (C{"invalid_grant"}, C{"authorization_pending"}, ...).
    """

    def __init__(self, message: str, error: str = "") -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True)
class OAuth2Settings:
    """
    The C{[delivery.oauth2]} table, validated.

    @ivar tokenEndpoint: the token endpoint's URL.
    @ivar clientId: the application (client) id.
    @ivar username: the mailbox, named in the SASL response.
    @ivar scope: space-separated scopes to ask for (C{""}: none).
    @ivar clientSecretFile: file holding the client secret, or C{None}.
    @ivar certificate: PEM certificate registered with the application, for
        a client assertion, or C{None}.
    @ivar privateKey: its RSA private key, PEM, or C{None}.
    @ivar refreshTokenFile: file holding the refresh token (delegated flow),
        or C{None} for the client-credentials grant.
    @ivar deviceAuthorizationEndpoint: the device authorization endpoint for
        C{oauth2 authorize}, or C{None} to derive it from C{tokenEndpoint}.
    """

    tokenEndpoint: str
    clientId: str
    username: str
    scope: str = ""
    clientSecretFile: str | None = None
    certificate: str | None = None
    privateKey: str | None = None
    refreshTokenFile: str | None = None
    deviceAuthorizationEndpoint: str | None = None


def checkTokenEndpoint(url: str) -> str | None:
    """
    @return: why C{url} cannot be a token endpoint, or C{None}: it must be
        C{https}, except on the loopback address (for tests).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as e:
        return f'"{url}" is not a valid URL: {e}'
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and host:
        try:
            if ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            pass
        return f'"{url}" is not https (plain http only to 127.0.0.1 or ::1, for tests)'
    return f'"{url}" is not an https URL'


def defaultScope(tokenEndpoint: str, delegated: bool) -> str:
    """
    The scope to ask for when C{[delivery.oauth2] scope} is not set: the
    one Microsoft 365 or Google wants for SMTP, or C{""} for any other
    endpoint.

    @param delegated: whether the refresh-token (delegated) flow is used,
        rather than the client-credentials (app-only) one.
    """
    host = (urlsplit(tokenEndpoint).hostname or "").lower()
    if host == _MICROSOFT:
        if delegated:
            return "https://outlook.office.com/SMTP.Send offline_access"
        return "https://outlook.office365.com/.default"
    if host == _GOOGLE:
        return "https://mail.google.com/"
    return ""


def deviceAuthorizationEndpoint(settings: OAuth2Settings) -> str | None:
    """
    The device authorization endpoint (RFC 8628) for C{settings}: the
    configured one, or Microsoft's or Google's derived from the token
    endpoint; C{None} when it cannot be derived.
    """
    if settings.deviceAuthorizationEndpoint:
        return settings.deviceAuthorizationEndpoint
    parts = urlsplit(settings.tokenEndpoint)
    host = (parts.hostname or "").lower()
    if host == _MICROSOFT and parts.path.endswith("/oauth2/v2.0/token"):
        path = parts.path[: -len("token")] + "devicecode"
        return parts._replace(path=path, query="").geturl()
    if host == _GOOGLE:
        return "https://oauth2.googleapis.com/device/code"
    return None


# -- SASL ---------------------------------------------------------------------


def xoauth2Response(username: str, token: str) -> bytes:
    """
    The XOAUTH2 initial response (before base64).
    """
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearerResponse(username: str, token: str, host: str, port: int) -> bytes:
    """
    The OAUTHBEARER initial response (RFC 7628 section 3.1, before base64).
    """
    authzid = username.replace("=", "=3D").replace(",", "=2C")
    kvpairs = f"host={host}\x01"
    if port:
        kvpairs += f"port={port}\x01"
    return f"n,a={authzid},\x01{kvpairs}auth=Bearer {token}\x01\x01".encode()


def describeSASLError(challenge: bytes) -> str:
    """
    The status of an OAUTHBEARER / XOAUTH2 error challenge (base64 JSON,
    RFC 7628 section 3.2.2), fit for a log line; it holds no token.
    """
    try:
        data = json.loads(base64.b64decode(challenge, validate=True))
        status = data.get("status", "") if isinstance(data, dict) else ""
    except (ValueError, TypeError):
        return "an unreadable error challenge"
    return f"status {_shown(str(status))}" if status else "an error challenge"


# -- files ----------------------------------------------------------------------


def readSecretFile(path: str) -> str:
    """
    The secret in C{path}: its first line, without white space around it.

    @raise OSError: if it cannot be read.
    @raise ValueError: if it is empty.
    """
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8").splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        raise ValueError(f'"{path}" is empty')
    return value


def writeSecretFile(path: str, value: str) -> None:
    """
    Replace the secret in C{path} atomically: a temporary file in the same
    directory, mode 0600, written and fsynced, renamed over C{path}, then
    the directory fsynced.  A reader sees the old secret or the new one,
    never a part.
    """
    replaceFile(path, value.encode("utf-8") + b"\n", 0o600)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def loadAssertionKey(
    certificatePath: str, privateKeyPath: str
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """
    The certificate and RSA key for client assertions.

    @raise OSError: if a file cannot be read.
    @raise ValueError: if the key is not RSA or does not match.
    """
    certificate = loadCertificates(certificatePath)[0]
    key = loadPrivateKey(privateKeyPath)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f'"{privateKeyPath}" is not an RSA key (RS256 needs one)')
    if not keyMatches(key, certificate):
        raise ValueError(
            f'"{privateKeyPath}" does not match the certificate in "{certificatePath}"'
        )
    return certificate, key


def clientAssertion(
    clientId: str,
    audience: str,
    certificate: x509.Certificate,
    key: rsa.RSAPrivateKey,
    now: float,
) -> str:
    """
    A client assertion (RFC 7523 section 2.2, as Microsoft's identity
    platform wants it): a JWT signed RS256, its header naming the
    certificate by its SHA-1 (C{x5t}) and SHA-256 (C{x5t#S256})
    thumbprints.

    @param audience: the token endpoint.
    @param now: POSIX time.
    """
    der = certificate.public_bytes(serialization.Encoding.DER)
    header = {
        "alg": "RS256",
        "typ": "JWT",
        "x5t": _b64url(hashlib.sha1(der).digest()),
        "x5t#S256": _b64url(hashlib.sha256(der).digest()),
    }
    issued = int(now)
    claims = {
        "aud": audience,
        "iss": clientId,
        "sub": clientId,
        "jti": str(uuid.uuid4()),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ASSERTION_LIFETIME,
    }
    signingInput = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = key.sign(
        signingInput.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
    )
    return signingInput + "." + _b64url(signature)


# -- HTTP ---------------------------------------------------------------------


def _shown(text: str) -> str:
    """
    C{text} made safe for a log line: printable ASCII, cut short.
    """
    shown = "".join(c if " " <= c <= "~" else "?" for c in text)
    return shown if len(shown) <= MAX_SHOWN else shown[: MAX_SHOWN - 3] + "..."


def makeHTTPClient(reactor: Any) -> Any:
    """
    A treq C{HTTPClient} whose HTTPS connections verify the server's
    certificate against the system's CAs.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    return HTTPClient(Agent(reactor))


async def postForm(
    http: Any,
    url: str,
    fields: Mapping[str, str],
    clock: Any,
    timeout: float = REQUEST_TIMEOUT,
) -> dict[str, Any]:
    """
    POST C{fields} (form-encoded) to an OAuth2 endpoint and read its JSON
    answer.

    @param http: a treq C{HTTPClient} (or L{treq.testing.StubTreq}).
    @return: the JSON object of a 200 answer.
    @raise TokenError: for anything else (not reachable, timed out, an
        error answer: its C{error} code and description are in the
        message, never the fields sent).
    """
    timedOut: list[bool] = []

    def onTimeout(result: object, seconds: float) -> object:
        timedOut.append(True)
        return result

    try:
        request = http.post(
            url,
            data=dict(fields),
            headers={b"Accept": [b"application/json"]},
        )
        request.addTimeout(timeout, clock, onTimeoutCancel=onTimeout)
        response = await request
        body = response.content()
        body.addTimeout(timeout, clock, onTimeoutCancel=onTimeout)
        raw = await body
    except Exception as e:
        reason = "timed out" if timedOut else _shown(str(e) or type(e).__name__)
        raise TokenError(f"{url} cannot be reached: {reason}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise TokenError(f"{url} answered HTTP {response.code} without a JSON object")
    if response.code != 200 or "error" in data:
        error = _shown(str(data.get("error", "")))
        description = _shown(str(data.get("error_description", "")))
        message = f"{url} answered HTTP {response.code}"
        if error:
            message += f": {error}"
        if description:
            message += f" ({description})"
        raise TokenError(message, error=str(data.get("error", "")))
    return data


def _expiresIn(data: Mapping[str, Any]) -> float:
    value = data.get("expires_in", DEFAULT_EXPIRES_IN)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return float(DEFAULT_EXPIRES_IN)
    return seconds if seconds > 0 else float(DEFAULT_EXPIRES_IN)


def renewalDelay(expiresIn: float) -> float:
    """
    Seconds after it was issued that a token is renewed: at 80% of its
    lifetime or 5 minutes before it ends, whichever comes first, but never
    before half of it (a short-lived token is not fetched for every
    message).
    """
    return max(min(0.8 * expiresIn, expiresIn - 300.0), 0.5 * expiresIn)


# -- the client -----------------------------------------------------------------


class TokenClient:
    """
    Access tokens for one upstream login; see the module docstring.

    @ivar requests: requests made to the token endpoint so far.
    """

    def __init__(
        self,
        settings: OAuth2Settings,
        clock: Any,
        http: Any,
        runInThread: RunInThread = runNow,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """
        @param http: a treq C{HTTPClient} (see L{makeHTTPClient}).
        @param runInThread: where files are read and written, and
            assertions signed.
        @raise ValueError: if the token endpoint is not an https URL.
        """
        problem = checkTokenEndpoint(settings.tokenEndpoint)
        if problem is not None:
            raise ValueError(problem)
        self.settings = settings
        self.clock = clock
        self.http = http
        self.runInThread = runInThread
        self.timeout = timeout
        self.requests = 0
        self._token: str | None = None
        self._renewAt = 0.0
        self._expiresAt = 0.0
        self._waiting: list[Deferred[str]] = []

    @property
    def grant(self) -> str:
        """
        C{"refresh_token"} or C{"client_credentials"}.
        """
        return (
            "refresh_token" if self.settings.refreshTokenFile else "client_credentials"
        )

    def getToken(self) -> Deferred[str]:
        """
        A valid access token: the cached one until it is due for renewal,
        else a new one (one request, however many ask meanwhile).

        @return: fires with the token, or fails with L{TokenError}.
        """
        if self._token is not None and self.clock.seconds() < self._renewAt:
            return succeed(self._token)
        d: Deferred[str] = Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            fetching = Deferred.fromCoroutine(self._fetch())
            fetching.addBoth(self._fetched)
        return d

    def invalidate(self, token: str) -> None:
        """
        The upstream refused C{token}: the next L{getToken} fetches a new
        one (unless C{token} has already been replaced).
        """
        if token == self._token:
            self._token = None
            self._renewAt = self._expiresAt = 0.0

    def _fetched(self, result: tuple[str, float, float] | Failure) -> None:
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            now = self.clock.seconds()
            if self._token is not None and now < self._expiresAt - 60:
                log.warn(
                    "Cannot renew the OAuth2 token for {username}: {reason}; "
                    "using the current one for {left:.0f}s more",
                    username=self.settings.username,
                    reason=result.getErrorMessage(),
                    left=self._expiresAt - now,
                )
                for d in waiting:
                    d.callback(self._token)
                return
            if not result.check(TokenError):
                log.failure("Unexpected error getting an OAuth2 token", result)
                result = Failure(
                    TokenError(f"unexpected error: {type(result.value).__name__}")
                )
            else:
                log.error(
                    "Cannot get an OAuth2 token for {username} ({grant}): {reason}",
                    username=self.settings.username,
                    grant=self.grant,
                    reason=result.getErrorMessage(),
                )
            for d in waiting:
                d.errback(result)
            return
        token, renewAt, expiresAt = result
        self._token, self._renewAt, self._expiresAt = token, renewAt, expiresAt
        for d in waiting:
            d.callback(token)

    async def _fetch(self) -> tuple[str, float, float]:
        settings = self.settings
        issued = self.clock.seconds()
        fields = await self.runInThread(self._requestFields, issued)
        self.requests += 1
        data = await postForm(
            self.http, settings.tokenEndpoint, fields, self.clock, self.timeout
        )
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenError(f"{settings.tokenEndpoint} answered without access_token")
        tokenType = data.get("token_type", "Bearer")
        if not isinstance(tokenType, str) or tokenType.lower() != "bearer":
            raise TokenError(
                f"{settings.tokenEndpoint} answered a token of type "
                f'"{_shown(str(tokenType))}", not Bearer'
            )
        rotated = data.get("refresh_token")
        if (
            settings.refreshTokenFile
            and isinstance(rotated, str)
            and rotated
            and rotated != fields.get("refresh_token")
        ):
            try:
                await self.runInThread(
                    writeSecretFile, settings.refreshTokenFile, rotated
                )
            except OSError as e:
                log.error(
                    "Cannot store the new refresh token in {path}: {problem}; "
                    "the old one is kept and may stop working",
                    path=settings.refreshTokenFile,
                    problem=e.strerror or str(e),
                )
            else:
                log.info(
                    "Stored the rotated refresh token in {path}",
                    path=settings.refreshTokenFile,
                )
        expiresIn = _expiresIn(data)
        log.info(
            "Got an OAuth2 token for {username} ({grant}), valid {expiresIn:.0f}s",
            username=settings.username,
            grant=self.grant,
            expiresIn=expiresIn,
        )
        return token, issued + renewalDelay(expiresIn), issued + expiresIn

    def _requestFields(self, now: float) -> dict[str, str]:
        """
        The form fields of a token request (reads the secret files; runs in
        a thread).

        @raise TokenError: if a file cannot be read.
        """
        settings = self.settings
        fields = {"client_id": settings.clientId}
        if settings.scope:
            fields["scope"] = settings.scope
        try:
            if settings.refreshTokenFile:
                fields["grant_type"] = "refresh_token"
                fields["refresh_token"] = readSecretFile(settings.refreshTokenFile)
            else:
                fields["grant_type"] = "client_credentials"
            fields.update(clientAuthentication(settings, now))
        except FileNotFoundError as e:
            hint = ""
            if e.filename == settings.refreshTokenFile:
                hint = "; run: smtpauth-relay oauth2 authorize --config PATH"
            raise TokenError(
                f'cannot read "{e.filename}": {e.strerror}{hint}'
            ) from None
        except OSError as e:
            raise TokenError(f'cannot read "{e.filename}": {e.strerror or e}') from None
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenError(_shown(str(e))) from None
        return fields


def clientAuthentication(settings: OAuth2Settings, now: float) -> dict[str, str]:
    """
    The form fields that authenticate the client: its secret, a client
    assertion, or nothing (a public client).

    @raise OSError: if a file cannot be read.
    @raise ValueError: if a file does not hold what it should.
    """
    if settings.clientSecretFile:
        return {"client_secret": readSecretFile(settings.clientSecretFile)}
    if settings.certificate and settings.privateKey:
        certificate, key = loadAssertionKey(settings.certificate, settings.privateKey)
        return {
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": clientAssertion(
                settings.clientId, settings.tokenEndpoint, certificate, key, now
            ),
        }
    return {}
