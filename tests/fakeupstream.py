"""
A scripted upstream SMTP server for in-memory tests of the delivery client.

Recipients decide their own fate by their local part: C{tempfail...} gets
451 4.2.0 at RCPT, C{reject...} gets 550 5.1.1, anything else 250.

With L{UpstreamScript.tokens} (a L{tests.tokenendpoint.TokenIssuer}) it
takes XOAUTH2 and OAUTHBEARER, only over TLS and only with a token the
issuer vouches for now, for L{UpstreamScript.oauthUser}; a refused token
gets 535 (or, with L{UpstreamScript.errorChallenge}, a 334 error challenge
first, as Google and RFC 7628 do).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.test import iosim

from smtpauth_relay.delivery.client import RelayClient, RelayClientFactory


@dataclass
class Transaction:
    mailFrom: bytes = b""
    recipients: list[bytes] = field(default_factory=list)
    data: bytes = b""


@dataclass
class UpstreamScript:
    """
    How the fake upstream behaves, and what it saw.
    """

    extensions: list[bytes] = field(
        default_factory=lambda: [b"SIZE 10000000", b"8BITMIME", b"AUTH PLAIN LOGIN"]
    )
    users: dict[bytes, bytes] = field(default_factory=dict)
    greeting: bytes = b"220 upstream.example ESMTP"
    mailReply: bytes = b"250 2.1.0 Ok"
    dataReply: bytes = b"250 2.0.0 Ok: queued"
    dataStartReply: bytes = b"354 Go ahead"
    ehloReply: bytes | None = None
    heloReply: bytes = b"250 upstream.example"
    holdDataReply: bool = False
    heldReplies: list[Any] = field(default_factory=list)
    rsetReply: bytes = b"250 2.0.0 Ok"
    silent: bool = False
    tls: bool = False
    tlsAccepts: bool = True
    transactions: list[Transaction] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    connections: int = 0
    tokens: Any = None
    oauthUser: str = ""
    errorChallenge: bool = False
    authReplies: list[bytes] = field(default_factory=list)
    finishResponses: list[bytes] = field(default_factory=list)
    dataForNobody: bool = False
    chunks: list[bytes] = field(default_factory=list)
    """What arrived in each read: commands written together arrive together."""


class FakeUpstream(LineOnlyReceiver):
    """
    The server side; see the module docstring.
    """

    def __init__(self, script: UpstreamScript) -> None:
        self.script = script
        self.current: Transaction | None = None
        self.inData = False
        self.authenticated = False
        self.authStep: str | None = None
        self.loginUser = b""
        self.secure = False

    def connectionMade(self) -> None:
        self.script.connections += 1
        if not self.script.silent:
            self.sendLine(self.script.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.script.chunks.append(data)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.script.silent:
            return
        if self.inData:
            if line == b".":
                self.inData = False
                assert self.current is not None
                self.script.transactions.append(self.current)
                if self.script.holdDataReply:
                    self.script.heldReplies.append(
                        lambda: self.sendLine(self.script.dataReply)
                    )
                else:
                    self.sendLine(self.script.dataReply)
                return
            if line.startswith(b"."):
                line = line[1:]
            assert self.current is not None
            self.current.data += line + b"\r\n"
            return
        self.script.commands.append(line)
        if self.authStep is not None:
            self._authResponse(line)
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO" and self.script.ehloReply is not None:
            self.sendLine(self.script.ehloReply)
        elif verb == b"HELO":
            self.sendLine(self.script.heloReply)
        elif verb == b"EHLO":
            lines = [b"upstream.example"] + self.script.extensions
            if self.script.tls and not self.secure:
                lines.append(b"STARTTLS")
            for extension in lines[:-1]:
                self.sendLine(b"250-" + extension)
            self.sendLine(b"250 " + lines[-1])
        elif verb == b"STARTTLS" and self.script.tls:
            self.sendLine(b"220 2.0.0 Ready to start TLS")
            self.transport.startTLS(FakeTLSContext(self.script.tlsAccepts))
            self.secure = True
        elif verb == b"AUTH":
            parts = line.split()
            if parts[1].upper() == b"PLAIN" and len(parts) == 3:
                _, user, password = base64.b64decode(parts[2]).split(b"\0")
                self._login(user, password)
            elif parts[1].upper() in (b"XOAUTH2", b"OAUTHBEARER") and (
                self.script.tokens is not None
            ):
                self._oauth(parts[1].upper(), parts[2] if len(parts) > 2 else b"")
            elif parts[1].upper() == b"LOGIN":
                self.authStep = "user"
                self.sendLine(b"334 " + base64.b64encode(b"Username:"))
            else:
                self.sendLine(b"504 5.5.4 Unrecognized authentication type")
        elif verb == b"MAIL":
            if self.script.tokens is not None and not self.authenticated:
                self.sendLine(b"530 5.7.0 Authentication required")
                return
            reply = self.script.mailReply
            if reply.startswith(b"250"):
                self.current = Transaction(mailFrom=line)
            self.sendLine(reply)
        elif verb == b"RCPT":
            address = line.split(b"<", 1)[1].rstrip(b">")
            if self.current is None:
                self.sendLine(b"503 5.5.1 Error: need MAIL command")
            elif address.startswith(b"tempfail"):
                self.sendLine(b"451 4.2.0 Try again later")
            elif address.startswith(b"reject"):
                self.sendLine(b"550 5.1.1 No such user")
            else:
                assert self.current is not None
                self.current.recipients.append(address)
                self.sendLine(b"250 2.1.5 Ok")
        elif verb == b"DATA":
            if not (self.current and self.current.recipients) and not (
                self.script.dataForNobody
            ):
                self.sendLine(b"554 5.5.1 Error: no valid recipients")
                return
            if self.current is None:
                self.current = Transaction()
            self.inData = self.script.dataStartReply.startswith(b"354")
            self.sendLine(self.script.dataStartReply)
        elif verb == b"RSET":
            self.current = None
            self.sendLine(self.script.rsetReply)
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"500 5.5.1 Unknown command")

    def _oauth(self, mechanism: bytes, initial: bytes) -> None:
        if not self.secure:
            self._authReply(b"538 5.7.11 Encryption required")
            return
        text = base64.b64decode(initial).decode()
        if mechanism == b"XOAUTH2":
            fields = dict(f.split("=", 1) for f in text.split("\x01") if "=" in f)
            user = fields.get("user", "")
        else:
            gs2, _, rest = text.partition("\x01")
            fields = dict(f.split("=", 1) for f in rest.split("\x01") if "=" in f)
            user = gs2.split(",")[1][2:].replace("=2C", ",").replace("=3D", "=")
        auth = fields.get("auth", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if user == self.script.oauthUser and self.script.tokens.check(
            token, self.script.oauthUser
        ):
            self.authenticated = True
            self._authReply(b"235 2.7.0 Accepted")
        elif self.script.errorChallenge:
            error = {"status": "401", "schemes": "bearer", "scope": "https://mail"}
            self.authStep = "finish"
            self._authReply(b"334 " + base64.b64encode(json.dumps(error).encode()))
        else:
            self._authReply(b"535 5.7.3 Authentication unsuccessful")

    def _authReply(self, reply: bytes) -> None:
        self.script.authReplies.append(reply)
        self.sendLine(reply)

    def _authResponse(self, line: bytes) -> None:
        if self.authStep == "finish":
            self.authStep = None
            self.script.finishResponses.append(line)
            self._authReply(b"535 5.7.8 Username and Password not accepted")
            return
        value = base64.b64decode(line)
        if self.authStep == "user":
            self.loginUser = value
            self.authStep = "password"
            self.sendLine(b"334 " + base64.b64encode(b"Password:"))
        else:
            self.authStep = None
            self._login(self.loginUser, value)

    def _login(self, user: bytes, password: bytes) -> None:
        if self.script.users.get(user) == password:
            self.authenticated = True
            self.sendLine(b"235 2.7.0 Authenticated")
        else:
            self.sendLine(b"535 5.7.8 Authentication credentials invalid")


class FakeTLSContext:
    """
    A TLS "context" for iosim's pretend TLS; C{accept} decides whether the
    pretend handshake succeeds.
    """

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept

    def iosimVerify(self, other: object) -> bool:
        return self.accept and getattr(other, "accept", True)


class MemoryConnector:
    """
    A C{connect} for L{ConnectionPool} that joins each new client to a
    L{FakeUpstream} in memory; call L{flush} to move the bytes.
    """

    def __init__(self, script: UpstreamScript) -> None:
        self.script = script
        self.pumps: list[iosim.IOPump] = []
        self.refuse: BaseException | None = None

    def __call__(self, factory: RelayClientFactory) -> Any:
        from twisted.internet.defer import fail, succeed

        if self.refuse is not None:
            return fail(self.refuse)
        client: RelayClient = factory.buildProtocol(None)
        server: Protocol = FakeUpstream(self.script)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
        )
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        for _ in range(100000):
            progressed = False
            for pump in self.pumps:
                if pump.pump():
                    progressed = True
            if not progressed:
                return
