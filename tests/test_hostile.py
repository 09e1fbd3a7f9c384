"""
The hostile-input suite (issue 5): attacks on a running relay over real
sockets, and a property-based test of the server's state machine in memory.

L{HostileInputTests} starts one relay (C{twistd -n smtpauth-relay}) with a
STARTTLS, an implicit TLS and a plain listener, a fast brute-force lockout
(C{max_failures = 3}, C{subnet_max_failures = 6}, C{tarpit = 0.2}) and a
sender login map that gives the test user C{alice} only
C{alice@example.org}, and attacks it: credential stuffing from one and from
many loopback addresses, user names forging the fail2ban lockout line,
forged senders, open-relay probes, SMTP smuggling, overlong lines, TLS and
HTTP on the wrong port, random bytes, malformed and oversized AUTH
responses, and 1,000 idle connections.  Every connection
comes from its own loopback address (C{127.5.x.y}), except where the
address is the point: lockout tests use a fresh C{127.1.N.0/24} for the
attacker and the same C{N} in C{127.2.N.0/24} for "elsewhere".

L{StateMachineTests} drives L{tests.support.Harness} with random command
sequences (hypothesis' C{RuleBasedStateMachine}) and checks that the
protocol never raises, always answers well-formed replies with enhanced
status codes, and never spools a message it should not.

What each attack got is recorded in C{docs/security.rst}.
"""

from __future__ import annotations

import configparser
import itertools
import os
import random
import re
import resource
import smtplib
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.config import LockoutConfig
from smtpauth_relay.senders import SenderLoginMap
from tests.e2e_support import (
    CLIENT_NAME,
    HOST,
    HOSTNAME,
    IO_TIMEOUT,
    OTHER_PASSWORD,
    OTHER_USER,
    PASSWORD,
    REPO_ROOT,
    USER,
    ConnectionClosed,
    RawSMTP,
    RelayProcess,
    SharedRelayTestCase,
    SMTPReply,
    b64,
    clientContext,
    loopbackAddresses,
    plainResponse,
    poll,
    tlsClientHello,
)
from tests.support import Harness, Session

ALICE_ADDRESS = "alice@example.org"
FAIL2BAN_FILTER = "smtpauth-relay.conf"
SENDER_LOGIN_MAP = f"{USER}: {ALICE_ADDRESS}\n{OTHER_USER}: bob@example.net\n"
LOCKOUT: dict[str, object] = {
    "max_failures": 3,
    "subnet_max_failures": 6,
    "tarpit": 0.2,
    "session_max_failures": 3,
}
IDLE_CONNECTIONS = 1000
"""Idle connections held open while a normal client submits a message."""
IDLE_PER_ADDRESS = 25
"""Idle connections per source address (under any per-address rate limit)."""
MIN_IDLE_CONNECTIONS = 100
"""The fewest idle connections worth testing with if file descriptors are short."""
FILE_LIMIT_WANTED = 2 * IDLE_CONNECTIONS + 512
"""Descriptors each process needs: a socket per connection, and some to spare."""
TRANSACTION_DEADLINE = 5.0
"""Seconds a full STARTTLS + AUTH + message may take beside the idle connections."""
RELAY_SERVER: dict[str, object] = {
    "max_connections": IDLE_CONNECTIONS + 50,
    "max_connections_per_ip": IDLE_PER_ADDRESS + 5,
}

nextSourceAddress = loopbackAddresses(5, start=1)
_subnets = itertools.count(1)


def nextSubnets() -> tuple[str, str]:
    """
    Two /24s no other test uses, as their first three octets: the
    attacker's (127.1.N) and an unrelated one (127.2.N).
    """
    n = next(_subnets)
    return f"127.1.{n}", f"127.2.{n}"


def fail2banPattern() -> re.Pattern[str]:
    """
    The C{failregex} of the shipped fail2ban filter, with C{<HOST>} as a
    named group; fail2ban searches each log line with it (C{re.search}).
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(REPO_ROOT, "etc", "fail2ban", "filter.d", FAIL2BAN_FILTER))
    failregex = parser["Definition"]["failregex"].strip()
    return re.compile(failregex.replace("<HOST>", r"(?P<host>\S+)"))


def raiseFileLimit(wanted: int) -> int:
    """
    Raise this process's soft limit on open files towards C{wanted} (a
    relay started afterwards inherits it).

    @return: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


# -- what the attacks send ------------------------------------------------------

FORGED_SENDERS: list[tuple[str, int, str, str]] = [
    # (MAIL FROM argument, code, enhanced code, what it tries)
    ("<alice@example.org>", 250, "2.1.0", "the user's own address"),
    ('<"alice"@example.org>', 250, "2.1.0", "quoted local part, same address"),
    ('<"al\\ice"@example.org>', 250, "2.1.0", "quoted pair, same address"),
    ("<alice@EXAMPLE.ORG>", 250, "2.1.0", "domain in upper case"),
    ("<alice+news@example.org>", 250, "2.1.0", "+tag of the user's address"),
    (
        "<@relay.example:alice@example.org>",
        250,
        "2.1.0",
        "source route to the user's own address (route ignored)",
    ),
    ("<ceo@example.org>", 553, "5.7.1", "someone else in the user's domain"),
    ("<ALICE@example.org>", 553, "5.7.1", "local part in another case"),
    ('<"alice "@example.org>', 553, "5.7.1", "quoted local part with a space"),
    (
        '<"alice@example.org"@evil.example>',
        553,
        "5.7.1",
        "the whole address quoted as a local part",
    ),
    ("<alice@example.org.evil.example>", 553, "5.7.1", "look-alike domain"),
    ("<alice@sub.example.org>", 553, "5.7.1", "subdomain"),
    ("<alice@xn--exmple-cua.org>", 553, "5.7.1", "IDN homograph (ä)"),
    ("<alice%evil.example@example.org>", 553, "5.7.1", "percent hack"),
    ("<alice+x%evil.example@example.org>", 553, "5.7.1", "percent hack in a +tag"),
    ("<evil.example!alice@example.org>", 553, "5.7.1", "! path in the local part"),
    ("<@example.org:ceo@evil.example>", 553, "5.7.1", "source route"),
    ("<alice@[127.0.0.1]>", 553, "5.7.1", "IP literal"),
    ("<>", 553, "5.7.1", "null sender (not listed for the user)"),
    ("<alice@example.org@evil.example>", 501, "5.1.7", "two @"),
    ("alice@example.org", 501, "5.1.7", "no angle brackets"),
    ("<alice@example.org.>", 501, "5.1.7", "trailing dot"),
    ("<alice(ceo)@example.org>", 501, "5.1.7", "comment in the local part"),
    ('<"alice"@"example.org">', 501, "5.1.7", "quoted domain"),
    ("<alice @example.org>", 501, "5.1.7", "space before @"),
    ("<\u0430lice@example.org>", 501, "5.1.7", "Cyrillic a, no SMTPUTF8"),
    ("<alice\x00@example.org>", 501, "5.1.7", "NUL in the local part"),
]


def relayProbes(victim: str) -> list[tuple[str, bool]]:
    """
    Open-relay probe addresses for C{victim} (a unique local part), each
    with whether it is valid RFC 5321 syntax.
    """
    return [
        (f"<{victim}@evil.example>", True),
        (f"<{victim}%evil.example@{HOSTNAME}>", True),
        (f"<{victim}%evil.example@[127.0.0.1]>", True),
        (f"<@{HOSTNAME}:{victim}@evil.example>", True),
        (f"<@{HOSTNAME},@hop.example:{victim}@evil.example>", True),
        (f'<"{victim}@evil.example"@{HOSTNAME}>', True),
        (f'<"{victim}%evil.example"@{HOSTNAME}>', True),
        (f'<"{victim}@evil.example">', False),
        (f"<{victim}@[127.0.0.1]>", True),
        (f"<{victim}@[IPv6:::1]>", True),
        (f"<evil.example!{victim}@{HOSTNAME}>", True),
        (f"<evil.example!{victim}>", False),
    ]


SMUGGLING_ENDS = [
    b"\n.\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\n.\r",
]
"""End-of-data look-alikes that a lenient next hop might take for CRLF.CRLF."""

HTTP_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: relay\r\nUser-Agent: hostile\r\n\r\n",
    b"POST /cgi-bin/login HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    b"CONNECT evil.example:25 HTTP/1.1\r\nHost: evil.example:25\r\n\r\n",
]


class HostileInputTests(SharedRelayTestCase):
    """
    Attacks on one running relay over real sockets.  The relay is started
    by the first test and stopped after the last (and at exit, whatever
    happens).
    """

    fileLimit: ClassVar[int] = 0

    @classmethod
    def makeRelay(cls) -> RelayProcess:
        """
        The relay under attack; first raise the file limit (see
        L{fileLimit}) for the 1,000 idle connections.
        """
        cls.fileLimit = raiseFileLimit(FILE_LIMIT_WANTED)
        return RelayProcess(
            server=dict(RELAY_SERVER),
            lockout=dict(LOCKOUT),
            senderLoginMap=SENDER_LOGIN_MAP,
        )

    # -- helpers ------------------------------------------------------------

    def assertReply(self, reply: SMTPReply, code: int, enhanced: str = "") -> None:
        """
        Assert a reply's code and (if given) enhanced status code.
        """
        message = f"expected {code} {enhanced}, got {reply}"
        self.assertEqual(reply.code, code, message)
        if enhanced:
            self.assertEqual(reply.enhanced, enhanced, message)

    def raw(self, kind: str = "starttls", source: str | None = None) -> RawSMTP:
        """
        A raw connection, greeting not read: C{kind} is C{"plain"},
        C{"starttls"} or C{"implicit"} (TLS handshake done).
        """
        port = {
            "plain": self.relay.plainPort,
            "starttls": self.relay.starttlsPort,
            "implicit": self.relay.implicitPort,
        }[kind]
        client = RawSMTP(
            port,
            implicitTLS=kind == "implicit",
            sourceAddress=source or nextSourceAddress(),
        )
        self.addCleanup(client.close)
        return client

    def session(self, kind: str, source: str | None = None) -> RawSMTP:
        """
        A session after the greeting and EHLO.  C{kind} is a listener
        (C{"plain"}, C{"starttls"}, C{"implicit"}) or C{"starttls+tls"}: the
        STARTTLS listener after STARTTLS and a second EHLO.
        """
        client = self.raw(kind.split("+")[0], source)
        self.assertReply(client.reply(), 220)
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        if kind == "starttls+tls":
            self.assertReply(client.command("STARTTLS"), 220, "2.0.0")
            client.startTLS()
            self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        return client

    def authReply(
        self, source: str, user: str = USER, password: str = PASSWORD
    ) -> SMTPReply:
        """
        The reply to one AUTH PLAIN on a new implicit TLS session from
        C{source}.
        """
        client = self.session("implicit", source)
        reply = client.command("AUTH PLAIN " + plainResponse(user, password))
        client.close()
        return reply

    def authenticated(self, source: str | None = None) -> RawSMTP:
        """
        An implicit TLS session after EHLO and a good AUTH PLAIN as C{alice}.
        """
        client = self.session("implicit", source)
        self.assertReply(
            client.command("AUTH PLAIN " + plainResponse(USER, PASSWORD)),
            235,
            "2.7.0",
        )
        return client

    def startMessage(self, client: RawSMTP, recipient: str) -> None:
        """
        MAIL FROM the user's own address, one RCPT, DATA.
        """
        self.assertReply(client.command(f"MAIL FROM:<{ALICE_ADDRESS}>"), 250, "2.1.0")
        self.assertReply(client.command(f"RCPT TO:<{recipient}>"), 250, "2.1.5")
        self.assertReply(client.command("DATA"), 354)

    def message(self, marker: str, body: bytes = b"Hello.\r\n") -> bytes:
        """
        A small message with CRLF line endings and C{marker} as Subject.
        """
        return (
            f"From: <{ALICE_ADDRESS}>\r\nTo: <rcpt@rcpt.example>\r\n"
            f"Subject: {marker}\r\n\r\n".encode()
            + body
        )

    def waitForLog(self, pattern: str) -> str:
        """
        Wait for a line of the relay's log matching C{pattern}; return it.
        """
        regex = re.compile(pattern)

        def check() -> str | None:
            for line in self.relay.log().splitlines():
                if regex.search(line):
                    return line
            return None

        return poll(
            check,
            IO_TIMEOUT,
            lambda: f"a log line matching {pattern!r}:\n{self.relay.log()[-4000:]}",
        )

    def filesMentioning(self, text: str) -> list[str]:
        """
        The files in the spool and the Maildir whose contents mention
        C{text}.
        """
        needle = text.encode()
        found = []
        roots = [self.relay.queueDirectory, self.relay.maildir]
        for root in roots:
            for directory, _, names in os.walk(root):
                for name in names:
                    path = os.path.join(directory, name)
                    if not os.path.isfile(path):
                        continue  # the control socket, the lock
                    try:
                        with open(path, "rb") as f:
                            if needle in f.read():
                                found.append(path)
                    except (FileNotFoundError, IsADirectoryError):
                        pass
        return found

    def assertServes(self, kind: str = "plain") -> None:
        """
        A fresh client on listener C{kind} is greeted and gets 250 to EHLO
        and NOOP.
        """
        client = self.session(kind)
        self.assertReply(client.command("NOOP"), 250, "2.0.0")
        client.close()

    # -- 1. credential stuffing ---------------------------------------------

    def test_stuffingFromOneAddress(self) -> None:
        """
        Three wrong passwords from one address (the third closes the session
        with 421 4.7.0) lock that address: even the right password then gets
        454 4.7.0, and the relay logs C{lockout start kind=ip ...
        client=<ip>}.  Another user from the same /24 and the same user from
        another /24 still log in (235).
        """
        attacker, elsewhere = nextSubnets()
        ip = f"{attacker}.1"
        client = self.session("implicit", ip)
        for guess in ("123456", "password"):
            self.assertReply(
                client.command("AUTH PLAIN " + plainResponse(USER, guess)),
                535,
                "5.7.8",
            )
        self.assertReply(
            client.command("AUTH PLAIN " + plainResponse(USER, "qwerty")),
            535,
            "5.7.8",
        )
        closing = client.readUntilClosed()
        self.assertEqual(
            [(r.code, r.enhanced) for r in closing],
            [(421, "4.7.0")],
            [str(r) for r in closing],
        )
        self.assertReply(self.authReply(ip), 454, "4.7.0")
        self.waitForLog(
            rf"lockout start kind=ip key=ip:{re.escape(ip)} "
            rf"client={re.escape(ip)} user={USER} failures=3 duration=\d+s"
        )
        self.assertReply(
            self.authReply(f"{attacker}.2", OTHER_USER, OTHER_PASSWORD), 235, "2.7.0"
        )
        self.assertReply(self.authReply(f"{elsewhere}.1"), 235, "2.7.0")

    def test_stuffingFromManyAddressesLocksUserInSubnet(self) -> None:
        """
        One wrong password for C{alice} from each of three addresses of one
        /24 locks C{alice} in that /24 (C{lockout start kind=user
        key=user:alice@<net>/24}): a fourth address with the right password
        gets 454 4.7.0.  C{bob} from the same /24, and C{alice} from another
        /24, still log in (235).
        """
        attacker, elsewhere = nextSubnets()
        for host in (1, 2, 3):
            self.assertReply(
                self.authReply(f"{attacker}.{host}", USER, f"guess{host}"),
                535,
                "5.7.8",
            )
        self.assertReply(self.authReply(f"{attacker}.4"), 454, "4.7.0")
        self.waitForLog(
            rf"lockout start kind=user key=user:{USER}@{re.escape(attacker)}\.0/24 "
            rf"client={re.escape(attacker)}\.3 user={USER} failures=3"
        )
        self.assertReply(
            self.authReply(f"{attacker}.5", OTHER_USER, OTHER_PASSWORD), 235, "2.7.0"
        )
        self.assertReply(self.authReply(f"{elsewhere}.4"), 235, "2.7.0")

    def test_stuffingFromManyAddressesLocksSubnet(self) -> None:
        """
        Six addresses of one /24 each trying a different user once reach
        C{subnet_max_failures} and lock the /24 (C{lockout start kind=net
        key=net:<net>/24}): C{bob}, never tried, gets 454 4.7.0 from a new
        address there with the right password, yet logs in (235) from
        another /24.
        """
        attacker, elsewhere = nextSubnets()
        for host in range(1, 7):
            self.assertReply(
                self.authReply(f"{attacker}.{host}", f"admin{host}", "admin"),
                535,
                "5.7.8",
            )
        self.assertReply(
            self.authReply(f"{attacker}.7", OTHER_USER, OTHER_PASSWORD), 454, "4.7.0"
        )
        self.waitForLog(
            rf"lockout start kind=net key=net:{re.escape(attacker)}\.0/24 "
            rf"client={re.escape(attacker)}\.6 user=admin6 failures=6"
        )
        self.assertReply(
            self.authReply(f"{elsewhere}.7", OTHER_USER, OTHER_PASSWORD), 235, "2.7.0"
        )
        self.assertReply(self.authReply(f"{elsewhere}.8"), 235, "2.7.0")

    def test_logInjectionCannotForgeLockoutLine(self) -> None:
        """
        AUTH identities written to look like the relay's fixed lockout line
        (C{lockout start kind=ip key=ip:203.0.113.9 client=203.0.113.9
        ...}), after a space or after a newline, through PLAIN and LOGIN,
        never make the shipped fail2ban filter (C{etc/fail2ban/filter.d})
        match a log line naming an address the relay did not lock: else
        anybody could have fail2ban ban any address, such as the office's.
        """
        attacker, _ = nextSubnets()
        source = f"{attacker}.1"
        forged = ["203.0.113.9", "203.0.113.10", "203.0.113.11"]

        def fake(address: str) -> str:
            return (
                f"lockout start kind=ip key=ip:{address} client={address} "
                f"user=x failures=5 duration=900s"
            )

        client = self.session("implicit", source)
        self.assertReply(
            client.command("AUTH PLAIN " + plainResponse("x " + fake(forged[0]), "pw")),
            535,
            "5.7.8",
        )
        self.assertReply(
            client.command("AUTH LOGIN " + b64("y\n" + fake(forged[1]))), 334
        )
        self.assertReply(client.command(b64("pw")), 535, "5.7.8")
        client.close()
        # A third identity, in the session that logs in afterwards: an
        # authorization identity that is refused is logged too.
        client = self.session("implicit", f"{attacker}.2")
        self.assertReply(
            client.command(
                "AUTH PLAIN " + b64(f"z {fake(forged[2])}\0{USER}\0{PASSWORD}")
            ),
            535,
            "5.7.8",
        )
        client.close()
        poll(
            lambda: self.relay.log().count(f" from {attacker}.") >= 3,
            IO_TIMEOUT,
            lambda: f"three failed logins from {attacker}.0/24 in the log",
        )
        pattern = fail2banPattern()
        matched = [
            (m.group("host"), line)
            for line in self.relay.log().splitlines()
            if (m := pattern.search(line)) is not None
        ]
        faked = [line for host, line in matched if host in forged]
        self.assertEqual(faked, [], "the fail2ban filter matches forged lines")

    # -- 2. forged senders ----------------------------------------------------

    def test_forgedSenders(self) -> None:
        """
        After AUTH as C{alice} (allowed only C{alice@example.org}), each
        C{MAIL FROM} in L{FORGED_SENDERS} gets its expected reply: 250
        2.1.0 for spellings of her own address, 553 5.7.1 for anybody
        else's however written, 501 5.1.7 for bad syntax.
        """
        wrong = []
        for argument, code, enhanced, what in FORGED_SENDERS:
            client = self.authenticated()
            reply = client.command(b"MAIL FROM:" + argument.encode("utf-8"))
            if (reply.code, reply.enhanced) != (code, enhanced):
                wrong.append(
                    f"{argument!r} ({what}): expected {code} {enhanced}, got {reply}"
                )
            client.close()
        self.assertEqual(wrong, [], "\n".join(wrong))

    # -- 3. open-relay probes ---------------------------------------------------

    def assertNoOpenRelay(self, kind: str) -> None:
        """
        On a session of C{kind} without AUTH, every probe of
        L{relayProbes} as MAIL FROM gets 530 5.7.0 (501 5.1.7 if malformed),
        then RCPT TO gets 503 5.5.1 and DATA 503 5.5.1; nothing mentioning
        the probes reaches the spool or the Maildir.
        """
        victim = f"victim-{uuid.uuid4().hex[:12]}"
        wrong = []
        for probe, valid in relayProbes(victim):
            client = self.session(kind)
            expected = [(530, "5.7.0") if valid else (501, "5.1.7")]
            expected += [(503, "5.5.1"), (503, "5.5.1")]
            got = [
                client.command(f"MAIL FROM:{probe}"),
                client.command(f"RCPT TO:{probe}"),
                client.command("DATA"),
            ]
            if [(r.code, r.enhanced) for r in got] != expected:
                wrong.append(f"{probe}: {[str(r) for r in got]}")
            client.close()
        self.assertEqual(wrong, [], "\n".join(wrong))
        self.assertEqual(self.filesMentioning(victim), [])

    def test_openRelayProbesPlainListener(self) -> None:
        """
        No relay without AUTH on the plain (C{tls = "none"}) listener:
        percent hack, source routes, quoted local parts, IP literals and !
        paths all get 530 5.7.0 (or 501 5.1.7), nothing is queued.
        """
        self.assertNoOpenRelay("plain")

    def test_openRelayProbesStartTLSListenerBeforeTLS(self) -> None:
        """
        No relay without AUTH on the STARTTLS listener before STARTTLS.
        """
        self.assertNoOpenRelay("starttls")

    def test_openRelayProbesStartTLSListenerAfterTLS(self) -> None:
        """
        No relay without AUTH on the STARTTLS listener after STARTTLS: TLS
        alone gives no right to relay.
        """
        self.assertNoOpenRelay("starttls+tls")

    def test_openRelayProbesImplicitTLSListener(self) -> None:
        """
        No relay without AUTH on the implicit TLS listener.
        """
        self.assertNoOpenRelay("implicit")

    # -- 4. SMTP smuggling ------------------------------------------------------

    def test_smugglingEndSequences(self) -> None:
        """
        After AUTH, a message hiding a second transaction behind each
        look-alike of the end of data in L{SMUGGLING_ENDS} gets exactly one
        reply, 550 5.6.11, after the real final dot; the session goes on
        (NOOP 250), and neither the message nor the smuggled one is queued
        or delivered, while a clean message sent afterwards is.
        """
        tag = uuid.uuid4().hex[:12]
        client = self.authenticated()
        for i, end in enumerate(SMUGGLING_ENDS):
            self.startMessage(client, f"rcpt-{tag}@rcpt.example")
            smuggled = (
                b"MAIL FROM:<" + ALICE_ADDRESS.encode() + b">\r\n"
                b"RCPT TO:<victim-" + tag.encode() + b"@evil.example>\r\n"
                b"DATA\r\n"
                b"From: <ceo@example.org>\r\n"
                b"Subject: smuggled-" + tag.encode() + b"\r\n\r\n"
                b"Wire the money.\r\n"
            )
            client.send(
                self.message(f"outer-{tag}-{i}", b"first" + end + smuggled) + b".\r\n"
            )
            self.assertReply(client.reply(), 550, "5.6.11")
            self.assertReply(client.command("NOOP"), 250, "2.0.0")
        marker = f"clean-{tag}"
        self.startMessage(client, f"rcpt-{tag}@rcpt.example")
        client.send(self.message(marker) + b".\r\n")
        self.assertReply(client.reply(), 250, "2.0.0")
        self.relay.waitForDelivery(marker.encode())
        self.assertEqual(self.filesMentioning(f"smuggled-{tag}"), [])
        self.assertEqual(self.filesMentioning(f"outer-{tag}"), [])

    # -- 5. overlong lines ------------------------------------------------------

    def test_overlongCommands(self) -> None:
        """
        Command lines over their limits (600 and 100,000 octets; MAIL over
        1,052; EHLO and RCPT over 512) each get exactly one 500 5.5.2, and
        the session keeps working, including a command pipelined behind
        the overlong one.
        """
        client = self.session("starttls")
        self.assertReply(client.command(b"NOOP " + b"n" * 595), 500, "5.5.2")
        self.assertReply(client.command(b"NOOP " + b"n" * 100000), 500, "5.5.2")
        self.assertReply(client.command(b"EHLO " + b"h" * 600), 500, "5.5.2")
        self.assertReply(
            client.command(b"MAIL FROM:<" + b"m" * 1100 + b"@example.org>"),
            500,
            "5.5.2",
        )
        self.assertReply(client.command(b"RCPT TO:<" + b"r" * 590 + b">"), 500, "5.5.2")
        client.send(b"x" * 100000 + b"\r\nNOOP\r\n")
        self.assertReply(client.reply(), 500, "5.5.2")
        self.assertReply(client.reply(), 250, "2.0.0")
        self.assertReply(client.command(f"EHLO {CLIENT_NAME}"), 250)
        self.assertReply(client.command("NOOP"), 250, "2.0.0")

    def test_overlongDataLines(self) -> None:
        """
        After AUTH, a message with a line of 1,001 octets (CRLF included),
        100,000 octets or 1,000,000 octets gets 554 5.6.0 after the final
        dot and is not queued; the session goes on and a clean message is
        delivered.
        """
        tag = uuid.uuid4().hex[:12]
        client = self.authenticated()
        for length in (999, 100000, 1000000):
            marker = f"long-{tag}-{length}"
            self.startMessage(client, f"rcpt-{tag}@rcpt.example")
            client.send(self.message(marker, b"y" * length + b"\r\n") + b".\r\n")
            self.assertReply(client.reply(), 554, "5.6.0")
            self.assertReply(client.command("NOOP"), 250, "2.0.0")
        marker = f"fine-{tag}"
        self.startMessage(client, f"rcpt-{tag}@rcpt.example")
        client.send(self.message(marker, b"y" * 998 + b"\r\n") + b".\r\n")
        self.assertReply(client.reply(), 250, "2.0.0")
        self.relay.waitForDelivery(marker.encode())
        self.assertEqual(self.filesMentioning(f"long-{tag}"), [])

    # -- 6. other protocols and random bytes -----------------------------------

    def test_tlsClientHelloOnPlainPorts(self) -> None:
        """
        A TLS ClientHello on the plain listener, and on the STARTTLS
        listener before STARTTLS, closes that connection without a reply;
        both listeners still serve a fresh client.
        """
        hello = tlsClientHello()
        self.assertEqual(hello[:2], b"\x16\x03")
        for kind in ("plain", "starttls"):
            client = self.raw(kind)
            self.assertReply(client.reply(), 220)
            client.send(hello)
            self.assertTrue(client.closedWithoutReply(), kind)
            self.assertServes(kind)

    def test_httpRequestOnSMTPPorts(self) -> None:
        """
        An HTTP request (GET, POST, or a proxy CONNECT) on the plain or the
        STARTTLS listener closes that connection without a reply; both
        still serve a fresh client.
        """
        for kind in ("plain", "starttls"):
            for request in HTTP_REQUESTS:
                client = self.raw(kind)
                self.assertReply(client.reply(), 220)
                client.send(request)
                self.assertTrue(
                    client.closedWithoutReply(), f"{kind}: {request[:20]!r}"
                )
            self.assertServes(kind)

    def readRepliesUntilClosed(self, client: RawSMTP) -> list[SMTPReply]:
        """
        Every (well-formed) reply until the relay closes or resets the
        connection.
        """
        result = []
        while True:
            try:
                result.append(client.reply())
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                return result

    def test_randomBytesOnPlainPort(self) -> None:
        """
        64 KiB of (seeded) random bytes on the plain listener get only
        well-formed replies (500 5.5.1 per line) until the relay closes the
        session with 421 4.7.0 after 20 errors; a fresh client is served.
        """
        data = random.Random(5).randbytes(65536)
        client = self.raw("plain")
        self.assertReply(client.reply(), 220)
        try:
            client.send(data)
        except (ConnectionResetError, BrokenPipeError):
            pass
        replies = self.readRepliesUntilClosed(client)
        codes = [(r.code, r.enhanced) for r in replies]
        self.assertTrue(codes, "no reply at all")
        self.assertEqual(codes[-1], (421, "4.7.0"), [str(r) for r in replies])
        self.assertTrue(all(c[0] == 500 for c in codes[:-1]), [str(r) for r in replies])
        self.assertServes("plain")

    def test_randomBytesOnImplicitTLSPort(self) -> None:
        """
        64 KiB of random bytes instead of a TLS handshake on the implicit
        TLS listener: the relay closes the connection and still serves a
        fresh TLS client.
        """
        data = random.Random(6).randbytes(65536)
        sock = socket.create_connection(
            (HOST, self.relay.implicitPort),
            timeout=IO_TIMEOUT,
            source_address=(nextSourceAddress(), 0),
        )
        self.addCleanup(sock.close)
        try:
            sock.sendall(data)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        self.assertServes("implicit")

    def test_randomBytesAsMessage(self) -> None:
        """
        After AUTH, 64 KiB of (seeded) random bytes as a message (bare CR
        and LF, and no CRLF for far more than 1,000 octets) is refused after
        the final dot with 554 5.6.0 and not queued; the session goes on.
        """
        data = random.Random(7).randbytes(65536)
        self.assertNotIn(b"\r\n.\r\n", data)
        tag = uuid.uuid4().hex[:12]
        client = self.authenticated()
        self.startMessage(client, f"rcpt-{tag}@rcpt.example")
        client.send(self.message(f"random-{tag}", data) + b"\r\n.\r\n")
        self.assertReply(client.reply(), 554, "5.6.0")
        self.assertReply(client.command("NOOP"), 250, "2.0.0")
        self.assertEqual(self.filesMentioning(f"random-{tag}"), [])

    # -- 7. AUTH abuse ----------------------------------------------------------

    def test_authInvalidBase64(self) -> None:
        """
        Invalid base64 in an AUTH initial response or a continuation (PLAIN
        and LOGIN), and base64 of something that is not a PLAIN message,
        get 501 5.5.2; none counts as a failed login, and the same session
        then logs in (235).
        """
        variants: list[list[tuple[bytes, int, str]]] = [
            [(b"AUTH PLAIN !!!not-base64!!!", 501, "5.5.2")],
            [(b"AUTH PLAIN", 334, ""), (b"@@@@", 501, "5.5.2")],
            [(b"AUTH LOGIN", 334, ""), (b"%%%%", 501, "5.5.2")],
            [
                (b"AUTH LOGIN " + b64(USER).encode(), 334, ""),
                (b"not base64 either", 501, "5.5.2"),
            ],
            [(b"AUTH PLAIN " + b64("no separators").encode(), 501, "5.5.2")],
        ]
        for steps in variants:
            client = self.session("implicit")
            for line, code, enhanced in steps:
                self.assertReply(client.command(line), code, enhanced)
            self.assertReply(
                client.command("AUTH PLAIN " + plainResponse(USER, PASSWORD)),
                235,
                "2.7.0",
            )
            client.close()

    def test_authOversizedResponse(self) -> None:
        """
        An AUTH response of 13,000 octets (over RFC 4954's 12,288), as a
        continuation or as the initial response, and one of 100,000 octets,
        each get one 500 5.5.2; the session then logs in (235).
        """
        variants: list[list[tuple[bytes, int, str]]] = [
            [(b"AUTH PLAIN", 334, ""), (b"A" * 13000, 500, "5.5.2")],
            [(b"AUTH PLAIN " + b"A" * 13000, 500, "5.5.2")],
            [(b"AUTH LOGIN", 334, ""), (b"A" * 13000, 500, "5.5.2")],
            [(b"AUTH PLAIN", 334, ""), (b"A" * 100000, 500, "5.5.2")],
        ]
        for steps in variants:
            client = self.session("implicit")
            for line, code, enhanced in steps:
                self.assertReply(client.command(line), code, enhanced)
            self.assertReply(
                client.command("AUTH PLAIN " + plainResponse(USER, PASSWORD)),
                235,
                "2.7.0",
            )
            client.close()

    # -- 8. idle connections ----------------------------------------------------

    def openIdle(self, count: int) -> Iterator[tuple[str, socket.socket]]:
        """
        Open C{count} connections, spread over the three listeners and over
        L{IDLE_PER_ADDRESS} per source address; on the plain and STARTTLS
        listeners wait for the greeting (so the relay has accepted them),
        on the implicit TLS one start no handshake.
        """
        subnet = "127.3"
        kinds = ("plain", "starttls", "implicit")
        ports = {
            "plain": self.relay.plainPort,
            "starttls": self.relay.starttlsPort,
            "implicit": self.relay.implicitPort,
        }
        for i in range(count):
            n = i // IDLE_PER_ADDRESS
            source = f"{subnet}.{n // 250}.{n % 250 + 1}"
            kind = kinds[i % 3]
            sock = socket.create_connection(
                (HOST, ports[kind]), timeout=IO_TIMEOUT, source_address=(source, 0)
            )
            if kind != "implicit":
                greeting = b""
                while b"\r\n" not in greeting:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise AssertionError(
                            f"connection {i} ({kind} from {source}) closed: "
                            f"{greeting!r}"
                        )
                    greeting += chunk
                if not greeting.startswith(b"220 "):
                    raise AssertionError(f"connection {i} refused: {greeting!r}")
            yield kind, sock

    def test_thousandIdleConnections(self) -> None:
        """
        With 1,000 idle connections held open (greeted on the plain and
        STARTTLS listeners, mid-handshake on the implicit TLS one), a normal
        client completes STARTTLS, AUTH and a message within a few seconds,
        the message is delivered, and idle connections still answer.
        """
        available = min(self.fileLimit, raiseFileLimit(FILE_LIMIT_WANTED))
        count = IDLE_CONNECTIONS
        if available < FILE_LIMIT_WANTED:
            count = max(MIN_IDLE_CONNECTIONS, (available - 512) // 2)
            warnings.warn(
                f"open-file limit is {available}, below the {FILE_LIMIT_WANTED} "
                f"needed for {IDLE_CONNECTIONS} idle connections: holding "
                f"only {count} (raise it with ulimit -n)",
                stacklevel=1,
            )
        idle: list[tuple[str, socket.socket]] = []

        def closeAll() -> None:
            for _, sock in idle:
                sock.close()

        self.addCleanup(closeAll)
        for item in self.openIdle(count):
            idle.append(item)
        self.assertEqual(len(idle), count)

        marker = f"idle-{uuid.uuid4().hex}"
        started = time.monotonic()
        client = smtplib.SMTP(
            HOST,
            self.relay.starttlsPort,
            local_hostname=CLIENT_NAME,
            timeout=IO_TIMEOUT,
            source_address=(nextSourceAddress(), 0),
        )
        self.addCleanup(client.close)
        client.ehlo()
        client.starttls(context=clientContext())
        client.ehlo()
        client.login(USER, PASSWORD)
        refused = client.sendmail(
            ALICE_ADDRESS, ["rcpt@rcpt.example"], self.message(marker)
        )
        client.quit()
        elapsed = time.monotonic() - started
        self.assertEqual(refused, {})
        self.assertLess(elapsed, TRANSACTION_DEADLINE)
        self.relay.waitForDelivery(marker.encode())

        plain = next(sock for kind, sock in idle if kind == "plain")
        plain.sendall(b"NOOP\r\n")
        self.assertTrue(plain.recv(4096).startswith(b"250 2.0.0"))
        implicit = next(sock for kind, sock in idle if kind == "implicit")
        tls = clientContext().wrap_socket(implicit)
        self.assertTrue(tls.recv(4096).startswith(b"220 "))
        tls.close()


# -- the state machine, in memory --------------------------------------------

TRUSTED_NETWORK = "192.0.2.0/24"
PEERS = ["192.0.2.10", "192.0.2.11", "198.51.100.7", "198.51.100.8", "2001:db8::7"]
USERS = {"alice": "wonderland", "bob": "builder"}
"""The users of L{tests.support.Harness}'s memory checker."""
MEMORY_SENDER_MAP = "alice: alice@example.org\nbob: @example.net, <>\n"
HARNESS_LOCKOUT = LockoutConfig(max_failures=5, tarpit=1.0, session_max_failures=3)

KNOWN_SENDERS: list[tuple[bytes, frozenset[str]]] = [
    # (MAIL FROM path, users allowed to use it)
    (b"<alice@example.org>", frozenset({"alice"})),
    (b'<"alice"@example.org>', frozenset({"alice"})),
    (b"<alice@EXAMPLE.ORG>", frozenset({"alice"})),
    (b"<alice+tag@example.org>", frozenset({"alice"})),
    (b"<@hop.example:alice@example.org>", frozenset({"alice"})),
    (b"<bob@example.net>", frozenset({"bob"})),
    (b"<anyone@EXAMPLE.NET>", frozenset({"bob"})),
    (b"<>", frozenset({"bob"})),
] + [
    (path.encode("utf-8"), frozenset())
    for path, code, _, _ in FORGED_SENDERS
    if code != 250 and path != "<>"
]

_CRLF_FREE = st.binary(max_size=60).map(
    lambda b: b.replace(b"\r", b"\r ").replace(b"\n", b" \n")
)
"""Bytes with no CRLF (bare CR and LF kept)."""
_ONE_LINE = st.binary(max_size=80).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
)
"""Bytes with neither CR nor LF."""

_UTF8 = st.lists(
    st.sampled_from(
        ["h\u00e9llo", "\u65e5\u672c\u8a9e", "\u202e", "\ufeff", "\u00a0", "\U0001f4e7"]
    ).map(lambda t: t.encode("utf-8")),
    max_size=4,
).map(b"".join)
"""
UTF-8 text (8-bit data).  Drawn from a list: hypothesis compares its recorded
draws, and text beside bytes would trip C{python -b}'s BytesWarning.
"""

senders = st.one_of(
    st.sampled_from([path for path, _ in KNOWN_SENDERS]),
    # Random addresses that nobody may use: the local part starts with "z"
    # (no user's address does), the domain is nobody's.
    st.builds(
        lambda local, domain: b"<z" + local + b"@" + domain + b">",
        st.from_regex(rb"[a-z0-9.%!+\"=_-]{0,12}", fullmatch=True),
        st.sampled_from(
            [b"evil.example", b"[127.0.0.1]", b"example.org.evil.example", b"x"]
        ),
    ),
    _ONE_LINE,
)
parameters = st.sampled_from(
    [
        b"",
        b" SIZE=100",
        b" BODY=8BITMIME",
        b" AUTH=<>",
        b" AUTH=ceo@example.org",
        b" SIZE=99999999999999",
        b" FOO=bar",
        b" SMTPUTF8",
    ]
)
recipients = st.one_of(
    st.sampled_from(
        [
            b"<rcpt@rcpt.example>",
            b"<victim%evil.example@relay.example.org>",
            b"<@relay.example.org:victim@evil.example>",
            b'<"victim@evil.example"@relay.example.org>',
            b"<victim@[127.0.0.1]>",
            b"<evil.example!victim@relay.example.org>",
            b"<postmaster>",
            b"<>",
        ]
    ),
    _ONE_LINE,
)
bodyLines = st.lists(
    st.one_of(
        _CRLF_FREE,
        st.sampled_from(
            [
                b"",
                b".",
                b"..",
                b". ",
                b"\n.\n",
                b"\r.\r",
                b".\r",
                b"\n.",
                b"Subject: hello",
                b"From: <ceo@example.org>",
                b"Received: from x",
                b"MAIL FROM:<ceo@example.org>",
            ]
        ),
        _UTF8,
    ),
    max_size=12,
)
heloNames = st.one_of(
    st.sampled_from(
        [b"client.example", b"[192.0.2.1]", b"", b"x" * 300, b"a b\x00c", b"\xff\xfe"]
    ),
    _ONE_LINE,
)
garbage = st.one_of(
    _ONE_LINE,
    st.builds(
        lambda verb, rest: verb + b" " + rest,
        st.sampled_from(
            [
                b"MAIL",
                b"RCPT",
                b"DATA",
                b"AUTH",
                b"STARTTLS",
                b"EHLO",
                b"HELO",
                b"VRFY",
                b"EXPN",
                b"HELP",
                b"BDAT",
                b"XCLIENT",
                b"GET",
                b"mail from:",
            ]
        ),
        _ONE_LINE,
    ),
    st.sampled_from([b"n" * 600, b"AUTH " + b"A" * 13000, b"\x16\x03\x01\x02\x00"]),
)

_REPLY_LINE = re.compile(rb"\d{3}[ -]")
_ENHANCED = re.compile(rb"(\d)\d\d[ -]([245])\.\d{1,3}\.\d{1,3}(?: |\Z)")


def parseReplies(lines: list[bytes]) -> list[tuple[int, list[bytes]]]:
    """
    Group reply lines into replies, checking each line's form.

    @raise AssertionError: for a line that is not C{^\\d{3}[ -]}, or a
        multi-line reply left unfinished.
    """
    replies = []
    current: list[bytes] = []
    for line in lines:
        if not _REPLY_LINE.match(line):
            raise AssertionError(f"not an SMTP reply line: {line!r}")
        current.append(line)
        if line[3:4] == b" ":
            replies.append((int(line[:3]), current))
            current = []
    if current:
        raise AssertionError(f"unfinished multi-line reply: {current!r}")
    return replies


def checkEnhancedCodes(replies: list[tuple[int, list[bytes]]]) -> None:
    """
    Every reply other than 334, 354 and the 250 to EHLO/HELO carries an
    enhanced status code (RFC 2034) of its class on every line.
    """
    for code, lines in replies:
        if code in (334, 354):
            continue
        if code == 250 and lines[0][4:].startswith(b"relay.example.org Hello "):
            continue
        for line in lines:
            match = _ENHANCED.match(line)
            if match is None or match.group(1) != match.group(2):
                raise AssertionError(f"no enhanced status code: {line!r} in {lines!r}")


def wireBody(lines: list[bytes]) -> bytes:
    """
    A message body as sent after DATA: dot-stuffed, CRLF after each line,
    then the final dot.
    """
    return (
        b"".join(
            (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
        )
        + b".\r\n"
    )


class SMTPSessions(RuleBasedStateMachine):
    """
    Random command sequences against L{RelayESMTP} in memory, one listener
    (STARTTLS, implicit TLS or none) per example, sessions from trusted and
    untrusted peers.  See L{StateMachineTests}.
    """

    stats: ClassVar[dict[str, int]] = {}

    def __init__(self, senderMapPath: str) -> None:
        super().__init__()
        self.senderMapPath = senderMapPath
        self.harness: Harness | None = None
        self.session: Session | None = None
        self.peer = PEERS[0]

    # -- model --------------------------------------------------------------

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    @property
    def trusted(self) -> bool:
        return self.peer.startswith("192.0.2.")

    def connect(self, peer: str) -> None:
        assert self.harness is not None
        if self.session is not None:
            self.session.protocol.connectionLost(Failure(ConnectionDone()))
        self.peer = peer
        self.session = self.harness.connect(peer)
        replies = parseReplies(self.session.greeting)
        assert [code for code, _ in replies] == [220], self.session.greeting
        self.secure = self.harness.settings.tlsMode == "implicit"
        self.tlsHandled = False
        self.authenticatedAs: str | None = None

    def send(self, data: bytes) -> list[tuple[int, list[bytes]]]:
        """
        Feed C{data} to the protocol (reconnecting first if the session was
        closed), let any tarpit delay pass, and check the replies and the
        spool.
        """
        assert self.harness is not None
        if self.session is None or self.session.closed():
            self.connect(self.peer)
        session = self.session
        assert session is not None
        spool = self.harness.spool
        before = set(spool.messages)
        session.protocol.dataReceived(data)
        self.harness.clock.advance(HARNESS_LOCKOUT.tarpit)
        out = session.transport.value()
        session.transport.clear()
        transport: Any = session.transport
        if transport.tlsStarted is not None and not self.tlsHandled:
            # STARTTLS was accepted: the 220 went out before the switch.
            out = transport.beforeTLS + out
            self.tlsHandled = True
            self.secure = True
            self.authenticatedAs = None
            session.protocol.handshakeCompleted()
        assert not out or out.endswith(b"\r\n"), out
        replies = parseReplies(out.split(b"\r\n")[:-1])
        checkEnhancedCodes(replies)
        for queueId in set(spool.messages) - before:
            envelope, stored = spool.messages[queueId]
            assert self.authenticatedAs is not None or self.trusted, (
                f"message {queueId} spooled for an unauthenticated, untrusted "
                f"client {self.peer}"
            )
            assert envelope.authUser == self.authenticatedAs, envelope
            assert b"\r" not in stored, stored
            self.count(
                "spooled-authenticated" if envelope.authUser else "spooled-trusted"
            )
        return replies

    def codes(self, replies: list[tuple[int, list[bytes]]]) -> list[int]:
        return [code for code, _ in replies]

    def assertNo235(self, replies: list[tuple[int, list[bytes]]]) -> None:
        assert 235 not in self.codes(replies), replies

    # -- rules ----------------------------------------------------------------

    @initialize(mode=st.sampled_from(["starttls", "implicit", "none"]))
    def start(self, mode: str) -> None:
        self.harness = Harness(
            trustedNetworks=(TRUSTED_NETWORK,),
            lockout=HARNESS_LOCKOUT,
            tlsMode=mode,
        )
        self.harness.factory.senders = SenderLoginMap(self.senderMapPath)
        self.connect(PEERS[2])

    @rule(peer=st.sampled_from(PEERS))
    def reconnect(self, peer: str) -> None:
        self.connect(peer)

    @rule(esmtp=st.booleans(), name=heloNames)
    def greet(self, esmtp: bool, name: bytes) -> None:
        self.assertNo235(self.send((b"EHLO " if esmtp else b"HELO ") + name + b"\r\n"))

    @rule(injected=st.booleans())
    def startTLS(self, injected: bool) -> None:
        """
        STARTTLS, optionally with a good AUTH and a MAIL pipelined behind it
        in the same packet (CVE-2011-0411): they must never be answered.
        """
        data = b"STARTTLS\r\n"
        if injected:
            data += (
                b"AUTH PLAIN "
                + plainResponse("alice", USERS["alice"]).encode()
                + b"\r\nMAIL FROM:<alice@example.org>\r\n"
            )
        wasSecure, wasHandled = self.secure, self.tlsHandled
        replies = self.send(data)
        if self.tlsHandled and not wasHandled:
            # TLS started: what was pipelined behind STARTTLS is dropped.
            assert self.codes(replies) == [220], replies
        elif 235 in self.codes(replies):
            # Already encrypted, with a SASL exchange pending: "STARTTLS"
            # was taken as its (bad) response, and the AUTH after it is an
            # honest login over TLS.
            assert injected and wasSecure, replies
            self.authenticatedAs = "alice"
            self.count("auth-ok")

    @rule(
        user=st.sampled_from(sorted(USERS)),
        mechanism=st.sampled_from(["PLAIN", "PLAIN-2", "LOGIN", "LOGIN-1"]),
        prelude=st.booleans(),
    )
    def authGood(self, user: str, mechanism: str, prelude: bool) -> None:
        """
        A good login; with C{prelude}, first what a real client does: EHLO,
        and STARTTLS and EHLO again when STARTTLS is offered.
        """
        if prelude:
            replies = self.send(b"EHLO client.example\r\n")
            if any(line[4:] == b"STARTTLS" for _, lines in replies for line in lines):
                self.send(b"STARTTLS\r\n")
                self.send(b"EHLO client.example\r\n")
        password = USERS[user]
        if mechanism == "PLAIN":
            steps = [b"AUTH PLAIN " + plainResponse(user, password).encode()]
        elif mechanism == "PLAIN-2":
            steps = [b"AUTH PLAIN", plainResponse(user, password).encode()]
        elif mechanism == "LOGIN":
            steps = [b"AUTH LOGIN", b64(user).encode(), b64(password).encode()]
        else:
            steps = [b"AUTH LOGIN " + b64(user).encode(), b64(password).encode()]
        for step in steps:
            replies = self.send(step + b"\r\n")
            if 235 in self.codes(replies):
                assert self.secure, "AUTH succeeded without TLS"
                self.authenticatedAs = user
                self.count("auth-ok")
            if self.codes(replies)[-1:] != [334]:
                return

    @rule(
        user=st.sampled_from(["alice", "bob", "mallory", "root"]),
        password=st.sampled_from(["", "123456", "Wonderland", "wonderland "]),
    )
    def authBad(self, user: str, password: str) -> None:
        replies = self.send(
            b"AUTH PLAIN " + plainResponse(user, password).encode() + b"\r\n"
        )
        self.assertNo235(replies)

    @rule(
        steps=st.sampled_from(
            [
                [b"AUTH PLAIN !!!"],
                [b"AUTH PLAIN", b"@@@"],
                [b"AUTH PLAIN", b"*"],
                [b"AUTH PLAIN", b"A" * 13000],
                [b"AUTH PLAIN ="],
                [b"AUTH PLAIN " + b64("alice").encode()],
                [b"AUTH PLAIN " + b64("bob\0alice\0wonderland").encode()],
                [b"AUTH LOGIN", b"*"],
                [b"AUTH LOGIN " + b64("alice").encode(), b"%%%"],
                [b"AUTH CRAM-MD5"],
                [b"AUTH"],
                [b"AUTH PLAIN"],
            ]
        )
    )
    def authMalformed(self, steps: list[bytes]) -> None:
        for step in steps:
            self.assertNo235(self.send(step + b"\r\n"))

    @rule(sender=senders, params=parameters)
    def mail(self, sender: bytes, params: bytes) -> None:
        replies = self.send(b"MAIL FROM:" + sender + params + b"\r\n")
        self.assertNo235(replies)
        if self.codes(replies) == [250]:
            allowed = dict(KNOWN_SENDERS).get(sender, frozenset())
            if self.authenticatedAs is not None:
                assert self.authenticatedAs in allowed, (
                    f"{self.authenticatedAs} may not send as {sender!r}"
                )
            else:
                assert self.trusted, f"MAIL accepted from untrusted {self.peer}"
            self.count("mail-ok")

    @rule(recipient=recipients)
    def rcpt(self, recipient: bytes) -> None:
        self.assertNo235(self.send(b"RCPT TO:" + recipient + b"\r\n"))

    @rule(lines=bodyLines)
    def data(self, lines: list[bytes]) -> None:
        replies = self.send(b"DATA\r\n")
        self.assertNo235(replies)
        if self.codes(replies) != [354]:
            return
        assert self.harness is not None
        before = set(self.harness.spool.messages)
        replies = self.send(wireBody(lines))
        new = set(self.harness.spool.messages) - before
        bare = any(b"\r" in line or b"\n" in line for line in lines)
        assert replies, "no reply to the final dot"
        code, first = replies[0]
        if bare:
            assert first[-1].startswith(b"550 5.6.11 "), replies
            assert not new, new
            self.count("refused-bare")
        else:
            assert first[-1].startswith(b"250 2.0.0 "), replies
            assert len(new) == 1, new
            stored = self.harness.spool.messages[new.pop()][1]
            assert stored.endswith(b"".join(line + b"\n" for line in lines)), stored

    @rule(
        data=st.data(),
        recipient=st.one_of(st.just(b"<rcpt@rcpt.example>"), recipients),
        lines=bodyLines,
    )
    def transaction(
        self, data: st.DataObject, recipient: bytes, lines: list[bytes]
    ) -> None:
        """
        MAIL, RCPT and DATA in a row, as a client would send them, mostly
        from a sender the login may use and to a plain recipient.
        """
        own = [p for p, users in KNOWN_SENDERS if self.authenticatedAs in users]
        sender = data.draw(
            st.sampled_from(own) if own and data.draw(st.booleans()) else senders
        )
        self.mail(sender, b"")
        self.rcpt(recipient)
        self.data(lines)

    @rule(verb=st.sampled_from([b"RSET", b"NOOP", b"QUIT", b"VRFY alice", b"HELP"]))
    def simple(self, verb: bytes) -> None:
        replies = self.send(verb + b"\r\n")
        self.assertNo235(replies)

    @rule(line=garbage, pipelined=st.booleans())
    def junk(self, line: bytes, pipelined: bool) -> None:
        data = line + b"\r\n"
        if pipelined:
            data += b"NOOP\r\n" + line + b"\n"
        self.assertNo235(self.send(data))

    def teardown(self) -> None:
        if self.session is not None:
            self.session.protocol.connectionLost(Failure(ConnectionDone()))


class StateMachineTests(SynchronousTestCase):
    """
    The property-based test of the server's state machine.
    """

    def test_randomSessions(self) -> None:
        """
        Random sequences of EHLO/HELO, STARTTLS (with commands injected
        behind it), good, bad and malformed AUTH, MAIL with valid, forged
        and odd senders, RCPT, DATA with random bodies (bare CR/LF, dot
        lines), RSET, NOOP, QUIT and garbage never make the protocol raise
        or log a failure; every reply line is C{^\\d{3}[ -]} and every reply
        but the greeting, EHLO/HELO, 334 and 354 carries an enhanced status
        code; 235 comes only for good credentials over TLS; MAIL is accepted
        only for a sender the login may use or from a trusted network; and
        a message reaches the spool only from an authenticated session or a
        trusted network, never with a bare CR or LF.
        """
        mapPath = self.mktemp()
        with open(mapPath, "w", encoding="utf-8") as f:
            f.write(MEMORY_SENDER_MAP)
        failures: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_failure") is not None:
                failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        SMTPSessions.stats = {}
        run_state_machine_as_test(
            lambda: SMTPSessions(mapPath),
            settings=settings(
                derandomize=True,
                database=None,
                max_examples=300,
                stateful_step_count=50,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        self.assertEqual(failures, [], [str(e.get("log_failure")) for e in failures])
        stats = SMTPSessions.stats
        # The run must have reached the interesting states, or it proves
        # little: logins, accepted senders, spooled and refused messages.
        for what in ("auth-ok", "mail-ok", "spooled-authenticated", "refused-bare"):
            self.assertGreater(stats.get(what, 0), 0, f"never {what}: {stats}")
