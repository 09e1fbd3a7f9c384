"""
A worked example of a credential checker plugin for smtpauth-relay:
C{httpauth:https://intranet.example.org/api/check-login}.

It asks a web service of your own whether a user name and password are
right: the relay POSTs C{{"username": ..., "password": ...}} as JSON and
reads the answer from the status code:

  - 200: the password is right;
  - 401 or 403: the password is wrong (final: no other checker is asked);
  - 404: no such user (the next checker in C{[auth] checkers} is asked);
  - anything else, or no answer: the service is down (the client gets
    C{454 4.7.0}, and the attempt does not count towards a lockout).

To use it, copy this file into a C{twisted/plugins/} directory on the relay's
Python path (for a pip installation, the C{twisted/plugins/} directory of
site-packages) and list C{httpauth:URL} in C{[auth] checkers}. Its test,
C{test_httpauth.py} beside it, runs the operator kit against it.

The file is in two parts, as every plugin should be: the factory, which
twistd imports at every start and so must import nothing heavy, and the
checker, which does the work.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(ICheckerFactory, IPlugin)
class HTTPAuthCheckerFactory:
    """
    The strcred factory: C{httpauth:URL}.
    """

    authType = "httpauth"
    authHelp = "Asks a web service (POST of JSON) whether a password is right."
    argStringFormat = "The https URL of the web service."
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> HTTPAuthChecker:
        """
        Check the argument now, so that a mistake is reported with the
        configuration line (by C{smtpauth-relay check-config} too).
        """
        url = urlsplit(argstring)
        loopback = url.hostname in ("127.0.0.1", "::1", "localhost")
        if url.scheme != "https" and not (url.scheme == "http" and loopback):
            raise ValueError(
                f"httpauth: {argstring!r} must be an https:// URL"
                " (passwords are never sent in clear)"
            )
        return HTTPAuthChecker(argstring.encode("ascii"))


theHTTPAuthCheckerFactory = HTTPAuthCheckerFactory()


@implementer(ICredentialsChecker)
class HTTPAuthChecker:
    """
    Ask the web service; see the module docstring.
    """

    credentialInterfaces = (IUsernamePassword,)
    timeout = 10.0
    """Seconds the relay waits for an answer (the chain enforces it)."""

    def __init__(self, url: bytes, reactor: Any = None) -> None:
        self.url = url
        self._reactor = reactor
        self._pool: Any = None

    def requestAvatarId(self, credentials: Any) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> bytes:
        # Imported here, not at the top: twistd imports this file at every
        # start, and the reactor must not be installed by a plugin.
        from twisted.cred.error import UnauthorizedLogin
        from twisted.web.client import (
            Agent,
            FileBodyProducer,
            HTTPConnectionPool,
            readBody,
        )
        from twisted.web.http_headers import Headers

        from smtpauth_relay.errors import CheckerUnavailable, UnknownUser

        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        if self._pool is None:
            self._pool = HTTPConnectionPool(self._reactor)
        if not credentials.password:
            raise UnauthorizedLogin("empty password")
        body = json.dumps(
            {
                "username": credentials.username.decode("utf-8", "replace"),
                "password": credentials.password.decode("utf-8", "replace"),
            }
        ).encode("utf-8")
        agent = Agent(self._reactor, pool=self._pool)
        try:
            response = await agent.request(
                b"POST",
                self.url,
                Headers({b"Content-Type": [b"application/json"]}),
                FileBodyProducer(BytesIO(body)),
            )
            await readBody(response)
        except Exception as e:
            # Never put the password (or the body) into the error.
            raise CheckerUnavailable(f"{self.url!r}: {type(e).__name__}") from None
        if response.code == 200:
            return credentials.username  # type: ignore[no-any-return]
        if response.code in (401, 403):
            raise UnauthorizedLogin("wrong password")
        if response.code == 404:
            raise UnknownUser()
        raise CheckerUnavailable(f"{self.url!r} answered {response.code}")

    def close(self) -> Any:
        """
        Close kept-alive connections (the kit calls this after each test;
        the relay when the checker is replaced by a reload).
        """
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None
