"""
The test of the example plugin: a small web service started by the test,
and the operator kit run against the plugin.

Run it from the directory holding your plugin's C{twisted/plugins/}:
C{python -m twisted.trial test_httpauth} (the relay's test suite runs it
from C{tests/test_example_checker.py}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from smtpauth_relay.testing import CheckerContractMixin

USERS = {"alice": "wonderland"}


class LoginService(Resource):
    """
    The web service the plugin asks: 200, 401 or 404 as documented.
    """

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        login = json.loads(request.content.read())
        if login["username"] not in USERS:
            request.setResponseCode(404)
        elif USERS[login["username"]] != login["password"]:
            request.setResponseCode(401)
        return b""


class HTTPAuthContractTests(CheckerContractMixin, TestCase):
    """
    The example plugin keeps the checker contract.
    """

    authType = "httpauth"
    validUser = ("alice", "wonderland")

    def setUp(self) -> None:
        site = Site(LoginService())
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)

    def checkerArgument(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/login"

    def unavailableArgument(self) -> str:
        # Port 9 (discard) has nothing listening on a test machine.
        return "http://127.0.0.1:9/login"
