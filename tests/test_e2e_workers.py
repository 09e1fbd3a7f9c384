"""
End-to-end tests of C{[server] workers}: the real relay (C{twistd -n
smtpauth-relay}) with a worker process beside the main one, driven over
real sockets by smtplib.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import threading
import time
import urllib.request
import uuid

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpauth_relay.envelope import Envelope
from smtpauth_relay.ipc import MetricsForwarder
from smtpauth_relay.spool import Spool
from smtpauth_relay.threads import runNow
from tests.e2e_support import (
    HOST,
    HOSTNAME,
    IO_TIMEOUT,
    PASSWORD,
    USER,
    RelayProcess,
    clientContext,
    closeQuietly,
    freePorts,
    markedMessage,
    plainResponse,
    poll,
)
from tests.test_e2e import SharedRelay

WAIT = 20.0


def childPids(parent: int) -> list[int]:
    """
    The worker processes of the relay whose main process is C{parent}.
    """
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"smtpauth_relay.worker" in command:
            pids.append(int(name))
    return pids


class WorkerProcessTests(SharedRelay):
    """
    One relay with C{workers = 2}: the main process and one worker share
    the listening sockets.
    """

    relayServer = {"workers": 2}

    @classmethod
    def makeRelay(cls) -> RelayProcess:
        (metricsPort,) = freePorts(1)
        relay = RelayProcess(
            server=dict(cls.relayServer),
            lockout={"max_failures": 3, "tarpit": 0.1, "session_max_failures": 10},
            sections={
                "metrics": {"endpoint": f"tcp:port={metricsPort}:interface={HOST}"},
                # One user sends hundreds of messages here.
                "limits": {"messages_per_hour": 0, "recipients_per_hour": 0},
            },
        )
        relay.metricsPort = metricsPort  # type: ignore[attr-defined]
        return relay

    def workers(self) -> list[int]:
        assert self.relay.process is not None
        return poll(
            lambda: childPids(self.relay.process.pid) or None,  # type: ignore[union-attr]
            WAIT,
            lambda: "a worker process",
        )

    def send(self, marker: str) -> str:
        """
        One message in its own session; the queue id of its 250.
        """
        client = self.authenticated()
        sender, recipients = self.addresses()
        code, text = self.submit(
            client, markedMessage(marker, b"hello\r\n"), sender, recipients
        )
        closeQuietly(client)
        self.assertEqual(code, 250, text)
        return text.decode().rsplit(" ", 1)[1]

    def acceptedBy(self, queueId: str) -> str:
        """
        Which process logged the acceptance of C{queueId}: C{"main"} or
        C{"worker=N"}.
        """

        def line() -> str | None:
            for logged in self.relay.log().splitlines():
                if f"accepted {queueId} " in logged:
                    return logged
            return None

        found = poll(line, WAIT, lambda: f"the log line for {queueId}")
        match = re.search(r"worker=\d+", found.split("]", 1)[0])
        return match.group(0) if match else "main"

    def test_bothProcessesServeAndDeliverOnce(self) -> None:
        """
        Sessions land on both processes; every message is delivered once,
        by the main process.
        """
        self.workers()
        seen: dict[str, str] = {}
        byProcess: set[str] = set()
        for i in range(200):
            marker = f"e2e-workers-{uuid.uuid4().hex}-{i}"
            queueId = self.send(marker)
            seen[marker] = queueId
            byProcess.add(self.acceptedBy(queueId))
            if len(byProcess) == 2 and i >= 9:
                break
        self.assertEqual(byProcess, {"main", "worker=1"})
        for marker in seen:
            self.relay.waitForDelivery(marker.encode())
        self.relay.waitForEmptySpool()
        for marker in seen:
            self.assertEqual(len(self.relay.delivered(marker.encode())), 1, marker)

    def test_concurrentMessagesIntact(self) -> None:
        """
        Many sessions at once on both processes, while delivered messages'
        spool files are reused: every message is accepted, delivered once,
        and byte for byte its own.
        """
        self.workers()
        tag = uuid.uuid4().hex
        errors: list[str] = []
        markers: dict[str, bytes] = {}
        lock = threading.Lock()

        def session(n: int) -> None:
            try:
                client = self.authenticated()
                sender, recipients = self.addresses()
                for i in range(20):
                    marker = f"e2e-busy-{tag}-{n}-{i}"
                    body = b"".join(
                        f"{marker} line {k}\r\n".encode() for k in range(20 + 13 * i)
                    )
                    refused = client.sendmail(
                        sender, recipients, markedMessage(marker, body)
                    )
                    with lock:
                        if refused:
                            errors.append(f"{marker}: {refused}")
                        markers[marker] = body
                closeQuietly(client)
            except Exception as e:  # reported below, in the test's thread
                with lock:
                    errors.append(repr(e))

        threads = [threading.Thread(target=session, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(markers), 160)
        self.relay.waitForEmptySpool()
        for marker, body in markers.items():
            (delivered,) = self.relay.delivered(marker.encode() + b"@")
            self.assertIn(
                body.replace(b"\r\n", b"\n"), delivered.replace(b"\r\n", b"\n")
            )

    def test_lockoutAcrossProcesses(self) -> None:
        """
        Failed logins count in the main process whichever process took them:
        after max_failures, every new attempt from that address is locked
        out, on either process.
        """
        source = "127.200.1.1"

        def attempt(password: str) -> tuple[int, bytes]:
            client = smtplib.SMTP(
                HOST,
                self.relay.starttlsPort,
                local_hostname="client.e2e.test",
                timeout=IO_TIMEOUT,
                source_address=(source, 0),
            )
            try:
                client.ehlo()
                client.starttls(context=clientContext())
                client.ehlo()
                return client.docmd("AUTH", "PLAIN " + plainResponse(USER, password))
            finally:
                closeQuietly(client)

        for _ in range(3):
            self.assertEqual(attempt("wrong")[0], 535)
        for _ in range(8):
            code, text = attempt(PASSWORD)
            self.assertEqual(code, 454, text)
            self.assertTrue(text.startswith(b"4.7.0"), text)

    def test_metricsCountEveryProcess(self) -> None:
        """
        The main process's /metrics counts the messages of both processes.
        """
        url = f"http://{HOST}:{self.relay.metricsPort}/metrics"  # type: ignore[attr-defined]

        def accepted() -> float:
            with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as page:
                text = page.read().decode()
            match = re.search(
                r"^smtpauth_relay_messages_accepted_total (\S+)$", text, re.M
            )
            return float(match.group(1)) if match else 0.0

        # What earlier tests' sessions counted arrives within a second.
        time.sleep(MetricsForwarder.interval + 0.5)
        before = accepted()
        processes = set()
        sent = 0
        while sent < 200 and (len(processes) < 2 or sent < 6):
            processes.add(self.acceptedBy(self.send(f"e2e-metrics-{uuid.uuid4().hex}")))
            sent += 1
        self.assertEqual(len(processes), 2)
        poll(
            lambda: accepted() >= before + sent or None,
            WAIT,
            lambda: f"{sent} more messages counted",
        )
        time.sleep(1.5)
        self.assertEqual(accepted(), before + sent)

    def test_reloadReachesWorkers(self) -> None:
        """
        SIGHUP to the main process reloads the workers too.
        """
        assert self.relay.process is not None
        poll(
            lambda: "worker 1 running" in self.relay.log(),
            WAIT,
            lambda: "the worker running",
        )
        before = self.relay.log().count("reloaded ")
        self.relay.process.send_signal(signal.SIGHUP)
        poll(
            lambda: self.relay.log().count("reloaded ") >= before + 2 or None,
            WAIT,
            lambda: "both processes reloaded",
        )
        self.assertIn("worker=1] reloaded", self.relay.log())

    def test_workerStartedAgain(self) -> None:
        """
        A worker killed with SIGKILL is started again; mail goes on.
        """
        (old,) = self.workers()
        os.kill(old, signal.SIGKILL)
        poll(
            lambda: [p for p in childPids(self.relay.process.pid) if p != old] or None,  # type: ignore[union-attr]
            WAIT,
            lambda: "a new worker",
        )
        self.assertIn("worker 1 ended unexpectedly", self.relay.log())
        marker = f"e2e-after-kill-{uuid.uuid4().hex}"
        self.send(marker)
        self.relay.waitForDelivery(marker.encode())

    def test_deadWorkerCleanedUpAfter(self) -> None:
        """
        When a worker dies, the main process removes the files it was
        writing and delivers a message it committed but never reported,
        before it starts the worker again.
        """
        (old,) = self.workers()
        tmp = os.path.join(self.relay.queueDirectory, "tmp")
        partial = os.path.join(tmp, "w1-0123456789abcdef.new")
        with open(partial, "wb") as f:
            f.write(b"half a message")
        # A message committed by worker 1 (its spool, the same directory)
        # that never reached the main process.
        marker = f"e2e-unreported-{uuid.uuid4().hex}"
        sender, recipients = self.addresses()
        clock = Clock()
        clock.advance(time.time())
        spool = Spool(self.relay.queueDirectory, runNow, clock, worker=1)
        writer = spool.newMessage()
        writer.write(markedMessage(marker, b"hello\r\n"))
        envelope = Envelope(
            queueId=writer.queueId,
            sender=sender,
            recipients=tuple(recipients),
            receivedAt=clock.seconds(),
        )
        writer.commit(envelope)
        os.kill(old, signal.SIGKILL)
        self.relay.waitForDelivery(marker.encode())
        self.assertFalse(os.path.exists(partial))
        self.assertIn("unfinished spool files of worker 1", self.relay.log())
        poll(
            lambda: [p for p in childPids(self.relay.process.pid) if p != old] or None,  # type: ignore[union-attr]
            WAIT,
            lambda: "a new worker",
        )

    def test_restartedWorkerRunsMainsConfiguration(self) -> None:
        """
        A worker started again runs the configuration the main process
        runs, not the file edited since without a reload: every greeting
        still names the old hostname, the worker's included.
        """
        (old,) = self.workers()
        with open(self.relay.configPath) as f:
            text = f.read()
        self.addCleanup(self.rewriteConfig, text)
        self.rewriteConfig(text.replace(HOSTNAME, "edited-not-reloaded.test"))
        running = self.relay.log().count("worker 1 running")
        os.kill(old, signal.SIGKILL)
        poll(
            lambda: self.relay.log().count("worker 1 running") > running or None,
            WAIT,
            lambda: "the worker running again",
        )

        def byWorker() -> int:
            return self.relay.log().count("worker=1] connection from")

        before = byWorker()
        for _ in range(200):
            with socket.create_connection(
                (HOST, self.relay.starttlsPort), IO_TIMEOUT
            ) as s:
                s.settimeout(IO_TIMEOUT)
                greeting = s.recv(1024)
                s.sendall(b"QUIT\r\n")
                s.recv(1024)
            self.assertIn(HOSTNAME.encode(), greeting)
            if byWorker() >= before + 3:
                break
        else:
            self.fail("the worker took none of 200 connections")

    def rewriteConfig(self, text: str) -> None:
        with open(self.relay.configPath, "w") as f:
            f.write(text)


class WorkerStopTests(SynchronousTestCase):
    def test_stopEndsEveryProcess(self) -> None:
        """
        SIGTERM to the main process stops its workers too, cleanly.
        """
        relay = RelayProcess(server={"workers": 3})
        relay.start()
        self.addCleanup(relay.remove)
        assert relay.process is not None
        main = relay.process.pid
        workers = poll(
            lambda: pids if len(pids := childPids(main)) == 2 else None,
            WAIT,
            lambda: "two workers",
        )
        relay.process.send_signal(signal.SIGTERM)
        # twistd ends by re-raising the signal it stopped for.
        self.assertIn(relay.process.wait(WAIT), (0, -signal.SIGTERM))
        for pid in workers:
            self.assertFalse(childAlive(pid), pid)
        log = relay.log()
        self.assertIn("worker 1 stopped", log)
        self.assertIn("worker 2 stopped", log)
        self.assertNotIn("Traceback", log)


def childAlive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class EarlyReloadTests(SynchronousTestCase):
    def test_reloadWhileWorkerStarts(self) -> None:
        """
        A reload asked for while a worker is still starting does not kill
        it.
        """
        relay = RelayProcess(server={"workers": 2})
        relay.start()
        self.addCleanup(relay.remove)
        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        poll(
            lambda: "worker 1 running" in relay.log(),
            WAIT,
            lambda: f"the worker running; the log:\n{relay.log()[-3000:]}",
        )
        relay.process.send_signal(signal.SIGHUP)
        poll(
            lambda: "worker=1] reloaded" in relay.log(),
            WAIT,
            lambda: "the worker reloaded",
        )
        self.assertNotIn("ended unexpectedly", relay.log())

    def test_hangupAsListenersOpen(self) -> None:
        """
        A SIGHUP sent the moment the relay says it listens (before it has
        finished starting: a log rotation's C{kill -HUP}) does not end it:
        it reloads, and then takes mail from a real client.
        """
        relay = RelayProcess(server={"workers": 1})
        self.addCleanup(relay.remove)
        sent = threading.Event()

        def hangUpEarly() -> None:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                process = relay.process
                if process is not None and "listening on" in relay.log():
                    process.send_signal(signal.SIGHUP)
                    sent.set()
                    return
                time.sleep(0.001)

        thread = threading.Thread(target=hangUpEarly)
        thread.start()
        try:
            relay.start()
        finally:
            thread.join()
        self.assertTrue(sent.is_set())
        poll(lambda: "reloaded" in relay.log(), WAIT, lambda: relay.log()[-3000:])
        self.assertTrue(relay.running())
        client = smtplib.SMTP(HOST, relay.starttlsPort, timeout=IO_TIMEOUT)
        self.addCleanup(closeQuietly, client)
        client.starttls(context=clientContext())
        client.login(USER, PASSWORD)
        marker = f"e2e-early-hup-{uuid.uuid4().hex}"
        client.sendmail(
            "a@sender.example", ["b@rcpt.example"], markedMessage(marker, b"hi\r\n")
        )
        relay.waitForDelivery(marker.encode())


class OrphanTests(SynchronousTestCase):
    def test_workerEndsWithMainProcess(self) -> None:
        """
        C{kill -9} of the main process: its worker stops too, at once, and
        leaves the ports free for the next start.
        """
        relay = RelayProcess(server={"workers": 2})
        relay.start()
        self.addCleanup(relay.remove)
        assert relay.process is not None
        main = relay.process.pid
        (worker,) = poll(lambda: childPids(main) or None, WAIT, lambda: "a worker")
        relay.kill9()
        poll(lambda: not childAlive(worker), WAIT, lambda: "the worker gone")
        for port in relay.ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((HOST, port))
        relay.start()
        marker = f"e2e-orphan-{uuid.uuid4().hex}"
        client = smtplib.SMTP(HOST, relay.starttlsPort, timeout=IO_TIMEOUT)
        self.addCleanup(closeQuietly, client)
        client.starttls(context=clientContext())
        client.login(USER, PASSWORD)
        client.sendmail(
            "a@sender.example", ["b@rcpt.example"], markedMessage(marker, b"hi\r\n")
        )
        relay.waitForDelivery(marker.encode())
