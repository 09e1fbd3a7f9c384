# -*- test-case-name: tests.test_oauth2 -*-
"""
C{smtpauth-relay oauth2 authorize --config PATH}: get the refresh token of a
delegated OAuth2 setup once, with the device-code flow (RFC 8628), and store
it in C{[delivery.oauth2] refresh_token_file}.

The command asks the device authorization endpoint for a code, shows the
admin where to enter it, polls the token endpoint (every C{interval}
seconds, 5 more after each C{slow_down}) until the admin has signed in as
the mailbox and consented, and writes the refresh token atomically, mode
0600.  Nothing secret is printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from smtpauth_relay.oauth2 import (
    OAuth2Settings,
    TokenError,
    clientAuthentication,
    deviceAuthorizationEndpoint,
    postForm,
    writeSecretFile,
)

USAGE = """\
usage: smtpauth-relay oauth2 authorize --config PATH

  authorize   sign in once as the [delivery.oauth2] username (device-code
              flow: open the address shown, enter the code) and store the
              refresh token in [delivery.oauth2] refresh_token_file
"""

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
"""RFC 8628's grant type."""

_NAME = "smtpauth-relay oauth2"


class AuthorizationFailed(Exception):
    """
    The flow ended without a refresh token; the message says why.
    """


async def authorize(
    settings: OAuth2Settings, http: Any, clock: Any, stdout: TextIO
) -> None:
    """
    Run the device-code flow and store the refresh token.

    @param http: a treq C{HTTPClient}.
    @raise AuthorizationFailed: if it ends without a refresh token.
    """
    if not settings.refreshTokenFile:
        raise AuthorizationFailed(
            "[delivery.oauth2] has no refresh_token_file: authorize is for "
            "delegated setups (app-only setups need no sign-in)"
        )
    endpoint = deviceAuthorizationEndpoint(settings)
    if endpoint is None:
        raise AuthorizationFailed(
            "set [delivery.oauth2] device_authorization_endpoint (it cannot be "
            f"derived from {settings.tokenEndpoint})"
        )
    fields = {"client_id": settings.clientId}
    if settings.scope:
        fields["scope"] = settings.scope
    try:
        device = await postForm(http, endpoint, fields, clock)
    except TokenError as e:
        raise AuthorizationFailed(str(e)) from None
    deviceCode = device.get("device_code")
    userCode = device.get("user_code")
    uri = device.get("verification_uri") or device.get("verification_url")
    if not (
        isinstance(deviceCode, str)
        and isinstance(userCode, str)
        and isinstance(uri, str)
    ):
        raise AuthorizationFailed(f"{endpoint} answered without a device code")
    interval = _number(device.get("interval"), 5.0)
    deadline = clock.seconds() + _number(device.get("expires_in"), 900.0)
    stdout.write(
        f"Sign in as {settings.username} to authorize smtpauth-relay:\n"
        f"  open     {uri}\n"
        f"  enter    {userCode}\n"
    )
    complete = device.get("verification_uri_complete")
    if isinstance(complete, str):
        stdout.write(f"  (or open {complete})\n")
    stdout.write("Waiting for the sign-in...\n")
    stdout.flush()
    while True:
        await deferLater(clock, interval, lambda: None)
        if clock.seconds() > deadline:
            raise AuthorizationFailed("the code expired before the sign-in; try again")
        poll = {
            "grant_type": DEVICE_GRANT,
            "device_code": deviceCode,
            "client_id": settings.clientId,
        }
        try:
            poll.update(clientAuthentication(settings, clock.seconds()))
        except (OSError, ValueError) as e:
            raise AuthorizationFailed(
                f"cannot authenticate the client: {getattr(e, 'strerror', None) or e}"
            ) from None
        try:
            tokens = await postForm(http, settings.tokenEndpoint, poll, clock)
        except TokenError as e:
            if e.error == "authorization_pending":
                continue
            if e.error == "slow_down":
                interval += 5
                continue
            raise AuthorizationFailed(str(e)) from None
        break
    refreshToken = tokens.get("refresh_token")
    if not isinstance(refreshToken, str) or not refreshToken:
        raise AuthorizationFailed(
            f"{settings.tokenEndpoint} gave no refresh token (for Microsoft, "
            'include "offline_access" in scope)'
        )
    writeSecretFile(settings.refreshTokenFile, refreshToken)
    stdout.write(f"Stored the refresh token in {settings.refreshTokenFile}\n")


def _number(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


def parseArguments(argv: Sequence[str]) -> str | None:
    """
    @return: the configuration path of C{authorize --config PATH}, or
        C{None} for a usage error.
    """
    args = list(argv)
    if not args or args[0] != "authorize":
        return None
    configPath = None
    it = iter(args[1:])
    for arg in it:
        if arg in ("-c", "--config"):
            configPath = next(it, None)
        elif arg.startswith("--config="):
            configPath = arg.split("=", 1)[1]
        else:
            return None
    return configPath or None


def main(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    """
    Run C{smtpauth-relay oauth2 ...}; return the exit status (0 ok, 1
    failure, 2 usage).
    """
    if list(argv[:1]) in (["-h"], ["--help"]):
        stdout.write(USAGE)
        return 0
    configPath = parseArguments(argv)
    if configPath is None:
        stderr.write(USAGE)
        return 2

    from smtpauth_relay.config import loadConfigOrReport

    config = loadConfigOrReport(configPath, stderr)
    if config is None:
        return 1
    if config.delivery.oauth2 is None:
        stderr.write(
            f'{_NAME}: {configPath} has no [delivery.oauth2] (set auth = "xoauth2" '
            'or "oauthbearer" in [delivery])\n'
        )
        return 1
    settings = config.delivery.oauth2.settings()

    from twisted.internet import reactor

    from smtpauth_relay.oauth2 import makeHTTPClient

    outcome: list[BaseException | None] = []

    def run() -> Deferred[None]:
        d = Deferred.fromCoroutine(
            authorize(settings, makeHTTPClient(reactor), reactor, stdout)
        )

        def done(result: object) -> None:
            outcome.append(getattr(result, "value", None))
            reactor.stop()

        d.addBoth(done)
        return d

    reactor.callWhenRunning(run)
    reactor.run()
    error = outcome[0] if outcome else None
    if error is not None:
        if isinstance(error, AuthorizationFailed | OSError):
            reason: object = getattr(error, "strerror", None) or str(error)
        else:
            reason = f"unexpected error: {type(error).__name__}: {error}"
        stderr.write(f"{_NAME}: {reason}\n")
        return 1
    return 0
