"""
End-to-end tests of life under systemd, with a real C{twistd} process: socket
activation with inherited listening sockets (C{LISTEN_FDS},
C{LISTEN_FDNAMES}, C{LISTEN_PID}), the notify protocol on a real datagram
socket (C{NOTIFY_SOCKET}), reload on a real SIGHUP, a graceful stop on a
real SIGTERM, and JSON logs.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e_support import (
    CLIENT_NAME,
    HOST,
    IO_TIMEOUT,
    PASSWORD,
    STOP_TIMEOUT,
    USER,
    RawSMTP,
    RelayProcess,
    SMTPReply,
    clientContext,
    freePorts,
    poll,
)

#: How long to wait for a notification.
NOTIFY_TIMEOUT = 30.0


class NotifySocket:
    """
    The C{NOTIFY_SOCKET} end systemd holds: a bound datagram socket that
    collects what the service sends.

    @ivar messages: every datagram so far, each as a dict of its
        C{NAME=value} lines.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def waitFor(
        self, test: Callable[[dict[str, str]], bool], why: str
    ) -> dict[str, str]:
        """
        Read datagrams until one passes C{test}; fail after
        L{NOTIFY_TIMEOUT}.
        """
        deadline = time.monotonic() + NOTIFY_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {why} notification in {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            self.messages.append(fields)
            if test(fields):
                return fields


def ready(fields: dict[str, str]) -> bool:
    return fields.get("READY") == "1"


def listeningSocket() -> socket.socket:
    """
    A TCP socket listening on a free loopback port, as systemd would bind
    it; its descriptor is high enough to be moved to 3, 4, ...
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(50)
    # Keep clear of 3, 4, ..., where the relay must find the sockets.
    moved = socket.socket(fileno=fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 16))
    sock.close()
    return moved


def login(client: RawSMTP, starttls: bool = True) -> None:
    """
    Greeting, EHLO, STARTTLS if asked, EHLO, AUTH PLAIN: all must succeed.
    """
    assert client.reply().code == 220
    assert client.command(f"EHLO {CLIENT_NAME}").code == 250
    if starttls:
        assert client.command("STARTTLS").code == 220
        client.startTLS()
        assert client.command(f"EHLO {CLIENT_NAME}").code == 250
    response = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    reply = client.command(f"AUTH PLAIN {response}")
    assert reply.code == 235, str(reply)


def ehloSize(client: RawSMTP) -> int:
    """
    The C{SIZE} a fresh session's EHLO advertises.
    """
    assert client.reply().code == 220
    reply = client.command(f"EHLO {CLIENT_NAME}")
    for line in reply.lines:
        if line.startswith("SIZE "):
            return int(line.split()[1])
    raise AssertionError(f"no SIZE in {reply}")


class SystemdRelayTestCase(SynchronousTestCase):
    """
    A relay per test, with a notify socket.
    """

    def startRelay(self, **kwargs: object) -> tuple[RelayProcess, NotifySocket]:
        relay = RelayProcess(**kwargs)  # type: ignore[arg-type]
        self.addCleanup(relay.remove)
        notify = NotifySocket(relay.directory)
        self.addCleanup(notify.close)
        relay.env["NOTIFY_SOCKET"] = notify.path
        relay.start()
        try:
            notify.waitFor(ready, "READY=1")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{relay.log()}") from None
        return relay, notify

    def waitForExit(self, relay: RelayProcess) -> int:
        process = relay.process
        assert process is not None
        try:
            return process.wait(STOP_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after SIGTERM\n{relay.log()}")

    def signal(self, relay: RelayProcess, signum: int) -> None:
        assert relay.process is not None
        relay.process.send_signal(signum)


class SocketActivationTests(SystemdRelayTestCase):
    """
    Listeners on C{systemd:} endpoints take the sockets systemd hands over.
    """

    def activated(
        self, endpoints: list[tuple[str, str]], names: tuple[str, ...]
    ) -> tuple[RelayProcess, list[socket.socket]]:
        sockets = [listeningSocket(), listeningSocket()]
        for s in sockets:
            self.addCleanup(s.close)
        relay, _ = self.startRelay(
            endpoints=endpoints,
            inheritFds=tuple(s.fileno() for s in sockets),
            fdNames=names,
        )
        return relay, sockets

    def test_byName(self) -> None:
        """
        With C{LISTEN_FDNAMES}, C{systemd:domain=INET:name=...} picks the
        socket of that name, whatever its position: mail is submitted over
        STARTTLS on C{submission} and implicit TLS on C{submissions}, and
        the relay binds no port of its own.
        """
        relay, (implicitSock, starttlsSock) = self.activated(
            [
                ("systemd:domain=INET:name=submission", "starttls"),
                ("systemd:domain=INET:name=submissions", "implicit"),
            ],
            ("submissions", "submission"),
        )
        with RawSMTP(starttlsSock.getsockname()[1]) as client:
            login(client)
        with RawSMTP(
            implicitSock.getsockname()[1], implicitTLS=True, context=clientContext()
        ) as client:
            login(client, starttls=False)
        self.assertIn("listening on systemd:domain=INET:name=submission", relay.log())

    def test_byIndex(self) -> None:
        """
        C{systemd:domain=INET:index=N} picks the N-th socket (here both
        carry the socket unit's name, as systemd names sockets without a
        C{FileDescriptorName=}).
        """
        _, (first, second) = self.activated(
            [
                ("systemd:domain=INET:index=1", "implicit"),
                ("systemd:domain=INET:index=0", "starttls"),
            ],
            ("smtpauth-relay.socket", "smtpauth-relay.socket"),
        )
        with RawSMTP(first.getsockname()[1]) as client:
            login(client)
        with RawSMTP(second.getsockname()[1], implicitTLS=True) as client:
            login(client, starttls=False)

    def test_missingSocketRefusesToStart(self) -> None:
        """
        A listener naming a socket systemd did not pass stops the relay
        from starting, with a message naming it.
        """
        sock = listeningSocket()
        self.addCleanup(sock.close)
        relay = RelayProcess(
            endpoints=[("systemd:domain=INET:name=nosuch", "starttls")],
            inheritFds=(sock.fileno(),),
            fdNames=("submission",),
        )
        self.addCleanup(relay.remove)
        relay.start()
        status = self.waitForExit(relay)
        self.assertNotEqual(status, 0)
        self.assertIn(
            "[[listener]] endpoint 'systemd:domain=INET:name=nosuch': systemd"
            " passed no such socket (sockets passed: 'submission')",
            relay.log(),
        )
        self.assertNotIn("Traceback", relay.log())


class NotifyTests(SystemdRelayTestCase):
    """
    C{Type=notify}: READY, RELOADING, STOPPING and watchdog pings on a
    real C{NOTIFY_SOCKET}.
    """

    def test_readyOnlyWhenListening(self) -> None:
        """
        READY=1 comes once the listeners accept connections: a client
        connecting right after it is greeted.
        """
        relay, notify = self.startRelay()
        self.assertEqual(notify.messages[-1].get("STATUS"), "accepting mail")
        with RawSMTP(relay.starttlsPort) as client:
            self.assertEqual(client.reply().code, 220)

    def test_watchdog(self) -> None:
        """
        With C{WATCHDOG_USEC} set, the relay sends WATCHDOG=1 at half the
        interval: three pings of a 0.4 s watchdog arrive within seconds.
        """
        relay, notify = self.startRelay(env={"WATCHDOG_USEC": "400000"})
        start = time.monotonic()
        for _ in range(3):
            notify.waitFor(lambda f: f.get("WATCHDOG") == "1", "WATCHDOG=1")
        self.assertLess(time.monotonic() - start, 5.0, relay.log())

    def test_reloadAndStop(self) -> None:
        """
        SIGHUP gives RELOADING=1 (with MONOTONIC_USEC) then READY=1;
        SIGTERM gives STOPPING=1 and the process exits cleanly.
        """
        relay, notify = self.startRelay()
        self.signal(relay, signal.SIGHUP)
        reloading = notify.waitFor(lambda f: f.get("RELOADING") == "1", "RELOADING")
        self.assertTrue(reloading["MONOTONIC_USEC"].isdigit())
        notify.waitFor(ready, "READY=1 after the reload")
        self.signal(relay, signal.SIGTERM)
        notify.waitFor(lambda f: f.get("STOPPING") == "1", "STOPPING=1")
        self.assertIn(self.waitForExit(relay), (0, -signal.SIGTERM))


class ReloadTests(SystemdRelayTestCase):
    """
    A real SIGHUP re-reads the configuration.
    """

    def test_reloadAppliesAndRefuses(self) -> None:
        """
        After the file changes and SIGHUP, new sessions see the new
        C{max_message_size}; an invalid file is then refused with one log
        line, and the running configuration is kept.
        """
        relay, notify = self.startRelay(server={"max_message_size": 10000})
        with RawSMTP(relay.plainPort) as client:
            self.assertEqual(ehloSize(client), 10000)

        relay.server["max_message_size"] = 20000
        relay._writeConfig()
        self.signal(relay, signal.SIGHUP)
        notify.waitFor(lambda f: f.get("STATUS") == "reloaded", "reloaded")
        with RawSMTP(relay.plainPort) as client:
            self.assertEqual(ehloSize(client), 20000)

        with open(relay.configPath, "a") as f:
            f.write("\n[server]\nmax_message_size = 'lots'\n")
        self.signal(relay, signal.SIGHUP)
        notify.waitFor(
            lambda f: f.get("READY") == "1" and f.get("STATUS") != "reloaded",
            "READY after the refused reload",
        )
        poll(
            lambda: "reload of" in relay.log() and "refused" in relay.log(),
            10.0,
            lambda: "refusal logged\n" + relay.log(),
        )
        with RawSMTP(relay.plainPort) as client:
            self.assertEqual(ehloSize(client), 20000)


class GracefulStopTests(SystemdRelayTestCase):
    """
    A real SIGTERM: sessions sending a message finish it; nothing accepted
    is lost.
    """

    def test_messageUnderWayFinishes(self) -> None:
        """
        A client in the middle of DATA when SIGTERM arrives may finish: its
        message gets 250 and is delivered, then 421 4.3.2; an idle session
        gets 421 4.3.2 at once; the relay then exits.
        """
        relay, notify = self.startRelay()
        sending = RawSMTP(relay.starttlsPort)
        self.addCleanup(sending.close)
        login(sending)
        self.assertEqual(sending.command("MAIL FROM:<alice@example.org>").code, 250)
        self.assertEqual(sending.command("RCPT TO:<carol@example.net>").code, 250)
        self.assertEqual(sending.command("DATA").code, 354)
        sending.send(b"Subject: graceful\r\n\r\nfirst half\r\n")

        idle = RawSMTP(relay.starttlsPort)
        self.addCleanup(idle.close)
        login(idle)

        self.signal(relay, signal.SIGTERM)
        notify.waitFor(lambda f: f.get("STOPPING") == "1", "STOPPING=1")
        idle.sock.settimeout(IO_TIMEOUT)
        self.assertEqual(
            [str(r) for r in idle.readUntilClosed()],
            ["421 4.3.2 Service shutting down"],
        )
        # New connections are no longer served.
        try:
            with RawSMTP(relay.plainPort, timeout=5) as late:
                self.assertEqual(str(late.reply()), "421 4.3.2 Service shutting down")
        except OSError:
            pass

        sending.send(b"second half\r\n.\r\n")
        reply: SMTPReply = sending.reply()
        self.assertEqual(reply.code, 250, str(reply))
        self.assertIn(self.waitForExit(relay), (0, -signal.SIGTERM), relay.log())
        messages = list(relay.maildirFiles().values())
        for name in relay.spoolFiles():
            if name.endswith(".msg"):
                with open(os.path.join(relay.queueDirectory, name), "rb") as f:
                    messages.append(f.read())
        self.assertEqual(len(messages), 1, relay.log())
        self.assertIn(b"first half\nsecond half", messages[0].replace(b"\r\n", b"\n"))


class JSONLogTests(SystemdRelayTestCase):
    """
    C{[logging] format = "json"}: one JSON object per line, ready for
    journald or Loki.
    """

    def test_jsonLines(self) -> None:
        """
        Every line the relay writes is a JSON object with time, level,
        namespace and message; the AUTH event names the user and peer as
        fields, and the password appears nowhere.
        """
        relay, _ = self.startRelay(sections={"logging": {"format": "json"}})
        with RawSMTP(relay.starttlsPort) as client:
            login(client)
            client.command("QUIT")

        def authLogged() -> bool:
            return "AUTH PLAIN ok" in relay.log()

        poll(authLogged, 10.0, lambda: "AUTH logged\n" + relay.log())
        self.signal(relay, signal.SIGTERM)
        self.waitForExit(relay)
        lines = [
            line
            for line in relay.log().splitlines()
            if line and not line.startswith("=== starting")
        ]
        events = [json.loads(line) for line in lines]
        for event in events:
            self.assertTrue({"time", "level", "namespace", "message"} <= set(event))
        auth = [e for e in events if e["message"].startswith("AUTH PLAIN ok")]
        self.assertEqual(len(auth), 1, lines)
        self.assertEqual(auth[0]["user"], USER)
        self.assertEqual(auth[0]["peer"], HOST)
        self.assertEqual(auth[0]["level"], "info")
        self.assertNotIn(PASSWORD, relay.log())


class MetricsTests(SystemdRelayTestCase):
    """
    C{[metrics] endpoint} on a running relay, scraped over HTTP and parsed
    with prometheus-client's parser.
    """

    def test_scrapeAfterTraffic(self) -> None:
        """
        After one good and one failed login, one message accepted and
        delivered and one refused for its size, the scraped counters say
        exactly that.
        """
        from prometheus_client.parser import text_string_to_metric_families

        [metricsPort] = freePorts(1)
        relay, _ = self.startRelay(
            server={"max_message_size": 5000},
            sections={
                "metrics": {"endpoint": f"tcp:port={metricsPort}:interface={HOST}"}
            },
        )
        with RawSMTP(relay.starttlsPort) as client:
            login(client)
            self.assertEqual(client.command("MAIL FROM:<alice@example.org>").code, 250)
            self.assertEqual(client.command("RCPT TO:<carol@example.net>").code, 250)
            self.assertEqual(client.command("DATA").code, 354)
            client.send(b"Subject: counted\r\n\r\nhello\r\n.\r\n")
            self.assertEqual(client.reply().code, 250)
            reply = client.command("MAIL FROM:<alice@example.org> SIZE=9000")
            self.assertEqual(reply.code, 552, str(reply))
        with RawSMTP(relay.starttlsPort) as client:
            self.assertEqual(client.reply().code, 220)
            client.command(f"EHLO {CLIENT_NAME}")
            client.command("STARTTLS")
            client.startTLS()
            client.command(f"EHLO {CLIENT_NAME}")
            wrong = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
            self.assertEqual(client.command(f"AUTH PLAIN {wrong}").code, 535)
        relay.waitForDelivery(b"Subject: counted")

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            url = f"http://{HOST}:{metricsPort}/metrics"
            with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as response:
                body = response.read().decode()
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body)
                for s in family.samples
            }

        def value(name: str, **labels: str) -> float | None:
            key = ("smtpauth_relay_" + name, tuple(sorted(labels.items())))
            return scrape().get(key)

        starttls = f"tcp:port={relay.starttlsPort}:interface={HOST}"
        # A worker process's counts arrive within a second; each session's
        # close comes after its other counts.
        poll(
            lambda: (
                value("queue_messages") == 0.0
                and value("connections_open", listener=starttls) == 0.0
                and value("connections_total", listener=starttls, tls="starttls") == 3
            ),
            10.0,
            lambda: "queue empty and sessions closed in the metrics",
        )
        samples = scrape()

        def get(name: str, **labels: str) -> float | None:
            return samples.get(
                ("smtpauth_relay_" + name, tuple(sorted(labels.items())))
            )

        # Two sessions, and the probe that saw the relay listening.
        self.assertEqual(get("connections_total", listener=starttls, tls="starttls"), 3)
        self.assertEqual(get("connections_open", listener=starttls), 0)
        self.assertEqual(
            get("auth_attempts_total", mechanism="PLAIN", result="success"), 1
        )
        self.assertEqual(
            get("auth_attempts_total", mechanism="PLAIN", result="failure"), 1
        )
        self.assertEqual(get("messages_accepted_total"), 1)
        self.assertEqual(get("messages_rejected_total", reason="size"), 1)
        delivered = sum(
            v
            for (name, labels), v in samples.items()
            if name == "smtpauth_relay_delivery_attempts_total"
            and ("result", "delivered") in labels
        )
        self.assertEqual(delivered, 1)
        self.assertEqual(get("delivery_latency_seconds_count"), 1)
        self.assertEqual(get("queue_oldest_age_seconds"), 0)
