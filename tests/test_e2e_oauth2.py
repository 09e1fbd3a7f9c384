"""
End-to-end tests of OAuth2 towards the smarthost: the real relay (C{twistd
-n smtpauth-relay}) with C{[delivery] auth = "xoauth2"} and a
C{[delivery.oauth2]} table, fed with smtplib, getting its tokens from the
token endpoint of L{tests.tokenendpoint} (in a process of its own) and
delivering to an aiosmtpd upstream that takes only XOAUTH2 / OAUTHBEARER
with a token that endpoint issued.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from typing import Any

from smtpauth_relay.oauth2 import writeSecretFile
from tests.e2e_support import HOST, REPO_ROOT, RelayProcess, freePorts, poll
from tests.test_e2e_delivery import DELIVERY, QUEUE, WAIT, DeliveryHarness
from tests.tokenendpoint import TokenIssuer

try:
    from tests.upstream_support import Upstream
except ImportError:  # aiosmtpd missing: DeliveryHarness skips
    pass

MAILBOX = "scanner@tenant.example"
CLIENT_ID = "e2e-client"
CLIENT_SECRET = "e2e client secret ~42"


class TokenEndpointProcess:
    """
    C{python -m tests.tokenendpoint} on a port of 127.0.0.1, restartable on
    the same port.
    """

    def __init__(self, directory: str, key: str, expiresIn: int = 3600) -> None:
        self.port = freePorts(1)[0]
        self.requestLog = os.path.join(directory, "token-requests.log")
        self.configPath = os.path.join(directory, "token-endpoint.json")
        self.logPath = os.path.join(directory, "token-endpoint.out")
        with open(self.configPath, "w") as f:
            json.dump(
                {
                    "port": self.port,
                    "key": key,
                    "clientId": CLIENT_ID,
                    "clientSecret": CLIENT_SECRET,
                    "subject": MAILBOX,
                    "expiresIn": expiresIn,
                    "requestLog": self.requestLog,
                },
                f,
            )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/tenant/oauth2/v2.0/token"

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        with open(self.logPath, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.tokenendpoint", self.configPath],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )

        def accepts() -> bool:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return True
            except OSError:
                return False

        poll(accepts, 20.0, lambda: "the token endpoint to listen")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def requests(self) -> list[str]:
        try:
            with open(self.requestLog) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []


class OAuth2DeliveryTests(DeliveryHarness):
    """
    The relay logging in to an OAuth-only upstream.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        key = uuid.uuid4().hex
        self.endpoint = TokenEndpointProcess(self.directory, key)
        self.addCleanup(self.endpoint.stop)
        self.issuer = TokenIssuer(key.encode())

    def startOAuthRelay(self, upstream: Upstream, **delivery: Any) -> RelayProcess:
        secretFile = os.path.join(self.directory, "client-secret")
        writeSecretFile(secretFile, CLIENT_SECRET)
        config = upstream.deliveryConfig(**{**DELIVERY, **delivery})
        config["auth"] = "xoauth2"
        relay = RelayProcess(
            queue=QUEUE,
            delivery=config,
            sections={
                "delivery.oauth2": {
                    "token_endpoint": self.endpoint.url,
                    "client_id": CLIENT_ID,
                    "client_secret_file": secretFile,
                    "username": MAILBOX,
                }
            },
        )
        self.addCleanup(relay.remove)
        relay.start()
        return relay

    def oauthUpstream(self) -> Upstream:
        return self.startUpstream(credentials=False, oauth=self.issuer)

    def setUpstreamUser(self, upstream: Upstream) -> None:
        upstream.username = MAILBOX

    def test_deliveredWithRewriting(self) -> None:
        """
        A message submitted with smtplib reaches the OAuth-only upstream:
        the relay fetched a token (client credentials), logged in with
        XOAUTH2, and rewrote the envelope sender and From: to the mailbox
        (the author in Reply-To:); no token appears in the relay's log.
        """
        upstream = self.oauthUpstream()
        self.setUpstreamUser(upstream)
        self.endpoint.start()
        relay = self.startOAuthRelay(
            upstream, rewrite_sender=MAILBOX, rewrite_from=True
        )
        sender, (recipient,) = self.addresses("ok")
        marker = f"oauth2-{uuid.uuid4().hex[:8]}"
        self.submit(self.session(relay), self.message(marker), sender, [recipient])
        (transaction,) = upstream.waitForTransactions(
            lambda ts: len(ts) >= 1, WAIT, relay.log
        )
        self.assertEqual(transaction.mechanism, "XOAUTH2")
        self.assertEqual(transaction.login, MAILBOX)
        self.assertEqual(transaction.sender, MAILBOX)
        message = transaction.message()
        self.assertEqual(str(message["From"]), f"Sender <{MAILBOX}>")
        self.assertEqual(str(message["Reply-To"]), "Sender <sender@sender.example>")
        self.assertIn(b"\r\n.a line with a leading dot\r\n", transaction.content)
        self.assertEqual(
            self.endpoint.requests(), ["/tenant/oauth2/v2.0/token client_credentials"]
        )
        log = relay.log()
        self.assertTrue(upstream.seenTokens)
        for token in upstream.seenTokens:
            self.assertNotIn(token, log)
            self.assertNotIn(token.split(".")[0][:16], log)
        self.assertNotIn(CLIENT_SECRET, log)

    def test_deadTokenEndpointKeepsMailQueued(self) -> None:
        """
        While the token endpoint is down the message stays queued
        (temporary failure, retried) and nothing reaches the upstream; once
        the endpoint is back, the message is delivered.
        """
        upstream = self.oauthUpstream()
        self.setUpstreamUser(upstream)
        relay = self.startOAuthRelay(upstream)
        sender, (recipient,) = self.addresses("ok")
        marker = f"oauth2-down-{uuid.uuid4().hex[:8]}"
        self.submit(self.session(relay), self.message(marker), sender, [recipient])

        def retried() -> bool:
            envelopes = relay.envelopes()
            return bool(envelopes) and all(
                len(e.get("attempts", ())) >= 2 for e in envelopes.values()
            )

        poll(retried, WAIT, lambda: f"two failed attempts\n{relay.log()}")
        self.assertEqual(upstream.transactions(), [])
        (envelope,) = relay.envelopes().values()
        self.assertIn("OAuth2", envelope["attempts"][-1]["reply"])
        self.endpoint.start()
        upstream.waitForTransactions(lambda ts: len(ts) >= 1, WAIT, relay.log)
        relay.waitForEmptySpool()

    def test_revokedToken(self) -> None:
        """
        When the upstream stops accepting the relay's token (revoked), the
        relay gets a new one and the next message is delivered.
        """
        upstream = self.oauthUpstream()
        self.setUpstreamUser(upstream)
        self.endpoint.start()
        relay = self.startOAuthRelay(upstream)
        sender, (recipient,) = self.addresses("ok")
        client = self.session(relay)
        self.submit(client, self.message("first"), sender, [recipient])
        upstream.waitForTransactions(lambda ts: len(ts) >= 1, WAIT, relay.log)
        # The upstream revokes every token it has seen.
        with upstream._lock:
            self.issuer.revoked.update(upstream.seenTokens)
        # The pooled connection (already logged in) lingers 2 s: let it go.
        poll(lambda: not upstream._protocols, WAIT, lambda: "the connection to close")
        self.submit(client, self.message("second"), sender, [recipient])
        upstream.waitForTransactions(lambda ts: len(ts) >= 2, WAIT, relay.log)
        self.assertEqual(len(self.endpoint.requests()), 2)
        replies = [c.reply for c in upstream.commands("AUTH")]
        self.assertIn("XOAUTH2 535", replies)
