"""
Tests for L{smtpauth_relay.workers}: how many workers, how they are
started, started again, reloaded and stopped.  (The end-to-end tests run
real worker processes.)
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpauth_relay.config import MAX_WORKERS, ServerConfig, loadConfig
from smtpauth_relay.errors import ConfigError
from smtpauth_relay.ipc import MainChannel
from smtpauth_relay.retry import QueueRunner
from smtpauth_relay.server import ConnectionLimiter
from smtpauth_relay.service import workerCleanUp
from smtpauth_relay.spool import Spool
from smtpauth_relay.testing import RecordingDeliveryAgent
from smtpauth_relay.threads import runNow
from smtpauth_relay.worker import listenerDescriptors, parseArguments, readConfigs
from smtpauth_relay.workers import (
    CHANNEL_FD,
    FIRST_LISTENER_FD,
    WorkerSupervisor,
    configDocument,
    shareable,
    workerCommand,
    workerCount,
    workerEnvironment,
)
from tests.test_plugins import configText, writeConfig
from tests.test_spool import envelopeFor


class FakeProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class FakeReactor(Clock):
    """
    A clock that records the processes spawned and the connections adopted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str], dict[int, Any]]] = []
        self.adopted: list[tuple[int, Any]] = []
        self.documents: list[dict[int, bytes]] = []
        """The regular files each process was given, by descriptor."""

    def spawnProcess(
        self,
        protocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, Any],
    ) -> FakeProcessTransport:
        transport = FakeProcessTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, env, dict(childFDs)))
        documents = {}
        for number, fd in childFDs.items():
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    documents[number] = os.pread(fd, 1 << 20, 0)
            except OSError:
                pass  # (the fake listening sockets' made-up numbers)
        self.documents.append(documents)
        return transport

    def adoptStreamConnection(self, fd: int, family: Any, factory: Any) -> None:
        os.fstat(fd)  # still open while being adopted
        self.adopted.append((fd, factory.buildProtocol(None)))


class FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class FakeListeningService:
    def __init__(self, fd: int) -> None:
        self._waitingForPort = succeed(FakePort(fd))


class CountTests(SynchronousTestCase):
    def test_auto(self) -> None:
        """
        By default (0, "auto") one process per core; at least one.
        """
        config: Any = SimpleNamespace(server=ServerConfig(workers=0))
        self.assertEqual(workerCount(config, lambda: 8), 8)
        self.assertEqual(workerCount(config, lambda: 0), 1)
        config.server = ServerConfig(workers=3)
        self.assertEqual(workerCount(config, lambda: 8), 3)

    def test_autoCapped(self) -> None:
        """
        On a machine with more cores than the setting allows, "auto" is
        the most it allows.
        """
        config: Any = SimpleNamespace(server=ServerConfig(workers=0))
        self.assertEqual(workerCount(config, lambda: 256), MAX_WORKERS)

    def test_autoFollowsAffinity(self) -> None:
        """
        By default the count is of the CPUs this process may run on, not
        of the machine's (a relay pinned to two cores runs two processes).
        """
        config: Any = SimpleNamespace(server=ServerConfig(workers=0))
        if not hasattr(os, "sched_getaffinity"):
            raise SkipTest("no CPU affinity here")
        self.patch(os, "sched_getaffinity", lambda pid: {0, 1})
        self.patch(os, "cpu_count", lambda: 32)
        self.assertEqual(workerCount(config), 2)


class CommandTests(SynchronousTestCase):
    def test_environment(self) -> None:
        """
        A worker does not see systemd's variables (only the main process
        talks to systemd) and can import this package.
        """
        env = workerEnvironment(
            {
                "NOTIFY_SOCKET": "/run/x",
                "LISTEN_FDS": "2",
                "LISTEN_PID": "1",
                "WATCHDOG_USEC": "1",
                "PATH": "/bin",
                "PYTHONPATH": "/elsewhere",
            }
        )
        self.assertEqual(env["PATH"], "/bin")
        for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC"):
            self.assertNotIn(name, env)
        root, rest = env["PYTHONPATH"].split(os.pathsep)
        self.assertTrue(os.path.isdir(os.path.join(root, "smtpauth_relay")))
        self.assertEqual(rest, "/elsewhere")

    def test_commandParsed(self) -> None:
        """
        The worker parses the command line the supervisor writes.
        """
        command = workerCommand("/etc/relay.toml", 2, [0, 2], ["--auth", "memory:a:b"])
        self.assertEqual(
            command[:4],
            [sys.executable, "-m", "smtpauth_relay.workerstart", str(os.getpid())],
        )
        args = parseArguments(command[4:])
        self.assertEqual(args.config, "/etc/relay.toml")
        self.assertEqual(args.index, 2)
        self.assertEqual(args.auth, ["memory:a:b"])
        self.assertEqual(
            listenerDescriptors(args.listener),
            [(0, FIRST_LISTENER_FD), (2, FIRST_LISTENER_FD + 1)],
        )
        self.assertIsNone(args.config_fd)
        args = parseArguments(workerCommand("/etc/relay.toml", 2, [0], [], 5)[4:])
        self.assertEqual(args.config_fd, 5)

    def configFd(self, started: str, running: str) -> int:
        document = configDocument(started, running)
        fd = os.dup(document.fileno())
        document.close()
        return fd

    def test_readConfigs(self) -> None:
        """
        A worker reads the main process's configuration from the document
        on its descriptor: what it started with, and what it runs now if
        that differs (relative paths taken from the file's directory, and
        problems named after it, as when the file is read); without a
        descriptor, from the file.
        """
        text, _ = configText(self)
        path = writeConfig(self, text)
        started, running = readConfigs(path, None)
        self.assertEqual((started.text, running), (text, None))
        started, running = readConfigs(path, self.configFd(text, text))
        self.assertEqual((started, running), (loadConfig(path), None))
        edited = text.replace("[server]\n", "[server]\nmax_recipients = 7\n")
        started, running = readConfigs(path, self.configFd(text, edited))
        assert running is not None
        self.assertEqual(started.server.max_recipients, 100)
        self.assertEqual(running.server.max_recipients, 7)
        self.assertEqual(running.path, path)
        with self.assertRaises(ConfigError) as raised:
            readConfigs(path, self.configFd("[server]\nworkers = -1\n", text))
        self.assertIn(path, "\n".join(raised.exception.problems))


class BootstrapTests(SynchronousTestCase):
    def bootstrap(self, parent: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "smtpauth_relay.workerstart", str(parent), "--help"],
            env=workerEnvironment(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_startsWorker(self) -> None:
        """
        Started by its main process, the bootstrap runs the worker module
        with the arguments after the main process's id.
        """
        result = self.bootstrap(os.getpid())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("python -m smtpauth_relay.worker", result.stdout)

    def test_orphanExits(self) -> None:
        """
        A worker whose main process is already gone exits at once.
        """
        result = self.bootstrap(1)
        self.assertEqual(result.returncode, 1)
        self.assertIn("the main process is gone", result.stderr)


class ShareableTests(SynchronousTestCase):
    def test_plainSocketsShared(self) -> None:
        """
        The workers share plain stream listeners; one whose endpoint may do
        more than accept (TLS at the endpoint, a plugin's) stays the main
        process's.
        """
        for endpoint in (
            "tcp:port=587",
            "TCP6:port=587:interface=\\:\\:",
            "unix:/run/relay.sock",
            "systemd:domain=INET:index=0",
        ):
            self.assertTrue(shareable(endpoint), endpoint)
        for endpoint in ("ssl:port=465:privateKey=k.pem", "le:/srv/certs:tcp:443"):
            self.assertFalse(shareable(endpoint), endpoint)


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.channels: list[MainChannel] = []

        def makeChannel(index: int) -> MainChannel:
            self.assertIn(index, (1, 2))
            channel = MainChannel(
                lambda q, e: None, ConnectionLimiter(10, 10), None, None, None
            )
            self.channels.append(channel)
            return channel

        self.cleanUps: list[tuple[int, Deferred[None]]] = []
        self.supervisor = WorkerSupervisor(
            self.reactor,
            2,
            "/etc/relay.toml",
            ["--auth", "memory:a:b"],
            [(0, FakeListeningService(40)), (1, FakeListeningService(41))],
            makeChannel,
            self.cleanUp,
            lambda: self.texts,
        )
        self.texts = ("started", "started")
        self.supervisor.startService()
        self.cleaned = True
        """Whether the clean-ups are over at once (else: in L{cleanUps})."""

    def cleanUp(self, index: int) -> Deferred[None]:
        if self.cleaned:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.cleanUps.append((index, d))
        return d

    def end(self, index: int, reason: Any = None) -> None:
        process = self.supervisor.processes[index]
        process.processEnded(Failure(reason or ProcessTerminated(signal=9)))

    def test_started(self) -> None:
        """
        Each worker gets the listening sockets, its channel on descriptor 3,
        the main process's configuration after the sockets, and the
        standard output and error; nothing else.
        """
        self.assertEqual(len(self.reactor.spawned), 2)
        for n, (_, args, env, childFDs) in enumerate(self.reactor.spawned):
            self.assertNotIn("NOTIFY_SOCKET", env)
            self.assertEqual(
                args,
                workerCommand(
                    "/etc/relay.toml",
                    n + 1,
                    [0, 1],
                    ["--auth", "memory:a:b"],
                    FIRST_LISTENER_FD + 2,
                ),
            )
            self.assertEqual(childFDs[1], 1)
            self.assertEqual(childFDs[2], 2)
            self.assertEqual(childFDs[FIRST_LISTENER_FD], 40)
            self.assertEqual(childFDs[FIRST_LISTENER_FD + 1], 41)
            self.assertEqual(
                sorted(childFDs), [1, 2, CHANNEL_FD, FIRST_LISTENER_FD, 5, 6]
            )
        self.assertEqual(
            [protocol for _, protocol in self.reactor.adopted], self.channels
        )

    def test_configDocument(self) -> None:
        """
        Each worker started gets, on the descriptor after its listeners,
        the configuration the main process started with and the one it
        runs at that moment (after a reload); the file itself may have
        been edited since.
        """
        self.assertEqual(
            [json.loads(d[FIRST_LISTENER_FD + 2]) for d in self.reactor.documents],
            [{"started": "started", "running": "started"}] * 2,
        )
        self.texts = ("started", "reloaded")
        self.end(1)
        self.reactor.advance(1)
        self.assertEqual(
            json.loads(self.reactor.documents[-1][FIRST_LISTENER_FD + 2]),
            {"started": "started", "running": "reloaded"},
        )
        self.flushLoggedErrors()

    def test_restarted(self) -> None:
        """
        A worker that dies is started again after a pause that doubles
        while it keeps dying young, up to 30 seconds.
        """
        pauses = []
        for _ in range(7):
            spawned = len(self.reactor.spawned)
            self.end(1)
            self.assertNotIn(1, self.supervisor.processes)
            pause = self.supervisor._restarts[1].getTime() - self.reactor.seconds()
            pauses.append(pause)
            self.reactor.advance(pause)
            self.assertEqual(len(self.reactor.spawned), spawned + 1)
            self.assertIn(1, self.supervisor.processes)
        self.assertEqual(pauses, [1, 2, 4, 8, 16, 30, 30])
        self.reactor.advance(61)
        self.end(1)
        self.assertEqual(
            self.supervisor._restarts[1].getTime() - self.reactor.seconds(), 1
        )
        self.flushLoggedErrors()

    def test_restartAfterCleanUp(self) -> None:
        """
        A worker that died is cleaned up after (its files) before it is
        started again; one whose clean-up failed too, the failure logged.
        """
        self.cleaned = False
        spawned = len(self.reactor.spawned)
        self.end(1)
        self.end(2)
        self.assertEqual([index for index, _ in self.cleanUps], [1, 2])
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), spawned)
        self.cleanUps[0][1].callback(None)
        self.cleanUps[1][1].errback(OSError("tmp unreadable"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.reactor.advance(1)
        self.assertEqual(sorted(self.supervisor.processes), [1, 2])
        self.assertEqual(len(self.reactor.spawned), spawned + 2)
        self.flushLoggedErrors()

    def test_stopDuringCleanUp(self) -> None:
        """
        A worker whose clean-up is still running at shutdown is not
        started again; one that stops at shutdown is not cleaned up after
        (the relay's next start clears the spool's C{tmp/}).
        """
        self.cleaned = False
        self.end(1)
        d = self.supervisor.stopService()
        self.end(2, ProcessDone(0))
        self.successResultOf(d)
        for _, cleaning in self.cleanUps:
            cleaning.callback(None)
        self.assertEqual([index for index, _ in self.cleanUps], [1])
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.flushLoggedErrors()

    def signals(self, index: int) -> list[int]:
        transport = self.supervisor.processes[index].transport
        return transport.signals  # type: ignore[union-attr,no-any-return]

    def test_reload(self) -> None:
        """
        A reload is passed on as SIGHUP to every worker that is ready; one
        still starting gets it once it says it is ready (it may have read
        the configuration before it changed).
        """
        self.channels[0].workerReady()
        self.supervisor.reload()
        self.assertEqual(self.signals(1), [signal.SIGHUP])
        self.assertEqual(self.signals(2), [])
        self.channels[1].workerReady()
        self.assertEqual(self.signals(2), [signal.SIGHUP])
        self.channels[1].workerReady()
        self.assertEqual(self.signals(2), [signal.SIGHUP])

    def test_stop(self) -> None:
        """
        At shutdown each worker is sent SIGTERM; the stop is over when all
        have ended, and none is started again.
        """
        d = self.supervisor.stopService()
        processes = list(self.supervisor.processes.values())
        for process in processes:
            self.assertEqual(process.transport.signals, [signal.SIGTERM])  # type: ignore[union-attr]
        self.end(1, ProcessDone(0))
        self.assertNoResult(d)
        self.end(2, ProcessDone(0))
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)
        for process in processes:
            self.assertEqual(process.transport.signals, [signal.SIGTERM])  # type: ignore[union-attr]

    def test_stopKillsLaggards(self) -> None:
        """
        A worker still running after the grace period is killed.
        """
        d = self.supervisor.stopService()
        self.reactor.advance(self.supervisor.grace)
        for process in self.supervisor.processes.values():
            self.assertEqual(
                process.transport.signals,  # type: ignore[union-attr]
                [signal.SIGTERM, signal.SIGKILL],
            )
        self.end(1, ProcessTerminated(signal=9))
        self.end(2, ProcessTerminated(signal=9))
        self.successResultOf(d)

    def test_stopCancelsRestart(self) -> None:
        """
        A restart pending at shutdown does not happen.
        """
        self.end(1)
        self.end(2)
        self.successResultOf(self.supervisor.stopService())
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.flushLoggedErrors()


class WorkerCleanUpTests(SynchronousTestCase):
    """
    L{workerCleanUp}: what the main process does once a worker has ended.
    """

    def test_unreportedMessageScheduled(self) -> None:
        """
        A message a worker committed but did not live to report is
        delivered; those the queue runner knows of are not attempted
        twice.
        """
        clock = Clock()
        directory = self.mktemp()
        spool = Spool(directory, runNow, clock)
        spool.prepare()
        spool.files.outlet(1)
        agent = RecordingDeliveryAgent()
        runner = QueueRunner(spool, agent, clock, retrySchedule=(60,))
        runner.startService()
        self.addCleanup(runner.stopService)
        worker = Spool(directory, runNow, clock, worker=1)
        queueIds = []
        for text in (b"reported\n", b"not reported\n"):
            writer = worker.newMessage()
            writer.write(text)
            queueIds.append(
                self.successResultOf(writer.commit(envelopeFor(writer.queueId)))
            )
        spool.adopt(queueIds[0], None, worker=1)
        clock.advance(0)
        self.assertEqual([e.queueId for e, _, _ in agent.calls], queueIds[:1])
        with capturedLogs() as events:
            self.successResultOf(workerCleanUp(spool, runner, runNow)(1))
        clock.advance(0)
        self.assertEqual([e.queueId for e, _, _ in agent.calls], queueIds)
        self.assertIn("1 queued messages", "\n".join(map(formatEvent, events)))
